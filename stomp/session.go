package stomp

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/go-stomp/stomp/v3/frame"
)

// supportedVersions are the STOMP versions this server speaks, highest last.
var supportedVersions = []string{"1.0", "1.1", "1.2"}

// protocolError is a client mistake: it is answered by an ERROR frame whose
// message header is msg, then the connection closes.
type protocolError struct {
	msg    string // short, for the message header
	detail string // longer, for the body
	reason string // metrics label
	header []string
}

func (e *protocolError) Error() string { return e.msg + ": " + e.detail }

func perr(reason, msg, detail string, args ...any) *protocolError {
	return &protocolError{msg: msg, detail: fmt.Sprintf(detail, args...), reason: reason}
}

// session is one client connection.
type session struct {
	srv     *Server
	conn    net.Conn
	id      string
	r       *frameReader
	version string // negotiated; "1.0" until CONNECT
	// user is who the session logged in as: the CONNECT's login, or the
	// client certificate's subject CN with auth.x509_login; "" for an
	// anonymous session. Set by connect, read by the reader goroutine.
	user string
	ip   netip.Addr // the remote address (zero for a pipe)
	// transport is the listener the connection came in on.
	transport Transport
	// frameRead is when the reader read the frame it handles, if that
	// frame asks for a receipt (reader goroutine only).
	frameRead time.Time

	// owned by the reader goroutine
	subs     map[string]*sub
	txs      map[string]*transaction
	txFrames int
	txBytes  int64 // frameBytes of the frames in open transactions
	subIndex uint64
	subByIdx map[uint64]*sub
	dirty    bool // an Apply since the last synced one was not synced

	// seq orders receipts and errors: frames' effects in frame order,
	// each emitted by whichever goroutine completes the op at the head
	// (the reader, or the store's completion callback), with no goroutine
	// of its own in between.
	seq sequencer

	// outbound, guarded by outMu; written by the writer goroutine
	outMu     sync.Mutex
	out       []outItem
	outClosed bool
	outSignal chan struct{}

	// outBytes counts the bytes of the frames queued for the writer and
	// not yet written, plus those the reader reserved for RECEIPTs still
	// to come. The reader waits for it to fit under MaxOutgoingBytes before
	// handling a frame; MESSAGE frames do not count (see outItem.n).
	outBytes   atomic.Int64
	outWaiting atomic.Bool   // the reader waits for room
	outRoom    chan struct{} // signalled when outBytes drops, or on shutdown

	readTimeout   time.Duration
	writeInterval atomic.Int64 // heart-beat send interval in ns, set at CONNECT
	stopping      atomic.Bool
	writerDone    chan struct{}
}

type sub struct {
	id     string
	idx    uint64
	dest   string
	mode   replica.AckMode
	rs     replica.Sub
	closed atomic.Bool
}

type transaction struct {
	batch replica.Batch
	bytes int64 // frameBytes of its SENDs, ACKs and NACKs
}

// pendingOp is a frame's effect as the sequencer sees it.
type pendingOp struct {
	waits   bool // an effect completes later, through session.finish
	receipt string
	read    time.Time // when the frame asking for receipt was read
	errFr   *frame.Frame
	final   bool // close the connection after this op

	// guarded by sequencer.mu
	complete bool
	err      error
}

// maxPendingOps bounds the frames whose effects are in progress on one
// connection; the reader waits beyond it.
const maxPendingOps = 1024

// sequencer is the queue of a connection's ops in frame order.
type sequencer struct {
	mu     sync.Mutex
	cond   sync.Cond // signalled when the queue shrinks
	q      []*pendingOp
	failed bool
}

type outItem struct {
	f   *frame.Frame
	sub *sub
	d   replica.Delivery
	end bool // flush and close the connection (after f, if set)
	// n is what the item counts in session.outBytes, released once it is
	// written (or dropped). MESSAGE frames count 0: they cannot wait, as
	// the replica hands them over holding a lock, and their number is
	// bounded by its write window; their bodies are held by the replica
	// until written or acknowledged anyway.
	n int64
	// read is when the frame this RECEIPT answers was read (zero for
	// other items), for brokerd_stomp_receipt_seconds.
	read time.Time
	// closeSub closes a subscription once everything queued before it is
	// written; closed then gets the outcome of a store barrier after it.
	closeSub *sub
	closed   func(error)
}

// closeSub closes a subscription (UNSUBSCRIBE): its unacknowledged
// messages go back, marked redelivered, without counting toward
// queue.max_redeliveries. Return submits its store writes (the marks)
// without a sync; when done is set (an UNSUBSCRIBE waits), a barrier then
// makes them durable before done is signalled, so that the receipt covers
// them.
func (s *session) closeSub(sb *sub, done func(error)) {
	sb.closed.Store(true)
	sb.rs.Return()
	if done != nil {
		s.srv.broker.Barrier(done)
	}
}

func newSession(srv *Server, c net.Conn, id string) *session {
	s := &session{
		srv:        srv,
		conn:       c,
		id:         id,
		version:    "1.0",
		subs:       make(map[string]*sub),
		txs:        make(map[string]*transaction),
		subByIdx:   make(map[uint64]*sub),
		outSignal:  make(chan struct{}, 1),
		outRoom:    make(chan struct{}, 1),
		writerDone: make(chan struct{}),
	}
	s.r = newFrameReader(idleReader{s}, srv.cfg.Limits)
	s.seq.cond.L = &s.seq.mu
	return s
}

// idleReader extends the read deadline on every read, so that any data
// from the client counts as a sign of life, as the heart-beat rules say,
// and a large frame arriving slowly is not cut off.
type idleReader struct{ s *session }

func (r idleReader) Read(p []byte) (int, error) {
	s := r.s
	if s.readTimeout > 0 && !s.stopping.Load() {
		_ = s.conn.SetReadDeadline(time.Now().Add(s.readTimeout))
		if s.stopping.Load() {
			_ = s.conn.SetReadDeadline(time.Now())
		}
	}
	return s.conn.Read(p)
}

// deadlineWriter keeps a write deadline in force for every write to the
// connection, so that WriteTimeout bounds each write however long the
// connection was idle before it: a frame larger than the write buffer is
// written during WriteFrame, not only at the flush. It re-arms the
// deadline only once an eighth of it has passed, so a burst of writes
// costs one SetWriteDeadline; each write starts with at least 7/8 of
// WriteTimeout ahead of it.
type deadlineWriter struct {
	c        net.Conn
	d        time.Duration
	deadline time.Time
}

func (w *deadlineWriter) Write(p []byte) (int, error) {
	if now := time.Now(); w.deadline.Sub(now) < w.d-w.d/8 {
		w.deadline = now.Add(w.d)
		_ = w.c.SetWriteDeadline(w.deadline)
	}
	return w.c.Write(p)
}

// shutdown makes the reader stop at its next read; the session then ends
// the usual way, after the receipts of earlier frames.
func (s *session) shutdown() {
	s.stopping.Store(true)
	_ = s.conn.SetReadDeadline(time.Now())
	select {
	case s.outRoom <- struct{}{}: // wake a reader waiting for room
	default:
	}
}

func (s *session) run() {
	log := s.srv.log.With("session", s.id, "remote", s.conn.RemoteAddr().String())
	go s.writeLoop()

	err := s.readLoop()
	var pe *protocolError
	isPE := errors.As(err, &pe)
	// Read once: an undrain may clear it at any moment.
	drainErr := s.srv.drainRefusal()
	switch {
	case isPE:
		s.srv.m.errors.WithLabelValues(pe.reason).Inc()
		log.Info("protocol error", "err", pe.Error())
		s.push(&pendingOp{errFr: errorFrame(pe), final: true})
	case err != nil && s.stopping.Load() && drainErr != nil:
		s.push(&pendingOp{errFr: errorFrame(drainErr), final: true})
	case err != nil && s.stopping.Load():
		s.push(&pendingOp{errFr: errorFrame(perr("shutdown", "server shutting down", "the server is shutting down; reconnect to another node")), final: true})
	case err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed):
		log.Debug("connection ended", "err", err)
	}
	s.waitOps()
	s.enqueue(outItem{end: true})
	<-s.writerDone
	// Only now, with every flushed delivery recorded as written, return
	// the client's unacknowledged messages to their queues; the writer
	// dropped anything it had not written. A connection the client lost
	// (closed or reset without DISCONNECT, silent past its heart-beat, or
	// too slow to take its frames) counts a failed delivery of each
	// toward queue.max_redeliveries, as a NACK does: that is how a
	// message that crashes its consumers ends in the dead-letter queue.
	// One the client ended with DISCONNECT, or the broker ended with an
	// ERROR (a refused or malformed frame, a shutdown, a drain), only
	// marks them redelivered.
	failed := err != nil && !s.stopping.Load() && (!isPE || pe.reason == "heart-beat")
	for _, sb := range s.subs {
		sb.closed.Store(true)
		if failed {
			sb.rs.Close()
		} else {
			sb.rs.Return()
		}
	}
	if isPE {
		// Closing a socket with unread input sends a reset, which can
		// destroy the ERROR frame before the client reads it.
		drain(s.conn)
	}
	s.conn.Close()
}

// readLoop handles frames until DISCONNECT, an error, or shutdown.
func (s *session) readLoop() error {
	cfg := &s.srv.cfg
	_ = s.conn.SetReadDeadline(time.Now().Add(cfg.ConnectTimeout))
	var f *frame.Frame
	for f == nil {
		var err error
		if f, err = s.readFrame(); err != nil {
			return err
		}
	}
	if err := s.connect(f); err != nil {
		return err
	}
	if s.readTimeout == 0 {
		// No heart-beats: lift the CONNECT deadline. Otherwise idleReader
		// extends the deadline on every read.
		_ = s.conn.SetReadDeadline(time.Time{})
	}
	for {
		if s.stopping.Load() {
			return net.ErrClosed
		}
		f, err := s.readFrame()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && !s.stopping.Load() {
				return perr("heart-beat", "heart-beat timeout", "no frame or heart-beat received for %v", s.readTimeout)
			}
			return err
		}
		if f == nil {
			continue // heart-beat
		}
		// Back-pressure: room for what this frame will make the server
		// send, before handling it. While the client does not read, its
		// frames stay in the socket, and TCP pushes back on it.
		r := f.Header.Get(frame.Receipt)
		if r != "" {
			s.frameRead = time.Now()
		}
		need := receiptBytes(r)
		if f.Command == frame.UNSUBSCRIBE {
			need += closeSubBytes
		}
		if err := s.reserve(need); err != nil {
			return err
		}
		done, err := s.handle(f)
		if err != nil {
			s.release(need)
			var pe *protocolError
			if errors.As(err, &pe) {
				if r != "" {
					pe.header = append(pe.header, frame.ReceiptId, r)
				}
			}
			return err
		}
		if done {
			return nil
		}
	}
}

// readFrame reads a frame, turning a malformed one into a protocolError.
// It returns a nil frame for a heart-beat.
func (s *session) readFrame() (*frame.Frame, error) {
	f, err := s.r.ReadFrame(s.version)
	if err != nil {
		for _, e := range []error{ErrFrameTooLarge, ErrBodyTooLarge, ErrTooManyHeaders, ErrHeaderTooLong,
			ErrBadEscape, ErrMalformedFrame, ErrUnknownCommand, ErrBadContentLength} {
			if errors.Is(err, e) {
				return nil, perr("malformed", e.Error(), "%v", err)
			}
		}
		return nil, err
	}
	if f != nil {
		s.srv.m.framesIn.WithLabelValues(f.Command).Inc()
	}
	return f, nil
}

func errorFrame(pe *protocolError) *frame.Frame {
	f := frame.New(frame.ERROR, frame.Message, pe.msg)
	for i := 0; i+1 < len(pe.header); i += 2 {
		f.Header.Add(pe.header[i], pe.header[i+1])
	}
	f.Header.Add(frame.ContentType, "text/plain")
	f.Body = []byte(pe.detail)
	return f
}

// negotiate picks the highest version in the accept-version list.
func negotiate(accept string) (string, bool) {
	if accept == "" {
		return "1.0", true
	}
	best := ""
	for _, v := range strings.Split(accept, ",") {
		v = strings.TrimSpace(v)
		for _, sv := range supportedVersions {
			if v == sv && v > best {
				best = v
			}
		}
	}
	return best, best != ""
}

func (s *session) connect(f *frame.Frame) error {
	cfg := &s.srv.cfg
	if f.Command != frame.CONNECT && f.Command != frame.STOMP {
		return perr("not-connected", "not connected", "the first frame must be CONNECT or STOMP, got %s", f.Command)
	}
	v, ok := negotiate(f.Header.Get(frame.AcceptVersion))
	if !ok {
		pe := perr("version", "unsupported protocol version", "Supported protocol versions are %s", strings.Join(supportedVersions, " "))
		pe.header = []string{frame.Version, strings.Join(supportedVersions, ",")}
		return pe
	}
	s.version = v
	if pe := s.srv.drainRefusal(); pe != nil {
		return pe
	}
	// host names a virtual host. There is one: any value, and none (which
	// stomp.py sends by default despite 1.1 and 1.2 requiring it), selects
	// it, as the specification allows a server to.
	login, passcode := f.Header.Get(frame.Login), f.Header.Get(frame.Passcode)
	if cn := s.certCN(); cfg.X509Login && cn != "" && (login == "" || login == cn) && passcode == "" {
		// The certificate is the credential (auth.x509_login).
		s.user = cn
	} else if cfg.Auth != nil {
		if err := s.authenticate(login, passcode); err != nil {
			return err
		}
		s.user = login
	} else {
		s.user = login
	}
	var sx, sy time.Duration // what we send / expect, 0 = none
	if v != "1.0" {
		if hb, ok := f.Header.Contains(frame.HeartBeat); ok {
			cx, cy, err := frame.ParseHeartBeat(hb)
			if err != nil {
				return perr("bad-header", "invalid heart-beat header", "heart-beat %q: want two comma-separated non-negative integers", hb)
			}
			// What the client asks for, down to HeartbeatMin. Stating
			// sx >= cy and sy >= cx in CONNECTED makes the periods the
			// spec derives, MAX(sx,cy) and MAX(cx,sy), exactly sx and sy.
			if cy > 0 && cfg.HeartbeatSend > 0 {
				sx = max(cy, cfg.HeartbeatMin)
			}
			if cx > 0 && cfg.HeartbeatReceive > 0 {
				sy = max(cx, cfg.HeartbeatMin)
			}
		}
	}
	s.writeInterval.Store(int64(sx))
	if sy > 0 {
		// Tolerate a late heart-beat: the spec leaves the margin to us.
		s.readTimeout = 2*sy + time.Second
	}
	c := frame.New(frame.CONNECTED, frame.Version, v, frame.Session, s.id, frame.Server, cfg.ServerName)
	if v != "1.0" {
		c.Header.Add(frame.HeartBeat, strconv.FormatInt(sx.Milliseconds(), 10)+","+strconv.FormatInt(sy.Milliseconds(), 10))
	}
	if cfg.Nodes != nil {
		// CONNECTED's headers are not escaped: a value with a line end
		// could not be written, and the client would get no answer.
		if nodes := cfg.Nodes(s.transport); nodes != "" && !strings.ContainsAny(nodes, "\r\n") {
			c.Header.Add(HeaderNodes, nodes)
		}
	}
	s.enqueueFrame(c, false)
	return nil
}

// certCN is the subject CN of the client certificate TLS verified, or "".
// The connection is a *tls.Conn, or a wsConn over one (wss).
func (s *session) certCN() string {
	tc, ok := s.conn.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return ""
	}
	st := tc.ConnectionState()
	if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return ""
	}
	return st.VerifiedChains[0][0].Subject.CommonName
}

// authenticate checks a login and passcode with the server's
// Authenticator, one of at most MaxLoginChecks at a time (bcrypt takes a
// core for tens of milliseconds). A refused login waits longer the more
// logins that address got wrong recently before its ERROR, and is logged
// with the remote address (never the passcode).
func (s *session) authenticate(login, passcode string) error {
	cfg := &s.srv.cfg
	wait := time.NewTimer(cfg.ConnectTimeout)
	defer wait.Stop()
	select {
	case s.srv.authSlots <- struct{}{}:
	case <-wait.C:
		s.srv.log.Warn("login refused", "session", s.id, "login", login, "remote", s.conn.RemoteAddr().String(), "reason", "server busy checking other logins")
		return perr("busy", "server busy", "too many logins are being checked; retry later")
	}
	err := cfg.Auth.Authenticate(login, passcode)
	<-s.srv.authSlots
	if err == nil {
		return nil
	}
	s.srv.m.loginsRefused.Inc()
	d := s.srv.logins.failed(s.ip)
	s.srv.log.Warn("login refused", "session", s.id, "login", login, "remote", s.conn.RemoteAddr().String(), "delay", d)
	// Sleep in steps, so that a shutdown is not held up.
	for end := time.Now().Add(d); !s.stopping.Load() && time.Now().Before(end); {
		time.Sleep(min(100*time.Millisecond, time.Until(end)))
	}
	return perr("auth", "access refused", "login or passcode is wrong")
}

// handle applies one frame. It returns done after DISCONNECT.
func (s *session) handle(f *frame.Frame) (bool, error) {
	switch f.Command {
	case frame.SEND:
		return false, s.send(f)
	case frame.SUBSCRIBE:
		return false, s.subscribe(f)
	case frame.UNSUBSCRIBE:
		return false, s.unsubscribe(f)
	case frame.ACK, frame.NACK:
		return false, s.ack(f)
	case frame.BEGIN, frame.COMMIT, frame.ABORT:
		return false, s.tx(f)
	case frame.DISCONNECT:
		s.receipt(f.Header.Get(frame.Receipt), true)
		return true, nil
	case frame.CONNECT, frame.STOMP:
		return false, perr("protocol", "already connected", "%s received on a connected session", f.Command)
	default:
		return false, perr("protocol", "unexpected frame", "%s is not a client frame", f.Command)
	}
}

// complete queues an already-complete effect, for its receipt. A receipt
// promises that earlier SENDs are on disk: if some were not synced, it
// waits for a store barrier.
func (s *session) complete(f *frame.Frame) {
	s.receipt(f.Header.Get(frame.Receipt), false)
}

func (s *session) receipt(r string, final bool) {
	if r == "" && !final {
		return
	}
	op := &pendingOp{receipt: r, final: final}
	if s.dirty && r != "" {
		s.dirty = false
		op.waits = true
		s.srv.broker.Barrier(func(err error) { s.finish(op, err) })
	}
	s.push(op)
}

// apply hands b to the broker. Frames with a receipt are synced; others
// are not, and the next receipt on this connection syncs them.
func (s *session) apply(f *frame.Frame, b *replica.Batch) error {
	op := &pendingOp{waits: true, receipt: f.Header.Get(frame.Receipt)}
	b.Sync = op.receipt != ""
	if err := s.srv.broker.Apply(b, func(err error) { s.finish(op, err) }); err != nil {
		return s.refused(f, err)
	}
	s.dirty = !b.Sync
	s.push(op)
	return nil
}

// asyncError is the ERROR for an effect that failed after it was
// accepted: the outcome of the frame is unknown to the client.
func asyncError(err error) *protocolError {
	switch {
	case errors.Is(err, replica.ErrNoQuorum):
		return perr("no-quorum", "not enough replicas",
			"the message could not be stored on enough replicas (replica.write_quorum); its outcome is unknown: it may or may not be delivered (%v)", err)
	case errors.Is(err, replica.ErrQueueFull):
		return perr("queue-full", "queue full", "%v", err)
	case errors.Is(err, replica.ErrLowDisk):
		return perr("low-disk", "broker low on disk space", "%v", err)
	case errors.Is(err, replica.ErrUnknownAck), errors.Is(err, replica.ErrSubscriptionClosed):
		return perr("ack", "unknown message", "%v", err)
	}
	return perr("internal", "internal error", "the server could not store a frame's effect: %v", err)
}

func brokerError(f *frame.Frame, err error) error {
	switch {
	case errors.Is(err, replica.ErrBadDestination):
		return perr("destination", "invalid destination", "%s: %v", f.Command, err)
	case errors.Is(err, replica.ErrUnknownAck), errors.Is(err, replica.ErrSubscriptionClosed):
		return perr("ack", "unknown message", "%s: %v", f.Command, err)
	case errors.Is(err, replica.ErrQueueFull):
		// The wrapped error names the queue and the limit it is at.
		return perr("queue-full", "queue full", "%v", err)
	case errors.Is(err, replica.ErrLowDisk):
		return perr("low-disk", "broker low on disk space",
			"the broker refuses new messages until free disk space returns; consumers can still receive and acknowledge (%v)", err)
	case errors.Is(err, replica.ErrNoQuorum):
		return perr("no-quorum", "not enough replicas", "%s: %v", f.Command, err)
	}
	return perr("internal", "internal error", "%s: %v", f.Command, err)
}

func required(f *frame.Frame, name string) (string, error) {
	v, ok := f.Header.Contains(name)
	if !ok || v == "" {
		return "", perr("missing-header", "missing "+name+" header", "%s requires a %s header", f.Command, name)
	}
	return v, nil
}

// transportHeaders are not copied from SEND to MESSAGE.
var transportHeaders = map[string]bool{
	frame.Destination: true, frame.Receipt: true, frame.Transaction: true, frame.ContentLength: true,
	frame.MessageId: true, frame.Subscription: true, frame.Ack: true, "redelivered": true, "x-delivery-count": true,
}

func (s *session) send(f *frame.Frame) error {
	dest, err := required(f, frame.Destination)
	if err != nil {
		return err
	}
	// Checked now, in a transaction too: the refused SEND gets the ERROR.
	noCreate, err := s.authorize(f, PermWrite, dest)
	if err != nil {
		return err
	}
	m := &replica.Message{Dest: dest, Body: f.Body, NoCreate: noCreate}
	n := f.Header.Len()
	m.Headers = make([]string, 0, 2*n)
	for i := 0; i < n; i++ {
		k, v := f.Header.GetAt(i)
		if transportHeaders[k] {
			continue
		}
		if _, dup := m.Header(k); dup {
			continue // repeated headers: the first one wins
		}
		m.Headers = append(m.Headers, k, v)
	}
	if e, ok := f.Header.Contains("expires"); ok && e != "" {
		ms, err := strconv.ParseInt(e, 10, 64)
		if err != nil || ms < 0 {
			return perr("bad-header", "invalid expires header", "expires %q: want milliseconds since the epoch", e)
		}
		m.Expires = ms
	}
	if txID, ok := f.Header.Contains(frame.Transaction); ok {
		// Apply validates the destination; a transaction's SEND is
		// refused now, not at COMMIT.
		if _, err := replica.ParseDestination(dest); err != nil {
			return brokerError(f, err)
		}
		t, err := s.transaction(f, txID, frameBytes(f))
		if err != nil {
			return err
		}
		t.batch.Sends = append(t.batch.Sends, m)
		s.complete(f)
		return nil
	}
	return s.apply(f, &replica.Batch{Sends: []*replica.Message{m}})
}

func (s *session) subscribe(f *frame.Frame) error {
	cfg := &s.srv.cfg
	dest, err := required(f, frame.Destination)
	if err != nil {
		return err
	}
	noCreate, err := s.authorize(f, PermRead, dest)
	if err != nil {
		return err
	}
	id := f.Header.Get(frame.Id)
	if id == "" {
		if s.version != "1.0" {
			return perr("missing-header", "missing id header", "SUBSCRIBE requires an id header")
		}
		id = dest
	}
	if _, dup := s.subs[id]; dup {
		return perr("subscription", "duplicate subscription id", "subscription %q already exists on this connection", id)
	}
	if cfg.MaxSubscriptions > 0 && len(s.subs) >= cfg.MaxSubscriptions {
		return perr("limit", "too many subscriptions", "at most %d subscriptions per connection", cfg.MaxSubscriptions)
	}
	mode, ok := replica.ParseAckMode(f.Header.Get(frame.Ack))
	if !ok {
		return perr("bad-header", "invalid ack header", "ack %q: want auto, client or client-individual", f.Header.Get(frame.Ack))
	}
	prefetch := 0
	for _, h := range []string{"prefetch-count", "activemq.prefetchSize"} {
		if v, ok := f.Header.Contains(h); ok {
			p, err := strconv.Atoi(v)
			if err != nil || p < 0 {
				return perr("bad-header", "invalid "+h+" header", "%s %q: want a non-negative integer", h, v)
			}
			prefetch = p
			break
		}
	}
	s.subIndex++
	sb := &sub{id: id, idx: s.subIndex, dest: dest, mode: mode}
	rs, err := s.srv.broker.Subscribe(replica.SubOptions{
		Dest: dest, Ack: mode, Prefetch: prefetch,
		ByMessageID: s.version != "1.2", // 1.0 and 1.1 acknowledge by message-id
		Deliver:     func(d replica.Delivery) { s.enqueue(outItem{sub: sb, d: d}) },
		NoCreate:    noCreate,
	})
	if err != nil {
		return s.refused(f, err)
	}
	sb.rs = rs
	s.subs[id] = sb
	s.subByIdx[sb.idx] = sb
	s.complete(f)
	return nil
}

func (s *session) unsubscribe(f *frame.Frame) error {
	id := f.Header.Get(frame.Id)
	if id == "" && s.version == "1.0" {
		id = f.Header.Get(frame.Destination)
	}
	if id == "" {
		return perr("missing-header", "missing id header", "UNSUBSCRIBE requires an id header")
	}
	sb := s.subs[id]
	if sb == nil {
		return perr("subscription", "unknown subscription", "no subscription %q on this connection", id)
	}
	delete(s.subs, id)
	delete(s.subByIdx, sb.idx)
	// The writer closes the subscription once what it holds is written,
	// then issues a store barrier; the receipt waits for that. The barrier
	// comes after every earlier Apply of this connection too, so no other
	// is needed for them.
	op := &pendingOp{waits: true}
	s.enqueue(outItem{closeSub: sb, closed: func(err error) { s.finish(op, err) }, n: closeSubBytes}) // reserved by readLoop
	s.push(op)
	s.dirty = false
	s.complete(f)
	return nil
}

// ackToken is the ack header of a MESSAGE: subscription index and tag.
func ackToken(sb *sub, tag uint64) string {
	return strconv.FormatUint(sb.idx, 10) + "." + strconv.FormatUint(tag, 10)
}

// resolveAck finds the subscription and delivery an ACK or NACK names.
func (s *session) resolveAck(f *frame.Frame) (*sub, uint64, error) {
	unknown := func(what string) error {
		return perr("ack", "unknown message", "%s: %s does not name an outstanding message of this connection", f.Command, what)
	}
	if s.version == "1.2" {
		id, err := required(f, frame.Id)
		if err != nil {
			return nil, 0, err
		}
		a, b, ok := strings.Cut(id, ".")
		idx, err1 := strconv.ParseUint(a, 10, 64)
		tag, err2 := strconv.ParseUint(b, 10, 64)
		if !ok || err1 != nil || err2 != nil || s.subByIdx[idx] == nil {
			return nil, 0, unknown("id " + strconv.Quote(id))
		}
		return s.subByIdx[idx], tag, nil
	}
	msgID, err := required(f, frame.MessageId)
	if err != nil {
		return nil, 0, err
	}
	// 1.1 requires the subscription header. In 1.0 (whose ACK has none,
	// and whose NACK is an extension) it is optional: it narrows the
	// search when it names a subscription of this connection.
	subID := f.Header.Get(frame.Subscription)
	if s.version == "1.1" || s.subs[subID] != nil {
		if subID == "" {
			return nil, 0, perr("missing-header", "missing subscription header", "%s requires a subscription header", f.Command)
		}
		sb := s.subs[subID]
		if sb == nil {
			return nil, 0, unknown("subscription " + strconv.Quote(subID))
		}
		if tag, ok := sb.rs.TagOf(msgID); ok {
			return sb, tag, nil
		}
		return nil, 0, unknown("message-id " + strconv.Quote(msgID))
	}
	for _, sb := range s.subs {
		if tag, ok := sb.rs.TagOf(msgID); ok {
			return sb, tag, nil
		}
	}
	return nil, 0, unknown("message-id " + strconv.Quote(msgID))
}

func (s *session) ack(f *frame.Frame) error {
	// NACK is not part of STOMP 1.0, but RabbitMQ accepts it there, with
	// the 1.1 headers; so does this server.
	sb, tag, err := s.resolveAck(f)
	if err != nil {
		return err
	}
	if err := sb.rs.Check(tag); err != nil {
		return brokerError(f, err)
	}
	op := replica.AckOp{Sub: sb.rs, Tag: tag, Nack: f.Command == frame.NACK}
	if txID, ok := f.Header.Contains(frame.Transaction); ok {
		t, err := s.transaction(f, txID, frameBytes(f))
		if err != nil {
			return err
		}
		t.batch.Acks = append(t.batch.Acks, op)
		s.complete(f)
		return nil
	}
	return s.apply(f, &replica.Batch{Acks: []replica.AckOp{op}})
}

// transaction returns the open transaction txID, counting one more frame
// of n bytes.
func (s *session) transaction(f *frame.Frame, txID string, n int64) (*transaction, error) {
	t := s.txs[txID]
	if t == nil {
		return nil, perr("transaction", "unknown transaction", "%s names transaction %q, which is not open", f.Command, txID)
	}
	if s.srv.cfg.MaxTxFrames > 0 && s.txFrames >= s.srv.cfg.MaxTxFrames {
		return nil, perr("limit", "transaction too large", "at most %d frames in open transactions per connection", s.srv.cfg.MaxTxFrames)
	}
	if s.txBytes+n > s.srv.cfg.MaxTxBytes {
		return nil, perr("limit", "transaction too large", "at most %d bytes (bodies and headers) in open transactions per connection; this %s would make %d",
			s.srv.cfg.MaxTxBytes, f.Command, s.txBytes+n)
	}
	s.txFrames++
	s.txBytes += n
	t.bytes += n
	return t, nil
}

// frameBytes approximates the memory a frame held in a transaction takes:
// its body and its headers' names and values.
func frameBytes(f *frame.Frame) int64 {
	n := int64(len(f.Body))
	for i := 0; i < f.Header.Len(); i++ {
		k, v := f.Header.GetAt(i)
		n += int64(len(k) + len(v))
	}
	return n
}

func (s *session) tx(f *frame.Frame) error {
	txID, err := required(f, frame.Transaction)
	if err != nil {
		return err
	}
	t := s.txs[txID]
	switch f.Command {
	case frame.BEGIN:
		if t != nil {
			return perr("transaction", "transaction already open", "BEGIN: transaction %q is already open", txID)
		}
		if s.srv.cfg.MaxTxFrames > 0 && s.txFrames >= s.srv.cfg.MaxTxFrames {
			return perr("limit", "transaction too large", "at most %d frames in open transactions per connection", s.srv.cfg.MaxTxFrames)
		}
		s.txFrames++
		s.txs[txID] = &transaction{}
		s.complete(f)
		return nil
	case frame.ABORT:
		if t == nil {
			return perr("transaction", "unknown transaction", "ABORT: transaction %q is not open", txID)
		}
		s.endTx(txID, t)
		s.complete(f)
		return nil
	default: // COMMIT
		if t == nil {
			return perr("transaction", "unknown transaction", "COMMIT: transaction %q is not open", txID)
		}
		s.endTx(txID, t)
		return s.apply(f, &t.batch)
	}
}

func (s *session) endTx(txID string, t *transaction) {
	delete(s.txs, txID)
	s.txFrames -= 1 + len(t.batch.Sends) + len(t.batch.Acks)
	s.txBytes -= t.bytes
}

// push appends op to the connection's ops, in frame order, waiting while
// maxPendingOps are in progress, and emits what is complete at the head.
// Only the reader goroutine pushes.
func (s *session) push(op *pendingOp) {
	q := &s.seq
	if op.receipt != "" {
		op.read = s.frameRead
	}
	q.mu.Lock()
	for len(q.q) >= maxPendingOps && !q.failed {
		q.cond.Wait()
	}
	if !op.waits {
		op.complete = true
	}
	q.q = append(q.q, op)
	s.emitLocked()
	q.mu.Unlock()
}

// finish records the outcome of op's effect and emits what is complete
// at the head. It may run before push(op) (a fast store callback); push
// then finds op complete.
func (s *session) finish(op *pendingOp, err error) {
	q := &s.seq
	q.mu.Lock()
	op.complete, op.err = true, err
	s.emitLocked()
	q.mu.Unlock()
}

// waitOps returns once every pushed op has been emitted.
func (s *session) waitOps() {
	q := &s.seq
	q.mu.Lock()
	for len(q.q) > 0 {
		q.cond.Wait()
	}
	q.mu.Unlock()
}

// emitLocked emits the receipts and errors of the complete ops at the
// head of the queue, in frame order: each only after the effects of every
// earlier frame. After a failed effect, nothing more is acknowledged.
func (s *session) emitLocked() {
	q := &s.seq
	n := 0
	for n < len(q.q) && q.q[n].complete {
		op := q.q[n]
		q.q[n] = nil
		n++
		if op.err != nil && !q.failed {
			q.failed = true
			pe := s.asyncRefused(op.err)
			if pe.reason == "internal" {
				s.srv.log.Error("store failure", "session", s.id, "err", op.err)
			} else {
				s.srv.log.Info("frame refused", "session", s.id, "err", op.err)
			}
			s.srv.m.errors.WithLabelValues(pe.reason).Inc()
			if op.receipt != "" {
				pe.header = []string{frame.ReceiptId, op.receipt}
			}
			s.enqueueFrame(errorFrame(pe), true)
			s.shutdown()
		}
		if q.failed {
			s.release(receiptBytes(op.receipt))
			continue
		}
		if op.receipt != "" {
			// Its bytes were reserved by readLoop.
			s.enqueue(outItem{f: frame.New(frame.RECEIPT, frame.ReceiptId, op.receipt), n: receiptBytes(op.receipt), read: op.read})
		}
		if op.errFr != nil {
			s.enqueueFrame(op.errFr, false)
		}
		if op.final {
			s.enqueue(outItem{end: true})
		}
	}
	if n > 0 {
		rest := copy(q.q, q.q[n:])
		clear(q.q[rest:])
		q.q = q.q[:rest]
		q.cond.Broadcast()
	}
}

// closeSubBytes is what closing a subscription counts in outBytes, so
// that UNSUBSCRIBEs without receipts cannot queue closes without bound.
const closeSubBytes = 64

// receiptBytes is what the RECEIPT for receipt r counts in outBytes: about
// its encoded size. 0 for no receipt.
func receiptBytes(r string) int64 {
	if r == "" {
		return 0
	}
	return int64(len("RECEIPT\nreceipt-id:\n\n\x00") + len(r))
}

// outFrameBytes approximates the encoded size of f.
func outFrameBytes(f *frame.Frame) int64 {
	n := len(f.Command) + 3 + len(f.Body)
	if len(f.Body) > 0 {
		n += len("content-length:\n") + 10
	}
	for i := 0; i < f.Header.Len(); i++ {
		k, v := f.Header.GetAt(i)
		n += len(k) + len(v) + 2
	}
	return int64(n)
}

// reserve waits until n more bytes fit in the outgoing queue, then counts
// them. A queue with nothing in it takes anything. It fails when the
// writer has ended or the session is shutting down.
func (s *session) reserve(n int64) error {
	limit := int64(s.srv.cfg.MaxOutgoingBytes)
	for {
		cur := s.outBytes.Load()
		if cur+n <= limit || cur == 0 {
			if n == 0 {
				return nil
			}
			if s.outBytes.CompareAndSwap(cur, cur+n) {
				if h := testHookOutBytes; h != nil {
					h(s, cur+n)
				}
				return nil
			}
			continue
		}
		if err := s.waitRoom(n, limit); err != nil {
			return err
		}
	}
}

// waitRoom waits until n bytes fit, or the writer ends, or shutdown.
func (s *session) waitRoom(n, limit int64) error {
	s.outWaiting.Store(true)
	defer s.outWaiting.Store(false)
	if h := testHookOutFull; h != nil {
		h(s)
	}
	for {
		// After setting outWaiting: release either sees it and signals,
		// or its decrement is visible here.
		if cur := s.outBytes.Load(); cur+n <= limit || cur == 0 {
			return nil
		}
		if s.stopping.Load() {
			return net.ErrClosed
		}
		select {
		case <-s.outRoom:
		case <-s.writerDone:
			return net.ErrClosed
		}
	}
}

// release uncounts n bytes of the outgoing queue and wakes a waiting reader.
func (s *session) release(n int64) {
	if n == 0 {
		return
	}
	s.outBytes.Add(-n)
	if s.outWaiting.Load() {
		select {
		case s.outRoom <- struct{}{}:
		default:
		}
	}
}

// enqueueFrame counts f's bytes in the outgoing queue and queues it; end
// closes the connection after it. For frames that do not wait for room:
// CONNECTED and ERROR.
func (s *session) enqueueFrame(f *frame.Frame, end bool) {
	n := outFrameBytes(f)
	v := s.outBytes.Add(n)
	if h := testHookOutBytes; h != nil {
		h(s, v)
	}
	s.enqueue(outItem{f: f, end: end, n: n})
}

// Test hooks, set only by tests before a server starts: testHookOutBytes
// sees a session's outgoing bytes after each increase, testHookOutFull a
// reader about to wait for room.
var (
	testHookOutBytes func(s *session, queued int64)
	testHookOutFull  func(s *session)
)

// enqueue queues it for the writer; it.n must already be counted in
// outBytes.
func (s *session) enqueue(it outItem) {
	s.outMu.Lock()
	if s.outClosed {
		s.outMu.Unlock()
		s.release(it.n)
		if it.closeSub != nil {
			s.closeSub(it.closeSub, it.closed)
		}
		return
	}
	s.out = append(s.out, it)
	s.outMu.Unlock()
	select {
	case s.outSignal <- struct{}{}:
	default:
	}
}

// writeLoop writes queued frames, flushing when the queue is empty, and
// heart-beats when idle. It ends at the first end item or write error.
func (s *session) writeLoop() {
	defer close(s.writerDone)
	w := newFrameWriter(&deadlineWriter{c: s.conn, d: s.srv.cfg.WriteTimeout})
	var tick <-chan time.Time
	var ticker *time.Ticker
	lastWrite := time.Now()
	written := make(map[replica.Sub][]uint64)
	var interval time.Duration
	var batch []outItem
	var reads []time.Time // of the RECEIPTs in batch
	fail := func() {
		s.outMu.Lock()
		s.outClosed = true
		rest := append(batch, s.out...)
		s.out = nil
		s.outMu.Unlock()
		// Messages written to the buffer may or may not have reached the
		// client: they go back marked redelivered, not acknowledged. This
		// comes before closing subscriptions, whose close returns them.
		for rs, tags := range written {
			rs.Tried(tags...)
		}
		var n int64
		for _, it := range rest {
			n += it.n
			if it.closeSub != nil {
				s.closeSub(it.closeSub, it.closed)
			}
		}
		s.release(n)
		s.conn.Close()
	}
	for {
		if ticker == nil && s.writeInterval.Load() > 0 {
			interval = time.Duration(s.writeInterval.Load())
			ticker = time.NewTicker(interval / 2)
			defer ticker.Stop()
			tick = ticker.C
		}
		select {
		case <-s.outSignal:
		case <-tick:
			if time.Since(lastWrite) >= interval/2 {
				if w.WriteHeartbeat() != nil || w.Flush() != nil {
					fail()
					return
				}
				lastWrite = time.Now()
			}
			continue
		}
		s.outMu.Lock()
		batch, s.out = s.out, batch[:0]
		s.outMu.Unlock()
		end := false
		for i := range batch {
			it := &batch[i]
			if it.end && it.f == nil {
				end = true
				break
			}
			if it.closeSub != nil {
				// Everything before the UNSUBSCRIBE reaches the wire and is
				// recorded as written before the subscription closes, so
				// what the client got comes back marked redelivered.
				if err := w.Flush(); err != nil {
					fail()
					return
				}
				for rs, tags := range written {
					rs.Written(tags...)
					delete(written, rs)
				}
				s.closeSub(it.closeSub, it.closed)
				it.closeSub = nil // done: fail must not close it again
				continue
			}
			f := it.f
			if it.sub != nil {
				if it.sub.closed.Load() {
					continue // its messages went back to the queue
				}
				f = s.messageFrame(it.sub, it.d)
				written[it.d.Sub] = append(written[it.d.Sub], it.d.Tag)
			}
			if err := w.WriteFrame(f, s.version); err != nil {
				fail()
				return
			}
			s.srv.m.framesOut.WithLabelValues(f.Command).Inc()
			if it.end {
				end = true
				break
			}
		}
		// The batch is in the write buffer or on the wire: its bytes
		// leave the queue. Closes after an end item are done once what was
		// written is flushed and recorded, so that it comes back marked
		// redelivered.
		var n int64
		var closes []outItem
		reads = reads[:0]
		for i := range batch {
			if !batch[i].read.IsZero() {
				reads = append(reads, batch[i].read)
			}
			n += batch[i].n
			if batch[i].closeSub != nil {
				closes = append(closes, outItem{closeSub: batch[i].closeSub, closed: batch[i].closed}) // n released here
			}
			batch[i] = outItem{}
		}
		s.release(n)
		if err := w.Flush(); err != nil {
			batch = append(batch[:0], closes...) // fail closes them, after Tried
			fail()
			return
		}
		lastWrite = time.Now()
		for _, t := range reads {
			s.srv.m.receiptSeconds.Observe(lastWrite.Sub(t).Seconds())
		}
		for rs, tags := range written {
			rs.Written(tags...)
			delete(written, rs)
		}
		for _, it := range closes {
			s.closeSub(it.closeSub, it.closed)
		}
		if end {
			s.outMu.Lock()
			s.outClosed = true
			rest := s.out
			s.out = nil
			s.outMu.Unlock()
			var n int64
			for _, it := range rest {
				n += it.n
				if it.closeSub != nil {
					s.closeSub(it.closeSub, it.closed)
				}
			}
			s.release(n)
			if tc, ok := s.conn.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			}
			return
		}
	}
}

func (s *session) messageFrame(sb *sub, d replica.Delivery) *frame.Frame {
	m := d.Msg
	f := &frame.Frame{Command: frame.MESSAGE, Header: frame.NewHeader(
		frame.Subscription, sb.id,
		frame.MessageId, m.ID,
		frame.Destination, m.Dest,
	), Body: m.Body}
	if sb.mode != replica.AckAuto && s.version == "1.2" {
		f.Header.Add(frame.Ack, ackToken(sb, d.Tag))
	}
	if d.Redelivered {
		f.Header.Add("redelivered", "true")
		f.Header.Add("x-delivery-count", strconv.Itoa(d.Count))
	}
	for i := 0; i+1 < len(m.Headers); i += 2 {
		if s.version == "1.0" && strings.ContainsAny(m.Headers[i], ":\n") {
			continue // 1.0 cannot carry this header name
		}
		v := m.Headers[i+1]
		if s.version == "1.0" && strings.ContainsAny(v, "\n") {
			v = strings.ReplaceAll(v, "\n", " ") // 1.0 cannot escape a newline
		}
		f.Header.Add(m.Headers[i], v)
	}
	return f
}

// drain reads and discards what the client still sends, briefly, before a
// close after an ERROR.
func drain(c net.Conn) {
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	_, _ = io.Copy(io.Discard, io.LimitReader(c, 64<<10))
}
