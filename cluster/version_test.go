package cluster

import "testing"

func TestCommonProtocols(t *testing.T) {
	r := func(lo, hi int) ProtocolRange { return ProtocolRange{Min: lo, Max: hi} }
	for _, tc := range []struct {
		name string
		in   []ProtocolRange
		want ProtocolRange
		ok   bool
	}{
		{"none", nil, ProtocolRange{}, false},
		{"one", []ProtocolRange{r(1, 2)}, r(1, 2), true},
		{"old and new", []ProtocolRange{r(1, 1), r(1, 2), r(1, 2)}, r(1, 1), true},
		{"all new", []ProtocolRange{r(1, 2), r(1, 2)}, r(1, 2), true},
		{"next after next", []ProtocolRange{r(1, 2), r(2, 3)}, r(2, 2), true},
		{"too old", []ProtocolRange{r(2, 3), r(2, 3), r(1, 1)}, r(2, 1), false},
		{"too new", []ProtocolRange{r(1, 2), r(3, 4)}, r(3, 2), false},
	} {
		got, ok := commonProtocols(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("%s: commonProtocols(%v) = %v, %v; want %v, %v", tc.name, tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestEffectiveProtocol(t *testing.T) {
	r := func(lo, hi int) ProtocolRange { return ProtocolRange{Min: lo, Max: hi} }
	if v := effectiveProtocol(r(1, 2), nil); v != 2 {
		t.Errorf("alone: %d, want 2", v)
	}
	if v := effectiveProtocol(r(1, 2), []ProtocolRange{r(1, 2), r(1, 1)}); v != 1 {
		t.Errorf("one old member: %d, want 1", v)
	}
	if v := effectiveProtocol(r(1, 1), []ProtocolRange{r(1, 2)}); v != 1 {
		t.Errorf("this node old: %d, want 1", v)
	}
}

// TestMetaProtocols: metadata from a build before ranges (no "vm") speaks
// 1 to Proto; a range upside down is refused.
func TestMetaProtocols(t *testing.T) {
	m, err := decodeMeta([]byte(`{"id":"x","n":"x","j":1,"v":1,"m":3}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := m.protocols(); got != (ProtocolRange{1, 1}) {
		t.Errorf("old metadata speaks %v, want 1..1", got)
	}
	m, err = decodeMeta([]byte(`{"id":"x","n":"x","j":1,"v":3,"vm":2,"m":3}`))
	if err != nil || m.protocols() != (ProtocolRange{2, 3}) {
		t.Errorf("range 2..3: %v, %v", m.protocols(), err)
	}
	if _, err := decodeMeta([]byte(`{"id":"x","n":"x","j":1,"v":1,"vm":2,"m":3}`)); err == nil {
		t.Error("metadata with min 2 above max 1 accepted")
	}
	e := &VersionError{Node: ProtocolRange{1, 1}, Cluster: ProtocolRange{2, 3}}
	if want := "protocol version 1..1 is not supported by the cluster (members speak 2..3)"; e.Error() != want {
		t.Errorf("error %q, want %q", e.Error(), want)
	}
}
