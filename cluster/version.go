package cluster

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
)

// Protocol versions.
//
// A build speaks a closed range of protocol versions, [MinProtocol,
// MaxProtocol] (proto_current.go; the brokerd_proto2 build tag selects
// proto_next.go). The range covers the gossiped metadata and the peer
// links: each node gossips its range in its Meta and states it in every
// peer-link handshake. The cluster's effective version is the lowest
// MaxProtocol among the members alive in a node's view, itself included:
// the highest version every member speaks. A feature of version v is used
// only while the effective version is at least v (and, on a peer link,
// while the link's own negotiated version is), so a cluster of old and new
// binaries keeps working while it is upgraded one node at a time, and
// moves to the new version once the last old node is gone.
//
// A node whose range does not overlap the range every member speaks is
// refused: the members ignore its gossip (NotifyAlive), a join between
// the two sides is cancelled on both (NotifyMerge), and Start of the
// refused node fails with a *VersionError.

// ProtocolRange is a closed range of protocol versions, Min to Max.
type ProtocolRange struct {
	Min int `json:"min"`
	Max int `json:"max"`
}

// BuildProtocols returns the range of protocol versions this build speaks.
func BuildProtocols() ProtocolRange { return ProtocolRange{Min: MinProtocol, Max: MaxProtocol} }

// String is "min..max", the form logs and errors use.
func (r ProtocolRange) String() string { return fmt.Sprintf("%d..%d", r.Min, r.Max) }

// Valid reports whether r is a range of versions: 1 <= Min <= Max.
func (r ProtocolRange) Valid() bool { return r.Min >= 1 && r.Min <= r.Max }

// commonProtocols returns the versions every range of rs speaks: the
// highest Min to the lowest Max, and whether that is not empty. With no
// range it returns the zero range and false.
func commonProtocols(rs []ProtocolRange) (ProtocolRange, bool) {
	if len(rs) == 0 {
		return ProtocolRange{}, false
	}
	c := rs[0]
	for _, r := range rs[1:] {
		c.Min, c.Max = max(c.Min, r.Min), min(c.Max, r.Max)
	}
	return c, c.Min <= c.Max
}

// ErrProtocolVersion is what a *VersionError matches with errors.Is: a
// node's protocol versions do not overlap those the cluster's members
// speak.
var ErrProtocolVersion = errors.New("protocol version not supported by the cluster")

// VersionError says that a node cannot be in the cluster: no protocol
// version is spoken both by it (Node) and by every member (Cluster).
type VersionError struct {
	// NodeID names the refused node; "" when it is this node.
	NodeID string
	// Node is the refused node's range.
	Node ProtocolRange
	// Cluster is the range every member speaks (it may be empty, Min >
	// Max, when the members already disagree among themselves).
	Cluster ProtocolRange
}

func (e *VersionError) Error() string {
	who := "protocol version"
	if e.NodeID != "" {
		who = "node " + e.NodeID + ": protocol version"
	}
	return fmt.Sprintf("%s %s is not supported by the cluster (members speak %s)", who, e.Node, e.Cluster)
}

// Is makes errors.Is(err, ErrProtocolVersion) true.
func (e *VersionError) Is(target error) bool { return target == ErrProtocolVersion }

// protocols is the range m advertises. A node built before ranges
// advertises only Proto: it speaks version 1 up to Proto.
func (m Meta) protocols() ProtocolRange {
	lo := m.ProtoMin
	if lo < 1 {
		lo = 1
	}
	return ProtocolRange{Min: lo, Max: m.Proto}
}

// effectiveProtocol is the highest version that self and every member of
// members speak: the lowest Max among them.
func effectiveProtocol(self ProtocolRange, members []ProtocolRange) int {
	v := self.Max
	for _, r := range members {
		v = min(v, r.Max)
	}
	return v
}

// protocolState is the node's record of protocol versions, guarded by
// Node.mu.
type protocolState struct {
	// effective is the cluster's effective version in the last view, 0
	// before the first evaluation.
	effective int
	// refused is the last refusal of a join this node asked for (it was
	// alone and the cluster it reached speaks no version of its range).
	refused *VersionError
	// logged holds the refusals of other nodes already logged (by node ID,
	// the range refused), so a node that keeps gossiping is logged once.
	// Bounded: cleared when it reaches maxRefusalsLogged.
	logged map[string]ProtocolRange
	// vetted holds, by node ID, when a merge (NotifyMerge) last found the
	// side the node was on compatible with this node's view; vetting,
	// when a vetting join to a node last started (NotifyAlive). Both are
	// bounded like logged.
	vetted  map[string]time.Time
	vetting map[string]time.Time
}

// vetTTL is how long a merge's verdict lets gossip about the nodes of the
// other side in: memberlist merges right after NotifyMerge, on the same
// goroutine, and a verdict is about the view of that moment (kept longer,
// a node that the other side listed and that has since gone over to a
// side this one does not speak would come back in with it).
const vetTTL = time.Second

// maxRefusalsLogged bounds protocolState.logged.
const maxRefusalsLogged = 256

// ProtocolVersion returns the cluster's effective protocol version as
// this node last computed it: the highest version every member alive in
// its view speaks (this node's MaxProtocol while it is alone). Peer links
// use version-2 features only while it is at least 2. It is safe to call
// from any goroutine, and cheap.
func (n *Node) ProtocolVersion() int {
	if v := int(n.effective.Load()); v > 0 {
		return v
	}
	return n.protos.Max
}

// Protocols returns the range of protocol versions this node speaks.
func (n *Node) Protocols() ProtocolRange { return n.protos }

// noteEffectiveLocked records the effective version of the view in metas
// and logs a change. Called by evaluate under mu.
func (n *Node) noteEffectiveLocked(metas map[string]Meta) {
	ranges := make([]ProtocolRange, 0, len(metas))
	for _, m := range metas {
		ranges = append(ranges, m.protocols())
	}
	v := effectiveProtocol(n.protos, ranges)
	prev := n.proto.effective
	if v == prev {
		return
	}
	n.proto.effective = v
	n.effective.Store(int64(v))
	if prev == 0 {
		n.log.Info("protocol version", "version", v, "speaks", n.protos.String())
		return
	}
	var older []string
	for _, m := range metas {
		if m.Proto == v && v < n.protos.Max {
			older = append(older, m.Name)
		}
	}
	n.log.Info("cluster protocol version changed", "from", prev, "to", v, "speaks", n.protos.String(), "held_back_by", older)
}

// rangesExceptLocked returns this node's range and those of the members alive
// in its view (alive or suspect, not leaving), but for the IDs in skip.
// Called under mu.
func (n *Node) rangesExceptLocked(skip map[string]bool) []ProtocolRange {
	rs := []ProtocolRange{n.protos}
	for id, k := range n.known {
		if skip[id] || (k.state != "alive" && k.state != "suspect") || k.meta.Leaving {
			continue
		}
		rs = append(rs, k.meta.protocols())
	}
	return rs
}

// logRefusalLocked logs the refusal of node id once per range. Called
// under mu.
func (n *Node) logRefusalLocked(msg string, e *VersionError) {
	if n.proto.logged == nil || len(n.proto.logged) >= maxRefusalsLogged {
		n.proto.logged = map[string]ProtocolRange{}
	}
	if r, ok := n.proto.logged[e.NodeID]; ok && r == e.Node {
		return
	}
	n.proto.logged[e.NodeID] = e.Node
	n.log.Warn(msg, "peer", e.NodeID, "peer_protocols", e.Node.String(), "cluster_protocols", e.Cluster.String(), "err", e.Error())
}

// JoinRefused returns the refusal of this node's join (a *VersionError),
// while the cluster it was asked to join refuses it over protocol versions
// and it runs alone; nil otherwise. A node refused after it started alone
// keeps running, serving no one else's queues: /healthz reports it.
func (n *Node) JoinRefused() error { return n.joinRefusal() }

// joinRefusal returns the refusal of this node's join, if its join was
// refused over protocol versions and it is still alone.
func (n *Node) joinRefusal() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.proto.refused == nil || len(n.rangesExceptLocked(nil)) > 1 {
		return nil
	}
	return n.proto.refused
}

// versionGuard keeps nodes of incompatible protocol versions out of the
// cluster: memberlist's MergeDelegate (a join, on both sides) and
// AliveDelegate (gossip about a node). memberlist calls NotifyAlive with
// its node lock held and NotifyMerge from a join's goroutine: both only
// read the node's view under mu and never call memberlist.
type versionGuard struct{ n *Node }

// NotifyMerge cancels a join in which no version is spoken by every
// member of both sides. peers is the other side's view; entries for this
// node in it (stale, from before a restart) are ignored, and entries for
// nodes this node knows replace its own.
func (g versionGuard) NotifyMerge(peers []*memberlist.Node) error {
	n := g.n
	remote := map[string]bool{}
	var theirs []ProtocolRange
	var ids, all []string
	for _, p := range peers {
		if p.Name == n.cfg.NodeID || (p.State != memberlist.StateAlive && p.State != memberlist.StateSuspect) {
			continue
		}
		// The other side's members: those its view counts (a node it
		// holds dead was not checked with it).
		all = append(all, p.Name)
		m, err := decodeMeta(p.Meta)
		if err != nil || m.Leaving {
			continue
		}
		remote[p.Name] = true
		theirs = append(theirs, m.protocols())
		ids = append(ids, p.Name)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	ours := n.rangesExceptLocked(remote)
	if _, ok := commonProtocols(append(slices.Clone(ours), theirs...)); ok || len(theirs) == 0 {
		// The whole other side is compatible with this one: the gossip
		// about its nodes that the merge brings (NotifyAlive) is let in.
		n.proto.vetted = boundedPut(n.proto.vetted, all, n.cfg.Now())
		return nil
	}
	oc, _ := commonProtocols(ours)
	tc, _ := commonProtocols(theirs)
	if len(ours) == 1 {
		// Alone: this node is the one joining (or one of two nodes alone).
		// Logged once per pair of ranges: a node refused after its start
		// (it started alone) retries every RejoinInterval.
		e := &VersionError{Node: oc, Cluster: tc}
		if n.proto.refused == nil || *n.proto.refused != *e {
			n.log.Error("join refused: no protocol version in common with the cluster", "protocols", oc.String(), "cluster_protocols", tc.String(), "members", ids, "err", e.Error())
		}
		n.proto.refused = e
		return e
	}
	id := strings.Join(ids, ",")
	if len(ids) > 1 {
		id = "[" + id + "]"
	}
	e := &VersionError{NodeID: id, Node: tc, Cluster: oc}
	n.logRefusalLocked("join refused: the joining side speaks no protocol version of the cluster", e)
	return e
}

// NotifyAlive ignores gossip about a node whose range has no version in
// common with the versions this node and every other member alive in its
// view speak. A member's own restart replaces its old entry, so a node
// restarted on a build too new (or too old) for the others is refused.
func (g versionGuard) NotifyAlive(peer *memberlist.Node) error {
	n := g.n
	if peer.Name == n.cfg.NodeID {
		return nil
	}
	m, err := decodeMeta(peer.Meta)
	if err != nil {
		return nil // events ignores it, and logs why
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	ours := n.rangesExceptLocked(map[string]bool{peer.Name: true})
	r := m.protocols()
	oc, _ := commonProtocols(ours)
	if _, ok := commonProtocols(append(slices.Clone(ours), r)); !ok {
		e := &VersionError{NodeID: peer.Name, Node: r, Cluster: oc}
		n.logRefusalLocked("member refused: no protocol version in common with the cluster", e)
		return e
	}
	// A node that is not a member of this view (new, or back after a
	// partition) may come with a side of its own: members admitted while
	// this side could not see them, whose versions this side may not
	// speak. Its own range tells only when that cannot be (its range
	// within the one every member here speaks, so its side speaks some
	// version of it): otherwise the node is let in by a merge that vetted
	// its whole side (NotifyMerge), which a join to it now brings about.
	// Without this, after a partition during which one side moved to a
	// version the other does not speak, the nodes of either side that
	// speak both would be admitted by the other, and nodes would list
	// each other without listing the same members.
	// A verdict serves once: the merge's own gossip comes right after it.
	now := n.cfg.Now()
	at, ok := n.proto.vetted[peer.Name]
	vetted := ok && now.Sub(at) < vetTTL && !now.Before(at)
	delete(n.proto.vetted, peer.Name)
	if k := n.known[peer.Name]; k != nil && (k.state == "alive" || k.state == "suspect") {
		return nil
	}
	if (r.Min >= oc.Min && r.Max <= oc.Max) || vetted {
		return nil
	}
	n.vetLocked(peer.Name, peer.Address(), now)
	return fmt.Errorf("node %s (protocol versions %s) is not a member of this view and may bring members that do not speak %s: joining it to check its side first", peer.Name, r, oc)
}

// vetLocked joins the node at addr (id), at most once per RejoinInterval,
// so that the merge checks its whole side (NotifyMerge) and, if it is
// compatible, brings it in. memberlist holds its node lock around
// NotifyAlive: the join runs on a goroutine of its own. Called under mu.
func (n *Node) vetLocked(id, addr string, now time.Time) {
	// Before Start's first evaluation (which follows n.ml's assignment,
	// under mu) there is no memberlist to join with yet.
	if n.proto.effective == 0 || n.ml == nil || addr == "" {
		return
	}
	if t, ok := n.proto.vetting[id]; ok && now.Sub(t) < n.cfg.RejoinInterval && !now.Before(t) {
		return
	}
	n.proto.vetting = boundedPut(n.proto.vetting, []string{id}, now)
	ml := n.ml
	go func() {
		select {
		case <-n.stop:
			return
		default:
		}
		if _, err := ml.Join([]string{addr}); err != nil {
			n.log.Debug("join to check a returning or new node's side failed", "peer", id, "addr", addr, "err", err)
		}
	}()
}

// boundedPut sets m[id] = t for each id, clearing m first when it holds
// maxRefusalsLogged entries or more.
func boundedPut(m map[string]time.Time, ids []string, t time.Time) map[string]time.Time {
	if m == nil || len(m) >= maxRefusalsLogged {
		m = map[string]time.Time{}
	}
	for _, id := range ids {
		m[id] = t
	}
	return m
}

var (
	protocolDesc      = prometheus.NewDesc("brokerd_cluster_protocol_version", "The cluster's effective protocol version: the highest every member alive in this node's view speaks.", nil, nil)
	protocolRangeDesc = prometheus.NewDesc("brokerd_cluster_protocol_supported", "The lowest (bound=\"min\") and highest (bound=\"max\") protocol versions this build speaks.", []string{"bound"}, nil)
)

// protocolCollector exports the protocol versions.
type protocolCollector struct{ n *Node }

func (c protocolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- protocolDesc
	ch <- protocolRangeDesc
}

func (c protocolCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(protocolDesc, prometheus.GaugeValue, float64(c.n.ProtocolVersion()))
	ch <- prometheus.MustNewConstMetric(protocolRangeDesc, prometheus.GaugeValue, float64(c.n.protos.Min), "min")
	ch <- prometheus.MustNewConstMetric(protocolRangeDesc, prometheus.GaugeValue, float64(c.n.protos.Max), "max")
}
