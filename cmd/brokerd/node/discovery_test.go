package node

import (
	"fmt"
	"strings"
	"testing"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/stomp"
)

func TestNodeLists(t *testing.T) {
	m := func(id, state, tcp, tls string) cluster.MemberStatus {
		return cluster.MemberStatus{ID: id, Name: id, State: state, STOMPAddr: tcp, STOMPTLSAddr: tls}
	}
	s := cluster.Status{NodeID: "self", Members: []cluster.MemberStatus{
		m("a", "alive", "10.0.0.9:61613", "10.0.0.9:61614"),
		m("self", "alive", "10.0.0.5:61613", "10.0.0.5:61614"),
		m("b", "alive", "10.0.0.1:61613", ""),
		m("sus", "suspect", "10.0.0.2:61613", "10.0.0.2:61614"),
		m("dead", "dead", "10.0.0.3:61613", "10.0.0.3:61614"),
		m("left", "left", "10.0.0.4:61613", "10.0.0.4:61614"),
		m("any", "alive", "0.0.0.0:61613", "[::]:61614"),
		{ID: "drained", Name: "drained", State: "alive", Draining: true, STOMPAddr: "10.0.0.6:61613"},
	}}
	got := nodeLists(s)
	want := [4]string{
		stomp.TransportTCP: "10.0.0.5:61613,10.0.0.1:61613,10.0.0.9:61613",
		stomp.TransportTLS: "10.0.0.5:61614,10.0.0.9:61614",
	}
	if got != want {
		t.Errorf("nodeLists:\n got %q\nwant %q", got, want)
	}

	// Bounded: at most maxListedNodes, and maxNodesHeaderLen bytes.
	s = cluster.Status{NodeID: "n0"}
	for i := range 100 {
		s.Members = append(s.Members, m(fmt.Sprintf("n%d", i), "alive", fmt.Sprintf("%s-%03d.example:61613", strings.Repeat("h", 10), i), ""))
	}
	tcp := nodeLists(s)[stomp.TransportTCP]
	if n := strings.Count(tcp, ",") + 1; n != maxListedNodes || !strings.HasPrefix(tcp, "hhhhhhhhhh-000.example:61613,") {
		t.Errorf("100 short addresses: listed %d, want %d, this node first: %.80s", n, maxListedNodes, tcp)
	}
	for i := range s.Members {
		s.Members[i].STOMPAddr = fmt.Sprintf("%s-%03d.example:61613", strings.Repeat("h", 200), i)
	}
	if tcp := nodeLists(s)[stomp.TransportTCP]; len(tcp) > maxNodesHeaderLen || strings.Count(tcp, ",") < 10 {
		t.Errorf("100 long addresses: %d bytes, %d listed; want at most %d bytes", len(tcp), strings.Count(tcp, ",")+1, maxNodesHeaderLen)
	}
}

func TestAdvertisedClientAddrs(t *testing.T) {
	bound := cluster.ClientAddrs{TCP: "0.0.0.0:61613", TLS: "0.0.0.0:61614", WSS: "[::]:15673"}
	if got := advertisedClientAddrs("", bound); got != bound {
		t.Errorf("without stomp.advertise_addr: %+v, want the bound addresses %+v", got, bound)
	}
	want := cluster.ClientAddrs{TCP: "broker-0.example:6000", TLS: "broker-0.example:61614", WSS: "broker-0.example:15673"}
	if got := advertisedClientAddrs("broker-0.example:6000", bound); got != want {
		t.Errorf("with stomp.advertise_addr: %+v, want %+v", got, want)
	}
	tlsOnly := cluster.ClientAddrs{TLS: "0.0.0.0:61614"}
	if got := advertisedClientAddrs("broker-0.example:61613", tlsOnly); got != (cluster.ClientAddrs{TLS: "broker-0.example:61614"}) {
		t.Errorf("TLS only: %+v", got)
	}
}
