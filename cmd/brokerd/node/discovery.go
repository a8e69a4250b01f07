package node

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/stomp"
)

// Bounds of the x-brokerd-nodes header (stomp.HeaderNodes): the nodes it
// lists, and its value's length. The nodes left out are the last in
// address order; a client needs a few to fail over to, not every one.
const (
	maxListedNodes    = 64
	maxNodesHeaderLen = 4096
)

// nodesTTL is how long one computed list serves CONNECTs before the
// membership is read again: the header lags the membership by at most
// this, and a storm of CONNECTs reads it at most 1/nodesTTL times a second.
const nodesTTL = 250 * time.Millisecond

// discovery tells clients where the cluster's other nodes are: it answers
// stomp.Config.Nodes with the client addresses of the alive members, this
// node first, for the transport the client came over. It is safe for
// concurrent use.
type discovery struct {
	cl atomic.Pointer[cluster.Node] // set once the membership runs

	mu    sync.Mutex
	at    time.Time        // when lists was computed, zero for never
	lists [4]string        // by stomp.Transport
	now   func() time.Time // time.Now
}

func newDiscovery() *discovery { return &discovery{now: time.Now} }

// nodes is stomp.Config.Nodes: "" until the membership runs.
func (d *discovery) nodes(t stomp.Transport) string {
	cl := d.cl.Load()
	if cl == nil || int(t) >= len(d.lists) {
		return ""
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if now := d.now(); d.at.IsZero() || now.Sub(d.at) >= nodesTTL {
		d.lists = nodeLists(cl.Status())
		d.at = now
	}
	return d.lists[t]
}

// nodeLists returns, for each transport, the x-brokerd-nodes value of
// status: the client address of this node for that transport, then those
// of the other alive members in address order, comma-separated. A member
// that is suspect, dead, left or draining is not listed, nor one without a listener
// for the transport or whose address has no host clients could dial
// (0.0.0.0). Bounded by maxListedNodes and maxNodesHeaderLen.
func nodeLists(s cluster.Status) [4]string {
	var self [4]string
	var others [4][]string
	for _, m := range s.Members {
		// A draining member refuses new clients: not a place to fail
		// over to.
		if m.State != "alive" || (m.Draining && m.ID != s.NodeID) {
			continue
		}
		addrs := [4]string{stomp.TransportTCP: m.STOMPAddr, stomp.TransportTLS: m.STOMPTLSAddr, stomp.TransportWS: m.STOMPWSAddr, stomp.TransportWSS: m.STOMPWSSAddr}
		for t, a := range addrs {
			if !dialable(a) {
				continue
			}
			if m.ID == s.NodeID {
				self[t] = a
			} else {
				others[t] = append(others[t], a)
			}
		}
	}
	var lists [4]string
	for t := range lists {
		slices.Sort(others[t])
		all := slices.Compact(others[t])
		if self[t] != "" {
			all = append([]string{self[t]}, all...)
		}
		var b strings.Builder
		for i, a := range all {
			if i == maxListedNodes || b.Len()+1+len(a) > maxNodesHeaderLen {
				break
			}
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(a)
		}
		lists[t] = b.String()
	}
	return lists
}

// dialable reports whether addr is host:port with a host a client can
// dial: not empty, not 0.0.0.0 or ::, and an IP address or a host name
// (letters, digits, '.', '-', '_'), so that an address gossiped by a
// member can neither break the CONNECTED frame (a newline) nor add
// entries to the list (a comma).
func dialable(addr string) bool {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host == "" || port == "" || port == "0" || strings.Trim(port, "0123456789") != "" {
		return false
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return !ip.IsUnspecified() && hostNameChars(ip.Zone())
	}
	return hostNameChars(host)
}

// hostNameChars reports whether s has only the characters of a host name
// (or an interface name, for an IPv6 zone): letters, digits, '.', '-', '_'.
func hostNameChars(s string) bool {
	for _, c := range []byte(s) {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '.', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}

// advertisedClientAddrs returns the addresses a node advertises for its
// client listeners, given stomp.advertise_addr and the bound addresses
// ("" for a listener it does not have). With advertise set, the plain
// listener is advertised as it says and the others at its host with their
// bound ports (a TLS certificate names that host); without, each is
// advertised as bound, and cluster replaces an unspecified host (0.0.0.0,
// ::) by the gossip address's host.
func advertisedClientAddrs(advertise string, bound cluster.ClientAddrs) cluster.ClientAddrs {
	if advertise == "" {
		return bound
	}
	host, _, err := net.SplitHostPort(advertise)
	if err != nil {
		return bound // config.Validate refuses it
	}
	at := func(addr string) string {
		if addr == "" {
			return ""
		}
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			return addr
		}
		return net.JoinHostPort(host, port)
	}
	out := cluster.ClientAddrs{TLS: at(bound.TLS), WS: at(bound.WS), WSS: at(bound.WSS)}
	if bound.TCP != "" {
		out.TCP = advertise
	}
	return out
}
