package cluster

import (
	"net"
	"net/netip"
)

// advertiseAt replaces, in the addresses the node advertises (its client
// listeners, admin and peer-link addresses), an unspecified host (0.0.0.0,
// ::, or none: bound on every interface) by host, the advertised gossip
// host: the others could not reach "0.0.0.0". It is called by Start
// before anyone knows the node, and fails if the metadata no longer fits.
func (n *Node) advertiseAt(host string) error {
	if ip, err := netip.ParseAddr(host); host == "" || (err == nil && ip.IsUnspecified()) {
		return nil // nothing better to offer
	}
	fix := func(addr string) string {
		h, p, err := net.SplitHostPort(addr)
		if err != nil {
			return addr
		}
		if ip, err := netip.ParseAddr(h); h != "" && (err != nil || !ip.IsUnspecified()) {
			return addr
		}
		return net.JoinHostPort(host, p)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	ca := n.self.ClientAddrs()
	for _, a := range []*string{&ca.TCP, &ca.TLS, &ca.WS, &ca.WSS} {
		if *a != "" {
			*a = fix(*a)
		}
	}
	next := n.self
	next.setClientAddrs(ca)
	if next.AdminAddr != "" {
		next.AdminAddr = fix(next.AdminAddr)
	}
	if next.PeerAddr != "" {
		next.PeerAddr = fix(next.PeerAddr)
	}
	b, err := next.encode()
	if err != nil {
		return err
	}
	n.self, n.metaB = next, b
	return nil
}
