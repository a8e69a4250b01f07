package stomp

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/go-stomp/stomp/v3/frame"
)

// hbConnect connects with the given heart-beat header and returns the
// connection, a reader positioned after CONNECTED, and CONNECTED's
// heart-beat header.
func hbConnect(t *testing.T, addr, hb string) (net.Conn, *bufio.Reader, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write([]byte(tframe(frame.CONNECT, "", "accept-version:1.2", "host:/", "heart-beat:"+hb))); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	head, err := br.ReadString(0)
	if err != nil {
		t.Fatalf("read CONNECTED: %v", err)
	}
	if !strings.HasPrefix(head, "CONNECTED\n") {
		t.Fatalf("want CONNECTED, got %q", head)
	}
	for _, l := range strings.Split(head, "\n") {
		if v, ok := strings.CutPrefix(l, "heart-beat:"); ok {
			return c, br, v
		}
	}
	t.Fatalf("CONNECTED without heart-beat header: %q", head)
	return nil, nil, ""
}

// TestSessionHeartbeatAsClientAsks: a client that wants a heart-beat every
// 500 ms, and offers one every 500 ms, gets 500,500 in CONNECTED (not the
// server's 10 s) and receives heart-beats about that often.
func TestSessionHeartbeatAsClientAsks(t *testing.T) {
	_, srv := testServerCfg(t, func(c *Config) { c.HeartbeatMin = 100 * time.Millisecond })
	c, br, hb := hbConnect(t, srv.Addr().String(), "500,500")
	if hb != "500,500" {
		t.Fatalf("CONNECTED heart-beat %q, want 500,500", hb)
	}
	// At most 500 ms apart: 4 within 3 s, even with a late first one.
	const want = 4
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	for n := 0; n < want; {
		b, err := br.ReadByte()
		if err != nil {
			t.Fatalf("%d heart-beats within 3s, want %d: %v", n, want, err)
		}
		if b != '\n' {
			t.Fatalf("unexpected byte %q between frames", b)
		}
		n++
		// Our own heart-beat, as promised.
		if _, err := c.Write([]byte("\n")); err != nil {
			t.Fatal(err)
		}
	}
}

// TestSessionHeartbeatNoneAsked: a client asking 0,0 gets 0,0, and no
// heart-beats, even from a server with a short HeartbeatMin.
func TestSessionHeartbeatNoneAsked(t *testing.T) {
	_, srv := testServerCfg(t, func(c *Config) { c.HeartbeatMin = 20 * time.Millisecond })
	c, br, hb := hbConnect(t, srv.Addr().String(), "0,0")
	if hb != "0,0" {
		t.Fatalf("CONNECTED heart-beat %q, want 0,0", hb)
	}
	// Several HeartbeatMin periods, then a sentinel: its RECEIPT must be
	// the next thing on the wire.
	time.Sleep(200 * time.Millisecond)
	if _, err := c.Write([]byte(tframe(frame.DISCONNECT, "", "receipt:bye"))); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := br.ReadString(0)
	if err != nil {
		t.Fatalf("read: %v after %q", err, got)
	}
	if !strings.HasPrefix(got, "RECEIPT\n") {
		t.Fatalf("want the RECEIPT first, got %q", got)
	}
}

// TestSessionHeartbeatClamped: what the client asks is raised to
// HeartbeatMin, and a direction the server disables is 0.
func TestSessionHeartbeatClamped(t *testing.T) {
	_, srv := testServerCfg(t, nil) // HeartbeatMin 1s
	addr := srv.Addr().String()
	for _, tc := range []struct{ ask, want string }{
		{"100,200", "1000,1000"},
		{"2000,3000", "3000,2000"},
		{"0,250", "1000,0"},
		{"250,0", "0,1000"},
	} {
		if _, _, hb := hbConnect(t, addr, tc.ask); hb != tc.want {
			t.Errorf("client heart-beat %s: CONNECTED heart-beat %q, want %s", tc.ask, hb, tc.want)
		}
	}
	_, srv = testServerCfg(t, func(c *Config) {
		c.HeartbeatSend = 0
		c.HeartbeatMin = 100 * time.Millisecond
	})
	if _, _, hb := hbConnect(t, srv.Addr().String(), "500,500"); hb != "0,500" {
		t.Errorf("server sending disabled: CONNECTED heart-beat %q, want 0,500", hb)
	}
	_, srv = testServerCfg(t, func(c *Config) {
		c.HeartbeatReceive = 0
		c.HeartbeatMin = 100 * time.Millisecond
	})
	if _, _, hb := hbConnect(t, srv.Addr().String(), "500,500"); hb != "500,0" {
		t.Errorf("server receiving disabled: CONNECTED heart-beat %q, want 500,0", hb)
	}
}
