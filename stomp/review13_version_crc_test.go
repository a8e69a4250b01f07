package stomp

import (
	"strings"
	"testing"

	"github.com/go-stomp/stomp/v3/frame"
)

// TestReview13PeerChecksumHexCase: x-crc32c is "8 hex digits"; a request
// whose checksum matches its body in upper-case hex (another build or
// implementation may write it so) is not a damaged body: the server must
// apply it, not drop the link as a checksum mismatch.
func TestReview13PeerChecksumHexCase(t *testing.T) {
	peerNoLeaks(t)
	h := PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		_, crc := f.Header.Contains(peerHeaderCRC)
		r := PeerOK("x-crc", map[bool]string{true: "seen", false: "removed"}[crc])
		reply(r)
	})
	s := startPeerServer(t, h, func(c *PeerServerConfig) { c.Protocols = peerRange(1, 2) })
	p := peerRawConn(t, s.Addr().String())
	p.write("CONNECT\naccept-version:1.2\nhost:c\nx-node-id:raw\nheart-beat:1000,0\nx-proto:1..2\n\n\x00")
	if f := p.read(); f.Command != frame.CONNECTED {
		t.Fatalf("handshake: %s %v", f.Command, f.Header)
	}
	sum := strings.ToUpper(peerCRC([]byte("body")))
	p.write("SEND\nreceipt:1\nx-op:upper\nx-crc32c:" + sum + "\ncontent-length:4\n\nbody\x00")
	f := p.read()
	if f.Command != frame.RECEIPT || f.Header.Get("x-crc") != "removed" {
		t.Fatalf("request with x-crc32c:%s (its body's, upper case): got %s %v, want a RECEIPT from the handler without the header", sum, f.Command, f.Header)
	}
	if v := peerCounter(t, s.m.checksums); v != 1 {
		t.Errorf("%v checksums verified, want 1", v)
	}
}
