package stomp

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	gostomp "github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
)

func TestPatternMatch(t *testing.T) {
	for _, tc := range []struct {
		pattern string
		yes, no []string
	}{
		{"/queue/orders.*",
			[]string{"/queue/orders.eu", "/queue/orders.", "/queue/orders.a-b_c"},
			[]string{"/queue/orders.eu.x", "/queue/orders", "/queue/orders.eu/x", "/topic/orders.eu", "/queue/ordersXeu"}},
		{"/topic/#",
			[]string{"/topic/a", "/topic/a.b/c", "/topic/"},
			[]string{"/topic", "/queue/a", "x/topic/a"}},
		{"#", []string{"", "/queue/a", "/topic/b.c"}, nil},
		{"/queue/a",
			[]string{"/queue/a"},
			[]string{"/queue/ab", "/queue/", "/queue/a.b"}},
		{"/queue/*.eu",
			[]string{"/queue/orders.eu", "/queue/.eu"},
			[]string{"/queue/a.b.eu", "/queue/orders.eu.x"}},
		{"/queue/#.dlq",
			[]string{"/queue/.dlq", "/queue/a.b.dlq", "/queue/dlq.dlq"},
			[]string{"/queue/a.dlqx", "/queue/dlq"}},
		{"/queue/a*b", []string{"/queue/ab", "/queue/axxb"}, []string{"/queue/a.b", "/queue/a"}},
		{"/queue/*#*", []string{"/queue/", "/queue/a.b/c"}, []string{"/topic/a"}},
		{"/queue/**", []string{"/queue/", "/queue/abc"}, []string{"/queue/a.b"}},
		{"#a#a#a", []string{"aaa", "xaxaxa", "/queue/a.a.a"}, []string{"aa", "aaab"}},
	} {
		p := compilePattern(tc.pattern)
		for _, s := range tc.yes {
			if !p.match(s) {
				t.Errorf("%q does not match %q, want a match", tc.pattern, s)
			}
		}
		for _, s := range tc.no {
			if p.match(s) {
				t.Errorf("%q matches %q, want no match", tc.pattern, s)
			}
		}
	}
}

// TestPatternMatchLinear: a pattern that makes a backtracking matcher
// take exponential time is matched in time linear in the name.
func TestPatternMatchLinear(t *testing.T) {
	p := compilePattern(strings.Repeat("#a", 40) + "#b")
	name := strings.Repeat("a", 100_000)
	start := time.Now()
	if p.match(name) {
		t.Fatal("matched a name without b")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("took %v", d)
	}
}

func TestParseACL(t *testing.T) {
	a, err := ParseACL([]byte(`# rules
alice   read,write /queue/orders.*
group:ops all #

*  read /topic/public.#
"Order Service" write,configure /queue/orders.#
bob configure,read /queue/bob.#
`))
	if err != nil {
		t.Fatal(err)
	}
	if a.Len() != 5 {
		t.Fatalf("%d rules, want 5", a.Len())
	}
	if g := a.GroupsNamed(); len(g) != 1 || g[0] != "ops" {
		t.Fatalf("GroupsNamed = %q", g)
	}
}

func TestParseACLErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"alice read\n", "line 1: want SUBJECT PERMISSIONS PATTERN, got 2 fields"},
		{"# c\n\nalice read /queue/a extra\n", "line 3: want SUBJECT PERMISSIONS PATTERN, got 4 fields"},
		{"alice reed /queue/a\n", `line 1: permission "reed": want a comma list of read, write, configure, or all`},
		{"alice read, /queue/a\n", `line 1: permission ""`},
		{"alice read queue/a\n", `line 1: pattern "queue/a" matches no destination`},
		{"group: read /queue/a\n", `line 1: subject "group:": empty group name`},
		{"group:a,b read /queue/a\n", `line 1: subject "group:a,b": group name "a,b"`},
		{`"alice read /queue/a` + "\n", "line 1: subject"},
		{`"" read /queue/a` + "\n", "line 1: subject \"\": empty user name"},
		{`"alice"read /queue/a` + "\n", "line 1: want SUBJECT PERMISSIONS PATTERN, with spaces"},
		{"alice READ /queue/a\n", `line 1: permission "READ"`},
	} {
		_, err := ParseACL([]byte(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseACL(%q) = %v, want an error containing %q", tc.in, err, tc.want)
		}
	}
}

// groupMap is a Grouper: user to groups.
type groupMap map[string][]string

func (g groupMap) InGroup(user, group string) bool {
	for _, x := range g[user] {
		if x == group {
			return true
		}
	}
	return false
}

func TestACLAllowed(t *testing.T) {
	a, err := ParseACL([]byte(`
alice read,write /queue/orders.*
alice configure /queue/orders.eu
group:ops all /queue/#
* read /topic/public.#
"Order Service" write /topic/orders
`))
	if err != nil {
		t.Fatal(err)
	}
	a = a.WithGroups(groupMap{"carol": {"ops"}, "": {"ops"}})
	for _, tc := range []struct {
		user string
		perm Permission
		dest string
		want bool
	}{
		{"alice", PermWrite, "/queue/orders.us", true},
		{"alice", PermRead, "/queue/orders.us", true},
		{"alice", PermConfigure, "/queue/orders.us", false},
		{"alice", PermConfigure, "/queue/orders.eu", true},
		{"alice", PermWrite | PermConfigure, "/queue/orders.eu", true}, // from two rules
		{"alice", PermWrite | PermConfigure, "/queue/orders.us", false},
		{"alice", PermWrite, "/queue/orders.us.x", false},
		{"alice", PermWrite, "/topic/orders.us", false},
		{"alice", PermRead, "/topic/public.news", true}, // *
		{"alice", PermWrite, "/topic/public.news", false},
		{"", PermRead, "/topic/public.news", true}, // * includes anonymous
		{"", PermRead, "/queue/x", false},          // a group never holds anonymous
		{"carol", PermConfigure, "/queue/anything", true},
		{"carol", PermRead, "/topic/x", false},
		{"Order Service", PermWrite, "/topic/orders", true},
		{"Order", PermWrite, "/topic/orders", false},
		{"bob", PermRead, "/queue/orders.us", false}, // default deny
		{"group:ops", PermRead, "/queue/a", false},   // a user name is not a group
	} {
		if got := a.Allowed(tc.user, tc.perm, tc.dest); got != tc.want {
			t.Errorf("Allowed(%q, %v, %q) = %v, want %v", tc.user, tc.perm, tc.dest, got, tc.want)
		}
		err := a.Authorize(tc.user, tc.perm, tc.dest)
		if (err == nil) != tc.want || (err != nil && !errors.Is(err, ErrAccessDenied)) {
			t.Errorf("Authorize(%q, %v, %q) = %v", tc.user, tc.perm, tc.dest, err)
		}
	}
	// Without groups, group rules match nobody.
	b, _ := ParseACL([]byte("group:ops all #\n"))
	if b.Allowed("carol", PermRead, "/queue/a") {
		t.Error("a group rule matched without a Grouper")
	}
	// An empty ACL denies everything.
	e, _ := ParseACL([]byte("# nothing\n"))
	if e.Allowed("alice", PermRead, "/queue/a") {
		t.Error("an empty ACL allowed a read")
	}
}

func TestPermissionString(t *testing.T) {
	for p, want := range map[Permission]string{
		PermRead: "read", PermWrite: "write", PermConfigure: "configure",
		PermRead | PermConfigure: "read,configure", 0: "Permission(0)",
	} {
		if got := p.String(); got != want {
			t.Errorf("%d.String() = %q, want %q", p, got, want)
		}
	}
}

// aclServer starts a server whose users are alice, bob and carol
// (password "secret"; carol in group admins) under the rules below, and
// returns it with its replica node.
func aclServer(t *testing.T) (*Server, *replica.Node) {
	t.Helper()
	h := testHash(t)
	users, err := ParseUsers([]byte("alice:" + h + "\nbob:" + h + "\ncarol:" + h + "\ngroup:admins:carol\n"))
	if err != nil {
		t.Fatal(err)
	}
	acl, err := ParseACL([]byte(`
group:admins all #
alice read,write,configure /queue/orders.*
bob read,write /queue/orders.*
* read /topic/public.#
alice write /topic/public.#
`))
	if err != nil {
		t.Fatal(err)
	}
	rb, srv := testServerCfg(t, func(c *Config) {
		c.Auth = users
		c.Authorizer = acl.WithGroups(users)
	})
	return srv, rb.inner.(localBroker).Node
}

// aclDial connects user with the go-stomp client.
func aclDial(t *testing.T, srv *Server, user string) *gostomp.Conn {
	t.Helper()
	c, err := gostomp.Dial("tcp", srv.Addr().String(), gostomp.ConnOpt.Login(user, "secret"), gostomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.MustDisconnect() })
	return c
}

// stompError returns the ERROR frame err carries, failing the test
// unless its message is msg.
func stompError(t *testing.T, err error, msg string) *frame.Frame {
	t.Helper()
	var se gostomp.Error
	if !errors.As(err, &se) || se.Frame == nil || se.Frame.Command != frame.ERROR {
		t.Fatalf("want an ERROR %q, got %v", msg, err)
	}
	if got := se.Frame.Header.Get(frame.Message); got != msg {
		t.Fatalf("ERROR message %q, want %q (body %q)", got, msg, se.Frame.Body)
	}
	return se.Frame
}

// recv returns the next message of sub, failing after 5 s.
func recv(t *testing.T, sub *gostomp.Subscription) *gostomp.Message {
	t.Helper()
	select {
	case m := <-sub.C:
		return m
	case <-time.After(5 * time.Second):
		t.Fatal("no message within 5 s")
		return nil
	}
}

// pending is the number of messages queue dest holds, -1 if it does not
// exist.
func pending(rep *replica.Node, dest string) int {
	for _, d := range rep.Destinations() {
		if d.Name == dest {
			return d.Pending + d.InFlight
		}
	}
	return -1
}

// TestSessionACL: with an Authorizer, SEND needs write, SUBSCRIBE read,
// and creating a queue configure; a refused frame gets an ERROR naming
// the destination and the permission, with its receipt-id, changes
// nothing, and the connection closes.
func TestSessionACL(t *testing.T) {
	srv, rep := aclServer(t)
	receipt := gostomp.SendOpt.Receipt

	// alice may create /queue/orders.eu.
	alice := aclDial(t, srv, "alice")
	if err := alice.Send("/queue/orders.eu", "text/plain", []byte("1"), receipt); err != nil {
		t.Fatalf("alice's SEND creating a queue: %v", err)
	}

	t.Run("write denied", func(t *testing.T) {
		bob := aclDial(t, srv, "bob")
		err := bob.Send("/queue/other", "text/plain", []byte("x"), gostomp.SendOpt.Header(frame.Receipt, "r-w"))
		f := stompError(t, err, "access denied: write on /queue/other")
		if got := f.Header.Get(frame.ReceiptId); got != "r-w" {
			t.Errorf("receipt-id %q, want r-w", got)
		}
		if want := `SEND to /queue/other needs write permission, which user "bob" lacks`; string(f.Body) != want {
			t.Errorf("body %q, want %q", f.Body, want)
		}
		if pending(rep, "/queue/other") != -1 {
			t.Error("the refused SEND created its queue")
		}
	})

	t.Run("create denied", func(t *testing.T) {
		bob := aclDial(t, srv, "bob")
		// bob may write /queue/orders.eu, which exists ...
		if err := bob.Send("/queue/orders.eu", "text/plain", []byte("2"), receipt); err != nil {
			t.Fatalf("bob's SEND to an existing queue: %v", err)
		}
		// ... but not create /queue/orders.us.
		err := bob.Send("/queue/orders.us", "text/plain", []byte("x"), gostomp.SendOpt.Header(frame.Receipt, "r-c"))
		f := stompError(t, err, "access denied: configure on /queue/orders.us")
		if got := f.Header.Get(frame.ReceiptId); got != "r-c" {
			t.Errorf("receipt-id %q, want r-c", got)
		}
		if !strings.Contains(string(f.Body), `/queue/orders.us does not exist, and creating it needs configure permission, which user "bob" lacks`) {
			t.Errorf("body %q", f.Body)
		}
		if pending(rep, "/queue/orders.us") != -1 {
			t.Error("the refused SEND created its queue")
		}
	})

	t.Run("subscribe", func(t *testing.T) {
		bob := tdial(t, srv.Addr().String())
		bob.connect("accept-version:1.2", "host:/", "login:bob", "passcode:secret", "heart-beat:0,0")
		bob.write(tframe(frame.SUBSCRIBE, "", "id:1", "destination:/queue/orders.eu", "ack:client-individual", "receipt:s1"))
		if msgs := bob.receipt("s1"); len(msgs) > 2 {
			t.Fatalf("%d messages", len(msgs))
		}
		bob.write(tframe(frame.SUBSCRIBE, "", "id:2", "destination:/topic/public.news", "receipt:s2"))
		bob.receipt("s2")
		// Read is not enough to create a queue.
		bob.write(tframe(frame.SUBSCRIBE, "", "id:3", "destination:/queue/orders.new", "receipt:s3"))
		f := bob.expectError("access denied: configure on /queue/orders.new")
		if got := f.Header.Get(frame.ReceiptId); got != "s3" {
			t.Errorf("receipt-id %q, want s3", got)
		}
		if pending(rep, "/queue/orders.new") != -1 {
			t.Error("the refused SUBSCRIBE created its queue")
		}
		// The messages bob received come back: ACK and NACK needed nothing.
		if n := pending(rep, "/queue/orders.eu"); n != 2 {
			t.Errorf("/queue/orders.eu holds %d messages, want 2", n)
		}

		bob = tdial(t, srv.Addr().String())
		bob.connect("accept-version:1.2", "host:/", "login:bob", "passcode:secret", "heart-beat:0,0")
		bob.write(tframe(frame.SUBSCRIBE, "", "id:1", "destination:/queue/secret", "receipt:s4"))
		f = bob.expectError("access denied: read on /queue/secret")
		if got := f.Header.Get(frame.ReceiptId); got != "s4" {
			t.Errorf("receipt-id %q, want s4", got)
		}
		if !strings.Contains(string(f.Body), `SUBSCRIBE to /queue/secret needs read permission, which user "bob" lacks`) {
			t.Errorf("body %q", f.Body)
		}
	})

	t.Run("ack and nack need nothing more", func(t *testing.T) {
		bob := aclDial(t, srv, "bob")
		sub, err := bob.Subscribe("/queue/orders.eu", gostomp.AckClientIndividual)
		if err != nil {
			t.Fatal(err)
		}
		m1, m2 := recv(t, sub), recv(t, sub)
		if m1.Err != nil || m2.Err != nil {
			t.Fatalf("%v %v", m1.Err, m2.Err)
		}
		if err := bob.Ack(m1); err != nil {
			t.Fatal(err)
		}
		if err := bob.Nack(m2); err != nil {
			t.Fatal(err)
		}
		if err := bob.Send("/queue/orders.eu", "text/plain", []byte("3"), receipt); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("transaction", func(t *testing.T) {
		before := pending(rep, "/queue/orders.eu")
		// A transaction's SEND is refused when it arrives.
		bob := aclDial(t, srv, "bob")
		tx, err := bob.BeginWithError()
		if err != nil {
			t.Fatal(err)
		}
		if err := tx.Send("/queue/orders.eu", "text/plain", []byte("tx"), receipt); err != nil {
			t.Fatal(err)
		}
		err = tx.Send("/queue/other", "text/plain", []byte("tx"), gostomp.SendOpt.Header(frame.Receipt, "r-t"))
		f := stompError(t, err, "access denied: write on /queue/other")
		if got := f.Header.Get(frame.ReceiptId); got != "r-t" {
			t.Errorf("receipt-id %q, want r-t", got)
		}
		// Creation is checked at COMMIT, which is refused whole.
		bob = aclDial(t, srv, "bob")
		tx, err = bob.BeginWithError()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range []string{"/queue/orders.eu", "/queue/orders.tx"} {
			if err := tx.Send(d, "text/plain", []byte("tx"), receipt); err != nil {
				t.Fatalf("SEND to %s in a transaction: %v", d, err)
			}
		}
		stompError(t, tx.CommitWithReceipt(), "access denied: configure on /queue/orders.tx")
		if n := pending(rep, "/queue/orders.eu"); n != before || pending(rep, "/queue/orders.tx") != -1 {
			t.Errorf("a refused transaction changed something: /queue/orders.eu holds %d (was %d), /queue/orders.tx %d", n, before, pending(rep, "/queue/orders.tx"))
		}
	})

	t.Run("topics", func(t *testing.T) {
		// Topics need no configure: anyone may read public ones.
		bob := aclDial(t, srv, "bob")
		sub, err := bob.Subscribe("/topic/public.news", gostomp.AckAuto)
		if err != nil {
			t.Fatal(err)
		}
		// Its RECEIPT comes after the SUBSCRIBE took effect.
		if err := bob.Send("/queue/orders.eu", "text/plain", []byte("4"), receipt); err != nil {
			t.Fatal(err)
		}
		if err := alice.Send("/topic/public.news", "text/plain", []byte("news"), receipt); err != nil {
			t.Fatal(err)
		}
		if m := recv(t, sub); m.Err != nil || string(m.Body) != "news" {
			t.Fatalf("%v %q", m.Err, m.Body)
		}
		stompError(t, bob.Send("/topic/public.news", "text/plain", []byte("x"), receipt), "access denied: write on /topic/public.news")
	})

	t.Run("group", func(t *testing.T) {
		carol := aclDial(t, srv, "carol")
		if err := carol.Send("/queue/anything", "text/plain", []byte("x"), receipt); err != nil {
			t.Fatalf("a member of admins creating a queue: %v", err)
		}
		if pending(rep, "/queue/anything") != 1 {
			t.Error("carol's message not stored")
		}
	})
}
