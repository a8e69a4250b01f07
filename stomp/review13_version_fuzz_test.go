package stomp

import (
	"testing"

	"github.com/brokerd/brokerd/cluster"
)

// FuzzPeerParseProtocols: whatever x-proto a peer sends, parsing neither
// panics nor yields an invalid range; a parsed range negotiates with this
// build's without overflow, and its canonical form parses back to it.
func FuzzPeerParseProtocols(f *testing.F) {
	for _, s := range []string{"1..1", "1..2", "0..99999", "2..1", "-1..2", "+1..+2", "1..9223372036854775807",
		"1..99999999999999999999", "..", "1..", "..2", "1..2..3", " 1..2", "1...2", "1e3..2e3", ""} {
		f.Add(s)
	}
	build := cluster.BuildProtocols()
	f.Fuzz(func(t *testing.T, s string) {
		r, err := peerParseProtocols(s, true)
		if err != nil {
			if r != (cluster.ProtocolRange{}) {
				t.Fatalf("%q: error %v with range %v", s, err, r)
			}
			return
		}
		if !r.Valid() {
			t.Fatalf("%q parsed to invalid %v", s, r)
		}
		back, err := peerParseProtocols(r.String(), true)
		if err != nil || back != r {
			t.Fatalf("%q -> %v -> %q -> %v, %v", s, r, r.String(), back, err)
		}
		v, ok := peerLinkProtocol(r, build)
		if ok && (v < build.Min || v > build.Max || v < r.Min || v > r.Max) {
			t.Fatalf("%q: link version %d outside %v and %v", s, v, r, build)
		}
		if !ok && v >= max(r.Min, build.Min) {
			t.Fatalf("%q: refused with version %d", s, v)
		}
	})
}
