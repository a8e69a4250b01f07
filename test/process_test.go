package test

// TestProcess*: the real brokerd binary, built once, run as child processes
// on free loopback ports with --data-dir in t.TempDir(). Every child is
// killed (by its own PID) when its test ends.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-stomp/stomp/v3"
	"github.com/go-stomp/stomp/v3/frame"
)

// ---------------------------------------------------------------------------
// Building the binary

var (
	buildOnce sync.Once
	buildDir  string // removed by TestMain
	buildBin  string
	buildErr  error
)

// TestMain only removes the binary built by brokerdBinary after the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// brokerdBinary builds ./cmd/brokerd once per test binary run and returns
// its path.
func brokerdBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		root, err := filepath.Abs("..") // the test package is <module root>/test
		if err != nil {
			buildErr = err
			return
		}
		if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
			buildErr = fmt.Errorf("module root %s: %w", root, err)
			return
		}
		buildDir, err = os.MkdirTemp("", "brokerd-process-test-")
		if err != nil {
			buildErr = err
			return
		}
		goTool, err := exec.LookPath("go")
		if err != nil {
			buildErr = err
			return
		}
		bin := filepath.Join(buildDir, "brokerd")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, goTool, "build", "-o", bin, "./cmd/brokerd")
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ./cmd/brokerd: %v\n%s", err, out)
			return
		}
		buildBin = bin
	})
	if buildErr != nil {
		t.Fatalf("building brokerd: %v", buildErr)
	}
	return buildBin
}

// childEnv is the test's environment without BROKERD_ variables (so that a
// developer's settings cannot leak into a child), plus extra.
func childEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BROKERD_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// freeAddr returns a loopback address whose port was free a moment ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("pick a free port: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// ---------------------------------------------------------------------------
// Child processes

// syncBuffer is a bytes.Buffer safe for the exec copier and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proc is one running brokerd child process.
type proc struct {
	t         testing.TB
	cmd       *exec.Cmd
	dataDir   string
	stompAddr string
	adminAddr string
	stdout    *syncBuffer
	stderr    *syncBuffer
	done      chan struct{} // closed when Wait returned
	waitErr   error
}

// spawn starts the binary with args and env (childEnv is applied) and
// arranges for it to be killed when the test ends. It does not wait for
// readiness.
func spawn(t testing.TB, args, env []string, stdin io.Reader) *proc {
	t.Helper()
	cmd := exec.Command(brokerdBinary(t), args...)
	cmd.Env = childEnv(env...)
	cmd.Stdin = stdin
	p := &proc{t: t, cmd: cmd, stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout = p.stdout
	cmd.Stderr = p.stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatalf("start brokerd %v: %v", args, err)
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("brokerd (pid %d) %v stderr:\n%s", cmd.Process.Pid, args, p.stderr.String())
		}
	})
	return p
}

// kill sends SIGKILL to the child's PID (if it still runs) and waits for it.
func (p *proc) kill() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.t.Errorf("brokerd pid %d did not exit after SIGKILL", p.cmd.Process.Pid)
	}
}

// exited reports whether the process has exited.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// wait waits up to d for the process to exit and returns its exit code.
func (p *proc) wait(d time.Duration) (code int, ok bool) {
	if !p.exited() {
		select {
		case <-p.done:
		case <-time.After(d):
			return 0, false
		}
	}
	if p.waitErr == nil {
		return 0, true
	}
	var ee *exec.ExitError
	if errors.As(p.waitErr, &ee) {
		return ee.ExitCode(), true
	}
	return -1, true
}

// procOpts are what startProc adds to the command line.
type procOpts struct {
	args []string // besides --data-dir, --stomp-addr, --admin-addr, --store-sync
	env  []string
	// addrsViaEnv passes the addresses as BROKERD_STOMP_ADDR and
	// BROKERD_ADMIN_ADDR instead of flags.
	addrsViaEnv bool
	// noStoreSync leaves --store-sync off the command line.
	noStoreSync bool
}

// startProc starts brokerd on dataDir and free loopback ports and waits until
// it is ready. A bind failure (the free port was taken meanwhile) is retried
// on new ports.
func startProc(t testing.TB, dataDir string, o procOpts) *proc {
	t.Helper()
	var lastErr string
	for attempt := 0; attempt < 5; attempt++ {
		stompAddr, adminAddr := freeAddr(t), freeAddr(t)
		args := []string{"--data-dir", dataDir}
		env := append([]string(nil), o.env...)
		if o.addrsViaEnv {
			env = append(env, "BROKERD_STOMP_ADDR="+stompAddr, "BROKERD_ADMIN_ADDR="+adminAddr)
		} else {
			args = append(args, "--stomp-addr", stompAddr, "--admin-addr", adminAddr)
		}
		if !o.noStoreSync {
			args = append(args, "--store-sync", "always")
		}
		args = append(args, o.args...)
		p := spawn(t, args, env, nil)
		p.dataDir, p.stompAddr, p.adminAddr = dataDir, stompAddr, adminAddr
		err := p.waitReady(20 * time.Second)
		if err == nil {
			return p
		}
		p.kill()
		lastErr = fmt.Sprintf("%v\nstderr:\n%s", err, p.stderr.String())
		if !strings.Contains(p.stderr.String(), "address already in use") {
			break
		}
	}
	t.Fatalf("brokerd did not become ready: %s", lastErr)
	return nil
}

// waitReady polls GET /healthz until it answers 200 and the STOMP port
// accepts connections, until the process exits or d passes.
func (p *proc) waitReady(d time.Duration) error {
	deadline := time.Now().Add(d)
	client := &http.Client{Timeout: time.Second}
	for {
		if p.exited() {
			code, _ := p.wait(0)
			return fmt.Errorf("brokerd exited with status %d before it was ready", code)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("brokerd not ready within %v", d)
		}
		resp, err := client.Get("http://" + p.adminAddr + "/healthz")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				// The admin listener starts before the STOMP one.
				if c, err := net.DialTimeout("tcp", p.stompAddr, time.Second); err == nil {
					c.Close()
					return nil
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// restart starts a new process on p's data directory (new ports).
func (p *proc) restart(o procOpts) *proc {
	p.t.Helper()
	return startProc(p.t, p.dataDir, o)
}

// dial connects go-stomp's client to the process; it is closed when the test
// ends.
func (p *proc) dial(opts ...func(*stomp.Conn) error) *stomp.Conn {
	p.t.Helper()
	c, err := p.tryDial(opts...)
	if err != nil {
		p.t.Fatalf("dial %s: %v", p.stompAddr, err)
	}
	return c
}

func (p *proc) tryDial(opts ...func(*stomp.Conn) error) (*stomp.Conn, error) {
	opts = append([]func(*stomp.Conn) error{stomp.ConnOpt.HeartBeat(0, 0)}, opts...)
	c, err := stomp.Dial("tcp", p.stompAddr, opts...)
	if err != nil {
		return nil, err
	}
	p.t.Cleanup(func() { _ = c.MustDisconnect() })
	return c, nil
}

// raw opens a frame-by-frame connection (rawConn of fixture_test.go) to the
// process; it is closed when the test ends.
func (p *proc) raw() *rawConn {
	p.t.Helper()
	c, err := net.DialTimeout("tcp", p.stompAddr, 5*time.Second)
	if err != nil {
		p.t.Fatalf("dial %s: %v", p.stompAddr, err)
	}
	p.t.Cleanup(func() { c.Close() })
	br := bufio.NewReader(c)
	return &rawConn{t: p.t, c: c, r: frame.NewReader(br), br: br}
}

// get fetches an admin path and returns the status and body.
func (p *proc) get(path string) (int, []byte) {
	p.t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + p.adminAddr + path)
	if err != nil {
		p.t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		p.t.Fatalf("GET %s: %v", path, err)
	}
	return resp.StatusCode, b
}

type destInfo struct {
	Name      string `json:"name"`
	Kind      string `json:"kind"`
	Pending   int    `json:"pending"`
	InFlight  int    `json:"in_flight"`
	Consumers int    `json:"consumers"`
}

// destination returns /v1/destinations' entry for name.
func (p *proc) destination(name string) (destInfo, bool) {
	p.t.Helper()
	code, body := p.get("/v1/destinations")
	if code != http.StatusOK {
		p.t.Fatalf("GET /v1/destinations: %d %s", code, body)
	}
	var ds []destInfo
	if err := json.Unmarshal(body, &ds); err != nil {
		p.t.Fatalf("GET /v1/destinations: %v in %s", err, body)
	}
	for _, d := range ds {
		if d.Name == name {
			return d, true
		}
	}
	return destInfo{}, false
}

// ---------------------------------------------------------------------------
// Prometheus text exposition, enough for the tests.

type series struct {
	name   string
	labels map[string]string
	value  float64
}

var labelRE = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

func parseMetrics(t testing.TB, text string) []series {
	t.Helper()
	var out []series
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Fatalf("bad metrics line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad metrics value in %q: %v", line, err)
		}
		id := line[:i]
		s := series{name: id, labels: map[string]string{}, value: v}
		if j := strings.IndexByte(id, '{'); j >= 0 {
			s.name = id[:j]
			for _, m := range labelRE.FindAllStringSubmatch(id[j:], -1) {
				val := strings.NewReplacer(`\\`, `\`, `\"`, `"`, `\n`, "\n").Replace(m[2])
				s.labels[m[1]] = val
			}
		}
		out = append(out, s)
	}
	return out
}

// metric returns the value of the series with this name and (at least) these
// labels, given as name, value pairs.
func (p *proc) metric(name string, labels ...string) (float64, bool) {
	p.t.Helper()
	code, body := p.get("/metrics")
	if code != http.StatusOK {
		p.t.Fatalf("GET /metrics: %d", code)
	}
	return findMetric(parseMetrics(p.t, string(body)), name, labels...)
}

func findMetric(all []series, name string, labels ...string) (float64, bool) {
next:
	for _, s := range all {
		if s.name != name {
			continue
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if s.labels[labels[i]] != labels[i+1] {
				continue next
			}
		}
		return s.value, true
	}
	return 0, false
}

// waitMetric polls until cond holds for the metric's value (0 when absent),
// or fails after 5 s.
func (p *proc) waitMetric(want valueCond, name string, labels ...string) float64 {
	p.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		v, _ := p.metric(name, labels...)
		if want.ok(v) {
			return v
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("metric %s%v = %v, want %s", name, labels, v, want.desc)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// valueCond is what waitMetric waits for.
type valueCond struct {
	desc string
	ok   func(float64) bool
}

func eq(want float64) valueCond {
	return valueCond{fmt.Sprintf("== %v", want), func(v float64) bool { return v == want }}
}

// ---------------------------------------------------------------------------
// Raw-frame helpers

// rawSend writes a frame: command, header pairs, body.
func (rc *rawConn) frame(cmd string, body string, headers ...string) {
	rc.t.Helper()
	var b strings.Builder
	b.WriteString(cmd + "\n")
	for i := 0; i+1 < len(headers); i += 2 {
		b.WriteString(headers[i] + ":" + headers[i+1] + "\n")
	}
	b.WriteString("\n" + body + "\x00")
	rc.write(b.String())
}

// awaitReceipt reads frames until the RECEIPT for id; MESSAGE frames read on
// the way are returned. Anything else fails the test.
func (rc *rawConn) awaitReceipt(id string) []*frame.Frame {
	rc.t.Helper()
	var msgs []*frame.Frame
	for {
		f := rc.read()
		switch f.Command {
		case frame.RECEIPT:
			if got := f.Header.Get(frame.ReceiptId); got != id {
				rc.t.Fatalf("RECEIPT %q, want %q", got, id)
			}
			return msgs
		case frame.MESSAGE:
			msgs = append(msgs, f)
		default:
			rc.t.Fatalf("waiting for RECEIPT %s: got %s %v %q", id, f.Command, f.Header, f.Body)
		}
	}
}

// drain subscribes to q with auto ack on a new connection and returns every
// body that arrives until none has for quiet.
func drain(t testing.TB, c *stomp.Conn, q string, quiet time.Duration) []string {
	t.Helper()
	sub, err := c.Subscribe(q, stomp.AckAuto)
	if err != nil {
		t.Fatalf("subscribe %s: %v", q, err)
	}
	var got []string
	for {
		select {
		case m, ok := <-sub.C:
			if !ok {
				t.Fatalf("subscription %s closed after %d messages", q, len(got))
			}
			if m.Err != nil {
				t.Fatalf("subscription %s: %v", q, m.Err)
			}
			got = append(got, string(m.Body))
		case <-time.After(quiet):
			return got
		}
	}
}

// ---------------------------------------------------------------------------
// Tests

// TestProcessKill9Recovery: 200 persistent messages, 10 delivered to a
// client-individual subscriber, 5 of them ACKed with receipts, then SIGKILL.
// After a restart on the same data directory exactly the 195 others are
// there.
func TestProcessKill9Recovery(t *testing.T) {
	const n = 200
	p := startProc(t, t.TempDir(), procOpts{})
	q := uniqueQueue(t)

	prod := p.dial()
	for i := 0; i < n; i++ {
		body := fmt.Sprintf("m-%03d", i)
		if err := prod.Send(q, "text/plain", []byte(body), stomp.SendOpt.Receipt,
			stomp.SendOpt.Header("persistent", "true")); err != nil {
			t.Fatalf("send %s: %v", body, err)
		}
	}

	rc := p.raw()
	rc.connect()
	rc.frame("SUBSCRIBE", "", "id", "s1", "destination", q, "ack", "client-individual",
		"prefetch-count", "10", "receipt", "sub")
	msgs := rc.awaitReceipt("sub")
	for len(msgs) < 10 {
		f := rc.read()
		if f.Command != frame.MESSAGE {
			t.Fatalf("want MESSAGE, got %s %v %q", f.Command, f.Header, f.Body)
		}
		msgs = append(msgs, f)
	}
	if len(msgs) != 10 {
		t.Fatalf("got %d messages with prefetch-count 10", len(msgs))
	}
	acked := map[string]bool{}
	for i := 0; i < 5; i++ {
		m := msgs[2*i] // every other one: acknowledged and unacknowledged interleave
		id := m.Header.Get(frame.Ack)
		if id == "" {
			t.Fatalf("MESSAGE without ack header: %v", m.Header)
		}
		rid := "ack-" + strconv.Itoa(i)
		rc.frame("ACK", "", "id", id, "receipt", rid)
		// The window reopens: further MESSAGEs may come before the RECEIPT.
		rc.awaitReceipt(rid)
		acked[string(m.Body)] = true
	}

	// Before the crash the broker itself counts 195.
	deadline := time.Now().Add(5 * time.Second)
	for {
		d, ok := p.destination(q)
		if ok && d.Kind == "queue" && d.Pending+d.InFlight == n-5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("before kill: destination %+v (found %v), want pending+in_flight = %d", d, ok, n-5)
		}
		time.Sleep(20 * time.Millisecond)
	}

	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("SIGKILL: %v", err)
	}
	if _, ok := p.wait(10 * time.Second); !ok {
		t.Fatal("brokerd did not die from SIGKILL")
	}

	p2 := p.restart(procOpts{})
	if d, ok := p2.destination(q); !ok || d.Pending != n-5 || d.Kind != "queue" {
		t.Errorf("after restart: destination %+v (found %v), want %d pending", d, ok, n-5)
	}
	got := drain(t, p2.dial(), q, time.Second)
	seen := map[string]int{}
	for _, b := range got {
		seen[b]++
	}
	for i := 0; i < n; i++ {
		body := fmt.Sprintf("m-%03d", i)
		switch {
		case acked[body] && seen[body] > 0:
			t.Errorf("%s was acknowledged with a receipt before the crash but came back", body)
		case !acked[body] && seen[body] == 0:
			t.Errorf("%s is missing after the crash", body)
		case seen[body] > 1:
			t.Errorf("%s delivered %d times after the restart", body, seen[body])
		}
	}
	if len(got) != n-5 {
		t.Errorf("after restart got %d messages, want %d", len(got), n-5)
	}
}

// TestProcessSIGTERM: producers sending with receipts and a consumer are
// connected when SIGTERM arrives. brokerd exits 0 within 5 s and every
// message that got a RECEIPT (and was not ACKed by the consumer) is there
// after a restart, those the consumer held unacknowledged included.
func TestProcessSIGTERM(t *testing.T) {
	p := startProc(t, t.TempDir(), procOpts{})
	q := uniqueQueue(t)

	var (
		mu        sync.Mutex
		receipted = map[string]bool{}
		acked     = map[string]bool{} // ACKed by the consumer
		held      = map[string]bool{} // delivered, never ACKed
	)
	const producers = 4
	var wg sync.WaitGroup
	stopProducers := make(chan struct{})
	var stopOnce sync.Once
	stop := func() { stopOnce.Do(func() { close(stopProducers) }) }
	for w := 0; w < producers; w++ {
		// go-stomp v3.1.3 can block a Send forever when it races with the
		// ERROR frame that closes the connection (Send holds closeMutex
		// waiting for a receipt that processLoop, gone, never delivers):
		// bound the wait for receipts.
		c := p.dial(stomp.ConnOpt.RcvReceiptTimeout(3*time.Second), stomp.ConnOpt.MsgSendTimeout(3*time.Second))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stopProducers:
					return
				default:
				}
				body := fmt.Sprintf("p%d-%06d", w, i)
				if err := c.Send(q, "text/plain", []byte(body), stomp.SendOpt.Receipt); err != nil {
					return // the broker went away
				}
				mu.Lock()
				receipted[body] = true
				mu.Unlock()
			}
		}()
	}
	defer func() { stop(); wg.Wait() }()

	// The consumer ACKs (without receipts) the first ackFirst messages it
	// gets, which are therefore excluded from the check, then holds the
	// next prefetch-count unacknowledged: those must come back.
	const ackFirst = 50
	cons := p.dial()
	sub, err := cons.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "10"))
	if err != nil {
		t.Fatal(err)
	}
	consumerDone := make(chan struct{})
	go func() {
		defer close(consumerDone)
		for m := range sub.C {
			if m.Err != nil {
				return
			}
			mu.Lock()
			ack := len(acked) < ackFirst
			if ack {
				acked[string(m.Body)] = true
			} else {
				held[string(m.Body)] = true
			}
			mu.Unlock()
			if ack && cons.Ack(m) != nil {
				return
			}
		}
	}()

	// Let traffic build up.
	deadline := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		nr, na, nh := len(receipted), len(acked), len(held)
		mu.Unlock()
		if nr >= 300 && na >= ackFirst && nh >= 10 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d receipts, %d acked, %d held after 20 s", nr, na, nh)
		}
		time.Sleep(10 * time.Millisecond)
	}

	start := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	code, ok := p.wait(5 * time.Second)
	if !ok {
		t.Fatalf("brokerd still running 5 s after SIGTERM")
	}
	t.Logf("exited with status %d %v after SIGTERM", code, time.Since(start).Round(time.Millisecond))
	if code != 0 {
		t.Fatalf("exit status %d after SIGTERM, want 0; stderr:\n%s", code, p.stderr.String())
	}

	// The producers and the consumer see their connections closed.
	stop()
	waitDone := make(chan struct{})
	go func() { wg.Wait(); close(waitDone) }()
	select {
	case <-waitDone:
	case <-time.After(15 * time.Second):
		t.Fatal("producers still blocked 15 s after the broker exited")
	}
	select {
	case <-consumerDone:
	case <-time.After(10 * time.Second):
		t.Fatal("consumer still blocked 10 s after the broker exited")
	}

	p2 := p.restart(procOpts{})
	got := drain(t, p2.dial(), q, time.Second)
	present := map[string]int{}
	for _, b := range got {
		present[b]++
	}
	mu.Lock()
	defer mu.Unlock()
	missing := 0
	for b := range receipted {
		if present[b] == 0 && !acked[b] {
			missing++
			if missing <= 10 {
				t.Errorf("%s got a RECEIPT but is gone after SIGTERM and restart", b)
			}
		}
	}
	for b, n := range present {
		if n > 1 {
			t.Errorf("%s present %d times after restart", b, n)
		}
	}
	for b := range held {
		if present[b] == 0 {
			t.Errorf("%s was delivered and never ACKed but is gone after SIGTERM and restart", b)
		}
	}
	if missing > 0 {
		t.Errorf("%d of %d receipted messages missing", missing, len(receipted))
	}
	t.Logf("%d receipted, %d acked, %d held unacknowledged before SIGTERM; %d present after restart", len(receipted), len(acked), len(held), len(got))
}

// TestProcessNoArgsDefaults: --help lists the flags with their defaults, and
// a broker configured only by --data-dir and BROKERD_ variables comes up
// where the environment says.
func TestProcessNoArgsDefaults(t *testing.T) {
	h := spawn(t, []string{"--help"}, nil, nil)
	code, ok := h.wait(10 * time.Second)
	if !ok || code != 0 {
		t.Fatalf("brokerd --help: status %d (exited %v); stderr:\n%s", code, ok, h.stderr.String())
	}
	help := h.stdout.String() + h.stderr.String()
	for _, want := range []string{"--stomp-addr", "--data-dir", "--node-name", "--admin-addr", "--config",
		"--log-level", "--log-format", "--store-sync", "--users-file", "--allow-anonymous",
		`127.0.0.1:61613`, `127.0.0.1:8613`, `"./data"`, `"always"`} {
		if !strings.Contains(help, want) {
			t.Errorf("--help does not mention %s:\n%s", want, help)
		}
	}
	if !regexp.MustCompile(`--stomp-addr.*\(default "127\.0\.0\.1:61613"\)`).MatchString(help) {
		t.Errorf("--help does not show --stomp-addr's default 127.0.0.1:61613:\n%s", help)
	}

	// Addresses and node name only from the environment.
	p := startProc(t, t.TempDir(), procOpts{
		addrsViaEnv: true,
		noStoreSync: true,
		env:         []string{"BROKERD_NODE_NAME=from-env"},
	})
	code, body := p.get("/healthz")
	if code != http.StatusOK {
		t.Fatalf("/healthz %d %s", code, body)
	}
	var hz map[string]string
	if err := json.Unmarshal(body, &hz); err != nil {
		t.Fatalf("/healthz: %v in %s", err, body)
	}
	if hz["node_name"] != "from-env" || hz["status"] != "ok" {
		t.Errorf("/healthz %v, want status ok and node_name from BROKERD_NODE_NAME", hz)
	}
	c := p.dial()
	q := uniqueQueue(t)
	if err := c.Send(q, "", []byte("x"), stomp.SendOpt.Receipt); err != nil {
		t.Fatalf("send via BROKERD_STOMP_ADDR: %v", err)
	}
	sub, err := c.Subscribe(q, stomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}
	if m := recv(t, sub, 5*time.Second); string(m.Body) != "x" {
		t.Fatalf("got %q", m.Body)
	}
}

// TestProcessBadConfig: bad settings make brokerd exit non-zero at once,
// naming the key, without listening on anything.
func TestProcessBadConfig(t *testing.T) {
	cases := []struct {
		name     string
		args     []string
		env      []string
		yaml     string // written to a file passed with --config
		wantKey  string
		stompOK  bool // the case sets a valid free --stomp-addr
		stompArg string
	}{
		{name: "stomp-addr nonsense", stompArg: "nonsense", wantKey: "stomp.addr"},
		{name: "stomp-addr port out of range", stompArg: "127.0.0.1:70000", wantKey: "stomp.addr"},
		{name: "env max body size", env: []string{"BROKERD_LIMITS_MAX_BODY_SIZE=-1"}, wantKey: "limits.max_body_size", stompOK: true},
		{name: "env unknown key", env: []string{"BROKERD_LIMITS_MAX_BODY_SIZ=10"}, wantKey: "BROKERD_LIMITS_MAX_BODY_SIZ", stompOK: true},
		{name: "yaml unknown key", yaml: "stomp:\n  bogus_key: 1\n", wantKey: "stomp.bogus_key", stompOK: true},
		{name: "yaml unknown section", yaml: "limitz:\n  max_body_size: 1\n", wantKey: "limitz", stompOK: true},
		{name: "yaml bad value", yaml: "queue:\n  max_redeliveries: -3\n", wantKey: "queue.max_redeliveries", stompOK: true},
		{name: "store-sync", args: []string{"--store-sync", "sometimes"}, wantKey: "store.sync", stompOK: true},
		{name: "all interfaces without users file", stompArg: "0.0.0.0:0", wantKey: "auth.users_file"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			adminAddr := freeAddr(t)
			stompAddr := tc.stompArg
			if tc.stompOK {
				stompAddr = freeAddr(t)
			}
			args := append([]string{"--data-dir", filepath.Join(dir, "data"), "--admin-addr", adminAddr,
				"--stomp-addr", stompAddr}, tc.args...)
			if tc.yaml != "" {
				path := filepath.Join(dir, "brokerd.yaml")
				if err := os.WriteFile(path, []byte(tc.yaml), 0o600); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--config", path)
			}
			p := spawn(t, args, tc.env, nil)
			// Nothing may listen while it runs.
			addrs := []string{adminAddr}
			if tc.stompOK {
				addrs = append(addrs, stompAddr)
			}
			deadline := time.Now().Add(5 * time.Second)
			for !p.exited() {
				for _, a := range addrs {
					if c, err := net.DialTimeout("tcp", a, 100*time.Millisecond); err == nil {
						c.Close()
						t.Errorf("something listens on %s", a)
					}
				}
				if time.Now().After(deadline) {
					t.Fatalf("brokerd %v still running after 5 s", args)
				}
				time.Sleep(5 * time.Millisecond)
			}
			code, _ := p.wait(0)
			stderr := p.stderr.String()
			if code == 0 {
				t.Errorf("exit status 0, want non-zero; stderr:\n%s", stderr)
			}
			if !strings.Contains(stderr, tc.wantKey) {
				t.Errorf("stderr does not name %s:\n%s", tc.wantKey, stderr)
			}
			if _, err := os.Stat(filepath.Join(dir, "data")); err == nil {
				t.Logf("note: data directory created despite the bad config")
			}
			t.Logf("status %d: %s", code, strings.TrimSpace(stderr))
		})
	}
}

// TestProcessAdmin: /healthz, /v1/destinations and /metrics of a real
// process, values checked where they are exact.
func TestProcessAdmin(t *testing.T) {
	p := startProc(t, t.TempDir(), procOpts{env: []string{"BROKERD_QUEUE_MAX_REDELIVERIES=1"}})

	code, body := p.get("/healthz")
	if code != http.StatusOK {
		t.Fatalf("/healthz %d %s", code, body)
	}
	var hz map[string]string
	if err := json.Unmarshal(body, &hz); err != nil || hz["status"] != "ok" || hz["node_id"] == "" {
		t.Fatalf("/healthz body %s (%v)", body, err)
	}

	q := uniqueQueue(t)
	const sent = 5
	c := p.dial()
	for i := 0; i < sent; i++ {
		if err := c.Send(q, "text/plain", []byte(fmt.Sprintf("a%d", i)), stomp.SendOpt.Receipt); err != nil {
			t.Fatal(err)
		}
	}

	d, ok := p.destination(q)
	if !ok {
		t.Fatalf("/v1/destinations has no %s", q)
	}
	if d != (destInfo{Name: q, Kind: "queue", Pending: sent}) {
		t.Errorf("/v1/destinations %s = %+v, want kind queue, %d pending, no consumers", q, d, sent)
	}

	p.waitMetric(eq(1), "brokerd_stomp_connections")
	p.waitMetric(eq(sent), "brokerd_stomp_frames_in_total", "command", "SEND")
	p.waitMetric(eq(sent), "brokerd_messages_published_total", "kind", "queue")
	p.waitMetric(eq(sent), "brokerd_destination_pending", "destination", q, "kind", "queue")
	p.waitMetric(eq(0), "brokerd_messages_delivered_total")

	// A consumer with a window of one.
	sub, err := c.Subscribe(q, stomp.AckClientIndividual, stomp.SubscribeOpt.Header("prefetch-count", "1"))
	if err != nil {
		t.Fatal(err)
	}
	m := recv(t, sub, 5*time.Second)
	if string(m.Body) != "a0" {
		t.Fatalf("got %q, want a0", m.Body)
	}
	d, _ = p.destination(q)
	if d.Consumers != 1 || d.InFlight != 1 || d.Pending != sent-1 {
		t.Errorf("with one consumer: %+v, want 1 consumer, 1 in flight, %d pending", d, sent-1)
	}
	p.waitMetric(eq(1), "brokerd_messages_delivered_total")
	if err := c.Ack(m); err != nil {
		t.Fatal(err)
	}
	p.waitMetric(eq(1), "brokerd_messages_acknowledged_total")

	// a1: NACK, redelivered, NACK again: dead-lettered (max_redeliveries 1).
	m = recv(t, sub, 5*time.Second)
	if string(m.Body) != "a1" {
		t.Fatalf("got %q, want a1", m.Body)
	}
	if err := c.Nack(m); err != nil {
		t.Fatal(err)
	}
	p.waitMetric(eq(1), "brokerd_messages_redelivered_total")
	m = recv(t, sub, 5*time.Second)
	if string(m.Body) != "a1" || m.Header.Get("redelivered") != "true" {
		t.Fatalf("got %q %v, want a1 redelivered", m.Body, m.Header)
	}
	if err := c.Nack(m); err != nil {
		t.Fatal(err)
	}
	p.waitMetric(eq(1), "brokerd_messages_dead_lettered_total")
	dlq := "/queue/DLQ." + strings.TrimPrefix(q, "/queue/")
	p.waitMetric(eq(1), "brokerd_destination_pending", "destination", dlq, "kind", "queue")
	if d, ok := p.destination(dlq); !ok || d.Pending != 1 || d.Kind != "queue" {
		t.Errorf("dead-letter queue %s: %+v (found %v), want 1 pending", dlq, d, ok)
	}
	// a2 is next; delivered so far: a0, a1, a1 again, a2.
	m = recv(t, sub, 5*time.Second)
	if string(m.Body) != "a2" {
		t.Fatalf("got %q, want a2", m.Body)
	}
	p.waitMetric(eq(4), "brokerd_messages_delivered_total")
	p.waitMetric(eq(sent-3), "brokerd_destination_pending", "destination", q, "kind", "queue")

	_, body = p.get("/metrics")
	all := parseMetrics(t, string(body))
	for _, name := range []string{"brokerd_store_commit_seconds_bucket", "brokerd_store_commit_seconds_count"} {
		if v, ok := findMetric(all, name); !ok {
			t.Errorf("/metrics has no %s", name)
		} else if name == "brokerd_store_commit_seconds_count" && v < 1 {
			t.Errorf("%s = %v, want >= 1", name, v)
		}
	}
	if v, _ := findMetric(all, "brokerd_stomp_frames_in_total", "command", "NACK"); v != 2 {
		t.Errorf(`brokerd_stomp_frames_in_total{command="NACK"} = %v, want 2`, v)
	}

	// A second connection shows in the gauge, and leaves it.
	c2 := p.dial()
	p.waitMetric(eq(2), "brokerd_stomp_connections")
	if err := c2.Disconnect(); err != nil {
		t.Fatal(err)
	}
	p.waitMetric(eq(1), "brokerd_stomp_connections")
}

// TestProcessPasswd: `brokerd passwd alice` prints a users-file line that a
// broker started with --users-file accepts.
func TestProcessPasswd(t *testing.T) {
	pw := spawn(t, []string{"passwd", "alice"}, nil, strings.NewReader("secret\n"))
	code, ok := pw.wait(30 * time.Second)
	if !ok || code != 0 {
		t.Fatalf("brokerd passwd: status %d (exited %v); stderr:\n%s", code, ok, pw.stderr.String())
	}
	line := strings.TrimSpace(pw.stdout.String())
	if !regexp.MustCompile(`^alice:\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}$`).MatchString(line) {
		t.Fatalf("brokerd passwd printed %q, want alice:$2...", pw.stdout.String())
	}
	if strings.Contains(line, "secret") {
		t.Fatalf("the password appears in the output: %q", line)
	}

	// An empty password is refused.
	empty := spawn(t, []string{"passwd", "bob"}, nil, strings.NewReader("\n"))
	if code, ok := empty.wait(30 * time.Second); !ok || code == 0 {
		t.Errorf("brokerd passwd with an empty password: status %d (exited %v), want non-zero", code, ok)
	}

	users := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(users, []byte("# test users\n"+line+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startProc(t, t.TempDir(), procOpts{args: []string{"--users-file", users}})

	c := p.dial(stomp.ConnOpt.Login("alice", "secret"))
	q := uniqueQueue(t)
	if err := c.Send(q, "", []byte("hi"), stomp.SendOpt.Receipt); err != nil {
		t.Fatalf("send as alice: %v", err)
	}

	for _, bad := range []struct{ login, passcode string }{
		{"alice", "wrong"},
		{"alice", ""},
		{"mallory", "secret"},
		{"", ""},
	} {
		var opts []func(*stomp.Conn) error
		if bad.login != "" || bad.passcode != "" {
			opts = append(opts, stomp.ConnOpt.Login(bad.login, bad.passcode))
		}
		if _, err := p.tryDial(opts...); err == nil {
			t.Errorf("login %q passcode %q was accepted", bad.login, bad.passcode)
		}
	}
	// Refused logins raise no trouble for the good one.
	sub, err := c.Subscribe(q, stomp.AckAuto)
	if err != nil {
		t.Fatal(err)
	}
	if m := recv(t, sub, 5*time.Second); string(m.Body) != "hi" {
		t.Fatalf("got %q", m.Body)
	}
}
