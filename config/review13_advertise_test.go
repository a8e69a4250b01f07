package config

import "testing"

// TestReview13AdvertiseAddrHost: stomp.advertise_addr is sent to clients
// in a comma-separated header: a host with a comma (or another character
// no host name has) is refused, as a space is.
func TestReview13AdvertiseAddrHost(t *testing.T) {
	for _, bad := range []string{"a,b:61613", "a;b:61613", "a\x00b:61613", "a/b:61613"} {
		c := Default()
		c.STOMP.AdvertiseAddr = bad
		checkValidateError(t, c.Validate(), "stomp.advertise_addr", "")
	}
	for _, good := range []string{"broker-0.brokerd-headless.shop.svc.cluster.local:61613", "10.0.0.1:61613", "[2001:db8::1]:61613", "under_score.example:1"} {
		c := Default()
		c.STOMP.AdvertiseAddr = good
		if err := c.Validate(); err != nil {
			t.Errorf("%q: %v", good, err)
		}
	}
}
