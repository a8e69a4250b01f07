// Package node assembles one brokerd node from its configuration: the
// store, the destinations, the STOMP listener and the admin HTTP server.
// main and the in-process tests call the same New.
package node

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/brokerd/brokerd/store"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
)

// Version is reported in CONNECTED's server header.
const Version = "0.1.0"

// Node is one running brokerd.
type Node struct {
	cfg config.Config
	log *slog.Logger
	reg *prometheus.Registry
	id  string
	st  *store.Store
	rep *replica.Node
	srv *stomp.Server
	cl  *cluster.Node
	// disc lists the cluster's nodes in CONNECTED (discovery.go).
	disc *discovery
	// sampled holds the metrics the cluster page's sampler reads
	// (sampleRegisterer), also in reg.
	sampled *prometheus.Registry

	opts Options

	// reload holds what SIGHUP and POST /v1/reload reread (see Reload).
	reload reloads

	// Clustered (cluster.gossip_addr set): replication and forwarding.
	secret   []byte
	keyring  *cluster.Keyring // the gossip keys, shared by gossip and peer links; nil without a key
	rt       *router
	pr       *replica.PeerReplicator
	links    *peerLinks
	fwd      *fwdLinks
	peerSrv  *stomp.PeerServer
	replStop sync.Once
	admin    *http.Server
	adminL   net.Listener
	adminD   chan struct{}
	guard    *adminAuth // the admin API's authentication; nil without admin.addr
	page     *pageState // the cluster page's sampler and streams; nil without admin.addr

	// Fail-stop: closed once the store has failed and the node has stopped
	// serving (see watchStore).
	failed   chan struct{}
	failOnce sync.Once
	failErr  error         // set before failed is closed
	stopped  chan struct{} // closed by Shutdown: watchStore returns
	stopOnce sync.Once
	watchWG  sync.WaitGroup // watchStore, a drain's closing of sessions

	// Maintenance (drain.go), under drainMu.
	drainMu        sync.Mutex
	drainGen       uint64 // counts drains and undrains
	drainClosed    int    // client sessions the last drain ended
	drainedAtStart bool   // the store said draining at Start
}

// Options are hooks for tests that run several nodes in one process.
type Options struct {
	// Cluster, if set, adjusts the membership config before it is used
	// (an in-memory gossip transport, faster timers).
	Cluster func(*cluster.Config)
	// PeerDial, if set, replaces the TCP dialer of peer links (a
	// partitionable network).
	PeerDial func(ctx context.Context, addr string) (net.Conn, error)
}

// New opens the node's store and recovers its messages. It listens on
// nothing until Start.
func New(cfg config.Config, log *slog.Logger) (*Node, error) {
	return NewWithOptions(cfg, log, Options{})
}

// NewWithOptions is New with test hooks.
func NewWithOptions(cfg config.Config, log *slog.Logger, opts Options) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	log = log.With("node", cfg.Node.Name)
	// The users and ACL files: read now, so that a bad one stops the
	// start with the key's name, and again at every reload.
	var auth *authFiles
	if cfg.Auth.UsersFile != "" || cfg.Auth.ACLFile != "" {
		a, err := newAuthFiles(cfg.Auth, log)
		if err != nil {
			return nil, err
		}
		auth = a
	}
	sync, err := store.ParseSyncMode(cfg.Store.Sync)
	if err != nil {
		return nil, fmt.Errorf("store.sync: %w", err)
	}
	overflow, err := replica.ParseOverflow(cfg.Queue.Overflow)
	if err != nil {
		return nil, fmt.Errorf("queue.overflow: %w", err)
	}
	// STOMP over TLS (and wss): the files are read now, so that a bad one
	// stops the start with the key's name, and again at every reload.
	var stompTLS *tlsFiles
	if t := cfg.STOMP.TLS; t.Addr != "" || cfg.STOMP.WSSAddr != "" {
		ca := t.ClientCAFile
		if t.ClientAuth == "none" {
			ca = ""
		}
		if stompTLS, err = newTLSFiles("stomp.tls", t.CertFile, t.KeyFile, ca, "client_ca_file"); err != nil {
			return nil, err
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	scfg := store.DefaultConfig(filepath.Join(cfg.Node.DataDir, "brokerd.db"))
	scfg.Sync = sync
	scfg.SyncInterval = cfg.Store.SyncInterval
	scfg.MaxBatchOps = cfg.Store.MaxBatch
	scfg.WALSize = cfg.Store.WALSize
	scfg.ApplyInterval = cfg.Store.ApplyInterval
	scfg.MinFreeBytes = cfg.Store.MinFreeBytes
	scfg.Recover = store.RecoverRefuse
	if cfg.Store.Recover == "truncate" {
		scfg.Recover = store.RecoverTruncate
	}
	scfg.Logger = log
	scfg.Registerer = reg
	scfg.Weigh = replica.StoredBodyLen // queue.max_bytes counts bodies
	st, err := store.Open(scfg)
	if errors.Is(err, store.ErrCorruptLog) && scfg.Recover == store.RecoverRefuse {
		return nil, fmt.Errorf("%w (store.recover is refuse: with store.recover: truncate the node starts without that record and every one after it)", err)
	}
	if err != nil {
		return nil, err
	}
	id, err := nodeID(st)
	if err != nil {
		st.Close()
		return nil, err
	}
	log = log.With("node_id", id)

	rcfg := replica.DefaultConfig()
	rcfg.NodeID = id
	rcfg.Now = wallClock(cfg.Node.DataDir)
	rcfg.MaxRedeliveries = cfg.Queue.MaxRedeliveries
	rcfg.DLQPrefix = cfg.Queue.DLQPrefix
	rcfg.TopicBuffer = cfg.Limits.TopicBuffer
	rcfg.MaxUnacked = cfg.Limits.MaxUnacked
	rcfg.MaxUnackedBytes = cfg.Limits.MaxUnackedBytes
	rcfg.MaxLength = cfg.Queue.MaxLength
	rcfg.MaxBytes = cfg.Queue.MaxBytes
	rcfg.Overflow = overflow
	rcfg.IdleDeleteAfter = cfg.Queue.IdleDeleteAfter
	rcfg.ReadAheadMessages = cfg.Queue.ReadAheadMessages
	rcfg.ReadAheadBytes = cfg.Queue.ReadAheadBytes
	rcfg.TombstoneTTL = cfg.Replica.TombstoneTTL
	sreg := newSampleRegisterer(reg)
	rcfg.Registerer = sreg
	rcfg.Logger = log
	rep := replica.New(rcfg, st)
	n := &Node{
		cfg: cfg,
		log: log,
		reg: reg,
		id:  id,
		st:  st,
		rep: rep,

		opts:    opts,
		failed:  make(chan struct{}),
		stopped: make(chan struct{}),
	}
	var broker stomp.Broker = stomp.Local(rep)
	if cfg.Cluster.GossipAddr != "" {
		if err := n.setupReplication(); err != nil {
			st.Close()
			return nil, err
		}
		broker = n.rt
	}
	if err := rep.Recover(); err != nil {
		st.Close()
		return nil, err
	}

	pcfg := stomp.DefaultConfig()
	pcfg.Addr = cfg.STOMP.Addr
	pcfg.Limits = stomp.Limits{
		MaxFrameSize:     cfg.Limits.MaxFrameSize,
		MaxHeaderCount:   cfg.Limits.MaxHeaderCount,
		MaxHeaderLineLen: cfg.Limits.MaxHeaderLength,
		MaxBodySize:      cfg.Limits.MaxBodySize,
	}
	pcfg.MaxConnections = cfg.Limits.MaxConnections
	pcfg.MaxSubscriptions = cfg.Limits.MaxSubscriptions
	pcfg.MaxTxFrames = cfg.Limits.MaxTransactionFrames
	pcfg.MaxTxBytes = cfg.Limits.MaxTransactionBytes
	pcfg.MaxOutgoingBytes = cfg.Limits.MaxOutgoingBytes
	pcfg.HeartbeatSend = cfg.STOMP.HeartbeatSend
	pcfg.HeartbeatReceive = cfg.STOMP.HeartbeatReceive
	pcfg.HeartbeatMin = cfg.STOMP.HeartbeatMin
	pcfg.ConnectTimeout = cfg.STOMP.ConnectTimeout
	pcfg.WriteTimeout = cfg.STOMP.WriteTimeout
	if auth != nil {
		pcfg.Auth = auth
		if cfg.Auth.ACLFile != "" {
			pcfg.Authorizer = auth
		}
		n.reload.add("auth", auth.reload)
	}
	pcfg.ServerName = "brokerd/" + Version
	n.disc = newDiscovery()
	pcfg.Nodes = n.disc.nodes
	pcfg.X509Login = cfg.Auth.X509Login
	pcfg.MaxConnectionsPerIP = cfg.Limits.MaxConnectionsPerIP
	if stompTLS != nil {
		pcfg.TLSAddr = cfg.STOMP.TLS.Addr
		pcfg.TLS = stompTLS.serverConfig(clientAuthType(cfg.STOMP.TLS.ClientAuth))
		n.reload.add("stomp.tls", stompTLS.reload)
	}
	pcfg.WSAddr = cfg.STOMP.WSAddr
	pcfg.WSSAddr = cfg.STOMP.WSSAddr // with stomp.tls's certificate, as reloaded
	pcfg.WSAllowedOrigins = cfg.STOMP.WSAllowedOrigins
	pcfg.Logger = log
	pcfg.Registerer = sreg
	n.sampled = sreg.Sample

	n.srv = stomp.NewServer(pcfg, broker)
	return n, nil
}

// clusterConfig builds the membership config; addresses are the bound ones.
func (n *Node) clusterConfig() (cluster.Config, error) {
	cfg := n.cfg
	c := cluster.DefaultConfig()
	c.NodeID = n.id
	c.NodeName = cfg.Node.Name
	c.Wall = wallClock(cfg.Node.DataDir)
	c.ClusterName = cfg.Cluster.Name
	c.BindAddr = cfg.Cluster.GossipAddr
	c.Join = cfg.Cluster.Join
	c.ActiveMembers = cfg.Cluster.ActiveMembers
	c.PromotionDelay = cfg.Cluster.PromotionDelay
	c.ForgetAfter = cfg.Cluster.ForgetAfter
	ca := advertisedClientAddrs(cfg.STOMP.AdvertiseAddr, cluster.ClientAddrs{
		TCP: n.STOMPAddr(), TLS: n.STOMPTLSAddr(), WS: n.STOMPWSAddr(), WSS: n.STOMPWSSAddr()})
	c.STOMPAddr, c.STOMPTLSAddr, c.STOMPWSAddr, c.STOMPWSSAddr = ca.TCP, ca.TLS, ca.WS, ca.WSS
	c.AdminAddr = n.AdminAddr()
	c.PeerAddr = cfg.Cluster.PeerAddr
	c.State = n.st
	c.Logger = n.log
	c.Registerer = n.reg
	if n.peerSrv != nil {
		c.PeerAddr = n.peerSrv.Addr().String()
	}
	key, err := readSecretKey(cfg.Cluster.SecretKeyFile)
	if err != nil {
		return c, err
	}
	c.SecretKey = key
	c.Keyring = n.keyring // nil on a single node: SecretKey alone
	if n.opts.Cluster != nil {
		n.opts.Cluster(&c)
	}
	return c, nil
}

// PeerAddr is the bound peer-link address, or "" when not clustered.
func (n *Node) PeerAddr() string {
	if n.peerSrv == nil || n.peerSrv.Addr() == nil {
		return ""
	}
	return n.peerSrv.Addr().String()
}

// readSecretKey reads cluster.secret_key_file; "" is no key.
func readSecretKey(path string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cluster.secret_key_file: %w", err)
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("cluster.secret_key_file: %s: not base64: %w", path, err)
	}
	if l := len(key); l != 16 && l != 24 && l != 32 {
		return nil, fmt.Errorf("cluster.secret_key_file: %s: key of %d bytes, want 16, 24 or 32 (e.g. openssl rand -base64 32)", path, l)
	}
	return key, nil
}

const metaNodeID = "node_id"

// nodeID returns the node's stable ID, creating it on first start.
func nodeID(st *store.Store) (string, error) {
	b, err := st.Meta(metaNodeID)
	if err != nil {
		return "", fmt.Errorf("read node id: %w", err)
	}
	if len(b) > 0 {
		return string(b), nil
	}
	var r [8]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", err
	}
	id := hex.EncodeToString(r[:])
	if err := st.SetMeta(metaNodeID, []byte(id)); err != nil {
		return "", fmt.Errorf("write node id: %w", err)
	}
	return id, nil
}

// ID is the node's stable ID.
func (n *Node) ID() string { return n.id }

// Start starts the store writer and the listeners: STOMP, then the
// cluster, then the admin server, so that /healthz answers only once
// clients can connect and the node is in the cluster.
func (n *Node) Start() error {
	n.st.Start()
	n.rep.Start()
	n.restoreDrain() // before the first client: a drained node refuses them
	if err := n.srv.Start(); err != nil {
		n.rep.Close()
		n.st.Close()
		return err
	}
	var guard *adminAuth
	if n.cfg.Admin.Addr != "" {
		// The token file and certificates first: a bad one stops the
		// start naming its key.
		var err error
		guard, err = newAdminAuth(n.cfg.Admin, n.log)
		var tf *tlsFiles
		if err == nil {
			tf, err = newAdminTLS(n.cfg.Admin.TLS)
		}
		if err != nil {
			_ = n.Shutdown(context.Background())
			return err
		}
		// Bound now, for the address the cluster advertises; served once
		// the cluster runs, so /healthz and /v1/cluster never answer for a
		// node that is half started.
		ln, err := net.Listen("tcp", n.cfg.Admin.Addr)
		if err != nil {
			_ = n.Shutdown(context.Background())
			return fmt.Errorf("admin listen: %w", err)
		}
		// At most adminMaxConns connections at once (a goroutine and
		// buffers each; the rest wait in the listen backlog), and
		// adminMaxConnsPerIP from one address (the rest are closed). Beneath
		// TLS: http.Server must see *tls.Conn to handshake and fill
		// r.TLS (client certificates).
		ln = &perIPListener{Listener: netutil.LimitListener(ln, adminMaxConns), max: adminMaxConnsPerIP, n: map[string]int{}}
		if tf != nil {
			ln = adminListener(ln, tf, n.cfg.Admin.TLS.ClientCAFile != "")
			n.reload.add("admin.tls", tf.reload)
		}
		if n.cfg.Admin.TokenFile != "" {
			n.reload.add("admin.token_file", guard.reload)
		}
		n.adminL = ln
		n.guard = guard
	}
	if n.peerSrv != nil {
		if err := n.peerSrv.Start(); err != nil {
			_ = n.Shutdown(context.Background())
			return fmt.Errorf("cluster.peer_addr: %w", err)
		}
		n.log.Info("peer links listening", "addr", n.peerSrv.Addr().String())
	}
	ccfg, err := n.clusterConfig()
	var cl *cluster.Node
	if err == nil {
		cl, err = cluster.New(ccfg)
	}
	if err == nil && n.drainedAtStart {
		err = cl.SetDraining(true) // gossiped from the first join
	}
	if err == nil {
		err = cl.Start()
	}
	if err != nil {
		_ = n.Shutdown(context.Background())
		return err
	}
	n.cl = cl
	n.disc.cl.Store(cl)
	if n.rt != nil {
		n.rt.start()
	}
	if n.adminL != nil {
		ln := n.adminL
		n.page = newPageState(n)
		n.page.start()
		n.admin = &http.Server{
			Handler:           adminWriteDeadline(guard.wrap(n.adminHandler())),
			ReadHeaderTimeout: adminHeaderTimeout,
			ReadTimeout:       adminReadTimeout,
			IdleTimeout:       adminIdleTimeout,
			MaxHeaderBytes:    adminMaxHeaderBytes,
			// TLS handshake errors (a client certificate the CA did not
			// sign) and the like, with the client's address.
			ErrorLog: slog.NewLogLogger(n.log.With("component", "admin").Handler(), slog.LevelWarn),
		}
		n.adminD = make(chan struct{})
		go func() {
			defer close(n.adminD)
			if err := n.admin.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				n.log.Error("admin server stopped", "err", err)
			}
		}()
		n.log.Info("admin listening", "addr", ln.Addr().String(), "https", n.cfg.Admin.TLS.CertFile != "",
			"token", n.cfg.Admin.TokenFile != "", "client_certificates", n.cfg.Admin.TLS.ClientCAFile != "")
	}
	n.watchWG.Add(1)
	go n.watchStore()
	return nil
}

// The admin HTTP server's bounds: what one client, or many, can hold.
// Variables only so that tests can shorten them.
var (
	// adminMaxConns bounds the connections served at once; the stream
	// of the cluster page has its own, lower bound (pageMaxStreams).
	adminMaxConns = 256
	// adminMaxConnsPerIP bounds those from one remote address.
	adminMaxConnsPerIP = 64
	// adminHeaderTimeout bounds the TLS handshake and a request's
	// headers; adminReadTimeout the whole request, body included (the
	// admin API's bodies are a few hundred bytes).
	adminHeaderTimeout = 5 * time.Second
	adminReadTimeout   = 30 * time.Second
	// adminIdleTimeout closes a keep-alive connection left idle.
	adminIdleTimeout = 60 * time.Second
	// adminWriteTimeout bounds writing one answer to a client that does
	// not read, except the long-lived ones (adminWriteDeadline).
	adminWriteTimeout   = 30 * time.Second
	adminMaxHeaderBytes = 64 << 10
)

// adminWriteDeadline gives every answer adminWriteTimeout to be written
// from its first byte (a purge may work for minutes before it answers),
// except the cluster page's event stream (which sets a deadline for each
// event) and the profiles and traces of /debug/pprof/ (which take as long
// as they are asked to). http.Server's WriteTimeout would cut those too,
// and counts from the request.
func adminWriteDeadline(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/overview/stream", "/debug/pprof/profile", "/debug/pprof/trace":
			h.ServeHTTP(w, r)
			return
		}
		if r.URL.Query().Has("seconds") && strings.HasPrefix(r.URL.Path, "/debug/pprof/") {
			h.ServeHTTP(w, r) // a delta profile, over the seconds asked
			return
		}
		h.ServeHTTP(&deadlineOnWrite{ResponseWriter: w}, r)
	})
}

// deadlineOnWrite sets the connection's write deadline when the answer
// starts (adminWriteDeadline).
type deadlineOnWrite struct {
	http.ResponseWriter
	armed bool
}

func (d *deadlineOnWrite) arm() {
	if !d.armed {
		d.armed = true
		_ = http.NewResponseController(d.ResponseWriter).SetWriteDeadline(time.Now().Add(adminWriteTimeout))
	}
}

func (d *deadlineOnWrite) WriteHeader(code int) {
	d.arm()
	d.ResponseWriter.WriteHeader(code)
}

func (d *deadlineOnWrite) Write(b []byte) (int, error) {
	d.arm()
	return d.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection.
func (d *deadlineOnWrite) Unwrap() http.ResponseWriter { return d.ResponseWriter }

// perIPListener closes connections beyond max from one remote address at
// once, so that one client cannot take every admin connection
// (adminMaxConns) with keep-alives or slow headers.
type perIPListener struct {
	net.Listener
	max int
	mu  sync.Mutex
	n   map[string]int // at most as many entries as connections held
}

func (l *perIPListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip := remoteIP(c)
		l.mu.Lock()
		if l.n[ip] >= l.max {
			l.mu.Unlock()
			_ = c.Close() // frees its slot of the cap beneath
			continue
		}
		l.n[ip]++
		l.mu.Unlock()
		return &perIPConn{Conn: c, l: l, ip: ip}, nil
	}
}

func remoteIP(c net.Conn) string {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.IP.String()
	}
	return c.RemoteAddr().String()
}

type perIPConn struct {
	net.Conn
	l    *perIPListener
	ip   string
	once sync.Once
}

func (c *perIPConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.l.mu.Lock()
		if c.l.n[c.ip]--; c.l.n[c.ip] <= 0 {
			delete(c.l.n, c.ip)
		}
		c.l.mu.Unlock()
	})
	return err
}

// watchStore stops the node when the store fails: a write or fsync of the
// log or of bbolt failed, so no further commit can be trusted. It logs the
// cause, closes the STOMP listener (sessions answer what is pending with
// ERROR frames and close), and leaves the cluster so that the others see it
// as left at once and promote a replacement. /healthz answers 503 from
// then on. The process (main) exits on Failed, so that a supervisor
// restarts it and the log is replayed.
func (n *Node) watchStore() {
	defer n.watchWG.Done()
	select {
	case <-n.stopped:
		return
	case <-n.st.Failed():
	}
	err := n.st.Err()
	if err == nil {
		err = errors.New("store failed")
	}
	n.failErr = err
	n.log.Error("store failed: refusing clients and leaving the cluster; restart to recover from the write-ahead log", "err", err)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := n.srv.Shutdown(ctx); err != nil {
			n.log.Warn("closing STOMP sessions after the store failure", "err", err)
		}
	}()
	if n.cl != nil {
		if err := n.cl.Leave(time.Second); err != nil {
			n.log.Debug("gossip leave incomplete", "err", err)
		}
	}
	wg.Wait()
	n.failOnce.Do(func() { close(n.failed) })
}

// Failed is closed once the node has stopped serving because its store
// failed; Err then says why. The process should exit.
func (n *Node) Failed() <-chan struct{} { return n.failed }

// Err is the store failure that stopped the node, or nil.
func (n *Node) Err() error {
	select {
	case <-n.failed:
		return n.failErr
	default:
		return nil
	}
}

// Cluster is the node's membership.
func (n *Node) Cluster() *cluster.Node { return n.cl }

// STOMPAddr is the bound STOMP address.
// It is "" when stomp.addr is "" (STOMP over TLS only).
func (n *Node) STOMPAddr() string {
	if a := n.srv.Addr(); a != nil {
		return a.String()
	}
	return ""
}

// STOMPTLSAddr is the bound STOMP-over-TLS address, or "" without one.
func (n *Node) STOMPTLSAddr() string {
	if a := n.srv.TLSAddr(); a != nil {
		return a.String()
	}
	return ""
}

// STOMPWSAddr is the bound STOMP-over-WebSocket address (stomp.ws_addr),
// or "" without one.
func (n *Node) STOMPWSAddr() string {
	if a := n.srv.WSAddr(); a != nil {
		return a.String()
	}
	return ""
}

// STOMPWSSAddr is the bound STOMP-over-secure-WebSocket address
// (stomp.wss_addr), or "" without one.
func (n *Node) STOMPWSSAddr() string {
	if a := n.srv.WSSAddr(); a != nil {
		return a.String()
	}
	return ""
}

// AdminAddr is the bound admin address, or "" when disabled.
func (n *Node) AdminAddr() string {
	if n.adminL == nil {
		return ""
	}
	return n.adminL.Addr().String()
}

// Shutdown stops accepting clients, lets every session's earlier frames
// take effect and their receipts go out, closes the connections, finishes
// in-flight commits and closes the store.
func (n *Node) Shutdown(ctx context.Context) error {
	n.stopOnce.Do(func() { close(n.stopped) })
	n.watchWG.Wait() // a fail-stop in progress finishes first (bounded)
	if n.page != nil {
		// The page's sampler and streams stop first: the admin server
		// would wait for the streams, and the destination gatherer uses
		// the peer links.
		n.page.close()
	}
	// Clients first, while this node is still a member: the listener
	// closes, each connection's earlier frames take effect (its SENDs
	// replicated under the current epoch) and their receipts go out.
	// Leaving first made the others move on to an epoch without this
	// node, refuse its appends, and fail those SENDs with "not enough
	// replicas" after the retry budget (seen as 4 s pauses in the chaos
	// suite's rolling restart).
	err := n.srv.Shutdown(ctx)
	if n.cl != nil {
		// Then leave: the others promote a replacement at once.
		if err := n.cl.Leave(time.Second); err != nil {
			n.log.Debug("gossip leave incomplete", "err", err)
		}
	}
	n.stopReplication()
	if n.admin != nil {
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = n.admin.Shutdown(sctx)
		cancel()
		<-n.adminD
	} else if n.adminL != nil {
		n.adminL.Close() // bound, never served: Start failed
	}
	n.rep.Close()
	if cerr := n.st.Close(); cerr != nil && err == nil {
		err = cerr
	}
	return err
}

func (n *Node) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", n.healthz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(n.reg, promhttp.HandlerOpts{}))
	// Profiles for operators chasing a slow node; like everything but
	// /healthz (and /metrics with admin.metrics_public), behind the admin
	// token or client certificate when one is configured (see adminAuth).
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("GET /v1/cluster", func(w http.ResponseWriter, r *http.Request) {
		if n.cl == nil {
			http.Error(w, "cluster not started", http.StatusServiceUnavailable)
			return
		}
		writeJSON(w, n.cl.Status())
	})
	mux.HandleFunc("PUT /v1/cluster/active-members", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Value *int `json:"value"`
		}
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil || req.Value == nil {
			http.Error(w, `want JSON {"value": N} with N >= 1`, http.StatusBadRequest)
			return
		}
		if n.cl == nil {
			http.Error(w, "cluster not started", http.StatusServiceUnavailable)
			return
		}
		if err := n.cl.SetActiveMembers(*req.Value); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		writeJSON(w, n.cl.Status())
	})
	mux.HandleFunc("POST /v1/reload", func(w http.ResponseWriter, r *http.Request) {
		if err := n.Reload(); err != nil {
			http.Error(w, "reload failed, the old rules stay in force: "+err.Error(), http.StatusUnprocessableEntity)
			return
		}
		writeJSON(w, map[string]string{"status": "reloaded"})
	})
	mux.HandleFunc("GET /v1/destinations", func(w http.ResponseWriter, r *http.Request) {
		if n.rt != nil {
			// Clustered: every node's view, each queue as its owner
			// counts it, with its replica set.
			writeJSON(w, n.rt.clusterDestinations())
			return
		}
		writeJSON(w, n.rep.Destinations())
	})
	n.gossipKeysRoutes(mux)
	n.opsRoutes(mux)
	n.pageRoutes(mux)
	return mux
}

// healthz answers 200 {"status": "ok"} while the node serves, 200
// {"status": "degraded", "reason": "low disk space"} while the low-disk
// alarm refuses SENDs (consumers must still reach the node to drain it, so a
// readiness probe must not take it out of service), and 503
// {"status": "failed", "error": ...} once the store has failed and the
// node is stopping.
func (n *Node) healthz(w http.ResponseWriter, r *http.Request) {
	body := map[string]string{"status": "ok", "node_id": n.id, "node_name": n.cfg.Node.Name}
	var failed error
	select {
	case <-n.st.Failed():
		failed = n.st.Err()
		if failed == nil {
			failed = errors.New("store failed")
		}
	default:
	}
	switch {
	case failed != nil:
		body["status"] = "failed"
		body["error"] = "store failed: " + failed.Error()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(body)
		return
	case n.cl != nil && n.cl.JoinRefused() != nil:
		// Started alone, then refused by the cluster of cluster.join
		// (no protocol version in common): it must not look like a
		// healthy member to a load balancer.
		body["status"] = "refused"
		body["error"] = n.cl.JoinRefused().Error()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(body)
		return
	case n.srv.Draining():
		// Out of service for maintenance (brokerd drain): load balancers
		// and readiness probes stop sending clients.
		body["status"] = "draining"
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(body)
		return
	case n.st.LowDisk():
		body["status"] = "degraded"
		body["reason"] = "low disk space"
	}
	writeJSON(w, body)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
