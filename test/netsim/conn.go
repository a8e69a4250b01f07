package netsim

import (
	"bytes"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// pipe is a bidirectional in-memory stream between two hosts. Each
// direction is buffered (up to streamBuffer bytes), deadlines work as on a
// net.Conn, and while the hosts cannot reach each other the stream is
// silent: reads wait, writes are discarded.
type pipe struct {
	net *Network

	mu     sync.Mutex
	notify chan struct{} // closed and replaced on every state change
	ends   [2]*conn
}

// conn is one end of a pipe.
type conn struct {
	p            *pipe
	side         int
	local, peerH *Host
	laddr, raddr net.Addr

	// guarded by p.mu
	in     bytes.Buffer // bytes for this end to read
	closed bool
	rdl    time.Time
	wdl    time.Time
}

func newPipe(n *Network, a, b *Host, aAddr, bAddr net.Addr) (*conn, *conn) {
	p := &pipe{net: n, notify: make(chan struct{})}
	p.ends[0] = &conn{p: p, side: 0, local: a, peerH: b, laddr: aAddr, raddr: bAddr}
	p.ends[1] = &conn{p: p, side: 1, local: b, peerH: a, laddr: bAddr, raddr: aAddr}
	return p.ends[0], p.ends[1]
}

// signalLocked wakes every goroutine waiting on the pipe.
func (p *pipe) signalLocked() {
	close(p.notify)
	p.notify = make(chan struct{})
}

func (c *conn) peer() *conn { return c.p.ends[1-c.side] }

// wait releases p.mu until the pipe or the network changes or the deadline
// passes, then takes p.mu again.
func (c *conn) wait(netCh <-chan struct{}, deadline time.Time) {
	pipeCh := c.p.notify
	c.p.mu.Unlock()
	defer c.p.mu.Lock()
	if deadline.IsZero() {
		select {
		case <-pipeCh:
		case <-netCh:
		}
		return
	}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case <-pipeCh:
	case <-netCh:
	case <-timer.C:
	}
}

func expired(deadline time.Time) bool {
	return !deadline.IsZero() && !time.Now().Before(deadline)
}

func (c *conn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.laddr, Addr: c.raddr, Err: err}
}

func (c *conn) Read(b []byte) (int, error) {
	p := c.p
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if c.closed {
			return 0, c.opErr("read", net.ErrClosed)
		}
		up, netCh := p.net.link(c.local, c.peerH)
		if up {
			if c.in.Len() > 0 {
				n, _ := c.in.Read(b)
				p.signalLocked() // room for a blocked writer
				return n, nil
			}
			if c.peer().closed {
				return 0, io.EOF
			}
		}
		if expired(c.rdl) {
			return 0, c.opErr("read", os.ErrDeadlineExceeded)
		}
		c.wait(netCh, c.rdl)
	}
}

func (c *conn) Write(b []byte) (int, error) {
	p := c.p
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for {
		if c.closed {
			return n, c.opErr("write", net.ErrClosed)
		}
		if n == len(b) {
			return n, nil
		}
		if expired(c.wdl) {
			return n, c.opErr("write", os.ErrDeadlineExceeded)
		}
		up, netCh := p.net.link(c.local, c.peerH)
		if !up {
			// Separated: the bytes vanish into the void.
			return len(b), nil
		}
		peer := c.peer()
		if peer.closed {
			return n, c.opErr("write", syscall.EPIPE)
		}
		if space := streamBuffer - peer.in.Len(); space > 0 {
			k := min(space, len(b)-n)
			peer.in.Write(b[n : n+k])
			n += k
			p.signalLocked()
			continue
		}
		c.wait(netCh, c.wdl)
	}
}

func (c *conn) Close() error {
	p := c.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.closed {
		return c.opErr("close", net.ErrClosed)
	}
	c.closed = true
	c.in.Reset()
	p.signalLocked()
	return nil
}

func (c *conn) LocalAddr() net.Addr  { return c.laddr }
func (c *conn) RemoteAddr() net.Addr { return c.raddr }

func (c *conn) SetDeadline(t time.Time) error {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	c.rdl, c.wdl = t, t
	c.p.signalLocked()
	return nil
}

func (c *conn) SetReadDeadline(t time.Time) error {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	c.rdl = t
	c.p.signalLocked()
	return nil
}

func (c *conn) SetWriteDeadline(t time.Time) error {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	c.wdl = t
	c.p.signalLocked()
	return nil
}
