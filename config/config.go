package config

import (
	"os"
	"strings"
	"time"
	"unicode"
)

// Config is the whole configuration of one node. Each field's comment names
// its key; keys.go lists every key with the flag that sets it, if any.
type Config struct {
	Node    Node
	STOMP   STOMP
	Admin   Admin
	Log     Log
	Store   Store
	Auth    Auth
	Limits  Limits
	Queue   Queue
	Cluster Cluster
	Replica Replica
}

// Node identifies this process and where it keeps its data.
type Node struct {
	Name    string // node.name: the host name (os.Hostname), or "brokerd" without one; no whitespace
	DataDir string // node.data_dir: "./data"
}

// STOMP is the client-facing listener.
type STOMP struct {
	Addr             string        // stomp.addr: "127.0.0.1:61613"; port 0 picks a free port; "" serves no plain listener (needs stomp.tls.addr)
	HeartbeatSend    time.Duration // stomp.heartbeat_send: 10s (>= 0); 0 never sends heart-beats, otherwise the server sends them as often as the client asks, down to heartbeat_min
	HeartbeatReceive time.Duration // stomp.heartbeat_receive: 10s (>= 0); 0 never checks the client's, otherwise they are expected as often as the client offers, down to heartbeat_min
	ConnectTimeout   time.Duration // stomp.connect_timeout: 10s (> 0), from accept to CONNECT
	WriteTimeout     time.Duration // stomp.write_timeout: 60s (> 0), for one write to a client
	HeartbeatMin     time.Duration // stomp.heartbeat_min: 1s (> 0), the shortest heart-beat period the server agrees to, either way
	TLS              STOMPTLS
	// AdvertiseAddr is stomp.advertise_addr: "", the host:port clients are
	// told to reach this node's plain STOMP listener at (the CONNECTED
	// frame's x-brokerd-nodes header, /v1/cluster); "" derives it from
	// stomp.addr, with an unspecified host (0.0.0.0, ::) replaced by the
	// gossip address's host.
	AdvertiseAddr string
	// WSAddr is stomp.ws_addr: "", the STOMP over WebSocket listener (path
	// /ws); "" serves none.
	WSAddr string
	// WSSAddr is stomp.wss_addr: "", STOMP over secure WebSocket (wss, path
	// /ws) with stomp.tls's certificate, key and client-certificate
	// settings; "" serves none.
	WSSAddr string
	// WSAllowedOrigins is stomp.ws_allowed_origins: none; the Origin hosts
	// (patterns as in path.Match: "app.example.com", "*.example.com",
	// "localhost:8080") a browser page may open a WebSocket from, besides
	// the listener's own host. A request without an Origin header (not a
	// browser) is always allowed; "*" allows every origin.
	WSAllowedOrigins []string
}

// STOMPTLS is the STOMP-over-TLS listener (RabbitMQ's 61614). TLS 1.2 and
// 1.3 only, Go's default cipher suites.
type STOMPTLS struct {
	Addr         string // stomp.tls.addr: ""; "" serves no TLS listener
	CertFile     string // stomp.tls.cert_file: "", PEM certificate chain; required with stomp.tls.addr
	KeyFile      string // stomp.tls.key_file: "", PEM private key; required with stomp.tls.addr
	ClientCAFile string // stomp.tls.client_ca_file: "", PEM CAs that sign client certificates
	ClientAuth   string // stomp.tls.client_auth: none, request or require; "none"
}

// Admin is the HTTP server for health and metrics.
type Admin struct {
	Addr          string   // admin.addr: "127.0.0.1:8613"; "" disables the admin server
	TLS           AdminTLS // admin.tls.*: serve HTTPS
	TokenFile     string   // admin.token_file: ""; a file holding the bearer token every request but /healthz must carry
	MetricsPublic bool     // admin.metrics_public: false; true serves /metrics without authentication
}

// AdminTLS makes the admin server HTTPS; with ClientCAFile, a client
// certificate it signed authenticates a request as the token does.
type AdminTLS struct {
	CertFile     string // admin.tls.cert_file: ""
	KeyFile      string // admin.tls.key_file: ""
	ClientCAFile string // admin.tls.client_ca_file: ""; a client certificate signed by these CAs authenticates a request
}

// Log selects the slog handler.
type Log struct {
	Level  string // log.level: debug, info, warn or error; "info"
	Format string // log.format: text or json; "text"
}

// Store is the node's bbolt file.
type Store struct {
	Sync          string        // store.sync: always, batch or none; "always"
	SyncInterval  time.Duration // store.sync_interval: 100ms (> 0), how long batch waits to group commits
	MaxBatch      int           // store.max_batch: 4096 (> 0), operations per group commit
	ApplyInterval time.Duration // store.apply_interval: 10ms (> 0), the shortest wait between bbolt transactions that copy the log into bbolt
	WALSize       int64         // store.wal_size: 64 MiB (32 KiB..1 GiB), the preallocated write-ahead log
	MinFreeBytes  int64         // store.min_free_bytes: 256 MiB (>= 0); SENDs are refused while the data directory's filesystem has less free; 0 disables
	Recover       string        // store.recover: refuse or truncate; "refuse", what to do with a corrupt record in the middle of the write-ahead log
}

// Auth is client authentication.
type Auth struct {
	UsersFile      string // auth.users_file: ""; "" means no login is required
	AllowAnonymous bool   // auth.allow_anonymous: false; must be true to listen beyond loopback without a users file
	X509Login      bool   // auth.x509_login: false; a client with a verified certificate logs in as its subject CN, without a passcode
	ACLFile        string // auth.acl_file: ""; rules of read, write and configure per user or group and destination pattern; "" lets every authenticated user do everything
}

// Limits bound what one client can make the broker hold. All are > 0.
// Byte sizes accept units ("4MiB").
type Limits struct {
	MaxFrameSize         int   // limits.max_frame_size: 8 MiB + 64 KiB, a whole frame in bytes
	MaxHeaderCount       int   // limits.max_header_count: 128 headers per frame
	MaxHeaderLength      int   // limits.max_header_length: 8192 bytes, one header line
	MaxBodySize          int   // limits.max_body_size: 8 MiB, one frame body in bytes
	MaxConnections       int   // limits.max_connections: 10000 client connections per node
	MaxSubscriptions     int   // limits.max_subscriptions: 1000 per connection
	MaxTransactionFrames int   // limits.max_transaction_frames: 10000 frames held by open transactions, per connection
	TopicBuffer          int   // limits.topic_buffer: 10000 messages per topic subscriber before drops
	MaxUnacked           int   // limits.max_unacked: 10000 delivered-but-unacknowledged messages per subscription; prefetch-count above it is clamped
	MaxUnackedBytes      int   // limits.max_unacked_bytes: 64 MiB of message bodies delivered and unacknowledged (or unwritten) per subscription
	MaxOutgoingBytes     int   // limits.max_outgoing_bytes: 4 MiB of frames queued to one connection
	MaxTransactionBytes  int64 // limits.max_transaction_bytes: 64 MiB of frames held by open transactions, per connection
	MaxConnectionsPerIP  int   // limits.max_connections_per_ip: 1000 client connections from one remote address
}

// Queue is queue delivery.
type Queue struct {
	MaxRedeliveries   int           // queue.max_redeliveries: 5 (>= 0); 0 means never dead-letter
	DLQPrefix         string        // queue.dlq_prefix: "/queue/DLQ."; starts with "/queue/" and is longer than it
	MaxLength         int64         // queue.max_length: 0 (>= 0), messages per queue; 0 is unlimited
	MaxBytes          int64         // queue.max_bytes: 0 (>= 0), bytes of message bodies per queue; 0 is unlimited
	Overflow          string        // queue.overflow: reject-publish or drop-head; "reject-publish", what a SEND to a full queue does
	IdleDeleteAfter   time.Duration // queue.idle_delete_after: 1h (>= 0); an empty queue without subscribers is removed after this; 0 never
	ReadAheadMessages int           // queue.read_ahead_messages: 1000 (> 0), messages of a queue's on-disk backlog held in memory
	ReadAheadBytes    int           // queue.read_ahead_bytes: 4 MiB (> 0), bytes of a queue's on-disk backlog held in memory
}

// Cluster is membership and replication between nodes.
type Cluster struct {
	GossipAddr           string        // cluster.gossip_addr: ""; "" runs a single node without gossip
	PeerAddr             string        // cluster.peer_addr: "", the listen address for peer links
	Join                 []string      // cluster.join: none; host:port of nodes to join, DNS names allowed
	ActiveMembers        int           // cluster.active_members: 3 (>= 1), the wanted number M of active members
	Name                 string        // cluster.name: "brokerd", the name of the cluster this node belongs to
	SecretKeyFile        string        // cluster.secret_key_file: "", the file holding the cluster's shared key; "" for none
	PromotionDelay       time.Duration // cluster.promotion_delay: 500ms (>= 0), before an observer fills a dead member's place
	ForgetAfter          time.Duration // cluster.forget_after: 24h (> 0); a member dead this long is forgotten and no longer re-dialled
	AllowPlaintextGossip bool          // cluster.allow_plaintext_gossip: false; must be true to gossip beyond loopback without cluster.secret_key_file
	TLS                  ClusterTLS    // cluster.tls.*: mutual TLS on peer links
}

// ClusterTLS is mutual TLS on peer links: each node presents CertFile and
// accepts only peers whose certificate CAFile signed. All three or none.
type ClusterTLS struct {
	CertFile string // cluster.tls.cert_file: ""
	KeyFile  string // cluster.tls.key_file: ""
	CAFile   string // cluster.tls.ca_file: ""
}

// Replica is how many copies of each queued message the cluster keeps. A
// single node (cluster.gossip_addr "") keeps one and ignores both keys beyond
// validating them.
type Replica struct {
	Factor      int // replica.factor: 2 (>= 1, <= cluster.active_members with gossip), the copies R of every queued message; capped at run time by the number of active members
	WriteQuorum int // replica.write_quorum: 0 (0..replica.factor), the copies W durable before a RECEIPT; 0 means a majority of R (R/2+1); see Config.WriteQuorum
	// replica.tombstone_ttl: 5m (>= 1s); an acknowledged (or expired,
	// dead-lettered, dropped) message is remembered as removed for at least
	// this long and at most twice it, so that a copy of it that missed the
	// removal (a replica that was down or on the other side of a partition)
	// is not delivered again. A copy that comes back later is delivered
	// again, marked redelivered.
	TombstoneTTL time.Duration
}

// WriteQuorum returns the effective replica.write_quorum W: the key's value
// when it is 1..replica.factor, otherwise (0) a majority of replica.factor,
// R/2+1.
func (c Config) WriteQuorum() int {
	if w := c.Replica.WriteQuorum; w >= 1 && w <= c.Replica.Factor {
		return w
	}
	return c.Replica.Factor/2 + 1
}

// Default returns the configuration used where nothing overrides it. Every
// field is set; Default().Validate() is nil. Each call returns a new value, so
// the caller may modify it.
func Default() Config {
	return Config{
		Node: Node{
			Name:    defaultNodeName(),
			DataDir: "./data",
		},
		STOMP: STOMP{
			Addr:             "127.0.0.1:61613",
			HeartbeatSend:    10 * time.Second,
			HeartbeatReceive: 10 * time.Second,
			ConnectTimeout:   10 * time.Second,
			WriteTimeout:     60 * time.Second,
			HeartbeatMin:     time.Second,
			TLS:              STOMPTLS{ClientAuth: "none"},
		},
		Admin: Admin{
			Addr: "127.0.0.1:8613",
		},
		Log: Log{
			Level:  "info",
			Format: "text",
		},
		Store: Store{
			Sync:          "always",
			SyncInterval:  100 * time.Millisecond,
			MaxBatch:      4096,
			ApplyInterval: 10 * time.Millisecond,
			WALSize:       64 << 20,
			MinFreeBytes:  256 << 20,
			Recover:       "refuse",
		},
		Auth: Auth{
			UsersFile:      "",
			AllowAnonymous: false,
		},
		Limits: Limits{
			MaxFrameSize:         8<<20 + 64<<10,
			MaxHeaderCount:       128,
			MaxHeaderLength:      8192,
			MaxBodySize:          8 << 20,
			MaxConnections:       10000,
			MaxSubscriptions:     1000,
			MaxTransactionFrames: 10000,
			TopicBuffer:          10000,
			MaxUnacked:           10000,
			MaxUnackedBytes:      64 << 20,
			MaxOutgoingBytes:     4 << 20,
			MaxTransactionBytes:  64 << 20,
			MaxConnectionsPerIP:  1000,
		},
		Queue: Queue{
			MaxRedeliveries:   5,
			DLQPrefix:         "/queue/DLQ.",
			MaxLength:         0,
			MaxBytes:          0,
			Overflow:          "reject-publish",
			IdleDeleteAfter:   time.Hour,
			ReadAheadMessages: 1000,
			ReadAheadBytes:    4 << 20,
		},
		Cluster: Cluster{
			GossipAddr:     "",
			PeerAddr:       "",
			Join:           nil,
			ActiveMembers:  3,
			Name:           "brokerd",
			SecretKeyFile:  "",
			PromotionDelay: 500 * time.Millisecond,
			ForgetAfter:    24 * time.Hour,
		},
		Replica: Replica{
			Factor:       2,
			WriteQuorum:  0,
			TombstoneTTL: 5 * time.Minute,
		},
	}
}

// defaultNodeName is the host name, or "brokerd" when there is none or it
// would not be a valid node.name.
func defaultNodeName() string {
	h, err := os.Hostname()
	if err != nil || h == "" || strings.ContainsFunc(h, unicode.IsSpace) {
		return "brokerd"
	}
	return h
}
