package test

import (
	"net"
	"strings"
	"testing"
	"time"
)

// TestProcessPlaintextGossipRefused: a node that would gossip on every
// interface without cluster.secret_key_file (anyone reaching the port could
// join, change M or take a seat) does not start; the message names the key
// and the way out. With --allow-plaintext-gossip it starts.
func TestProcessPlaintextGossipRefused(t *testing.T) {
	_, port, err := net.SplitHostPort(freeAddr(t))
	if err != nil {
		t.Fatal(err)
	}
	gossip := "0.0.0.0:" + port
	p := spawn(t, []string{"--data-dir", t.TempDir(), "--stomp-addr", freeAddr(t), "--admin-addr", freeAddr(t), "--gossip-addr", gossip}, nil, nil)
	code, ok := p.wait(10 * time.Second)
	if !ok {
		t.Fatal("brokerd still running with plaintext gossip on 0.0.0.0")
	}
	if code != 2 {
		t.Errorf("exit status %d, want 2 (bad configuration)", code)
	}
	msg := p.stderr.String()
	for _, want := range []string{"cluster.secret_key_file: required when cluster.gossip_addr listens beyond loopback", "cluster.allow_plaintext_gossip: true"} {
		if !strings.Contains(msg, want) {
			t.Errorf("stderr %q does not contain %q", msg, want)
		}
	}

	// Explicitly allowed (by flag here; BROKERD_CLUSTER_ALLOW_PLAINTEXT_GOSSIP
	// or the file work the same), it starts.
	ok2 := startProc(t, t.TempDir(), procOpts{args: []string{"--gossip-addr", gossip, "--allow-plaintext-gossip"}})
	if ok2.exited() {
		t.Fatal("brokerd with --allow-plaintext-gossip exited")
	}
}
