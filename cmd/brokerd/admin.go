package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/spf13/cobra"
)

// adminTarget is the node a subcommand calls through its admin API, and
// the credentials it calls with. addAdminFlags makes one from a command's
// flags; call sends a request.
type adminTarget struct {
	addr      string // host:port, or a URL's scheme and host
	tokenFile string
	caFile    string
	certFile  string
	keyFile   string
	// timeout bounds one call; zero is 5 s (a purge of a large queue
	// sets more).
	timeout time.Duration
}

// addAdminFlags adds to c the flags every command that calls a node's
// admin API takes (--admin-addr, --token-file, --ca-file, --cert-file,
// --key-file) and returns where they are stored, for target.call.
func addAdminFlags(c *cobra.Command) *adminTarget {
	t := &adminTarget{}
	f := c.Flags()
	f.StringVar(&t.addr, "admin-addr", "127.0.0.1:8613", "admin address of the node: host:port, or https://host:port")
	f.StringVar(&t.tokenFile, "token-file", "", "file holding the node's admin token (its admin.token_file), sent as a bearer token")
	f.StringVar(&t.caFile, "ca-file", "", "PEM CA certificates that signed the node's admin certificate (admin.tls.cert_file); implies HTTPS")
	f.StringVar(&t.certFile, "cert-file", "", "PEM client certificate, signed by a CA of the node's admin.tls.client_ca_file; implies HTTPS")
	f.StringVar(&t.keyFile, "key-file", "", "PEM private key of --cert-file")
	return t
}

// client returns the base URL and an HTTP client for the target.
func (t *adminTarget) client() (string, *http.Client, error) {
	host := t.addr
	scheme := "http"
	if s, rest, ok := strings.Cut(host, "://"); ok {
		if s != "http" && s != "https" {
			return "", nil, fmt.Errorf("--admin-addr %q: scheme must be http or https", t.addr)
		}
		scheme, host = s, strings.TrimSuffix(rest, "/")
	}
	if host == "" {
		return "", nil, fmt.Errorf("--admin-addr %q: no host", t.addr)
	}
	if (t.certFile == "") != (t.keyFile == "") {
		return "", nil, errors.New("--cert-file and --key-file go together")
	}
	wantTLS := t.caFile != "" || t.certFile != ""
	if wantTLS && scheme == "http" && strings.Contains(t.addr, "://") {
		return "", nil, fmt.Errorf("--admin-addr %q is http://, but --ca-file and --cert-file are for HTTPS", t.addr)
	}
	c := &http.Client{Timeout: 5 * time.Second}
	if t.timeout > 0 {
		c.Timeout = t.timeout
	}
	if wantTLS || scheme == "https" {
		scheme = "https"
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if t.caFile != "" {
			b, err := os.ReadFile(t.caFile)
			if err != nil {
				return "", nil, fmt.Errorf("--ca-file: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(b) {
				return "", nil, fmt.Errorf("--ca-file %s: no PEM certificate in it", t.caFile)
			}
		}
		if t.certFile != "" {
			cert, err := tls.LoadX509KeyPair(t.certFile, t.keyFile)
			if err != nil {
				return "", nil, fmt.Errorf("--cert-file %s, --key-file %s: %w", t.certFile, t.keyFile, err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		c.Transport = &http.Transport{TLSClientConfig: tc, Proxy: http.ProxyFromEnvironment}
	}
	return scheme + "://" + host, c, nil
}

// token reads --token-file: "" without one.
func (t *adminTarget) token() (string, error) {
	if t.tokenFile == "" {
		return "", nil
	}
	b, err := os.ReadFile(t.tokenFile)
	if err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("--token-file %s is empty", t.tokenFile)
	}
	return tok, nil
}

// call sends a request to the node's admin API, with body (if not nil) as
// JSON, and decodes a 200 answer's JSON into out (if not nil). Any other
// status is an error carrying the node's text.
func (t *adminTarget) call(method, path string, body, out any) error {
	base, client, err := t.client()
	if err != nil {
		return err
	}
	tok, err := t.token()
	if err != nil {
		return err
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, base+path, rd)
	if err != nil {
		return fmt.Errorf("--admin-addr %q: %w", t.addr, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := client.Do(req)
	if err != nil {
		var rh tls.RecordHeaderError
		var ua x509.UnknownAuthorityError
		switch {
		case errors.Is(err, http.ErrSchemeMismatch) || errors.As(err, &rh):
			return fmt.Errorf("admin %s: %w (the node serves plain HTTP: drop --ca-file and --cert-file)", t.addr, err)
		case errors.As(err, &ua) && t.caFile == "":
			return fmt.Errorf("admin %s: %w (pass --ca-file with the CA that signed the node's admin.tls.cert_file)", t.addr, err)
		}
		return fmt.Errorf("admin %s: %w", t.addr, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("admin %s: %w", t.addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		msg := fmt.Sprintf("admin %s: %s: %s", t.addr, resp.Status, strings.TrimSpace(string(b)))
		switch {
		case resp.StatusCode == http.StatusUnauthorized && tok == "" && t.certFile == "":
			msg += " (pass --token-file, or --cert-file and --key-file)"
		case resp.StatusCode == http.StatusBadRequest && strings.HasPrefix(base, "http:") && bytes.Contains(b, []byte("HTTPS")):
			msg += " (the node serves HTTPS: pass --ca-file, or --admin-addr https://...)"
		}
		return &adminStatusError{Status: resp.StatusCode, Msg: msg}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("admin %s: %s %s: %w", t.addr, method, path, err)
	}
	return nil
}

// adminStatusError is an admin API answer other than 200: Status is its
// HTTP status, Msg the node's text with the address and hints.
type adminStatusError struct {
	Status int
	Msg    string
}

func (e *adminStatusError) Error() string { return e.Msg }

// destCounts is, per node ID, how many queues it owns and how many it
// holds a copy of (besides the owner's).
type destCounts struct{ owns, copies int }

// queueCounts reads GET /v1/destinations (best effort: nil on error).
func queueCounts(target *adminTarget) map[string]destCounts {
	var ds []struct {
		Owner    string `json:"owner"`
		Replicas []struct {
			ID    string `json:"id"`
			State string `json:"state"`
		} `json:"replicas"`
	}
	if err := target.call(http.MethodGet, "/v1/destinations", nil, &ds); err != nil {
		return nil
	}
	out := map[string]destCounts{}
	for _, d := range ds {
		if d.Owner == "" {
			continue
		}
		c := out[d.Owner]
		c.owns++
		out[d.Owner] = c
		for _, r := range d.Replicas {
			if r.ID != d.Owner {
				c := out[r.ID]
				c.copies++
				out[r.ID] = c
			}
		}
	}
	return out
}

func printStatus(w io.Writer, s cluster.Status, counts map[string]destCounts) {
	conv := "yes"
	if !s.Converged {
		conv = "NO"
	}
	// A node built before protocol versions reports none ("-").
	proto := "-"
	if s.ProtocolVersion > 0 {
		proto = strconv.Itoa(s.ProtocolVersion)
	}
	fmt.Fprintf(w, "cluster %s  node %s (%s)  epoch %d  converged %s  active members wanted %d  protocol version %s\n\n",
		s.ClusterName, s.NodeName, s.NodeID, s.Epoch, conv, s.ActiveMembersWanted, proto)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	head := "NAME\tID\tROLE\tSTATE\tSTOMP\tADMIN\tACTIVE SINCE\tPROTOCOLS"
	if counts != nil {
		head += "\tOWNS\tCOPIES"
	}
	fmt.Fprintln(tw, head)
	for _, m := range s.Members {
		since := "-"
		if m.ActiveSince != nil {
			since = *m.ActiveSince
		}
		state := m.State
		if m.Draining {
			state += ",draining" // brokerd drain
		}
		// The versions the member speaks (README, Rolling upgrades).
		protos := "-"
		if m.Protocols.Valid() {
			protos = m.Protocols.String()
		}
		line := fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s", m.Name, m.ID, m.Role, state, m.STOMPAddr, m.AdminAddr, since, protos)
		if counts != nil {
			c := counts[m.ID]
			line += fmt.Sprintf("\t%d\t%d", c.owns, c.copies)
		}
		fmt.Fprintln(tw, line)
	}
	tw.Flush()
}

func statusCmd(stdout io.Writer) *cobra.Command {
	var target *adminTarget
	var asJSON bool
	c := &cobra.Command{
		Use:   "status",
		Short: "Print a node's view of the cluster (GET /v1/cluster on its admin address)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var s cluster.Status
			if err := target.call(http.MethodGet, "/v1/cluster", nil, &s); err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(s)
			}
			var counts map[string]destCounts
			if len(s.ActiveSet) > 0 {
				counts = queueCounts(target)
			}
			printStatus(stdout, s, counts)
			return nil
		},
	}
	target = addAdminFlags(c)
	c.Flags().BoolVar(&asJSON, "json", false, "print the JSON as the node returns it")
	return c
}

func activeMembersCmd(stdout io.Writer) *cobra.Command {
	var target *adminTarget
	c := &cobra.Command{
		Use:   "active-members N",
		Short: "Change M, the wanted number of active members, cluster-wide (PUT /v1/cluster/active-members)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := strconv.Atoi(args[0])
			if err != nil || v < 1 {
				return fmt.Errorf("active members must be an integer >= 1, got %q", args[0])
			}
			var s cluster.Status
			if err := target.call(http.MethodPut, "/v1/cluster/active-members", map[string]int{"value": v}, &s); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "active members wanted: %d (spreading by gossip)\n", s.ActiveMembersWanted)
			return nil
		},
	}
	target = addAdminFlags(c) // any node
	return c
}

func reloadCmd(stdout io.Writer) *cobra.Command {
	var target *adminTarget
	c := &cobra.Command{
		Use:   "reload",
		Short: "Make a node reread its users file, ACL file, certificates, keys and admin token (POST /v1/reload; SIGHUP does the same)",
		Long: "Make a node reread its users file, ACL file, certificates, keys and admin token (POST /v1/reload; SIGHUP does the same).\n" +
			"A part that fails to load keeps its old rules; the command then prints the node's error and exits 1.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := target.call(http.MethodPost, "/v1/reload", nil, nil); err != nil {
				return err
			}
			fmt.Fprintln(stdout, "reloaded")
			return nil
		},
	}
	target = addAdminFlags(c)
	return c
}
