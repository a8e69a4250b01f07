package cluster_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/test/netsim"
)

func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

// readKeyringFile returns the keys in the file, in order.
func readKeyringFile(t *testing.T, path string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var enc []string
	if err := json.Unmarshal(b, &enc); err != nil {
		t.Fatalf("keyring file %q: %v", b, err)
	}
	var keys [][]byte
	for _, s := range enc {
		k, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	return keys
}

func sameKeys(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}

// TestKeyringPersisted: a keyring starts with the configured key and no
// file; each change is in the file (primary first, mode 0600) when the
// method returns; reopened, the file wins over the configured key.
// Refusals (bad size, use of a key not installed, removal of the
// primary) change nothing, and a change that cannot be written is undone.
func TestKeyringPersisted(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "gossip-keyring")
	if kr, _, err := cluster.OpenKeyring(path, nil); kr != nil || err != nil {
		t.Fatalf("no file, no key: %v, %v; want nil, nil", kr, err)
	}
	k1, k2, k3 := testKey(1), testKey(2), testKey(3)
	kr, fromFile, err := cluster.OpenKeyring(path, k1)
	if err != nil || fromFile {
		t.Fatalf("open: %v, from file %v", err, fromFile)
	}
	if !sameKeys(kr.Keys(), [][]byte{k1}) {
		t.Fatalf("keys %x, want the configured key", kr.Keys())
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("file written before any change: %v", err)
	}

	steps := []struct {
		name string
		op   func([]byte) error
		key  []byte
		want [][]byte
	}{
		{"install", kr.Install, k2, [][]byte{k1, k2}},
		{"install again", kr.Install, k2, [][]byte{k1, k2}},
		{"use", kr.Use, k2, [][]byte{k2, k1}},
		{"install a third", kr.Install, k3, [][]byte{k2, k1, k3}},
		{"remove", kr.Remove, k1, [][]byte{k2, k3}},
		{"remove again", kr.Remove, k1, [][]byte{k2, k3}},
	}
	for _, st := range steps {
		if err := st.op(st.key); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if got := kr.Keys(); !sameKeys(got, st.want) {
			t.Fatalf("%s: keys %x, want %x", st.name, got, st.want)
		}
		if got := readKeyringFile(t, path); !sameKeys(got, st.want) {
			t.Fatalf("%s: file holds %x, want %x", st.name, got, st.want)
		}
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file mode %v (%v), want 0600", fi.Mode(), err)
	}
	if _, err := os.Stat(path + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temporary file left: %v", err)
	}

	for _, tc := range []struct {
		name string
		err  error
		op   func([]byte) error
		key  []byte
	}{
		{"bad size", cluster.ErrBadKey, kr.Install, []byte("short")},
		{"use a key not installed", cluster.ErrKeyNotInstalled, kr.Use, k1},
		{"remove the primary", cluster.ErrRemovePrimary, kr.Remove, k2},
	} {
		if err := tc.op(tc.key); !errors.Is(err, tc.err) {
			t.Fatalf("%s: %v, want %v", tc.name, err, tc.err)
		}
	}
	if want := [][]byte{k2, k3}; !sameKeys(kr.Keys(), want) || !sameKeys(readKeyringFile(t, path), want) {
		t.Fatalf("a refusal changed the ring: %x", kr.Keys())
	}

	// Reopened with the old configured key: the file wins.
	kr2, fromFile, err := cluster.OpenKeyring(path, k1)
	if err != nil || !fromFile {
		t.Fatalf("reopen: %v, from file %v", err, fromFile)
	}
	if want := [][]byte{k2, k3}; !sameKeys(kr2.Keys(), want) {
		t.Fatalf("reopened keys %x, want %x", kr2.Keys(), want)
	}

	// A file that cannot be written: the change is undone.
	gone := filepath.Join(dir, "no-such-dir", "gossip-keyring")
	kr3, _, err := cluster.OpenKeyring(gone, k1)
	if err != nil {
		t.Fatal(err)
	}
	if err := kr3.Install(k2); err == nil {
		t.Fatal("install with an unwritable file succeeded")
	}
	if err := kr3.Use(k1); err != nil { // already primary: nothing to write
		t.Fatal(err)
	}
	if !sameKeys(kr3.Keys(), [][]byte{k1}) {
		t.Fatalf("failed install left keys %x", kr3.Keys())
	}

	// A damaged file is an error, not a fresh start.
	if err := os.WriteFile(path, []byte(`["not base64!"]`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := cluster.OpenKeyring(path, k1); err == nil {
		t.Fatal("a damaged keyring file was accepted")
	}
}

// TestClusterGossipKeyRotation: three nodes gossiping with key k1 (memberlist
// encrypts every packet above the transport, so the in-memory network
// carries ciphertext) rotate to k2 node by node (install everywhere, use
// everywhere, remove k1 everywhere) and stay in agreement at every step.
// Afterwards a node with only k1 cannot join, while one with k2, started
// after it, can; and a member restarted from its keyring file rejoins.
func TestClusterGossipKeyRotation(t *testing.T) {
	netw := netsim.New()
	k1, k2 := testKey(1), testKey(2)
	dir := t.TempDir()
	names := []string{"a", "b", "c"}
	nodes := map[string]*cluster.Node{}
	start := func(name string, join []string, kr *cluster.Keyring) *cluster.Node {
		cfg := testConfig(netw, name, join)
		cfg.Keyring = kr
		return startConfig(t, cfg)
	}
	for i, name := range names {
		var join []string
		if i > 0 {
			join = []string{netw.Host("a").Addr()}
		}
		kr, _, err := cluster.OpenKeyring(filepath.Join(dir, name+"-keyring"), k1)
		if err != nil {
			t.Fatal(err)
		}
		nodes[name] = start(name, join, kr)
	}
	waitAgreed(t, 20*time.Second, nodes)

	for _, step := range []struct {
		name string
		op   func(*cluster.Node, []byte) error
		key  []byte
	}{
		{"install k2", (*cluster.Node).InstallGossipKey, k2},
		{"use k2", (*cluster.Node).UseGossipKey, k2},
		{"remove k1", (*cluster.Node).RemoveGossipKey, k1},
	} {
		for _, name := range names {
			if err := step.op(nodes[name], step.key); err != nil {
				t.Fatalf("%s on %s: %v", step.name, name, err)
			}
			// Between nodes, at every intermediate state: still one
			// cluster (push-pull and probes run every 100 ms to 1 s).
			time.Sleep(300 * time.Millisecond)
			waitAgreed(t, 10*time.Second, nodes)
		}
	}
	for _, name := range names {
		keys, err := nodes[name].GossipKeys()
		if err != nil || !sameKeys(keys, [][]byte{k2}) {
			t.Fatalf("%s: keys %x (%v), want k2 alone", name, keys, err)
		}
	}

	// A node with the removed key alone: its packets are refused. Then a
	// node with k2, started after it: it joins, and by then the first
	// has had its chances.
	oldKR, err := cluster.NewKeyring(k1)
	if err != nil {
		t.Fatal(err)
	}
	stale := start("stale", []string{netw.Host("a").Addr()}, oldKR)
	newKR, err := cluster.NewKeyring(k2)
	if err != nil {
		t.Fatal(err)
	}
	nodes["d"] = start("d", []string{netw.Host("a").Addr()}, newKR)
	waitAgreed(t, 20*time.Second, nodes)
	for name, n := range nodes {
		if s := memberState(n, "stale"); s != "" {
			t.Fatalf("%s lists the node with the removed key as %s", name, s)
		}
	}
	if s := memberState(stale, "a"); s != "" {
		t.Fatalf("the node with the removed key sees a as %s", s)
	}

	// c restarts from its keyring file, although configured with k1.
	nodes["c"].Close()
	delete(nodes, "c")
	waitAgreed(t, 20*time.Second, nodes)
	kr, fromFile, err := cluster.OpenKeyring(filepath.Join(dir, "c-keyring"), k1)
	if err != nil || !fromFile {
		t.Fatalf("reopen c's keyring: %v, from file %v", err, fromFile)
	}
	nodes["c"] = start("c", []string{netw.Host("a").Addr()}, kr)
	waitAgreed(t, 20*time.Second, nodes)
}
