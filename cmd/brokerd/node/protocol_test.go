package node

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/brokerd/brokerd/cluster"
)

// TestClusterProtocolVersionRefusedNode: a node whose protocol versions
// the members do not speak (here 2..3, against this build's members) does
// not start: Start returns the refusal naming both ranges (brokerd prints
// it and exits 1), the node listens on nothing afterwards, and the members
// never list it, not even once a node that joined after it is seen by all.
func TestClusterProtocolVersionRefusedNode(t *testing.T) {
	keyFile := writeKeyFile(t, bytes.Repeat([]byte{7}, 32))
	nodes := startCluster(t, clusterTestConfig(t, "a", keyFile), clusterTestConfig(t, "b", keyFile))
	waitAgreement(t, 10*time.Second, nodes)
	build := cluster.BuildProtocols()
	if v := nodes[0].n.Cluster().Status().ProtocolVersion; v != build.Max {
		t.Fatalf("members say protocol version %d, want the build's %d", v, build.Max)
	}

	cfg := clusterTestConfig(t, "new", keyFile)
	cfg.Cluster.Join = []string{nodes[0].n.Cluster().GossipAddr()}
	far := cluster.ProtocolRange{Min: build.Max + 1, Max: build.Max + 2}
	n, err := NewWithOptions(cfg, slog.New(slog.DiscardHandler), Options{Cluster: func(c *cluster.Config) { c.Protocols = far }})
	if err != nil {
		t.Fatal(err)
	}
	err = n.Start()
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
		t.Fatalf("a node speaking %s started in a cluster speaking %s", far, build)
	}
	want := "protocol version " + far.String() + " is not supported by the cluster (members speak " + build.String() + ")"
	if !errors.Is(err, cluster.ErrProtocolVersion) || !strings.Contains(err.Error(), want) {
		t.Errorf("Start: %v; want ErrProtocolVersion saying %q", err, want)
	}
	// Nothing of it is left listening: its STOMP port refuses.
	if addr := n.STOMPAddr(); addr != "" {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			t.Errorf("the refused node still listens on %s", addr)
		}
	}
	// A sentinel: a node of this build joins after it; once every member
	// sees it, gossip about the refused node would have arrived too.
	ccfg := clusterTestConfig(t, "c", keyFile)
	ccfg.Cluster.Join = []string{nodes[0].n.Cluster().GossipAddr()}
	c := &clusterNode{t: t, cfg: ccfg}
	c.start()
	t.Cleanup(c.stop)
	nodes = append(nodes, c)
	waitAgreement(t, 10*time.Second, nodes)
	for _, c := range nodes {
		for _, m := range c.n.Cluster().Status().Members {
			if m.Name == "new" {
				t.Errorf("%s lists the refused node as %s", c.cfg.Node.Name, m.State)
			}
		}
	}
}
