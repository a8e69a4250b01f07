package main

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cmd/brokerd/node"
	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/test/tlstest"
)

const testToken = "cli-test-admin-token-0123456789"

// adminNode is a node whose admin API serves HTTPS, wants testToken or a
// client certificate its CA signed, and the files a client needs.
type adminNode struct {
	n         *node.Node
	addr      string
	tokenFile string
	ca        *tlstest.CA
	operator  tlstest.Pair // a client certificate ca signed
	dir       string
}

func startAdminNode(t *testing.T) *adminNode {
	t.Helper()
	dir := t.TempDir()
	ca := tlstest.NewCA(t, dir, "admin-ca")
	server := ca.Issue(t, "node", nil)
	a := &adminNode{ca: ca, operator: ca.Issue(t, "operator", nil), dir: dir}
	a.tokenFile = filepath.Join(dir, "admin.token")
	if err := os.WriteFile(a.tokenFile, []byte(testToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Node.Name = "cli-test"
	cfg.Node.DataDir = filepath.Join(dir, "data")
	cfg.STOMP.Addr = "127.0.0.1:0"
	cfg.Admin.Addr = "127.0.0.1:0"
	cfg.Store.Sync = "none"
	cfg.Admin.TokenFile = a.tokenFile
	cfg.Admin.TLS = config.AdminTLS{CertFile: server.CertFile, KeyFile: server.KeyFile, ClientCAFile: ca.CertFile}
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
	a.n, a.addr = n, n.AdminAddr()
	return a
}

// wrongTokenFile is a file holding a token the node does not take.
func (a *adminNode) wrongTokenFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(a.dir, "wrong.token")
	if err := os.WriteFile(p, []byte("not-the-admin-token-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// brokerd runs the command line args as main does.
func brokerd(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(args, nil, strings.NewReader(""), &out, &errb)
	return code, out.String(), errb.String()
}

func TestAdminCommandsTokenAndHTTPS(t *testing.T) {
	a := startAdminNode(t)
	for _, tc := range []struct {
		name       string
		args       []string
		wantCode   int
		wantOut    string // in stdout
		wantErrOut string // in stderr
	}{
		{"status with token and CA", []string{"status", "--token-file", a.tokenFile, "--ca-file", a.ca.CertFile},
			0, "node cli-test", ""},
		{"status --json", []string{"status", "--json", "--token-file", a.tokenFile, "--ca-file", a.ca.CertFile},
			0, `"node_name": "cli-test"`, ""},
		{"status with a client certificate", []string{"status", "--ca-file", a.ca.CertFile, "--cert-file", a.operator.CertFile, "--key-file", a.operator.KeyFile},
			0, "node cli-test", ""},
		{"status https:// with token and CA", []string{"status", "--token-file", a.tokenFile, "--ca-file", a.ca.CertFile, "--admin-addr", "https://" + a.addr},
			0, "node cli-test", ""},
		{"status without the token", []string{"status", "--ca-file", a.ca.CertFile},
			1, "", "admin " + a.addr + ": 401 Unauthorized: no bearer token (pass --token-file"},
		{"status with a wrong token", []string{"status", "--ca-file", a.ca.CertFile, "--token-file", a.wrongTokenFile(t)},
			1, "", "admin " + a.addr + ": 401 Unauthorized: wrong bearer token"},
		{"status without the CA", []string{"status", "--token-file", a.tokenFile},
			1, "", "400 Bad Request: Client sent an HTTP request to an HTTPS server. (the node serves HTTPS: pass --ca-file"},
		{"status https:// without the CA", []string{"status", "--token-file", a.tokenFile, "--admin-addr", "https://" + a.addr},
			1, "", "certificate signed by unknown authority (pass --ca-file"},
		{"status with http:// and a CA", []string{"status", "--ca-file", a.ca.CertFile, "--admin-addr", "http://" + a.addr},
			1, "", "are for HTTPS"},
		{"status with a missing token file", []string{"status", "--ca-file", a.ca.CertFile, "--token-file", filepath.Join(a.dir, "nope")},
			1, "", "--token-file: open "},
		{"status with a cert but no key", []string{"status", "--ca-file", a.ca.CertFile, "--cert-file", a.operator.CertFile},
			1, "", "--cert-file and --key-file go together"},
		{"active-members with token", []string{"active-members", "3", "--token-file", a.tokenFile, "--ca-file", a.ca.CertFile},
			0, "active members wanted: 3", ""},
		{"active-members without token", []string{"active-members", "3", "--ca-file", a.ca.CertFile},
			1, "", "401 Unauthorized"},
		{"reload with token", []string{"reload", "--token-file", a.tokenFile, "--ca-file", a.ca.CertFile},
			0, "reloaded", ""},
		{"reload without token", []string{"reload", "--ca-file", a.ca.CertFile},
			1, "", "401 Unauthorized"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string(nil), tc.args...)
			if !strings.Contains(strings.Join(args, " "), "--admin-addr") {
				args = append(args, "--admin-addr", a.addr)
			}
			code, out, errOut := brokerd(args...)
			if code != tc.wantCode || !strings.Contains(out, tc.wantOut) || !strings.Contains(errOut, tc.wantErrOut) {
				t.Fatalf("brokerd %s: exit %d, stdout %q, stderr %q; want exit %d, stdout with %q, stderr with %q",
					strings.Join(args, " "), code, out, errOut, tc.wantCode, tc.wantOut, tc.wantErrOut)
			}
			if strings.Contains(out+errOut, testToken) {
				t.Fatalf("the token shows in the output: %q %q", out, errOut)
			}
		})
	}
}

func TestAdminReloadCommandReportsFailure(t *testing.T) {
	a := startAdminNode(t)
	// The node's token file now holds a token too short: the reload
	// fails, the node says why, and the token in force stays.
	keep := filepath.Join(a.dir, "client.token")
	if err := os.WriteFile(keep, []byte(testToken), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(a.tokenFile, []byte("short"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := brokerd("reload", "--admin-addr", a.addr, "--token-file", keep, "--ca-file", a.ca.CertFile)
	if code == 0 || strings.Contains(out, "reloaded") || !strings.Contains(errOut, "reload failed") || !strings.Contains(errOut, "admin.token_file") {
		t.Fatalf("reload with a bad token file on the node: exit %d, stdout %q, stderr %q; want a non-zero exit and the node's error", code, out, errOut)
	}
	if code, _, errOut := brokerd("status", "--admin-addr", a.addr, "--token-file", keep, "--ca-file", a.ca.CertFile); code != 0 {
		t.Fatalf("status with the token in force after a failed reload: exit %d, %s", code, errOut)
	}
}
