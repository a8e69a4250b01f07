package node

import (
	"errors"
	"strings"
	"testing"

	"github.com/brokerd/brokerd/cluster"
)

// TestDrainRefusedWithLegacyMember: while an alive member runs a build
// from before drain (no minimum protocol version in its metadata), a
// drain is refused naming it; a dead one, or none, does not stop it.
func TestDrainRefusedWithLegacyMember(t *testing.T) {
	s := cluster.Status{Members: []cluster.MemberStatus{
		{ID: "a", Name: "a", State: "alive"},
		{ID: "b", Name: "b", State: "alive", Legacy: true},
		{ID: "c", Name: "c", State: "dead", Legacy: true},
	}}
	err := legacyMembers(s)
	if !errors.Is(err, ErrDrainRefused) || !strings.Contains(err.Error(), "b run a build from before drain") || strings.Contains(err.Error(), "b, c") {
		t.Fatalf("legacyMembers = %v, want ErrDrainRefused naming b only", err)
	}
	s.Members[1].Legacy = false
	if err := legacyMembers(s); err != nil {
		t.Fatalf("no legacy member alive: %v", err)
	}
}
