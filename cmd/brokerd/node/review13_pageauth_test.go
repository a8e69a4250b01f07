package node

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"
)

// TestReview13WrongBearerOnPageLogged: a wrong bearer token sent to GET /
// (which answers with the sign-in form) is logged as a refused admin
// request, as it is on every other path; otherwise GET / is a silent
// oracle for guessing the token.
func TestReview13WrongBearerOnPageLogged(t *testing.T) {
	cfg := adminTestConfig(t)
	cfg.Admin.TokenFile = writeToken(t, filepath.Join(t.TempDir(), "admin.token"), testAdminToken)
	n, logs := startAdminNode(t, cfg)
	base := "http://" + n.AdminAddr()
	c := noRedirects()
	a := pageDo(t, c, http.MethodGet, base+"/", "", otherAdminToken, nil)
	if a.code != http.StatusUnauthorized {
		t.Fatalf("GET / with a wrong token: %d", a.code)
	}
	if !strings.Contains(logs.String(), "wrong bearer token") {
		t.Errorf("GET / with a wrong bearer token was not logged:\n%s", logs.String())
	}
	// A browser without credentials gets the form, and no warning.
	before := strings.Count(logs.String(), "admin request refused")
	pageDo(t, c, http.MethodGet, base+"/", "", "", nil)
	if after := strings.Count(logs.String(), "admin request refused"); after != before {
		t.Errorf("GET / without credentials logged as refused")
	}
}
