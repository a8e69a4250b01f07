package node

import (
	"testing"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/stomp"
)

// TestReview13NodeListsBadAddresses: a member whose gossiped client
// address is not a plain host:port (a newline, which CONNECTED cannot
// carry and which made every CONNECT on every node fail; a comma, which
// splits one entry into two; a space or a control character) is left out
// of x-brokerd-nodes, and the others are listed.
func TestReview13NodeListsBadAddresses(t *testing.T) {
	s := cluster.Status{NodeID: "self", Members: []cluster.MemberStatus{
		{ID: "self", State: "alive", STOMPAddr: "10.0.0.5:61613"},
		{ID: "nl", State: "alive", STOMPAddr: "evil\nx-injected:61613"},
		{ID: "cr", State: "alive", STOMPAddr: "evil\r.example:61613"},
		{ID: "comma", State: "alive", STOMPAddr: "a.example,b.example:61613"},
		{ID: "space", State: "alive", STOMPAddr: "a b:61613"},
		{ID: "nul", State: "alive", STOMPAddr: "a\x00b:61613"},
		{ID: "zone", State: "alive", STOMPAddr: "[fe80::1%eth0\n]:61613"},
		{ID: "ok6", State: "alive", STOMPAddr: "[fe80::1%eth0]:61613"},
		{ID: "ok", State: "alive", STOMPAddr: "broker-1.example:61613"},
	}}
	got := nodeLists(s)[stomp.TransportTCP]
	want := "10.0.0.5:61613,[fe80::1%eth0]:61613,broker-1.example:61613"
	if got != want {
		t.Errorf("x-brokerd-nodes:\n got %q\nwant %q", got, want)
	}
}
