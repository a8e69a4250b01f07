package main

import (
	"strings"
	"testing"

	"github.com/brokerd/brokerd/cluster"
)

// TestReview13StatusOldNode: the status of a node built before protocol
// versions (its /v1/cluster has no protocol_version) must not read as
// "protocol version 0", a version no build speaks: the operator upgrading
// from such a build runs the new brokerd status against it.
func TestReview13StatusOldNode(t *testing.T) {
	var b strings.Builder
	printStatus(&b, cluster.Status{NodeName: "a", Members: []cluster.MemberStatus{
		{ID: "id-a", Name: "a", Role: "active", State: "alive"},
	}}, nil)
	out := b.String()
	if strings.Contains(out, "protocol version 0") {
		t.Errorf("status of a node that reports no protocol version says version 0:\n%s", out)
	}
	if !strings.Contains(out, "protocol version -") {
		t.Errorf("status lacks %q:\n%s", "protocol version -", out)
	}
}
