package config

import "strings"

// envPrefix starts the name of every environment variable that sets a key.
const envPrefix = "BROKERD_"

// setting is one key: where it lives in Config and the flag that sets it.
type setting struct {
	key  string // "stomp.addr"
	flag string // "stomp-addr", or "" when no flag sets the key
	help string // flag usage; RegisterFlags appends the key
	// field returns a pointer into c: *string, *int, *int64, *bool,
	// *time.Duration or *[]string.
	field func(c *Config) any
}

// settings lists every key, in the order of Config's fields. A test checks
// that every field of Config has exactly one key here.
var settings = []setting{
	{"node.name", "node-name", "node name, unique in the cluster", func(c *Config) any { return &c.Node.Name }},
	{"node.data_dir", "data-dir", "directory for the node's data", func(c *Config) any { return &c.Node.DataDir }},

	{"stomp.addr", "stomp-addr", "STOMP listen address", func(c *Config) any { return &c.STOMP.Addr }},
	{"stomp.heartbeat_send", "", "", func(c *Config) any { return &c.STOMP.HeartbeatSend }},
	{"stomp.heartbeat_receive", "", "", func(c *Config) any { return &c.STOMP.HeartbeatReceive }},
	{"stomp.connect_timeout", "", "", func(c *Config) any { return &c.STOMP.ConnectTimeout }},
	{"stomp.write_timeout", "", "", func(c *Config) any { return &c.STOMP.WriteTimeout }},
	{"stomp.heartbeat_min", "", "", func(c *Config) any { return &c.STOMP.HeartbeatMin }},
	{"stomp.tls.addr", "stomp-tls-addr", `STOMP over TLS listen address, "" for none`, func(c *Config) any { return &c.STOMP.TLS.Addr }},
	{"stomp.tls.cert_file", "", "", func(c *Config) any { return &c.STOMP.TLS.CertFile }},
	{"stomp.tls.key_file", "", "", func(c *Config) any { return &c.STOMP.TLS.KeyFile }},
	{"stomp.tls.client_ca_file", "", "", func(c *Config) any { return &c.STOMP.TLS.ClientCAFile }},
	{"stomp.tls.client_auth", "", "", func(c *Config) any { return &c.STOMP.TLS.ClientAuth }},
	{"stomp.advertise_addr", "stomp-advertise-addr", "host:port clients are told to reach this node's STOMP listener at", func(c *Config) any { return &c.STOMP.AdvertiseAddr }},
	{"stomp.ws_addr", "stomp-ws-addr", `STOMP over WebSocket listen address (path /ws), "" for none`, func(c *Config) any { return &c.STOMP.WSAddr }},
	{"stomp.wss_addr", "stomp-wss-addr", `STOMP over secure WebSocket listen address (path /ws), "" for none`, func(c *Config) any { return &c.STOMP.WSSAddr }},
	{"stomp.ws_allowed_origins", "", "", func(c *Config) any { return &c.STOMP.WSAllowedOrigins }},

	{"admin.addr", "admin-addr", `admin HTTP listen address, "" to disable`, func(c *Config) any { return &c.Admin.Addr }},
	{"admin.tls.cert_file", "", "", func(c *Config) any { return &c.Admin.TLS.CertFile }},
	{"admin.tls.key_file", "", "", func(c *Config) any { return &c.Admin.TLS.KeyFile }},
	{"admin.tls.client_ca_file", "", "", func(c *Config) any { return &c.Admin.TLS.ClientCAFile }},
	{"admin.token_file", "admin-token-file", "file holding the admin API's bearer token", func(c *Config) any { return &c.Admin.TokenFile }},
	{"admin.metrics_public", "", "", func(c *Config) any { return &c.Admin.MetricsPublic }},

	{"log.level", "log-level", "log level: debug, info, warn or error", func(c *Config) any { return &c.Log.Level }},
	{"log.format", "log-format", "log format: text or json", func(c *Config) any { return &c.Log.Format }},

	{"store.sync", "store-sync", "when the store syncs to disk: always, batch or none", func(c *Config) any { return &c.Store.Sync }},
	{"store.sync_interval", "", "", func(c *Config) any { return &c.Store.SyncInterval }},
	{"store.max_batch", "", "", func(c *Config) any { return &c.Store.MaxBatch }},
	{"store.apply_interval", "", "", func(c *Config) any { return &c.Store.ApplyInterval }},
	{"store.wal_size", "", "", func(c *Config) any { return &c.Store.WALSize }},
	{"store.min_free_bytes", "", "", func(c *Config) any { return &c.Store.MinFreeBytes }},
	{"store.recover", "", "", func(c *Config) any { return &c.Store.Recover }},

	{"auth.users_file", "users-file", `file of users and passwords, "" for no login`, func(c *Config) any { return &c.Auth.UsersFile }},
	{"auth.allow_anonymous", "allow-anonymous", "allow clients without a login beyond loopback", func(c *Config) any { return &c.Auth.AllowAnonymous }},
	{"auth.x509_login", "", "", func(c *Config) any { return &c.Auth.X509Login }},
	{"auth.acl_file", "acl-file", `file of access rules per destination, "" to allow every user everything`, func(c *Config) any { return &c.Auth.ACLFile }},

	{"limits.max_frame_size", "", "", func(c *Config) any { return &c.Limits.MaxFrameSize }},
	{"limits.max_header_count", "", "", func(c *Config) any { return &c.Limits.MaxHeaderCount }},
	{"limits.max_header_length", "", "", func(c *Config) any { return &c.Limits.MaxHeaderLength }},
	{"limits.max_body_size", "", "", func(c *Config) any { return &c.Limits.MaxBodySize }},
	{"limits.max_connections", "", "", func(c *Config) any { return &c.Limits.MaxConnections }},
	{"limits.max_subscriptions", "", "", func(c *Config) any { return &c.Limits.MaxSubscriptions }},
	{"limits.max_transaction_frames", "", "", func(c *Config) any { return &c.Limits.MaxTransactionFrames }},
	{"limits.topic_buffer", "", "", func(c *Config) any { return &c.Limits.TopicBuffer }},
	{"limits.max_unacked", "", "", func(c *Config) any { return &c.Limits.MaxUnacked }},
	{"limits.max_unacked_bytes", "", "", func(c *Config) any { return &c.Limits.MaxUnackedBytes }},
	{"limits.max_outgoing_bytes", "", "", func(c *Config) any { return &c.Limits.MaxOutgoingBytes }},
	{"limits.max_transaction_bytes", "", "", func(c *Config) any { return &c.Limits.MaxTransactionBytes }},
	{"limits.max_connections_per_ip", "", "", func(c *Config) any { return &c.Limits.MaxConnectionsPerIP }},

	{"queue.max_redeliveries", "", "", func(c *Config) any { return &c.Queue.MaxRedeliveries }},
	{"queue.dlq_prefix", "", "", func(c *Config) any { return &c.Queue.DLQPrefix }},
	{"queue.max_length", "", "", func(c *Config) any { return &c.Queue.MaxLength }},
	{"queue.max_bytes", "", "", func(c *Config) any { return &c.Queue.MaxBytes }},
	{"queue.overflow", "", "", func(c *Config) any { return &c.Queue.Overflow }},
	{"queue.idle_delete_after", "", "", func(c *Config) any { return &c.Queue.IdleDeleteAfter }},
	{"queue.read_ahead_messages", "", "", func(c *Config) any { return &c.Queue.ReadAheadMessages }},
	{"queue.read_ahead_bytes", "", "", func(c *Config) any { return &c.Queue.ReadAheadBytes }},

	{"cluster.gossip_addr", "gossip-addr", `gossip listen address, "" for a single node`, func(c *Config) any { return &c.Cluster.GossipAddr }},
	{"cluster.peer_addr", "peer-addr", "peer link listen address", func(c *Config) any { return &c.Cluster.PeerAddr }},
	{"cluster.join", "join", "host:port of a node to join; repeat or separate with commas", func(c *Config) any { return &c.Cluster.Join }},
	{"cluster.active_members", "active-members", "wanted number of active members", func(c *Config) any { return &c.Cluster.ActiveMembers }},
	{"cluster.name", "cluster-name", "cluster name", func(c *Config) any { return &c.Cluster.Name }},
	{"cluster.secret_key_file", "", "", func(c *Config) any { return &c.Cluster.SecretKeyFile }},
	{"cluster.promotion_delay", "", "", func(c *Config) any { return &c.Cluster.PromotionDelay }},
	{"cluster.forget_after", "", "", func(c *Config) any { return &c.Cluster.ForgetAfter }},
	{"cluster.allow_plaintext_gossip", "allow-plaintext-gossip", "allow gossip without cluster.secret_key_file beyond loopback", func(c *Config) any { return &c.Cluster.AllowPlaintextGossip }},
	{"cluster.tls.cert_file", "", "", func(c *Config) any { return &c.Cluster.TLS.CertFile }},
	{"cluster.tls.key_file", "", "", func(c *Config) any { return &c.Cluster.TLS.KeyFile }},
	{"cluster.tls.ca_file", "", "", func(c *Config) any { return &c.Cluster.TLS.CAFile }},

	{"replica.factor", "replication-factor", "copies R of every queued message, at most cluster.active_members", func(c *Config) any { return &c.Replica.Factor }},
	{"replica.write_quorum", "write-quorum", "copies durable before a RECEIPT, 1..R; 0 for a majority of R", func(c *Config) any { return &c.Replica.WriteQuorum }},
	{"replica.tombstone_ttl", "", "", func(c *Config) any { return &c.Replica.TombstoneTTL }},
}

// sizeKeys are the keys whose value is a number of bytes: besides a plain
// integer they accept a number with a unit, "4MiB" or "256MB" (see toSize).
var sizeKeys = map[string]bool{
	"store.wal_size":               true,
	"store.min_free_bytes":         true,
	"limits.max_frame_size":        true,
	"limits.max_header_length":     true,
	"limits.max_body_size":         true,
	"limits.max_unacked_bytes":     true,
	"limits.max_outgoing_bytes":    true,
	"limits.max_transaction_bytes": true,
	"queue.max_bytes":              true,
	"queue.read_ahead_bytes":       true,
}

// envName is the environment variable that sets key:
// stomp.addr is BROKERD_STOMP_ADDR.
func envName(key string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// lookupKey returns the setting with this key.
func lookupKey(key string) (setting, bool) {
	for _, s := range settings {
		if s.key == key {
			return s, true
		}
	}
	return setting{}, false
}

// isSection reports whether name is a leading part of some key ("stomp",
// "stomp.tls").
func isSection(name string) bool {
	for _, s := range settings {
		if strings.HasPrefix(s.key, name+".") {
			return true
		}
	}
	return false
}

// suggest returns the candidate closest to the mistyped name, or "" when none
// is within a few edits of it.
func suggest(name string, candidates []string) string {
	best, bestDist := "", 4 // farther than 3 edits is no longer a typo
	for _, c := range candidates {
		if d := editDistance(name, c); d < bestDist {
			best, bestDist = c, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
