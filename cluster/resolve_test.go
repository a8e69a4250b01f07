package cluster_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/hashicorp/memberlist"
	"github.com/miekg/dns"
)

// dnsZone is a DNS server for the tests: A records by name (fully
// qualified, lower case), changed while it runs. A name it does not hold
// gets NXDOMAIN; AAAA questions for a name it holds get no answer.
type dnsZone struct {
	mu      sync.Mutex
	a       map[string][]string
	queries map[string]int
	addr    string
}

// startDNS serves zone on a free UDP port of 127.0.0.1 until the test ends.
func startDNS(t *testing.T) *dnsZone {
	t.Helper()
	z := &dnsZone{a: map[string][]string{}, queries: map[string]int{}}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	z.addr = pc.LocalAddr().String()
	started := make(chan struct{})
	srv := &dns.Server{PacketConn: pc, Handler: z, NotifyStartedFunc: func() { close(started) }}
	go func() { _ = srv.ActivateAndServe() }()
	<-started
	t.Cleanup(func() { _ = srv.Shutdown() })
	return z
}

func (z *dnsZone) set(name string, ips ...string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.a[name] = ips
}

func (z *dnsZone) asked(name string) int {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.queries[name]
}

func (z *dnsZone) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(r)
	if len(r.Question) == 1 {
		q := r.Question[0]
		name := strings.ToLower(q.Name)
		z.mu.Lock()
		ips, ok := z.a[name]
		z.queries[name]++
		z.mu.Unlock()
		switch {
		case !ok:
			m.Rcode = dns.RcodeNameError
		case q.Qtype == dns.TypeA:
			for _, ip := range ips {
				m.Answer = append(m.Answer, &dns.A{
					Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 0},
					A:   net.ParseIP(ip).To4(),
				})
			}
		}
	}
	_ = w.WriteMsg(m)
}

// resolver asks only z.
func (z *dnsZone) resolver() *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", z.addr)
	}}
}

// gossipPort returns a port free for UDP and TCP on every one of ips.
func gossipPort(t *testing.T, ips ...string) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", ips[0]+":0")
		if err != nil {
			t.Skipf("cannot listen on %s (needs 127.0.0.0/8 on lo): %v", ips[0], err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		free := true
		for _, ip := range ips {
			addr := net.JoinHostPort(ip, strconv.Itoa(port))
			tl, err := net.Listen("tcp", addr)
			if err != nil {
				free = false
				break
			}
			ul, err := net.ListenPacket("udp", addr)
			tl.Close()
			if err != nil {
				free = false
				break
			}
			ul.Close()
		}
		if free {
			return port
		}
	}
	t.Fatal("no port free on every loopback address")
	return 0
}

// realNode is a node gossiping over real UDP and TCP at ip:port, with fast
// timings, resolving names through z.
func realNode(t *testing.T, z *dnsZone, name, ip string, port int, join []string, resolveEvery time.Duration, logs slog.Handler) *cluster.Node {
	t.Helper()
	cfg := cluster.DefaultConfig()
	cfg.NodeID = "id-" + name
	cfg.NodeName = name
	cfg.ActiveMembers = 3
	cfg.PromotionDelay = 100 * time.Millisecond
	cfg.Tick = 20 * time.Millisecond
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg.Memberlist = func(mc *memberlist.Config) {
		mc.ProbeInterval = 100 * time.Millisecond
		mc.ProbeTimeout = 50 * time.Millisecond
		mc.GossipInterval = 20 * time.Millisecond
		mc.SuspicionMult = 2
		mc.PushPullInterval = time.Second
		mc.TCPTimeout = 200 * time.Millisecond
	}
	cfg.BindAddr = net.JoinHostPort(ip, strconv.Itoa(port))
	cfg.Join = join
	cfg.Resolver = z.resolver()
	cfg.RejoinInterval = 100 * time.Millisecond
	cfg.ResolveInterval = resolveEvery
	if logs != nil {
		cfg.Logger = slog.New(logs)
	}
	return startConfig(t, cfg)
}

// alive returns the names n lists alive, sorted.
func alive(n *cluster.Node) string {
	var names []string
	for _, m := range n.Status().Members {
		if m.State == "alive" {
			names = append(names, m.Name)
		}
	}
	return strings.Join(names, ",")
}

func waitAlive(t *testing.T, n *cluster.Node, want string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for alive(n) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s sees alive %q, want %q within %v", n.Status().NodeName, alive(n), want, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestClusterJoinByDNSJoinsEveryAddress: a join entry whose name resolves
// to three addresses (a headless Service) joins all three, although none
// of them knows the others: each runs alone until the new node reaches it.
// memberlist's own resolution (the system resolver) does not know the name.
func TestClusterJoinByDNSJoinsEveryAddress(t *testing.T) {
	ips := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"}
	port := gossipPort(t, ips...)
	z := startDNS(t)
	z.set("brokerd.test.", ips[:3]...)
	for i, name := range []string{"b1", "b2", "b3"} {
		realNode(t, z, name, ips[i], port, nil, time.Hour, nil)
	}
	j := realNode(t, z, "j", ips[3], port, []string{"brokerd.test.:" + strconv.Itoa(port)}, time.Hour, nil)
	waitAlive(t, j, "b1,b2,b3,j", 10*time.Second)
}

// TestClusterJoinByDNSFindsNewAddress: a node that is already in a cluster
// resolves its join names again every ResolveInterval and joins an address
// that appeared since (a StatefulSet scaled up), though the new node joined
// no one.
func TestClusterJoinByDNSFindsNewAddress(t *testing.T) {
	ips := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"}
	port := gossipPort(t, ips...)
	z := startDNS(t)
	z.set("brokerd.test.", ips[0])
	logs := &logRecorder{}
	b1 := realNode(t, z, "b1", ips[0], port, nil, time.Hour, nil)
	j := realNode(t, z, "j", ips[1], port, []string{"brokerd.test.:" + strconv.Itoa(port)}, 300*time.Millisecond, logs)
	waitAlive(t, j, "b1,j", 10*time.Second)

	b3 := realNode(t, z, "b3", ips[2], port, nil, time.Hour, nil)
	if got := alive(b3); got != "b3" {
		t.Fatalf("b3 joined no one but sees %q", got)
	}
	z.set("brokerd.test.", ips[0], ips[2])
	waitAlive(t, j, "b1,b3,j", 10*time.Second)
	waitAlive(t, b1, "b1,b3,j", 10*time.Second)
	if logs.count("INFO join address resolved") < 2 {
		t.Errorf("the change of addresses was not logged: %v", logs.msgs)
	}
}

// TestClusterJoinByDNSUnresolvable: a join name that does not resolve does
// not stop the start; the node runs alone, logs it once, and keeps
// resolving it, joining once the name appears.
func TestClusterJoinByDNSUnresolvable(t *testing.T) {
	ips := []string{"127.0.0.2", "127.0.0.3"}
	port := gossipPort(t, ips...)
	z := startDNS(t)
	realNode(t, z, "b1", ips[0], port, nil, time.Hour, nil)
	logs := &logRecorder{}
	join := []string{"later.test.:" + strconv.Itoa(port)}
	j := realNode(t, z, "j", ips[1], port, join, time.Hour, logs)
	waitFor(t, 5*time.Second, "the name asked again", func() bool { return z.asked("later.test.") >= 6 })
	if got := alive(j); got != "j" {
		t.Fatalf("j sees %q with a name that does not resolve", got)
	}
	if n := logs.count("WARN join address not resolved; retrying"); n != 1 {
		t.Errorf("the failure was logged %d times, want once: %v", n, logs.msgs)
	}
	z.set("later.test.", ips[0])
	waitAlive(t, j, "b1,j", 10*time.Second)
}
