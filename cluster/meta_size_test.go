package cluster

import (
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"
)

// worstMeta is the metadata of a node with every field at its longest
// but the STOMP host: a 63-character name (a Kubernetes pod name's
// limit), IPv6 admin and peer addresses, four client listeners, times in
// milliseconds until the year 2286 and counters of ten digits (an epoch
// a second for 300 years).
func worstMeta(stompHost string) Meta {
	v6 := "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
	m := Meta{
		ID: strings.Repeat("f", 16), Name: strings.Repeat("n", 63),
		AdminAddr: v6, PeerAddr: v6,
		Active: true, ActiveSince: 9_999_999_999_999, JoinedAt: 9_999_999_999_999, Proto: 99,
		SetHash: strings.Repeat("f", 16), Epoch: 9_999_999_999, MVersion: 9_999_999_999, M: 999,
		Leaving: true, ProtoMin: 99, Draining: true,
	}
	m.setClientAddrs(ClientAddrs{
		TCP: net.JoinHostPort(stompHost, "65535"), TLS: net.JoinHostPort(stompHost, "65534"),
		WS: net.JoinHostPort(stompHost, "65533"), WSS: net.JoinHostPort(stompHost, "65532"),
	})
	return m
}

// TestMetaFitsLongAddresses: memberlist refuses metadata over 512 bytes.
// With every other field at its longest, a STOMP host of 100 characters
// (a pod's DNS name in a long namespace:
// brokerd-0.brokerd-headless.<namespace>.svc.cluster.local) still fits,
// because the four listeners share it; one too long is refused by New
// with an error that names the metadata's size, not silently cut.
func TestMetaFitsLongAddresses(t *testing.T) {
	max := 0
	for n := 1; n <= 300; n++ {
		m := worstMeta(strings.Repeat("h", n))
		if _, err := m.encode(); err != nil {
			break
		}
		max = n
	}
	t.Logf("the longest STOMP host that fits the worst case: %d characters", max)
	if max < 100 {
		t.Fatalf("a STOMP host of %d characters fills the metadata, want at least 100", max)
	}
	long := strings.Repeat("h", 253) // the longest DNS name
	cfg := DefaultConfig()
	cfg.NodeID, cfg.NodeName, cfg.BindAddr = "id", strings.Repeat("n", 63), ""
	cfg.STOMPAddr = net.JoinHostPort(long, "61613")
	cfg.AdminAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
	cfg.PeerAddr = cfg.AdminAddr
	cfg.STOMPTLSAddr, cfg.STOMPWSAddr, cfg.STOMPWSSAddr = net.JoinHostPort(long, "61614"), net.JoinHostPort(long, "15674"), net.JoinHostPort(long, "15673")
	if _, err := New(cfg); !errors.Is(err, errMeta) || !strings.Contains(err.Error(), "stomp.advertise_addr") {
		t.Fatalf("New with a STOMP host of %d characters: %v, want errMeta naming stomp.advertise_addr", len(long), err)
	}
}

// TestMetaClientAddrs: the client addresses read back as they were set,
// whether they share a host or not.
func TestMetaClientAddrs(t *testing.T) {
	for _, a := range []ClientAddrs{
		{},
		{TCP: "broker-0.example:61613"},
		{TCP: "broker-0.example:61613", TLS: "broker-0.example:61614", WS: "broker-0.example:15674", WSS: "broker-0.example:15673"},
		{TLS: "broker-0.example:61614", WSS: "broker-0.example:15673"},
		{TCP: "10.0.0.1:61613", TLS: "broker-0.example:61614"},
		{TCP: "[::1]:61613", TLS: "[::1]:61614", WS: "127.0.0.1:15674"},
	} {
		var m Meta
		m.setClientAddrs(a)
		b, err := m.encode()
		if err != nil {
			t.Fatal(err)
		}
		var back Meta
		back.ID, back.Proto = "x", 1
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if got := back.ClientAddrs(); got != a {
			t.Errorf("set %+v, read back %+v (encoded %s)", a, got, b)
		}
	}
	var m Meta
	m.setClientAddrs(ClientAddrs{TCP: "broker-0.example:61613", TLS: "broker-0.example:61614"})
	if m.STOMPTLS != ":61614" {
		t.Errorf("TLS address on the plain listener's host stored as %q, want :61614", m.STOMPTLS)
	}
}
