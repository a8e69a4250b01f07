package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
)

// State persists the node's cluster records: its first start time and the
// epoch it advertises. SetMeta must return only once the value is durable
// (fsynced): the node advertises a new epoch only after SetMeta returned
// nil for it. Meta returns nil, nil for a record never set. The store
// satisfies it. Calls come from one goroutine at a time.
type State interface {
	Meta(name string) ([]byte, error)
	SetMeta(name string, value []byte) error
}

// Config configures a Node.
type Config struct {
	NodeID   string
	NodeName string
	// ClusterName labels every gossip packet; nodes of another cluster
	// name are refused, never merged.
	ClusterName string
	// BindAddr is the gossip listen address (UDP and TCP), host:port.
	BindAddr string
	// AdvertiseAddr is the address others reach this node at; "" means
	// BindAddr (or, for 0.0.0.0, memberlist's choice of a private IP).
	AdvertiseAddr string
	// Join lists host:port of nodes to join through. A DNS name joins
	// every address it resolves to (A and AAAA), resolved again at each
	// retry while the node is alone and every ResolveInterval after (see
	// resolve.go); a name that does not resolve is logged and retried.
	Join []string
	// Resolver resolves the DNS names of Join; nil means
	// net.DefaultResolver.
	Resolver *net.Resolver
	// ResolveInterval is how often a node that is not alone resolves the
	// names of Join again and joins the addresses that are not members
	// yet (a scaled-up StatefulSet's new pods). Default 30s.
	ResolveInterval time.Duration
	// ActiveMembers is M at first start; the cluster-wide value gossiped
	// with a higher version wins.
	ActiveMembers int
	// SecretKey, if set (16, 24 or 32 bytes), encrypts gossip. Keyring,
	// when set, replaces it.
	SecretKey []byte
	// Keyring, if set, holds the gossip keys (see Keyring): memberlist
	// encrypts with its primary key and accepts any of its keys, and the
	// node's key methods (InstallGossipKey...) change it. Without it a
	// SecretKey gets a keyring kept in memory.
	Keyring *Keyring
	// PromotionDelay is how long an observer must be in the agreed set
	// before it takes a seat.
	PromotionDelay time.Duration
	// RejoinInterval is how often the node retries its join list while
	// alone, and the addresses of members it lost (to merge partitions).
	RejoinInterval time.Duration
	// ForgetAfter is how long a member that failed or left is remembered:
	// after it the member leaves the view and the status, and its address
	// is no longer retried. A forgotten member that comes back is a new
	// member to the others. Default 24h.
	ForgetAfter time.Duration
	// Tick is how often the view is re-evaluated even without events.
	Tick time.Duration
	// STOMPAddr, AdminAddr and PeerAddr are advertised to the others, and
	// so are STOMPTLSAddr, STOMPWSAddr and STOMPWSSAddr, the node's other
	// client listeners ("" for none). An unspecified host (0.0.0.0, ::, or
	// none) is advertised as the gossip address's host.
	STOMPAddr, AdminAddr, PeerAddr          string
	STOMPTLSAddr, STOMPWSAddr, STOMPWSSAddr string
	// State keeps the node's first-start time and its epoch; nil keeps
	// them in memory (a restarted node then starts its epoch afresh).
	State State
	// Memberlist tunes memberlist's configuration after brokerd's LAN
	// settings are applied (tests use it for faster timings).
	Memberlist func(*memberlist.Config)
	// Transport replaces the network (tests); nil uses real UDP/TCP.
	Transport memberlist.NodeAwareTransport
	Logger    *slog.Logger
	// Registerer receives the metrics; nil means none.
	Registerer prometheus.Registerer
	// Now is the clock of the membership's timers (promotion delay,
	// forgetting); nil means time.Now.
	Now func() time.Time
	// Protocols is the range of protocol versions the node speaks (see
	// version.go); the zero value means the build's (BuildProtocols).
	// Tests set other ranges.
	Protocols ProtocolRange
	// Wall is the wall clock behind the times the node advertises, its
	// first start (JoinedAt) and when it took its seat (ActiveSince); nil
	// means time.Now. The chaos suite's build shifts it to jump one node's
	// clock.
	Wall func() time.Time
}

// DefaultConfig returns a Config with every field but the identities set.
func DefaultConfig() Config {
	return Config{
		ClusterName:     "brokerd",
		BindAddr:        "127.0.0.1:7946",
		ActiveMembers:   3,
		PromotionDelay:  500 * time.Millisecond,
		RejoinInterval:  2 * time.Second,
		ResolveInterval: 30 * time.Second,
		ForgetAfter:     24 * time.Hour,
		Tick:            50 * time.Millisecond,
		Logger:          slog.Default(),
		Now:             time.Now,
		Wall:            time.Now,
	}
}

// LANConfig is memberlist's configuration as brokerd uses it on a LAN:
// failure detection in about a second rather than DefaultLANConfig's five
// or more. Measured (docs/DESIGN.md, Membership): 200 ms probes with a 100 ms timeout never
// marked a live member dead with every core busy; 100/50 ms did.
func LANConfig() *memberlist.Config {
	c := memberlist.DefaultLANConfig()
	c.ProbeInterval = 200 * time.Millisecond
	c.ProbeTimeout = 100 * time.Millisecond
	c.SuspicionMult = 2
	c.GossipInterval = 50 * time.Millisecond
	c.PushPullInterval = 10 * time.Second
	c.TCPTimeout = 2 * time.Second
	c.DeadNodeReclaimTime = time.Second // a restarted node may come back on a new address
	return c
}

// MemberStatus is one node as /v1/cluster shows it.
type MemberStatus struct {
	ID          string  `json:"id"`
	Name        string  `json:"name"`
	Role        string  `json:"role"`  // active | observer
	State       string  `json:"state"` // alive | suspect | dead | left
	STOMPAddr   string  `json:"stomp_addr"`
	AdminAddr   string  `json:"admin_addr"`
	PeerAddr    string  `json:"peer_addr"`
	ActiveSince *string `json:"active_since"`
	// Protocols is the range of protocol versions the member speaks.
	Protocols ProtocolRange `json:"protocols"`
	// STOMPTLSAddr, STOMPWSAddr and STOMPWSSAddr are the member's other
	// client listeners, "" for none.
	STOMPTLSAddr string `json:"stomp_tls_addr,omitempty"`
	STOMPWSAddr  string `json:"stomp_ws_addr,omitempty"`
	STOMPWSSAddr string `json:"stomp_wss_addr,omitempty"`
	// Draining: the node is in maintenance (brokerd drain) and owns no
	// queue while another replica can.
	Draining bool `json:"draining,omitempty"`
	// Legacy: the member runs a build from before protocol ranges (its
	// metadata has no minimum version), which knows nothing of drained
	// members either: a drain is refused while one is alive.
	Legacy bool `json:"legacy,omitempty"`
}

// Status is the node's view of the cluster.
type Status struct {
	NodeID      string `json:"node_id"`
	NodeName    string `json:"node_name"`
	ClusterName string `json:"cluster_name"`
	// Epoch is EpochID.Counter, for people and metrics.
	Epoch uint64 `json:"epoch"`
	// EpochID is the epoch this node advertises, already persisted: the
	// one its owners act under and its replicas compare with
	// EpochID.Compare. It never goes back, across restarts too when the
	// node has a State.
	EpochID             EpochID        `json:"epoch_id"`
	Converged           bool           `json:"converged"`
	ActiveMembersWanted int            `json:"active_members_wanted"`
	ActiveSet           []string       `json:"active_set"`
	Members             []MemberStatus `json:"members"`
	// ProtocolVersion is the cluster's effective protocol version: the
	// highest every member alive in this node's view speaks (version.go).
	ProtocolVersion int `json:"protocol_version"`
	// Protocols is the range of versions this node speaks.
	Protocols ProtocolRange `json:"protocols"`
}

// Node is this process's membership in the cluster.
type Node struct {
	cfg Config
	log *slog.Logger
	ml  *memberlist.Memberlist
	m   *metrics
	// gossipAddr is the advertised gossip address, set by Start.
	gossipAddr string
	// joins resolves the DNS names of cfg.Join (resolve.go).
	joins *joinResolver

	// evalMu serializes evaluate, which holds it (and not mu) while it
	// persists a new epoch: memberlist calls into the node with its own
	// locks held, and must not wait for an fsync. Lock order: evalMu, mu.
	evalMu sync.Mutex
	// persistFailing is true while the last attempt to persist an epoch
	// failed; guarded by evalMu.
	persistFailing bool

	// protos is the range of protocol versions this node speaks;
	// effective mirrors proto.effective for lock-free readers.
	protos    ProtocolRange
	effective atomic.Int64

	mu       sync.Mutex
	proto    protocolState
	self     Meta
	epoch    EpochID // the epoch advertised (self.Epoch, self.SetHash), persisted
	seat     Seat
	set      ActiveSet
	known    map[string]*known // by node ID, self excluded
	status   Status
	metaB    []byte
	promoted int

	wake    chan struct{}
	publish chan struct{}
	// pubMu serializes UpdateNode calls: memberlist reads our metadata
	// before it takes the next incarnation, so two concurrent calls could
	// let older metadata win (and lose the leave intent).
	pubMu sync.Mutex
	// leaveMu serializes Leave: memberlist panics on a leave after its
	// shutdown, which the first Leave ends with.
	leaveMu sync.Mutex
	stop    chan struct{}
	wg      sync.WaitGroup
	closeMu sync.Mutex
	closed  bool
}

type known struct {
	meta   Meta
	addr   string
	state  string
	deadAt time.Time // when it was last declared dead
	goneAt time.Time // when it was last declared dead or left; zero while alive or suspect
}

const (
	metaJoinedAt = "cluster_joined_at"
	// metaEpoch holds the last epoch the node advertised, in
	// EpochID.MarshalText's form.
	metaEpoch = "cluster_epoch"
)

// New prepares a node; it joins nothing until Start.
func New(cfg Config) (*Node, error) {
	def := DefaultConfig()
	if cfg.Logger == nil {
		cfg.Logger = def.Logger
	}
	if cfg.Now == nil {
		cfg.Now = def.Now
	}
	if cfg.Tick <= 0 {
		cfg.Tick = def.Tick
	}
	if cfg.RejoinInterval <= 0 {
		cfg.RejoinInterval = def.RejoinInterval
	}
	if cfg.ResolveInterval <= 0 {
		cfg.ResolveInterval = def.ResolveInterval
	}
	if cfg.ForgetAfter <= 0 {
		cfg.ForgetAfter = def.ForgetAfter
	}
	if cfg.ActiveMembers < 1 {
		return nil, fmt.Errorf("cluster: active members must be at least 1, got %d", cfg.ActiveMembers)
	}
	if cfg.NodeID == "" {
		return nil, errors.New("cluster: node ID is empty")
	}
	if cfg.Protocols == (ProtocolRange{}) {
		cfg.Protocols = BuildProtocols()
	}
	if !cfg.Protocols.Valid() {
		return nil, fmt.Errorf("cluster: protocol versions %s: want 1 <= min <= max", cfg.Protocols)
	}
	if cfg.Transport == nil && cfg.BindAddr != "" {
		if _, _, err := splitHostPort(cfg.BindAddr); err != nil {
			return nil, fmt.Errorf("cluster.gossip_addr: %w", err)
		}
	}
	if cfg.Wall == nil {
		cfg.Wall = time.Now
	}
	if cfg.Keyring == nil && len(cfg.SecretKey) > 0 {
		kr, err := NewKeyring(cfg.SecretKey)
		if err != nil {
			return nil, fmt.Errorf("cluster.secret_key_file: %w", err)
		}
		cfg.Keyring = kr
	}
	joined := cfg.Wall().UnixMilli()
	if cfg.State != nil {
		b, err := cfg.State.Meta(metaJoinedAt)
		if err != nil {
			return nil, fmt.Errorf("cluster: read first-start time: %w", err)
		}
		if v, err := strconv.ParseInt(string(b), 10, 64); err == nil && len(b) > 0 {
			joined = v
		} else if err := cfg.State.SetMeta(metaJoinedAt, []byte(strconv.FormatInt(joined, 10))); err != nil {
			return nil, fmt.Errorf("cluster: write first-start time: %w", err)
		}
	}
	var epoch EpochID
	if cfg.State != nil {
		b, err := cfg.State.Meta(metaEpoch)
		if err != nil {
			return nil, fmt.Errorf("cluster: read epoch: %w", err)
		}
		// A record that does not parse is an error, not a fresh start: the
		// node would advertise epochs it may have used before.
		if len(b) > 0 {
			if err := epoch.UnmarshalText(b); err != nil {
				return nil, fmt.Errorf("cluster: read epoch: %w", err)
			}
		}
	}
	n := &Node{
		cfg: cfg,
		log: cfg.Logger.With("component", "cluster"),
		self: Meta{
			ID: cfg.NodeID, Name: cfg.NodeName, AdminAddr: cfg.AdminAddr,
			PeerAddr: cfg.PeerAddr, JoinedAt: joined, Proto: cfg.Protocols.Max, ProtoMin: cfg.Protocols.Min, M: cfg.ActiveMembers,
		},
		epoch:   epoch,
		protos:  cfg.Protocols,
		known:   make(map[string]*known),
		wake:    make(chan struct{}, 1),
		publish: make(chan struct{}, 1),
		stop:    make(chan struct{}),
	}
	n.self.setClientAddrs(ClientAddrs{TCP: cfg.STOMPAddr, TLS: cfg.STOMPTLSAddr, WS: cfg.STOMPWSAddr, WSS: cfg.STOMPWSSAddr})
	n.joins = newJoinResolver(cfg.Resolver, n.log)
	if !epoch.IsZero() {
		n.self.Epoch, n.self.SetHash = epoch.Counter, setHash(epoch.Set)
	}
	n.m = newMetrics(cfg.Registerer, n)
	b, err := n.self.encode()
	if err != nil {
		return nil, fmt.Errorf("cluster: node.name and the advertised addresses (stomp.advertise_addr) are too long: %w", err)
	}
	n.metaB = b
	return n, nil
}

func splitHostPort(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("%q is not host:port", addr)
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("%q: bad port", addr)
	}
	return host, port, nil
}

// Start creates the memberlist, joins the configured nodes (if none
// answers, the node runs alone and keeps retrying in the background) and
// starts evaluating views.
func (n *Node) Start() error {
	if n.cfg.Transport == nil && n.cfg.BindAddr == "" {
		// A cluster of one without gossip: the same agreement, no network.
		n.evaluate()
		n.wg.Add(1)
		go n.loop()
		return nil
	}
	c := LANConfig()
	c.Name = n.cfg.NodeID
	c.Label = n.cfg.ClusterName
	c.Delegate = &delegate{n}
	c.Events = &events{n}
	c.Merge = versionGuard{n}
	c.Alive = versionGuard{n}
	c.Logger = log.New(&logBridge{log: n.log}, "", 0)
	if n.cfg.Keyring != nil {
		c.Keyring = n.cfg.Keyring.ml
	}
	if n.cfg.Transport != nil {
		c.Transport = n.cfg.Transport
		host, port, _ := splitHostPort(n.cfg.BindAddr)
		c.BindAddr, c.BindPort, c.AdvertiseAddr, c.AdvertisePort = host, port, host, port
	} else {
		host, port, err := splitHostPort(n.cfg.BindAddr)
		if err != nil {
			return fmt.Errorf("cluster.gossip_addr: %w", err)
		}
		c.BindAddr, c.BindPort, c.AdvertisePort = host, port, port
		if n.cfg.AdvertiseAddr != "" {
			ah, ap, err := splitHostPort(n.cfg.AdvertiseAddr)
			if err != nil {
				return fmt.Errorf("advertise address: %w", err)
			}
			c.AdvertiseAddr, c.AdvertisePort = ah, ap
		}
	}
	if n.cfg.Memberlist != nil {
		n.cfg.Memberlist(c)
	}
	ml, err := memberlist.Create(c)
	if err != nil {
		return fmt.Errorf("cluster: start gossip on %s: %w", n.cfg.BindAddr, err)
	}
	n.ml = ml
	// Read once, before anyone knows this node: memberlist rewrites its
	// local node (under its own lock) at every metadata update.
	ln := ml.LocalNode()
	n.gossipAddr = net.JoinHostPort(ln.Addr.String(), strconv.Itoa(int(ln.Port)))
	if err := n.advertiseAt(ln.Addr.String()); err != nil {
		ml.Shutdown()
		return err
	}
	n.evaluate() // publish our own meta and status at once
	if len(n.cfg.Join) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), resolveTimeout)
		addrs := n.joins.resolve(ctx, n.cfg.Join)
		cancel()
		var err error
		if len(addrs) == 0 {
			err = errors.New("no join address resolved")
		} else {
			_, err = ml.Join(addrs)
		}
		if err == nil && ml.NumMembers() <= 1 {
			// The join list names this node (a headless Service lists
			// every pod): its answer is no member found.
			err = errors.New("only this node answered")
		}
		if err != nil {
			n.log.Warn("join failed; running alone and retrying", "join", n.cfg.Join, "addrs", addrs, "err", err, "retry_every", n.cfg.RejoinInterval)
		}
	}
	if err := n.joinRefusal(); err != nil {
		_ = ml.Shutdown()
		return fmt.Errorf("cluster: join %v: %w", n.cfg.Join, err)
	}
	// Once more, with the members the join brought (memberlist told
	// events synchronously): the node must not act on its lone view, in
	// which the effective protocol version is its own.
	n.evaluate()
	n.wg.Add(3)
	go n.loop()
	go n.publishLoop()
	go n.rejoinLoop()
	return nil
}

// Join contacts the nodes at addrs (host:port) and merges their cluster
// with this one; it returns how many answered.
func (n *Node) Join(addrs []string) (int, error) {
	if n.ml == nil {
		return 0, errors.New("cluster: no gossip address")
	}
	k, err := n.ml.Join(addrs)
	n.signal(n.wake)
	return k, err
}

// GossipAddr is the address others reach this node's gossip at, "" before
// Start or without gossip.
func (n *Node) GossipAddr() string { return n.gossipAddr }

// Leave tells the others this node is going away, so its replacement is
// promoted at once, then stops gossip. After the first call (or Close) it
// does nothing.
func (n *Node) Leave(timeout time.Duration) error {
	n.leaveMu.Lock()
	defer n.leaveMu.Unlock()
	n.closeMu.Lock()
	closed := n.closed
	n.closeMu.Unlock()
	if closed {
		return nil
	}
	if n.ml == nil {
		n.Close()
		return nil
	}
	// memberlist's leave event does not tell a leave from a failure (the
	// node it passes carries a stale state), so announce it in our
	// metadata first, as serf does with its leave intent.
	n.mu.Lock()
	n.self.Leaving = true
	if b, err := n.self.encode(); err == nil {
		n.metaB = b
	}
	n.mu.Unlock()
	n.pubMu.Lock()
	if err := n.ml.UpdateNode(timeout / 2); err != nil {
		n.log.Debug("leave intent not confirmed", "err", err)
	}
	n.pubMu.Unlock()
	err := n.ml.Leave(timeout / 2)
	n.Close()
	return err
}

// Close stops gossip without saying goodbye (the others detect the
// failure). It is idempotent and waits for the node's goroutines.
func (n *Node) Close() error {
	n.closeMu.Lock()
	if n.closed {
		n.closeMu.Unlock()
		return nil
	}
	n.closed = true
	close(n.stop)
	n.closeMu.Unlock()
	var err error
	if n.ml != nil {
		err = n.ml.Shutdown()
	}
	n.wg.Wait()
	return err
}

// SetActiveMembers changes M cluster-wide: the new value carries a version
// above every one seen, and spreads by gossip.
func (n *Node) SetActiveMembers(m int) error {
	if m < 1 {
		return fmt.Errorf("active members must be at least 1, got %d", m)
	}
	n.mu.Lock()
	v := n.self.MVersion
	for _, k := range n.known {
		v = max(v, k.meta.MVersion)
	}
	n.self.MVersion, n.self.M = v+1, m
	n.mu.Unlock()
	n.log.Info("active members changed", "m", m, "version", v+1)
	n.evaluate()
	return nil
}

// Status returns the node's current view of the cluster.
func (n *Node) Status() Status {
	n.mu.Lock()
	defer n.mu.Unlock()
	s := n.status
	s.Members = append([]MemberStatus(nil), s.Members...)
	s.ActiveSet = append([]string(nil), s.ActiveSet...)
	return s
}

func (n *Node) signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (n *Node) loop() {
	defer n.wg.Done()
	t := time.NewTicker(n.cfg.Tick)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
		case <-n.wake:
		}
		n.evaluate()
	}
}

// evaluate runs Decide over the current view and publishes the outcome.
// The view comes from memberlist's events, copied while memberlist holds
// its lock: the nodes Members returns are mutated by memberlist as they
// are read, which is a data race.
//
// A decision with a new epoch is applied only once the epoch is persisted
// (outside mu); if that fails, nothing of it is applied, the error is
// logged, and the next evaluation tries again.
func (n *Node) evaluate() {
	n.evalMu.Lock()
	defer n.evalMu.Unlock()
	now := n.cfg.Now()
	n.mu.Lock()
	n.forgetLocked(now)
	view := []Member{{ID: n.self.ID, Active: n.seat.Active, ActiveSince: n.seat.ActiveSince, JoinedAt: n.self.JoinedAt, Epoch: n.epoch}}
	mver, mval := n.self.MVersion, n.self.M
	metas := map[string]Meta{}
	states := map[string]string{}
	for id, k := range n.known {
		if (k.state != "alive" && k.state != "suspect") || k.meta.Leaving {
			continue
		}
		m := k.meta
		metas[id] = m
		states[id] = k.state
		view = append(view, m.member())
		if newerM(m.MVersion, m.M, mver, mval) {
			mver, mval = m.MVersion, m.M
		}
	}
	var graced []Member
	for _, k := range n.known {
		if k.state == "dead" && k.meta.Active && !k.meta.Leaving && now.Sub(k.deadAt) < n.cfg.PromotionDelay {
			graced = append(graced, k.meta.member())
		}
	}
	prev := n.epoch
	d := DecideAt(n.self.ID, n.seat, view, graced, mval, prev, now, n.cfg.Wall(), n.cfg.PromotionDelay)
	n.mu.Unlock()

	if d.Epoch != prev && !n.persistEpoch(prev, d.Epoch) {
		n.mu.Lock()
		n.noteEffectiveLocked(metas)
		n.status = n.buildStatus(metas, states)
		n.mu.Unlock()
		return
	}

	n.mu.Lock()
	defer n.mu.Unlock()
	if d.Promoted {
		n.promoted++
		n.m.promotions.Inc()
		n.log.Info("promoted to active member", "epoch", d.Epoch, "active_set", []string(d.Set))
	} else if n.seat.Active && !d.Seat.Active {
		n.log.Info("stepped down to observer", "epoch", d.Epoch, "active_set", []string(d.Set))
	}
	if n.set != nil && d.Set.Hash() != n.set.Hash() {
		n.log.Info("active set changed", "epoch", d.Epoch, "active_set", []string(d.Set), "m", mval)
	}
	n.seat, n.set, n.epoch = d.Seat, d.Set, d.Epoch
	n.noteEffectiveLocked(metas)
	// n.self is read afresh: Leave and SetActiveMembers may have changed
	// it while mu was released.
	next := n.self
	next.Active, next.ActiveSince = d.Seat.Active, d.Seat.ActiveSince
	next.SetHash, next.Epoch = d.Set.Hash(), d.Epoch.Counter
	if newerM(mver, mval, next.MVersion, next.M) {
		next.MVersion, next.M = mver, mval
	}
	if next != n.self {
		n.self = next
		if b, err := n.self.encode(); err == nil {
			n.metaB = b
			n.signal(n.publish)
		} else {
			n.log.Error("node metadata too large", "err", err)
		}
	}
	n.status = n.buildStatus(metas, states)
}

// persistEpoch writes epoch to the State, if there is one, and reports
// whether it is durable. It is called under evalMu, without mu. A failure
// is logged when it begins, and the recovery when the next write succeeds.
func (n *Node) persistEpoch(prev, epoch EpochID) bool {
	if n.cfg.State == nil {
		return true
	}
	b, _ := epoch.MarshalText()
	if err := n.cfg.State.SetMeta(metaEpoch, b); err != nil {
		if !n.persistFailing {
			n.log.Error("epoch not persisted; advertising the previous one", "epoch", epoch, "advertised", prev, "err", err)
		}
		n.persistFailing = true
		return false
	}
	if n.persistFailing {
		n.log.Info("epoch persisted again", "epoch", epoch)
		n.persistFailing = false
	}
	return true
}

// forgetLocked drops the members that have been dead or gone for
// ForgetAfter: they leave the status and the metrics, and rejoinLoop no
// longer dials them. memberlist itself drops dead nodes after its
// GossipToTheDeadTime (seconds); should the member come back, its alive
// message brings it back here as a new entry.
func (n *Node) forgetLocked(now time.Time) {
	for id, k := range n.known {
		if k.goneAt.IsZero() || now.Sub(k.goneAt) < n.cfg.ForgetAfter {
			continue
		}
		delete(n.known, id)
		n.log.Info("member forgotten", "peer", id, "name", k.meta.Name, "addr", k.addr, "state", k.state, "gone_since", k.goneAt, "forget_after", n.cfg.ForgetAfter)
	}
}

// buildStatus assembles the status under n.mu.
func (n *Node) buildStatus(metas map[string]Meta, states map[string]string) Status {
	converged := true
	for _, m := range metas {
		if m.SetHash != n.self.SetHash {
			converged = false
		}
	}
	s := Status{
		NodeID: n.self.ID, NodeName: n.self.Name, ClusterName: n.cfg.ClusterName,
		Epoch: n.epoch.Counter, EpochID: n.epoch, Converged: converged, ActiveMembersWanted: n.self.M,
		ActiveSet:       append([]string(nil), n.set...),
		ProtocolVersion: n.proto.effective, Protocols: n.protos,
	}
	add := func(m Meta, state string) {
		ca := m.ClientAddrs()
		ms := MemberStatus{ID: m.ID, Name: m.Name, Role: "observer", State: state, STOMPAddr: ca.TCP, STOMPTLSAddr: ca.TLS,
			STOMPWSAddr: ca.WS, STOMPWSSAddr: ca.WSS, AdminAddr: m.AdminAddr, PeerAddr: m.PeerAddr, Protocols: m.protocols()}
		ms.Draining = m.Draining
		ms.Legacy = m.ProtoMin == 0
		if state == "alive" || state == "suspect" {
			if n.set.Contains(m.ID) {
				ms.Role = "active"
			}
			if m.Active && m.ActiveSince > 0 {
				t := time.UnixMilli(m.ActiveSince).UTC().Format(time.RFC3339Nano)
				ms.ActiveSince = &t
			}
		}
		s.Members = append(s.Members, ms)
	}
	add(n.self, "alive")
	for id, k := range n.known {
		if _, ok := metas[id]; ok {
			add(k.meta, k.state)
		} else {
			st := k.state
			if k.meta.Leaving {
				st = "left"
			} else if st == "alive" || st == "suspect" || st == "" {
				st = "dead"
			}
			add(k.meta, st)
		}
	}
	sort.Slice(s.Members, func(i, j int) bool {
		return s.Members[i].Name < s.Members[j].Name || (s.Members[i].Name == s.Members[j].Name && s.Members[i].ID < s.Members[j].ID)
	})
	return s
}

func stateName(s memberlist.NodeStateType) string {
	switch s {
	case memberlist.StateAlive:
		return "alive"
	case memberlist.StateSuspect:
		return "suspect"
	case memberlist.StateDead:
		return "dead"
	case memberlist.StateLeft:
		return "left"
	}
	return "unknown"
}

// publishLoop re-advertises our metadata whenever it changes. UpdateNode
// can block while the network is split, so it runs apart from the loop.
func (n *Node) publishLoop() {
	defer n.wg.Done()
	for {
		select {
		case <-n.stop:
			return
		case <-n.publish:
			n.pubMu.Lock()
			if err := n.ml.UpdateNode(time.Second); err != nil {
				n.log.Debug("metadata broadcast not confirmed", "err", err)
			}
			n.pubMu.Unlock()
		}
	}
}

// rejoinLoop retries the join list while the node is alone (resolving
// its names again each time), and the addresses of lost (not departed)
// members, so that the two sides of a healed partition find each other
// again. A node that is not alone resolves the join list's names every
// ResolveInterval and joins the addresses that are not members yet, so
// that nodes that appear behind a name (a scaled-up StatefulSet) are
// found even if they joined no one.
func (n *Node) rejoinLoop() {
	defer n.wg.Done()
	// Resolutions in progress end with the node.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-n.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	t := time.NewTicker(n.cfg.RejoinInterval)
	defer t.Stop()
	var resolveC <-chan time.Time
	if hasNames(n.cfg.Join) {
		rt := time.NewTicker(n.cfg.ResolveInterval)
		defer rt.Stop()
		resolveC = rt.C
	}
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
			n.rejoin(ctx)
		case <-resolveC:
			if n.ml.NumMembers() > 1 {
				n.joinNewResolved(ctx)
			}
		}
	}
}

// rejoin dials the lost members, and the join list while the node is
// alone.
func (n *Node) rejoin(ctx context.Context) {
	var addrs []string
	n.mu.Lock()
	for _, k := range n.known {
		if k.state == "dead" && k.addr != "" {
			addrs = append(addrs, k.addr)
		}
	}
	n.mu.Unlock()
	alone := n.ml.NumMembers() <= 1
	if alone && len(n.cfg.Join) > 0 {
		rctx, cancel := context.WithTimeout(ctx, resolveTimeout)
		addrs = append(addrs, n.joins.resolve(rctx, n.cfg.Join)...)
		cancel()
	}
	if len(addrs) == 0 {
		if alone && len(n.cfg.Join) > 0 {
			n.log.Warn("join failed; running alone and retrying", "join", n.cfg.Join, "err", "no join address resolved", "retry_every", n.cfg.RejoinInterval)
		}
		return
	}
	k, err := n.ml.Join(addrs)
	if err != nil && k == 0 {
		n.log.Debug("rejoin failed", "addrs", addrs, "err", err)
	}
	// Still alone, though the join list may have named this node, which
	// answers its own join: no member found.
	if alone && n.ml.NumMembers() <= 1 && len(n.cfg.Join) > 0 {
		if err == nil {
			err = errors.New("only this node answered")
		}
		n.log.Warn("join failed; running alone and retrying", "join", n.cfg.Join, "err", err, "retry_every", n.cfg.RejoinInterval)
	}
}

// joinNewResolved resolves the join list and joins the addresses that
// are neither this node nor a member it knows alive.
func (n *Node) joinNewResolved(ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	addrs := n.joins.resolve(rctx, n.cfg.Join)
	cancel()
	members := map[string]bool{normalAddr(n.gossipAddr): true}
	n.mu.Lock()
	for _, k := range n.known {
		if k.state == "alive" || k.state == "suspect" {
			members[normalAddr(k.addr)] = true
		}
	}
	n.mu.Unlock()
	var fresh []string
	for _, a := range addrs {
		if !members[a] {
			fresh = append(fresh, a)
		}
	}
	if len(fresh) == 0 {
		return
	}
	k, err := n.ml.Join(fresh)
	if k == 0 {
		// A listed address nobody answers at (a pod that is down) is
		// tried again every ResolveInterval: not worth an info line each time.
		n.log.Debug("new addresses of the join list did not answer", "addrs", fresh, "err", err)
		return
	}
	n.log.Info("joined new addresses of the join list", "addrs", fresh, "answered", k, "err", err)
	n.signal(n.wake)
}

// delegate gives memberlist our metadata. Its methods are called from
// memberlist's goroutines with its locks held: they only copy.
type delegate struct{ n *Node }

func (d *delegate) NodeMeta(limit int) []byte {
	d.n.mu.Lock()
	defer d.n.mu.Unlock()
	return append([]byte(nil), d.n.metaB...)
}
func (d *delegate) NotifyMsg([]byte)                           {}
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d *delegate) LocalState(join bool) []byte                { return nil }
func (d *delegate) MergeRemoteState(buf []byte, join bool)     {}

// events records membership changes and wakes the loop. memberlist calls
// them synchronously: they must not block.
type events struct{ n *Node }

func (e *events) note(node *memberlist.Node, state string) {
	n := e.n
	if node.Name == n.cfg.NodeID {
		return
	}
	m, err := decodeMeta(node.Meta)
	if err != nil {
		n.log.Warn("peer with bad metadata ignored", "peer", node.Name, "addr", node.Address(), "err", err)
		return
	}
	n.mu.Lock()
	k := n.known[m.ID]
	if k == nil {
		k = &known{}
		n.known[m.ID] = k
	}
	if m.Leaving && state == "dead" {
		state = "left"
	}
	now := n.cfg.Now()
	if state == "dead" && k.state != "dead" {
		k.deadAt = now
	}
	switch gone := state == "dead" || state == "left"; {
	case !gone:
		k.goneAt = time.Time{}
	case k.goneAt.IsZero():
		k.goneAt = now
	}
	k.meta, k.addr, k.state = m, node.Address(), state
	n.mu.Unlock()
	n.signal(n.wake)
}

func (e *events) NotifyJoin(node *memberlist.Node) {
	if node.Name == e.n.cfg.NodeID {
		return
	}
	e.n.log.Info("member joined", "peer", node.Name, "addr", node.Address())
	e.note(node, "alive")
}
func (e *events) NotifyUpdate(node *memberlist.Node) { e.note(node, stateName(node.State)) }
func (e *events) NotifyLeave(node *memberlist.Node) {
	if node.Name == e.n.cfg.NodeID {
		return
	}
	st := "dead"
	e.n.mu.Lock()
	if k := e.n.known[node.Name]; k != nil && k.meta.Leaving {
		st = "left"
	}
	e.n.mu.Unlock()
	e.n.log.Info("member gone", "peer", node.Name, "addr", node.Address(), "state", st)
	e.note(node, st)
}

// logBridge turns memberlist's log lines into slog records.
type logBridge struct{ log *slog.Logger }

func (b *logBridge) Write(p []byte) (int, error) {
	line := string(bytes.TrimSpace(p))
	level := slog.LevelInfo
	for _, l := range []struct {
		tag   string
		level slog.Level
	}{{"[ERR]", slog.LevelError}, {"[WARN]", slog.LevelWarn}, {"[DEBUG]", slog.LevelDebug}, {"[INFO]", slog.LevelInfo}} {
		if i := bytes.Index(p, []byte(l.tag)); i >= 0 {
			level = l.level
			line = string(bytes.TrimSpace(p[i+len(l.tag):]))
			break
		}
	}
	b.log.Log(context.Background(), level, "memberlist", "detail", line)
	return len(p), nil
}

type metrics struct {
	promotions prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, n *Node) *metrics {
	m := &metrics{promotions: prometheus.NewCounter(prometheus.CounterOpts{
		Name: "brokerd_cluster_promotions_total", Help: "Times this node took a seat as an active member.",
	})}
	if reg != nil {
		reg.MustRegister(m.promotions, &collector{n: n}, protocolCollector{n: n})
	}
	return m
}

var (
	membersDesc   = prometheus.NewDesc("brokerd_cluster_members", "Members this node knows, by role and state.", []string{"role", "state"}, nil)
	epochDesc     = prometheus.NewDesc("brokerd_cluster_epoch", "The epoch of the active set this node computed.", nil, nil)
	convergedDesc = prometheus.NewDesc("brokerd_cluster_converged", "1 when every alive member advertises the same active set.", nil, nil)
	wantedDesc    = prometheus.NewDesc("brokerd_cluster_active_members_wanted", "M, the wanted number of active members.", nil, nil)
)

type collector struct{ n *Node }

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- membersDesc
	ch <- epochDesc
	ch <- convergedDesc
	ch <- wantedDesc
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.n.Status()
	counts := map[[2]string]int{}
	for _, role := range []string{"active", "observer"} {
		for _, st := range []string{"alive", "suspect", "dead", "left"} {
			counts[[2]string{role, st}] = 0
		}
	}
	for _, m := range s.Members {
		counts[[2]string{m.Role, m.State}]++
	}
	for k, v := range counts {
		ch <- prometheus.MustNewConstMetric(membersDesc, prometheus.GaugeValue, float64(v), k[0], k[1])
	}
	ch <- prometheus.MustNewConstMetric(epochDesc, prometheus.GaugeValue, float64(s.Epoch))
	conv := 0.0
	if s.Converged {
		conv = 1
	}
	ch <- prometheus.MustNewConstMetric(convergedDesc, prometheus.GaugeValue, conv)
	ch <- prometheus.MustNewConstMetric(wantedDesc, prometheus.GaugeValue, float64(s.ActiveMembersWanted))
}
