package cluster_test

import (
	"strconv"
	"testing"
	"time"
)

// TestReview13JoinNameListsOnlySelf: a join name that lists the node
// itself (a headless Service lists every pod, this one too) and peers
// that do not answer (gossip blocked, the others down) leaves the node
// alone, and it says so, as with a join list that names only the others:
// the node answering its own join is no member found.
func TestReview13JoinNameListsOnlySelf(t *testing.T) {
	ips := []string{"127.0.0.2", "127.0.0.3"}
	port := gossipPort(t, ips...)
	z := startDNS(t)
	z.set("brokerd.test.", ips...) // itself, and nobody at 127.0.0.3
	logs := &logRecorder{}
	j := realNode(t, z, "j", ips[0], port, []string{"brokerd.test.:" + strconv.Itoa(port)}, time.Hour, logs)
	waitFor(t, 5*time.Second, "the name asked again", func() bool { return z.asked("brokerd.test.") >= 6 })
	if got := alive(j); got != "j" {
		t.Fatalf("j sees %q", got)
	}
	if logs.count("WARN join failed; running alone and retrying") == 0 {
		t.Errorf("a node whose join reached only itself runs alone without a word: %v", logs.msgs)
	}
}
