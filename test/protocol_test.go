package test

// Raw-frame checks of the STOMP 1.0/1.1/1.2 specifications, each one about
// behaviour a client would notice on the wire.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/config"
	bstomp "github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
	"golang.org/x/crypto/bcrypt"
)

// protoFrame encodes a frame; hdr holds header lines "name:value" exactly as
// they go on the wire (already escaped).
func protoFrame(cmd, body string, hdr ...string) string {
	var sb strings.Builder
	sb.WriteString(cmd + "\n")
	for _, h := range hdr {
		sb.WriteString(h + "\n")
	}
	sb.WriteString("\n" + body + "\x00")
	return sb.String()
}

// protoConnect sends CONNECT with the given header lines and returns the
// server's answer.
func (rc *rawConn) protoConnect(hdr ...string) *frame.Frame {
	rc.t.Helper()
	rc.write(protoFrame(frame.CONNECT, "", hdr...))
	return rc.read()
}

// protoConnectVersion connects with accept-version v ("" for none) and
// expects CONNECTED with version want.
func (rc *rawConn) protoConnectVersion(v, want string) *frame.Frame {
	rc.t.Helper()
	hdr := []string{"host:/"}
	if v != "" {
		hdr = append(hdr, "accept-version:"+v)
	}
	f := rc.protoConnect(hdr...)
	if f.Command != frame.CONNECTED {
		rc.t.Fatalf("accept-version %q: want CONNECTED, got %s %v %q", v, f.Command, f.Header, f.Body)
	}
	if got := f.Header.Get(frame.Version); got != want {
		rc.t.Fatalf("accept-version %q: CONNECTED version %q, want %q", v, got, want)
	}
	return f
}

// protoReceipt reads frames up to the RECEIPT for id and returns the
// MESSAGE frames read before it.
func (rc *rawConn) protoReceipt(id string) []*frame.Frame {
	rc.t.Helper()
	var msgs []*frame.Frame
	for {
		f := rc.read()
		switch f.Command {
		case frame.MESSAGE:
			msgs = append(msgs, f)
		case frame.RECEIPT:
			if got := f.Header.Get(frame.ReceiptId); got != id {
				rc.t.Fatalf("RECEIPT receipt-id %q, want %q", got, id)
			}
			return msgs
		default:
			rc.t.Fatalf("waiting for RECEIPT %s: got %s %v %q", id, f.Command, f.Header, f.Body)
		}
	}
}

// protoMessage reads the next frame and expects a MESSAGE.
func (rc *rawConn) protoMessage() *frame.Frame {
	rc.t.Helper()
	f := rc.read()
	if f.Command != frame.MESSAGE {
		rc.t.Fatalf("want MESSAGE, got %s %v %q", f.Command, f.Header, f.Body)
	}
	return f
}

// protoRaw is b.raw() reporting failures to t (a subtest may share b).
func protoRaw(t testing.TB, b *broker) *rawConn {
	t.Helper()
	rc := b.raw()
	rc.t = t
	return rc
}

// wireFrame is a frame as read off the wire, headers not unescaped.
type wireFrame struct {
	cmd     string
	headers []string // raw "name:value" lines
	body    []byte
}

// raw returns the raw value of the first header line whose raw name is name.
func (w *wireFrame) raw(name string) (string, bool) {
	for _, h := range w.headers {
		if k, v, ok := strings.Cut(h, ":"); ok && k == name {
			return v, true
		}
	}
	return "", false
}

// protoLine reads one line from rc.br without its EOL.
func (rc *rawConn) protoLine() string {
	rc.t.Helper()
	s, err := rc.br.ReadString('\n')
	if err != nil {
		rc.t.Fatalf("read line: %v after %q", err, s)
	}
	return strings.TrimSuffix(strings.TrimSuffix(s, "\n"), "\r")
}

// readWire reads the next frame byte by byte from rc.br (never mix with
// rc.read on the same connection), skipping heart-beats.
func (rc *rawConn) readWire() *wireFrame {
	rc.t.Helper()
	_ = rc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	w := &wireFrame{}
	for w.cmd == "" {
		w.cmd = rc.protoLine()
	}
	for {
		l := rc.protoLine()
		if l == "" {
			break
		}
		w.headers = append(w.headers, l)
	}
	if v, ok := w.raw(frame.ContentLength); ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			rc.t.Fatalf("%s: content-length %q", w.cmd, v)
		}
		w.body = make([]byte, n+1)
		if _, err := io.ReadFull(rc.br, w.body); err != nil {
			rc.t.Fatalf("%s: read %d-byte body: %v", w.cmd, n, err)
		}
		if w.body[n] != 0 {
			rc.t.Fatalf("%s: no NUL after the %d-byte body", w.cmd, n)
		}
		w.body = w.body[:n]
		return w
	}
	b, err := rc.br.ReadBytes(0)
	if err != nil {
		rc.t.Fatalf("%s: read body: %v", w.cmd, err)
	}
	w.body = b[:len(b)-1]
	return w
}

// ---------------------------------------------------------------------------
// Version negotiation

func TestProtocolVersionNegotiation(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	for _, tc := range []struct{ accept, want string }{
		{"1.0", "1.0"},
		{"1.1", "1.1"},
		{"1.2", "1.2"},
		{"1.0,1.1,1.2", "1.2"},
		{"1.0,1.1", "1.1"},
		{"1.2,1.0", "1.2"},
		{"1.1,2.0", "1.1"},
		{"", "1.0"}, // no accept-version: a 1.0 client
	} {
		t.Run("accept="+tc.accept, func(t *testing.T) {
			rc := protoRaw(t, b)
			f := rc.protoConnectVersion(tc.accept, tc.want)
			if f.Header.Get(frame.Session) == "" {
				t.Errorf("CONNECTED has no session header: %v", f.Header)
			}
			if f.Header.Get(frame.Server) == "" {
				t.Errorf("CONNECTED has no server header: %v", f.Header)
			}
			if _, ok := f.Header.Contains(frame.HeartBeat); ok != (tc.want != "1.0") {
				t.Errorf("version %s: heart-beat header present=%v: %v", tc.want, ok, f.Header)
			}
			// The session is usable.
			rc.write(protoFrame(frame.DISCONNECT, "", "receipt:bye"))
			rc.protoReceipt("bye")
			rc.expectClosed()
		})
	}
}

func TestProtocolVersionUnsupported(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	rc := protoRaw(t, b)
	rc.write(protoFrame(frame.CONNECT, "", "accept-version:2.0", "host:/"))
	w := rc.readWire()
	if w.cmd != frame.ERROR {
		t.Fatalf("got %s %v", w.cmd, w.headers)
	}
	if msg, _ := w.raw(frame.Message); !strings.Contains(msg, "unsupported protocol version") {
		t.Fatalf("ERROR message %q", msg)
	}
	// An ERROR with a body says how long it is and what it is (1.2 spec).
	if len(w.body) == 0 {
		t.Errorf("ERROR has no body")
	}
	if cl, _ := w.raw(frame.ContentLength); cl != strconv.Itoa(len(w.body)) {
		t.Errorf("ERROR content-length %q for a %d-byte body", cl, len(w.body))
	}
	if ct, _ := w.raw(frame.ContentType); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("ERROR content-type %q", ct)
	}
	rc.expectClosed()
	v, _ := w.raw(frame.Version)
	got := map[string]bool{}
	for _, s := range strings.Split(v, ",") {
		got[strings.TrimSpace(s)] = true
	}
	if !got["1.0"] || !got["1.1"] || !got["1.2"] || len(got) != 3 {
		t.Fatalf("ERROR version header %q, want the supported versions 1.0,1.1,1.2", v)
	}
}

func TestProtocolStompCommand(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	rc.write(protoFrame(frame.STOMP, "", "accept-version:1.2", "host:/"))
	f := rc.read()
	if f.Command != frame.CONNECTED || f.Header.Get(frame.Version) != "1.2" {
		t.Fatalf("STOMP: want CONNECTED version 1.2, got %s %v", f.Command, f.Header)
	}
	// The session behaves like one opened with CONNECT (1.2 escaping included).
	rc.write(protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "receipt:s"))
	rc.protoReceipt("s")
	rc.write(protoFrame(frame.SEND, "hi", "destination:"+q, `x:a\cb`))
	m := rc.protoMessage()
	if string(m.Body) != "hi" || m.Header.Get("x") != "a:b" {
		t.Fatalf("MESSAGE %v %q", m.Header, m.Body)
	}
}

func TestProtocolHostOptional(t *testing.T) {
	// STOMP 1.1 and 1.2 make host a required client header, but leave the
	// server free to pick a default virtual host; stomp.py 8 sends no host
	// unless given a vhost, so refusing would refuse its default
	// connection. brokerd has one virtual host and accepts any or none.
	t.Parallel()
	b := startBroker(t, nil)
	for _, v := range []string{"1.0", "1.1", "1.2", "1.0,1.1,1.2"} {
		for _, cmd := range []string{frame.CONNECT, frame.STOMP} {
			for _, host := range []string{"", "host:/", "host:anything"} {
				t.Run(cmd+"/"+v+"/"+host, func(t *testing.T) {
					rc := protoRaw(t, b)
					if host == "" {
						rc.write(protoFrame(cmd, "", "accept-version:"+v))
					} else {
						rc.write(protoFrame(cmd, "", "accept-version:"+v, host))
					}
					if f := rc.read(); f.Command != frame.CONNECTED {
						t.Fatalf("got %s %v %q", f.Command, f.Header, f.Body)
					}
				})
			}
		}
	}
}

// TestProtocolCRLF: STOMP 1.2 allows CRLF line endings in frames.
func TestProtocolCRLF(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	rc.write("CONNECT\r\naccept-version:1.2\r\nhost:/\r\n\r\n\x00")
	if f := rc.read(); f.Command != frame.CONNECTED {
		t.Fatalf("got %s %v", f.Command, f.Header)
	}
	rc.write("SUBSCRIBE\r\nid:0\r\ndestination:" + q + "\r\nreceipt:s\r\n\r\n\x00")
	rc.protoReceipt("s")
	rc.write("SEND\r\ndestination:" + q + "\r\nx:y\r\n\r\nbody\x00")
	m := rc.protoMessage()
	if string(m.Body) != "body" || m.Header.Get("x") != "y" || m.Header.Get(frame.Destination) != q {
		t.Fatalf("MESSAGE %v %q", m.Header, m.Body)
	}
}

// ---------------------------------------------------------------------------
// Heart-beating

func TestProtocolHeartbeatConnectedHeader(t *testing.T) {
	t.Parallel()
	// CONNECTED states the periods the server uses: what the client asks
	// for, down to stomp.HeartbeatMin (1s by default), 0 where the client
	// asks for none.
	b := startBroker(t, func(c *config.Config) {
		c.STOMP.HeartbeatSend = 250 * time.Millisecond
		c.STOMP.HeartbeatReceive = 750 * time.Millisecond
	})
	for _, tc := range []struct{ ask, want string }{
		{"0,0", "0,0"},
		{"2000,3000", "3000,2000"},
		{"100,100", "1000,1000"},
	} {
		f := protoRaw(t, b).protoConnect("accept-version:1.2", "host:/", "heart-beat:"+tc.ask)
		if got := f.Header.Get(frame.HeartBeat); got != tc.want {
			t.Fatalf("client heart-beat %s: CONNECTED heart-beat %q, want %s", tc.ask, got, tc.want)
		}
	}
	// No heart-beat header means 0,0.
	f := protoRaw(t, b).protoConnect("accept-version:1.1", "host:/")
	if got := f.Header.Get(frame.HeartBeat); got != "0,0" {
		t.Fatalf("CONNECTED heart-beat %q, want 0,0", got)
	}
	// A server that neither sends nor wants heart-beats says 0,0.
	b3 := startBroker(t, func(c *config.Config) {
		c.STOMP.HeartbeatSend = 0
		c.STOMP.HeartbeatReceive = 0
	})
	f = protoRaw(t, b3).protoConnect("accept-version:1.2", "host:/", "heart-beat:100,100")
	if got := f.Header.Get(frame.HeartBeat); got != "0,0" {
		t.Fatalf("CONNECTED heart-beat %q, want 0,0", got)
	}
}

func TestProtocolHeartbeatInvalidHeader(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	for _, hb := range []string{"x,1", "1", "-1,0", "1,2,3"} {
		t.Run(hb, func(t *testing.T) {
			rc := protoRaw(t, b)
			rc.write(protoFrame(frame.CONNECT, "", "accept-version:1.2", "host:/", "heart-beat:"+hb))
			rc.expectError("heart-beat")
		})
	}
}

// TestProtocolHeartbeatServerSends: the client wants a heart-beat every
// second (the default stomp.HeartbeatMin): the server sends EOLs while idle.
func TestProtocolHeartbeatServerSends(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	rc := protoRaw(t, b)
	rc.write(protoFrame(frame.CONNECT, "", "accept-version:1.2", "host:/", "heart-beat:0,1000"))
	w := rc.readWire()
	if w.cmd != frame.CONNECTED {
		t.Fatalf("got %s %v", w.cmd, w.headers)
	}
	if hb, _ := w.raw(frame.HeartBeat); hb != "1000,0" {
		t.Fatalf("CONNECTED heart-beat %q, want 1000,0", hb)
	}
	start := time.Now()
	_ = rc.c.SetReadDeadline(start.Add(3 * time.Second))
	var got []byte
	newlines := 0
	for newlines < 2 {
		c, err := rc.br.ReadByte()
		if err != nil {
			t.Fatalf("got %d heart-beats (%q) in %v, want 2 within 3s: %v", newlines, got, time.Since(start), err)
		}
		got = append(got, c)
		switch c {
		case '\n':
			newlines++
		case '\r':
		default:
			t.Fatalf("unexpected byte %q between frames (read %q)", c, got)
		}
	}
	// The session still works after heart-beats.
	_ = rc.c.SetReadDeadline(time.Time{})
	rc.write(protoFrame(frame.DISCONNECT, "", "receipt:bye"))
	if w := rc.readWire(); w.cmd != frame.RECEIPT {
		t.Fatalf("got %s %v", w.cmd, w.headers)
	}
}

// TestProtocolHeartbeatNoneFor10: STOMP 1.0 has no heart-beating; a 1.0
// client must not receive bare EOLs even if it sends a heart-beat header.
func TestProtocolHeartbeatNoneFor10(t *testing.T) {
	t.Parallel()
	b := startBroker(t, func(c *config.Config) { c.STOMP.HeartbeatSend = 20 * time.Millisecond })
	rc := protoRaw(t, b)
	rc.write(protoFrame(frame.CONNECT, "", "accept-version:1.0", "heart-beat:0,20"))
	if w := rc.readWire(); w.cmd != frame.CONNECTED {
		t.Fatalf("got %s %v", w.cmd, w.headers)
	}
	_ = rc.c.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
	var buf [64]byte
	n, err := rc.br.Read(buf[:])
	if n > 0 {
		t.Fatalf("1.0 session received %q", buf[:n])
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("want a read timeout, got %v", err)
	}
}

// TestProtocolHeartbeatTimeout: a client that promised heart-beats every
// 100 ms and sends nothing is disconnected.
func TestProtocolHeartbeatTimeout(t *testing.T) {
	t.Parallel()
	b := startBroker(t, func(c *config.Config) {
		c.STOMP.HeartbeatSend = 0
		c.STOMP.HeartbeatReceive = 100 * time.Millisecond
	})
	rc := protoRaw(t, b)
	f := rc.protoConnect("accept-version:1.2", "host:/", "heart-beat:100,0")
	if f.Command != frame.CONNECTED {
		t.Fatalf("got %s %v", f.Command, f.Header)
	}
	start := time.Now()
	_ = rc.c.SetReadDeadline(start.Add(5 * time.Second))
	fr, err := rc.r.Read()
	for err == nil && fr == nil {
		fr, err = rc.r.Read()
	}
	if err == nil {
		if fr.Command != frame.ERROR || !strings.Contains(fr.Header.Get(frame.Message), "heart-beat") {
			t.Fatalf("want ERROR heart-beat timeout or close, got %s %v", fr.Command, fr.Header)
		}
		rc.expectClosed()
	} else if !errors.Is(err, io.EOF) {
		t.Fatalf("want close, got %v", err)
	}
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Fatalf("closed after %v, before even one heart-beat period", d)
	}
}

// TestProtocolHeartbeatKeepsAlive: the same client sending an EOL every
// 50 ms stays connected well past the timeout of a silent one.
func TestProtocolHeartbeatKeepsAlive(t *testing.T) {
	t.Parallel()
	b := startBroker(t, func(c *config.Config) {
		c.STOMP.HeartbeatSend = 0
		c.STOMP.HeartbeatReceive = 100 * time.Millisecond
	})
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	f := rc.protoConnect("accept-version:1.2", "host:/", "heart-beat:100,0")
	if f.Command != frame.CONNECTED {
		t.Fatalf("got %s %v", f.Command, f.Header)
	}
	// The silent client above is closed after about 2*100ms+1s.
	end := time.Now().Add(1800 * time.Millisecond)
	for i := 0; time.Now().Before(end); i++ {
		if i%2 == 0 {
			rc.write("\n")
		} else {
			rc.write("\r\n")
		}
		time.Sleep(50 * time.Millisecond)
	}
	rc.write(protoFrame(frame.SEND, "alive", "destination:"+q, "receipt:r"))
	rc.protoReceipt("r")
}

// TestProtocolHeartbeatSlowFrame: heart-beating is about any data: a client
// that promised heart-beats and is busy sending one large frame slowly, a
// chunk every 50 ms, is not cut off.
func TestProtocolHeartbeatSlowFrame(t *testing.T) {
	t.Parallel()
	b := startBroker(t, func(c *config.Config) {
		c.STOMP.HeartbeatSend = 0
		c.STOMP.HeartbeatReceive = 100 * time.Millisecond
	})
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	if f := rc.protoConnect("accept-version:1.2", "host:/", "heart-beat:100,0"); f.Command != frame.CONNECTED {
		t.Fatalf("got %s %v", f.Command, f.Header)
	}
	rc.write("SEND\ndestination:" + q + "\nreceipt:r\n\n")
	end := time.Now().Add(1800 * time.Millisecond) // past the 1.2 s a silent client gets
	for time.Now().Before(end) {
		if _, err := io.WriteString(rc.c, "chunk "); err != nil {
			t.Fatalf("the server dropped a client that was sending a frame: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	rc.write("\x00")
	_ = rc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	f, err := rc.r.Read()
	if err != nil {
		t.Fatalf("want RECEIPT, got %v", err)
	}
	if f.Command != frame.RECEIPT {
		t.Fatalf("want RECEIPT, got %s %v %q", f.Command, f.Header, f.Body)
	}
}

// TestProtocolConnectTimeout: a connection that does not complete its
// CONNECT frame in stomp.connect_timeout is closed.
func TestProtocolConnectTimeout(t *testing.T) {
	t.Parallel()
	b := startBroker(t, func(c *config.Config) { c.STOMP.ConnectTimeout = 200 * time.Millisecond })
	for _, partial := range []string{"", "CONNECT\naccept-version:1.2\n"} {
		t.Run(fmt.Sprintf("%q", partial), func(t *testing.T) {
			rc := protoRaw(t, b)
			if partial != "" {
				rc.write(partial)
			}
			start := time.Now()
			_ = rc.c.SetReadDeadline(start.Add(3 * time.Second))
			data, err := io.ReadAll(rc.br)
			if err != nil {
				t.Fatalf("want close within 3s, got %v after %q", err, data)
			}
			if len(data) > 0 && !bytes.HasPrefix(data, []byte("ERROR\n")) {
				t.Fatalf("got %q", data)
			}
			if d := time.Since(start); d < 150*time.Millisecond {
				t.Fatalf("closed after %v, before connect_timeout", d)
			}
		})
	}
}

// TestProtocolDisconnectWithoutReceipt: DISCONNECT without a receipt ends
// the connection quietly.
func TestProtocolDisconnectWithoutReceipt(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	rc := protoRaw(t, b)
	rc.connect()
	rc.write(protoFrame(frame.DISCONNECT, ""))
	rc.expectClosed()
}

// ---------------------------------------------------------------------------
// Header escaping

// TestProtocolEscaping12: escaped header values arrive decoded and are
// re-escaped identically on the wire for a 1.2 subscriber.
func TestProtocolEscaping12(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)

	sub := protoRaw(t, b)
	sub.write(protoFrame(frame.CONNECT, "", "accept-version:1.2", "host:/"))
	if w := sub.readWire(); w.cmd != frame.CONNECTED {
		t.Fatalf("got %s", w.cmd)
	}
	sub.write(protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "receipt:s"))
	if w := sub.readWire(); w.cmd != frame.RECEIPT {
		t.Fatalf("got %s %v", w.cmd, w.headers)
	}
	q2 := q + "-gostomp"

	p := protoRaw(t, b)
	p.connect()
	hdr := []string{`x-esc:a\cb\nc\\d`, `x-cr:l1\rl2`, `x\cname:v`}
	p.write(protoFrame(frame.SEND, "e", append([]string{"destination:" + q, "receipt:1"}, hdr...)...))
	p.protoReceipt("1")
	p.write(protoFrame(frame.SEND, "e", append([]string{"destination:" + q2, "receipt:2"}, hdr...)...))
	p.protoReceipt("2")
	gs, err := b.dial().Subscribe(q2, stomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}

	w := sub.readWire()
	if w.cmd != frame.MESSAGE {
		t.Fatalf("got %s %v", w.cmd, w.headers)
	}
	for _, h := range hdr {
		found := false
		for _, l := range w.headers {
			found = found || l == h
		}
		if !found {
			t.Errorf("1.2 subscriber: header line %q not on the wire; got %q", h, w.headers)
		}
	}

	m := recv(t, gs, 5*time.Second)
	if got := m.Header.Get("x-esc"); got != "a:b\nc\\d" {
		t.Errorf("go-stomp x-esc %q, want %q", got, "a:b\nc\\d")
	}
	if got := m.Header.Get("x-cr"); got != "l1\rl2" {
		t.Errorf("go-stomp x-cr %q, want %q", got, "l1\rl2")
	}
	if got := m.Header.Get("x:name"); got != "v" {
		t.Errorf("go-stomp header x:name = %q, want v (headers %v)", got, m.Header)
	}
}

// TestProtocolEscapingUndefined: an undefined escape is a fatal protocol
// error (1.2), and \r is undefined in 1.1.
func TestProtocolEscapingUndefined(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	for _, tc := range []struct{ name, version, hdr string }{
		{"1.2 tab", "1.2", `x:a\tb`},
		{"1.2 trailing backslash", "1.2", `x:ab\`},
		{"1.2 in name", "1.2", `x\t:v`},
		{"1.1 tab", "1.1", `x:a\tb`},
		{"1.1 carriage return", "1.1", `x:a\rb`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := protoRaw(t, b)
			rc.protoConnectVersion(tc.version, tc.version)
			rc.write(protoFrame(frame.SEND, "bad", "destination:"+q, tc.hdr))
			rc.expectError("escape")
		})
	}
	// Nothing was stored.
	c := b.dial()
	if err := c.Send(q, "", []byte("sentinel"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	s, _ := c.Subscribe(q, stomp.AckAuto)
	if m := recv(t, s, 5*time.Second); string(m.Body) != "sentinel" {
		t.Fatalf("got %q: a frame with a bad escape was stored", m.Body)
	}
}

// TestProtocolEscaping11: 1.1 decodes \n \c \\ and re-encodes them.
func TestProtocolEscaping11(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	rc.write(protoFrame(frame.CONNECT, "", "accept-version:1.1", "host:/"))
	if w := rc.readWire(); w.cmd != frame.CONNECTED {
		t.Fatalf("got %s", w.cmd)
	}
	rc.write(protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+q))
	rc.write(protoFrame(frame.SEND, "x", "destination:"+q, `x:a\cb\nc\\d`))
	w := rc.readWire()
	if w.cmd != frame.MESSAGE {
		t.Fatalf("got %s %v", w.cmd, w.headers)
	}
	if v, _ := w.raw("x"); v != `a\cb\nc\\d` {
		t.Fatalf("1.1 wire value %q, want %q", v, `a\cb\nc\\d`)
	}
}

// TestProtocolEscaping10: STOMP 1.0 has no escaping: backslashes are
// literal both ways.
func TestProtocolEscaping10(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)

	sub := protoRaw(t, b)
	sub.write(protoFrame(frame.CONNECT, "", "accept-version:1.0"))
	if w := sub.readWire(); w.cmd != frame.CONNECTED {
		t.Fatalf("got %s", w.cmd)
	}
	sub.write(protoFrame(frame.SUBSCRIBE, "", "destination:"+q, "receipt:s"))
	if w := sub.readWire(); w.cmd != frame.RECEIPT {
		t.Fatalf("got %s %v", w.cmd, w.headers)
	}

	p := protoRaw(t, b)
	p.protoConnectVersion("1.0", "1.0")
	p.write(protoFrame(frame.SEND, "lit", "destination:"+q, `x:a\tb`, `y:c\cd`, "z:e:f", "receipt:r"))
	p.protoReceipt("r")

	w := sub.readWire()
	if w.cmd != frame.MESSAGE {
		t.Fatalf("got %s %v", w.cmd, w.headers)
	}
	for name, want := range map[string]string{"x": `a\tb`, "y": `c\cd`, "z": "e:f"} {
		if v, _ := w.raw(name); v != want {
			t.Errorf("1.0 subscriber: header %s = %q on the wire, want %q", name, v, want)
		}
	}
	sub.write(protoFrame(frame.DISCONNECT, "", "receipt:bye"))
	if w := sub.readWire(); w.cmd != frame.RECEIPT {
		t.Fatalf("got %s %v", w.cmd, w.headers)
	}
	// Another copy for a 1.2 client: it must see the literal backslashes.
	p.write(protoFrame(frame.SEND, "lit", "destination:"+q, `x:a\tb`, `y:c\cd`, "z:e:f", "receipt:r2"))
	p.protoReceipt("r2")
	gs, _ := b.dial().Subscribe(q, stomp.AckAuto)
	m := recv(t, gs, 5*time.Second)
	for name, want := range map[string]string{"x": `a\tb`, "y": `c\cd`, "z": "e:f"} {
		if got := m.Header.Get(name); got != want {
			t.Errorf("go-stomp: header %s = %q, want %q", name, got, want)
		}
	}
}

// TestProtocolHeaderNameColonTo10Subscriber: a 1.2 producer can send a
// header whose name holds a colon (escaped as \c); a 1.0 subscriber cannot
// receive that header, but it must still get the message and keep its
// connection.
func TestProtocolHeaderNameColonTo10Subscriber(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	sub := protoRaw(t, b)
	sub.protoConnectVersion("1.0", "1.0")
	sub.write(protoFrame(frame.SUBSCRIBE, "", "destination:"+q, "receipt:s"))
	sub.protoReceipt("s")

	p := protoRaw(t, b)
	p.connect()
	p.write(protoFrame(frame.SEND, "m", "destination:"+q, `a\cb:v`, `n\nl:v`, "receipt:r"))
	p.protoReceipt("r")

	_ = sub.c.SetReadDeadline(time.Now().Add(2 * time.Second))
	f, err := sub.r.Read()
	for err == nil && f == nil {
		f, err = sub.r.Read()
	}
	if err != nil {
		t.Fatalf("1.0 subscriber: want the MESSAGE, got %v (connection dropped by the server)", err)
	}
	if f.Command != frame.MESSAGE || string(f.Body) != "m" {
		t.Fatalf("got %s %v %q", f.Command, f.Header, f.Body)
	}
}

// ---------------------------------------------------------------------------
// Bodies and repeated headers

func TestProtocolBodies(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	sub := protoRaw(t, b)
	sub.connect()
	sub.write(protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "receipt:s"))
	sub.protoReceipt("s")

	p := protoRaw(t, b)
	p.connect()
	bin := "a\x00b\x00\x00c\n"
	// content-length body with NULs, then a NUL-terminated body, then an
	// empty body, sent back to back.
	p.write(protoFrame(frame.SEND, bin, "destination:"+q, "content-length:"+strconv.Itoa(len(bin))) +
		protoFrame(frame.SEND, "plain text\n", "destination:"+q) +
		protoFrame(frame.SEND, "", "destination:"+q) +
		protoFrame(frame.SEND, "", "destination:"+q, "content-length:0", "receipt:r"))
	p.protoReceipt("r")

	for i, want := range []string{bin, "plain text\n", "", ""} {
		w := sub.readWire()
		if w.cmd != frame.MESSAGE {
			t.Fatalf("message %d: got %s %v", i, w.cmd, w.headers)
		}
		if string(w.body) != want {
			t.Fatalf("message %d: body %q, want %q", i, w.body, want)
		}
		if cl, ok := w.raw(frame.ContentLength); len(want) > 0 && (!ok || cl != strconv.Itoa(len(want))) {
			t.Fatalf("message %d: content-length %q, want %d", i, cl, len(want))
		}
	}
}

// TestProtocolRepeatedHeaders: only the first of repeated headers counts,
// for application and for transport headers.
func TestProtocolRepeatedHeaders(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q1, q2 := uniqueQueue(t)+"-1", uniqueQueue(t)+"-2"
	sub := protoRaw(t, b)
	sub.connect()
	sub.write(protoFrame(frame.SUBSCRIBE, "", "id:1", "destination:"+q1))
	sub.write(protoFrame(frame.SUBSCRIBE, "", "id:2", "destination:"+q2, "receipt:s"))
	sub.protoReceipt("s")

	p := protoRaw(t, b)
	p.connect()
	p.write(protoFrame(frame.SEND, "m", "destination:"+q1, "destination:"+q2, "x:first", "x:second", "content-type:text/a", "content-type:text/b", "receipt:r"))
	p.protoReceipt("r")

	m := sub.protoMessage()
	if m.Header.Get(frame.Destination) != q1 || m.Header.Get(frame.Subscription) != "1" {
		t.Fatalf("message went to %q (subscription %q), want the first destination %q", m.Header.Get(frame.Destination), m.Header.Get(frame.Subscription), q1)
	}
	if got := m.Header.Get("x"); got != "first" {
		t.Fatalf("x = %q, want first (headers %v)", got, m.Header)
	}
	if got := m.Header.Get(frame.ContentType); got != "text/a" {
		t.Fatalf("content-type = %q, want text/a", got)
	}
	if n := len(m.Header.GetAll(frame.Destination)); n != 1 {
		t.Fatalf("%d destination headers in MESSAGE: %v", n, m.Header)
	}
}

// TestProtocolRepeatedContentLength: the first content-length decides how
// the body is read.
func TestProtocolRepeatedContentLength(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	sub := protoRaw(t, b)
	sub.connect()
	sub.write(protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "receipt:s"))
	sub.protoReceipt("s")
	p := protoRaw(t, b)
	p.connect()
	p.write(protoFrame(frame.SEND, "ab\x00cd", "destination:"+q, "content-length:5", "content-length:2", "receipt:r"))
	p.protoReceipt("r")
	if m := sub.protoMessage(); string(m.Body) != "ab\x00cd" {
		t.Fatalf("body %q", m.Body)
	}
}

// ---------------------------------------------------------------------------
// Receipts

func TestProtocolReceipts(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	rc.connect()

	rc.write(protoFrame(frame.SEND, "one", "destination:"+q, "receipt:send"))
	rc.protoReceipt("send")
	rc.write(protoFrame(frame.SUBSCRIBE, "", "id:s", "destination:"+q, "ack:client-individual", "receipt:sub"))
	msgs := rc.protoReceipt("sub")
	if len(msgs) == 0 {
		msgs = append(msgs, rc.protoMessage())
	}
	m := msgs[0]
	if string(m.Body) != "one" {
		t.Fatalf("got %q", m.Body)
	}
	rc.write(protoFrame(frame.NACK, "", "id:"+m.Header.Get(frame.Ack), "receipt:nack"))
	msgs = rc.protoReceipt("nack")
	if len(msgs) == 0 {
		msgs = append(msgs, rc.protoMessage())
	}
	m = msgs[0]
	if string(m.Body) != "one" || m.Header.Get("redelivered") != "true" {
		t.Fatalf("after NACK got %q %v", m.Body, m.Header)
	}
	rc.write(protoFrame(frame.ACK, "", "id:"+m.Header.Get(frame.Ack), "receipt:ack"))
	rc.protoReceipt("ack")

	rc.write(protoFrame(frame.BEGIN, "", "transaction:t1", "receipt:begin"))
	rc.protoReceipt("begin")
	rc.write(protoFrame(frame.SEND, "two", "destination:"+q, "transaction:t1", "receipt:txsend"))
	if msgs := rc.protoReceipt("txsend"); len(msgs) != 0 {
		t.Fatalf("transactional SEND delivered before COMMIT: %q", msgs[0].Body)
	}
	rc.write(protoFrame(frame.COMMIT, "", "transaction:t1", "receipt:commit"))
	msgs = rc.protoReceipt("commit")
	if len(msgs) == 0 {
		msgs = append(msgs, rc.protoMessage())
	}
	if string(msgs[0].Body) != "two" {
		t.Fatalf("got %q", msgs[0].Body)
	}
	rc.write(protoFrame(frame.ACK, "", "id:"+msgs[0].Header.Get(frame.Ack)))

	rc.write(protoFrame(frame.BEGIN, "", "transaction:t2", "receipt:begin2"))
	rc.protoReceipt("begin2")
	rc.write(protoFrame(frame.SEND, "three", "destination:"+q, "transaction:t2"))
	rc.write(protoFrame(frame.ABORT, "", "transaction:t2", "receipt:abort"))
	rc.protoReceipt("abort")

	rc.write(protoFrame(frame.UNSUBSCRIBE, "", "id:s", "receipt:unsub"))
	if msgs := rc.protoReceipt("unsub"); len(msgs) != 0 {
		t.Fatalf("aborted SEND delivered: %q", msgs[0].Body)
	}
	rc.write(protoFrame(frame.DISCONNECT, "", "receipt:disc"))
	rc.protoReceipt("disc")
	rc.expectClosed()
}

// TestProtocolErrorCarriesReceiptID: the ERROR for a frame that asked for a
// receipt names it in receipt-id.
func TestProtocolErrorCarriesReceiptID(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	for _, tc := range []struct{ name, frame, want string }{
		{"SEND", protoFrame(frame.SEND, "x", "receipt:r-77"), "missing destination"},
		{"SUBSCRIBE", protoFrame(frame.SUBSCRIBE, "", "destination:/queue/x", "receipt:r-77"), "missing id"},
		{"COMMIT", protoFrame(frame.COMMIT, "", "transaction:nope", "receipt:r-77"), "unknown transaction"},
		{"ACK", protoFrame(frame.ACK, "", "id:9.9", "receipt:r-77"), "unknown message"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := protoRaw(t, b)
			rc.connect()
			rc.write(tc.frame)
			f := rc.expectError(tc.want)
			if got := f.Header.Get(frame.ReceiptId); got != "r-77" {
				t.Fatalf("ERROR receipt-id %q, want r-77 (%v)", got, f.Header)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Errors close one connection and change nothing else.

func TestProtocolErrorsCloseOnlyThatConnection(t *testing.T) {
	t.Parallel()
	const bad = "/queue/bad"
	long := strings.Repeat("v", 450)
	many := func(n int) []string {
		h := []string{"destination:" + bad}
		for i := 0; i < n; i++ {
			h = append(h, fmt.Sprintf("h%d:%s", i, long))
		}
		return h
	}
	x := func(n int) string { return strings.Repeat("x", n) }
	cases := []struct {
		name    string
		version string // accept-version for CONNECT; "none": do not connect
		frames  string
		want    string
	}{
		{"body too large with content-length", "1.2",
			protoFrame(frame.SEND, x(2000), "destination:"+bad, "content-length:2000"), "body too large"},
		{"body too large without content-length", "1.2",
			protoFrame(frame.SEND, x(2000), "destination:"+bad), "body too large"},
		{"too many headers", "1.2",
			protoFrame(frame.SEND, "x", append([]string{"destination:" + bad}, strings.Split(strings.Repeat("h:v,", 17), ",")[:17]...)...), "too many headers"},
		{"header line too long", "1.2",
			protoFrame(frame.SEND, "x", "destination:"+bad, "h:"+x(600)), "header line too long"},
		{"command line too long", "1.2",
			x(600) + "\n\n\x00", "header line too long"},
		{"frame too large in headers", "1.2",
			protoFrame(frame.SEND, "x", many(10)...), "frame too large"},
		{"frame too large with body", "1.2",
			protoFrame(frame.SEND, x(1000), append(many(8), "content-length:1000")...), "frame too large"},
		{"frame too large with body, no content-length", "1.2",
			protoFrame(frame.SEND, x(1000), many(8)...), "frame too large"},
		{"content-length shorter than body", "1.2",
			protoFrame(frame.SEND, "abcdef", "destination:"+bad, "content-length:3"), "malformed"},
		{"bad content-length", "1.2",
			protoFrame(frame.SEND, "abc", "destination:"+bad, "content-length:3x"), "content-length"},
		{"header without colon", "1.2",
			protoFrame(frame.SEND, "x", "destination:"+bad, "nocolon"), "malformed"},
		{"unknown command", "1.2", protoFrame("FOO", ""), "unknown command"},
		{"lower-case command", "1.2", protoFrame("send", "x", "destination:"+bad), "unknown command"},
		{"SEND without destination", "1.2", protoFrame(frame.SEND, "x"), "missing destination"},
		{"SEND with empty destination", "1.2", protoFrame(frame.SEND, "x", "destination:"), "missing destination"},
		{"SEND to bogus destination", "1.2", protoFrame(frame.SEND, "x", "destination:/bogus/x"), "invalid destination"},
		{"SEND to bare /queue/", "1.2", protoFrame(frame.SEND, "x", "destination:/queue/"), "invalid destination"},
		{"SUBSCRIBE to bogus destination", "1.2", protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:/bogus/x"), "invalid destination"},
		{"SUBSCRIBE without id (1.2)", "1.2", protoFrame(frame.SUBSCRIBE, "", "destination:"+bad), "missing id"},
		{"SUBSCRIBE without id (1.1)", "1.1", protoFrame(frame.SUBSCRIBE, "", "destination:"+bad), "missing id"},
		{"SUBSCRIBE without destination", "1.2", protoFrame(frame.SUBSCRIBE, "", "id:0"), "missing destination"},
		{"duplicate subscription id", "1.2",
			protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+bad) + protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:/queue/other"), "duplicate subscription"},
		{"UNSUBSCRIBE unknown id", "1.2", protoFrame(frame.UNSUBSCRIBE, "", "id:nope"), "unknown subscription"},
		{"ACK unknown id", "1.2", protoFrame(frame.ACK, "", "id:1.1"), "unknown message"},
		{"ACK garbage id", "1.2", protoFrame(frame.ACK, "", "id:zzz"), "unknown message"},
		{"ACK without id (1.2)", "1.2", protoFrame(frame.ACK, "", "message-id:x", "subscription:0"), "missing id"},
		{"ACK unknown message-id (1.1)", "1.1",
			protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+bad, "ack:client") + protoFrame(frame.ACK, "", "message-id:nope", "subscription:0"), "unknown message"},
		{"ACK without subscription (1.1)", "1.1", protoFrame(frame.ACK, "", "message-id:nope"), "missing subscription"},
		{"ACK unknown message-id (1.0)", "1.0", protoFrame(frame.ACK, "", "message-id:nope"), "unknown message"},
		{"NACK unknown message-id (1.0)", "1.0", protoFrame(frame.NACK, "", "message-id:nope"), "unknown message"},
		{"COMMIT unknown transaction", "1.2", protoFrame(frame.COMMIT, "", "transaction:nope"), "unknown transaction"},
		{"ABORT unknown transaction", "1.2", protoFrame(frame.ABORT, "", "transaction:nope"), "unknown transaction"},
		{"BEGIN twice", "1.2",
			protoFrame(frame.BEGIN, "", "transaction:t") + protoFrame(frame.BEGIN, "", "transaction:t"), "already open"},
		{"BEGIN without transaction", "1.2", protoFrame(frame.BEGIN, ""), "missing transaction"},
		{"SEND in unknown transaction", "1.2",
			protoFrame(frame.SEND, "x", "destination:"+bad, "transaction:nope"), "unknown transaction"},
		{"frame before CONNECT", "none", protoFrame(frame.SEND, "x", "destination:"+bad), "not connected"},
		{"second CONNECT", "1.2", protoFrame(frame.CONNECT, "", "accept-version:1.2", "host:/"), "already connected"},
		{"second STOMP", "1.2", protoFrame(frame.STOMP, "", "accept-version:1.2", "host:/"), "already connected"},
		{"MESSAGE from a client", "1.2",
			protoFrame(frame.MESSAGE, "x", "destination:"+bad, "message-id:1", "subscription:0"), "unexpected frame"},
		{"RECEIPT from a client", "1.2", protoFrame(frame.RECEIPT, "", "receipt-id:1"), "unexpected frame"},
		{"ERROR from a client", "1.2", protoFrame(frame.ERROR, "", "message:x"), "unexpected frame"},
		{"CONNECTED from a client", "1.2", protoFrame(frame.CONNECTED, "", "version:1.2"), "unexpected frame"},
		{"invalid ack mode", "1.2", protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+bad, "ack:sometimes"), "invalid ack"},
		{"invalid prefetch-count", "1.2", protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+bad, "prefetch-count:many"), "invalid prefetch-count"},
		{"negative prefetch-count", "1.2", protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+bad, "prefetch-count:-1"), "invalid prefetch-count"},
		{"invalid expires", "1.2", protoFrame(frame.SEND, "x", "destination:"+bad, "expires:tomorrow"), "invalid expires"},
		{"negative expires", "1.2", protoFrame(frame.SEND, "x", "destination:"+bad, "expires:-5"), "invalid expires"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := startBroker(t, func(c *config.Config) {
				c.Limits.MaxBodySize = 1024
				c.Limits.MaxFrameSize = 4096
				c.Limits.MaxHeaderCount = 16
				c.Limits.MaxHeaderLength = 512
			})
			stored := uniqueQueue(t) + "-stored"
			live := uniqueQueue(t) + "-live"
			p := b.dial()
			if err := p.Send(stored, "text/plain", []byte("stored"), stomp.SendOpt.Receipt); err != nil {
				t.Fatal(err)
			}
			other := b.dial()
			liveSub, err := other.Subscribe(live, stomp.AckAuto)
			if err != nil {
				t.Fatal(err)
			}
			// A raw 1.2 connection open at the same time.
			bystander := protoRaw(t, b)
			bystander.connect()

			rc := protoRaw(t, b)
			if tc.version != "none" {
				rc.protoConnectVersion(tc.version, tc.version)
			}
			rc.write(tc.frames)
			rc.expectError(tc.want)

			// The other connections still work.
			if err := other.Send(live, "", []byte("after"), stomp.SendOpt.Receipt); err != nil {
				t.Fatal(err)
			}
			if m := recv(t, liveSub, 5*time.Second); string(m.Body) != "after" {
				t.Fatalf("live: got %q", m.Body)
			}
			bystander.write(protoFrame(frame.SEND, "by", "destination:"+live, "receipt:by"))
			bystander.protoReceipt("by")
			if m := recv(t, liveSub, 5*time.Second); string(m.Body) != "by" {
				t.Fatalf("live: got %q", m.Body)
			}
			// The stored message is still there.
			s2, err := b.dial().Subscribe(stored, stomp.AckAuto)
			if err != nil {
				t.Fatal(err)
			}
			if m := recv(t, s2, 5*time.Second); string(m.Body) != "stored" {
				t.Fatalf("stored: got %q", m.Body)
			}
			// Nothing reached the bad destination: a later message is first.
			if err := p.Send(bad, "", []byte("sentinel"), stomp.SendOpt.Receipt); err != nil {
				t.Fatal(err)
			}
			s3, err := b.dial().Subscribe(bad, stomp.AckAuto)
			if err != nil {
				t.Fatal(err)
			}
			if m := recv(t, s3, 5*time.Second); string(m.Body) != "sentinel" {
				t.Fatalf("%s: got %q first: the failed frame had an effect", bad, m.Body)
			}
		})
	}
}

// TestProtocolErrorReturnsUnacked: messages a failed connection held
// unacknowledged go to another consumer, marked redelivered.
func TestProtocolErrorReturnsUnacked(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	rc.connect()
	rc.write(protoFrame(frame.SEND, "held", "destination:"+q))
	rc.write(protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "ack:client-individual"))
	if m := rc.protoMessage(); string(m.Body) != "held" {
		t.Fatalf("got %q", m.Body)
	}
	rc.write(protoFrame("FOO", ""))
	rc.expectError("unknown command")
	s, _ := b.dial().Subscribe(q, stomp.AckAuto)
	m := recv(t, s, 5*time.Second)
	if string(m.Body) != "held" || m.Header.Get("redelivered") != "true" {
		t.Fatalf("got %q %v", m.Body, m.Header)
	}
}

// TestProtocolOversizedBodyNotRead: the server rejects a frame whose
// content-length is over the limit as soon as it reads the header, before
// the client has sent the body.
func TestProtocolOversizedBodyNotRead(t *testing.T) {
	t.Parallel()
	b := startBroker(t, func(c *config.Config) { c.Limits.MaxBodySize = 1024 })
	rc := protoRaw(t, b)
	rc.connect()
	rc.write("SEND\ndestination:/queue/x\ncontent-length:1000000000\n\n")
	rc.expectError("body too large")
}

// ---------------------------------------------------------------------------
// Connection and subscription limits

func TestProtocolMaxConnections(t *testing.T) {
	t.Parallel()
	b := startBroker(t, func(c *config.Config) { c.Limits.MaxConnections = 2 })
	c1, c2 := protoRaw(t, b), protoRaw(t, b)
	c1.connect()
	c2.connect()
	c3 := protoRaw(t, b)
	c3.write(protoFrame(frame.CONNECT, "", "accept-version:1.2", "host:/"))
	c3.expectError("too many connections")
	// The two served connections are unaffected.
	q := uniqueQueue(t)
	c2.write(protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "receipt:s"))
	c2.protoReceipt("s")
	c1.write(protoFrame(frame.SEND, "m", "destination:"+q))
	if m := c2.protoMessage(); string(m.Body) != "m" {
		t.Fatalf("got %q", m.Body)
	}
	// A freed slot can be used again.
	c1.write(protoFrame(frame.DISCONNECT, "", "receipt:bye"))
	c1.protoReceipt("bye")
	c1.expectClosed()
	deadline := time.Now().Add(3 * time.Second)
	for {
		c4 := protoRaw(t, b)
		c4.write(protoFrame(frame.CONNECT, "", "accept-version:1.2", "host:/"))
		f := c4.read()
		if f.Command == frame.CONNECTED {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a DISCONNECT: still %s %v", f.Command, f.Header)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestProtocolMaxSubscriptions(t *testing.T) {
	t.Parallel()
	b := startBroker(t, func(c *config.Config) { c.Limits.MaxSubscriptions = 2 })
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	rc.connect()
	rc.write(protoFrame(frame.SUBSCRIBE, "", "id:1", "destination:"+q+"1", "receipt:1"))
	rc.protoReceipt("1")
	rc.write(protoFrame(frame.SUBSCRIBE, "", "id:2", "destination:"+q+"2", "receipt:2"))
	rc.protoReceipt("2")
	rc.write(protoFrame(frame.UNSUBSCRIBE, "", "id:1", "receipt:u1"))
	rc.protoReceipt("u1")
	rc.write(protoFrame(frame.SUBSCRIBE, "", "id:3", "destination:"+q+"3", "receipt:3"))
	rc.protoReceipt("3")
	rc.write(protoFrame(frame.SUBSCRIBE, "", "id:4", "destination:"+q+"4", "receipt:4"))
	f := rc.expectError("too many subscriptions")
	if got := f.Header.Get(frame.ReceiptId); got != "4" {
		t.Errorf("ERROR receipt-id %q, want 4", got)
	}
	// The limit is per connection.
	rc2 := protoRaw(t, b)
	rc2.connect()
	rc2.write(protoFrame(frame.SUBSCRIBE, "", "id:1", "destination:"+q+"1", "receipt:1"))
	rc2.protoReceipt("1")
	rc2.write(protoFrame(frame.SUBSCRIBE, "", "id:2", "destination:"+q+"2", "receipt:2"))
	rc2.protoReceipt("2")
}

// ---------------------------------------------------------------------------
// ACK by version

// protoAckedNotRedelivered sends a sentinel to q and checks that a new
// subscriber receives it first: an earlier message that was acknowledged is
// gone (requeued messages are dispatched before fresh ones).
func protoAckedNotRedelivered(t *testing.T, b *broker, q string) {
	t.Helper()
	c := b.dial()
	if err := c.Send(q, "", []byte("sentinel"), stomp.SendOpt.Receipt); err != nil {
		t.Fatal(err)
	}
	s, err := c.Subscribe(q, stomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}
	if m := recv(t, s, 5*time.Second); string(m.Body) != "sentinel" {
		t.Fatalf("got %q (redelivered %q) before the sentinel: the ACK did not take", m.Body, m.Header.Get("redelivered"))
	}
}

func TestProtocolAck12(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	for _, mode := range []string{"client", "client-individual"} {
		t.Run(mode, func(t *testing.T) {
			q := uniqueQueue(t)
			rc := protoRaw(t, b)
			rc.connect()
			rc.write(protoFrame(frame.SEND, "m", "destination:"+q))
			rc.write(protoFrame(frame.SUBSCRIBE, "", "id:sub-0", "destination:"+q, "ack:"+mode))
			m := rc.protoMessage()
			ack := m.Header.Get(frame.Ack)
			if ack == "" {
				t.Fatalf("1.2 MESSAGE for ack:%s has no ack header: %v", mode, m.Header)
			}
			if m.Header.Get(frame.Subscription) != "sub-0" {
				t.Fatalf("subscription header %q", m.Header.Get(frame.Subscription))
			}
			rc.write(protoFrame(frame.ACK, "", "id:"+ack, "receipt:a"))
			rc.protoReceipt("a")
			rc.write(protoFrame(frame.DISCONNECT, "", "receipt:bye"))
			rc.protoReceipt("bye")
			rc.expectClosed()
			protoAckedNotRedelivered(t, b, q)
		})
	}
	t.Run("auto has no ack header", func(t *testing.T) {
		q := uniqueQueue(t)
		rc := protoRaw(t, b)
		rc.connect()
		rc.write(protoFrame(frame.SEND, "m", "destination:"+q))
		rc.write(protoFrame(frame.SUBSCRIBE, "", "id:0", "destination:"+q))
		if m := rc.protoMessage(); m.Header.Get(frame.Ack) != "" {
			t.Fatalf("ack:auto MESSAGE carries ack %q", m.Header.Get(frame.Ack))
		}
	})
}

func TestProtocolAck11(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	rc.protoConnectVersion("1.1", "1.1")
	rc.write(protoFrame(frame.SEND, "m", "destination:"+q))
	rc.write(protoFrame(frame.SUBSCRIBE, "", "id:s1", "destination:"+q, "ack:client-individual"))
	m := rc.protoMessage()
	id := m.Header.Get(frame.MessageId)
	if id == "" || m.Header.Get(frame.Subscription) != "s1" {
		t.Fatalf("MESSAGE headers %v", m.Header)
	}
	rc.write(protoFrame(frame.ACK, "", "message-id:"+id, "subscription:s1", "receipt:a"))
	rc.protoReceipt("a")
	rc.write(protoFrame(frame.DISCONNECT, "", "receipt:bye"))
	rc.protoReceipt("bye")
	rc.expectClosed()
	protoAckedNotRedelivered(t, b, q)
}

func TestProtocolNack11(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	rc.protoConnectVersion("1.1", "1.1")
	rc.write(protoFrame(frame.SEND, "m", "destination:"+q))
	rc.write(protoFrame(frame.SUBSCRIBE, "", "id:s1", "destination:"+q, "ack:client-individual"))
	m := rc.protoMessage()
	rc.write(protoFrame(frame.NACK, "", "message-id:"+m.Header.Get(frame.MessageId), "subscription:s1", "receipt:n"))
	msgs := rc.protoReceipt("n")
	if len(msgs) == 0 {
		msgs = append(msgs, rc.protoMessage())
	}
	if string(msgs[0].Body) != "m" || msgs[0].Header.Get("redelivered") != "true" {
		t.Fatalf("after NACK got %q %v", msgs[0].Body, msgs[0].Header)
	}
}

func TestProtocolAck10(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	for _, withID := range []bool{false, true} {
		t.Run(fmt.Sprintf("id=%v", withID), func(t *testing.T) {
			q := uniqueQueue(t)
			rc := protoRaw(t, b)
			rc.protoConnectVersion("1.0", "1.0")
			rc.write(protoFrame(frame.SEND, "m", "destination:"+q))
			hdr := []string{"destination:" + q, "ack:client"}
			if withID {
				hdr = append(hdr, "id:mine")
			}
			rc.write(protoFrame(frame.SUBSCRIBE, "", hdr...))
			m := rc.protoMessage()
			id := m.Header.Get(frame.MessageId)
			if id == "" || m.Header.Get(frame.Destination) != q {
				t.Fatalf("MESSAGE headers %v", m.Header)
			}
			if withID && m.Header.Get(frame.Subscription) != "mine" {
				t.Fatalf("subscription header %q, want mine", m.Header.Get(frame.Subscription))
			}
			rc.write(protoFrame(frame.ACK, "", "message-id:"+id, "receipt:a"))
			rc.protoReceipt("a")
			rc.write(protoFrame(frame.DISCONNECT, "", "receipt:bye"))
			rc.protoReceipt("bye")
			rc.expectClosed()
			protoAckedNotRedelivered(t, b, q)
		})
	}
}

// TestProtocolUnsubscribe10ByDestination: in 1.0 a subscription without an
// id is unsubscribed by destination.
func TestProtocolUnsubscribe10ByDestination(t *testing.T) {
	t.Parallel()
	b := startBroker(t, nil)
	q := uniqueQueue(t)
	rc := protoRaw(t, b)
	rc.protoConnectVersion("1.0", "1.0")
	rc.write(protoFrame(frame.SUBSCRIBE, "", "destination:"+q))
	rc.write(protoFrame(frame.UNSUBSCRIBE, "", "destination:"+q, "receipt:u"))
	rc.protoReceipt("u")
	protoAckedNotRedelivered(t, b, q) // the sentinel goes to the new subscriber
}

// ---------------------------------------------------------------------------
// Authentication

// protoUsersFile writes a users file: alice/secret through stomp.HashPassword
// (the production cost), and cheap bcrypt lines for the rest so the race
// detector does not make every CONNECT take a second.
func protoUsersFile(t *testing.T) string {
	t.Helper()
	protoUsersOnce.Do(func() {
		alice, err := bstomp.HashPassword("alice", "secret")
		if err != nil {
			protoUsersErr = err
			return
		}
		lines := []string{"# test users", alice}
		for _, u := range [][2]string{{"bob", "secret"}, {"carol", `p\cw`}} {
			h, err := bcrypt.GenerateFromPassword([]byte(u[1]), bcrypt.MinCost)
			if err != nil {
				protoUsersErr = err
				return
			}
			lines = append(lines, u[0]+":"+string(h))
		}
		protoUsers = strings.Join(lines, "\n") + "\n"
	})
	if protoUsersErr != nil {
		t.Fatal(protoUsersErr)
	}
	path := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(path, []byte(protoUsers), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

var (
	protoUsersOnce sync.Once
	protoUsers     string
	protoUsersErr  error
)

// protoAuthConnect sends CONNECT with hdr and returns the answer, waiting
// longer than read does: bcrypt at the production cost is slow under -race.
func protoAuthConnect(t *testing.T, b *broker, hdr ...string) (*rawConn, *frame.Frame) {
	t.Helper()
	rc := protoRaw(t, b)
	rc.write(protoFrame(frame.CONNECT, "", append([]string{"host:/"}, hdr...)...))
	_ = rc.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	f, err := rc.r.Read()
	if err != nil || f == nil {
		t.Fatalf("CONNECT %v: want an answer, got %v", hdr, err)
	}
	return rc, f
}

// protoAuthRefused expects CONNECT with hdr to be refused.
func protoAuthRefused(t *testing.T, b *broker, hdr ...string) {
	t.Helper()
	rc, f := protoAuthConnect(t, b, hdr...)
	if f.Command != frame.ERROR || !strings.Contains(f.Header.Get(frame.Message), "access refused") {
		t.Fatalf("CONNECT %v: want ERROR access refused, got %s %v %q", hdr, f.Command, f.Header, f.Body)
	}
	if strings.Contains(string(f.Body), "secret") || strings.Contains(f.Header.Get(frame.Message), "secret") {
		t.Errorf("ERROR echoes the passcode: %v %q", f.Header, f.Body)
	}
	rc.expectClosed()
}

func TestProtocolAuthentication(t *testing.T) {
	t.Parallel()
	users := protoUsersFile(t)
	b := startBroker(t, func(c *config.Config) { c.Auth.UsersFile = users })
	for _, tc := range []struct {
		name string
		hdr  []string
	}{
		{"wrong passcode", []string{"login:alice", "passcode:wrong"}},
		{"missing login", []string{"passcode:secret"}},
		{"missing passcode", []string{"login:bob"}},
		{"empty passcode", []string{"login:bob", "passcode:"}},
		{"passcode with trailing space", []string{"login:bob", "passcode:secret "}},
		// CONNECT headers are not unescaped: carol's passcode is p\cw.
		{"escaped passcode is literal", []string{"login:carol", "passcode:p:w"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			protoAuthRefused(t, b, append([]string{"accept-version:1.2"}, tc.hdr...)...)
		})
	}
	t.Run("correct", func(t *testing.T) {
		if _, f := protoAuthConnect(t, b, "accept-version:1.2", "login:alice", "passcode:secret"); f.Command != frame.CONNECTED {
			t.Fatalf("alice: got %s %v %q", f.Command, f.Header, f.Body)
		}
		for _, v := range []string{"1.0", "1.1", "1.2"} {
			if _, f := protoAuthConnect(t, b, "accept-version:"+v, "login:bob", "passcode:secret"); f.Command != frame.CONNECTED {
				t.Fatalf("%s: got %s %v %q", v, f.Command, f.Header, f.Body)
			}
		}
		// CONNECT headers are taken literally (1.2: CONNECT is not escaped).
		if _, f := protoAuthConnect(t, b, "accept-version:1.2", "login:carol", `passcode:p\cw`); f.Command != frame.CONNECTED {
			t.Fatalf("literal passcode: got %s %v %q", f.Command, f.Header, f.Body)
		}
		// go-stomp too.
		c := b.dial(stomp.ConnOpt.Login("bob", "secret"))
		if err := c.Send(uniqueQueue(t), "", []byte("x"), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	})
}

// TestProtocolAuthUnknownUserTiming: the server compares an unknown login
// against a dummy hash "so that a missing user takes as long as a wrong
// passcode"; if it is much faster, login names can be enumerated by timing.
func TestProtocolAuthUnknownUserTiming(t *testing.T) {
	t.Parallel()
	users := protoUsersFile(t)
	b := startBroker(t, func(c *config.Config) { c.Auth.UsersFile = users })
	refused := func(login string) time.Duration {
		start := time.Now()
		protoAuthRefused(t, b, "accept-version:1.2", "login:"+login, "passcode:wrong")
		return time.Since(start)
	}
	unknown := refused("mallory")
	wrong := refused("alice") // a stomp.HashPassword entry
	if unknown*4 < wrong {
		t.Fatalf("unknown user refused in %v, wrong passcode of a real user in %v: user names can be probed by timing", unknown, wrong)
	}
}
