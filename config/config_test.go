package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// load runs Load the way main does: flags registered and parsed from args,
// with file (if not "") written to brokerd.yaml in a temporary directory and
// named by --config.
func load(t *testing.T, file string, env []string, args ...string) (Config, error) {
	t.Helper()
	fset := pflag.NewFlagSet("brokerd", pflag.ContinueOnError)
	RegisterFlags(fset)
	if file != "" {
		args = append([]string{"--config", writeFile(t, file)}, args...)
	}
	if err := fset.Parse(args); err != nil {
		t.Fatalf("parse %q: %v", args, err)
	}
	return Load(fset, env)
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "brokerd.yaml")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// keyErrors returns every *KeyError in err's tree.
func keyErrors(err error) []*KeyError {
	var found []*KeyError
	var walk func(error)
	walk = func(err error) {
		if ke, ok := err.(*KeyError); ok {
			found = append(found, ke)
		}
		switch u := err.(type) {
		case interface{ Unwrap() error }:
			if e := u.Unwrap(); e != nil {
				walk(e)
			}
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				walk(e)
			}
		}
	}
	if err != nil {
		walk(err)
	}
	return found
}

func keysOf(kes []*KeyError) []string {
	var keys []string
	for _, ke := range kes {
		keys = append(keys, ke.Key)
	}
	return keys
}

func TestDefault(t *testing.T) {
	d := Default()
	if err := d.Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v", err)
	}
	if d.Node.Name == "" {
		t.Error("Default().Node.Name is empty")
	}
	// Spot checks of values the rest of the code relies on.
	if d.STOMP.Addr != "127.0.0.1:61613" || d.Admin.Addr != "127.0.0.1:8613" ||
		d.Limits.MaxFrameSize != 8<<20+64<<10 || d.Limits.MaxBodySize != 8<<20 ||
		d.Cluster.ActiveMembers != 3 || d.Cluster.PromotionDelay != 500*time.Millisecond ||
		d.Queue.DLQPrefix != "/queue/DLQ." || d.Store.Sync != "always" ||
		d.Store.MinFreeBytes != 268435456 || d.Store.WALSize != 64<<20 || d.Store.Recover != "refuse" ||
		d.Queue.Overflow != "reject-publish" || d.Queue.IdleDeleteAfter != time.Hour ||
		d.Queue.ReadAheadMessages != 1000 || d.Queue.ReadAheadBytes != 4<<20 || d.Limits.MaxUnacked != 10000 ||
		d.STOMP.HeartbeatMin != time.Second || d.Limits.MaxOutgoingBytes != 4<<20 || d.Limits.MaxTransactionBytes != 64<<20 || d.Limits.MaxConnectionsPerIP != 1000 || d.STOMP.TLS.ClientAuth != "none" ||
		d.Cluster.ForgetAfter != 24*time.Hour || d.Cluster.AllowPlaintextGossip ||
		d.Replica.Factor != 2 || d.Replica.WriteQuorum != 0 || d.WriteQuorum() != 2 {
		t.Errorf("Default() = %+v", d)
	}

	// Every field is set, except those whose default is documented as empty.
	mayBeZero := []string{"auth.users_file", "auth.allow_anonymous", "cluster.gossip_addr",
		"cluster.peer_addr", "cluster.join", "cluster.secret_key_file", "cluster.allow_plaintext_gossip",
		"queue.max_length", "queue.max_bytes", "replica.write_quorum",
		"stomp.tls.addr", "stomp.tls.cert_file", "stomp.tls.key_file", "stomp.tls.client_ca_file",
		"admin.tls.cert_file", "admin.tls.key_file", "admin.tls.client_ca_file", "admin.token_file", "admin.metrics_public",
		"auth.x509_login", "auth.acl_file", "cluster.tls.cert_file", "cluster.tls.key_file", "cluster.tls.ca_file",
		"stomp.advertise_addr", "stomp.ws_addr", "stomp.wss_addr", "stomp.ws_allowed_origins"}
	for _, s := range settings {
		if reflect.ValueOf(s.field(&d)).Elem().IsZero() && !slices.Contains(mayBeZero, s.key) {
			t.Errorf("Default() leaves %s unset", s.key)
		}
	}

	for _, tc := range []struct {
		name string
		fset *pflag.FlagSet
	}{
		{"nil flag set", nil},
		{"no flags given", func() *pflag.FlagSet {
			fset := pflag.NewFlagSet("brokerd", pflag.ContinueOnError)
			RegisterFlags(fset)
			if err := fset.Parse(nil); err != nil {
				t.Fatal(err)
			}
			return fset
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Load(tc.fset, []string{"HOME=/root", "PATH=/bin", "BROKERDX=1"})
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, Default()) {
				t.Errorf("Load = %+v, want Default() = %+v", got, Default())
			}
		})
	}
}

// TestSettingsCoverConfig checks that the key table and Config agree: every
// leaf field has exactly one key, keys, variables and flags are unique, and
// each key's section is its struct's name.
func TestSettingsCoverConfig(t *testing.T) {
	var c Config
	fields := map[uintptr]string{} // address of each leaf field -> Section.Field
	var walk func(v reflect.Value, path string)
	walk = func(v reflect.Value, path string) {
		for i := range v.NumField() {
			f, name := v.Field(i), path+v.Type().Field(i).Name
			if f.Kind() == reflect.Struct {
				walk(f, name+".") // a subsection such as STOMP.TLS
				continue
			}
			fields[f.Addr().Pointer()] = name
		}
	}
	walk(reflect.ValueOf(&c).Elem(), "")

	keys, envs, flags := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, s := range settings {
		p := reflect.ValueOf(s.field(&c))
		name, ok := fields[p.Pointer()]
		if !ok {
			t.Errorf("%s: points to no field of Config, or to one already taken", s.key)
			continue
		}
		delete(fields, p.Pointer())
		section, _, _ := strings.Cut(s.key, ".")
		if want, _, _ := strings.Cut(name, "."); !strings.EqualFold(section, want) {
			t.Errorf("%s sets %s: key is not under its struct's section", s.key, name)
		}
		if keys[s.key] || envs[envName(s.key)] || (s.flag != "" && flags[s.flag]) {
			t.Errorf("%s: key, variable or flag used twice", s.key)
		}
		keys[s.key], envs[envName(s.key)] = true, true
		if s.flag != "" {
			flags[s.flag] = true
		}
	}
	for _, name := range fields {
		t.Errorf("Config.%s has no key", name)
	}
}

func TestEnvName(t *testing.T) {
	for key, want := range map[string]string{
		"stomp.addr":             "BROKERD_STOMP_ADDR",
		"limits.max_body_size":   "BROKERD_LIMITS_MAX_BODY_SIZE",
		"cluster.active_members": "BROKERD_CLUSTER_ACTIVE_MEMBERS",
	} {
		if got := envName(key); got != want {
			t.Errorf("envName(%q) = %q, want %q", key, got, want)
		}
	}
}

func TestFlags(t *testing.T) {
	fset := pflag.NewFlagSet("brokerd", pflag.ContinueOnError)
	RegisterFlags(fset)
	d := Default()
	want := map[string]struct{ key, def string }{
		"node-name":       {"node.name", d.Node.Name},
		"data-dir":        {"node.data_dir", "./data"},
		"stomp-addr":      {"stomp.addr", "127.0.0.1:61613"},
		"admin-addr":      {"admin.addr", "127.0.0.1:8613"},
		"log-level":       {"log.level", "info"},
		"log-format":      {"log.format", "text"},
		"store-sync":      {"store.sync", "always"},
		"users-file":      {"auth.users_file", ""},
		"allow-anonymous": {"auth.allow_anonymous", "false"},
		"gossip-addr":     {"cluster.gossip_addr", ""},
		"peer-addr":       {"cluster.peer_addr", ""},
		"join":            {"cluster.join", "[]"},
		"active-members":  {"cluster.active_members", "3"},
		"cluster-name":    {"cluster.name", "brokerd"},

		"allow-plaintext-gossip": {"cluster.allow_plaintext_gossip", "false"},
		"replication-factor":     {"replica.factor", "2"},
		"write-quorum":           {"replica.write_quorum", "0"},
		"stomp-tls-addr":         {"stomp.tls.addr", ""},
		"stomp-advertise-addr":   {"stomp.advertise_addr", ""},
		"stomp-ws-addr":          {"stomp.ws_addr", ""},
		"stomp-wss-addr":         {"stomp.wss_addr", ""},
		"admin-token-file":       {"admin.token_file", ""},
		"acl-file":               {"auth.acl_file", ""},
	}
	var got []string
	fset.VisitAll(func(f *pflag.Flag) { got = append(got, f.Name) })
	wantNames := []string{"config"}
	for name := range want {
		wantNames = append(wantNames, name)
	}
	slices.Sort(got)
	slices.Sort(wantNames)
	if !slices.Equal(got, wantNames) {
		t.Fatalf("flags = %q, want %q", got, wantNames)
	}
	for name, w := range want {
		f := fset.Lookup(name)
		if !strings.HasSuffix(f.Usage, "("+w.key+")") {
			t.Errorf("--%s usage %q does not name %s", name, f.Usage, w.key)
		}
		if f.DefValue != w.def {
			t.Errorf("--%s default %q, want %q", name, f.DefValue, w.def)
		}
	}
}

// TestPrecedence checks each step of defaults < file < env < flags.
func TestPrecedence(t *testing.T) {
	const (
		fileAll = `
stomp:
  addr: "127.0.0.1:1001"
  heartbeat_send: 250ms
limits:
  max_body_size: 1001
cluster:
  active_members: 11
auth:
  allow_anonymous: true
`
	)
	envAll := []string{
		"BROKERD_STOMP_ADDR=127.0.0.1:2002",
		"BROKERD_STOMP_HEARTBEAT_SEND=2s",
		"BROKERD_LIMITS_MAX_BODY_SIZE=2002",
		"BROKERD_CLUSTER_ACTIVE_MEMBERS=22",
		"BROKERD_AUTH_ALLOW_ANONYMOUS=false",
	}
	flagsAll := []string{"--stomp-addr=127.0.0.1:3003", "--active-members=33", "--allow-anonymous"}

	type view struct {
		addr      string
		heartbeat time.Duration
		body      int
		members   int
		anonymous bool
	}
	viewOf := func(c Config) view {
		return view{c.STOMP.Addr, c.STOMP.HeartbeatSend, c.Limits.MaxBodySize, c.Cluster.ActiveMembers, c.Auth.AllowAnonymous}
	}
	d := viewOf(Default())

	for _, tc := range []struct {
		name string
		file string
		env  []string
		args []string
		want view
	}{
		{"defaults", "", nil, nil, d},
		{"file overrides defaults", fileAll, nil, nil,
			view{"127.0.0.1:1001", 250 * time.Millisecond, 1001, 11, true}},
		{"file sets only some keys", "stomp:\n  heartbeat_send: 0s\n", nil, nil,
			view{d.addr, 0, d.body, d.members, d.anonymous}},
		{"env overrides defaults", "", envAll, nil,
			view{"127.0.0.1:2002", 2 * time.Second, 2002, 22, false}},
		{"env overrides file", fileAll, envAll, nil,
			view{"127.0.0.1:2002", 2 * time.Second, 2002, 22, false}},
		{"env overrides file, key by key", fileAll, []string{"BROKERD_STOMP_HEARTBEAT_SEND=0"}, nil,
			view{"127.0.0.1:1001", 0, 1001, 11, true}},
		{"flags override defaults", "", nil, flagsAll,
			view{"127.0.0.1:3003", d.heartbeat, d.body, 33, true}},
		{"flags override env", fileAll, envAll, flagsAll,
			view{"127.0.0.1:3003", 2 * time.Second, 2002, 33, true}},
		{"flags override file", fileAll, nil, []string{"--stomp-addr=127.0.0.1:3003", "--active-members=33", "--allow-anonymous=false"},
			view{"127.0.0.1:3003", 250 * time.Millisecond, 1001, 33, false}},
		{"unset flags leave env alone", fileAll, envAll, []string{"--log-level=debug"},
			view{"127.0.0.1:2002", 2 * time.Second, 2002, 22, false}},
		{"a flag set to its default still overrides", fileAll, envAll, []string{"--active-members=3"},
			view{"127.0.0.1:2002", 2 * time.Second, 2002, 3, false}},
		{"first of duplicate env entries wins", "", []string{"BROKERD_CLUSTER_ACTIVE_MEMBERS=4", "BROKERD_CLUSTER_ACTIVE_MEMBERS=5"}, nil,
			view{d.addr, d.heartbeat, d.body, 4, d.anonymous}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := load(t, tc.file, tc.env, tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if got := viewOf(c); got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestEveryKeyFromEveryLayer sets every key to a non-default value, once
// through the file and once through the environment.
func TestEveryKeyFromEveryLayer(t *testing.T) {
	want := Config{
		Node: Node{Name: "n1", DataDir: "/var/lib/brokerd"},
		STOMP: STOMP{Addr: "127.0.0.1:0", HeartbeatSend: time.Second, HeartbeatReceive: 2 * time.Second,
			ConnectTimeout: 3 * time.Second, WriteTimeout: 4 * time.Second, HeartbeatMin: 5 * time.Millisecond,
			TLS:           STOMPTLS{Addr: "127.0.0.1:1", CertFile: "/etc/brokerd/stomp.crt", KeyFile: "/etc/brokerd/stomp.key", ClientCAFile: "/etc/brokerd/clients.crt", ClientAuth: "require"},
			AdvertiseAddr: "broker-1.example:61613", WSAddr: "127.0.0.1:15674", WSSAddr: "127.0.0.1:15673",
			WSAllowedOrigins: []string{"app.example.com", "*.example.org:8443"}},
		Admin: Admin{Addr: "", TLS: AdminTLS{CertFile: "/etc/brokerd/admin.crt", KeyFile: "/etc/brokerd/admin.key", ClientCAFile: "/etc/brokerd/ops.crt"},
			TokenFile: "/etc/brokerd/token", MetricsPublic: true},
		Log: Log{Level: "debug", Format: "json"},
		Store: Store{Sync: "batch", SyncInterval: 5 * time.Millisecond, MaxBatch: 6,
			ApplyInterval: 7 * time.Millisecond, WALSize: 1 << 20, MinFreeBytes: 0, Recover: "truncate"},
		Auth: Auth{UsersFile: "/etc/brokerd/users", AllowAnonymous: true, X509Login: true, ACLFile: "/etc/brokerd/acl"},
		Limits: Limits{MaxFrameSize: 7, MaxHeaderCount: 8, MaxHeaderLength: 9, MaxBodySize: 10, MaxConnections: 11, MaxSubscriptions: 12, MaxTransactionFrames: 13, TopicBuffer: 14,
			MaxUnacked: 15, MaxUnackedBytes: 2 << 20, MaxOutgoingBytes: 16 << 10, MaxTransactionBytes: 17e6, MaxConnectionsPerIP: 24},
		Queue: Queue{MaxRedeliveries: 0, DLQPrefix: "/queue/dead.", MaxLength: 18, MaxBytes: 19 << 30, Overflow: "drop-head",
			IdleDeleteAfter: 20 * time.Minute, ReadAheadMessages: 21, ReadAheadBytes: 22},
		Cluster: Cluster{GossipAddr: "0.0.0.0:7946", PeerAddr: ":7947", Join: []string{"a.example:7946", "[::1]:7946"},
			ActiveMembers: 5, Name: "prod", SecretKeyFile: "/etc/brokerd/key", PromotionDelay: 0,
			ForgetAfter: 23 * time.Hour, AllowPlaintextGossip: true,
			TLS: ClusterTLS{CertFile: "/etc/brokerd/node.crt", KeyFile: "/etc/brokerd/node.key", CAFile: "/etc/brokerd/ca.crt"}},
		Replica: Replica{Factor: 4, WriteQuorum: 1, TombstoneTTL: 90 * time.Second},
	}
	file := `
node: {name: n1, data_dir: /var/lib/brokerd}
stomp: {addr: "127.0.0.1:0", heartbeat_send: 1s, heartbeat_receive: 2s, connect_timeout: 3s, write_timeout: 4s, heartbeat_min: 5ms,
  tls: {addr: "127.0.0.1:1", cert_file: /etc/brokerd/stomp.crt, key_file: /etc/brokerd/stomp.key, client_ca_file: /etc/brokerd/clients.crt, client_auth: require},
  advertise_addr: "broker-1.example:61613", ws_addr: "127.0.0.1:15674", wss_addr: "127.0.0.1:15673", ws_allowed_origins: [app.example.com, "*.example.org:8443"]}
admin: {addr: , tls: {cert_file: /etc/brokerd/admin.crt, key_file: /etc/brokerd/admin.key, client_ca_file: /etc/brokerd/ops.crt}, token_file: /etc/brokerd/token, metrics_public: true}
log: {level: debug, format: json}
store: {sync: batch, sync_interval: 5ms, max_batch: 6, apply_interval: 7ms, wal_size: 1MiB, min_free_bytes: 0, recover: truncate}
auth: {users_file: /etc/brokerd/users, allow_anonymous: true, x509_login: true, acl_file: /etc/brokerd/acl}
limits: {max_frame_size: 7, max_header_count: 8, max_header_length: 9, max_body_size: 10, max_connections: 11, max_subscriptions: 12, max_transaction_frames: 13, topic_buffer: 14,
  max_unacked: 15, max_unacked_bytes: 2MiB, max_outgoing_bytes: 16KiB, max_transaction_bytes: 17MB, max_connections_per_ip: 24}
queue: {max_redeliveries: 0, dlq_prefix: /queue/dead., max_length: 18, max_bytes: 19 GiB, overflow: drop-head,
  idle_delete_after: 20m, read_ahead_messages: 21, read_ahead_bytes: 22}
cluster:
  gossip_addr: "0.0.0.0:7946"
  peer_addr: ":7947"
  join: ["a.example:7946", "[::1]:7946"]
  active_members: 5
  name: prod
  secret_key_file: /etc/brokerd/key
  promotion_delay: 0
  forget_after: 23h
  allow_plaintext_gossip: true
  tls: {cert_file: /etc/brokerd/node.crt, key_file: /etc/brokerd/node.key, ca_file: /etc/brokerd/ca.crt}
replica: {factor: 4, write_quorum: 1, tombstone_ttl: 90s}
`
	env := []string{
		"BROKERD_NODE_NAME=n1", "BROKERD_NODE_DATA_DIR=/var/lib/brokerd",
		"BROKERD_STOMP_ADDR=127.0.0.1:0", "BROKERD_STOMP_HEARTBEAT_SEND=1s", "BROKERD_STOMP_HEARTBEAT_RECEIVE=2s",
		"BROKERD_STOMP_CONNECT_TIMEOUT=3s", "BROKERD_STOMP_WRITE_TIMEOUT=4s", "BROKERD_STOMP_HEARTBEAT_MIN=5ms",
		"BROKERD_STOMP_TLS_ADDR=127.0.0.1:1", "BROKERD_STOMP_TLS_CERT_FILE=/etc/brokerd/stomp.crt", "BROKERD_STOMP_TLS_KEY_FILE=/etc/brokerd/stomp.key",
		"BROKERD_STOMP_TLS_CLIENT_CA_FILE=/etc/brokerd/clients.crt", "BROKERD_STOMP_TLS_CLIENT_AUTH=require",
		"BROKERD_STOMP_ADVERTISE_ADDR=broker-1.example:61613", "BROKERD_STOMP_WS_ADDR=127.0.0.1:15674", "BROKERD_STOMP_WSS_ADDR=127.0.0.1:15673",
		"BROKERD_STOMP_WS_ALLOWED_ORIGINS=app.example.com, *.example.org:8443",
		"BROKERD_ADMIN_ADDR=", "BROKERD_ADMIN_TLS_CERT_FILE=/etc/brokerd/admin.crt", "BROKERD_ADMIN_TLS_KEY_FILE=/etc/brokerd/admin.key",
		"BROKERD_ADMIN_TLS_CLIENT_CA_FILE=/etc/brokerd/ops.crt", "BROKERD_ADMIN_TOKEN_FILE=/etc/brokerd/token", "BROKERD_ADMIN_METRICS_PUBLIC=true",
		"BROKERD_LOG_LEVEL=debug", "BROKERD_LOG_FORMAT=json",
		"BROKERD_STORE_SYNC=batch", "BROKERD_STORE_SYNC_INTERVAL=5ms", "BROKERD_STORE_MAX_BATCH=6",
		"BROKERD_STORE_APPLY_INTERVAL=7ms", "BROKERD_STORE_WAL_SIZE=1048576", "BROKERD_STORE_MIN_FREE_BYTES=0", "BROKERD_STORE_RECOVER=truncate",
		"BROKERD_AUTH_USERS_FILE=/etc/brokerd/users", "BROKERD_AUTH_ALLOW_ANONYMOUS=true", "BROKERD_AUTH_X509_LOGIN=true", "BROKERD_AUTH_ACL_FILE=/etc/brokerd/acl",
		"BROKERD_LIMITS_MAX_FRAME_SIZE=7", "BROKERD_LIMITS_MAX_HEADER_COUNT=8", "BROKERD_LIMITS_MAX_HEADER_LENGTH=9",
		"BROKERD_LIMITS_MAX_BODY_SIZE=10", "BROKERD_LIMITS_MAX_CONNECTIONS=11", "BROKERD_LIMITS_MAX_SUBSCRIPTIONS=12",
		"BROKERD_LIMITS_MAX_TRANSACTION_FRAMES=13", "BROKERD_LIMITS_TOPIC_BUFFER=14",
		"BROKERD_LIMITS_MAX_UNACKED=15", "BROKERD_LIMITS_MAX_UNACKED_BYTES=2MiB", "BROKERD_LIMITS_MAX_OUTGOING_BYTES=16KiB", "BROKERD_LIMITS_MAX_TRANSACTION_BYTES=17000000", "BROKERD_LIMITS_MAX_CONNECTIONS_PER_IP=24",
		"BROKERD_QUEUE_MAX_REDELIVERIES=0", "BROKERD_QUEUE_DLQ_PREFIX=/queue/dead.",
		"BROKERD_QUEUE_MAX_LENGTH=18", "BROKERD_QUEUE_MAX_BYTES=19GiB", "BROKERD_QUEUE_OVERFLOW=drop-head",
		"BROKERD_QUEUE_IDLE_DELETE_AFTER=20m", "BROKERD_QUEUE_READ_AHEAD_MESSAGES=21", "BROKERD_QUEUE_READ_AHEAD_BYTES=22B",
		"BROKERD_CLUSTER_GOSSIP_ADDR=0.0.0.0:7946", "BROKERD_CLUSTER_PEER_ADDR=:7947",
		"BROKERD_CLUSTER_JOIN=a.example:7946, [::1]:7946", "BROKERD_CLUSTER_ACTIVE_MEMBERS=5",
		"BROKERD_CLUSTER_NAME=prod", "BROKERD_CLUSTER_SECRET_KEY_FILE=/etc/brokerd/key",
		"BROKERD_CLUSTER_PROMOTION_DELAY=0s", "BROKERD_CLUSTER_FORGET_AFTER=23h", "BROKERD_CLUSTER_ALLOW_PLAINTEXT_GOSSIP=true",
		"BROKERD_CLUSTER_TLS_CERT_FILE=/etc/brokerd/node.crt", "BROKERD_CLUSTER_TLS_KEY_FILE=/etc/brokerd/node.key", "BROKERD_CLUSTER_TLS_CA_FILE=/etc/brokerd/ca.crt",
		"BROKERD_REPLICA_FACTOR=4", "BROKERD_REPLICA_WRITE_QUORUM=1", "BROKERD_REPLICA_TOMBSTONE_TTL=90s",
	}
	if len(env) != len(settings) {
		t.Fatalf("env sets %d keys, there are %d", len(env), len(settings))
	}
	for _, tc := range []struct {
		name string
		file string
		env  []string
	}{
		{"file", file, nil},
		{"env", "", env},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := load(t, tc.file, tc.env)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got  %+v\nwant %+v", got, want)
			}
		})
	}
}

func TestJoin(t *testing.T) {
	gossip := []string{"--gossip-addr=127.0.0.1:7946"}
	for _, tc := range []struct {
		name string
		file string
		env  []string
		args []string
		want []string
	}{
		{"default", "", nil, nil, nil},
		{"flag, comma-separated", "", nil, []string{"--join=a:1,b:2"}, []string{"a:1", "b:2"}},
		{"flag, repeated", "", nil, []string{"--join", "a:1", "--join", "b:2,c:3"}, []string{"a:1", "b:2", "c:3"}},
		{"env, comma-separated with spaces", "", []string{"BROKERD_CLUSTER_JOIN= a:1 , b:2,"}, nil, []string{"a:1", "b:2"}},
		{"env empty", "cluster: {join: [a:1]}", []string{"BROKERD_CLUSTER_JOIN="}, nil, nil},
		{"file list", "cluster:\n  join:\n    - a:1\n    - dns.example:2\n", nil, nil, []string{"a:1", "dns.example:2"}},
		{"file string", "cluster: {join: \"a:1,b:2\"}", nil, nil, []string{"a:1", "b:2"}},
		{"flag replaces env", "", []string{"BROKERD_CLUSTER_JOIN=a:1,b:2"}, []string{"--join=c:3"}, []string{"c:3"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := load(t, tc.file, tc.env, append(tc.args, gossip...)...)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(c.Cluster.Join, tc.want) {
				t.Errorf("Join = %q, want %q", c.Cluster.Join, tc.want)
			}
		})
	}
}

func TestFileOddities(t *testing.T) {
	for _, tc := range []struct {
		name  string
		file  string
		check func(Config) bool
	}{
		{"empty file", "", nil},
		{"comments only", "# nothing\n", nil},
		{"empty section", "cluster:\nstomp: {}\n", nil},
		{"key with no value is empty", "admin:\n  addr:\n", func(c Config) bool { return c.Admin.Addr == "" }},
		{"keys are case-insensitive, as in viper", "STOMP:\n  Addr: 127.0.0.1:5\n", func(c Config) bool { return c.STOMP.Addr == "127.0.0.1:5" }},
		{"integral float", "limits: {max_connections: 1e3}", func(c Config) bool { return c.Limits.MaxConnections == 1000 }},
		{"quoted int", `limits: {max_connections: "12"}`, func(c Config) bool { return c.Limits.MaxConnections == 12 }},
		{"bare 0 duration", "stomp: {heartbeat_receive: 0}", func(c Config) bool { return c.STOMP.HeartbeatReceive == 0 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// load writes no file for "", so name one explicitly.
			c, err := load(t, "", nil, "--config", writeFile(t, tc.file))
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil && !tc.check(c) {
				t.Errorf("got %+v", c)
			}
		})
	}
}

// TestLoadErrors checks that each way of getting the input wrong is refused
// with an error that names the file, variable or key at fault.
func TestLoadErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		file    string
		env     []string
		args    []string
		is      error    // errors.Is(err, is) when not nil
		keys    []string // the keys of the *KeyErrors in err, when not nil
		message []string // substrings of err.Error()
	}{
		{name: "unknown file key", file: "stomp:\n  adr: 127.0.0.1:1\n", is: ErrUnknownKey,
			message: []string{`brokerd.yaml: unknown key "stomp.adr" (did you mean "stomp.addr"?)`}},
		{name: "unknown file section", file: "stmop: {addr: x}\n", is: ErrUnknownKey,
			message: []string{`brokerd.yaml: unknown key "stmop.addr"`}},
		{name: "unknown key nested under a key", file: "stomp: {addr: {port: 1}}\n", is: ErrUnknownKey,
			message: []string{`unknown key "stomp.addr.port"`}},
		{name: "section given a value", file: "stomp: 5\n",
			message: []string{`brokerd.yaml: stomp: must hold keys`}},
		{name: "int of the wrong type", file: "limits:\n  max_connections: lots\n", keys: []string{"limits.max_connections"},
			message: []string{`brokerd.yaml: limits.max_connections: "lots" is not an integer`}},
		{name: "size of the wrong type", file: "limits:\n  max_body_size: lots\n", keys: []string{"limits.max_body_size"},
			message: []string{`brokerd.yaml: limits.max_body_size: "lots" is not a size in bytes, like 4096 or "256MiB"`}},
		{name: "size with an unknown unit", file: "store: {min_free_bytes: 256mb}", keys: []string{"store.min_free_bytes"},
			message: []string{`store.min_free_bytes: "256mb" is not a size in bytes`, "MiB"}},
		{name: "size with a fraction", file: "queue: {max_bytes: 1.5GiB}", keys: []string{"queue.max_bytes"}},
		{name: "size too large", file: "queue: {max_bytes: 9000000TiB}", keys: []string{"queue.max_bytes"},
			message: []string{`"9000000TiB" is too large`}},
		{name: "int64 of the wrong type", file: "queue: {max_length: many}", keys: []string{"queue.max_length"},
			message: []string{`queue.max_length: "many" is not an integer`}},
		{name: "message count with a unit", file: "queue: {max_length: 1MiB}", keys: []string{"queue.max_length"}},
		{name: "unknown overflow", file: "queue: {overflow: drop-tail}", keys: []string{"queue.overflow"},
			message: []string{`queue.overflow: "drop-tail" is not one of reject-publish, drop-head`}},
		{name: "int with a fraction", file: "limits: {topic_buffer: 1.5}", keys: []string{"limits.topic_buffer"}},
		{name: "duration without unit", file: "stomp: {write_timeout: 10}", keys: []string{"stomp.write_timeout"},
			message: []string{"stomp.write_timeout: 10 is not a duration"}},
		{name: "bool of the wrong type", file: "auth: {allow_anonymous: maybe}", keys: []string{"auth.allow_anonymous"}},
		{name: "string given a number", file: "node: {name: 007}", keys: []string{"node.name"}},
		{name: "string given a list", file: "stomp: {addr: [a, b]}", keys: []string{"stomp.addr"}},
		{name: "join entry not a string", file: "cluster: {join: [1]}", keys: []string{"cluster.join"}},
		{name: "join not a list", file: "cluster: {join: {a: 1}}", is: ErrUnknownKey},
		{name: "every bad key reported", file: "limits: {max_body_size: x, max_frame_size: y}\nfoo: 1\n",
			keys: []string{"limits.max_body_size", "limits.max_frame_size"}, is: ErrUnknownKey},
		{name: "malformed yaml", file: "stomp: [\n", message: []string{"brokerd.yaml"}},
		{name: "missing config file", args: []string{"--config", "/nonexistent/brokerd.yaml"}, is: fs.ErrNotExist,
			message: []string{"/nonexistent/brokerd.yaml"}},
		{name: "config file is a directory", args: []string{"--config", os.TempDir()}, message: []string{os.TempDir()}},

		{name: "unknown env var", env: []string{"BROKERD_STOMP_ADR=127.0.0.1:1"}, is: ErrUnknownKey,
			message: []string{"BROKERD_STOMP_ADR", `did you mean "BROKERD_STOMP_ADDR"`}},
		{name: "unknown env var, nothing close", env: []string{"BROKERD_CONFIG=x.yaml"}, is: ErrUnknownKey,
			message: []string{"environment variable BROKERD_CONFIG: unknown key"}},
		{name: "bad env int", env: []string{"BROKERD_LIMITS_MAX_CONNECTIONS=8M"}, keys: []string{"limits.max_connections"},
			message: []string{"BROKERD_LIMITS_MAX_CONNECTIONS", `"8M" is not an integer`}},
		{name: "bad env size", env: []string{"BROKERD_LIMITS_MAX_BODY_SIZE=8M"}, keys: []string{"limits.max_body_size"},
			message: []string{"BROKERD_LIMITS_MAX_BODY_SIZE", `"8M" is not a size in bytes`}},
		{name: "bad env store.recover", env: []string{"BROKERD_STORE_RECOVER=ignore"}, keys: []string{"store.recover"},
			message: []string{`config: store.recover: "ignore" is not one of refuse, truncate (set by BROKERD_STORE_RECOVER)`}},
		{name: "bad env duration", env: []string{"BROKERD_STOMP_HEARTBEAT_SEND=fast"}, keys: []string{"stomp.heartbeat_send"}},
		{name: "bad env bool", env: []string{"BROKERD_AUTH_ALLOW_ANONYMOUS=yes"}, keys: []string{"auth.allow_anonymous"}},
		{name: "hex env int refused", env: []string{"BROKERD_STORE_MAX_BATCH=0x10"}, keys: []string{"store.max_batch"}},

		{name: "invalid value from env", env: []string{"BROKERD_STOMP_ADDR=61613"}, keys: []string{"stomp.addr"},
			message: []string{`config: stomp.addr: "61613" is not host:port (set by BROKERD_STOMP_ADDR)`}},
		{name: "replica.factor above M, by flag", args: []string{"--gossip-addr=127.0.0.1:7946", "--replication-factor=4"},
			keys:    []string{"replica.factor"},
			message: []string{"config: replica.factor: 4 is more than cluster.active_members (3) (set by --replication-factor)"}},
		{name: "replica.write_quorum above R, from env", env: []string{"BROKERD_REPLICA_WRITE_QUORUM=3"}, keys: []string{"replica.write_quorum"},
			message: []string{"config: replica.write_quorum: 3 is more than replica.factor (2) (set by BROKERD_REPLICA_WRITE_QUORUM)"}},
		{name: "invalid values from every layer", file: "log: {level: loud}",
			env: []string{"BROKERD_LIMITS_MAX_BODY_SIZE=-1"}, args: []string{"--active-members=0"},
			keys: []string{"log.level", "limits.max_body_size", "cluster.active_members"},
			message: []string{
				`config: log.level: "loud" is not one of debug, info, warn, error (set in /`,
				"config: limits.max_body_size: must be > 0, got -1 (set by BROKERD_LIMITS_MAX_BODY_SIZE)",
				"config: cluster.active_members: must be >= 1, got 0 (set by --active-members)",
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := load(t, tc.file, tc.env, tc.args...)
			if err == nil {
				t.Fatalf("Load succeeded: %+v", c)
			}
			t.Logf("error: %v", err)
			if !reflect.DeepEqual(c, Config{}) {
				t.Errorf("Load returned a Config with its error: %+v", c)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %q is not %v", err, tc.is)
			}
			if tc.keys != nil {
				if got := keysOf(keyErrors(err)); !slices.Equal(got, tc.keys) {
					t.Errorf("error %q: keys %q, want %q", err, got, tc.keys)
				}
			}
			for _, m := range tc.message {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not contain %q", err, m)
				}
			}
			for _, ke := range keyErrors(err) {
				if !strings.Contains(err.Error(), ke.Key+": ") {
					t.Errorf("error %q does not name key %s", err, ke.Key)
				}
			}
			if !strings.HasPrefix(err.Error(), "config: ") {
				t.Errorf("error %q does not start with config:", err)
			}
		})
	}
}

// TestValidate has one row per rule: a change to Default() and the key the
// error must name, or "" when the change is valid.
func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name    string
		change  func(c *Config)
		key     string
		message string // a substring of the error
	}{
		{"default", func(c *Config) {}, "", ""},

		{"node.name empty", func(c *Config) { c.Node.Name = "" }, "node.name", "must not be empty"},
		{"node.name with space", func(c *Config) { c.Node.Name = "my node" }, "node.name", "whitespace"},
		{"node.data_dir empty", func(c *Config) { c.Node.DataDir = "" }, "node.data_dir", "must not be empty"},

		{"stomp.addr without port", func(c *Config) { c.STOMP.Addr = "61613" }, "stomp.addr", `"61613" is not host:port`},
		{"stomp.addr port not numeric", func(c *Config) { c.STOMP.Addr = "127.0.0.1:stomp" }, "stomp.addr", `port "stomp"`},
		{"stomp.addr port too large", func(c *Config) { c.STOMP.Addr = "127.0.0.1:65536" }, "stomp.addr", "0..65535"},
		{"stomp.addr empty port", func(c *Config) { c.STOMP.Addr = "127.0.0.1:" }, "stomp.addr", "port"},
		{"stomp.addr empty", func(c *Config) { c.STOMP.Addr = "" }, "stomp.addr", "must not be empty"},
		{"stomp.addr port 0", func(c *Config) { c.STOMP.Addr = "127.0.0.1:0" }, "", ""},
		{"stomp.addr IPv6 loopback", func(c *Config) { c.STOMP.Addr = "[::1]:61613" }, "", ""},
		{"stomp.heartbeat_send negative", func(c *Config) { c.STOMP.HeartbeatSend = -time.Second }, "stomp.heartbeat_send", "must be >= 0, got -1s"},
		{"stomp.heartbeat_send 0", func(c *Config) { c.STOMP.HeartbeatSend = 0 }, "", ""},
		{"stomp.heartbeat_receive negative", func(c *Config) { c.STOMP.HeartbeatReceive = -1 }, "stomp.heartbeat_receive", ">= 0"},
		{"stomp.connect_timeout 0", func(c *Config) { c.STOMP.ConnectTimeout = 0 }, "stomp.connect_timeout", "must be > 0, got 0s"},
		{"stomp.write_timeout negative", func(c *Config) { c.STOMP.WriteTimeout = -1 }, "stomp.write_timeout", "> 0"},
		{"stomp.heartbeat_min negative", func(c *Config) { c.STOMP.HeartbeatMin = -time.Second }, "stomp.heartbeat_min", "must be > 0, got -1s"},
		{"stomp.heartbeat_min 0", func(c *Config) { c.STOMP.HeartbeatMin = 0 }, "stomp.heartbeat_min", "must be > 0, got 0s"},
		{"stomp.heartbeat_min 1ms", func(c *Config) { c.STOMP.HeartbeatMin = time.Millisecond }, "", ""},

		{"admin.addr bad", func(c *Config) { c.Admin.Addr = "localhost" }, "admin.addr", "not host:port"},
		{"admin.addr disabled", func(c *Config) { c.Admin.Addr = "" }, "", ""},

		{"log.level unknown", func(c *Config) { c.Log.Level = "verbose" }, "log.level", `"verbose" is not one of debug, info, warn, error`},
		{"log.level upper case", func(c *Config) { c.Log.Level = "INFO" }, "log.level", "not one of"},
		{"log.format unknown", func(c *Config) { c.Log.Format = "xml" }, "log.format", "text, json"},
		{"log.format json", func(c *Config) { c.Log.Format = "json" }, "", ""},

		{"store.sync unknown", func(c *Config) { c.Store.Sync = "sometimes" }, "store.sync", "always, batch, none"},
		{"store.sync_interval 0", func(c *Config) { c.Store.SyncInterval = 0 }, "store.sync_interval", "> 0"},
		{"store.max_batch 0", func(c *Config) { c.Store.MaxBatch = 0 }, "store.max_batch", "> 0"},
		{"store.wal_size too small", func(c *Config) { c.Store.WALSize = 32<<10 - 1 }, "store.wal_size", "must be between 32768 (32 KiB) and 1073741824 (1 GiB), got 32767"},
		{"store.wal_size smallest", func(c *Config) { c.Store.WALSize = 32 << 10 }, "", ""},
		{"store.wal_size largest", func(c *Config) { c.Store.WALSize = 1 << 30 }, "", ""},
		{"store.wal_size too large", func(c *Config) { c.Store.WALSize = 1<<30 + 1 }, "store.wal_size", "got 1073741825"},
		{"store.min_free_bytes negative", func(c *Config) { c.Store.MinFreeBytes = -1 }, "store.min_free_bytes", "must be >= 0, got -1"},
		{"store.min_free_bytes 0 disables", func(c *Config) { c.Store.MinFreeBytes = 0 }, "", ""},
		{"store.recover unknown", func(c *Config) { c.Store.Recover = "repair" }, "store.recover", `"repair" is not one of refuse, truncate`},
		{"store.recover truncate", func(c *Config) { c.Store.Recover = "truncate" }, "", ""},

		{"limits.max_frame_size 0", func(c *Config) { c.Limits.MaxFrameSize = 0 }, "limits.max_frame_size", "must be > 0, got 0"},
		{"limits.max_header_count 0", func(c *Config) { c.Limits.MaxHeaderCount = 0 }, "limits.max_header_count", "> 0"},
		{"limits.max_header_length 0", func(c *Config) { c.Limits.MaxHeaderLength = 0 }, "limits.max_header_length", "> 0"},
		{"limits.max_body_size negative", func(c *Config) { c.Limits.MaxBodySize = -1 }, "limits.max_body_size", "must be > 0, got -1"},
		{"limits.max_connections 0", func(c *Config) { c.Limits.MaxConnections = 0 }, "limits.max_connections", "> 0"},
		{"limits.max_subscriptions 0", func(c *Config) { c.Limits.MaxSubscriptions = 0 }, "limits.max_subscriptions", "> 0"},
		{"limits.max_transaction_frames 0", func(c *Config) { c.Limits.MaxTransactionFrames = 0 }, "limits.max_transaction_frames", "> 0"},
		{"limits.topic_buffer 0", func(c *Config) { c.Limits.TopicBuffer = 0 }, "limits.topic_buffer", "> 0"},
		{"limits.max_unacked 0", func(c *Config) { c.Limits.MaxUnacked = 0 }, "limits.max_unacked", "must be > 0, got 0"},
		{"limits.max_unacked_bytes 0", func(c *Config) { c.Limits.MaxUnackedBytes = 0 }, "limits.max_unacked_bytes", "> 0"},
		{"limits.max_outgoing_bytes 0", func(c *Config) { c.Limits.MaxOutgoingBytes = 0 }, "limits.max_outgoing_bytes", "> 0"},
		{"limits.max_transaction_bytes negative", func(c *Config) { c.Limits.MaxTransactionBytes = -5 }, "limits.max_transaction_bytes", "must be > 0, got -5"},

		{"queue.max_redeliveries negative", func(c *Config) { c.Queue.MaxRedeliveries = -1 }, "queue.max_redeliveries", "must be >= 0, got -1"},
		{"queue.max_redeliveries 0", func(c *Config) { c.Queue.MaxRedeliveries = 0 }, "", ""},
		{"queue.dlq_prefix on a topic", func(c *Config) { c.Queue.DLQPrefix = "/topic/DLQ." }, "queue.dlq_prefix", `must start with "/queue/"`},
		{"queue.dlq_prefix only /queue/", func(c *Config) { c.Queue.DLQPrefix = "/queue/" }, "queue.dlq_prefix", "more than it"},
		{"queue.dlq_prefix empty", func(c *Config) { c.Queue.DLQPrefix = "" }, "queue.dlq_prefix", "/queue/"},
		{"queue.max_length negative", func(c *Config) { c.Queue.MaxLength = -1 }, "queue.max_length", "must be >= 0, got -1"},
		{"queue.max_length set", func(c *Config) { c.Queue.MaxLength = 1 }, "", ""},
		{"queue.max_bytes negative", func(c *Config) { c.Queue.MaxBytes = -1 }, "queue.max_bytes", ">= 0"},
		{"queue.overflow unknown", func(c *Config) { c.Queue.Overflow = "reject" }, "queue.overflow", `"reject" is not one of reject-publish, drop-head`},
		{"queue.overflow drop-head", func(c *Config) { c.Queue.Overflow = "drop-head" }, "", ""},
		{"queue.idle_delete_after negative", func(c *Config) { c.Queue.IdleDeleteAfter = -time.Second }, "queue.idle_delete_after", "must be >= 0, got -1s"},
		{"queue.idle_delete_after 0 never deletes", func(c *Config) { c.Queue.IdleDeleteAfter = 0 }, "", ""},
		{"queue.read_ahead_messages 0", func(c *Config) { c.Queue.ReadAheadMessages = 0 }, "queue.read_ahead_messages", "> 0"},
		{"queue.read_ahead_bytes 0", func(c *Config) { c.Queue.ReadAheadBytes = 0 }, "queue.read_ahead_bytes", "> 0"},

		{"stomp.addr empty, TLS only", func(c *Config) {
			c.STOMP.Addr = ""
			c.STOMP.TLS.Addr, c.STOMP.TLS.CertFile, c.STOMP.TLS.KeyFile = "127.0.0.1:61614", "c.pem", "k.pem"
		}, "", ""},
		{"stomp.tls.addr without cert", func(c *Config) {
			c.STOMP.TLS.Addr, c.STOMP.TLS.KeyFile = "127.0.0.1:61614", "k.pem"
		}, "stomp.tls.cert_file", "required with stomp.tls.addr"},
		{"stomp.tls.addr without key", func(c *Config) {
			c.STOMP.TLS.Addr, c.STOMP.TLS.CertFile = "127.0.0.1:61614", "c.pem"
		}, "stomp.tls.key_file", "required with stomp.tls.addr"},
		{"stomp.tls complete", func(c *Config) {
			c.STOMP.TLS.Addr, c.STOMP.TLS.CertFile, c.STOMP.TLS.KeyFile = "127.0.0.1:61614", "c.pem", "k.pem"
		}, "", ""},
		{"stomp.tls.cert_file without addr", func(c *Config) { c.STOMP.TLS.CertFile = "c.pem" }, "stomp.tls.cert_file", "no effect without stomp.tls.addr"},
		{"stomp.tls.client_auth unknown", func(c *Config) { c.STOMP.TLS.ClientAuth = "optional" }, "stomp.tls.client_auth", `"optional" is not one of none, request, require`},
		{"stomp.tls.client_auth require without CA", func(c *Config) {
			c.STOMP.TLS.Addr, c.STOMP.TLS.CertFile, c.STOMP.TLS.KeyFile = "127.0.0.1:61614", "c.pem", "k.pem"
			c.STOMP.TLS.ClientAuth = "require"
		}, "stomp.tls.client_ca_file", "required with stomp.tls.client_auth: require"},
		{"stomp.tls.client_ca_file with client_auth none", func(c *Config) {
			c.STOMP.TLS.Addr, c.STOMP.TLS.CertFile, c.STOMP.TLS.KeyFile = "127.0.0.1:61614", "c.pem", "k.pem"
			c.STOMP.TLS.ClientCAFile = "ca.pem"
		}, "stomp.tls.client_auth", "has no effect"},
		{"stomp.tls beyond loopback without users", func(c *Config) {
			c.STOMP.TLS.Addr, c.STOMP.TLS.CertFile, c.STOMP.TLS.KeyFile = ":61614", "c.pem", "k.pem"
		}, "auth.users_file", "required when stomp.tls.addr listens beyond loopback"},
		{"stomp.tls beyond loopback with required x509 login", func(c *Config) {
			c.STOMP.TLS.Addr, c.STOMP.TLS.CertFile, c.STOMP.TLS.KeyFile = ":61614", "c.pem", "k.pem"
			c.STOMP.TLS.ClientAuth, c.STOMP.TLS.ClientCAFile, c.Auth.X509Login = "require", "ca.pem", true
		}, "", ""},
		{"auth.x509_login without client certificates", func(c *Config) { c.Auth.X509Login = true }, "auth.x509_login", "needs stomp.tls.addr"},
		{"stomp.ws_addr not host:port", func(c *Config) { c.STOMP.WSAddr = "15674" }, "stomp.ws_addr", "not host:port"},
		{"stomp.wss_addr without certificate", func(c *Config) { c.STOMP.WSSAddr = "127.0.0.1:15673" }, "stomp.wss_addr", "needs stomp.tls.cert_file"},
		{"stomp.wss_addr with the STOMP TLS certificate", func(c *Config) {
			c.STOMP.WSSAddr, c.STOMP.TLS.CertFile, c.STOMP.TLS.KeyFile = "127.0.0.1:15673", "c.pem", "k.pem"
		}, "", ""},
		{"stomp.ws_addr beyond loopback without users", func(c *Config) { c.STOMP.WSAddr = ":15674" }, "auth.users_file", "required when stomp.ws_addr listens beyond loopback"},
		{"stomp.ws_allowed_origins a URL", func(c *Config) { c.STOMP.WSAllowedOrigins = []string{"https://app.example.com"} }, "stomp.ws_allowed_origins", "not a host pattern"},
		{"stomp.ws_allowed_origins bad pattern", func(c *Config) { c.STOMP.WSAllowedOrigins = []string{"app[.example.com"} }, "stomp.ws_allowed_origins", "entry 0"},
		{"stomp.ws_allowed_origins patterns", func(c *Config) { c.STOMP.WSAllowedOrigins = []string{"*", "*.example.com", "localhost:8080"} }, "", ""},
		{"stomp.addr empty with only a WebSocket listener", func(c *Config) { c.STOMP.Addr, c.STOMP.WSAddr = "", "127.0.0.1:15674" }, "", ""},
		{"stomp.addr empty with no listener at all", func(c *Config) { c.STOMP.Addr = "" }, "stomp.addr", "must not be empty"},
		{"stomp.advertise_addr without port", func(c *Config) { c.STOMP.AdvertiseAddr = "broker-1.example" }, "stomp.advertise_addr", "not host:port"},
		{"stomp.advertise_addr without host", func(c *Config) { c.STOMP.AdvertiseAddr = ":61613" }, "stomp.advertise_addr", "has no host"},
		{"auth.x509_login over wss only", func(c *Config) {
			c.STOMP.WSSAddr, c.STOMP.TLS.CertFile, c.STOMP.TLS.KeyFile = "127.0.0.1:15673", "c.pem", "k.pem"
			c.STOMP.TLS.ClientAuth, c.STOMP.TLS.ClientCAFile, c.Auth.X509Login = "require", "ca.pem", true
		}, "", ""},
		{"admin.tls cert without key", func(c *Config) { c.Admin.TLS.CertFile = "c.pem" }, "admin.tls.key_file", "go together"},
		{"admin.tls.client_ca_file without cert", func(c *Config) { c.Admin.TLS.ClientCAFile = "ca.pem" }, "admin.tls.client_ca_file", "needs admin.tls.cert_file"},
		{"admin.addr beyond loopback without a token", func(c *Config) { c.Admin.Addr = "0.0.0.0:8613" }, "admin.token_file", "required when admin.addr listens beyond loopback"},
		{"admin.addr beyond loopback with a token", func(c *Config) { c.Admin.Addr, c.Admin.TokenFile = "0.0.0.0:8613", "t" }, "", ""},
		{"admin.addr beyond loopback with client certificates", func(c *Config) {
			c.Admin.Addr = "0.0.0.0:8613"
			c.Admin.TLS = AdminTLS{CertFile: "c.pem", KeyFile: "k.pem", ClientCAFile: "ca.pem"}
		}, "", ""},
		{"limits.max_connections_per_ip 0", func(c *Config) { c.Limits.MaxConnectionsPerIP = 0 }, "limits.max_connections_per_ip", "> 0"},
		{"cluster.tls partial", func(c *Config) {
			c.Cluster.GossipAddr = "127.0.0.1:7946"
			c.Cluster.TLS = ClusterTLS{CertFile: "c.pem", KeyFile: "k.pem"}
		}, "cluster.tls.ca_file", "go together"},
		{"cluster.tls on a single node", func(c *Config) {
			c.Cluster.TLS = ClusterTLS{CertFile: "c.pem", KeyFile: "k.pem", CAFile: "ca.pem"}
		}, "cluster.tls.cert_file", "without cluster.gossip_addr"},
		{"cluster.tls complete", func(c *Config) {
			c.Cluster.GossipAddr = "127.0.0.1:7946"
			c.Cluster.TLS = ClusterTLS{CertFile: "c.pem", KeyFile: "k.pem", CAFile: "ca.pem"}
		}, "", ""},

		{"cluster.gossip_addr bad", func(c *Config) { c.Cluster.GossipAddr = "7946" }, "cluster.gossip_addr", "not host:port"},
		{"cluster.gossip_addr all interfaces without a key", func(c *Config) { c.Cluster.GossipAddr = ":7946" }, "cluster.secret_key_file", "required when cluster.gossip_addr listens beyond loopback"},
		{"cluster.gossip_addr all interfaces with a key", func(c *Config) {
			c.Cluster.GossipAddr = ":7946"
			c.Cluster.SecretKeyFile = "/etc/brokerd/key"
		}, "", ""},
		{"cluster.peer_addr bad", func(c *Config) { c.Cluster.PeerAddr = "host:99999" }, "cluster.peer_addr", "0..65535"},
		{"cluster.join entry without port", func(c *Config) {
			c.Cluster.GossipAddr, c.Cluster.AllowPlaintextGossip = ":7946", true
			c.Cluster.Join = []string{"a.example:7946", "b.example"}
		}, "cluster.join", `entry 1: "b.example" is not host:port`},
		{"cluster.join entry port 0", func(c *Config) {
			c.Cluster.GossipAddr, c.Cluster.AllowPlaintextGossip = ":7946", true
			c.Cluster.Join = []string{"a.example:0"}
		}, "cluster.join", "1..65535"},
		{"cluster.join entry without host", func(c *Config) {
			c.Cluster.GossipAddr, c.Cluster.AllowPlaintextGossip = ":7946", true
			c.Cluster.Join = []string{":7946"}
		}, "cluster.join", "no host"},
		{"cluster.join DNS names and IPs", func(c *Config) {
			c.Cluster.GossipAddr, c.Cluster.AllowPlaintextGossip = ":7946", true
			c.Cluster.Join = []string{"node-1.brokerd.svc.cluster.local:7946", "10.0.0.1:7946", "[fe80::1]:7946"}
		}, "", ""},
		{"cluster.join without gossip", func(c *Config) { c.Cluster.Join = []string{"a.example:7946"} }, "cluster.join", "cluster.gossip_addr"},
		{"cluster.active_members 0", func(c *Config) { c.Cluster.ActiveMembers = 0 }, "cluster.active_members", "must be >= 1, got 0"},
		{"cluster.active_members 1", func(c *Config) { c.Cluster.ActiveMembers = 1 }, "", ""},
		{"cluster.name empty", func(c *Config) { c.Cluster.Name = "" }, "cluster.name", "must not be empty"},
		{"cluster.promotion_delay negative", func(c *Config) { c.Cluster.PromotionDelay = -time.Millisecond }, "cluster.promotion_delay", ">= 0"},
		{"cluster.promotion_delay 0", func(c *Config) { c.Cluster.PromotionDelay = 0 }, "", ""},
		{"cluster.forget_after 0", func(c *Config) { c.Cluster.ForgetAfter = 0 }, "cluster.forget_after", "must be > 0, got 0s"},
		{"cluster.forget_after 1ms", func(c *Config) { c.Cluster.ForgetAfter = time.Millisecond }, "", ""},

		{"replica.factor 0", func(c *Config) { c.Replica.Factor = 0 }, "replica.factor", "must be >= 1, got 0"},
		{"replica.factor negative", func(c *Config) { c.Replica.Factor = -1 }, "replica.factor", "must be >= 1, got -1"},
		{"replica.factor 1", func(c *Config) { c.Replica.Factor = 1 }, "", ""},
		{"replica.tombstone_ttl below 1s", func(c *Config) { c.Replica.TombstoneTTL = 500 * time.Millisecond }, "replica.tombstone_ttl", "must be at least 1s, got 500ms"},
		{"replica.factor M with gossip", func(c *Config) {
			c.Cluster.GossipAddr = "127.0.0.1:7946"
			c.Replica.Factor = 3
		}, "", ""},
		{"replica.factor above M with gossip", func(c *Config) {
			c.Cluster.GossipAddr = "127.0.0.1:7946"
			c.Replica.Factor = 4
		}, "replica.factor", "replica.factor: 4 is more than cluster.active_members (3)"},
		{"replica.factor above M on a single node", func(c *Config) { c.Replica.Factor = 4 }, "", ""},
		{"replica.factor with M 0 reports M only", func(c *Config) {
			c.Cluster.GossipAddr = "127.0.0.1:7946"
			c.Cluster.ActiveMembers = 0
		}, "cluster.active_members", "must be >= 1, got 0"},
		{"replica.write_quorum negative", func(c *Config) { c.Replica.WriteQuorum = -1 }, "replica.write_quorum", "must be >= 0 (0 for a majority of replica.factor), got -1"},
		{"replica.write_quorum 1", func(c *Config) { c.Replica.WriteQuorum = 1 }, "", ""},
		{"replica.write_quorum R", func(c *Config) { c.Replica.WriteQuorum = 2 }, "", ""},
		{"replica.write_quorum above R", func(c *Config) { c.Replica.WriteQuorum = 3 }, "replica.write_quorum", "replica.write_quorum: 3 is more than replica.factor (2)"},
		{"replica.write_quorum above R on a single node", func(c *Config) {
			c.Replica.Factor, c.Replica.WriteQuorum = 1, 2
		}, "replica.write_quorum", "2 is more than replica.factor (1)"},
		{"replica.factor 0 reports R only", func(c *Config) { c.Replica.Factor, c.Replica.WriteQuorum = 0, 1 }, "replica.factor", "must be >= 1, got 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			tc.change(&c)
			err := c.Validate()
			checkValidateError(t, err, tc.key, tc.message)
		})
	}
}

func checkValidateError(t *testing.T, err error, key, message string) {
	t.Helper()
	if key == "" {
		if err != nil {
			t.Fatalf("Validate() = %v, want nil", err)
		}
		return
	}
	if err == nil {
		t.Fatalf("Validate() = nil, want an error naming %s", key)
	}
	var ke *KeyError
	if !errors.As(err, &ke) || ke.Key != key {
		t.Fatalf("Validate() = %q, want a *KeyError for %s", err, key)
	}
	if got := keysOf(keyErrors(err)); len(got) != 1 {
		t.Errorf("Validate() = %q: %d problems for one change", err, len(got))
	}
	if msg := err.Error(); !strings.HasPrefix(msg, key+": ") || !strings.Contains(msg, message) || strings.Contains(msg, "\n") {
		t.Errorf("Validate() = %q, want one line starting %q and containing %q", msg, key+": ", message)
	}
}

// TestWriteQuorum has one row per (R, W): the W that Config.WriteQuorum
// returns, replica.write_quorum when set and a majority of R for 0.
func TestWriteQuorum(t *testing.T) {
	for _, tc := range []struct {
		factor, quorum int
		want           int
	}{
		{1, 0, 1},
		{2, 0, 2},
		{3, 0, 2},
		{4, 0, 3},
		{5, 0, 3},
		{1, 1, 1},
		{3, 1, 1},
		{3, 3, 3},
		{5, 2, 2},
	} {
		c := Default()
		c.Replica.Factor, c.Replica.WriteQuorum = tc.factor, tc.quorum
		c.Cluster.ActiveMembers = 5
		if err := c.Validate(); err != nil {
			t.Fatalf("R=%d W=%d: Validate() = %v", tc.factor, tc.quorum, err)
		}
		if got := c.WriteQuorum(); got != tc.want {
			t.Errorf("R=%d W=%d: WriteQuorum() = %d, want %d", tc.factor, tc.quorum, got, tc.want)
		}
	}

	c, err := load(t, "", []string{"BROKERD_REPLICA_FACTOR=3"}, "--write-quorum=1")
	if err != nil {
		t.Fatal(err)
	}
	if c.Replica.Factor != 3 || c.Replica.WriteQuorum != 1 || c.WriteQuorum() != 1 {
		t.Errorf("Load = %+v, WriteQuorum() = %d; want R=3 W=1", c.Replica, c.WriteQuorum())
	}
}

func TestValidateAnonymous(t *testing.T) {
	const refused = "auth.users_file"
	for _, tc := range []struct {
		addr      string
		usersFile string
		anonymous bool
		key       string
	}{
		{"127.0.0.1:61613", "", false, ""},
		{"127.1.2.3:61613", "", false, ""},
		{"localhost:61613", "", false, ""},
		{"LOCALHOST:61613", "", false, ""},
		{"[::1]:61613", "", false, ""},
		{"[::ffff:127.0.0.1]:61613", "", false, ""},
		{"0.0.0.0:61613", "", false, refused},
		{":61613", "", false, refused},
		{"[::]:61613", "", false, refused},
		{"10.0.0.1:61613", "", false, refused},
		{"broker.example:61613", "", false, refused},
		{"0.0.0.0:61613", "/etc/brokerd/users", false, ""},
		{"0.0.0.0:61613", "", true, ""},
		{"0.0.0.0:61613", "/etc/brokerd/users", true, ""},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			c := Default()
			c.STOMP.Addr, c.Auth.UsersFile, c.Auth.AllowAnonymous = tc.addr, tc.usersFile, tc.anonymous
			checkValidateError(t, c.Validate(), tc.key, "required when stomp.addr listens beyond loopback (set auth.allow_anonymous: true")
		})
	}

	t.Run("through flags", func(t *testing.T) {
		if _, err := load(t, "", nil, "--stomp-addr=0.0.0.0:61613"); err == nil || !strings.Contains(err.Error(), "config: auth.users_file: required") {
			t.Errorf("Load = %v, want the anonymous rule", err)
		}
		if _, err := load(t, "", nil, "--stomp-addr=0.0.0.0:61613", "--allow-anonymous"); err != nil {
			t.Errorf("Load with --allow-anonymous = %v", err)
		}
		if _, err := load(t, "", nil, "--stomp-addr=0.0.0.0:61613", "--users-file=users.txt"); err != nil {
			t.Errorf("Load with --users-file = %v", err)
		}
	})
}

// TestValidatePlaintextGossip: gossip beyond loopback needs a key, or an
// explicit cluster.allow_plaintext_gossip, as anonymous STOMP does.
func TestValidatePlaintextGossip(t *testing.T) {
	const refused = "cluster.secret_key_file"
	for _, tc := range []struct {
		addr      string
		keyFile   string
		plaintext bool
		key       string
	}{
		{"", "", false, ""}, // no gossip at all
		{"127.0.0.1:7946", "", false, ""},
		{"127.0.0.2:7946", "", false, ""},
		{"localhost:7946", "", false, ""},
		{"[::1]:7946", "", false, ""},
		{"0.0.0.0:7946", "", false, refused},
		{":7946", "", false, refused},
		{"[::]:7946", "", false, refused},
		{"10.0.0.1:7946", "", false, refused},
		{"node-1.brokerd.example:7946", "", false, refused},
		{"0.0.0.0:7946", "/etc/brokerd/key", false, ""},
		{"0.0.0.0:7946", "", true, ""},
		{"0.0.0.0:7946", "/etc/brokerd/key", true, ""},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			c := Default()
			c.Cluster.GossipAddr, c.Cluster.SecretKeyFile, c.Cluster.AllowPlaintextGossip = tc.addr, tc.keyFile, tc.plaintext
			checkValidateError(t, c.Validate(), tc.key, "required when cluster.gossip_addr listens beyond loopback (set cluster.allow_plaintext_gossip: true")
		})
	}

	t.Run("through flags, file and environment", func(t *testing.T) {
		if _, err := load(t, "", nil, "--gossip-addr=0.0.0.0:7946"); err == nil || !strings.Contains(err.Error(), "config: cluster.secret_key_file: required") {
			t.Errorf("Load = %v, want the plaintext gossip rule", err)
		}
		if _, err := load(t, "", nil, "--gossip-addr=0.0.0.0:7946", "--allow-plaintext-gossip"); err != nil {
			t.Errorf("Load with --allow-plaintext-gossip = %v", err)
		}
		if _, err := load(t, "cluster: {allow_plaintext_gossip: true}", nil, "--gossip-addr=0.0.0.0:7946"); err != nil {
			t.Errorf("Load with allow_plaintext_gossip in the file = %v", err)
		}
		if _, err := load(t, "", []string{"BROKERD_CLUSTER_SECRET_KEY_FILE=/etc/brokerd/key"}, "--gossip-addr=0.0.0.0:7946"); err != nil {
			t.Errorf("Load with a secret key file = %v", err)
		}
	})
}

func TestSizes(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "4096": 4096, " 4096 ": 4096, "1B": 1, "4KiB": 4 << 10, "256MiB": 256 << 20, "256 MiB": 256 << 20,
		"2GiB": 2 << 30, "1TiB": 1 << 40, "5kB": 5000, "5KB": 5000, "3MB": 3e6, "1GB": 1e9, "1TB": 1e12, "-1": -1,
	} {
		if got, err := toSize(in); err != nil || got != want {
			t.Errorf("toSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "MiB", "1.5MiB", "1mib", "1 M", "4k", "0x10", "1MiB2", "9223372036854775807KiB"} {
		if got, err := toSize(in); err == nil {
			t.Errorf("toSize(%q) = %d, want an error", in, got)
		}
	}
	if got, err := toSize(4096); err != nil || got != 4096 {
		t.Errorf("toSize(4096) = %d, %v", got, err)
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	c := Default()
	c.STOMP.Addr = "nope"
	c.Limits.MaxBodySize = 0
	c.Cluster.ActiveMembers = 0
	err := c.Validate()
	want := []string{"stomp.addr", "limits.max_body_size", "cluster.active_members"}
	if got := keysOf(keyErrors(err)); !slices.Equal(got, want) {
		t.Fatalf("Validate() = %q: keys %q, want %q (one problem each, in field order)", err, got, want)
	}
	for i, line := range strings.Split(err.Error(), "\n") {
		if !strings.HasPrefix(line, want[i]+": ") {
			t.Errorf("line %d %q does not start with its key", i, line)
		}
	}
}

// TestExampleFile keeps brokerd.example.yaml and Default() in step: the file
// names every key (node.name may be left commented out) and loads to Default().
func TestExampleFile(t *testing.T) {
	const path = "../brokerd.example.yaml"
	fset := pflag.NewFlagSet("brokerd", pflag.ContinueOnError)
	RegisterFlags(fset)
	if err := fset.Parse([]string{"--config", path}); err != nil {
		t.Fatal(err)
	}
	c, err := Load(fset, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c, Default()) {
		t.Errorf("%s loads to\n%+v\nwant Default()\n%+v", path, c, Default())
	}

	v := viper.New()
	v.SetConfigFile(path)
	if err := v.ReadInConfig(); err != nil {
		t.Fatal(err)
	}
	inFile := v.AllKeys()
	for _, s := range settings {
		if !slices.Contains(inFile, s.key) && s.key != "node.name" {
			t.Errorf("%s does not set %s", path, s.key)
		}
	}
}
