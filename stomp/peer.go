package stomp

// Peer links: the transport that nodes of a cluster use to talk to each
// other. The protocol is documented on PeerServer; the replication that
// uses it lives in another package and sees only frames and callbacks.

import (
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/go-stomp/stomp/v3/frame"
	"github.com/prometheus/client_golang/prometheus"
)

// Peer link errors. Match them with errors.Is: the errors handed to a
// Request's done callback wrap one or more of them.
var (
	// ErrPeerUnknownOutcome means the link broke (or was closed) after a
	// request was queued and before its answer arrived: the request may or
	// may not have taken effect on the peer. Callers retry idempotently.
	// The error also wraps the cause (ErrPeerHeartbeat, ErrPeerDropped,
	// ErrPeerProtocol, ErrPeerClosed or an I/O error).
	ErrPeerUnknownOutcome = errors.New("peer request outcome unknown")

	// ErrPeerClosed means the PeerClient or PeerServer was closed.
	ErrPeerClosed = errors.New("peer link closed")

	// ErrPeerAuth means a handshake was refused over the cluster secret:
	// the server refused the client's proof, or the server did not prove
	// that it holds the client's secret.
	ErrPeerAuth = errors.New("peer authentication failed")

	// ErrPeerTLS means the TLS handshake of a link configured for TLS
	// failed: this side refused the other's certificate, the other side
	// refused ours (a TLS alert), or the other side does not speak TLS.
	ErrPeerTLS = errors.New("peer TLS handshake failed")

	// ErrPeerHandshake means a handshake failed for another reason: an
	// ERROR from the server (version, node ID, heart-beats, too many
	// connections), an unexpected answer, or a server with another node ID
	// than PeerClientConfig.PeerNodeID.
	ErrPeerHandshake = errors.New("peer handshake failed")

	// ErrPeerHeartbeat means nothing, not even a heart-beat, arrived from
	// the other side within three negotiated heart-beat periods: the peer
	// is stopped, hung or cut off.
	ErrPeerHeartbeat = errors.New("peer heart-beat timeout")

	// ErrPeerDropped means the server closed the link with an ERROR frame
	// that answers no request: a protocol error on our side, or its
	// handler dropped us (PeerDrop).
	ErrPeerDropped = errors.New("peer dropped the link")

	// ErrPeerVersion means a handshake was refused because the two nodes
	// speak no protocol version in common (PeerServerConfig.Protocols):
	// the server refused the client's range, or the client the server's.
	// The error names both ranges.
	ErrPeerVersion = errors.New("peer protocol versions do not overlap")

	// ErrPeerProtocol means the other side sent something the peer
	// protocol does not allow (a malformed frame, an answer to no pending
	// request, an unexpected command).
	ErrPeerProtocol = errors.New("peer protocol violation")
)

// PeerError is an operation failure reported by the peer's handler
// (PeerFail): the request reached the peer and was refused there. The
// link stays up. It is what a Request's done callback receives, as
// *PeerError, for an ERROR frame carrying the request's receipt-id.
type PeerError struct {
	// Code is the failure's machine-readable code (the ERROR's x-code).
	Code string
	// Message is the human-readable text (the ERROR's message header).
	Message string
}

func (e *PeerError) Error() string {
	return "peer refused the request: " + e.Code + ": " + e.Message
}

// Peer protocol header names.
const (
	// PeerHeaderOp names the operation of a request (a SEND frame).
	PeerHeaderOp = "x-op"
	// PeerHeaderCode carries the code of an ERROR frame.
	PeerHeaderCode = "x-code"

	peerHeaderNodeID = "x-node-id"
	peerHeaderNonce  = "x-nonce"
	peerHeaderAuth   = "x-auth"
	// peerHeaderProto states, in CONNECT and CONNECTED, the range of
	// protocol versions the sender speaks, "min..max"; absent means 1..1
	// (a build before ranges).
	peerHeaderProto = "x-proto"
	// peerHeaderCRC carries, from protocol version 2 on, the CRC-32C
	// (Castagnoli) of a request's body, 8 hex digits; the server checks
	// it before the handler sees the request.
	peerHeaderCRC = "x-crc32c"
)

// Codes of the ERROR frames the server itself sends (x-code). All but
// peerCodeTooLarge and peerCodeInternal close the link.
const (
	peerCodeAuth      = "auth"
	peerCodeHandshake = "handshake"
	peerCodeBusy      = "busy"
	peerCodeMalformed = "malformed"
	peerCodeProtocol  = "protocol"
	peerCodeHeartbeat = "heart-beat"
	peerCodeDropped   = "dropped"
	peerCodeTimeout   = "timeout"
	peerCodeWrite     = "write"
	// peerCodeTLS: the TLS handshake failed (a certificate refused by
	// either side, or a client that does not speak TLS to a TLS port).
	peerCodeTLS = "tls"
	// peerCodeVersion: the two sides speak no protocol version in common.
	peerCodeVersion = "version"
	// peerCodeChecksum: a request's body does not match its x-crc32c.
	peerCodeChecksum = "checksum"
	// Operation failures the server substitutes for a bad reply.
	peerCodeTooLarge = "reply-too-large"
	peerCodeInternal = "internal"
)

const (
	// peerVersion is the only STOMP version peers speak.
	peerVersion = "1.2"
	// peerMACClient and peerMACServer prefix the HMAC inputs of the two
	// handshake proofs, so one can never be replayed as the other.
	peerMACClient = "brokerd-peer\x00"
	peerMACServer = "brokerd-peer-server\x00"
	// peerNonceBytes is the size of the client's random nonce.
	peerNonceBytes = 16
	// peerMaxNodeID bounds a node ID, in bytes.
	peerMaxNodeID = 256
	// peerMaxHeartbeat bounds a negotiated heart-beat period: a peer
	// silent for three of them is cut off, so the period must stay short.
	peerMaxHeartbeat = time.Minute
	// peerMissedBeats is how many heart-beat periods of silence close a
	// link.
	peerMissedBeats = 3
	// peerMaxRefusing bounds the goroutines writing an ERROR to
	// connections refused over MaxConnections; beyond it they are closed
	// without one.
	peerMaxRefusing = 16
	// peerDrainBytes and peerDrainTime bound what is read (and discarded)
	// after an ERROR, so closing with unread input does not send a reset
	// that destroys the ERROR before the peer reads it.
	peerDrainBytes = 64 << 10
	peerDrainTime  = time.Second
)

// DefaultPeerLimits returns the frame limits of peer links: a 16 MiB body
// (a replication batch) plus 64 KiB of command and headers, 128 headers of
// at most 8 KiB each.
func DefaultPeerLimits() Limits {
	return Limits{
		MaxFrameSize:     16<<20 + 64<<10,
		MaxHeaderCount:   128,
		MaxHeaderLineLen: 8192,
		MaxBodySize:      16 << 20,
	}
}

// peerLimits replaces zero or negative fields by their DefaultPeerLimits
// value.
func peerLimits(l Limits) Limits { return withDefaultLimits(l, DefaultPeerLimits()) }

// PeerHandler serves the requests of peer links.
//
// HandlePeer is called on the reader goroutine of the connection the
// request arrived on, one call at a time per connection and in frame
// order; calls for different connections run concurrently. peer is the
// node ID the client proved in its handshake. f is a SEND frame with a
// receipt header and a PeerHeaderOp header; the handler owns f.
//
// HandlePeer must not block for long: while it runs, nothing more is read
// from that connection. It must call reply exactly once, before returning
// or later from any goroutine, with one of:
//
//   - PeerOK(...): success, sent as a RECEIPT carrying the request's
//     receipt-id, the given headers and body;
//   - PeerFail(code, message): the operation failed (unknown op, stale
//     epoch, full queue...), sent as an ERROR carrying the request's
//     receipt-id; the link stays up;
//   - PeerDrop(reason): the peer misbehaves; the server logs it, sends an
//     ERROR without receipt-id and closes the link, failing the peer's
//     other requests.
//
// reply takes ownership of the frame passed to it. Calls after the first,
// and calls after the connection ended, are ignored (the first is logged).
type PeerHandler interface {
	HandlePeer(peer string, f *frame.Frame, reply func(resp *frame.Frame))
}

// PeerHandlerFunc adapts a function to PeerHandler.
type PeerHandlerFunc func(peer string, f *frame.Frame, reply func(resp *frame.Frame))

// HandlePeer calls h.
func (h PeerHandlerFunc) HandlePeer(peer string, f *frame.Frame, reply func(resp *frame.Frame)) {
	h(peer, f, reply)
}

// PeerOK returns a success reply for PeerHandler: a RECEIPT with the given
// header names and values (pairs; an odd trailing name gets an empty
// value). Set its Body for a result body. The server adds receipt-id and
// content-length; headers of those names are dropped.
func PeerOK(headers ...string) *frame.Frame {
	return &frame.Frame{Command: frame.RECEIPT, Header: frame.NewHeader(headers...)}
}

// PeerFail returns an operation-failure reply for PeerHandler: an ERROR
// with x-code and message headers, which the client receives as a
// *PeerError. The link stays up: an operation failure is not a protocol
// error.
func PeerFail(code, message string) *frame.Frame {
	return frame.New(frame.ERROR, PeerHeaderCode, code, frame.Message, message)
}

// PeerDrop returns the reply that makes the server drop the peer: it logs
// reason, sends an ERROR without receipt-id (code "dropped", reason in
// the body) and closes the connection; the peer's pending requests fail
// with ErrPeerUnknownOutcome and ErrPeerDropped. The frame is an
// instruction to the server and is never sent as is.
func PeerDrop(reason string) *frame.Frame {
	return frame.New(frame.DISCONNECT, frame.Message, reason)
}

// peerValidNodeID reports whether id can be a node ID: 1 to peerMaxNodeID
// bytes, no control characters (IDs appear in logs and in MAC inputs,
// where a NUL would make them ambiguous).
func peerValidNodeID(id string) bool {
	if id == "" || len(id) > peerMaxNodeID {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x20 || id[i] == 0x7f {
			return false
		}
	}
	return true
}

// peerMAC returns hex(HMAC-SHA256(secret, prefix + parts joined by NUL)).
func peerMAC(secret []byte, prefix string, parts ...string) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(prefix))
	for i, p := range parts {
		if i > 0 {
			m.Write([]byte{0})
		}
		m.Write([]byte(p))
	}
	return hex.EncodeToString(m.Sum(nil))
}

// peerMACEqual compares a received hex MAC with the expected one in
// constant time.
func peerMACEqual(got, want string) bool {
	g, err := hex.DecodeString(got)
	if err != nil {
		return false
	}
	w, _ := hex.DecodeString(want)
	return hmac.Equal(g, w)
}

// peerMatchKey returns the key of keys with which got is the MAC of
// prefix and parts, or nil if none.
func peerMatchKey(keys [][]byte, got, prefix string, parts ...string) []byte {
	for _, k := range keys {
		if len(k) > 0 && peerMACEqual(got, peerMAC(k, prefix, parts...)) {
			return k
		}
	}
	return nil
}

// peerKeys returns the keys of a keyring function, or secret alone; no
// keys means no authentication.
func peerKeys(fn func() [][]byte, secret []byte) [][]byte {
	if fn != nil {
		var keys [][]byte
		for _, k := range fn() {
			if len(k) > 0 {
				keys = append(keys, k)
			}
		}
		return keys
	}
	if len(secret) > 0 {
		return [][]byte{secret}
	}
	return nil
}

// peerParseProtocols parses an x-proto header value, "min..max"; an
// absent header (ok false) is 1..1, the range of builds before ranges.
func peerParseProtocols(v string, ok bool) (cluster.ProtocolRange, error) {
	if !ok {
		return cluster.ProtocolRange{Min: 1, Max: 1}, nil
	}
	lo, hi, found := strings.Cut(v, "..")
	a, err1 := strconv.Atoi(lo)
	b, err2 := strconv.Atoi(hi)
	r := cluster.ProtocolRange{Min: a, Max: b}
	if !found || err1 != nil || err2 != nil || !r.Valid() {
		return cluster.ProtocolRange{}, fmt.Errorf("%s %q is not min..max", peerHeaderProto, fioTrunc(v))
	}
	return r, nil
}

// peerLinkProtocol returns the version a link between ranges a and b
// speaks, the highest both speak, and whether there is one.
func peerLinkProtocol(a, b cluster.ProtocolRange) (int, bool) {
	v := min(a.Max, b.Max)
	return v, v >= max(a.Min, b.Min)
}

// peerCRCTable is CRC-32C's (hardware-accelerated on amd64 and arm64).
var peerCRCTable = crc32.MakeTable(crc32.Castagnoli)

// peerCRC returns the x-crc32c value of body.
func peerCRC(body []byte) string {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], crc32.Checksum(body, peerCRCTable))
	return hex.EncodeToString(b[:])
}

// peerIsTLSAlert reports whether err is a TLS alert received from the
// other side (it refused our certificate, or the handshake).
func peerIsTLSAlert(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "remote error"
}

// peerIsConnEnd reports whether err says the other side just went away
// (EOF, reset, closed) rather than refused something.
func peerIsConnEnd(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// peerEscapedLen is the length of s with STOMP 1.2 header escapes.
func peerEscapedLen(s string) int {
	n := len(s)
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\', '\n', '\r', ':':
			n++
		}
	}
	return n
}

// peerFrameFits checks that f, written as STOMP 1.2 (with the
// content-length header the writer adds), passes the reader's limits lim
// on the other side, so a frame that does not is refused where it is
// made instead of breaking the link. It also refuses an empty header name,
// the one thing a 1.2 frame cannot encode.
func peerFrameFits(lim Limits, f *frame.Frame) error {
	if len(f.Body) > lim.MaxBodySize {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrBodyTooLarge, len(f.Body), lim.MaxBodySize)
	}
	size := len(f.Command) + 1
	n := f.Header.Len()
	count := n
	if len(f.Body) > 0 {
		count++
		size += len(frame.ContentLength) + 1 + len(strconv.Itoa(len(f.Body))) + 1
	}
	if count > lim.MaxHeaderCount {
		return fmt.Errorf("%w: %d, limit %d", ErrTooManyHeaders, count, lim.MaxHeaderCount)
	}
	for i := 0; i < n; i++ {
		k, v := f.Header.GetAt(i)
		if k == "" {
			return fmt.Errorf("%w: empty header name", ErrUnencodableFrame)
		}
		l := peerEscapedLen(k) + 1 + peerEscapedLen(v)
		if l > lim.MaxHeaderLineLen {
			return fmt.Errorf("%w: header %q, limit %d bytes", ErrHeaderTooLong, fioTrunc(k), lim.MaxHeaderLineLen)
		}
		size += l + 1
	}
	size += 1 + len(f.Body) + 1
	if size > lim.MaxFrameSize {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrFrameTooLarge, size, lim.MaxFrameSize)
	}
	return nil
}

// peerIsFrameError reports whether err is one of the frame reader's
// protocol errors (as opposed to an I/O error).
func peerIsFrameError(err error) bool {
	for _, e := range []error{ErrFrameTooLarge, ErrBodyTooLarge, ErrTooManyHeaders, ErrHeaderTooLong,
		ErrBadEscape, ErrMalformedFrame, ErrUnknownCommand, ErrBadContentLength} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// peerIsTimeout reports whether err is a deadline expiry.
func peerIsTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// peerIdleReader sets the read deadline to d from now before every read
// when d > 0, so that any byte from the other side (a heart-beat, part of
// a large frame) counts as a sign of life.
type peerIdleReader struct {
	c net.Conn
	d time.Duration // set by the reading goroutine only
}

func (r *peerIdleReader) Read(p []byte) (int, error) {
	if r.d > 0 {
		_ = r.c.SetReadDeadline(time.Now().Add(r.d))
	}
	return r.c.Read(p)
}

// peerDrain reads and discards what the other side still sends, within
// bounds, before a close.
func peerDrain(c net.Conn) {
	_ = c.SetReadDeadline(time.Now().Add(peerDrainTime))
	_, _ = io.Copy(io.Discard, io.LimitReader(c, peerDrainBytes))
}

// peerHardClose closes c at once. A TLS connection's Close first writes
// a close_notify alert, for up to 5 s when the other side reads nothing
// (a partition): the underlying connection is closed instead. A graceful
// end sends close_notify through peerCloseWrite first.
func peerHardClose(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		_ = tc.NetConn().Close()
		return
	}
	_ = c.Close()
}

// peerCloseWrite half-closes a TCP connection, so the peer reads EOF
// after what was written while the drain reads on.
func peerCloseWrite(c net.Conn) {
	if tc, ok := c.(interface{ CloseWrite() error }); ok {
		_ = tc.CloseWrite()
	}
}

// peerHeartbeatHeader formats a heart-beat header value.
func peerHeartbeatHeader(x, y time.Duration) string {
	return strconv.FormatInt(x.Milliseconds(), 10) + "," + strconv.FormatInt(y.Milliseconds(), 10)
}

// peerRoundMs rounds d up to whole milliseconds, as heart-beat headers
// state periods.
func peerRoundMs(d time.Duration) time.Duration {
	if r := d % time.Millisecond; r != 0 {
		d += time.Millisecond - r
	}
	return d
}

// peerRegister registers c with reg and returns it, or the collector
// already registered under the same description, so that several clients
// (or servers) can share one registry.
func peerRegister[T prometheus.Collector](reg prometheus.Registerer, c T) T {
	if reg == nil {
		return c
	}
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if ex, ok := are.ExistingCollector.(T); ok {
				return ex
			}
		}
		panic(fmt.Sprintf("stomp: register peer metric: %v", err))
	}
	return c
}

// ---------------------------------------------------------------------------
// Server

// PeerServerConfig configures a PeerServer. Zero fields take their
// DefaultPeerServerConfig value, except Secret (empty: no authentication),
// Registerer (nil: no metrics) and NodeID (required).
type PeerServerConfig struct {
	// Addr is the listen address; port 0 picks a free port (see
	// PeerServer.Addr).
	Addr string
	// Secret is the cluster's shared key. When set, a client must prove it
	// holds the same key in its handshake, and the server proves it back;
	// the key never crosses the wire. Empty means no authentication.
	// SecretKeys, when set, replaces it.
	Secret []byte
	// SecretKeys, when set, returns the cluster's keys (a keyring, the
	// primary first) and replaces Secret: a client's proof made with any
	// of them is accepted, and the server proves back with the key the
	// client used, so keys can be rotated across a running cluster. It
	// is called at each handshake, from connection goroutines at once;
	// no keys means no authentication. The server does not modify the
	// returned slices.
	SecretKeys func() [][]byte
	// TLS, when set, makes every accepted connection TLS: the handshake
	// runs on the connection's goroutine under HandshakeTimeout, before
	// the STOMP handshake (which still authenticates with the secret). For
	// mutual TLS it must require and verify client certificates. A failed
	// TLS handshake is logged with the remote address and the reason, and
	// counted under reason "tls"; a client speaking plain text gets a
	// plain-text ERROR saying TLS is required.
	TLS *tls.Config
	// NodeID is this node's ID, sent in CONNECTED.
	NodeID string
	// Protocols is the range of protocol versions this node speaks (the
	// zero value: the build's, cluster.BuildProtocols), stated in
	// CONNECTED. A client whose range does not overlap it is refused with
	// an ERROR (x-code "version") naming both. On a link whose version is
	// 2 or more the server checks each request's x-crc32c, when present,
	// and drops the link on a mismatch (x-code "checksum").
	Protocols cluster.ProtocolRange
	// Limits bound each frame read from a peer, and each reply written
	// (a reply over them is replaced by an operation failure). Zero
	// fields take their DefaultPeerLimits value.
	Limits Limits
	// MaxInFlight bounds the requests of one connection handed to the
	// handler and not yet answered. While it is reached the server reads
	// nothing more from that connection, so TCP pushes back on the peer.
	// It also bounds that connection's write queue.
	MaxInFlight int
	// MaxConnections bounds concurrent peer connections; more are refused
	// with an ERROR.
	MaxConnections int
	// Heartbeat is the shortest heart-beat period the server agrees to,
	// both ways. The server sends heart-beats as often as the client asks
	// (but not more often than this) and expects them as often as the
	// client offers (same floor); three periods of silence close the link.
	// A client that offers none is refused.
	Heartbeat time.Duration
	// WriteTimeout bounds each write: a peer that reads nothing for that
	// long while the server has something to send is disconnected.
	WriteTimeout time.Duration
	// HandshakeTimeout bounds the time from accept to a complete CONNECT.
	HandshakeTimeout time.Duration
	// Logger receives the server's logs.
	Logger *slog.Logger
	// Registerer receives the metrics; nil means none.
	Registerer prometheus.Registerer
}

// DefaultPeerServerConfig returns a PeerServerConfig with every field set
// but NodeID and Secret.
func DefaultPeerServerConfig() PeerServerConfig {
	return PeerServerConfig{
		Addr:             "127.0.0.1:0",
		Limits:           DefaultPeerLimits(),
		MaxInFlight:      256,
		MaxConnections:   256,
		Heartbeat:        time.Second,
		WriteTimeout:     10 * time.Second,
		HandshakeTimeout: 5 * time.Second,
		Logger:           slog.Default(),
	}
}

// PeerServer accepts peer links and hands their requests to a PeerHandler.
//
// # Protocol
//
// A peer link is one TCP connection carrying STOMP 1.2 frames, read and
// written with the same bounded codec as the client edge; with
// PeerServerConfig.TLS, the frames travel inside TLS (mutual TLS when the
// config requires client certificates), and the TLS handshake comes
// first. A TLS handshake that fails (a certificate the server refuses or
// that refuses the server's, a client speaking plain text, garbage) ends
// the connection before any frame is read; a plain-text client gets a
// plain-text ERROR with x-code "tls".
//
// Handshake. The client sends CONNECT with accept-version:1.2, host (the
// cluster's name, not checked), x-node-id (its node ID: 1 to 256 bytes,
// no control characters), heart-beat (it must offer to send them), and
// x-nonce (16 random bytes, hex). With a cluster secret it adds
//
//	x-auth: hex(HMAC-SHA256(secret, "brokerd-peer\x00" + nonce + "\x00" + client-id))
//
// The server answers CONNECTED with version:1.2, its own x-node-id and
// the heart-beat periods it uses; with a secret it adds
//
//	x-auth: hex(HMAC-SHA256(secret, "brokerd-peer-server\x00" + nonce + "\x00" + client-id + "\x00" + server-id))
//
// so each side proves it holds the key without sending it, and the
// client knows it talks to a member of its cluster before it trusts any
// answer. With a keyring (SecretKeys), the client proves with its primary
// key, the server accepts a proof made with any key of its ring and
// proves back with that key, and the client accepts a server proof made
// with any key of its own ring: while a new key is installed, made
// primary and the old one removed, node by node, links keep forming.
// MACs are compared in constant time. Any failure gets an ERROR
// whose x-code says why ("auth" for a missing or wrong proof;
// "handshake", "heart-beat", "malformed", or "busy" over MaxConnections)
// and the connection closes. The proof is not a channel: frames after the
// handshake are not authenticated, and a recorded handshake can be
// replayed by whoever can watch the network, so the secret keeps out
// nodes without the key (another cluster, a stray process, a scanner),
// not an attacker on the path: run links over a private network or TLS
// (with TLS, the secret's proof is kept inside it as a second check).
//
// Protocol versions: CONNECT and CONNECTED carry x-proto, the range of
// brokerd protocol versions the sender speaks ("1..2"; absent means 1..1,
// a build before ranges). The server refuses a client whose range does
// not overlap its own with an ERROR (x-code "version") naming both
// ranges, and the client refuses such a server likewise (ErrPeerVersion);
// otherwise the link speaks the highest version both speak. From version
// 2 on, a request with a body may carry x-crc32c, the CRC-32C of its body
// (8 hex digits): the client adds it while the cluster's effective
// version is 2 or more too (PeerClientConfig.Protocol), and the server
// checks it before the handler sees the request, dropping the link on a
// mismatch (x-code "checksum"), so a body damaged between the two
// processes is never applied. A version-1 server never sees it.
//
// Heart-beats: each side sends a heart-beat (an EOL) when it has written
// nothing for half its period, and closes the link after three periods
// without a byte from the other side, so a peer that is stopped or cut
// off (no reset) is detected within seconds at both ends.
//
// Requests. After the handshake every client frame is a SEND with a
// receipt header (unique among the connection's requests in flight) and
// an x-op header naming the operation; other headers and the body are the
// operation's. Requests are pipelined: the client sends many without
// waiting, and the server answers each when its handler replies, in any
// order:
//
//   - RECEIPT with receipt-id: success, with the handler's result headers
//     and body;
//   - ERROR with receipt-id, x-code and message: the operation failed
//     (unknown op, stale epoch...). This is an answer, not a protocol
//     error: the connection stays up.
//
// Protocol errors. Anything else from the client (another command, a
// missing receipt or x-op, a receipt still in flight, a malformed frame,
// a frame over the limits, silence past the heart-beat timeout) and a
// handler's PeerDrop get an ERROR *without* receipt-id, with an x-code,
// a message and a text body; the server logs it (with the peer's node ID
// and address) and counts it, hands nothing more from that connection to
// the handler, and closes it. The absence of receipt-id is what tells the
// client the link is over: its pending requests then have an unknown
// outcome.
//
// Each connection has two goroutines, a reader (handshake, frames, the
// handler's calls) and a writer (answers, batched into few writes, and
// heart-beats).
type PeerServer struct {
	cfg PeerServerConfig
	h   PeerHandler
	log *slog.Logger
	m   *peerServerMetrics

	// testSlotWait, when set before Start, is called by a connection's
	// reader each time it waits for MaxInFlight to allow another request.
	testSlotWait func()

	mu       sync.Mutex
	ln       net.Listener
	conns    map[*peerServerConn]struct{}
	started  bool
	closed   bool
	closeCh  chan struct{}
	refusing chan struct{} // tokens of goroutines refusing connections
	wg       sync.WaitGroup
}

type peerServerMetrics struct {
	connections prometheus.Gauge
	framesIn    prometheus.Counter
	framesOut   *prometheus.CounterVec
	dropped     *prometheus.CounterVec
	checksums   prometheus.Counter
}

func newPeerServerMetrics(reg prometheus.Registerer) *peerServerMetrics {
	return &peerServerMetrics{
		connections: peerRegister(reg, prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "brokerd_peer_server_connections", Help: "Open peer link connections accepted by this node.",
		})),
		framesIn: peerRegister(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "brokerd_peer_server_frames_in_total", Help: "Peer requests (SEND frames) handed to the handler.",
		})),
		framesOut: peerRegister(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "brokerd_peer_server_frames_out_total", Help: "Frames sent to peers, by command.",
		}, []string{"command"})),
		dropped: peerRegister(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "brokerd_peer_server_dropped_total", Help: "Peer connections closed by this node, by reason (an ERROR's x-code).",
		}, []string{"reason"})),
		checksums: peerRegister(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "brokerd_peer_server_checksums_verified_total", Help: "Peer requests whose body checksum (x-crc32c, protocol version 2) matched.",
		})),
	}
}

// NewPeerServer returns a PeerServer handing requests to h. Call Start to
// listen.
func NewPeerServer(cfg PeerServerConfig, h PeerHandler) *PeerServer {
	def := DefaultPeerServerConfig()
	if cfg.Addr == "" {
		cfg.Addr = def.Addr
	}
	cfg.Limits = peerLimits(cfg.Limits)
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = def.MaxInFlight
	}
	if cfg.MaxConnections <= 0 {
		cfg.MaxConnections = def.MaxConnections
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = def.Heartbeat
	}
	cfg.Heartbeat = min(peerRoundMs(cfg.Heartbeat), peerMaxHeartbeat)
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = def.WriteTimeout
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = def.HandshakeTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = def.Logger
	}
	if cfg.Protocols == (cluster.ProtocolRange{}) {
		cfg.Protocols = cluster.BuildProtocols()
	}
	cfg.Secret = slices.Clone(cfg.Secret)
	return &PeerServer{
		cfg:      cfg,
		h:        h,
		log:      cfg.Logger.With("component", "peer-server", "node", cfg.NodeID),
		m:        newPeerServerMetrics(cfg.Registerer),
		conns:    make(map[*peerServerConn]struct{}),
		closeCh:  make(chan struct{}),
		refusing: make(chan struct{}, peerMaxRefusing),
	}
}

// Start binds the listener and starts accepting. It fails if NodeID is
// not a valid node ID, if the server was started or closed before, or if
// the address cannot be bound.
func (s *PeerServer) Start() error {
	if !peerValidNodeID(s.cfg.NodeID) {
		return fmt.Errorf("peer server: invalid node ID %q", fioTrunc(s.cfg.NodeID))
	}
	if s.h == nil {
		return errors.New("peer server: nil handler")
	}
	if !s.cfg.Protocols.Valid() {
		return fmt.Errorf("peer server: protocol versions %s: want 1 <= min <= max", s.cfg.Protocols)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrPeerClosed
	}
	if s.started {
		return errors.New("peer server: already started")
	}
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("peer listen: %w", err)
	}
	s.ln = ln
	s.started = true
	s.wg.Add(1)
	go s.acceptLoop(ln)
	s.log.Info("peer server listening", "addr", ln.Addr().String())
	return nil
}

// Addr returns the bound address, or nil before Start.
func (s *PeerServer) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Close stops accepting, closes every connection at once (their pending
// requests get no answer: the clients see ErrPeerUnknownOutcome), and
// waits for the server's goroutines to end. Replies made after Close are
// ignored. Close is idempotent.
func (s *PeerServer) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	close(s.closeCh)
	if s.ln != nil {
		s.ln.Close()
	}
	conns := make([]*peerServerConn, 0, len(s.conns))
	for sc := range s.conns {
		conns = append(conns, sc)
	}
	s.mu.Unlock()
	for _, sc := range conns {
		sc.stop(nil)
		peerHardClose(sc.c)
	}
	s.wg.Wait()
	return nil
}

func (s *PeerServer) acceptLoop(ln net.Listener) {
	defer s.wg.Done()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Temporary errors such as EMFILE: back off, don't spin.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("peer accept failed", "err", err, "retry_in", delay)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-s.closeCh:
				t.Stop()
				return
			}
			continue
		}
		delay = 0
		c = s.wrapTLS(c)
		sc, reason := s.admit(c)
		if sc == nil {
			if reason != "" {
				s.refuse(c, reason)
			}
			continue
		}
		go func() {
			defer s.wg.Done()
			s.serve(sc)
		}()
	}
}

// wrapTLS returns c as a TLS server connection when the server has a TLS
// config; the handshake runs later, on the connection's goroutine.
func (s *PeerServer) wrapTLS(c net.Conn) net.Conn {
	if s.cfg.TLS == nil {
		return c
	}
	return tls.Server(c, s.cfg.TLS)
}

// admit registers a connection (and counts it in wg) or refuses it: with
// a reason to send, or none when the server is closed.
func (s *PeerServer) admit(c net.Conn) (*peerServerConn, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		peerHardClose(c)
		return nil, ""
	}
	if len(s.conns) >= s.cfg.MaxConnections {
		return nil, "this node accepts at most " + strconv.Itoa(s.cfg.MaxConnections) + " peer connections"
	}
	sc := newPeerServerConn(s, c)
	s.conns[sc] = struct{}{}
	s.wg.Add(1)
	s.m.connections.Inc()
	return sc, ""
}

// refuse sends an ERROR to a connection over MaxConnections and closes
// it, on a goroutine of its own as long as few are doing so.
func (s *PeerServer) refuse(c net.Conn, detail string) {
	s.m.dropped.WithLabelValues(peerCodeBusy).Inc()
	s.log.Warn("peer connection refused", "reason", "too many connections", "remote", c.RemoteAddr().String())
	select {
	case s.refusing <- struct{}{}:
	default:
		peerHardClose(c)
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer func() { <-s.refusing }()
		defer peerHardClose(c)
		pe := &peerProtoErr{code: peerCodeBusy, msg: "too many connections", detail: detail}
		// Reads too: over TLS, the write runs the handshake first.
		_ = c.SetDeadline(time.Now().Add(s.cfg.WriteTimeout))
		w := newFrameWriter(c)
		if w.WriteFrame(pe.frame(), peerVersion) == nil && w.Flush() == nil {
			peerCloseWrite(c)
			peerDrain(c)
		}
	}()
}

// serveConn serves c on the calling goroutine until the connection ends;
// for tests that bring their own connection (net.Pipe).
func (s *PeerServer) serveConn(c net.Conn) {
	sc, reason := s.admit(s.wrapTLS(c))
	if sc == nil {
		if reason != "" {
			peerHardClose(c)
		}
		return
	}
	defer s.wg.Done()
	s.serve(sc)
}

func (s *PeerServer) serve(sc *peerServerConn) {
	sc.run()
	s.mu.Lock()
	delete(s.conns, sc)
	s.mu.Unlock()
	s.m.connections.Dec()
}

// peerProtoErr is a reason to close a peer connection with an ERROR.
type peerProtoErr struct {
	code   string // x-code, and the dropped metric's reason
	msg    string // message header
	detail string // body
	drain  bool   // read what the peer still sends before closing
}

func (e *peerProtoErr) Error() string { return e.msg + ": " + e.detail }

func peerPerr(code, msg, detail string, args ...any) *peerProtoErr {
	return &peerProtoErr{code: code, msg: msg, detail: fmt.Sprintf(detail, args...), drain: true}
}

// frame returns the ERROR frame of e: no receipt-id, so the client knows
// the link is over.
func (e *peerProtoErr) frame() *frame.Frame {
	f := frame.New(frame.ERROR, frame.Message, e.msg, PeerHeaderCode, e.code, frame.ContentType, "text/plain")
	f.Body = []byte(e.detail)
	return f
}

// peerOut is an item of a server connection's write queue.
type peerOut struct {
	f    *frame.Frame
	slot bool // an answer: frees a MaxInFlight slot once written
	end  bool // close the connection after f (if any)
}

// peerServerConn is one accepted peer connection.
type peerServerConn struct {
	s      *PeerServer
	c      net.Conn
	remote string
	log    *slog.Logger
	ir     *peerIdleReader
	r      *frameReader

	// Set by the reader during the handshake, before the writer starts.
	claimed   string // the node ID a client claims before its proof is checked
	peer      string
	sendEvery time.Duration
	proto     int // the link's protocol version

	slots      chan struct{} // one token per request in flight
	stopCh     chan struct{} // closed by stop
	signal     chan struct{} // wakes the writer
	writerDone chan struct{}

	mu       sync.Mutex
	inflight map[string]struct{} // receipts handed to the handler, not answered
	out      []peerOut
	stopped  bool // nothing more goes to the handler; out ends with an end item
	stopErr  *peerProtoErr
}

func newPeerServerConn(s *PeerServer, c net.Conn) *peerServerConn {
	remote := "unknown"
	if a := c.RemoteAddr(); a != nil {
		remote = a.String()
	}
	sc := &peerServerConn{
		s:          s,
		c:          c,
		remote:     remote,
		log:        s.log.With("remote", remote),
		slots:      make(chan struct{}, s.cfg.MaxInFlight),
		stopCh:     make(chan struct{}),
		signal:     make(chan struct{}, 1),
		writerDone: make(chan struct{}),
		inflight:   make(map[string]struct{}),
	}
	sc.ir = &peerIdleReader{c: c}
	sc.r = newFrameReader(sc.ir, s.cfg.Limits)
	return sc
}

func (sc *peerServerConn) wake() {
	select {
	case sc.signal <- struct{}{}:
	default:
	}
}

// stop ends the connection's service: no more frames go to the handler,
// and the write queue ends with pe's ERROR (if any), after which the
// connection closes. A non-nil pe is logged and counted first (before the
// peer can see the ERROR). stop wakes the reader. It reports whether this
// call stopped the connection (false if it was already stopped).
func (sc *peerServerConn) stop(pe *peerProtoErr) bool {
	sc.mu.Lock()
	if sc.stopped {
		sc.mu.Unlock()
		return false
	}
	sc.stopped = true
	sc.stopErr = pe
	close(sc.stopCh)
	sc.mu.Unlock()
	it := peerOut{end: true}
	if pe != nil {
		sc.s.m.dropped.WithLabelValues(pe.code).Inc()
		sc.log.Warn("peer link dropped", "reason", pe.code, "err", pe.Error())
		if pe.code != peerCodeWrite {
			it.f = pe.frame()
		}
	}
	sc.mu.Lock()
	sc.out = append(sc.out, it)
	sc.mu.Unlock()
	sc.wake()
	_ = sc.c.SetReadDeadline(time.Now())
	return true
}

// run is the connection's reader: handshake, requests, and the close.
func (sc *peerServerConn) run() {
	defer peerHardClose(sc.c)
	// One bound from accept to a complete CONNECT, TLS included.
	deadline := time.Now().Add(sc.s.cfg.HandshakeTimeout)
	if tc, ok := sc.c.(*tls.Conn); ok && !sc.tlsHandshake(tc, deadline) {
		return
	}
	if err := sc.handshake(deadline); err != nil {
		var pe *peerProtoErr
		switch {
		case errors.As(err, &pe):
			sc.s.m.dropped.WithLabelValues(pe.code).Inc()
			sc.log.Warn("peer handshake refused", "reason", pe.code, "err", pe.Error(), "claimed_peer", sc.claimed)
			_ = sc.c.SetWriteDeadline(time.Now().Add(sc.s.cfg.WriteTimeout))
			w := newFrameWriter(sc.c)
			if w.WriteFrame(pe.frame(), peerVersion) == nil && w.Flush() == nil {
				sc.s.m.framesOut.WithLabelValues(frame.ERROR).Inc()
				peerCloseWrite(sc.c)
				if pe.drain {
					peerDrain(sc.c)
				}
			}
		case peerIsTimeout(err) && !sc.isStopped():
			sc.s.m.dropped.WithLabelValues(peerCodeTimeout).Inc()
			sc.log.Warn("peer handshake timed out", "timeout", sc.s.cfg.HandshakeTimeout)
		default:
			sc.log.Debug("peer connection ended during handshake", "err", err)
		}
		return
	}
	sc.log = sc.log.With("peer", sc.peer)
	go sc.writeLoop()

	err := sc.readLoop()
	sc.stop(sc.classify(err))
	<-sc.writerDone
	sc.mu.Lock()
	drain := sc.stopErr != nil && sc.stopErr.drain
	sc.mu.Unlock()
	if drain {
		peerDrain(sc.c)
	}
}

// tlsHandshake runs the server side of the TLS handshake under deadline.
// A failure is logged (with the remote address and the reason) and
// counted, and a client that spoke plain text gets a plain-text ERROR; it
// reports whether the handshake succeeded.
func (sc *peerServerConn) tlsHandshake(tc *tls.Conn, deadline time.Time) bool {
	_ = tc.SetDeadline(deadline)
	err := tc.Handshake()
	if err == nil {
		_ = tc.SetWriteDeadline(time.Time{}) // the writers keep their own
		if cs := tc.ConnectionState(); len(cs.PeerCertificates) > 0 {
			sc.log = sc.log.With("peer_cert", cs.PeerCertificates[0].Subject.CommonName)
		}
		return true
	}
	switch {
	case sc.isStopped():
		sc.log.Debug("peer connection ended during the TLS handshake", "err", err)
	case peerIsTimeout(err):
		sc.s.m.dropped.WithLabelValues(peerCodeTimeout).Inc()
		sc.log.Warn("peer TLS handshake timed out", "timeout", sc.s.cfg.HandshakeTimeout)
	case peerIsConnEnd(err):
		sc.log.Debug("peer connection ended during the TLS handshake", "err", err)
	default:
		sc.s.m.dropped.WithLabelValues(peerCodeTLS).Inc()
		sc.log.Warn("peer TLS handshake failed", "reason", peerCodeTLS, "err", err)
		var rhe tls.RecordHeaderError
		if errors.As(err, &rhe) && rhe.Conn != nil {
			// Not TLS at all (an old node, a misconfigured one): say so in
			// its own language, as net/http answers HTTP on an HTTPS port.
			pe := peerPerr(peerCodeTLS, "TLS required", "this node's peer links require TLS (cluster.tls.*)")
			_ = rhe.Conn.SetWriteDeadline(time.Now().Add(sc.s.cfg.WriteTimeout))
			w := newFrameWriter(rhe.Conn)
			if w.WriteFrame(pe.frame(), peerVersion) == nil && w.Flush() == nil {
				sc.s.m.framesOut.WithLabelValues(frame.ERROR).Inc()
				peerCloseWrite(rhe.Conn)
				peerDrain(rhe.Conn)
			}
		}
	}
	return false
}

func (sc *peerServerConn) isStopped() bool {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.stopped
}

// classify turns the reader's error into the ERROR to send, or nil when
// the connection just ended (EOF, reset, stopped by someone else).
func (sc *peerServerConn) classify(err error) *peerProtoErr {
	if err == nil || sc.isStopped() {
		return nil
	}
	var pe *peerProtoErr
	switch {
	case errors.As(err, &pe):
		return pe
	case peerIsFrameError(err):
		return peerPerr(peerCodeMalformed, "malformed frame", "%v", err)
	case peerIsTimeout(err):
		pe := peerPerr(peerCodeHeartbeat, "heart-beat timeout", "nothing received for %v", sc.ir.d)
		pe.drain = false // the peer is silent: nothing to drain
		return pe
	}
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		sc.log.Debug("peer link closed", "err", err)
	} else {
		sc.log.Info("peer link closed", "err", err)
	}
	return nil
}

// handshake reads CONNECT, checks it, and writes CONNECTED. A refusal is
// returned as *peerProtoErr, not written.
func (sc *peerServerConn) handshake(deadline time.Time) error {
	cfg := &sc.s.cfg
	_ = sc.c.SetReadDeadline(deadline)
	var f *frame.Frame
	for f == nil {
		var err error
		if f, err = sc.r.ReadFrame("1.0"); err != nil {
			if peerIsFrameError(err) {
				return peerPerr(peerCodeMalformed, "malformed frame", "%v", err)
			}
			return err
		}
	}
	if f.Command != frame.CONNECT && f.Command != frame.STOMP {
		return peerPerr(peerCodeHandshake, "not connected", "the first frame must be CONNECT, got %s", f.Command)
	}
	if !slices.Contains(strings.Split(f.Header.Get(frame.AcceptVersion), ","), peerVersion) {
		return peerPerr(peerCodeHandshake, "unsupported protocol version", "peer links speak STOMP %s only", peerVersion)
	}
	id := f.Header.Get(peerHeaderNodeID)
	sc.claimed = fioTrunc(id)
	if !peerValidNodeID(id) {
		return peerPerr(peerCodeHandshake, "invalid node ID", "x-node-id must be 1 to %d bytes without control characters", peerMaxNodeID)
	}
	nonce := f.Header.Get(peerHeaderNonce)
	// proofKey is the key the client proved: the server proves back
	// with it.
	var proofKey []byte
	if keys := peerKeys(cfg.SecretKeys, cfg.Secret); len(keys) > 0 {
		b, err := hex.DecodeString(nonce)
		if err == nil && len(b) >= peerNonceBytes && len(b) <= 4*peerNonceBytes {
			proofKey = peerMatchKey(keys, f.Header.Get(peerHeaderAuth), peerMACClient, nonce, id)
		}
		if proofKey == nil {
			return peerPerr(peerCodeAuth, "access refused", "the handshake's proof of the cluster secret is missing or wrong")
		}
	}
	theirs, err := peerParseProtocols(f.Header.Contains(peerHeaderProto))
	if err != nil {
		return peerPerr(peerCodeHandshake, "invalid protocol versions", "%v", err)
	}
	proto, ok := peerLinkProtocol(theirs, cfg.Protocols)
	if !ok {
		// Short, so the client's log shows it whole: the server's log
		// names the client (claimed_peer).
		return peerPerr(peerCodeVersion, "protocol versions do not overlap", "client speaks %s, server speaks %s", theirs, cfg.Protocols)
	}
	hb, ok := f.Header.Contains(frame.HeartBeat)
	if !ok {
		return peerPerr(peerCodeHeartbeat, "heart-beats required", "peers must offer heart-beats")
	}
	cx, cy, err := frame.ParseHeartBeat(hb)
	if err != nil {
		return peerPerr(peerCodeHandshake, "invalid heart-beat header", "heart-beat %q", fioTrunc(hb))
	}
	if cx <= 0 || cx > peerMaxHeartbeat {
		return peerPerr(peerCodeHeartbeat, "heart-beats required", "peers must offer heart-beats at most %v apart", peerMaxHeartbeat)
	}
	// What the client offers and asks, down to cfg.Heartbeat; stating
	// sx >= cy and sy >= cx makes the periods the spec derives exactly sx
	// and sy.
	var sx time.Duration
	if cy > 0 {
		sx = min(max(cy, cfg.Heartbeat), peerMaxHeartbeat)
	}
	sy := max(cx, cfg.Heartbeat)
	sc.peer = id
	sc.sendEvery = sx
	sc.proto = proto
	c := frame.New(frame.CONNECTED, frame.Version, peerVersion, peerHeaderNodeID, cfg.NodeID, frame.HeartBeat, peerHeartbeatHeader(sx, sy),
		peerHeaderProto, cfg.Protocols.String())
	if proofKey != nil {
		c.Header.Add(peerHeaderAuth, peerMAC(proofKey, peerMACServer, nonce, id, cfg.NodeID))
	}
	_ = sc.c.SetWriteDeadline(time.Now().Add(cfg.WriteTimeout))
	w := newFrameWriter(sc.c)
	if err := w.WriteFrame(c, peerVersion); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return err
	}
	sc.s.m.framesOut.WithLabelValues(frame.CONNECTED).Inc()
	sc.ir.d = peerMissedBeats * sy
	sc.log.Debug("peer link accepted", "peer", id, "protocol", proto)
	return nil
}

// readLoop reads requests and hands them to the handler until an error
// or a stop. It takes a MaxInFlight slot before each read, so that with
// MaxInFlight requests unanswered it reads nothing.
func (sc *peerServerConn) readLoop() error {
	for {
		select {
		case sc.slots <- struct{}{}:
		default:
			if h := sc.s.testSlotWait; h != nil {
				h()
			}
			select {
			case sc.slots <- struct{}{}:
			case <-sc.stopCh:
				return nil
			}
		}
		var f *frame.Frame
		for f == nil {
			var err error
			if f, err = sc.r.ReadFrame(peerVersion); err != nil {
				return err
			}
		}
		if f.Command != frame.SEND {
			return peerPerr(peerCodeProtocol, "unexpected frame", "peers send only SEND frames, got %s", f.Command)
		}
		receipt := f.Header.Get(frame.Receipt)
		if receipt == "" {
			return peerPerr(peerCodeProtocol, "missing receipt", "every peer request needs a receipt header")
		}
		if f.Header.Get(PeerHeaderOp) == "" {
			return peerPerr(peerCodeProtocol, "missing x-op", "every peer request needs an x-op header")
		}
		if sc.proto >= 2 {
			if sum, ok := f.Header.Contains(peerHeaderCRC); ok {
				// Hex digits in either case: the value, not its spelling.
				if want := peerCRC(f.Body); !strings.EqualFold(sum, want) {
					return peerPerr(peerCodeChecksum, "body checksum mismatch", "request %q: %s %q, the body's is %s",
						fioTrunc(receipt), peerHeaderCRC, fioTrunc(sum), want)
				}
				f.Header.Del(peerHeaderCRC)
				sc.s.m.checksums.Inc()
			}
		}
		sc.mu.Lock()
		if sc.stopped {
			sc.mu.Unlock()
			return nil
		}
		if _, dup := sc.inflight[receipt]; dup {
			sc.mu.Unlock()
			return peerPerr(peerCodeProtocol, "duplicate receipt", "receipt %q is still in flight", fioTrunc(receipt))
		}
		sc.inflight[receipt] = struct{}{}
		sc.mu.Unlock()
		sc.s.m.framesIn.Inc()
		rep := &peerReply{sc: sc, receipt: receipt}
		sc.s.h.HandlePeer(sc.peer, f, rep.reply)
	}
}

// peerReply is the reply function of one request.
type peerReply struct {
	sc      *peerServerConn
	receipt string
	done    atomic.Bool
}

func (p *peerReply) reply(resp *frame.Frame) {
	sc := p.sc
	if !p.done.CompareAndSwap(false, true) {
		sc.log.Error("peer handler replied twice", "receipt", p.receipt)
		return
	}
	if resp != nil && resp.Command == frame.DISCONNECT {
		reason := ""
		if resp.Header != nil {
			reason = resp.Header.Get(frame.Message)
		}
		sc.stop(&peerProtoErr{code: peerCodeDropped, msg: "peer dropped", detail: reason, drain: true})
		return
	}
	out := sc.answer(p.receipt, resp)
	sc.mu.Lock()
	delete(sc.inflight, p.receipt)
	if sc.stopped {
		sc.mu.Unlock()
		return
	}
	sc.out = append(sc.out, peerOut{f: out, slot: true})
	sc.mu.Unlock()
	sc.wake()
}

// answer builds the frame answering receipt from the handler's reply: a
// RECEIPT or an ERROR with receipt-id and the reply's other headers and
// body. A reply that is neither, or that would break the peer's limits, is
// replaced by an operation failure.
func (sc *peerServerConn) answer(receipt string, resp *frame.Frame) *frame.Frame {
	fail := func(code, msg string) *frame.Frame {
		return frame.New(frame.ERROR, frame.ReceiptId, receipt, PeerHeaderCode, code, frame.Message, msg)
	}
	if resp == nil || (resp.Command != frame.RECEIPT && resp.Command != frame.ERROR) {
		cmd := "nil"
		if resp != nil {
			cmd = resp.Command
		}
		sc.log.Error("peer handler replied with an invalid frame", "command", fioTrunc(cmd))
		return fail(peerCodeInternal, "the handler gave no valid answer")
	}
	out := &frame.Frame{Command: resp.Command, Header: frame.NewHeader(frame.ReceiptId, receipt), Body: resp.Body}
	if h := resp.Header; h != nil {
		for i := 0; i < h.Len(); i++ {
			k, v := h.GetAt(i)
			if k != frame.ReceiptId && k != frame.ContentLength {
				out.Header.Add(k, v)
			}
		}
	}
	if err := peerFrameFits(sc.s.cfg.Limits, out); err != nil {
		sc.log.Error("peer handler's answer does not fit the limits", "err", err)
		return fail(peerCodeTooLarge, "the answer does not fit the link's limits")
	}
	return out
}

// writeLoop writes queued frames, flushing once per batch, and
// heart-beats when idle. It ends after an end item or a write error.
func (sc *peerServerConn) writeLoop() {
	defer close(sc.writerDone)
	w := newFrameWriter(&deadlineWriter{c: sc.c, d: sc.s.cfg.WriteTimeout})
	var tick <-chan time.Time
	if sc.sendEvery > 0 {
		t := time.NewTicker(sc.sendEvery / 2)
		defer t.Stop()
		tick = t.C
	}
	lastWrite := time.Now()
	fail := func(err error) {
		sc.stop(&peerProtoErr{code: peerCodeWrite, msg: "write failed", detail: err.Error()})
		peerHardClose(sc.c)
	}
	var batch []peerOut
	for {
		select {
		case <-sc.signal:
		case <-tick:
			if time.Since(lastWrite) >= sc.sendEvery/2 {
				if err := w.WriteHeartbeat(); err != nil {
					fail(err)
					return
				}
				if err := w.Flush(); err != nil {
					fail(err)
					return
				}
				lastWrite = time.Now()
			}
			continue
		}
		sc.mu.Lock()
		batch, sc.out = sc.out, batch[:0]
		sc.mu.Unlock()
		end := false
		for i := range batch {
			it := batch[i]
			batch[i] = peerOut{}
			if it.f != nil {
				if err := w.WriteFrame(it.f, peerVersion); err != nil {
					fail(err)
					return
				}
				sc.s.m.framesOut.WithLabelValues(it.f.Command).Inc()
			}
			if it.slot {
				select {
				case <-sc.slots:
				default:
				}
			}
			if it.end {
				end = true
				break
			}
		}
		if err := w.Flush(); err != nil {
			fail(err)
			return
		}
		lastWrite = time.Now()
		if end {
			peerCloseWrite(sc.c)
			return
		}
	}
}

// ---------------------------------------------------------------------------
// Client

// PeerClientConfig configures a PeerClient. Zero fields take their
// DefaultPeerClientConfig value, except Secret (empty: no
// authentication), PeerNodeID (empty: any), Registerer (nil: no metrics),
// OnState and Dial.
type PeerClientConfig struct {
	// Addr is the peer's address. Ignored when AddrFunc is set.
	Addr string
	// AddrFunc, when set, is called before each dial for the peer's
	// current address, so a peer that moved is found. An empty result
	// counts as a failed dial.
	AddrFunc func() string
	// Peer names the peer in logs and in the peer label of the metrics;
	// it defaults to PeerNodeID, then Addr. Use one PeerClient per name
	// and registry.
	Peer string
	// PeerNodeID, when set, is the node ID the server must state in
	// CONNECTED; another one fails the handshake (ErrPeerHandshake), so
	// an address taken over by another node is not mistaken for the peer.
	PeerNodeID string
	// Secret is the cluster's shared key (see PeerServer). When set the
	// server must prove it holds it too. SecretKeys, when set, replaces it.
	Secret []byte
	// SecretKeys, when set, returns the cluster's keys, the primary first
	// (see PeerServerConfig.SecretKeys), and replaces Secret: the client
	// proves with the primary and accepts a server's proof made with any
	// of them. It is called at each handshake; no keys means no
	// authentication.
	SecretKeys func() [][]byte
	// TLS, when set, runs a TLS handshake over each dialled connection
	// (Dial's too) before the STOMP handshake, both under
	// HandshakeTimeout. Without ServerName or InsecureSkipVerify, the
	// dialled address's host is the server name to verify.
	TLS *tls.Config
	// NodeID is this node's ID, sent in CONNECT.
	NodeID string
	// Protocols is the range of protocol versions this node speaks (the
	// zero value: the build's, cluster.BuildProtocols), stated in
	// CONNECT. A server whose range does not overlap it is refused
	// (ErrPeerVersion); otherwise the link speaks the highest version
	// both speak.
	Protocols cluster.ProtocolRange
	// Protocol, when set, returns the cluster's effective protocol
	// version (cluster.Node.ProtocolVersion): a request uses the features
	// of version 2 (x-crc32c) only while both it and the link's version
	// are 2 or more. nil means the link's version alone. It is called on
	// the link's writer goroutine, for each request: it must be cheap.
	Protocol func() int
	// Host is sent as CONNECT's host header (the cluster's name).
	Host string
	// Limits bound each frame read from the peer; requests are checked
	// against them too, assuming the peer uses the same.
	Limits Limits
	// MaxInFlight bounds the requests queued or sent and not yet answered;
	// Request blocks while it is reached. Keep it at most the server's
	// MaxInFlight: beyond it the server stops reading, the client's writes
	// stall, and a stall longer than WriteTimeout breaks the link.
	MaxInFlight int
	// DialTimeout bounds a TCP connect.
	DialTimeout time.Duration
	// HandshakeTimeout bounds the handshake after the connect.
	HandshakeTimeout time.Duration
	// WriteTimeout bounds each write: a peer that reads nothing for that
	// long while requests wait is disconnected.
	WriteTimeout time.Duration
	// Heartbeat is the heart-beat period the client offers and asks for,
	// both ways (the server may make it longer). Three periods without a
	// byte from the server close the link.
	Heartbeat time.Duration
	// BackoffMin and BackoffMax bound the wait between failed dials: it
	// starts at BackoffMin and doubles up to BackoffMax, and each wait is
	// drawn between half and all of it (jitter).
	BackoffMin time.Duration
	BackoffMax time.Duration
	// OnState, when set, is called on the client's goroutine when the
	// link comes up (up, nil), when it goes down (false, the cause) and
	// after each failed dial or handshake (false, the error). A refused
	// or reset connection (errors.Is(err, syscall.ECONNREFUSED)) means the
	// peer's host is up and its process is not: a hint to fail fast. It
	// must not block.
	OnState func(up bool, err error)
	// Dial, when set, replaces the TCP dialer (for tests and in-memory
	// networks).
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// Logger receives the client's logs.
	Logger *slog.Logger
	// Registerer receives the metrics; nil means none. Clients may share
	// one registry, with distinct Peer names.
	Registerer prometheus.Registerer
}

// DefaultPeerClientConfig returns a PeerClientConfig with every field set
// but the addresses, IDs, Secret, OnState and Dial.
func DefaultPeerClientConfig() PeerClientConfig {
	return PeerClientConfig{
		Host:             "brokerd",
		Limits:           DefaultPeerLimits(),
		MaxInFlight:      256,
		DialTimeout:      5 * time.Second,
		HandshakeTimeout: 5 * time.Second,
		WriteTimeout:     10 * time.Second,
		Heartbeat:        time.Second,
		BackoffMin:       50 * time.Millisecond,
		BackoffMax:       2 * time.Second,
		Logger:           slog.Default(),
	}
}

// PeerClient is one node's link to one peer: a long-lived connection to
// a PeerServer, re-established with backoff whenever it breaks, carrying
// pipelined requests (see PeerServer for the protocol).
//
// Its goroutines are one for connecting and reading, and one writer per
// connection; every done callback runs on the first, one at a time.
type PeerClient struct {
	cfg    PeerClientConfig
	log    *slog.Logger
	m      peerClientMetrics
	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	slots  chan struct{} // one token per request queued and not answered
	nextID atomic.Uint64

	mu      sync.Mutex
	link    *peerLink     // the live link, nil while down
	ready   chan struct{} // closed while link != nil
	started bool
	closed  bool
	wg      sync.WaitGroup
}

type peerClientMetrics struct {
	protoVec      *prometheus.GaugeVec
	proto         prometheus.Gauge
	upVec         *prometheus.GaugeVec
	rttVec        *prometheus.HistogramVec
	reconnectsVec *prometheus.CounterVec
	up            prometheus.Gauge
	rtt           prometheus.Observer
	reconnects    prometheus.Counter
}

// NewPeerClient returns a PeerClient; call Start to connect.
func NewPeerClient(cfg PeerClientConfig) *PeerClient {
	def := DefaultPeerClientConfig()
	if cfg.Peer == "" {
		cfg.Peer = cfg.PeerNodeID
	}
	if cfg.Peer == "" {
		cfg.Peer = cfg.Addr
	}
	if cfg.Host == "" {
		cfg.Host = def.Host
	}
	cfg.Limits = peerLimits(cfg.Limits)
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = def.MaxInFlight
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = def.DialTimeout
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = def.HandshakeTimeout
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = def.WriteTimeout
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = def.Heartbeat
	}
	cfg.Heartbeat = min(peerRoundMs(cfg.Heartbeat), peerMaxHeartbeat)
	if cfg.BackoffMin <= 0 {
		cfg.BackoffMin = def.BackoffMin
	}
	if cfg.BackoffMax < cfg.BackoffMin {
		cfg.BackoffMax = max(def.BackoffMax, cfg.BackoffMin)
	}
	if cfg.Logger == nil {
		cfg.Logger = def.Logger
	}
	if cfg.Protocols == (cluster.ProtocolRange{}) {
		cfg.Protocols = cluster.BuildProtocols()
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		}
	}
	cfg.Secret = slices.Clone(cfg.Secret)
	ctx, cancel := context.WithCancel(context.Background())
	c := &PeerClient{
		cfg:    cfg,
		log:    cfg.Logger.With("component", "peer-client", "node", cfg.NodeID, "peer", cfg.Peer),
		ctx:    ctx,
		cancel: cancel,
		slots:  make(chan struct{}, cfg.MaxInFlight),
		ready:  make(chan struct{}),
	}
	m := &c.m
	m.upVec = peerRegister(cfg.Registerer, prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "brokerd_peer_link_up", Help: "1 while the link to the peer is connected, 0 otherwise.",
	}, []string{"peer"}))
	m.rttVec = peerRegister(cfg.Registerer, prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "brokerd_peer_request_seconds",
		Help:    "From queueing a peer request to its answer (RECEIPT or operation failure).",
		Buckets: latencyBuckets,
	}, []string{"peer"}))
	m.reconnectsVec = peerRegister(cfg.Registerer, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "brokerd_peer_reconnects_total", Help: "Links to the peer re-established after the first.",
	}, []string{"peer"}))
	m.protoVec = peerRegister(cfg.Registerer, prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "brokerd_peer_link_protocol", Help: "The protocol version the link to the peer speaks (the highest both nodes speak), 0 while it is down.",
	}, []string{"peer"}))
	m.proto = m.protoVec.WithLabelValues(cfg.Peer)
	m.up = m.upVec.WithLabelValues(cfg.Peer)
	m.rtt = m.rttVec.WithLabelValues(cfg.Peer)
	m.reconnects = m.reconnectsVec.WithLabelValues(cfg.Peer)
	return c
}

// Start validates the configuration and starts connecting in the
// background; Request waits for the link.
func (c *PeerClient) Start() error {
	if !peerValidNodeID(c.cfg.NodeID) {
		return fmt.Errorf("peer client: invalid node ID %q", fioTrunc(c.cfg.NodeID))
	}
	if c.cfg.Addr == "" && c.cfg.AddrFunc == nil {
		return errors.New("peer client: no Addr or AddrFunc")
	}
	if c.cfg.Peer == "" {
		return errors.New("peer client: Peer is required with AddrFunc and no PeerNodeID")
	}
	if !c.cfg.Protocols.Valid() {
		return fmt.Errorf("peer client: protocol versions %s: want 1 <= min <= max", c.cfg.Protocols)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrPeerClosed
	}
	if c.started {
		return errors.New("peer client: already started")
	}
	c.started = true
	c.wg.Add(1)
	go c.run()
	return nil
}

// Connected reports whether the link is up now.
func (c *PeerClient) Connected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.link != nil
}

// Ready returns a channel that is closed while the link is up. Once the
// link goes down, Ready returns a new channel, closed when it is up again.
func (c *PeerClient) Ready() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ready
}

// Close stops reconnecting, closes the link, and waits for the client's
// goroutines to end. Requests waiting in Request return ErrPeerClosed;
// queued requests without an answer get an error matching both
// ErrPeerUnknownOutcome and ErrPeerClosed. Close is idempotent.
func (c *PeerClient) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		c.wg.Wait()
		return nil
	}
	c.closed = true
	l := c.link
	c.mu.Unlock()
	c.cancel()
	if l != nil {
		l.closeWith(ErrPeerClosed)
	}
	c.wg.Wait()
	c.m.upVec.DeleteLabelValues(c.cfg.Peer)
	c.m.protoVec.DeleteLabelValues(c.cfg.Peer)
	c.m.rttVec.DeleteLabelValues(c.cfg.Peer)
	c.m.reconnectsVec.DeleteLabelValues(c.cfg.Peer)
	return nil
}

// peerReservedHeader reports whether name is set by Request and may not
// be passed to it.
func peerReservedHeader(name string) bool {
	switch name {
	case frame.Receipt, PeerHeaderOp, frame.ContentLength, peerHeaderCRC:
		return true
	}
	return false
}

// Request sends the operation op to the peer, with the given headers
// (name, value pairs) and body, and arranges for done to be called once
// with the answer:
//
//   - (f, nil): the peer succeeded; f is its RECEIPT (result headers,
//     body), owned by done;
//   - (nil, *PeerError): the peer's handler refused the operation;
//   - (nil, err) with errors.Is(err, ErrPeerUnknownOutcome): the link
//     broke or the client closed before an answer; the request may or may
//     not have taken effect.
//
// Requests are pipelined: Request returns once the request is queued for
// the writer, and many can be outstanding. Request blocks while
// MaxInFlight requests are unanswered and while the link is down, until
// ctx ends; ctx does not bound the request once queued. It returns an
// error, and never calls done, when it could not queue the request:
// ctx.Err(), ErrPeerClosed, or an invalid request (empty op, odd headers,
// a reserved header name: receipt, x-op, content-length, x-crc32c, or a
// frame over Limits, counting the x-crc32c a version-2 link adds). The caller must not modify body until done runs.
//
// done runs on the client's reader goroutine, one call at a time, and
// must not block: in particular it must not wait for Request, which may
// need that goroutine to reconnect.
func (c *PeerClient) Request(ctx context.Context, op string, headers []string, body []byte, done func(resp *frame.Frame, err error)) error {
	if op == "" {
		return errors.New("peer request: empty op")
	}
	if len(headers)%2 != 0 {
		return errors.New("peer request: odd number of header strings")
	}
	for i := 0; i < len(headers); i += 2 {
		if peerReservedHeader(headers[i]) {
			return fmt.Errorf("peer request: header %q is reserved", headers[i])
		}
	}
	if done == nil {
		done = func(*frame.Frame, error) {}
	}
	seq := c.nextID.Add(1)
	id := strconv.FormatUint(seq, 10)
	hs := make([]string, 0, 4+len(headers))
	hs = append(hs, frame.Receipt, id, PeerHeaderOp, op)
	hs = append(hs, headers...)
	// The checksum is made here, on the caller's goroutine, and sent if
	// the link and the cluster speak version 2 (writeLoop).
	var crc string
	if len(body) > 0 {
		crc = peerCRC(body)
		hs = append(hs, peerHeaderCRC, crc)
	}
	f := &frame.Frame{Command: frame.SEND, Header: frame.NewHeader(hs...), Body: body}
	if err := peerFrameFits(c.cfg.Limits, f); err != nil {
		return fmt.Errorf("peer request: %w", err)
	}
	if crc != "" {
		f.Header.Del(peerHeaderCRC)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case c.slots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.ctx.Done():
		return ErrPeerClosed
	}
	call := &peerCall{seq: seq, id: id, f: f, crc: crc, done: done}
	for {
		c.mu.Lock()
		l, ready, closed := c.link, c.ready, c.closed
		c.mu.Unlock()
		if closed {
			<-c.slots
			return ErrPeerClosed
		}
		if l != nil {
			call.start = time.Now()
			if l.enqueue(call) {
				return nil
			}
			// The link died before the request was queued: it was never
			// sent, so it can wait for the next link.
			continue
		}
		select {
		case <-ready:
		case <-ctx.Done():
			<-c.slots
			return ctx.Err()
		case <-c.ctx.Done():
			<-c.slots
			return ErrPeerClosed
		}
	}
}

// peerCall is one request of a PeerClient.
type peerCall struct {
	seq   uint64
	id    string
	f     *frame.Frame // the SEND; nil once written
	crc   string       // the body's x-crc32c, "" without a body
	done  func(*frame.Frame, error)
	start time.Time
}

// peerLink is one connection of a PeerClient.
type peerLink struct {
	cl        *PeerClient
	c         net.Conn
	nodeID    string // the server's
	ir        *peerIdleReader
	r         *frameReader
	w         *frameWriter
	sendEvery time.Duration
	proto     int // the link's protocol version

	signal     chan struct{} // wakes the writer
	stop       chan struct{} // closed when the link ends
	writerDone chan struct{}

	mu      sync.Mutex
	pending map[string]*peerCall // queued or sent, not answered
	queue   []*peerCall          // not yet written
	dead    bool
	cause   error // why the link ended, when known before the reader's error
}

func (l *peerLink) enqueue(call *peerCall) bool {
	l.mu.Lock()
	if l.dead {
		l.mu.Unlock()
		return false
	}
	l.pending[call.id] = call
	l.queue = append(l.queue, call)
	l.mu.Unlock()
	select {
	case l.signal <- struct{}{}:
	default:
	}
	return true
}

// closeWith records cause (if no cause is known yet) and closes the
// connection, which ends the reader.
func (l *peerLink) closeWith(cause error) {
	l.mu.Lock()
	if l.cause == nil {
		l.cause = cause
	}
	l.mu.Unlock()
	peerHardClose(l.c)
}

// take removes and returns the pending call answered by receipt id.
func (l *peerLink) take(id string) *peerCall {
	l.mu.Lock()
	defer l.mu.Unlock()
	call := l.pending[id]
	delete(l.pending, id)
	return call
}

func (c *PeerClient) notify(up bool, err error) {
	if c.cfg.OnState != nil {
		c.cfg.OnState(up, err)
	}
}

// jitter returns a wait between d/2 and d.
func peerJitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + time.Duration(mrand.Int64N(int64(d/2)+1))
}

// run connects, serves each link until it breaks, and reconnects with
// backoff, until Close.
func (c *PeerClient) run() {
	defer c.wg.Done()
	var backoff time.Duration // current backoff; 0: dial at once
	links := 0
	for {
		if backoff > 0 {
			t := time.NewTimer(peerJitter(backoff))
			select {
			case <-t.C:
			case <-c.ctx.Done():
				t.Stop()
				return
			}
		}
		if c.ctx.Err() != nil {
			return
		}
		l, err := c.connect()
		if err != nil {
			if c.ctx.Err() != nil {
				return
			}
			if errors.Is(err, ErrPeerAuth) || errors.Is(err, ErrPeerHandshake) || errors.Is(err, ErrPeerTLS) || errors.Is(err, ErrPeerVersion) {
				c.log.Warn("peer handshake failed", "err", err)
			} else {
				c.log.Debug("peer dial failed", "err", err)
			}
			c.notify(false, err)
			backoff = min(max(2*backoff, c.cfg.BackoffMin), c.cfg.BackoffMax)
			continue
		}
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			peerHardClose(l.c)
			return
		}
		c.link = l
		close(c.ready)
		c.mu.Unlock()
		links++
		if links > 1 {
			c.m.reconnects.Inc()
		}
		c.m.up.Set(1)
		c.m.proto.Set(float64(l.proto))
		c.log.Info("peer link up", "peer_node", l.nodeID, "addr", l.c.RemoteAddr().String(), "protocol", l.proto)
		c.notify(true, nil)
		up := time.Now()

		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			l.writeLoop()
		}()
		cause := l.readLoop()
		l.mu.Lock()
		if l.cause != nil {
			cause = l.cause
		}
		l.mu.Unlock()
		if c.ctx.Err() != nil {
			cause = ErrPeerClosed
		}
		c.m.up.Set(0)
		c.m.proto.Set(0)
		l.fail(cause)
		if c.ctx.Err() != nil {
			return
		}
		c.log.Warn("peer link down", "err", cause)
		c.notify(false, cause)
		// A link that held for a while is redialled at once; one that
		// breaks right after its handshake backs off like a failed dial.
		if time.Since(up) >= c.cfg.BackoffMax {
			backoff = 0
		} else {
			backoff = min(max(2*backoff, c.cfg.BackoffMin), c.cfg.BackoffMax)
		}
	}
}

// fail ends the link: it is no longer the client's, its writer stops,
// its connection closes, and every unanswered request fails with an
// unknown outcome caused by cause, in the order they were made.
func (l *peerLink) fail(cause error) {
	c := l.cl
	c.mu.Lock()
	l.mu.Lock()
	l.dead = true
	calls := make([]*peerCall, 0, len(l.pending))
	for _, call := range l.pending {
		calls = append(calls, call)
	}
	l.pending = nil
	l.queue = nil
	if c.link == l {
		c.link = nil
		c.ready = make(chan struct{})
	}
	l.mu.Unlock()
	c.mu.Unlock()
	close(l.stop)
	peerHardClose(l.c)
	<-l.writerDone
	slices.SortFunc(calls, func(a, b *peerCall) int { return cmp.Compare(a.seq, b.seq) })
	err := fmt.Errorf("%w: %w", ErrPeerUnknownOutcome, cause)
	for _, call := range calls {
		<-c.slots
		call.done(nil, err)
	}
}

// connect dials the peer and runs the handshake.
func (c *PeerClient) connect() (*peerLink, error) {
	addr := c.cfg.Addr
	if c.cfg.AddrFunc != nil {
		addr = c.cfg.AddrFunc()
	}
	if addr == "" {
		return nil, errors.New("peer dial: no address")
	}
	dctx, cancel := context.WithTimeout(c.ctx, c.cfg.DialTimeout)
	conn, err := c.cfg.Dial(dctx, addr)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("peer dial %s: %w", addr, err)
	}
	// Close interrupts the handshake.
	raw := conn
	stop := context.AfterFunc(c.ctx, func() { _ = raw.SetDeadline(time.Now()) })
	// One bound for the TLS and the STOMP handshakes together.
	_ = conn.SetDeadline(time.Now().Add(c.cfg.HandshakeTimeout))
	var l *peerLink
	if c.cfg.TLS != nil {
		tc := tls.Client(conn, c.tlsConfig(addr))
		if err = tc.Handshake(); err != nil {
			if !peerIsTimeout(err) && !peerIsConnEnd(err) {
				err = fmt.Errorf("%w: %w", ErrPeerTLS, err)
			}
		} else {
			conn = tc
		}
	}
	if err == nil {
		l, err = c.handshake(conn)
		// With TLS 1.3 the client's handshake is over before the server
		// has checked its certificate: a refusal arrives as an alert on
		// the first read.
		if err != nil && c.cfg.TLS != nil && peerIsTLSAlert(err) {
			err = fmt.Errorf("%w: %w", ErrPeerTLS, err)
		}
	}
	if !stop() && err == nil {
		err = ErrPeerClosed
	}
	if err != nil {
		peerHardClose(conn)
		return nil, fmt.Errorf("peer %s: %w", addr, err)
	}
	return l, nil
}

// tlsConfig is the client's TLS config for a dial to addr: the configured
// one, with addr's host as the name to verify when it names none.
func (c *PeerClient) tlsConfig(addr string) *tls.Config {
	cfg := c.cfg.TLS
	if cfg.ServerName != "" || cfg.InsecureSkipVerify {
		return cfg
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	cfg = cfg.Clone()
	cfg.ServerName = host
	return cfg
}

func (c *PeerClient) handshake(conn net.Conn) (*peerLink, error) {
	cfg := &c.cfg
	var nb [peerNonceBytes]byte
	_, _ = rand.Read(nb[:])
	nonce := hex.EncodeToString(nb[:])
	f := frame.New(frame.CONNECT,
		frame.AcceptVersion, peerVersion,
		frame.Host, cfg.Host,
		peerHeaderNodeID, cfg.NodeID,
		frame.HeartBeat, peerHeartbeatHeader(cfg.Heartbeat, cfg.Heartbeat),
		peerHeaderNonce, nonce,
		peerHeaderProto, cfg.Protocols.String())
	keys := peerKeys(cfg.SecretKeys, cfg.Secret)
	if len(keys) > 0 {
		f.Header.Add(peerHeaderAuth, peerMAC(keys[0], peerMACClient, nonce, cfg.NodeID))
	}
	w := newFrameWriter(&deadlineWriter{c: conn, d: cfg.WriteTimeout})
	if err := w.WriteFrame(f, peerVersion); err != nil {
		return nil, err
	}
	if err := w.Flush(); err != nil {
		return nil, err
	}
	ir := &peerIdleReader{c: conn}
	r := newFrameReader(ir, cfg.Limits)
	var resp *frame.Frame
	for resp == nil {
		var err error
		if resp, err = r.ReadFrame("1.0"); err != nil {
			if peerIsFrameError(err) {
				return nil, fmt.Errorf("%w: %w", ErrPeerHandshake, err)
			}
			return nil, err
		}
	}
	switch resp.Command {
	case frame.CONNECTED:
	case frame.ERROR:
		kind := ErrPeerHandshake
		switch resp.Header.Get(PeerHeaderCode) {
		case peerCodeAuth:
			kind = ErrPeerAuth
		case peerCodeTLS:
			kind = ErrPeerTLS
		case peerCodeVersion:
			kind = ErrPeerVersion
		}
		return nil, fmt.Errorf("%w: server refused: %s: %s", kind, fioTrunc(resp.Header.Get(frame.Message)), fioTrunc(string(resp.Body)))
	default:
		return nil, fmt.Errorf("%w: answer %s to CONNECT", ErrPeerHandshake, fioTrunc(resp.Command))
	}
	if v := resp.Header.Get(frame.Version); v != peerVersion {
		return nil, fmt.Errorf("%w: version %q", ErrPeerHandshake, fioTrunc(v))
	}
	id := resp.Header.Get(peerHeaderNodeID)
	if !peerValidNodeID(id) {
		return nil, fmt.Errorf("%w: invalid node ID %q", ErrPeerHandshake, fioTrunc(id))
	}
	if len(keys) > 0 && peerMatchKey(keys, resp.Header.Get(peerHeaderAuth), peerMACServer, nonce, cfg.NodeID, id) == nil {
		return nil, fmt.Errorf("%w: the server did not prove it holds the cluster secret", ErrPeerAuth)
	}
	if cfg.PeerNodeID != "" && id != cfg.PeerNodeID {
		return nil, fmt.Errorf("%w: node %q answered, want %q", ErrPeerHandshake, fioTrunc(id), fioTrunc(cfg.PeerNodeID))
	}
	theirs, err := peerParseProtocols(resp.Header.Contains(peerHeaderProto))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPeerHandshake, err)
	}
	proto, ok := peerLinkProtocol(cfg.Protocols, theirs)
	if !ok {
		return nil, fmt.Errorf("%w: node %s speaks protocol versions %s, node %s speaks %s", ErrPeerVersion, fioTrunc(id), theirs, cfg.NodeID, cfg.Protocols)
	}
	sx, sy, err := frame.ParseHeartBeat(resp.Header.Get(frame.HeartBeat))
	if err != nil || sx <= 0 {
		return nil, fmt.Errorf("%w: the server offers no heart-beats", ErrPeerHandshake)
	}
	var sendEvery time.Duration
	if sy > 0 {
		sendEvery = min(max(cfg.Heartbeat, sy), peerMaxHeartbeat)
	}
	// Only the read deadline: the writer keeps its own in force.
	_ = conn.SetReadDeadline(time.Time{})
	ir.d = peerMissedBeats * min(max(cfg.Heartbeat, sx), peerMaxHeartbeat)
	return &peerLink{
		cl:         c,
		c:          conn,
		nodeID:     id,
		ir:         ir,
		r:          r,
		w:          w,
		sendEvery:  sendEvery,
		proto:      proto,
		signal:     make(chan struct{}, 1),
		stop:       make(chan struct{}),
		writerDone: make(chan struct{}),
		pending:    make(map[string]*peerCall),
	}, nil
}

// readLoop reads answers and calls their done callbacks until the link
// breaks; it returns why.
func (l *peerLink) readLoop() error {
	c := l.cl
	for {
		f, err := l.r.ReadFrame(peerVersion)
		if err != nil {
			switch {
			case peerIsTimeout(err):
				return fmt.Errorf("%w: nothing received for %v", ErrPeerHeartbeat, l.ir.d)
			case peerIsFrameError(err):
				return fmt.Errorf("%w: %w", ErrPeerProtocol, err)
			}
			return err
		}
		if f == nil {
			continue // heart-beat
		}
		if f.Command != frame.RECEIPT && f.Command != frame.ERROR {
			return fmt.Errorf("%w: unexpected %s frame", ErrPeerProtocol, f.Command)
		}
		id, ok := f.Header.Contains(frame.ReceiptId)
		if !ok {
			if f.Command == frame.ERROR {
				return fmt.Errorf("%w: %s (%s): %s", ErrPeerDropped, fioTrunc(f.Header.Get(frame.Message)),
					fioTrunc(f.Header.Get(PeerHeaderCode)), fioTrunc(string(f.Body)))
			}
			return fmt.Errorf("%w: RECEIPT without receipt-id", ErrPeerProtocol)
		}
		call := l.take(id)
		if call == nil {
			return fmt.Errorf("%w: answer to receipt %q, which is not pending", ErrPeerProtocol, fioTrunc(id))
		}
		c.m.rtt.Observe(time.Since(call.start).Seconds())
		<-c.slots
		if f.Command == frame.RECEIPT {
			call.done(f, nil)
		} else {
			call.done(nil, &PeerError{Code: f.Header.Get(PeerHeaderCode), Message: f.Header.Get(frame.Message)})
		}
	}
}

// writeLoop writes queued requests, flushing once per batch, and
// heart-beats when idle, until the link ends.
func (l *peerLink) writeLoop() {
	defer close(l.writerDone)
	w := l.w
	var tick <-chan time.Time
	if l.sendEvery > 0 {
		t := time.NewTicker(l.sendEvery / 2)
		defer t.Stop()
		tick = t.C
	}
	lastWrite := time.Now()
	var batch []*peerCall
	for {
		select {
		case <-l.stop:
			return
		case <-l.signal:
		case <-tick:
			if time.Since(lastWrite) >= l.sendEvery/2 {
				if err := w.WriteHeartbeat(); err != nil {
					l.closeWith(err)
					return
				}
				if err := w.Flush(); err != nil {
					l.closeWith(err)
					return
				}
				lastWrite = time.Now()
			}
			continue
		}
		l.mu.Lock()
		batch, l.queue = l.queue, batch[:0]
		l.mu.Unlock()
		v2 := l.proto >= 2 && (l.cl.cfg.Protocol == nil || l.cl.cfg.Protocol() >= 2)
		for i, call := range batch {
			batch[i] = nil
			if v2 && call.crc != "" {
				call.f.Header.Add(peerHeaderCRC, call.crc)
			}
			if err := w.WriteFrame(call.f, peerVersion); err != nil {
				l.closeWith(err)
				return
			}
			call.f = nil // the body is the caller's again once done runs
		}
		if err := w.Flush(); err != nil {
			l.closeWith(err)
			return
		}
		lastWrite = time.Now()
	}
}
