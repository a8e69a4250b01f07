package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// The values allowed for the keys that take one of a set of words.
var (
	logLevels    = []string{"debug", "info", "warn", "error"}
	logFormats   = []string{"text", "json"}
	syncModes    = []string{"always", "batch", "none"}
	recoverModes = []string{"refuse", "truncate"}
	clientAuths  = []string{"none", "request", "require"}
	overflows    = []string{"reject-publish", "drop-head"}
)

// The bounds of store.wal_size, as the store enforces them.
const (
	minWALSize = 32 << 10
	maxWALSize = 1 << 30
)

// dlqMustStart is what every queue.dlq_prefix starts with: dead letters go to
// queues.
const dlqMustStart = "/queue/"

// Validate reports every problem with c, joined with errors.Join: one
// *KeyError per line, each naming its key and what is wrong with its value. It
// returns nil when c is usable. It reads no files: the caller reads
// auth.users_file and cluster.secret_key_file and reports their problems.
func (c Config) Validate() error {
	return errors.Join(c.problems()...)
}

// problems returns one *KeyError per problem, in the order of Config's fields.
func (c Config) problems() []error {
	var errs []error
	check := func(key string, err error) {
		if err != nil {
			errs = append(errs, &KeyError{Key: key, Err: err})
		}
	}

	check("node.name", nodeName(c.Node.Name))
	check("node.data_dir", nonEmpty(c.Node.DataDir))

	if c.STOMP.Addr == "" && c.STOMP.TLS.Addr == "" && c.STOMP.WSAddr == "" && c.STOMP.WSSAddr == "" {
		check("stomp.addr", errors.New(`must not be empty unless stomp.tls.addr, stomp.ws_addr or stomp.wss_addr is set ("" serves no plain TCP listener)`))
	} else {
		check("stomp.addr", optional(c.STOMP.Addr, listenAddr))
	}
	check("stomp.heartbeat_send", atLeastZero(c.STOMP.HeartbeatSend))
	check("stomp.heartbeat_receive", atLeastZero(c.STOMP.HeartbeatReceive))
	check("stomp.connect_timeout", positive(c.STOMP.ConnectTimeout))
	check("stomp.write_timeout", positive(c.STOMP.WriteTimeout))
	check("stomp.heartbeat_min", positive(c.STOMP.HeartbeatMin))
	check("stomp.tls.addr", optional(c.STOMP.TLS.Addr, listenAddr))
	check("stomp.tls.client_auth", oneOf(c.STOMP.TLS.ClientAuth, clientAuths))
	if c.STOMP.TLS.Addr != "" {
		check("stomp.tls.cert_file", requiredWith(c.STOMP.TLS.CertFile, "stomp.tls.addr"))
		check("stomp.tls.key_file", requiredWith(c.STOMP.TLS.KeyFile, "stomp.tls.addr"))
	} else if c.STOMP.WSSAddr == "" {
		for key, v := range map[string]string{"stomp.tls.cert_file": c.STOMP.TLS.CertFile, "stomp.tls.key_file": c.STOMP.TLS.KeyFile, "stomp.tls.client_ca_file": c.STOMP.TLS.ClientCAFile} {
			if v != "" {
				check(key, errors.New("has no effect without stomp.tls.addr"))
			}
		}
	}
	if c.STOMP.TLS.ClientAuth != "none" && c.STOMP.TLS.ClientAuth != "" && slices.Contains(clientAuths, c.STOMP.TLS.ClientAuth) {
		check("stomp.tls.client_ca_file", requiredWith(c.STOMP.TLS.ClientCAFile, "stomp.tls.client_auth: "+c.STOMP.TLS.ClientAuth))
	} else if c.STOMP.TLS.ClientCAFile != "" && c.STOMP.TLS.Addr != "" {
		check("stomp.tls.client_auth", errors.New(`is "none", so stomp.tls.client_ca_file has no effect (set request or require)`))
	}

	check("stomp.advertise_addr", optional(c.STOMP.AdvertiseAddr, advertiseAddr))
	check("stomp.ws_addr", optional(c.STOMP.WSAddr, listenAddr))
	check("stomp.wss_addr", optional(c.STOMP.WSSAddr, listenAddr))
	if c.STOMP.WSSAddr != "" && (c.STOMP.TLS.CertFile == "" || c.STOMP.TLS.KeyFile == "") {
		check("stomp.wss_addr", errors.New("needs stomp.tls.cert_file and stomp.tls.key_file (wss uses the STOMP TLS settings)"))
	}
	for i, o := range c.STOMP.WSAllowedOrigins {
		if err := originPattern(o); err != nil {
			check("stomp.ws_allowed_origins", fmt.Errorf("entry %d: %w", i, err))
		}
	}

	check("admin.addr", optional(c.Admin.Addr, listenAddr))
	if (c.Admin.TLS.CertFile == "") != (c.Admin.TLS.KeyFile == "") {
		check("admin.tls.key_file", errors.New("admin.tls.cert_file and admin.tls.key_file go together"))
	}
	if c.Admin.TLS.ClientCAFile != "" && c.Admin.TLS.CertFile == "" {
		check("admin.tls.client_ca_file", errors.New("needs admin.tls.cert_file and admin.tls.key_file (client certificates need HTTPS)"))
	}
	// Whoever reaches the admin address can change M and read the cluster:
	// beyond loopback it must ask who is calling.
	if c.Admin.Addr != "" && listenAddr(c.Admin.Addr) == nil && !listensOnLoopback(c.Admin.Addr) && c.Admin.TokenFile == "" && c.Admin.TLS.ClientCAFile == "" {
		check("admin.token_file", errors.New("required when admin.addr listens beyond loopback (or admin.tls.client_ca_file for client-certificate authentication)"))
	}

	check("log.level", oneOf(c.Log.Level, logLevels))
	check("log.format", oneOf(c.Log.Format, logFormats))

	check("store.sync", oneOf(c.Store.Sync, syncModes))
	check("store.sync_interval", positive(c.Store.SyncInterval))
	check("store.max_batch", positive(c.Store.MaxBatch))
	check("store.apply_interval", positive(c.Store.ApplyInterval))
	if c.Store.WALSize < minWALSize || c.Store.WALSize > maxWALSize {
		check("store.wal_size", fmt.Errorf("must be between %d (32 KiB) and %d (1 GiB), got %d", minWALSize, maxWALSize, c.Store.WALSize))
	}
	check("store.min_free_bytes", atLeastZero(c.Store.MinFreeBytes))
	check("store.recover", oneOf(c.Store.Recover, recoverModes))

	if c.Auth.UsersFile == "" && !c.Auth.AllowAnonymous && c.STOMP.Addr != "" && listenAddr(c.STOMP.Addr) == nil && !listensOnLoopback(c.STOMP.Addr) {
		check("auth.users_file", errors.New("required when stomp.addr listens beyond loopback (set auth.allow_anonymous: true to allow anonymous clients)"))
	}
	// A TLS listener beyond loopback is anonymous too unless it requires a
	// client certificate that logs in.
	x509Required := c.Auth.X509Login && c.STOMP.TLS.ClientAuth == "require"
	if c.Auth.UsersFile == "" && !c.Auth.AllowAnonymous && !x509Required && c.STOMP.TLS.Addr != "" && listenAddr(c.STOMP.TLS.Addr) == nil && !listensOnLoopback(c.STOMP.TLS.Addr) {
		check("auth.users_file", errors.New("required when stomp.tls.addr listens beyond loopback (or auth.x509_login with stomp.tls.client_auth: require, or auth.allow_anonymous: true)"))
	}
	// A WebSocket listener beyond loopback is as anonymous as stomp.addr;
	// a required client certificate logs in over wss only (plain ws has
	// no TLS, so no certificate).
	for key, addr := range map[string]string{"stomp.ws_addr": c.STOMP.WSAddr, "stomp.wss_addr": c.STOMP.WSSAddr} {
		certLogin := x509Required && key == "stomp.wss_addr"
		if c.Auth.UsersFile == "" && !c.Auth.AllowAnonymous && !certLogin && addr != "" && listenAddr(addr) == nil && !listensOnLoopback(addr) {
			check("auth.users_file", fmt.Errorf("required when %s listens beyond loopback (set auth.allow_anonymous: true to allow anonymous clients)", key))
		}
	}
	if c.Auth.X509Login && ((c.STOMP.TLS.Addr == "" && c.STOMP.WSSAddr == "") || (c.STOMP.TLS.ClientAuth != "request" && c.STOMP.TLS.ClientAuth != "require")) {
		check("auth.x509_login", errors.New("needs stomp.tls.addr or stomp.wss_addr with stomp.tls.client_auth request or require"))
	}

	check("limits.max_frame_size", positive(c.Limits.MaxFrameSize))
	check("limits.max_header_count", positive(c.Limits.MaxHeaderCount))
	check("limits.max_header_length", positive(c.Limits.MaxHeaderLength))
	check("limits.max_body_size", positive(c.Limits.MaxBodySize))
	check("limits.max_connections", positive(c.Limits.MaxConnections))
	check("limits.max_subscriptions", positive(c.Limits.MaxSubscriptions))
	check("limits.max_transaction_frames", positive(c.Limits.MaxTransactionFrames))
	check("limits.topic_buffer", positive(c.Limits.TopicBuffer))
	check("limits.max_unacked", positive(c.Limits.MaxUnacked))
	check("limits.max_unacked_bytes", positive(c.Limits.MaxUnackedBytes))
	check("limits.max_outgoing_bytes", positive(c.Limits.MaxOutgoingBytes))
	check("limits.max_transaction_bytes", positive(c.Limits.MaxTransactionBytes))
	check("limits.max_connections_per_ip", positive(c.Limits.MaxConnectionsPerIP))

	check("queue.max_redeliveries", atLeastZero(c.Queue.MaxRedeliveries))
	check("queue.dlq_prefix", dlqPrefix(c.Queue.DLQPrefix))
	check("queue.max_length", atLeastZero(c.Queue.MaxLength))
	check("queue.max_bytes", atLeastZero(c.Queue.MaxBytes))
	check("queue.overflow", oneOf(c.Queue.Overflow, overflows))
	check("queue.idle_delete_after", atLeastZero(c.Queue.IdleDeleteAfter))
	check("queue.read_ahead_messages", positive(c.Queue.ReadAheadMessages))
	check("queue.read_ahead_bytes", positive(c.Queue.ReadAheadBytes))

	check("cluster.gossip_addr", optional(c.Cluster.GossipAddr, listenAddr))
	check("cluster.peer_addr", optional(c.Cluster.PeerAddr, listenAddr))
	for i, a := range c.Cluster.Join {
		if err := dialAddr(a); err != nil {
			check("cluster.join", fmt.Errorf("entry %d: %w", i, err))
		}
	}
	if len(c.Cluster.Join) > 0 && c.Cluster.GossipAddr == "" {
		check("cluster.join", errors.New("needs cluster.gossip_addr: a node without it runs alone and joins no one"))
	}
	if c.Cluster.ActiveMembers < 1 {
		check("cluster.active_members", fmt.Errorf("must be >= 1, got %d", c.Cluster.ActiveMembers))
	}
	check("cluster.name", nonEmpty(c.Cluster.Name))
	// Without a key anyone who reaches the gossip port can join, change M
	// and take a seat: as with anonymous STOMP, only on loopback by default.
	if c.Cluster.SecretKeyFile == "" && !c.Cluster.AllowPlaintextGossip && c.Cluster.GossipAddr != "" && listenAddr(c.Cluster.GossipAddr) == nil && !listensOnLoopback(c.Cluster.GossipAddr) {
		check("cluster.secret_key_file", errors.New("required when cluster.gossip_addr listens beyond loopback (set cluster.allow_plaintext_gossip: true to allow unauthenticated gossip)"))
	}
	if t := c.Cluster.TLS; t.CertFile != "" || t.KeyFile != "" || t.CAFile != "" {
		for key, v := range map[string]string{"cluster.tls.cert_file": t.CertFile, "cluster.tls.key_file": t.KeyFile, "cluster.tls.ca_file": t.CAFile} {
			if v == "" {
				check(key, errors.New("cluster.tls.cert_file, key_file and ca_file go together (mutual TLS on peer links)"))
			}
		}
		if c.Cluster.GossipAddr == "" {
			check("cluster.tls.cert_file", errors.New("has no effect without cluster.gossip_addr (a single node has no peer links)"))
		}
	}
	check("cluster.promotion_delay", atLeastZero(c.Cluster.PromotionDelay))
	check("cluster.forget_after", positive(c.Cluster.ForgetAfter))

	// W <= R <= M. M matters only with gossip: a single node keeps one copy.
	if c.Replica.Factor < 1 {
		check("replica.factor", fmt.Errorf("must be >= 1, got %d", c.Replica.Factor))
	} else if c.Cluster.GossipAddr != "" && c.Cluster.ActiveMembers >= 1 && c.Replica.Factor > c.Cluster.ActiveMembers {
		check("replica.factor", fmt.Errorf("%d is more than cluster.active_members (%d)", c.Replica.Factor, c.Cluster.ActiveMembers))
	}
	if c.Replica.TombstoneTTL < time.Second {
		check("replica.tombstone_ttl", fmt.Errorf("must be at least 1s, got %v", c.Replica.TombstoneTTL))
	}
	if c.Replica.WriteQuorum < 0 {
		check("replica.write_quorum", fmt.Errorf("must be >= 0 (0 for a majority of replica.factor), got %d", c.Replica.WriteQuorum))
	} else if c.Replica.Factor >= 1 && c.Replica.WriteQuorum > c.Replica.Factor {
		check("replica.write_quorum", fmt.Errorf("%d is more than replica.factor (%d)", c.Replica.WriteQuorum, c.Replica.Factor))
	}

	return errs
}

func requiredWith(s, other string) error {
	if s == "" {
		return fmt.Errorf("required with %s", other)
	}
	return nil
}

func nonEmpty(s string) error {
	if s == "" {
		return errors.New("must not be empty")
	}
	return nil
}

func nodeName(s string) error {
	if s == "" {
		return errors.New("must not be empty")
	}
	if strings.ContainsFunc(s, unicode.IsSpace) {
		return fmt.Errorf("%q must not contain whitespace", s)
	}
	return nil
}

// number is the kinds of value that have a lower bound.
type number interface{ ~int | ~int64 }

func positive[T number](v T) error {
	if v <= 0 {
		return fmt.Errorf("must be > 0, got %v", v)
	}
	return nil
}

func atLeastZero[T number](v T) error {
	if v < 0 {
		return fmt.Errorf("must be >= 0, got %v", v)
	}
	return nil
}

func oneOf(s string, allowed []string) error {
	if !slices.Contains(allowed, s) {
		return fmt.Errorf("%q is not one of %s", s, strings.Join(allowed, ", "))
	}
	return nil
}

// optional applies check unless s is "", which turns the feature off.
func optional(s string, check func(string) error) error {
	if s == "" {
		return nil
	}
	return check(s)
}

// listenAddr accepts host:port with port 0..65535; port 0 picks a free port
// and an empty host listens on every interface.
func listenAddr(s string) error {
	_, _, err := splitAddr(s, 0)
	return err
}

// dialAddr accepts host:port with a non-empty host (a DNS name or an IP
// address) and port 1..65535.
func dialAddr(s string) error {
	host, _, err := splitAddr(s, 1)
	if err != nil {
		return err
	}
	if host == "" {
		return fmt.Errorf("%q has no host", s)
	}
	return nil
}

// advertiseAddr is dialAddr with a host that is an IP address or a host
// name (letters, digits, '.', '-', '_'): clients get it in a
// comma-separated header (x-brokerd-nodes).
func advertiseAddr(s string) error {
	if err := dialAddr(s); err != nil {
		return err
	}
	host, _, _ := net.SplitHostPort(s)
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	if i := strings.IndexFunc(host, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_')
	}); i >= 0 {
		return fmt.Errorf("%q: host %q has %q, which no host name has", s, host, host[i:i+1])
	}
	return nil
}

func splitAddr(s string, minPort uint64) (host string, port uint16, err error) {
	host, p, err := net.SplitHostPort(s)
	if err != nil || strings.ContainsFunc(host, unicode.IsSpace) {
		return "", 0, fmt.Errorf("%q is not host:port", s)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n < minPort {
		return "", 0, fmt.Errorf("%q: port %q is not a number in %d..65535", s, p, minPort)
	}
	return host, uint16(n), nil
}

// listensOnLoopback reports whether addr's host is localhost or a loopback
// address (127.0.0.0/8, ::1). An empty host listens on every interface.
func listensOnLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false // Validate reports the address itself
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// originPattern accepts an Origin host pattern: a host or host:port, with
// path.Match wildcards, or "*" for every origin; not a URL.
func originPattern(s string) error {
	if s == "" {
		return errors.New("empty origin pattern")
	}
	if strings.Contains(s, "://") || strings.Contains(s, "/") || strings.ContainsFunc(s, unicode.IsSpace) {
		return fmt.Errorf("%q is not a host pattern (write app.example.com or *.example.com:8443, without scheme or path)", s)
	}
	if _, err := path.Match(s, ""); err != nil {
		return fmt.Errorf("%q: %v", s, err)
	}
	return nil
}

func dlqPrefix(s string) error {
	if !strings.HasPrefix(s, dlqMustStart) || len(s) == len(dlqMustStart) {
		return fmt.Errorf("%q must start with %q and name more than it", s, dlqMustStart)
	}
	return nil
}
