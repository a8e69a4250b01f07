package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/cmd/brokerd/node"
	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/stomp"
	"github.com/brokerd/brokerd/test/netsim"
	"github.com/brokerd/brokerd/test/tlstest"
	"github.com/go-stomp/stomp/v3/frame"
	"github.com/hashicorp/memberlist"
)

// discoveryNode starts a complete node named name gossiping on netw,
// joining join, with config changed by mutate; it is shut down when the
// test ends.
func discoveryNode(t *testing.T, netw *netsim.Network, name string, join []string, mutate func(*config.Config)) *node.Node {
	t.Helper()
	h := netw.Host(name)
	cfg := config.Default()
	cfg.Node.Name = name
	cfg.Node.DataDir = t.TempDir()
	cfg.STOMP.Addr = "127.0.0.1:0"
	cfg.Admin.Addr = "127.0.0.1:0"
	cfg.Store.Sync = "none"
	cfg.Cluster.GossipAddr = h.Addr()
	cfg.Cluster.AllowPlaintextGossip = true
	cfg.Cluster.PeerAddr = "127.0.0.1:0"
	cfg.Cluster.ActiveMembers = 3
	cfg.Cluster.PromotionDelay = 200 * time.Millisecond
	cfg.Cluster.Join = join
	cfg.Replica.Factor = 2
	if mutate != nil {
		mutate(&cfg)
	}
	n, err := node.NewWithOptions(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), node.Options{
		Cluster: func(c *cluster.Config) {
			c.Transport = h.Transport()
			c.RejoinInterval = 300 * time.Millisecond
			c.Tick = 20 * time.Millisecond
			c.Memberlist = func(mc *memberlist.Config) {
				mc.ProbeInterval = 100 * time.Millisecond
				mc.ProbeTimeout = 50 * time.Millisecond
				mc.GossipInterval = 20 * time.Millisecond
				mc.SuspicionMult = 2
				mc.PushPullInterval = time.Second
				mc.TCPTimeout = 200 * time.Millisecond
				mc.GossipToTheDeadTime = 2 * time.Second
			}
		},
	})
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if err := n.Start(); err != nil {
		t.Fatalf("%s: start: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
	return n
}

// nodesHeader connects to addr (over TLS with tc) and returns CONNECTED's
// x-brokerd-nodes header, and whether it had one.
func nodesHeader(t *testing.T, addr string, tc *tls.Config) (string, bool) {
	t.Helper()
	var c net.Conn
	var err error
	if tc != nil {
		c, err = tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, tc)
	} else {
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
	}
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	return connectedNodes(t, addr, c)
}

// connectedNodes sends CONNECT on c and returns CONNECTED's
// x-brokerd-nodes header, and whether it had one; it closes c.
func connectedNodes(t *testing.T, addr string, c net.Conn) (string, bool) {
	t.Helper()
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "CONNECT\naccept-version:1.2\nhost:/\nheart-beat:0,0\n\n\x00"); err != nil {
		t.Fatalf("write CONNECT to %s: %v", addr, err)
	}
	f, err := frame.NewReader(bufio.NewReader(c)).Read()
	if err != nil || f == nil || f.Command != frame.CONNECTED {
		t.Fatalf("CONNECT to %s: %v %v", addr, f, err)
	}
	return f.Header.Contains("x-brokerd-nodes")
}

// waitNodes polls the header at addr until it is want.
func waitNodes(t *testing.T, what, addr string, tc *tls.Config, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, _ := nodesHeader(t, addr, tc)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: x-brokerd-nodes at %s is %q, want %q", what, addr, got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// list is self, then others sorted, comma-separated.
func list(self string, others ...string) string {
	others = slices.Clone(others)
	slices.Sort(others)
	return strings.Join(append([]string{self}, others...), ",")
}

// TestClusterNodesHeader: CONNECTED lists the alive nodes' STOMP
// addresses, the node's own first: a node that joins appears, one that
// dies disappears within seconds. A client that came over TLS gets the
// nodes' TLS addresses.
func TestClusterNodesHeader(t *testing.T) {
	ca := tlstest.NewCA(t, t.TempDir(), "ca")
	pair := ca.Issue(t, "broker", nil)
	withTLS := func(c *config.Config) {
		c.STOMP.TLS = config.STOMPTLS{Addr: "127.0.0.1:0", CertFile: pair.CertFile, KeyFile: pair.KeyFile, ClientAuth: "none"}
	}
	tc := &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost"}
	netw := netsim.New()
	join := []string{netw.Host("a").Addr()}
	a := discoveryNode(t, netw, "a", nil, withTLS)
	b := discoveryNode(t, netw, "b", join, withTLS)
	waitNodes(t, "two nodes", a.STOMPAddr(), nil, list(a.STOMPAddr(), b.STOMPAddr()))

	c := discoveryNode(t, netw, "c", join, withTLS)
	waitNodes(t, "c joined", a.STOMPAddr(), nil, list(a.STOMPAddr(), b.STOMPAddr(), c.STOMPAddr()))
	waitNodes(t, "c joined, at c", c.STOMPAddr(), nil, list(c.STOMPAddr(), a.STOMPAddr(), b.STOMPAddr()))
	waitNodes(t, "over TLS", a.STOMPTLSAddr(), tc, list(a.STOMPTLSAddr(), b.STOMPTLSAddr(), c.STOMPTLSAddr()))

	netw.Kill("b") // b's gossip goes silent: it has died for the others
	start := time.Now()
	waitNodes(t, "b died", a.STOMPAddr(), nil, list(a.STOMPAddr(), c.STOMPAddr()))
	t.Logf("b gone from the header after %v", time.Since(start).Round(time.Millisecond))
	waitNodes(t, "b died, over TLS", c.STOMPTLSAddr(), tc, list(c.STOMPTLSAddr(), a.STOMPTLSAddr()))
}

// TestClusterNodesHeaderWebSocket: a client that came over WebSocket gets
// the nodes' WebSocket addresses.
func TestClusterNodesHeaderWebSocket(t *testing.T) {
	netw := netsim.New()
	withWS := func(c *config.Config) { c.STOMP.WSAddr = "127.0.0.1:0" }
	a := discoveryNode(t, netw, "a", nil, withWS)
	b := discoveryNode(t, netw, "b", []string{netw.Host("a").Addr()}, withWS)
	c := discoveryNode(t, netw, "c", []string{netw.Host("a").Addr()}, nil) // no ws listener: not listed
	waitNodes(t, "three nodes", a.STOMPAddr(), nil, list(a.STOMPAddr(), b.STOMPAddr(), c.STOMPAddr()))
	want := list(a.STOMPWSAddr(), b.STOMPWSAddr())
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		conn, err := stomp.DialWebSocket(ctx, "ws://"+a.STOMPWSAddr()+"/ws", nil, nil)
		cancel()
		if err != nil {
			t.Fatalf("dial ws: %v", err)
		}
		got, _ := connectedNodes(t, a.STOMPWSAddr(), conn)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("x-brokerd-nodes over WebSocket is %q, want %q", got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestClusterNodesHeaderAdvertise: stomp.advertise_addr is what the others
// list for a node, its TLS listener at the same host; a node whose
// stomp.addr listens on every interface (0.0.0.0) is listed at its gossip
// address's host. /v1/cluster shows the same addresses.
func TestClusterNodesHeaderAdvertise(t *testing.T) {
	ca := tlstest.NewCA(t, t.TempDir(), "ca")
	pair := ca.Issue(t, "broker", nil)
	netw := netsim.New()
	a := discoveryNode(t, netw, "a", nil, func(c *config.Config) {
		c.STOMP.AdvertiseAddr = "broker-a.example:61613"
		c.STOMP.TLS = config.STOMPTLS{Addr: "127.0.0.1:0", CertFile: pair.CertFile, KeyFile: pair.KeyFile, ClientAuth: "none"}
	})
	b := discoveryNode(t, netw, "b", []string{netw.Host("a").Addr()}, func(c *config.Config) {
		c.STOMP.Addr = "0.0.0.0:0"
		c.Auth.AllowAnonymous = true
	})
	_, aTLSPort, _ := net.SplitHostPort(a.STOMPTLSAddr())
	_, bPort, _ := net.SplitHostPort(b.STOMPAddr())
	bAt := net.JoinHostPort(netw.Host("b").IP().String(), bPort)
	waitNodes(t, "at a", a.STOMPAddr(), nil, list("broker-a.example:61613", bAt))
	waitNodes(t, "at b", "127.0.0.1:"+bPort, nil, list(bAt, "broker-a.example:61613"))
	// b has no TLS listener: a TLS client at a learns only of a.
	waitNodes(t, "over TLS", a.STOMPTLSAddr(), &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost"}, "broker-a.example:"+aTLSPort)

	resp, err := http.Get("http://" + b.AdminAddr() + "/v1/cluster")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st cluster.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	got := map[string][2]string{}
	for _, m := range st.Members {
		got[m.Name] = [2]string{m.STOMPAddr, m.STOMPTLSAddr}
	}
	want := map[string][2]string{"a": {"broker-a.example:61613", "broker-a.example:" + aTLSPort}, "b": {bAt, ""}}
	if got["a"] != want["a"] || got["b"] != want["b"] {
		t.Errorf("/v1/cluster at b lists %v, want %v", got, want)
	}
}

// TestPythonStompPyFailover: stomp.py, given one node's address, learns
// the others from CONNECTED (the README's snippet, test/python/failover.py)
// and, when that node stops, connects to another one and carries on.
func TestPythonStompPyFailover(t *testing.T) {
	requireStompPy(t)
	netw := netsim.New()
	join := []string{netw.Host("a").Addr()}
	a := discoveryNode(t, netw, "a", nil, nil)
	b := discoveryNode(t, netw, "b", join, nil)
	c := discoveryNode(t, netw, "c", join, nil)
	waitNodes(t, "three nodes", a.STOMPAddr(), nil, list(a.STOMPAddr(), b.STOMPAddr(), c.STOMPAddr()))

	host, port, _ := net.SplitHostPort(a.STOMPAddr())
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, debianPython, "python/failover.py", host, port)
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1")
	cmd.WaitDelay = 5 * time.Second
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(stdout)
	var out []string
	next := func() string {
		if !lines.Scan() {
			_ = cmd.Wait()
			t.Fatalf("failover.py ended after %q: %s", out, stderr.String())
		}
		out = append(out, lines.Text())
		return lines.Text()
	}
	others := []string{b.STOMPAddr(), c.STOMPAddr()}
	slices.Sort(others)
	want := "LEARNED " + strings.Join(others, ",") + "," + a.STOMPAddr() // a, just reached, last
	if got := next(); got != want {
		t.Errorf("%s, want %s", got, want)
	}
	if got := next(); got != "READY" {
		t.Fatalf("got %q, want READY", got)
	}
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	_ = a.Shutdown(sctx)
	scancel()
	got := next()
	if at, ok := strings.CutPrefix(got, "RECONNECTED "); !ok || (at != b.STOMPAddr() && at != c.STOMPAddr()) {
		t.Fatalf("got %q, want RECONNECTED to b (%s) or c (%s)", got, b.STOMPAddr(), c.STOMPAddr())
	}
	if got := next(); got != "GOT after failover" {
		t.Errorf("got %q, want the message back", got)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("failover.py: %v: %s (output %q)", err, stderr.String(), out)
	}
}
