package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/cmd/brokerd/node"
	"github.com/brokerd/brokerd/config"
)

// startKeyCluster starts two clustered nodes gossiping with key, each
// wanting the admin token in tokenFile; it returns their admin addresses.
func startKeyCluster(t *testing.T, key []byte, tokenFile string) []string {
	t.Helper()
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "gossip.key")
	if err := os.WriteFile(keyFile, []byte(base64.StdEncoding.EncodeToString(key)), 0o600); err != nil {
		t.Fatal(err)
	}
	var addrs []string
	var first *node.Node
	for _, name := range []string{"k1", "k2"} {
		cfg := config.Default()
		cfg.Node.Name = name
		cfg.Node.DataDir = filepath.Join(dir, name)
		cfg.STOMP.Addr = "127.0.0.1:0"
		cfg.Admin.Addr = "127.0.0.1:0"
		cfg.Admin.TokenFile = tokenFile
		cfg.Store.Sync = "none"
		cfg.Cluster.GossipAddr = "127.0.0.1:0"
		cfg.Cluster.PeerAddr = "127.0.0.1:0"
		cfg.Cluster.SecretKeyFile = keyFile
		cfg.Cluster.ActiveMembers = 2
		cfg.Replica.Factor = 2
		if first != nil {
			cfg.Cluster.Join = []string{first.Cluster().GossipAddr()}
		}
		n, err := node.New(cfg, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		if err := n.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = n.Shutdown(ctx)
		})
		if first == nil {
			first = n
		}
		addrs = append(addrs, n.AdminAddr())
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := first.Cluster().Status()
		alive := 0
		for _, m := range st.Members {
			if m.State == "alive" {
				alive++
			}
		}
		if st.Converged && alive == 2 {
			return addrs
		}
		if time.Now().After(deadline) {
			t.Fatalf("the two nodes did not agree in 20 s: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestGossipKeysCommand: brokerd gossip-keys rotates the key of a
// two-node cluster through one node's admin API, with the admin token:
// install, use (from stdin), remove; use of a key not installed and
// removal of the primary fail with the node's reason and exit status 1,
// and list shows each key's use over the nodes.
func TestGossipKeysCommand(t *testing.T) {
	k1, k2, k3 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32), bytes.Repeat([]byte{3}, 32)
	b64 := base64.StdEncoding.EncodeToString
	tokenFile := filepath.Join(t.TempDir(), "admin.token")
	if err := os.WriteFile(tokenFile, []byte(testToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	addrs := startKeyCluster(t, k1, tokenFile)
	auth := []string{"--admin-addr", addrs[1], "--token-file", tokenFile}
	for _, tc := range []struct {
		name       string
		args       []string
		stdin      string
		wantCode   int
		wantOut    []string
		wantErrOut string
	}{
		{"list", []string{"list"}, "", 0, []string{cluster.KeyID(k1) + "  2/2        2/2"}, ""},
		{"list without the token", []string{"list", "--admin-addr", addrs[0]}, "", 1, nil, "401 Unauthorized"},
		{"install", []string{"install", b64(k2)}, "", 0, []string{"install key " + cluster.KeyID(k2) + ": done on 2 of 2 nodes", "k1", "k2"}, ""},
		{"use a key not installed", []string{"use", b64(k3)}, "", 1, nil, "not installed on"},
		{"use from stdin", []string{"use", "-"}, b64(k2) + "\n", 0, []string{"use key " + cluster.KeyID(k2) + ": done on 2 of 2 nodes"}, ""},
		{"remove the primary", []string{"remove", b64(k2)}, "", 1, nil, "it is the primary key of"},
		{"remove", []string{"remove", b64(k1)}, "", 0, []string{"remove key " + cluster.KeyID(k1) + ": done on 2 of 2 nodes"}, ""},
		{"list after", []string{"list"}, "", 0, []string{cluster.KeyID(k2) + "  2/2        2/2"}, ""},
		{"a bad key", []string{"install", "not-base64!"}, "", 1, nil, "key: not base64"},
		{"a short key", []string{"install", b64([]byte("short"))}, "", 1, nil, "16, 24 or 32 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"gossip-keys"}, tc.args...)
			if !strings.Contains(strings.Join(args, " "), "--admin-addr") {
				args = append(args, auth...)
			}
			var out, errb bytes.Buffer
			code := run(args, nil, strings.NewReader(tc.stdin), &out, &errb)
			ok := code == tc.wantCode && strings.Contains(errb.String(), tc.wantErrOut)
			for _, w := range tc.wantOut {
				ok = ok && strings.Contains(out.String(), w)
			}
			if testing.Verbose() {
				t.Logf("brokerd %s\n%s%s", strings.Join(tc.args, " "), out.String(), errb.String())
			}
			if !ok {
				t.Fatalf("brokerd %s: exit %d, stdout %q, stderr %q; want exit %d, stdout with %q, stderr with %q",
					strings.Join(args, " "), code, out.String(), errb.String(), tc.wantCode, tc.wantOut, tc.wantErrOut)
			}
		})
	}
	if strings.Contains(b64(k1), cluster.KeyID(k1)) {
		t.Fatal("a key ID shows the key")
	}
}
