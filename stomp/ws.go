package stomp

// STOMP over WebSocket (RabbitMQ's Web STOMP): an HTTP server per
// WebSocket listener upgrades GET /ws and hands the connection, wrapped
// as a net.Conn (wsConn), to the same session code as a TCP connection.
//
// Connection slots. A WebSocket connection takes its slot (MaxConnections,
// MaxConnectionsPerIP) when its TCP connection is accepted, before any
// HTTP is read, and gives it back when that TCP connection closes: the
// same accounting as a TCP client, whose slot also covers the time before
// CONNECT. A connection over a cap gets "503 Service Unavailable" (plain
// ws) or is closed (wss), before the handshake.

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
)

// WSPath is the HTTP path of the WebSocket endpoint; other paths get 404.
const WSPath = "/ws"

// wsSubprotocols are the WebSocket subprotocols the server offers, most
// preferred first (the first one the client also asks for is chosen). A
// client that asks for none is served too, as RabbitMQ Web STOMP does.
var wsSubprotocols = []string{"v12.stomp", "v11.stomp", "v10.stomp"}

const (
	// wsMaxHeaderBytes bounds the HTTP request header of a handshake.
	wsMaxHeaderBytes = 32 << 10
	// wsCloseWait bounds the WebSocket closing handshake: the wait for
	// the close frame to be written and for the client's close frame.
	wsCloseWait = time.Second
)

// wsConnKey is the http.Server ConnContext key of the accepted net.Conn
// (a *tls.Conn on a wss listener), which the handshake hijacks.
type wsConnKey struct{}

// wsListener is a WebSocket listener: its own net.Listener, the HTTP
// server upgrading requests on it, and the transport its sessions have.
type wsListener struct {
	ln        net.Listener // the TCP listener
	http      *http.Server
	transport Transport
}

// listenWS binds the WebSocket listener for transport (TransportWS or
// TransportWSS) at addr; serveWS starts serving it.
func (s *Server) listenWS(addr string, transport Transport) (*wsListener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("stomp %s listen: %w", transport, err)
	}
	l := &wsListener{ln: ln, transport: transport}
	l.http = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.handleWS(w, r, transport) }),
		// The handshake is the start of the connection: it is bounded by
		// the connect timeout, and the session's own connect timeout
		// starts after it.
		ReadHeaderTimeout: s.cfg.ConnectTimeout,
		ReadTimeout:       s.cfg.ConnectTimeout,
		WriteTimeout:      s.cfg.WriteTimeout,
		MaxHeaderBytes:    wsMaxHeaderBytes,
		// No HTTP/2: WebSocket upgrades are HTTP/1.1.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, wsConnKey{}, c)
		},
		ErrorLog: slog.NewLogLogger(s.log.With("transport", transport.String()).Handler(), slog.LevelWarn),
	}
	// One request per TCP connection: an upgrade, or a response and the
	// end, so that a connection cannot keep its slot with a stream of
	// plain HTTP requests.
	l.http.SetKeepAlivesEnabled(false)
	return l, nil
}

// serveWS serves l until it is closed; it runs on a goroutine counted in s.wg.
func (s *Server) serveWS(l *wsListener) {
	defer s.wg.Done()
	err := l.http.Serve(&slotListener{Listener: l.ln, srv: s, transport: l.transport})
	if err != nil && !errors.Is(err, http.ErrServerClosed) && !s.closing.Load() {
		s.log.Error("stomp WebSocket listener failed", "transport", l.transport.String(), "err", err)
	}
}

// close stops l: no more connections, and every connection not yet
// upgraded is closed (upgraded ones are sessions, which Shutdown ends).
func (l *wsListener) close() {
	if l != nil {
		_ = l.http.Close()
		_ = l.ln.Close()
	}
}

func (l *wsListener) addr() net.Addr {
	if l == nil {
		return nil
	}
	return l.ln.Addr()
}

// WSAddr is the bound address of the WebSocket listener, or nil without one.
func (s *Server) WSAddr() net.Addr { return s.ws.addr() }

// WSSAddr is the bound address of the secure WebSocket listener, or nil
// without one.
func (s *Server) WSSAddr() net.Addr { return s.wss.addr() }

// slotListener takes a connection slot for every connection it accepts,
// refusing those over MaxConnections or MaxConnectionsPerIP, and wraps a
// wss listener's connections in TLS.
type slotListener struct {
	net.Listener
	srv       *Server
	transport Transport
}

func (l *slotListener) Accept() (net.Conn, error) {
	s := l.srv
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err // http.Server backs off on temporary errors
		}
		ip := remoteIP(c)
		s.mu.Lock()
		if s.closing.Load() {
			s.mu.Unlock()
			c.Close()
			return nil, net.ErrClosed
		}
		reason, detail := s.roomLocked(ip)
		if reason == "" {
			s.takeSlotLocked(ip)
		}
		s.mu.Unlock()
		if reason != "" {
			s.m.refused.WithLabelValues(reason).Inc()
			s.log.Warn("connection refused", "reason", detail, "remote", c.RemoteAddr().String(), "transport", l.transport.String())
			if l.transport == TransportWSS {
				c.Close() // a response would need a TLS handshake first
			} else {
				s.refuseHTTPAsync(c, detail)
			}
			continue
		}
		sc := &slotConn{Conn: c, srv: s, ip: ip}
		if l.transport == TransportWSS {
			return tls.Server(sc, s.cfg.TLS), nil
		}
		return sc, nil
	}
}

// slotConn is an accepted WebSocket listener connection; closing it gives
// its slot back.
type slotConn struct {
	net.Conn
	srv  *Server
	ip   netip.Addr
	once sync.Once
}

func (c *slotConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.srv.mu.Lock()
		c.srv.giveSlotLocked(c.ip)
		c.srv.mu.Unlock()
	})
	return err
}

// CloseWrite lets net/http half-close the connection after a response.
func (c *slotConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// refuseHTTPAsync answers a refused plain WebSocket connection with 503
// on a goroutine of its own while fewer than maxRefusing are refusing,
// else closes it at once. The request is read first (for at most 2 s and
// wsMaxHeaderBytes): an HTTP client takes a response that comes before
// its request for a broken connection.
func (s *Server) refuseHTTPAsync(c net.Conn, detail string) {
	select {
	case s.refusing <- struct{}{}:
	default:
		c.Close()
		return
	}
	go func() {
		defer func() { <-s.refusing }()
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if req, err := http.ReadRequest(bufio.NewReader(io.LimitReader(c, wsMaxHeaderBytes))); err == nil {
			req.Body.Close()
		}
		body := "too many connections: " + detail + "\n"
		_, _ = io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: "+
			strconv.Itoa(len(body))+"\r\n\r\n"+body)
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		drain(c)
	}()
}

// statusRecorder records the status of a refused handshake's response.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

// Unwrap lets websocket.Accept find the http.Hijacker underneath.
func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// handleWS upgrades a request for WSPath and runs the connection's
// session on the handler's goroutine.
func (s *Server) handleWS(w http.ResponseWriter, r *http.Request, transport Transport) {
	if r.URL.Path != WSPath {
		http.NotFound(w, r)
		return
	}
	raw, ok := r.Context().Value(wsConnKey{}).(net.Conn)
	if !ok {
		http.Error(w, "no connection", http.StatusInternalServerError)
		return
	}
	// The handler counts in s.wg from here, so that Shutdown waits for an
	// upgrade in progress; a connection that comes in after Shutdown began
	// is not served.
	s.mu.Lock()
	if s.closing.Load() {
		s.mu.Unlock()
		http.Error(w, "server shutting down", http.StatusServiceUnavailable)
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()

	rec := &statusRecorder{ResponseWriter: w}
	var c *wsConn // set before the session reads, so before any ping
	ws, err := websocket.Accept(rec, r, &websocket.AcceptOptions{
		Subprotocols:   wsSubprotocols,
		OriginPatterns: s.cfg.WSAllowedOrigins,
		// The pong is written outside the session's writer, whose write
		// deadline may have passed long ago on an idle session: give it
		// a deadline of its own (a later one than the writer's).
		OnPingReceived: func(context.Context, []byte) bool {
			_ = c.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
			return true
		},
	})
	if err != nil {
		if rec.status == http.StatusForbidden {
			s.m.refused.WithLabelValues("origin").Inc()
			s.log.Warn("connection refused", "reason", "WebSocket Origin not allowed (stomp.ws_allowed_origins)",
				"origin", r.Header.Get("Origin"), "remote", r.RemoteAddr, "transport", transport.String())
		} else {
			s.log.Info("WebSocket handshake refused", "status", rec.status, "remote", r.RemoteAddr, "transport", transport.String(), "err", err)
		}
		return
	}
	// A message may not be larger than a frame may be.
	ws.SetReadLimit(int64(fioNormalizeLimits(s.cfg.Limits).MaxFrameSize))
	c = newWSConn(ws, raw, &s.wg)

	ip := remoteIP(raw)
	s.mu.Lock()
	if s.closing.Load() {
		s.mu.Unlock()
		c.Close()
		return
	}
	sess := newSession(s, c, "session-"+strconv.FormatUint(s.nextID.Add(1), 10))
	sess.ip = ip
	sess.transport = transport
	s.sessions[sess] = struct{}{}
	s.mu.Unlock()
	s.m.connections.WithLabelValues(transport.String()).Inc()
	s.m.connectionsTotal.Inc()
	sess.run()
	s.mu.Lock()
	delete(s.sessions, sess)
	s.mu.Unlock()
	s.m.connections.WithLabelValues(transport.String()).Dec()
	// The slot goes back when the TCP connection closes (slotConn).
}

// wsConn is a WebSocket connection carrying STOMP, as a net.Conn: reads
// return the bytes of the messages received, of either type, streamed and
// with message boundaries ignored (one frame or several per message, or a
// frame split over several); each Write is sent as one message (several
// of at most wsMaxMessage for a larger one), a text message when it is
// valid UTF-8 and a binary one otherwise. Deadlines
// are those of the underlying connection; unlike websocket.NetConn, a
// deadline does not close the connection, so the session can still write
// its ERROR after a read deadline (heart-beat timeout, shutdown).
type wsConn struct {
	ws  *websocket.Conn
	raw net.Conn // the connection under ws, for deadlines and addresses
	// closeWG, when set, counts a goroutine that Close starts to run the
	// closing handshake, so that Close returns at once; when nil, Close
	// waits for the handshake (at most wsCloseWait).
	closeWG *sync.WaitGroup
	closing atomic.Bool

	rmu sync.Mutex
	msg io.Reader // the message being read, under rmu
	// eof is set once the peer closed the WebSocket, under rmu.
	eof bool
}

var _ net.Conn = (*wsConn)(nil)

func newWSConn(ws *websocket.Conn, raw net.Conn, closeWG *sync.WaitGroup) *wsConn {
	return &wsConn{ws: ws, raw: raw, closeWG: closeWG}
}

// Read reads from the current message, going on to the next one at its
// end. A normal close from the peer is io.EOF.
func (c *wsConn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for {
		if c.closing.Load() {
			return 0, net.ErrClosed
		}
		if c.eof {
			return 0, io.EOF
		}
		if c.msg == nil {
			_, r, err := c.ws.Reader(context.Background())
			if err != nil {
				return 0, c.readErr(err)
			}
			c.msg = r
		}
		n, err := c.msg.Read(p)
		if errors.Is(err, io.EOF) {
			c.msg = nil
			err = nil
		}
		if err != nil {
			return n, c.readErr(err)
		}
		if n > 0 || len(p) == 0 {
			return n, nil
		}
	}
}

// readErr turns coder/websocket's read errors into what a net.Conn
// returns: io.EOF for a normal close, the deadline error for a timeout.
func (c *wsConn) readErr(err error) error {
	switch websocket.CloseStatus(err) {
	case websocket.StatusNormalClosure, websocket.StatusGoingAway:
		c.eof = true
		return io.EOF
	}
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return os.ErrDeadlineExceeded
	case c.closing.Load() || errors.Is(err, net.ErrClosed):
		return net.ErrClosed
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		// The TCP connection ended without a close frame: as a TCP
		// client's end (the frame reader tells a frame cut short).
		c.eof = true
		return io.EOF
	}
	return fmt.Errorf("websocket read: %w", err)
}

// wsMaxMessage bounds the messages Write sends. A pong (answering the
// client's ping) waits for the message being written, and coder/websocket
// gives it 5 s before it fails the read side: a large write to a slow
// client is cut so that the pong goes out between two pieces.
const wsMaxMessage = 64 << 10

// Write sends p as one message, or as messages of at most wsMaxMessage
// bytes cut at the start of a UTF-8 sequence; each is text when it is
// valid UTF-8, else binary.
func (c *wsConn) Write(p []byte) (int, error) {
	if c.closing.Load() {
		return 0, net.ErrClosed
	}
	n := 0
	for len(p) > 0 {
		k := len(p)
		if k > wsMaxMessage {
			k = wsMaxMessage
			for i := 0; i < utf8.UTFMax-1 && !utf8.RuneStart(p[k]); i++ {
				k--
			}
		}
		typ := websocket.MessageText
		if !utf8.Valid(p[:k]) {
			typ = websocket.MessageBinary
		}
		if err := c.ws.Write(context.Background(), typ, p[:k]); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return n, os.ErrDeadlineExceeded
			}
			return n, fmt.Errorf("websocket write: %w", err)
		}
		n += k
		p = p[k:]
	}
	return n, nil
}

// Close sends a close frame (normal closure) and closes the connection
// once the peer answers it, or after wsCloseWait.
func (c *wsConn) Close() error {
	if !c.closing.CompareAndSwap(false, true) {
		return nil
	}
	// Bound the closing handshake, and wake a reader or a writer blocked
	// on the connection so that it lets go of it.
	_ = c.raw.SetDeadline(time.Now().Add(wsCloseWait))
	if c.closeWG == nil {
		if err := c.ws.Close(websocket.StatusNormalClosure, ""); err != nil && !errors.Is(err, net.ErrClosed) {
			return fmt.Errorf("websocket close: %w", err)
		}
		return nil
	}
	c.closeWG.Add(1)
	go func() {
		defer c.closeWG.Done()
		_ = c.ws.Close(websocket.StatusNormalClosure, "")
	}()
	return nil
}

func (c *wsConn) LocalAddr() net.Addr  { return c.raw.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr { return c.raw.RemoteAddr() }

// SetDeadline sets the underlying connection's deadlines, unless the
// connection is closing (Close bounds the closing handshake with them).
func (c *wsConn) SetDeadline(t time.Time) error {
	if c.closing.Load() {
		return nil
	}
	return c.raw.SetDeadline(t)
}

// SetReadDeadline: see SetDeadline. A read that times out leaves the
// connection open for writing; reading from it again is not supported.
func (c *wsConn) SetReadDeadline(t time.Time) error {
	if c.closing.Load() {
		return nil
	}
	return c.raw.SetReadDeadline(t)
}

// SetWriteDeadline: see SetDeadline.
func (c *wsConn) SetWriteDeadline(t time.Time) error {
	if c.closing.Load() {
		return nil
	}
	return c.raw.SetWriteDeadline(t)
}

// ConnectionState is the TLS state of a wss connection (the client
// certificate, for x509 login); the zero value over plain ws.
func (c *wsConn) ConnectionState() tls.ConnectionState {
	if tc, ok := c.raw.(*tls.Conn); ok {
		return tc.ConnectionState()
	}
	return tls.ConnectionState{}
}

// Subprotocol is the negotiated WebSocket subprotocol ("" for none).
func (c *wsConn) Subprotocol() string { return c.ws.Subprotocol() }

// DialWebSocket opens a STOMP over WebSocket connection to url
// (ws://host:port/ws, or wss:// with tlsCfg, nil meaning the system's
// roots), offering wsSubprotocols, and returns it as a net.Conn that
// behaves like the server's side: reads ignore message boundaries and
// types, each Write is one message (text when valid UTF-8, else binary),
// deadlines work, and Close sends a close frame and waits for the answer
// (at most a second). header is added to the handshake request (Origin,
// for one). One incoming message may have up to 64 MiB. It is for Go
// clients and tests: go-stomp's stomp.Connect takes the net.Conn.
func DialWebSocket(ctx context.Context, url string, tlsCfg *tls.Config, header http.Header) (net.Conn, error) {
	// The connection the handshake ends on is the last one dialed: a
	// redirect dials again (keep-alives are off).
	var rawMu sync.Mutex
	var last net.Conn
	record := func(c net.Conn) {
		rawMu.Lock()
		last = c
		rawMu.Unlock()
	}
	var d net.Dialer
	tr := &http.Transport{
		Proxy:             nil,
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := d.DialContext(ctx, network, addr)
			if err == nil {
				record(c)
			}
			return c, err
		},
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			cfg := &tls.Config{}
			if tlsCfg != nil {
				cfg = tlsCfg.Clone()
			}
			if cfg.ServerName == "" {
				cfg.ServerName, _, _ = net.SplitHostPort(addr)
			}
			cfg.NextProtos = []string{"http/1.1"}
			td := tls.Dialer{NetDialer: &d, Config: cfg}
			c, err := td.DialContext(ctx, network, addr)
			if err == nil {
				record(c)
			}
			return c, err
		},
	}
	ws, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPClient:   &http.Client{Transport: tr},
		HTTPHeader:   header,
		Subprotocols: wsSubprotocols,
	})
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("websocket dial %s: status %d: %w", url, resp.StatusCode, err)
		}
		return nil, fmt.Errorf("websocket dial %s: %w", url, err)
	}
	ws.SetReadLimit(64 << 20)
	rawMu.Lock()
	raw := last
	rawMu.Unlock()
	if raw == nil {
		ws.CloseNow()
		return nil, fmt.Errorf("websocket dial %s: no connection", url)
	}
	return newWSConn(ws, raw, nil), nil
}
