//go:build linux

package chaos

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
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Names of everything the suite creates carry this prefix, so that a run
// can find and remove what an earlier, killed run left behind.
const prefix = "bkc"

const (
	subnet   = "198.18.0" // one /24 out of 198.18.0.0/15 (RFC 2544)
	hostIP   = subnet + ".254"
	bridgeNS = prefix + "-br"
	hostLink = prefix + "-h"

	stompPort  = 61613
	adminPort  = 8613
	gossipPort = 7946
	peerPort   = 7947
)

// run runs a command and returns its combined output; the error names the
// command and says what it printed.
func sh(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// inNS runs a command inside network namespace ns.
func inNS(ns string, args ...string) (string, error) {
	return sh("ip", append([]string{"netns", "exec", ns}, args...)...)
}

// cleanupLeftovers removes every namespace and link with the suite's
// prefix, after killing the processes inside the namespaces, and the run
// directories of earlier runs that were killed (those without a
// history.jsonl; a run that failed keeps its directory, with its history,
// for inspection), except current. It is what a run does first (an
// earlier run may have been killed) and last.
func cleanupLeftovers(logf func(string, ...any), current string) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "brokerd-chaos-*"))
	for _, d := range dirs {
		if d == current {
			continue
		}
		if _, err := os.Stat(filepath.Join(d, "history.jsonl")); os.IsNotExist(err) {
			if err := os.RemoveAll(d); err != nil {
				logf("cleanup: %v", err)
			}
		}
	}
	out, _ := sh("ip", "netns", "list")
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], prefix+"-") {
			continue
		}
		ns := f[0]
		// Only processes inside our own namespaces: brokerds this suite
		// started (now or in a killed earlier run).
		pids, _ := sh("ip", "netns", "pids", ns)
		for _, p := range strings.Fields(pids) {
			if pid, err := strconv.Atoi(p); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGCONT)
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if _, err := sh("ip", "netns", "del", ns); err != nil {
			logf("cleanup: %v", err)
		}
	}
	if _, err := sh("ip", "link", "show", hostLink); err == nil {
		if _, err := sh("ip", "link", "del", hostLink); err != nil {
			logf("cleanup: %v", err)
		}
	}
}

// network is the test network: a bridge in its own namespace, one
// namespace per node joined to it by a veth pair, and a veth from the test
// process's namespace (the clients' host, hostIP) to the bridge.
type network struct {
	n int
}

func nodeNS(i int) string   { return fmt.Sprintf("%s-n%d", prefix, i) }
func nodeIP(i int) string   { return fmt.Sprintf("%s.%d", subnet, i) }
func nodeLink(i int) string { return fmt.Sprintf("%s-v%d", prefix, i) }

func setupNetwork(n int) (*network, error) {
	steps := [][]string{
		{"ip", "netns", "add", bridgeNS},
		{"ip", "-n", bridgeNS, "link", "add", "br0", "type", "bridge"},
		{"ip", "-n", bridgeNS, "link", "set", "br0", "up"},
		{"ip", "link", "add", hostLink, "type", "veth", "peer", "name", prefix + "-hb", "netns", bridgeNS},
		{"ip", "-n", bridgeNS, "link", "set", prefix + "-hb", "master", "br0"},
		{"ip", "-n", bridgeNS, "link", "set", prefix + "-hb", "up"},
		{"ip", "addr", "add", hostIP + "/24", "dev", hostLink},
		{"ip", "link", "set", hostLink, "up"},
	}
	for i := 1; i <= n; i++ {
		ns, link, port := nodeNS(i), nodeLink(i), fmt.Sprintf("%s-p%d", prefix, i)
		steps = append(steps,
			[]string{"ip", "netns", "add", ns},
			[]string{"ip", "link", "add", link, "netns", ns, "type", "veth", "peer", "name", port, "netns", bridgeNS},
			[]string{"ip", "-n", bridgeNS, "link", "set", port, "master", "br0"},
			[]string{"ip", "-n", bridgeNS, "link", "set", port, "up"},
			[]string{"ip", "-n", ns, "addr", "add", nodeIP(i) + "/24", "dev", link},
			[]string{"ip", "-n", ns, "link", "set", link, "up"},
			[]string{"ip", "-n", ns, "link", "set", "lo", "up"},
		)
	}
	for _, s := range steps {
		if _, err := sh(s[0], s[1:]...); err != nil {
			return nil, err
		}
	}
	return &network{n: n}, nil
}

// cut makes node i drop every packet to and from the nodes in others
// (gossip, peer links and anything else alike).
func (nw *network) cut(i int, others []int) error {
	for _, j := range others {
		for _, rule := range [][]string{
			{"-A", "INPUT", "-s", nodeIP(j), "-j", "DROP"},
			{"-A", "OUTPUT", "-d", nodeIP(j), "-j", "DROP"},
		} {
			if _, err := inNS(nodeNS(i), append([]string{"iptables", "-w"}, rule...)...); err != nil {
				return err
			}
		}
	}
	return nil
}

// partition cuts every node of each group from every node of the others.
// Nodes in no group keep reaching everyone (the middle of a bridge).
func (nw *network) partition(groups ...[]int) error {
	for gi, g := range groups {
		var others []int
		for gj, h := range groups {
			if gj != gi {
				others = append(others, h...)
			}
		}
		for _, i := range g {
			if err := nw.cut(i, others); err != nil {
				return err
			}
		}
	}
	return nil
}

// lossy drops a fraction p of every packet node i sends or receives on its
// link (clients' too).
func (nw *network) lossy(i int, p float64) error {
	prob := strconv.FormatFloat(p, 'f', 3, 64)
	for _, rule := range [][]string{
		{"-A", "INPUT", "-i", nodeLink(i), "-m", "statistic", "--mode", "random", "--probability", prob, "-j", "DROP"},
		{"-A", "OUTPUT", "-o", nodeLink(i), "-m", "statistic", "--mode", "random", "--probability", prob, "-j", "DROP"},
	} {
		if _, err := inNS(nodeNS(i), append([]string{"iptables", "-w"}, rule...)...); err != nil {
			return err
		}
	}
	return nil
}

// dropped sums the packets the DROP rules of every node have matched.
func (nw *network) dropped() (int64, error) {
	var sum int64
	for i := 1; i <= nw.n; i++ {
		out, err := inNS(nodeNS(i), "iptables", "-w", "-L", "-v", "-x", "-n")
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(out, "\n") {
			f := strings.Fields(line)
			if len(f) >= 3 && f[2] == "DROP" {
				if v, err := strconv.ParseInt(f[0], 10, 64); err == nil {
					sum += v
				}
			}
		}
	}
	return sum, nil
}

// heal removes every rule from every node.
func (nw *network) heal() error {
	var first error
	for i := 1; i <= nw.n; i++ {
		if _, err := inNS(nodeNS(i), "iptables", "-w", "-F"); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// node is one brokerd process in its namespace.
type node struct {
	i       int
	bin     string
	dataDir string
	logPath string
	join    []string
	sec     *security

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
	gen  int           // starts so far
}

func (nd *node) name() string      { return fmt.Sprintf("n%d", nd.i) }
func (nd *node) stompAddr() string { return net.JoinHostPort(nodeIP(nd.i), strconv.Itoa(stompPort)) }
func (nd *node) adminAddr() string { return net.JoinHostPort(nodeIP(nd.i), strconv.Itoa(adminPort)) }

func (nd *node) args() []string {
	ip := nodeIP(nd.i)
	return append([]string{
		"netns", "exec", nodeNS(nd.i), nd.bin,
		"--node-name", nd.name(),
		"--data-dir", nd.dataDir,
		"--stomp-addr", net.JoinHostPort(ip, strconv.Itoa(stompPort)),
		"--admin-addr", net.JoinHostPort(ip, strconv.Itoa(adminPort)),
		"--gossip-addr", net.JoinHostPort(ip, strconv.Itoa(gossipPort)),
		"--peer-addr", net.JoinHostPort(ip, strconv.Itoa(peerPort)),
		"--join", strings.Join(nd.join, ","),
		"--active-members", "3",
		"--replication-factor", "2",
		"--write-quorum", "2",
		"--allow-anonymous",
		"--log-format", "json",
	}, nd.sec.args()...)
}

// start starts brokerd; `ip netns exec` execs it, so the PID is brokerd's.
func (nd *node) start() error {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cmd != nil {
		return fmt.Errorf("%s already running", nd.name())
	}
	if err := os.MkdirAll(nd.dataDir, 0o755); err != nil {
		return err
	}
	lf, err := os.OpenFile(nd.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	nd.gen++
	fmt.Fprintf(lf, "=== start %d of %s at %s\n", nd.gen, nd.name(), time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command("ip", nd.args()...)
	cmd.Stdout, cmd.Stderr = lf, lf
	// brokerd dies with the test binary, however that ends (ip netns exec
	// execs brokerd, which keeps the parent-death signal), and is not in
	// the terminal's process group (the suite stops it itself).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// brokerd takes BROKERD_* variables as config and refuses unknown
	// ones, such as the suite's own BROKERD_CHAOS.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BROKERD_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, nd.sec.env(nd.i)...)
	if err := cmd.Start(); err != nil {
		lf.Close()
		return err
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		lf.Close()
		close(done)
	}()
	nd.cmd, nd.done = cmd, done
	return nil
}

func (nd *node) signal(sig syscall.Signal) error {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cmd == nil {
		return fmt.Errorf("%s not running", nd.name())
	}
	return nd.cmd.Process.Signal(sig)
}

// clockOffsetFile is where the chaos build of brokerd reads its wall
// clock's offset (cmd/brokerd/node/clock_chaos.go).
const clockOffsetFile = "chaos-clock-offset"

// jumpClock sets the offset of the node's wall clock (the chaos build of
// brokerd reads it from chaos-clock-offset in its data directory every
// 100 ms) and waits until the node's log says it took effect.
func (nd *node) jumpClock(off time.Duration) error {
	st, err := os.Stat(nd.logPath)
	if err != nil {
		return err
	}
	from := st.Size()
	if err := os.WriteFile(filepath.Join(nd.dataDir, clockOffsetFile), []byte(off.String()), 0o644); err != nil {
		return err
	}
	want := "chaos: wall clock offset " + off.String() + "\n"
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(nd.logPath); err == nil && int64(len(b)) >= from && strings.Contains(string(b[from:]), want) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s: clock offset %s not taken within 3s (is brokerd built with -tags chaos?)", nd.name(), off)
}

// stop sends sig and waits up to d for the process to exit, then kills it.
// It returns how the process ended.
func (nd *node) stop(sig syscall.Signal, d time.Duration) (string, error) {
	nd.mu.Lock()
	cmd, done := nd.cmd, nd.done
	nd.mu.Unlock()
	if cmd == nil {
		return "", nil
	}
	_ = cmd.Process.Signal(syscall.SIGCONT) // a paused process cannot handle sig
	_ = cmd.Process.Signal(sig)
	var err error
	select {
	case <-done:
	case <-time.After(d):
		err = fmt.Errorf("%s did not exit within %s of %s; killed", nd.name(), d, sig)
		_ = cmd.Process.Kill()
		<-done
	}
	nd.mu.Lock()
	nd.cmd, nd.done = nil, nil
	nd.mu.Unlock()
	return cmd.ProcessState.String(), err
}

// clusterView is the part of GET /v1/cluster the suite compares.
type clusterView struct {
	NodeName  string   `json:"node_name"`
	Converged bool     `json:"converged"`
	ActiveSet []string `json:"active_set"`
	EpochID   string   `json:"epoch_id"`
	Members   []struct {
		ID    string `json:"id"`
		Name  string `json:"name"`
		Role  string `json:"role"`
		State string `json:"state"`
	} `json:"members"`
}

var httpClient = &http.Client{Timeout: 2 * time.Second}

// adminGet sends GET path to nd's admin API with the run's admin token.
func adminGet(nd *node, path string) (*http.Response, error) {
	req, err := http.NewRequest(http.MethodGet, "http://"+nd.adminAddr()+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+nd.sec.token)
	return httpClient.Do(req)
}

func getJSON(nd *node, path string, v any) error {
	resp, err := adminGet(nd, path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s%s: %s: %s", nd.adminAddr(), path, resp.Status, bytes.TrimSpace(b))
	}
	return json.Unmarshal(b, v)
}

func getText(nd *node, path string) (string, error) {
	resp, err := adminGet(nd, path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s%s: %s: %s", nd.adminAddr(), path, resp.Status, bytes.TrimSpace(b))
	}
	return string(b), err
}

// wantActive is the active members the cluster keeps (--active-members 3).
func wantActive(nodes int) int { return min(3, nodes) }

// agreement reports whether every node answers, says it converged, and
// all agree on the epoch and the active set (of M members), with every
// node alive in every view. why says what is missing.
func agreement(nodes []*node) (ok bool, why string) {
	want := wantActive(len(nodes))
	var first *clusterView
	for _, nd := range nodes {
		var v clusterView
		if err := getJSON(nd, "/v1/cluster", &v); err != nil {
			return false, fmt.Sprintf("%s: %v", nd.name(), err)
		}
		if !v.Converged {
			return false, nd.name() + " not converged"
		}
		alive := map[string]bool{}
		for _, m := range v.Members {
			if m.State == "alive" {
				alive[m.Name] = true
			}
		}
		for _, other := range nodes {
			if !alive[other.name()] {
				return false, fmt.Sprintf("%s does not see %s alive", nd.name(), other.name())
			}
		}
		if len(v.ActiveSet) != want {
			return false, fmt.Sprintf("%s has %d active members, want %d", nd.name(), len(v.ActiveSet), want)
		}
		sort.Strings(v.ActiveSet)
		if first == nil {
			first = &v
			continue
		}
		if v.EpochID != first.EpochID || strings.Join(v.ActiveSet, ",") != strings.Join(first.ActiveSet, ",") {
			return false, fmt.Sprintf("%s and %s disagree: epoch %v %v, active %v %v",
				first.NodeName, v.NodeName, first.EpochID, v.EpochID, first.ActiveSet, v.ActiveSet)
		}
	}
	return true, ""
}

// waitAgreement polls agreement until it holds or d passes; it returns how
// long that took.
func waitAgreement(nodes []*node, d time.Duration) (time.Duration, error) {
	start := time.Now()
	var why string
	for time.Since(start) < d {
		var ok bool
		if ok, why = agreement(nodes); ok {
			return time.Since(start), nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return time.Since(start), fmt.Errorf("no agreement within %s: %s", d, why)
}

// catchingUp sums brokerd_replication_copies{state!="synced"} over the
// nodes: copies not yet trusted (a new or returning replica that is being
// caught up or checked).
func catchingUp(nodes []*node) (float64, error) {
	var sum float64
	for _, nd := range nodes {
		text, err := getText(nd, "/metrics")
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(text, "\n") {
			if !strings.HasPrefix(line, "brokerd_replication_copies{") || strings.Contains(line, `state="synced"`) {
				continue
			}
			f := strings.Fields(line)
			if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
				sum += v
			}
		}
	}
	return sum, nil
}
