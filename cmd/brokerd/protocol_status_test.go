package main

import (
	"strings"
	"testing"

	"github.com/brokerd/brokerd/cluster"
)

// brokerd status shows the cluster's effective protocol version and the
// versions each member speaks, so an operator sees which nodes hold an
// upgrade back.
func TestStatusShowsProtocolVersions(t *testing.T) {
	var b strings.Builder
	printStatus(&b, cluster.Status{NodeName: "a", ProtocolVersion: 1, Members: []cluster.MemberStatus{
		{ID: "id-a", Name: "a", Role: "active", State: "alive", Protocols: cluster.ProtocolRange{Min: 1, Max: 2}},
		{ID: "id-b", Name: "b", Role: "active", State: "alive", Protocols: cluster.ProtocolRange{Min: 1, Max: 1}},
	}}, nil)
	out := b.String()
	for _, want := range []string{"protocol version 1", "PROTOCOLS", "1..2", "1..1"} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s", want, out)
		}
	}
}
