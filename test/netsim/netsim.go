// Package netsim is an in-memory network for running several cluster nodes
// in one test process. Each simulated host gets a fake address
// ("10.0.0.N:7946") and a memberlist.NodeAwareTransport, so that an
// unmodified memberlist runs on top of it. The network can be partitioned
// into groups, healed, have hosts killed and revived, and drop a seeded
// fraction of packets.
//
// # Semantics
//
//   - Packets (WriteTo / WriteToAddress) are copied and delivered
//     asynchronously into the receiver's buffered PacketCh. The sender never
//     blocks: a packet is silently dropped if the receiver is unreachable
//     (other partition group, either host killed), has no running transport,
//     its buffer is full, or the SetDrop coin says so. Sending to an unknown
//     address is a silent drop too, as with UDP.
//   - Packet.From is a *net.UDPAddr holding the sender's address.
//   - Streams (DialTimeout / DialAddressTimeout) are buffered in-memory
//     connections with working deadlines; LocalAddr/RemoteAddr are
//     *net.TCPAddr values (the dialer side gets an ephemeral port). A dial
//     to an unreachable host fails after min(timeout, 50ms) with an
//     "i/o timeout" error (net.Error Timeout() == true); a dial to a
//     reachable host that has no running transport is refused at once.
//   - While the two ends of an existing stream are separated (partition or
//     Kill), the stream is silent: Read blocks until its deadline or Close,
//     Write discards and returns len(p), nil. Data still buffered when the
//     separation began is delivered once the ends can reach each other
//     again, and new writes flow again after Heal/Revive.
//   - Kill isolates a host (its process keeps running in the test, so its
//     memberlist keeps trying and failing); Revive reconnects it, and its
//     streams resume if nobody closed or timed them out meanwhile.
//   - Transport Shutdown stops delivery to that transport (its channels are
//     never closed, memberlist does not expect that) and refuses pending
//     dials; Host.Transport can then hand out a fresh transport on the same
//     address, which models a node restart.
//
// # Healing a partition with memberlist
//
// memberlist (v0.7.0) does not reliably re-merge by itself once the sides
// of a partition have declared each other dead. Dead nodes are never
// probed, push/pull only picks alive nodes, and "gossip to the dead" (for
// GossipToTheDeadTime) only carries broadcasts still queued, of which a
// quiet cluster has none a few gossip rounds after the dead messages went
// out; after GossipToTheDeadTime the dead nodes are forgotten altogether.
// (If the network heals while such broadcasts are still queued, a node
// may hear it was declared dead, refute, and the sides merge by luck.)
// Otherwise, healing the network leaves two clusters that each believe the
// other side dead, for good; in a test that waited 8s after Heal with
// PushPullInterval 1s, nothing changed.
//
// The caller (the cluster layer) must re-merge: periodically (every second
// or few, or every PushPullInterval) call Memberlist.Join with the
// addresses of peers it knows of but does not currently see as members:
// its configured seeds plus every address it has seen in
// EventDelegate.NotifyJoin (memberlist forgets dead nodes, so the layer
// must remember addresses itself). A single successful Join (one push/pull)
// across the former partition is enough: the contacted node learns it was
// declared dead, refutes with a higher incarnation, and the alive messages
// gossip to both sides (about 250ms with the test's timings). Joins to
// peers still unreachable fail after the dial timeout and are harmless.
// The same loop brings back a node that was killed and revived. See
// node.rejoin in netsim_test.go.
//
// Beware, too, when reading membership: Memberlist.Members returns
// pointers into memberlist's own node table. Their Addr, Port, Meta and
// version fields are rewritten under memberlist's lock whenever a newer
// alive message arrives (e.g. a refutation after a suspicion), so reading
// them after Members returns is a data race (the race detector reports
// it); only Name is safe. And Node.State is never set in v0.7.0 (the real
// state lives in an internal field that shadows it), so it always reads
// StateAlive: filtering Members by State is a no-op. Members and NumMembers
// count suspect nodes and leave out dead and left ones; for addresses and
// state changes use an EventDelegate (its callbacks run under the lock).
package netsim

import (
	"fmt"
	"math/rand"
	"net"
	"sync"
	"time"
)

const (
	// Port is the port every simulated host listens on.
	Port = 7946
	// packetBuffer is the capacity of a transport's PacketCh.
	packetBuffer = 1024
	// streamBacklog is the capacity of a transport's StreamCh (listen backlog).
	streamBacklog = 64
	// maxDialFailDelay bounds how long a dial to an unreachable host waits
	// before it fails.
	maxDialFailDelay = 50 * time.Millisecond
	// streamBuffer is how many unread bytes a stream direction holds before
	// writers block (a socket buffer).
	streamBuffer = 256 << 10
)

// Network is an in-memory network of hosts. Safe for concurrent use.
type Network struct {
	mu        sync.Mutex
	hosts     map[string]*Host // by name
	byAddr    map[string]*Host // by "ip:port"
	nextHost  int
	nextEphem int
	groups    map[string]int // host name -> partition group; nil when healed
	drop      float64
	rng       *rand.Rand
	// changed is closed (and replaced) whenever reachability changes, to
	// wake up streams waiting on a separated peer.
	changed chan struct{}
}

// New returns an empty network whose packet drops (see SetDrop) use a
// time-seeded random source.
func New() *Network {
	return NewSeeded(time.Now().UnixNano())
}

// NewSeeded returns an empty network whose packet drops use the given seed.
func NewSeeded(seed int64) *Network {
	return &Network{
		hosts:     make(map[string]*Host),
		byAddr:    make(map[string]*Host),
		nextEphem: 40000,
		rng:       rand.New(rand.NewSource(seed)),
		changed:   make(chan struct{}),
	}
}

// Host is a simulated machine on a Network.
type Host struct {
	net  *Network
	name string
	ip   net.IP
	addr string // "ip:port"

	// guarded by net.mu
	dead bool
	cur  *Transport // running transport, nil if none
}

// Host adds (or returns) the host with the given name. Addresses are
// allocated in order: 10.0.0.1:7946, 10.0.0.2:7946, ...
func (n *Network) Host(name string) *Host {
	n.mu.Lock()
	defer n.mu.Unlock()
	if h, ok := n.hosts[name]; ok {
		return h
	}
	n.nextHost++
	i := n.nextHost
	ip := net.IPv4(10, byte(i>>16), byte(i>>8), byte(i)).To4()
	h := &Host{
		net:  n,
		name: name,
		ip:   ip,
		addr: net.JoinHostPort(ip.String(), fmt.Sprint(Port)),
	}
	n.hosts[name] = h
	n.byAddr[h.addr] = h
	return h
}

// Name returns the host's name.
func (h *Host) Name() string { return h.name }

// Addr returns the host's "ip:port" address.
func (h *Host) Addr() string { return h.addr }

// IP returns the host's IP address.
func (h *Host) IP() net.IP { return append(net.IP(nil), h.ip...) }

// Port returns the host's port.
func (h *Host) Port() int { return Port }

// Partition splits the hosts into groups: packets between hosts of
// different groups are dropped, dials across groups fail after a short
// delay, and existing streams across groups go silent. Hosts not named in
// any group (including hosts added later) form one more group together.
// A new Partition replaces the previous one.
func (n *Network) Partition(groups ...[]string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.groups = make(map[string]int)
	for i, g := range groups {
		for _, name := range g {
			n.groups[name] = i + 1
		}
	}
	n.changedLocked()
}

// Heal removes every partition.
func (n *Network) Heal() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.groups = nil
	n.changedLocked()
}

// Kill makes a host unreachable, as a crashed machine: packets to and from
// it are dropped, dials to and from it fail, its streams go silent. It
// lasts until Revive. Kill of an unknown name adds the host.
func (n *Network) Kill(name string) {
	h := n.Host(name)
	n.mu.Lock()
	defer n.mu.Unlock()
	h.dead = true
	n.changedLocked()
}

// Revive undoes Kill.
func (n *Network) Revive(name string) {
	h := n.Host(name)
	n.mu.Lock()
	defer n.mu.Unlock()
	h.dead = false
	n.changedLocked()
}

// SetDrop sets the probability (0..1) of dropping each packet that would
// otherwise be delivered. Streams are not affected.
func (n *Network) SetDrop(p float64) {
	if p < 0 {
		p = 0
	}
	if p > 1 {
		p = 1
	}
	n.mu.Lock()
	n.drop = p
	n.mu.Unlock()
}

// Reachable reports whether hosts a and b can currently talk to each other.
func (n *Network) Reachable(a, b string) bool {
	ha, hb := n.Host(a), n.Host(b)
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.reachableLocked(ha, hb)
}

func (n *Network) changedLocked() {
	close(n.changed)
	n.changed = make(chan struct{})
}

func (n *Network) reachableLocked(a, b *Host) bool {
	if a.dead || b.dead {
		return false
	}
	if n.groups == nil {
		return true
	}
	return n.groups[a.name] == n.groups[b.name]
}

// link reports whether a and b can reach each other, and a channel that is
// closed at the next reachability change.
func (n *Network) link(a, b *Host) (bool, <-chan struct{}) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.reachableLocked(a, b), n.changed
}

func (n *Network) ephemeralPort() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.nextEphem++
	if n.nextEphem > 65535 {
		n.nextEphem = 40001
	}
	return n.nextEphem
}
