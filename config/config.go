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
}

// Node identifies this process and where it keeps its data.
type Node struct {
	Name    string // node.name: the host name (os.Hostname), or "brokerd" without one; no whitespace
	DataDir string // node.data_dir: "./data"
}

// STOMP is the client-facing listener.
type STOMP struct {
	Addr             string        // stomp.addr: "127.0.0.1:61613"; port 0 picks a free port
	HeartbeatSend    time.Duration // stomp.heartbeat_send: 10s, what the server offers to send; 0 disables
	HeartbeatReceive time.Duration // stomp.heartbeat_receive: 10s, what the server wants to receive; 0 disables
	ConnectTimeout   time.Duration // stomp.connect_timeout: 10s (> 0), from accept to CONNECT
	WriteTimeout     time.Duration // stomp.write_timeout: 60s (> 0), for one write to a client
}

// Admin is the HTTP server for health and metrics.
type Admin struct {
	Addr string // admin.addr: "127.0.0.1:8613"; "" disables the admin server
}

// Log selects the slog handler.
type Log struct {
	Level  string // log.level: debug, info, warn or error; "info"
	Format string // log.format: text or json; "text"
}

// Store is the node's bbolt file.
type Store struct {
	Sync         string        // store.sync: always, batch or none; "always"
	SyncInterval time.Duration // store.sync_interval: 100ms (> 0), how long batch waits to group commits
	MaxBatch     int           // store.max_batch: 4096 (> 0), operations per group commit
}

// Auth is client authentication.
type Auth struct {
	UsersFile      string // auth.users_file: ""; "" means no login is required
	AllowAnonymous bool   // auth.allow_anonymous: false; must be true to listen beyond loopback without a users file
}

// Limits bound what one client can make the broker hold. All are > 0.
type Limits struct {
	MaxFrameSize         int // limits.max_frame_size: 8 MiB + 64 KiB, a whole frame in bytes
	MaxHeaderCount       int // limits.max_header_count: 128 headers per frame
	MaxHeaderLength      int // limits.max_header_length: 8192 bytes, one header line
	MaxBodySize          int // limits.max_body_size: 8 MiB, one frame body in bytes
	MaxConnections       int // limits.max_connections: 10000 client connections per node
	MaxSubscriptions     int // limits.max_subscriptions: 1000 per connection
	MaxTransactionFrames int // limits.max_transaction_frames: 10000 frames held by open transactions, per connection
	TopicBuffer          int // limits.topic_buffer: 10000 messages per topic subscriber before drops
}

// Queue is queue delivery.
type Queue struct {
	MaxRedeliveries int    // queue.max_redeliveries: 5 (>= 0); 0 means never dead-letter
	DLQPrefix       string // queue.dlq_prefix: "/queue/DLQ."; starts with "/queue/" and is longer than it
}

// Cluster is membership and replication between nodes.
type Cluster struct {
	GossipAddr     string        // cluster.gossip_addr: ""; "" runs a single node without gossip
	PeerAddr       string        // cluster.peer_addr: "", the listen address for peer links
	Join           []string      // cluster.join: none; host:port of nodes to join, DNS names allowed
	ActiveMembers  int           // cluster.active_members: 3 (>= 1), the wanted number M of active members
	Name           string        // cluster.name: "brokerd", the name of the cluster this node belongs to
	SecretKeyFile  string        // cluster.secret_key_file: "", the file holding the cluster's shared key; "" for none
	PromotionDelay time.Duration // cluster.promotion_delay: 500ms (>= 0), before an observer fills a dead member's place
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
		},
		Admin: Admin{
			Addr: "127.0.0.1:8613",
		},
		Log: Log{
			Level:  "info",
			Format: "text",
		},
		Store: Store{
			Sync:         "always",
			SyncInterval: 100 * time.Millisecond,
			MaxBatch:     4096,
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
		},
		Queue: Queue{
			MaxRedeliveries: 5,
			DLQPrefix:       "/queue/DLQ.",
		},
		Cluster: Cluster{
			GossipAddr:     "",
			PeerAddr:       "",
			Join:           nil,
			ActiveMembers:  3,
			Name:           "brokerd",
			SecretKeyFile:  "",
			PromotionDelay: 500 * time.Millisecond,
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
