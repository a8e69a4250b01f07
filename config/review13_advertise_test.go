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

// TestReview13PlainWSWithX509Login: a client certificate logs in over
// TLS only, so auth.x509_login with required client certificates does not
// make a plain stomp.ws_addr beyond loopback any less anonymous: without
// a users file it is refused, as stomp.addr is; stomp.wss_addr is not.
func TestReview13PlainWSWithX509Login(t *testing.T) {
	x509 := func(c *Config) {
		c.STOMP.Addr = "127.0.0.1:61613"
		c.STOMP.TLS.Addr, c.STOMP.TLS.CertFile, c.STOMP.TLS.KeyFile = ":61614", "c.pem", "k.pem"
		c.STOMP.TLS.ClientAuth, c.STOMP.TLS.ClientCAFile, c.Auth.X509Login = "require", "ca.pem", true
	}
	c := Default()
	x509(&c)
	c.STOMP.WSAddr = ":15674"
	checkValidateError(t, c.Validate(), "auth.users_file", "required when stomp.ws_addr listens beyond loopback")

	c = Default()
	x509(&c)
	c.STOMP.WSSAddr = ":15673"
	checkValidateError(t, c.Validate(), "", "")
}
