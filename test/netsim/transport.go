package netsim

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/memberlist"
)

// ErrShutdown is returned by a transport's send and dial methods after its
// Shutdown.
var ErrShutdown = errors.New("netsim: transport shut down")

// Transport is a host's memberlist.NodeAwareTransport.
type Transport struct {
	host     *Host
	packetCh chan *memberlist.Packet
	streamCh chan net.Conn
	done     chan struct{} // closed by Shutdown
	once     sync.Once
}

var _ memberlist.NodeAwareTransport = (*Transport)(nil)

// Transport returns the host's transport. While that transport is running,
// every call returns it; after its Shutdown the next call returns a new one
// on the same address (a node restart).
func (h *Host) Transport() memberlist.NodeAwareTransport {
	return h.transport()
}

func (h *Host) transport() *Transport {
	n := h.net
	n.mu.Lock()
	defer n.mu.Unlock()
	if h.cur == nil {
		h.cur = &Transport{
			host:     h,
			packetCh: make(chan *memberlist.Packet, packetBuffer),
			streamCh: make(chan net.Conn, streamBacklog),
			done:     make(chan struct{}),
		}
	}
	return h.cur
}

// FinalAdvertiseAddr returns the host's address, whatever is configured.
func (t *Transport) FinalAdvertiseAddr(string, int) (net.IP, int, error) {
	return t.host.IP(), Port, nil
}

// WriteTo sends a packet to addr ("ip:port").
func (t *Transport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

// WriteToAddress sends a packet to a.Addr. It never blocks; undeliverable
// packets are dropped silently, as with UDP.
func (t *Transport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	now := time.Now()
	if t.isShutdown() {
		return now, ErrShutdown
	}
	if _, _, err := net.SplitHostPort(a.Addr); err != nil {
		return now, err
	}
	dst := t.route(a.Addr, true)
	if dst == nil {
		return now, nil
	}
	p := &memberlist.Packet{
		Buf:       append([]byte(nil), b...),
		From:      &net.UDPAddr{IP: t.host.IP(), Port: Port},
		Timestamp: now,
	}
	select {
	case dst.packetCh <- p:
	default: // receive buffer full: dropped
	}
	return now, nil
}

// route returns the running transport at addr if t's host can currently
// reach it (and, for packets, the drop coin spares it), else nil.
func (t *Transport) route(addr string, packet bool) *Transport {
	n := t.host.net
	n.mu.Lock()
	defer n.mu.Unlock()
	h := n.byAddr[addr]
	if h == nil || h.cur == nil || !n.reachableLocked(t.host, h) {
		return nil
	}
	if packet && n.drop > 0 && n.rng.Float64() < n.drop {
		return nil
	}
	return h.cur
}

// PacketCh returns the channel of incoming packets.
func (t *Transport) PacketCh() <-chan *memberlist.Packet { return t.packetCh }

// StreamCh returns the channel of incoming streams.
func (t *Transport) StreamCh() <-chan net.Conn { return t.streamCh }

// DialTimeout opens a stream to addr ("ip:port").
func (t *Transport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

// DialAddressTimeout opens a stream to a.Addr. Across a partition (or to or
// from a killed host) it fails with a timeout after min(timeout, 50ms); to
// a reachable host without a running transport it is refused.
func (t *Transport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	n := t.host.net
	opErr := func(err error) error {
		var raddr net.Addr
		if host, port, e := net.SplitHostPort(a.Addr); e == nil {
			var p int
			_, _ = fmt.Sscan(port, &p)
			raddr = &net.TCPAddr{IP: net.ParseIP(host), Port: p}
		}
		return &net.OpError{Op: "dial", Net: "tcp", Addr: raddr, Err: err}
	}
	if t.isShutdown() {
		return nil, opErr(ErrShutdown)
	}
	if _, _, err := net.SplitHostPort(a.Addr); err != nil {
		return nil, opErr(err)
	}

	n.mu.Lock()
	dstHost := n.byAddr[a.Addr]
	reachable := dstHost != nil && n.reachableLocked(t.host, dstHost)
	var dst *Transport
	if reachable {
		dst = dstHost.cur
	}
	n.mu.Unlock()

	if !reachable {
		// Unknown or unreachable address: SYNs go nowhere, time out.
		d := maxDialFailDelay
		if timeout > 0 && timeout < d {
			d = timeout
		}
		timer := time.NewTimer(d)
		defer timer.Stop()
		select {
		case <-timer.C:
		case <-t.done:
		}
		return nil, opErr(os.ErrDeadlineExceeded)
	}
	if dst == nil {
		return nil, opErr(syscall.ECONNREFUSED)
	}

	local := &net.TCPAddr{IP: t.host.IP(), Port: n.ephemeralPort()}
	remote := &net.TCPAddr{IP: dstHost.IP(), Port: Port}
	client, server := newPipe(n, t.host, dstHost, local, remote)

	var timeoutC <-chan time.Time
	if timeout > 0 {
		timer := time.NewTimer(timeout)
		defer timer.Stop()
		timeoutC = timer.C
	}
	select {
	case dst.streamCh <- server:
		if dst.isShutdown() {
			// Lost a race with Shutdown's backlog reset.
			_ = server.Close()
			_ = client.Close()
			return nil, opErr(syscall.ECONNREFUSED)
		}
		return client, nil
	case <-dst.done:
		return nil, opErr(syscall.ECONNREFUSED)
	case <-t.done:
		return nil, opErr(ErrShutdown)
	case <-timeoutC:
		return nil, opErr(os.ErrDeadlineExceeded)
	}
}

// Shutdown stops the transport: nothing is delivered to it any more,
// pending incoming streams are closed, and its host may get a new transport.
func (t *Transport) Shutdown() error {
	t.once.Do(func() {
		n := t.host.net
		n.mu.Lock()
		close(t.done)
		if t.host.cur == t {
			t.host.cur = nil
		}
		n.mu.Unlock()
		// Reset streams that were never accepted.
		for {
			select {
			case c := <-t.streamCh:
				_ = c.Close()
			default:
				return
			}
		}
	})
	return nil
}

func (t *Transport) isShutdown() bool {
	select {
	case <-t.done:
		return true
	default:
		return false
	}
}
