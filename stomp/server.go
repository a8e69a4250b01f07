package stomp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/go-stomp/stomp/v3/frame"
	"github.com/prometheus/client_golang/prometheus"
)

// Broker is what the STOMP edge needs from the node behind it.
type Broker interface {
	// Subscribe registers a subscription whose messages arrive through
	// opts.Deliver.
	Subscribe(opts replica.SubOptions) (replica.Sub, error)
	// Apply validates and applies a batch of SENDs, ACKs and NACKs; done
	// runs once its effects are durable. A validation error is returned
	// and nothing is applied.
	Apply(b *replica.Batch, done func(error)) error
	// Barrier calls done once everything applied before is on disk.
	Barrier(done func(error))
}

// Local is the Broker of a node of its own: n serves every destination.
func Local(n *replica.Node) Broker { return localBroker{n} }

type localBroker struct{ *replica.Node }

func (b localBroker) Subscribe(opts replica.SubOptions) (replica.Sub, error) {
	s, err := b.Node.Subscribe(opts)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return s, nil
}

// Config configures a Server.
type Config struct {
	// Addr is the listen address; port 0 picks a free port (see Server.Addr).
	Addr string
	// Limits bound each client frame.
	Limits Limits
	// MaxConnections caps concurrent client connections.
	MaxConnections int
	// MaxSubscriptions caps the subscriptions of one connection.
	MaxSubscriptions int
	// MaxTxFrames caps the frames buffered in the open transactions of one connection.
	MaxTxFrames int
	// MaxOutgoingBytes caps the bytes of the frames queued for one
	// connection and not yet written to it (RECEIPTs, ERRORs; MESSAGEs are
	// bounded by the replica's write window instead). While it is reached
	// the server reads no more frames from that client, so TCP pushes back
	// on it; a client that reads nothing for WriteTimeout is disconnected.
	// Zero or negative means the default (4 MiB).
	MaxOutgoingBytes int
	// MaxTxBytes caps the bytes (bodies and headers) of the frames
	// buffered in the open transactions of one connection; the frame that
	// would pass it gets an ERROR "transaction too large". Zero or
	// negative means the default (64 MiB).
	MaxTxBytes int64
	// HeartbeatSend enables heart-beats from the server (0: never send
	// any). When enabled, the server sends them as often as the client
	// asks (the second field of its heart-beat header), but not more often
	// than every HeartbeatMin.
	HeartbeatSend time.Duration
	// HeartbeatReceive enables the check of the client's heart-beats (0:
	// never ask for any). When enabled, the server expects them as often
	// as the client offers (the first field of its heart-beat header),
	// but not more often than every HeartbeatMin.
	HeartbeatReceive time.Duration
	// HeartbeatMin is the shortest heart-beat period the server agrees
	// to, both ways; a client asking for more frequent heart-beats gets
	// this period, stated in CONNECTED. Zero or negative means the
	// default (1s).
	HeartbeatMin time.Duration
	// ConnectTimeout bounds the time from accept to a complete CONNECT frame.
	ConnectTimeout time.Duration
	// WriteTimeout bounds each write to a client: a client that reads
	// nothing for that long while the server has something to send it is
	// disconnected.
	WriteTimeout time.Duration
	// Auth checks logins; nil allows anyone.
	Auth Authenticator
	// Authorizer decides which destinations a logged-in user may read,
	// write and create (see Authorizer); nil allows every user everything.
	Authorizer Authorizer
	// TLSAddr, when set, is a second listener that speaks STOMP over TLS
	// with TLS (required then); port 0 picks a free port (see TLSAddr).
	TLSAddr string
	TLS     *tls.Config
	// X509Login lets a client whose certificate TLS verified log in as the
	// certificate's subject CN without a passcode, when its CONNECT has no
	// login or that same login, and no passcode (RabbitMQ's
	// ssl_cert_login). Other CONNECTs are checked by Auth as usual.
	X509Login bool
	// WSAddr, when set, is a listener that speaks STOMP over WebSocket
	// (path WSPath); port 0 picks a free port (see Server.WSAddr).
	WSAddr string
	// WSSAddr, when set, speaks STOMP over secure WebSocket with TLS
	// (required then, as for TLSAddr; with X509Login a client certificate
	// logs in there too).
	WSSAddr string
	// WSAllowedOrigins are the Origin hosts (path.Match patterns, or
	// scheme://host patterns) a browser page may open a WebSocket from,
	// besides the listener's own host; a request without Origin is
	// allowed, any other gets 403.
	WSAllowedOrigins []string
	// MaxConnectionsPerIP caps the concurrent connections from one remote
	// address, on all listeners together. Zero or negative: no cap.
	MaxConnectionsPerIP int
	// MaxLoginChecks bounds the password checks (bcrypt) running at once,
	// so that a flood of CONNECTs cannot take every core; a CONNECT waits
	// for a slot until its ConnectTimeout. Zero or negative: half the
	// CPUs, at least one.
	MaxLoginChecks int
	// ServerName is sent in CONNECTED's server header.
	ServerName string
	// Nodes, if set, returns the value of CONNECTED's x-brokerd-nodes
	// header for a client that came over transport t: the client
	// addresses (host:port, comma-separated) of the cluster's alive nodes,
	// this one first, for the client to fail over to. "" sends no header.
	// It is called for every CONNECT, from the session's goroutine, so it
	// must be cheap and safe for concurrent use.
	Nodes func(t Transport) string
	// Logger receives the server's logs.
	Logger *slog.Logger
	// Registerer receives the metrics; nil means none.
	Registerer prometheus.Registerer
}

// HeaderNodes is the CONNECTED header that lists the client addresses of
// the cluster's alive nodes, this one first (Config.Nodes). STOMP 1.2
// lets a server add headers of its own to CONNECTED.
const HeaderNodes = "x-brokerd-nodes"

// DefaultConfig returns a Config with every field set.
func DefaultConfig() Config {
	return Config{
		Addr:             "127.0.0.1:61613",
		Limits:           DefaultLimits(),
		MaxConnections:   10000,
		MaxSubscriptions: 1000,
		MaxTxFrames:      10000,
		MaxTxBytes:       64 << 20,
		MaxOutgoingBytes: 4 << 20,
		HeartbeatSend:    10 * time.Second,
		HeartbeatReceive: 10 * time.Second,
		HeartbeatMin:     time.Second,
		ConnectTimeout:   10 * time.Second,
		WriteTimeout:     60 * time.Second,
		ServerName:       "brokerd",
		Logger:           slog.Default(),
	}
}

// Server accepts STOMP connections and runs a session for each.
type Server struct {
	cfg    Config
	broker Broker
	log    *slog.Logger
	m      *metrics

	ln       net.Listener
	tlsLn    net.Listener // nil without TLSAddr
	ws, wss  *wsListener  // nil without WSAddr, WSSAddr
	closing  atomic.Bool
	mu       sync.Mutex
	sessions map[*session]struct{}
	perIP    map[netip.Addr]int // open connections per remote address, under mu
	// conns counts the connections holding a slot (MaxConnections), under
	// mu: TCP and TLS sessions, and WebSocket connections from accept to
	// close, upgraded or not.
	conns    int
	logins   *loginGuard
	refusing chan struct{} // one token per refuseAsync goroutine
	// authSlots bounds concurrent password checks (MaxLoginChecks).
	authSlots chan struct{}
	nextID    atomic.Uint64
	wg        sync.WaitGroup // accept loop and sessions
	// draining, when set, is why CONNECTs are refused (SetDraining).
	draining atomic.Pointer[string]
}

// NewServer returns a Server for broker. Call Start to listen.
func NewServer(cfg Config, broker Broker) *Server {
	def := DefaultConfig()
	if cfg.Logger == nil {
		cfg.Logger = def.Logger
	}
	if cfg.Limits == (Limits{}) {
		cfg.Limits = def.Limits
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = def.ConnectTimeout
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = def.WriteTimeout
	}
	if cfg.MaxOutgoingBytes <= 0 {
		cfg.MaxOutgoingBytes = def.MaxOutgoingBytes
	}
	if cfg.MaxTxBytes <= 0 {
		cfg.MaxTxBytes = def.MaxTxBytes
	}
	if cfg.HeartbeatMin <= 0 {
		cfg.HeartbeatMin = def.HeartbeatMin
	}
	// Whole milliseconds, as CONNECTED states it.
	if r := cfg.HeartbeatMin % time.Millisecond; r != 0 {
		cfg.HeartbeatMin += time.Millisecond - r
	}
	if cfg.ServerName == "" {
		cfg.ServerName = def.ServerName
	}
	if cfg.MaxLoginChecks <= 0 {
		cfg.MaxLoginChecks = max(1, runtime.GOMAXPROCS(0)/2)
	}
	return &Server{
		cfg:       cfg,
		broker:    broker,
		log:       cfg.Logger.With("component", "stomp"),
		m:         newMetrics(cfg.Registerer),
		sessions:  make(map[*session]struct{}),
		perIP:     make(map[netip.Addr]int),
		logins:    newLoginGuard(),
		refusing:  make(chan struct{}, maxRefusing),
		authSlots: make(chan struct{}, cfg.MaxLoginChecks),
	}
}

// Start binds the listeners and starts accepting. An empty Addr serves
// no plain listener; one of Addr, TLSAddr, WSAddr and WSSAddr is needed.
func (s *Server) Start() error {
	if (s.cfg.TLSAddr != "" || s.cfg.WSSAddr != "") && s.cfg.TLS == nil {
		return errors.New("stomp: TLSAddr or WSSAddr without a TLS config")
	}
	if s.cfg.Addr == "" && s.cfg.TLSAddr == "" && s.cfg.WSAddr == "" && s.cfg.WSSAddr == "" {
		return errors.New("stomp: no listen address")
	}
	// Bind every listener before serving any, so that a failure leaves
	// nothing behind.
	var ln, tln net.Listener
	var ws, wss *wsListener
	fail := func(err error) error {
		for _, l := range []net.Listener{ln, tln} {
			if l != nil {
				l.Close()
			}
		}
		ws.close()
		wss.close()
		return err
	}
	var err error
	if s.cfg.Addr != "" {
		if ln, err = net.Listen("tcp", s.cfg.Addr); err != nil {
			return fail(fmt.Errorf("stomp listen: %w", err))
		}
	}
	if s.cfg.TLSAddr != "" {
		if tln, err = net.Listen("tcp", s.cfg.TLSAddr); err != nil {
			return fail(fmt.Errorf("stomp tls listen: %w", err))
		}
	}
	if s.cfg.WSAddr != "" {
		if ws, err = s.listenWS(s.cfg.WSAddr, TransportWS); err != nil {
			return fail(err)
		}
	}
	if s.cfg.WSSAddr != "" {
		if wss, err = s.listenWS(s.cfg.WSSAddr, TransportWSS); err != nil {
			return fail(err)
		}
	}
	if tln != nil {
		s.tlsLn = tln
		s.wg.Add(1)
		go s.acceptLoop(tln, true)
		s.log.Info("stomp listening (TLS)", "addr", tln.Addr().String())
	}
	if ln != nil {
		s.ln = ln
		s.wg.Add(1)
		go s.acceptLoop(ln, false)
		s.log.Info("stomp listening", "addr", ln.Addr().String())
	}
	for _, l := range []*wsListener{ws, wss} {
		if l != nil {
			s.wg.Add(1)
			go s.serveWS(l)
			s.log.Info("stomp listening (WebSocket)", "addr", l.ln.Addr().String(), "transport", l.transport.String(), "path", WSPath)
		}
	}
	s.ws, s.wss = ws, wss
	return nil
}

// Addr is the bound address of the plain listener, or nil without one.
func (s *Server) Addr() net.Addr {
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// TLSAddr is the bound address of the TLS listener, or nil without one.
func (s *Server) TLSAddr() net.Addr {
	if s.tlsLn == nil {
		return nil
	}
	return s.tlsLn.Addr()
}

// remoteIP is the address a connection comes from, for the per-address
// limits; the zero Addr for a connection without one (net.Pipe).
func remoteIP(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

func (s *Server) acceptLoop(ln net.Listener, isTLS bool) {
	defer s.wg.Done()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.closing.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Temporary errors such as EMFILE: back off, don't spin.
			if delay == 0 {
				delay = 5 * time.Millisecond
			} else if delay < time.Second {
				delay *= 2
			}
			s.log.Warn("accept failed", "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		ip := remoteIP(c)
		s.mu.Lock()
		if s.closing.Load() {
			s.mu.Unlock()
			c.Close()
			return
		}
		if s.cfg.MaxConnections > 0 && s.conns >= s.cfg.MaxConnections {
			s.mu.Unlock()
			s.m.refused.WithLabelValues("max_connections").Inc()
			s.log.Warn("connection refused", "reason", "too many connections", "remote", c.RemoteAddr().String())
			s.refuseAsync(c, "this server accepts at most "+strconv.Itoa(s.cfg.MaxConnections)+" connections")
			continue
		}
		if s.cfg.MaxConnectionsPerIP > 0 && ip.IsValid() && s.perIP[ip] >= s.cfg.MaxConnectionsPerIP {
			s.mu.Unlock()
			s.m.refused.WithLabelValues("max_connections_per_ip").Inc()
			s.log.Warn("connection refused", "reason", "too many connections from one address", "remote", c.RemoteAddr().String())
			// Over TLS the ERROR would need a handshake first: just close.
			if isTLS {
				c.Close()
			} else {
				s.refuseAsync(c, "this server accepts at most "+strconv.Itoa(s.cfg.MaxConnectionsPerIP)+" connections from one address")
			}
			continue
		}
		s.takeSlotLocked(ip)
		if isTLS {
			c = tls.Server(c, s.cfg.TLS)
		}
		sess := newSession(s, c, "session-"+strconv.FormatUint(s.nextID.Add(1), 10))
		sess.ip = ip
		if isTLS {
			sess.transport = TransportTLS
		}
		s.sessions[sess] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		s.m.connections.WithLabelValues(sess.transport.String()).Inc()
		s.m.connectionsTotal.Inc()
		go func() {
			defer s.wg.Done()
			if tc, ok := c.(*tls.Conn); !ok || s.handshake(tc) {
				sess.run()
			}
			s.mu.Lock()
			delete(s.sessions, sess)
			s.giveSlotLocked(ip)
			s.mu.Unlock()
			s.m.connections.WithLabelValues(sess.transport.String()).Dec()
		}()
	}
}

// roomLocked says whether a connection from ip fits under MaxConnections
// and MaxConnectionsPerIP: "" if it does, else the metrics reason and the
// ERROR detail. s.mu must be held.
func (s *Server) roomLocked(ip netip.Addr) (reason, detail string) {
	if s.cfg.MaxConnections > 0 && s.conns >= s.cfg.MaxConnections {
		return "max_connections", "this server accepts at most " + strconv.Itoa(s.cfg.MaxConnections) + " connections"
	}
	if s.cfg.MaxConnectionsPerIP > 0 && ip.IsValid() && s.perIP[ip] >= s.cfg.MaxConnectionsPerIP {
		return "max_connections_per_ip", "this server accepts at most " + strconv.Itoa(s.cfg.MaxConnectionsPerIP) + " connections from one address"
	}
	return "", ""
}

// takeSlotLocked counts a connection from ip; giveSlotLocked uncounts it.
// s.mu must be held.
func (s *Server) takeSlotLocked(ip netip.Addr) {
	s.conns++
	if ip.IsValid() {
		s.perIP[ip]++
	}
}

func (s *Server) giveSlotLocked(ip netip.Addr) {
	s.conns--
	if ip.IsValid() {
		if s.perIP[ip]--; s.perIP[ip] <= 0 {
			delete(s.perIP, ip)
		}
	}
}

// handshake runs a TLS connection's handshake under the connect timeout.
// A client that speaks plain STOMP to the TLS port gets a plain-text ERROR
// saying so; every failure is logged with the remote address and closes
// the connection.
func (s *Server) handshake(tc *tls.Conn) bool {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ConnectTimeout)
	defer cancel()
	err := tc.HandshakeContext(ctx)
	if err == nil {
		return true
	}
	s.m.refused.WithLabelValues("tls").Inc()
	s.log.Warn("TLS handshake failed", "remote", tc.RemoteAddr().String(), "err", err)
	var rhe tls.RecordHeaderError
	if errors.As(err, &rhe) && rhe.Conn != nil {
		// Not TLS at all (a plain STOMP client on the TLS port).
		refuse(rhe.Conn, "TLS required", "this port speaks STOMP over TLS; connect with TLS or to the plain STOMP port")
		return false
	}
	tc.Close()
	return false
}

// maxRefusing bounds the goroutines writing "too many connections"
// ERRORs; beyond it a refused connection is closed at once.
const maxRefusing = 64

// refuseAsync refuses c on a goroutine of its own while fewer than
// maxRefusing are doing so, else closes it at once.
func (s *Server) refuseAsync(c net.Conn, detail string) {
	select {
	case s.refusing <- struct{}{}:
	default:
		c.Close()
		return
	}
	go func() {
		defer func() { <-s.refusing }()
		refuse(c, "too many connections", detail)
	}()
}

// refuse writes an ERROR frame to a connection that is not served and closes it.
func refuse(c net.Conn, msg, detail string) {
	defer c.Close()
	_ = c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	w := newFrameWriter(c)
	f := frame.New(frame.ERROR, frame.Message, msg, frame.ContentType, "text/plain")
	f.Body = []byte(detail)
	_ = w.WriteFrame(f, "1.2")
	_ = w.Flush()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
	drain(c)
}

// Shutdown stops accepting, tells every client the server is shutting down,
// waits until each session's earlier frames have taken effect and their
// receipts are written, and closes the connections. When ctx ends first,
// the remaining connections are closed at once.
func (s *Server) Shutdown(ctx context.Context) error {
	if !s.closing.CompareAndSwap(false, true) {
		s.wg.Wait()
		return nil
	}
	if s.ln != nil {
		s.ln.Close()
	}
	if s.tlsLn != nil {
		s.tlsLn.Close()
	}
	s.ws.close()
	s.wss.close()
	s.mu.Lock()
	for sess := range s.sessions {
		sess.shutdown()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for sess := range s.sessions {
			sess.conn.Close()
		}
		s.mu.Unlock()
		<-done
		return ctx.Err()
	}
}

type metrics struct {
	connections      *prometheus.GaugeVec // by transport
	connectionsTotal prometheus.Counter
	refused          *prometheus.CounterVec
	loginsRefused    prometheus.Counter
	framesIn         *prometheus.CounterVec
	framesOut        *prometheus.CounterVec
	errors           *prometheus.CounterVec
	receiptSeconds   prometheus.Histogram
}

// latencyBuckets are the buckets of brokerd's latency histograms: 50 µs
// steps up to half a millisecond, where a receipt waiting on one fdatasync
// lands, so that a p50 read from them is within about 25 µs.
var latencyBuckets = []float64{
	0.00005, 0.0001, 0.00015, 0.0002, 0.00025, 0.0003, 0.00035, 0.0004, 0.00045, 0.0005,
	0.0006, 0.0008, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		connections:      prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "brokerd_stomp_connections", Help: "Open STOMP connections, by transport: tcp, tls, ws, wss."}, []string{"transport"}),
		connectionsTotal: prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_stomp_connections_total", Help: "STOMP connections accepted."}),
		refused:          prometheus.NewCounterVec(prometheus.CounterOpts{Name: "brokerd_stomp_connections_refused_total", Help: "STOMP connections refused before CONNECT, by reason: max_connections, max_connections_per_ip, tls (a failed handshake), origin (a WebSocket from a page whose Origin is not allowed)."}, []string{"reason"}),
		loginsRefused:    prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_stomp_logins_refused_total", Help: "CONNECTs refused for a wrong login, passcode or certificate."}),
		framesIn:         prometheus.NewCounterVec(prometheus.CounterOpts{Name: "brokerd_stomp_frames_in_total", Help: "Frames received, by command."}, []string{"command"}),
		framesOut:        prometheus.NewCounterVec(prometheus.CounterOpts{Name: "brokerd_stomp_frames_out_total", Help: "Frames sent, by command."}, []string{"command"}),
		errors:           prometheus.NewCounterVec(prometheus.CounterOpts{Name: "brokerd_stomp_errors_total", Help: "ERROR frames sent, by reason."}, []string{"reason"}),
		receiptSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "brokerd_stomp_receipt_seconds",
			Help:    "From reading a frame that asks for a receipt to writing its RECEIPT to the connection: the broker's share of a client's receipt latency.",
			Buckets: latencyBuckets,
		}),
	}
	for _, t := range []Transport{TransportTCP, TransportTLS, TransportWS, TransportWSS} {
		m.connections.WithLabelValues(t.String()) // every transport shows, at 0
	}
	if reg != nil {
		reg.MustRegister(m.connections, m.connectionsTotal, m.refused, m.loginsRefused, m.framesIn, m.framesOut, m.errors, m.receiptSeconds)
	}
	return m
}
