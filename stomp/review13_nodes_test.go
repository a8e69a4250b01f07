package stomp

import "testing"

// TestReview13NodesHeaderUnencodable: a Config.Nodes value CONNECTED
// cannot carry (a newline: CONNECTED's headers are not escaped) is left
// out, and the client is still connected, instead of the session ending
// without a frame because the CONNECTED could not be written.
func TestReview13NodesHeaderUnencodable(t *testing.T) {
	_, srv := testServerCfg(t, func(c *Config) {
		c.Nodes = func(Transport) string { return "a.example:61613\nb.example:61613" }
	})
	tc := tdial(t, srv.Addr().String())
	f := tc.connect()
	if v, ok := f.Header.Contains(HeaderNodes); ok {
		t.Fatalf("%s: %q sent", HeaderNodes, v)
	}
}
