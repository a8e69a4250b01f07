package browser

// Real brokerd processes: the binary is built once per test binary run
// and each node runs as a child process on free loopback ports with its
// data in t.TempDir(). Every child is killed by its own PID when its test
// ends. (A minimal copy of test/process_test.go's helpers, which live in
// another package and are unexported.)

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/go-stomp/stomp/v3"
)

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

// brokerdBinary builds ./cmd/brokerd once and returns its path.
func brokerdBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		root, err := filepath.Abs("../..") // this package is <module root>/test/browser
		if err != nil {
			buildErr = err
			return
		}
		if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
			buildErr = fmt.Errorf("module root %s: %w", root, err)
			return
		}
		buildDir, err = os.MkdirTemp("", "brokerd-browser-test-")
		if err != nil {
			buildErr = err
			return
		}
		bin := filepath.Join(buildDir, "brokerd")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/brokerd")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
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

// childEnv is the test's environment without BROKERD_ variables (the
// broker refuses a BROKERD_ variable that names no key, such as the test
// command's BROKERD_SCREENSHOT), plus extra.
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
	defer ln.Close()
	return ln.Addr().String()
}

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

// node is one running brokerd process of the test's cluster.
type node struct {
	t         testing.TB
	name      string
	stompAddr string
	wsAddr    string
	adminAddr string
	gossip    string
	cmd       *exec.Cmd
	stderr    *syncBuffer
	done      chan struct{} // closed when Wait returned
}

// nodeOpts is what startNode puts on the command line and in the
// environment besides the addresses.
type nodeOpts struct {
	name string
	join string // gossip address of a node to join; "" for none
	m    int    // cluster.active_members
	env  []string
}

// startNode starts brokerd with its STOMP, WebSocket, admin and gossip
// listeners on free loopback ports and waits until all of them accept
// connections. A bind failure (a free port taken meanwhile) is retried on
// new ports.
func startNode(t testing.TB, o nodeOpts) *node {
	t.Helper()
	dataDir := t.TempDir()
	var lastErr string
	for attempt := 0; attempt < 5; attempt++ {
		n := &node{
			t: t, name: o.name,
			stompAddr: freeAddr(t), wsAddr: freeAddr(t), adminAddr: freeAddr(t), gossip: freeAddr(t),
			stderr: &syncBuffer{}, done: make(chan struct{}),
		}
		args := []string{
			"--data-dir", dataDir,
			"--node-name", o.name,
			"--stomp-addr", n.stompAddr,
			"--stomp-ws-addr", n.wsAddr,
			"--admin-addr", n.adminAddr,
			"--gossip-addr", n.gossip,
			"--active-members", strconv.Itoa(o.m),
		}
		if o.join != "" {
			args = append(args, "--join", o.join)
		}
		n.cmd = exec.Command(brokerdBinary(t), args...)
		n.cmd.Env = childEnv(o.env...)
		n.cmd.Stdout = io.Discard
		n.cmd.Stderr = n.stderr
		n.cmd.WaitDelay = 5 * time.Second
		if err := n.cmd.Start(); err != nil {
			t.Fatalf("start brokerd %v: %v", args, err)
		}
		go func() {
			_ = n.cmd.Wait()
			close(n.done)
		}()
		t.Cleanup(func() {
			n.kill()
			if t.Failed() {
				t.Logf("brokerd %s (pid %d) stderr:\n%s", n.name, n.cmd.Process.Pid, n.stderr.String())
			}
		})
		err := n.waitReady(20 * time.Second)
		if err == nil {
			return n
		}
		n.kill()
		lastErr = fmt.Sprintf("%v\nstderr:\n%s", err, n.stderr.String())
		if !strings.Contains(n.stderr.String(), "address already in use") {
			break
		}
	}
	t.Fatalf("brokerd %s did not become ready: %s", o.name, lastErr)
	return nil
}

// waitReady polls GET /healthz until it answers 200 and the STOMP and
// WebSocket ports accept connections, until the process exits or d passes.
func (n *node) waitReady(d time.Duration) error {
	deadline := time.Now().Add(d)
	client := &http.Client{Timeout: time.Second}
	last := "no answer yet"
	for {
		select {
		case <-n.done:
			return fmt.Errorf("brokerd exited before it was ready")
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("brokerd not ready within %v: %s", d, last)
		}
		if resp, err := client.Get("http://" + n.adminAddr + "/healthz"); err != nil {
			last = err.Error()
		} else {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			last = "GET /healthz: " + resp.Status
			if resp.StatusCode == http.StatusOK {
				if err := dialOK(n.stompAddr); err != nil {
					last = "STOMP listener: " + err.Error()
				} else if err := dialOK(n.wsAddr); err != nil {
					last = "WebSocket listener (--stomp-ws-addr): " + err.Error()
				} else {
					return nil
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func dialOK(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}

// kill sends SIGKILL to the node's PID (if it still runs) and waits for it.
func (n *node) kill() {
	select {
	case <-n.done:
		return
	default:
	}
	_ = n.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-n.done:
	case <-time.After(10 * time.Second):
		n.t.Errorf("brokerd %s (pid %d) did not exit after SIGKILL", n.name, n.cmd.Process.Pid)
	}
}

// status is the node's GET /v1/cluster.
func (n *node) status() (cluster.Status, error) {
	var s cluster.Status
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + n.adminAddr + "/v1/cluster")
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return s, err
	}
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("%s: GET /v1/cluster: %s %s", n.name, resp.Status, body)
	}
	return s, json.Unmarshal(body, &s)
}

// dial connects go-stomp's client over TCP; the connection is closed when
// the test ends.
func (n *node) dial(t testing.TB) *stomp.Conn {
	t.Helper()
	c, err := stomp.Dial("tcp", n.stompAddr, stomp.ConnOpt.HeartBeat(0, 0))
	if err != nil {
		t.Fatalf("dial %s (%s): %v", n.name, n.stompAddr, err)
	}
	t.Cleanup(func() { _ = c.MustDisconnect() })
	return c
}

// testCluster is three brokerd processes, M=3, that agreed on one view.
type testCluster struct {
	nodes  []*node
	byID   map[string]*node
	active []string // node IDs, as /v1/cluster's active_set
}

// startCluster starts n nodes that join the first, with env in every
// node's environment, and waits until each sees all of them alive in one
// agreed active set.
func startCluster(t testing.TB, n int, env ...string) *testCluster {
	t.Helper()
	c := &testCluster{byID: map[string]*node{}}
	for i := 0; i < n; i++ {
		o := nodeOpts{name: "n" + strconv.Itoa(i+1), m: n, env: env}
		if i > 0 {
			o.join = c.nodes[0].gossip
		}
		c.nodes = append(c.nodes, startNode(t, o))
	}
	waitFor(t, 30*time.Second, "every node sees the same active set of all members", func() (bool, string) {
		var sets []string
		for _, nd := range c.nodes {
			s, err := nd.status()
			if err != nil {
				return false, err.Error()
			}
			alive := 0
			for _, m := range s.Members {
				if m.State == "alive" && m.Role == "active" && m.ActiveSince != nil {
					alive++
				}
			}
			sets = append(sets, fmt.Sprintf("%s: converged %v, %d alive and seated, active set %v", nd.name, s.Converged, alive, s.ActiveSet))
			if !s.Converged || alive != n || len(s.ActiveSet) != n {
				return false, strings.Join(sets, "; ")
			}
			c.byID[s.NodeID] = nd
			c.active = s.ActiveSet
		}
		return len(c.byID) == n, strings.Join(sets, "; ")
	})
	return c
}

// waitFor polls cond every 50 ms until it holds or d passes; then it fails
// the test with what, and what cond last reported.
func waitFor(t testing.TB, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s; last seen: %s", d, what, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
