// Command bench is a load generator for STOMP 1.2 brokers. It measures
// brokerd, and for comparison RabbitMQ's STOMP plugin (or any other STOMP
// broker), with the same client code and the same parameters.
//
// It speaks STOMP directly through go-stomp's frame package (not go-stomp's
// client, whose Conn.Send holds its lock until the RECEIPT arrives, which
// rules out a window of outstanding receipts). Every producer and every
// consumer has its own TCP connection (CONNECT accept-version:1.2,
// heart-beat:0,0).
//
//   - Consumers SUBSCRIBE (id, ack mode, prefetch-count and
//     activemq.prefetchSize) with a receipt; producers start only after every
//     subscription has been receipted (-sub-receipt=false skips the wait, for
//     brokers that ignore receipts on SUBSCRIBE such as go-stomp's server).
//   - Producers SEND messages of -size bytes with headers x-run (this run's
//     id), x-seq (<producer>-<seq>) and x-sent (unix nanos), plus
//     persistent:true when -persistent. With -window N > 0 each SEND carries
//     receipt:<seq> and at most N receipts are outstanding per producer;
//     -window 0 is fire and forget.
//   - Consumers ACK (STOMP 1.2: id = the MESSAGE's ack header) every message
//     (client-individual), every -ack-batch messages cumulatively (client), or
//     not at all (auto). They compute end-to-end latency from x-sent and
//     detect loss and duplicates from x-seq.
//   - Producers stop after -duration (or after -count messages in total),
//     wait up to -drain for their outstanding receipts, and DISCONNECT with a
//     receipt (waiting up to -timeout + -drain: with -window 0 that RECEIPT
//     is the broker's word that it has processed every SEND). Consumers then
//     have up to -drain to receive the rest (the drain ends as soon as every
//     sent message has been received), and DISCONNECT with a receipt.
//   - Frames are buffered and flushed whenever the writer would otherwise
//     wait (a producer's window is full, a consumer has read everything
//     available), so under load many frames share one syscall without adding
//     latency.
//
// Flags:
//
//	-addr host:port     broker (127.0.0.1:61613); a comma-separated list
//	                    spreads the producers round-robin over it (producer
//	                    i on address i mod n), e.g. over a cluster's nodes
//	-consumer-addr LIST comma-separated addresses for the consumers,
//	                    round-robin likewise (default: -addr)
//	-header name:value  extra header on every SEND and SUBSCRIBE (repeatable),
//	                    e.g. -header x-queue-type:quorum -header durable:true
//	                    for a RabbitMQ quorum queue
//	-login, -passcode   CONNECT credentials (omitted when empty)
//	-host               CONNECT host header / virtual host ("/")
//	-dest               destination (/queue/bench-<random>, new every run)
//	-producers N        producer connections (1)
//	-consumers N        consumer connections (1; 0 = send only)
//	-size N             body bytes (256)
//	-duration D         how long producers send (10s)
//	-count N            total messages instead of -duration (0 = use -duration)
//	-persistent         header persistent:true on every SEND (true)
//	-window N           outstanding receipts per producer (1; 0 = fire and forget)
//	-ack MODE           auto | client | client-individual (client-individual)
//	-ack-batch N        with -ack client: cumulative ACK every N messages (32)
//	-prefetch N         prefetch-count and activemq.prefetchSize (256; 0 = omit)
//	-drain D            max wait for receipts, then for the remainder (10s)
//	-timeout D          connect, SUBSCRIBE and DISCONNECT receipt timeout (10s)
//	-sub-receipt        wait for SUBSCRIBE receipts before producing (true)
//	-samples N          latency samples kept per histogram (reservoir, 1000000)
//	-json               print only the JSON line
//	-label TEXT         free text included in the output (e.g. brokerd, rabbitmq)
//	-series             per-second receipt p99/max (see below)
//	-pid N              sample process N's memory from /proc/N/status (brokerd's PID)
//	-admin host:port    brokerd's admin address: count its write-ahead log wraps
//	-ws                 STOMP over WebSocket: every address is a WebSocket
//	                    listener, reached at ws://ADDR/ws (wss:// with -tls-ca),
//	                    e.g. brokerd's stomp.ws_addr or RabbitMQ Web STOMP's
//	                    15674; each flush of a connection is one message
//	-mode MODE          load (this) | backlog (see backlog.go and backlog.sh) |
//	                    fsync (see fsync.go: one log write+fdatasync on a disk)
//	-fsync-dir DIR      with -mode fsync: where to append the probe file
//
// With -series every second of the run (counted from the start of sending)
// gets: the receipts that arrived in it, their p99 (from a log-linear
// histogram, within ~3%) and max, the distinct messages first delivered in
// it and, with -admin, the wraps of brokerd's write-ahead log in it
// (brokerd_store_checkpoints_total + brokerd_store_wal_switches_total,
// whichever it exports, polled 4 times a second) and the switches among
// them that had to wait for bbolt (brokerd_store_wal_switch_waits_total).
// The summary shows the median and worst per-second p99, the seconds
// without a receipt, the 5 worst seconds by max, and the seconds within 1 s
// of a wrap against the others; the JSON has sec_p99_median_ms,
// sec_p99_worst_ms, sec_idle and the whole series (key series: t, rcpt,
// rcpt_p99_ms, rcpt_max_ms, recv, wraps, waits). Its cost is one lock and one increment per receipt and per
// first delivery, and ~7.5 KB of memory per second of run. With -pid the
// JSON has broker: samples, last (rss, rss_anon, rss_file, rss_shmem,
// vm_hwm, bytes), peak_rss, peak_rss_anon, peak_rss_file; with -admin,
// store: wal_wraps, checkpoints, wal_switches, wal_switch_waits (each only
// if brokerd exports its counter).
//
// -mode backlog starts brokerd itself (-broker "command line"), fills one
// queue with -count messages, kills brokerd with SIGKILL, restarts it and
// drains the queue, measuring memory, restart time and drain rate against
// a reference run; see backlog.go for the phases, flags and output, and
// test/bench/backlog.sh to run it on a brokerd built from this tree.
//
// Output: a human-readable summary on stdout, then one JSON line (with -json
// only the JSON line):
//
//	== rabbitmq @ 127.0.0.1:61623  /queue/bench-3fe0567e ==
//	params    producers=1 consumers=1 size=256B duration=10s persistent=true window=64 ack=client-individual prefetch=256
//	sent          6775.1 msg/s  (receipted: 67782 in 10.005s)
//	received      6775.7 msg/s  (67782 in 10.004s)
//	latency   end-to-end p50 6.254 ms  p99 14.905 ms  max 27.063 ms
//	receipt   p50 8.905 ms  p99 18.861 ms  max 28.214 ms
//	max receipt gap 29.102 ms  (between consecutive receipts of producer-0, ended at 4.211s)
//	counts    sent=67782 receipted=67782 received=67782 lost=0 duplicated=0 redelivered=0
//	result    OK
//	{"label":"rabbitmq","addr":"127.0.0.1:61623",...,"ok":true}
//
// JSON keys: the parameters (label, addr, dest, producers, consumers, size,
// duration_s, count, persistent, window, ack, ack_batch, prefetch, drain_s)
// and the figures: send_rate (receipted/s with -window > 0, else sent/s, over
// send_s = start to last receipt or last send), recv_rate (distinct messages
// received/s over recv_s = start to last first-time delivery), lat_p50_ms,
// lat_p99_ms, lat_max_ms (end to end, x-sent to delivery), receipt_p50_ms,
// receipt_p99_ms, receipt_max_ms (SEND to RECEIPT), max_receipt_gap_ms (the
// longest time between two consecutive receipts of one producer: the stall
// of a failover; with max_receipt_gap_at_s, when the receipt ending it
// arrived, and max_receipt_gap_producer), sent, receipted,
// unreceipted (sent, no RECEIPT), received (distinct), deliveries (MESSAGE
// frames, duplicates included), lost (receipted, or with -window 0 sent, but
// not received by the end of the drain), duplicated (messages received more
// than once), redelivered (MESSAGEs with redelivered:true), foreign
// (MESSAGEs of other runs on the same destination), broker_error, errors,
// ok; consumer_addr when -consumer-addr is given. The summary's "max receipt
// gap" line has the same gap.
//
// Any ERROR frame is printed (message header and body) on stderr and fails
// the run. Exit status: 0 success; 1 when a receipted message (with -window
// 0: a sent message) was not received, when the broker sent ERROR, or when a
// connection failed or a control receipt (SUBSCRIBE, DISCONNECT) did not
// arrive in time; 2 for bad flags. One Ctrl-C stops the producers early (the
// drain and the report still happen), a second one cuts the drain short, a
// third one kills.
//
// End-to-end latency uses the wall clock of the producing and the consuming
// side, which is the same process here, so it is exact on one host.
//
// Examples (from the module root):
//
//	# brokerd on its default port, 10 s, receipt for every message
//	go run ./test/bench -label brokerd -window 1
//
//	# 64 receipts in flight per producer, 4 producers, 4 consumers, 1 KiB
//	go run ./test/bench -label brokerd -window 64 -producers 4 -consumers 4 -size 1024
//
//	# fire and forget, exactly 100000 messages, auto ack
//	go run ./test/bench -label brokerd -window 0 -count 100000 -ack auto
//
//	# the same measurements against RabbitMQ's STOMP plugin
//	# (/work/shared/peers/rabbitmq start serves it on 127.0.0.1:61623)
//	go run ./test/bench -label rabbitmq -addr 127.0.0.1:61623 -login guest -passcode guest -window 1
//	go run ./test/bench -label rabbitmq -addr 127.0.0.1:61623 -login guest -passcode guest -window 64
//
//	# a 3-node cluster: producers round-robin over n1..n3, consumers over
//	# n2, n3, n1; RabbitMQ quorum queues need two headers
//	go run ./test/bench -label brokerd -window 64 -producers 4 -consumers 4 \
//	    -addr 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 \
//	    -consumer-addr 127.0.0.1:7002,127.0.0.1:7003,127.0.0.1:7001
//	go run ./test/bench -label rabbit-quorum -login guest -passcode guest \
//	    -addr 127.0.0.1:61641 -consumer-addr 127.0.0.1:61642 \
//	    -header x-queue-type:quorum -header durable:true
//	# (test/bench/cluster.sh runs both, with its own brokerd cluster)
//
//	# only the JSON line, e.g. for scripts
//	go run ./test/bench -json -label rabbitmq -addr 127.0.0.1:61623 -login guest -passcode guest
//
//	# per-second receipt latency and write-ahead log wraps, 60 s
//	go run ./test/bench -label brokerd -window 64 -duration 60s -series -admin 127.0.0.1:8613 -pid BROKERD_PID
//
//	# the backlog scenario (builds and starts its own brokerd)
//	COUNT=200000 test/bench/backlog.sh
//
//	# both brokers side by side, window 1 and 64, 1 producer / 1 consumer,
//	# 256 B, persistent (starts and stops nothing; DURATION=10s by default)
//	test/bench/compare.sh
//	BROKERD_ADDR=127.0.0.1:61613 RABBIT_ADDR=127.0.0.1:61623 test/bench/compare.sh -size 1024
//
// go-stomp's own server (github.com/go-stomp/stomp/v3/server) sends no
// RECEIPT for SUBSCRIBE and reads an ACK's message id from an "ack" header
// instead of STOMP 1.2's "id"; to use it as a smoke-test peer, run with
// -sub-receipt=false -ack auto.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// config holds the command-line parameters.
type config struct {
	addr, login, passcode, host, dest string
	producers, consumers, size        int
	duration                          time.Duration
	count                             int64
	persistent                        bool
	window                            int
	ack                               string
	ackBatch                          int
	prefetch                          int
	drain                             time.Duration
	timeout                           time.Duration
	samples                           int
	subReceipt                        bool
	jsonOnly                          bool
	label                             string
	// tlsCA, when set, makes every connection STOMP over TLS, trusting
	// the CA certificates in this PEM file.
	tlsCA  string
	tlsCfg *tls.Config
	// ws makes every connection STOMP over WebSocket to ws://ADDR/ws
	// (wss:// with tlsCA).
	ws bool

	// consumerAddr is -consumer-addr as given ("" = same as -addr).
	consumerAddr string
	// addrs and consumerAddrs are -addr and -consumer-addr split on commas:
	// producer i connects to addrs[i%len(addrs)], consumer i to
	// consumerAddrs[i%len(consumerAddrs)].
	addrs, consumerAddrs []string
	// headers are the -header name:value pairs, added to every SEND and
	// SUBSCRIBE.
	headers headerList

	series bool   // per-second receipt p99/max series
	pid    int    // broker process to sample memory of (0 = none)
	admin  string // brokerd admin address, for its store counters
	mode   string // load | backlog | fsync
	// fsyncDir is where -mode fsync appends and fdatasyncs its records.
	fsyncDir string
	bl       backlogConfig
}

func parseFlags(args []string) (config, error) {
	var c config
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.StringVar(&c.addr, "addr", "127.0.0.1:61613", "broker STOMP address host:port, or a comma-separated list: producers connect round-robin over it")
	fs.StringVar(&c.consumerAddr, "consumer-addr", "", "comma-separated STOMP addresses consumers connect to, round-robin (default: -addr)")
	fs.Var(&c.headers, "header", "extra header name:value on every SEND and SUBSCRIBE, e.g. x-queue-type:quorum (repeatable)")
	fs.StringVar(&c.login, "login", "", "CONNECT login (omitted when empty)")
	fs.StringVar(&c.passcode, "passcode", "", "CONNECT passcode (omitted when empty)")
	fs.StringVar(&c.host, "host", "/", "CONNECT host header (virtual host)")
	fs.StringVar(&c.dest, "dest", "", "destination (default /queue/bench-<random>, new for every run)")
	fs.IntVar(&c.producers, "producers", 1, "number of producer connections")
	fs.IntVar(&c.consumers, "consumers", 1, "number of consumer connections")
	fs.IntVar(&c.size, "size", 256, "message body size in bytes")
	fs.DurationVar(&c.duration, "duration", 10*time.Second, "how long producers send (ignored when -count > 0)")
	fs.Int64Var(&c.count, "count", 0, "total messages to send, split over the producers (0 = send for -duration)")
	fs.BoolVar(&c.persistent, "persistent", true, "add header persistent:true to every SEND")
	fs.IntVar(&c.window, "window", 1, "outstanding receipts per producer (0 = no receipts, fire and forget)")
	fs.StringVar(&c.ack, "ack", "client-individual", "subscription ack mode: auto, client or client-individual")
	fs.IntVar(&c.ackBatch, "ack-batch", 32, "with -ack client, ACK cumulatively every this many messages")
	fs.IntVar(&c.prefetch, "prefetch", 256, "subscription prefetch-count and activemq.prefetchSize (0 = omit the headers)")
	fs.DurationVar(&c.drain, "drain", 10*time.Second, "after producers stop: max wait for outstanding receipts, then max wait for consumers to receive the rest")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Second, "timeout for connecting and for SUBSCRIBE/DISCONNECT receipts")
	fs.IntVar(&c.samples, "samples", 1_000_000, "latency samples kept (reservoir) for percentiles")
	fs.BoolVar(&c.subReceipt, "sub-receipt", true, "wait for a RECEIPT to each SUBSCRIBE before producing (false for brokers that send none, e.g. go-stomp's server)")
	fs.BoolVar(&c.jsonOnly, "json", false, "print only the JSON line")
	fs.StringVar(&c.label, "label", "", "free-text label included in the output (e.g. brokerd, rabbitmq)")
	fs.BoolVar(&c.series, "series", false, "report receipt p99/max (and receipts, deliveries) per second of the run: worst seconds in the summary, every second in the JSON")
	fs.IntVar(&c.pid, "pid", 0, "broker process ID: sample its memory (VmRSS, RssAnon, RssFile from /proc/PID/status) during the run")
	fs.StringVar(&c.admin, "admin", "", "brokerd admin address host:port: count the wraps of its write-ahead log (store checkpoints or segment switches) during the run, per second with -series")
	fs.StringVar(&c.mode, "mode", "load", "load (one run against a running broker), backlog (start brokerd with -broker, fill a queue with -count messages, kill -9, restart, drain; see the package doc) or fsync (time write+fdatasync of log-sized appends in -fsync-dir for -duration)")
	fs.StringVar(&c.tlsCA, "tls-ca", "", "connect with TLS, trusting the CA certificates in this PEM file (the broker's stomp.tls listener)")
	fs.BoolVar(&c.ws, "ws", false, "connect with STOMP over WebSocket, to ws://ADDR/ws (wss:// with -tls-ca): the addresses are WebSocket listeners (brokerd's stomp.ws_addr, RabbitMQ Web STOMP)")
	fs.StringVar(&c.fsyncDir, "fsync-dir", "", "with -mode fsync: directory (on the broker's disk) to append and fdatasync a probe file in")
	c.bl.flags(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: go run ./test/bench [flags]\n\nSTOMP load tool; see `go doc ./test/bench` for details.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	switch c.mode {
	case "load", "fsync":
	case "backlog":
		if err := c.backlogDefaults(set); err != nil {
			return c, err
		}
	default:
		return c, fmt.Errorf("-mode must be load, backlog or fsync, not %q", c.mode)
	}
	if c.pid < 0 {
		return c, errors.New("-pid must be >= 0")
	}
	if c.tlsCA != "" {
		b, err := os.ReadFile(c.tlsCA)
		if err != nil {
			return c, fmt.Errorf("-tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return c, fmt.Errorf("-tls-ca: %s holds no PEM certificate", c.tlsCA)
		}
		c.tlsCfg = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	switch {
	case c.producers < 1:
		return c, errors.New("-producers must be >= 1")
	case c.consumers < 0:
		return c, errors.New("-consumers must be >= 0")
	case c.size < 0:
		return c, errors.New("-size must be >= 0")
	case c.window < 0:
		return c, errors.New("-window must be >= 0")
	case c.count < 0:
		return c, errors.New("-count must be >= 0")
	case c.count == 0 && c.duration <= 0:
		return c, errors.New("-duration must be > 0 when -count is 0")
	case c.ack != frame.AckAuto && c.ack != frame.AckClient && c.ack != frame.AckClientIndividual:
		return c, fmt.Errorf("-ack must be auto, client or client-individual, not %q", c.ack)
	case c.ackBatch < 1:
		return c, errors.New("-ack-batch must be >= 1")
	case c.prefetch < 0:
		return c, errors.New("-prefetch must be >= 0")
	case c.samples < 1:
		return c, errors.New("-samples must be >= 1")
	case c.drain < 0 || c.timeout <= 0:
		return c, errors.New("-drain must be >= 0 and -timeout > 0")
	}
	for _, s := range []string{c.login, c.passcode, c.host} {
		if strings.ContainsAny(s, "\r\n\x00") {
			return c, errors.New("-login, -passcode and -host must not contain CR, LF or NUL")
		}
	}
	var err error
	if c.addrs, err = splitAddrs("-addr", c.addr); err != nil {
		return c, err
	}
	c.consumerAddrs = c.addrs
	if c.consumerAddr != "" {
		if c.consumerAddrs, err = splitAddrs("-consumer-addr", c.consumerAddr); err != nil {
			return c, err
		}
	}
	if c.mode == "backlog" && (len(c.addrs) > 1 || c.consumerAddr != "") {
		return c, errors.New("-mode backlog takes one -addr (brokerd's) and no -consumer-addr")
	}
	if c.dest == "" {
		c.dest = fmt.Sprintf("/queue/bench-%08x", rand.Uint32())
	}
	return c, nil
}

// splitAddrs splits a comma-separated list of host:port addresses.
func splitAddrs(flagName, list string) ([]string, error) {
	var out []string
	for _, a := range strings.Split(list, ",") {
		a = strings.TrimSpace(a)
		if a == "" {
			return nil, fmt.Errorf("%s %q: empty address in the list", flagName, list)
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, fmt.Errorf("%s %q: %w", flagName, list, err)
		}
		out = append(out, a)
	}
	return out, nil
}

// headerList is the repeatable -header name:value flag.
type headerList [][2]string

func (h *headerList) String() string {
	if h == nil {
		return ""
	}
	var parts []string
	for _, kv := range *h {
		parts = append(parts, kv[0]+":"+kv[1])
	}
	return strings.Join(parts, ",")
}

func (h *headerList) Set(s string) error {
	k, v, ok := strings.Cut(s, ":")
	switch {
	case !ok || k == "":
		return fmt.Errorf("want name:value, not %q", s)
	case strings.ContainsAny(s, "\r\n\x00"):
		return errors.New("a header must not contain CR, LF or NUL")
	}
	*h = append(*h, [2]string{k, v})
	return nil
}

// addTo adds the headers to f.
func (h headerList) addTo(f *frame.Frame) {
	for _, kv := range h {
		f.Header.Add(kv[0], kv[1])
	}
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	switch cfg.mode {
	case "backlog":
		os.Exit(backlogMain(cfg))
	case "fsync":
		os.Exit(fsyncMain(cfg))
	}
	os.Exit(newRun(cfg).main())
}

// ---------------------------------------------------------------------------
// Latency samples

// reservoir keeps a uniform sample of at most cap values (Algorithm R) and
// the exact maximum.
type reservoir struct {
	mu   sync.Mutex
	cap  int
	n    int64
	max  int64
	vals []int64
	rng  *rand.Rand
}

func newReservoir(capacity int) *reservoir {
	return &reservoir{cap: capacity, rng: rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))}
}

func (r *reservoir) add(v int64) {
	if v < 0 {
		v = 0
	}
	r.mu.Lock()
	r.n++
	if v > r.max {
		r.max = v
	}
	if len(r.vals) < r.cap {
		r.vals = append(r.vals, v)
	} else if j := r.rng.Int64N(r.n); j < int64(r.cap) {
		r.vals[j] = v
	}
	r.mu.Unlock()
}

// summary returns p50, p99 and max in milliseconds (zeros when empty) and
// the number of values seen.
func (r *reservoir) summary() (p50, p99, top float64, n int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.vals) == 0 {
		return 0, 0, 0, r.n
	}
	s := slices.Clone(r.vals)
	slices.Sort(s)
	pct := func(p float64) float64 {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		i = min(max(i, 0), len(s)-1)
		return ms(s[i])
	}
	return pct(0.50), pct(0.99), ms(r.max), r.n
}

func ms(nanos int64) float64 { return float64(nanos) / 1e6 }

// ---------------------------------------------------------------------------
// Run state

type run struct {
	cfg   config
	id    string // x-run header: ignore messages left over from other runs
	body  []byte
	start time.Time

	failed   chan struct{} // closed on the first failure
	failOnce sync.Once
	errMu    sync.Mutex
	errs     []string // every failure, in order
	brokerEr []string // ERROR frames (also in errs)

	stop      chan struct{} // closed to stop producers early (Ctrl-C)
	stopOnce  sync.Once
	abort     chan struct{} // closed to cut the drain short (second Ctrl-C)
	abortOnce sync.Once
	producers []*producer
	consumers []*consumer

	totalSent  atomic.Int64
	uniqueRecv atomic.Int64
	deliveries atomic.Int64
	redeliv    atomic.Int64
	foreign    atomic.Int64 // MESSAGEs not from this run
	lastRecv   atomic.Int64 // unix nanos of the last first-time delivery
	firstRecv  atomic.Int64 // unix nanos of the first delivery of this run's messages

	e2e  *reservoir
	rcpt *reservoir

	trackers []*tracker // deliveries per message, one per producer
	src      *run       // whose producers sent what the consumers expect (nil: this run)
	series   *series    // -series: per-second figures (nil otherwise)
}

func newRun(cfg config) *run {
	body := make([]byte, cfg.size)
	const filler = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
	for i := range body {
		body[i] = filler[i%len(filler)]
	}
	return &run{
		cfg:    cfg,
		id:     fmt.Sprintf("%016x", rand.Uint64()),
		body:   body,
		failed: make(chan struct{}),
		stop:   make(chan struct{}),
		abort:  make(chan struct{}),
		e2e:    newReservoir(cfg.samples),
		rcpt:   newReservoir(cfg.samples),
	}
}

func (r *run) fail(err error) {
	r.errMu.Lock()
	r.errs = append(r.errs, err.Error())
	r.errMu.Unlock()
	fmt.Fprintln(os.Stderr, "bench:", err)
	r.failOnce.Do(func() { close(r.failed) })
}

func (r *run) isFailed() bool {
	select {
	case <-r.failed:
		return true
	default:
		return false
	}
}

// brokerError reports an ERROR frame loudly and fails the run.
func (r *run) brokerError(who string, f *frame.Frame) {
	msg := f.Header.Get(frame.Message)
	var b strings.Builder
	fmt.Fprintf(&b, "ERROR frame from broker on %s connection: message=%q", who, msg)
	if rid := f.Header.Get(frame.ReceiptId); rid != "" {
		fmt.Fprintf(&b, " receipt-id=%q", rid)
	}
	if body := strings.TrimSpace(string(f.Body)); body != "" {
		fmt.Fprintf(&b, "\n--- ERROR body ---\n%s\n------------------", body)
	}
	r.errMu.Lock()
	r.brokerEr = append(r.brokerEr, who+": "+msg)
	r.errMu.Unlock()
	r.fail(errors.New(b.String()))
}

// ---------------------------------------------------------------------------
// STOMP connection

type conn struct {
	r       *run
	name    string
	nc      net.Conn
	br      *bufio.Reader // under rd: Buffered() == 0 means the next Read blocks
	rd      *frame.Reader
	bw      *bufio.Writer // under wr: flushed explicitly, see flush
	wr      *frame.Writer
	wmu     sync.Mutex
	version string

	mu      sync.Mutex
	waiters map[string]chan struct{} // control receipts (SUBSCRIBE, DISCONNECT)

	closing atomic.Bool
	done    chan struct{} // closed when the read loop has exited
}

// dial opens a TCP connection to addr and performs the STOMP 1.2 handshake.
func dial(r *run, name, addr string) (*conn, error) {
	cfg := r.cfg
	var nc net.Conn
	var err error
	if cfg.ws {
		scheme := "ws://"
		if cfg.tlsCfg != nil {
			scheme = "wss://"
		}
		ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout)
		nc, err = stomp.DialWebSocket(ctx, scheme+addr+stomp.WSPath, cfg.tlsCfg, nil)
		cancel()
	} else if cfg.tlsCfg != nil {
		tc := cfg.tlsCfg.Clone()
		tc.ServerName, _, _ = net.SplitHostPort(addr)
		nc, err = tls.DialWithDialer(&net.Dialer{Timeout: cfg.timeout}, "tcp", addr, tc)
	} else {
		nc, err = net.DialTimeout("tcp", addr, cfg.timeout)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(cfg.addrs) > 1 || cfg.consumerAddr != "" {
		name += "@" + addr // which node, when there are several
	}
	c := &conn{
		r: r, name: name, nc: nc,
		br:      bufio.NewReaderSize(nc, 64<<10),
		bw:      bufio.NewWriterSize(nc, 64<<10),
		waiters: map[string]chan struct{}{},
		done:    make(chan struct{}),
	}
	// frame.Reader adopts br as is (bufio.NewReaderSize returns a large
	// enough *bufio.Reader unchanged). frame.Writer flushes its own buffer
	// after every frame, so it writes through a plain io.Writer into bw,
	// which is flushed only when the writer would otherwise wait (see
	// flush): many frames per syscall under load, no added latency.
	c.rd = frame.NewReaderSize(c.br, 64<<10)
	c.wr = frame.NewWriterSize(plainWriter{c.bw}, 4096)
	// CONNECT header values are not escaped (STOMP 1.2), so it is written by
	// hand rather than with frame.Writer.
	var b strings.Builder
	b.WriteString("CONNECT\naccept-version:1.2\nhost:" + cfg.host + "\nheart-beat:0,0\n")
	if cfg.login != "" {
		b.WriteString("login:" + cfg.login + "\n")
	}
	if cfg.passcode != "" {
		b.WriteString("passcode:" + cfg.passcode + "\n")
	}
	b.WriteString("\n\x00")
	_ = nc.SetDeadline(time.Now().Add(cfg.timeout))
	if _, err := io.WriteString(nc, b.String()); err != nil {
		nc.Close()
		return nil, fmt.Errorf("%s: CONNECT: %w", name, err)
	}
	var f *frame.Frame
	for f == nil && err == nil { // skip heart-beat newlines
		f, err = c.rd.Read()
	}
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("%s: waiting for CONNECTED: %w", name, err)
	}
	_ = nc.SetDeadline(time.Time{})
	switch f.Command {
	case frame.CONNECTED:
		c.version = f.Header.Get(frame.Version)
		return c, nil
	case frame.ERROR:
		nc.Close()
		r.brokerError(name, f)
		return nil, fmt.Errorf("%s: CONNECT refused", name)
	default:
		nc.Close()
		return nil, fmt.Errorf("%s: expected CONNECTED, got %s", name, f.Command)
	}
}

// errClosing is returned by write once disconnect has begun: nothing but
// the DISCONNECT itself is sent after it (no late ACKs).
var errClosing = errors.New("connection closing")

// errConnEnded: the read loop ended while waiting for a RECEIPT.
var errConnEnded = errors.New("connection ended")

// plainWriter hides bufio.Writer's identity from bufio.NewWriterSize.
type plainWriter struct{ io.Writer }

// write buffers f; it goes out with the next flush (or when the buffer
// fills up).
func (c *conn) write(f *frame.Frame) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closing.Load() && f.Command != frame.DISCONNECT {
		return errClosing
	}
	if err := c.wr.Write(f); err != nil {
		return fmt.Errorf("%s: writing %s: %w", c.name, f.Command, err)
	}
	return nil
}

// flush sends whatever write has buffered.
func (c *conn) flush() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.bw.Buffered() == 0 {
		return nil
	}
	if err := c.bw.Flush(); err != nil {
		return fmt.Errorf("%s: write: %w", c.name, err)
	}
	return nil
}

// writeNow writes f and flushes.
func (c *conn) writeNow(f *frame.Frame) error {
	if err := c.write(f); err != nil {
		return err
	}
	return c.flush()
}

// loop reads frames until the connection ends. Control receipts wake their
// waiters, ERROR frames fail the run, everything else goes to handle.
func (c *conn) loop(handle func(*frame.Frame)) {
	defer close(c.done)
	flushFailed := false
	for {
		if c.br.Buffered() == 0 && !flushFailed {
			// About to block on the socket: send the ACKs (or SENDs)
			// buffered meanwhile.
			if err := c.flush(); err != nil {
				flushFailed = true
				if !c.closing.Load() {
					c.r.fail(err)
				}
			}
		}
		f, err := c.rd.Read()
		if err != nil {
			if !c.closing.Load() {
				c.r.fail(fmt.Errorf("%s: connection lost: %w", c.name, err))
			}
			return
		}
		if f == nil {
			continue // heart-beat
		}
		switch f.Command {
		case frame.ERROR:
			c.r.brokerError(c.name, f)
			return
		case frame.RECEIPT:
			id := f.Header.Get(frame.ReceiptId)
			c.mu.Lock()
			ch, ok := c.waiters[id]
			delete(c.waiters, id)
			c.mu.Unlock()
			if ok {
				close(ch)
				continue
			}
		}
		handle(f)
	}
}

// request sends f with receipt:id and waits up to timeout for the RECEIPT.
func (c *conn) request(f *frame.Frame, id string, timeout time.Duration) error {
	ch := make(chan struct{})
	c.mu.Lock()
	c.waiters[id] = ch
	c.mu.Unlock()
	f.Header.Set(frame.Receipt, id)
	if err := c.writeNow(f); err != nil {
		return err
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-ch:
		return nil
	case <-c.done:
		select {
		case <-ch:
			return nil
		default:
		}
		return fmt.Errorf("%s: %w before the RECEIPT for %s", c.name, errConnEnded, f.Command)
	case <-t.C:
		return fmt.Errorf("%s: no RECEIPT for %s within %s", c.name, f.Command, timeout)
	}
}

// disconnect sends DISCONNECT with a receipt, waits up to timeout for it
// and closes the connection.
func (c *conn) disconnect(timeout time.Duration) error {
	c.wmu.Lock()
	c.closing.Store(true)
	c.wmu.Unlock()
	var err error
	select {
	case <-c.done: // already gone (a failure has been reported)
	default:
		err = c.request(frame.New(frame.DISCONNECT), "disconnect", timeout)
		if errors.Is(err, errConnEnded) && c.r.isFailed() {
			err = nil // the reason has been reported already
		}
	}
	c.nc.Close()
	<-c.done
	return err
}

// ---------------------------------------------------------------------------
// Producer

type producer struct {
	r     *run
	idx   int
	c     *conn
	quota int64 // messages to send with -count, 0 = until the deadline
	sem   chan struct{}

	mu          sync.Mutex
	pending     map[uint64]int64 // seq -> x-sent, awaiting RECEIPT
	receipted   []bool           // by seq
	nReceipted  int64
	lastReceipt time.Time
	maxGap      time.Duration // longest time between consecutive receipts
	maxGapAt    time.Time     // when the receipt ending it arrived
	allDone     chan struct{} // closed when pending drains after sending stopped
	sendingDone bool

	sent     int64
	lastSend time.Time
	end      time.Time // last receipt (window > 0) or last send
}

func (p *producer) handle(f *frame.Frame) {
	if f.Command != frame.RECEIPT {
		p.r.fail(fmt.Errorf("%s: unexpected %s frame", p.c.name, f.Command))
		return
	}
	rid := f.Header.Get(frame.ReceiptId)
	seq, err := strconv.ParseUint(rid, 10, 64)
	if err != nil {
		p.r.fail(fmt.Errorf("%s: RECEIPT with unknown receipt-id %q", p.c.name, rid))
		return
	}
	now := time.Now()
	p.mu.Lock()
	sentAt, ok := p.pending[seq]
	if ok {
		delete(p.pending, seq)
		for uint64(len(p.receipted)) <= seq {
			p.receipted = append(p.receipted, make([]bool, len(p.receipted)+1024)...)
		}
		p.receipted[seq] = true
		p.nReceipted++
		if !p.lastReceipt.IsZero() {
			if gap := now.Sub(p.lastReceipt); gap > p.maxGap {
				p.maxGap, p.maxGapAt = gap, now
			}
		}
		p.lastReceipt = now
		if p.sendingDone && len(p.pending) == 0 {
			close(p.allDone)
		}
	}
	p.mu.Unlock()
	if !ok {
		p.r.fail(fmt.Errorf("%s: duplicate or unexpected RECEIPT receipt-id=%q", p.c.name, rid))
		return
	}
	p.r.rcpt.add(now.UnixNano() - sentAt)
	if s := p.r.series; s != nil {
		s.receipt(now.UnixNano(), now.UnixNano()-sentAt)
	}
	<-p.sem
}

func (p *producer) run(deadline time.Time) {
	r, cfg := p.r, p.r.cfg
	stopped := func() bool {
		select {
		case <-r.failed:
			return true
		case <-r.stop:
			return true
		default:
			return false
		}
	}
	timer := time.NewTimer(time.Until(deadline))
	if cfg.count > 0 {
		timer.Stop()
	}
	defer timer.Stop()
	prefix := strconv.Itoa(p.idx) + "-"
	size := strconv.Itoa(cfg.size)
	var seq uint64
loop:
	for {
		if cfg.count > 0 {
			if int64(seq) >= p.quota {
				break
			}
		} else if !time.Now().Before(deadline) {
			break
		}
		if stopped() {
			break
		}
		if cfg.window > 0 {
			select {
			case p.sem <- struct{}{}:
			default:
				// The window is full: send what is buffered, then wait.
				if err := p.c.flush(); err != nil {
					r.fail(err)
					break loop
				}
				select {
				case p.sem <- struct{}{}:
				case <-timer.C:
					break loop
				case <-r.failed:
					break loop
				case <-r.stop:
					break loop
				}
			}
		}
		f := frame.New(frame.SEND,
			frame.Destination, cfg.dest,
			frame.ContentLength, size,
			"x-run", r.id,
			"x-seq", prefix+strconv.FormatUint(seq, 10))
		if cfg.persistent {
			f.Header.Add("persistent", "true")
		}
		cfg.headers.addTo(f)
		f.Body = r.body
		now := time.Now()
		f.Header.Add("x-sent", strconv.FormatInt(now.UnixNano(), 10))
		if cfg.window > 0 {
			f.Header.Add(frame.Receipt, strconv.FormatUint(seq, 10))
			p.mu.Lock()
			p.pending[seq] = now.UnixNano()
			p.mu.Unlock()
		}
		if err := p.c.write(f); err != nil {
			r.fail(err)
			break
		}
		seq++
		p.sent = int64(seq)
		r.totalSent.Add(1)
	}
	if err := p.c.flush(); err != nil {
		r.fail(err)
	}
	p.lastSend = time.Now()
	p.end = p.lastSend
	if cfg.window > 0 {
		p.mu.Lock()
		p.sendingDone = true
		if len(p.pending) == 0 {
			close(p.allDone)
		}
		p.mu.Unlock()
		t := time.NewTimer(cfg.drain)
		select {
		case <-p.allDone:
		case <-r.failed:
		case <-r.abort:
		case <-t.C:
		}
		t.Stop()
		p.mu.Lock()
		if n := len(p.pending); n > 0 && !r.isFailed() {
			fmt.Fprintf(os.Stderr, "bench: %s: %d SENDs without RECEIPT when the wait for them ended (-drain %s)\n", p.c.name, n, cfg.drain)
		}
		if p.nReceipted > 0 {
			p.end = p.lastReceipt
		}
		p.mu.Unlock()
	}
	// With -window 0 the RECEIPT for DISCONNECT is the broker's word that
	// it has processed every SEND; behind a backlog it may take a while.
	if err := p.c.disconnect(cfg.timeout + cfg.drain); err != nil {
		r.fail(err)
	}
}

// ---------------------------------------------------------------------------
// Consumer

// tracker counts deliveries per message of one producer.
type tracker struct {
	mu   sync.Mutex
	recv []uint8 // deliveries by seq, saturating at 255
}

// record notes one delivery of seq and returns how many came before it.
func (t *tracker) record(seq uint64) uint8 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if seq >= uint64(len(t.recv)) {
		n := max(seq+1, uint64(2*len(t.recv)), 4096)
		t.recv = append(t.recv, make([]uint8, n-uint64(len(t.recv)))...)
	}
	prev := t.recv[seq]
	if prev < math.MaxUint8 {
		t.recv[seq]++
	}
	return prev
}

func (t *tracker) get(seq int64) uint8 {
	if seq < int64(len(t.recv)) {
		return t.recv[seq]
	}
	return 0
}

type consumer struct {
	r        *run
	idx      int
	c        *conn
	subID    string
	trackers []*tracker

	ackMu     sync.Mutex
	unacked   int          // -ack client: deliveries since the last ACK
	last      *frame.Frame // -ack client: latest MESSAGE
	ackFailed bool
}

func (cs *consumer) ackFrame(m *frame.Frame) *frame.Frame {
	if id := m.Header.Get(frame.Ack); id != "" {
		return frame.New(frame.ACK, frame.Id, id) // STOMP 1.2
	}
	// STOMP 1.0/1.1 broker
	return frame.New(frame.ACK,
		frame.MessageId, m.Header.Get(frame.MessageId),
		frame.Subscription, m.Header.Get(frame.Subscription))
}

func (cs *consumer) handle(f *frame.Frame) {
	r := cs.r
	if f.Command != frame.MESSAGE {
		r.fail(fmt.Errorf("%s: unexpected %s frame (receipt-id=%q)", cs.c.name, f.Command, f.Header.Get(frame.ReceiptId)))
		return
	}
	now := time.Now().UnixNano()
	// ACK before counting, so that once the drain sees every message
	// received, every ACK has been written.
	cs.ack(f)
	r.deliveries.Add(1)
	if f.Header.Get("redelivered") == "true" {
		r.redeliv.Add(1)
	}
	if f.Header.Get("x-run") != r.id {
		r.foreign.Add(1)
		return
	}
	r.firstRecv.CompareAndSwap(0, now)
	if sent, err := strconv.ParseInt(f.Header.Get("x-sent"), 10, 64); err == nil {
		r.e2e.add(now - sent)
	}
	if len(f.Body) != r.cfg.size {
		r.fail(fmt.Errorf("%s: MESSAGE %s has a %d-byte body, sent %d", cs.c.name, f.Header.Get("x-seq"), len(f.Body), r.cfg.size))
	}
	p, s, ok := strings.Cut(f.Header.Get("x-seq"), "-")
	pi, err1 := strconv.Atoi(p)
	seq, err2 := strconv.ParseUint(s, 10, 64)
	switch {
	case !ok || err1 != nil || err2 != nil || pi < 0 || pi >= len(cs.trackers):
		r.fail(fmt.Errorf("%s: MESSAGE with malformed x-seq %q", cs.c.name, f.Header.Get("x-seq")))
	case cs.trackers[pi].record(seq) == 0:
		r.uniqueRecv.Add(1)
		r.lastRecv.Store(now)
		if s := r.series; s != nil {
			s.received(now)
		}
	}
}

// ack acknowledges m as the ack mode requires.
func (cs *consumer) ack(m *frame.Frame) {
	cs.ackMu.Lock()
	defer cs.ackMu.Unlock()
	switch cs.r.cfg.ack {
	case frame.AckClientIndividual:
		cs.writeAck(cs.ackFrame(m))
	case frame.AckClient:
		cs.unacked++
		cs.last = m
		if cs.unacked >= cs.r.cfg.ackBatch {
			cs.writeAck(cs.ackFrame(m))
			cs.unacked, cs.last = 0, nil
		}
	}
}

// writeAck sends an ACK; the first write error fails the run, later ones
// (and those after disconnect has begun) are dropped.
func (cs *consumer) writeAck(f *frame.Frame) {
	if cs.ackFailed {
		return
	}
	if err := cs.c.write(f); err != nil && !errors.Is(err, errClosing) {
		cs.ackFailed = true
		cs.r.fail(err)
	}
}

// flushAck acknowledges the remainder of a -ack client batch.
func (cs *consumer) flushAck() {
	cs.ackMu.Lock()
	defer cs.ackMu.Unlock()
	if cs.last != nil {
		cs.writeAck(cs.ackFrame(cs.last))
	}
	cs.unacked, cs.last = 0, nil
}

func (cs *consumer) subscribe() error {
	cfg := cs.r.cfg
	f := frame.New(frame.SUBSCRIBE,
		frame.Id, cs.subID,
		frame.Destination, cfg.dest,
		frame.Ack, cfg.ack)
	if cfg.prefetch > 0 {
		n := strconv.Itoa(cfg.prefetch)
		f.Header.Add("prefetch-count", n)
		f.Header.Add("activemq.prefetchSize", n)
	}
	cfg.headers.addTo(f)
	if !cfg.subReceipt {
		return cs.c.write(f)
	}
	return cs.c.request(f, "subscribe-"+cs.subID, cfg.timeout)
}

// ---------------------------------------------------------------------------
// Orchestration

func (r *run) main() int {
	cfg := r.cfg
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		fmt.Fprintln(os.Stderr, "bench: interrupted: stopping producers (again to cut the drain short)")
		r.stopOnce.Do(func() { close(r.stop) })
		<-sig
		fmt.Fprintln(os.Stderr, "bench: interrupted again: cutting the drain short (a third time kills)")
		r.abortOnce.Do(func() { close(r.abort) })
		signal.Stop(sig)
	}()

	var mem *memSampler
	if cfg.pid > 0 {
		mem = startMemSampler(cfg.pid, 250*time.Millisecond)
	}
	var ck *storeWatch
	if cfg.admin != "" {
		ck = newStoreWatch(cfg.admin)
	}
	if err := r.setup(nil); err != nil {
		r.teardown()
		return r.finish(time.Now(), mem, ck)
	}
	r.begin(ck)
	sendEnd := r.produce()
	r.waitDrain(false)
	r.closeConsumers()
	return r.finish(sendEnd, mem, ck)
}

// finish stops the samplers and reports.
func (r *run) finish(sendEnd time.Time, mem *memSampler, ck *storeWatch) int {
	res := r.compute(sendEnd)
	if mem != nil {
		st := mem.stop()
		res.Broker = &st
	}
	if ck != nil {
		res.Store = ck.stop()
	}
	return r.emit(&res)
}

// setup connects and subscribes the consumers, then connects the
// producers. Their messages are tracked in trackers (new ones, one per
// producer, when nil). On failure it has reported the failure; the caller
// then calls teardown.
func (r *run) setup(trackers []*tracker) error {
	cfg := r.cfg
	if trackers == nil {
		trackers = make([]*tracker, cfg.producers)
		for i := range trackers {
			trackers[i] = &tracker{}
		}
	}
	r.trackers = trackers
	var setupErr error
	for i := 0; i < cfg.consumers && setupErr == nil; i++ {
		c, err := dial(r, fmt.Sprintf("consumer-%d", i), cfg.consumerAddrs[i%len(cfg.consumerAddrs)])
		if err != nil {
			setupErr = err
			break
		}
		cs := &consumer{r: r, idx: i, c: c, subID: fmt.Sprintf("sub-%d", i), trackers: trackers}
		r.consumers = append(r.consumers, cs)
		go c.loop(cs.handle)
		if cfg.producers == 0 && r.start.IsZero() {
			// A consumer-only run (the backlog drain) counts from the
			// first SUBSCRIBE.
			r.start = time.Now()
		}
		if err := cs.subscribe(); err != nil {
			setupErr = err
		}
	}
	for i := 0; i < cfg.producers && setupErr == nil; i++ {
		c, err := dial(r, fmt.Sprintf("producer-%d", i), cfg.addrs[i%len(cfg.addrs)])
		if err != nil {
			setupErr = err
			break
		}
		p := &producer{
			r: r, idx: i, c: c,
			sem:     make(chan struct{}, max(cfg.window, 1)),
			pending: map[uint64]int64{},
			allDone: make(chan struct{}),
		}
		if cfg.count > 0 {
			p.quota = cfg.count / int64(cfg.producers)
			if int64(i) < cfg.count%int64(cfg.producers) {
				p.quota++
			}
		}
		r.producers = append(r.producers, p)
		go c.loop(p.handle)
	}
	if setupErr != nil && !r.isFailed() {
		r.fail(setupErr)
	}
	return setupErr
}

// teardown disconnects whatever setup connected, after a failure.
func (r *run) teardown() {
	for _, p := range r.producers {
		_ = p.c.disconnect(r.cfg.timeout)
	}
	for _, cs := range r.consumers {
		_ = cs.c.disconnect(r.cfg.timeout)
	}
}

// begin marks the start of the measurement (unless setup already has).
func (r *run) begin(ck *storeWatch) {
	if r.start.IsZero() {
		r.start = time.Now()
	}
	if r.cfg.series {
		r.series = newSeries(r.start)
		if ck != nil {
			ck.attach(r.series)
		}
	}
}

// produce runs the producers to the end and returns when they have all
// stopped (and waited for their receipts).
func (r *run) produce() time.Time {
	deadline := r.start.Add(r.cfg.duration)
	var wg sync.WaitGroup
	for _, p := range r.producers {
		wg.Go(func() { p.run(deadline) })
	}
	wg.Wait()
	return time.Now()
}

// expected is the number of messages the consumers should receive: all
// those sent by the producers of the source run.
func (r *run) expected() int64 { return r.source().totalSent.Load() }

func (r *run) source() *run {
	if r.src != nil {
		return r.src
	}
	return r
}

// waitDrain waits until every sent message has been received, no consumer
// connection is left, or the drain is cut short (second Ctrl-C). It gives up
// after -drain in all, or with idle after -drain without a new message. A
// failure does not cut the drain short: what was sent before it is still
// counted.
func (r *run) waitDrain(idle bool) {
	cfg := r.cfg
	if cfg.consumers == 0 {
		return
	}
	consumersGone := func() bool {
		for _, cs := range r.consumers {
			select {
			case <-cs.c.done:
			default:
				return false
			}
		}
		return true
	}
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	limit := time.Now().Add(cfg.drain)
	last := r.uniqueRecv.Load()
	for {
		n := r.uniqueRecv.Load()
		if n >= r.expected() {
			return
		}
		if idle && n != last {
			last = n
			limit = time.Now().Add(cfg.drain)
		}
		if !time.Now().Before(limit) {
			return
		}
		select {
		case <-tick.C:
			if consumersGone() {
				return
			}
		case <-r.abort:
			return
		}
	}
}

// closeConsumers acknowledges what is left and disconnects the consumers.
func (r *run) closeConsumers() {
	for _, cs := range r.consumers {
		cs.flushAck()
		if err := cs.c.disconnect(r.cfg.timeout); err != nil {
			r.fail(err)
		}
	}
}

// result is the JSON line.
type result struct {
	Label      string  `json:"label"`
	Addr       string  `json:"addr"`
	Dest       string  `json:"dest"`
	Producers  int     `json:"producers"`
	Consumers  int     `json:"consumers"`
	Size       int     `json:"size"`
	DurationS  float64 `json:"duration_s"`
	Count      int64   `json:"count"`
	Persistent bool    `json:"persistent"`
	Window     int     `json:"window"`
	Ack        string  `json:"ack"`
	AckBatch   int     `json:"ack_batch"`
	Prefetch   int     `json:"prefetch"`
	DrainS     float64 `json:"drain_s"`

	SendRate    float64 `json:"send_rate"` // receipted/s with window > 0, else sent/s
	RecvRate    float64 `json:"recv_rate"` // unique received/s
	SendSecs    float64 `json:"send_s"`    // start -> last receipt (or last send)
	RecvSecs    float64 `json:"recv_s"`    // start -> last first-time delivery
	LatP50      float64 `json:"lat_p50_ms"`
	LatP99      float64 `json:"lat_p99_ms"`
	LatMax      float64 `json:"lat_max_ms"`
	RcptP50     float64 `json:"receipt_p50_ms"`
	RcptP99     float64 `json:"receipt_p99_ms"`
	RcptMax     float64 `json:"receipt_max_ms"`
	Sent        int64   `json:"sent"`
	Receipted   int64   `json:"receipted"`
	Unreceipted int64   `json:"unreceipted"`
	Received    int64   `json:"received"`   // distinct messages received
	Deliveries  int64   `json:"deliveries"` // MESSAGE frames of this run (incl. duplicates)
	Lost        int64   `json:"lost"`
	Duplicated  int64   `json:"duplicated"` // distinct messages received more than once
	Redelivered int64   `json:"redelivered"`
	Foreign     int64   `json:"foreign"` // MESSAGEs from other runs on the same destination
	BrokerError bool    `json:"broker_error"`
	Errors      int     `json:"errors"`
	OK          bool    `json:"ok"`

	// ConsumerAddr is -consumer-addr, when given.
	ConsumerAddr string `json:"consumer_addr,omitempty"`
	// RcptGap is the longest time between two consecutive receipts of one
	// producer (what a failover stalls); RcptGapAt is when the receipt
	// ending it arrived, in seconds from the start, and RcptGapWho the
	// producer's connection.
	RcptGap    float64 `json:"max_receipt_gap_ms"`
	RcptGapAt  float64 `json:"max_receipt_gap_at_s"`
	RcptGapWho string  `json:"max_receipt_gap_producer,omitempty"`

	// With -pid: the broker's memory, sampled every 250 ms.
	Broker *memStats `json:"broker,omitempty"`
	// With -admin: wraps of brokerd's write-ahead log during the run.
	Store *storeCounts `json:"store,omitempty"`
	// With -series: one point per second of the run, and a digest.
	*seriesStats
	Series []point `json:"series,omitempty"`
}

// compute gathers the figures of the run.
func (r *run) compute(sendEnd time.Time) result {
	cfg := r.cfg
	src := r.source()
	res := result{
		Label: cfg.label, Addr: cfg.addr, ConsumerAddr: cfg.consumerAddr, Dest: cfg.dest,
		Producers: cfg.producers, Consumers: cfg.consumers, Size: cfg.size,
		DurationS: cfg.duration.Seconds(), Count: cfg.count, Persistent: cfg.persistent,
		Window: cfg.window, Ack: cfg.ack, AckBatch: cfg.ackBatch, Prefetch: cfg.prefetch,
		DrainS: cfg.drain.Seconds(),
	}
	var trackers []*tracker
	if len(r.consumers) > 0 {
		trackers = r.consumers[0].trackers
	}
	var end time.Time
	for _, p := range src.producers {
		p.mu.Lock()
		res.Sent += p.sent
		res.Receipted += p.nReceipted
		for seq := int64(0); seq < p.sent; seq++ {
			counted := src.cfg.window == 0 || (seq < int64(len(p.receipted)) && p.receipted[seq])
			n := uint8(0)
			if trackers != nil {
				n = trackers[p.idx].get(seq)
			}
			if counted && n == 0 && cfg.consumers > 0 {
				res.Lost++
			}
		}
		if p.end.After(end) {
			end = p.end
		}
		if p.maxGap > 0 && ms(int64(p.maxGap)) > res.RcptGap {
			res.RcptGap = ms(int64(p.maxGap))
			res.RcptGapAt = p.maxGapAt.Sub(src.start).Seconds()
			res.RcptGapWho = p.c.name
		}
		p.mu.Unlock()
	}
	if src.cfg.window > 0 {
		res.Unreceipted = res.Sent - res.Receipted
	}
	for _, t := range trackers {
		for _, n := range t.recv {
			if n > 1 {
				res.Duplicated++
			}
		}
	}
	res.Received = r.uniqueRecv.Load()
	res.Deliveries = r.deliveries.Load() - r.foreign.Load()
	res.Redelivered = r.redeliv.Load()
	res.Foreign = r.foreign.Load()
	if !r.start.IsZero() {
		if end.IsZero() {
			end = sendEnd
		}
		done := res.Sent
		if cfg.window > 0 {
			done = res.Receipted
		}
		if src == r {
			res.SendSecs = end.Sub(r.start).Seconds()
			if res.SendSecs > 0 {
				res.SendRate = float64(done) / res.SendSecs
			}
		}
		if lr := r.lastRecv.Load(); lr > 0 {
			res.RecvSecs = time.Unix(0, lr).Sub(r.start).Seconds()
			if res.RecvSecs > 0 {
				res.RecvRate = float64(res.Received) / res.RecvSecs
			}
		}
	}
	res.LatP50, res.LatP99, res.LatMax, _ = r.e2e.summary()
	res.RcptP50, res.RcptP99, res.RcptMax, _ = r.rcpt.summary()
	r.errMu.Lock()
	res.BrokerError = len(r.brokerEr) > 0
	res.Errors = len(r.errs)
	r.errMu.Unlock()
	res.OK = res.Errors == 0 && res.Lost == 0
	if r.series != nil {
		res.Series = r.series.points()
		if cfg.window > 0 {
			st := summarize(res.Series)
			res.seriesStats = &st
		}
	}
	return res
}

// emit prints the summary (unless -json) and the JSON line, and returns
// the exit status.
func (r *run) emit(res *result) int {
	if !r.cfg.jsonOnly {
		r.printSummary(res)
	}
	line, _ := json.Marshal(res)
	fmt.Println(string(line))
	if res.OK {
		return 0
	}
	return 1
}

func (r *run) printSummary(res *result) {
	cfg := r.cfg
	w := os.Stdout
	title := cfg.addr
	if cfg.label != "" {
		title = cfg.label + " @ " + cfg.addr
	}
	if cfg.consumerAddr != "" {
		title += " (consumers @ " + cfg.consumerAddr + ")"
	}
	fmt.Fprintf(w, "== %s  %s ==\n", title, cfg.dest)
	load := fmt.Sprintf("duration=%s", cfg.duration)
	if cfg.count > 0 {
		load = fmt.Sprintf("count=%d", cfg.count)
	}
	fmt.Fprintf(w, "params    producers=%d consumers=%d size=%dB %s persistent=%t window=%d ack=%s",
		cfg.producers, cfg.consumers, cfg.size, load, cfg.persistent, cfg.window, cfg.ack)
	if cfg.ack == frame.AckClient {
		fmt.Fprintf(w, " ack-batch=%d", cfg.ackBatch)
	}
	fmt.Fprintf(w, " prefetch=%d\n", cfg.prefetch)
	what := "sent, fire and forget"
	if cfg.window > 0 {
		what = "receipted"
	}
	done := res.Sent
	if cfg.window > 0 {
		done = res.Receipted
	}
	fmt.Fprintf(w, "sent      %10.1f msg/s  (%s: %d in %.3fs)\n", res.SendRate, what, done, res.SendSecs)
	fmt.Fprintf(w, "received  %10.1f msg/s  (%d in %.3fs)\n", res.RecvRate, res.Received, res.RecvSecs)
	fmt.Fprintf(w, "latency   end-to-end p50 %.3f ms  p99 %.3f ms  max %.3f ms\n", res.LatP50, res.LatP99, res.LatMax)
	if cfg.window > 0 {
		fmt.Fprintf(w, "receipt   p50 %.3f ms  p99 %.3f ms  max %.3f ms\n", res.RcptP50, res.RcptP99, res.RcptMax)
		if res.RcptGapWho != "" {
			fmt.Fprintf(w, "max receipt gap %.3f ms  (between consecutive receipts of %s, ended at %.3fs)\n", res.RcptGap, res.RcptGapWho, res.RcptGapAt)
		} else {
			fmt.Fprintf(w, "max receipt gap -  (no producer got two receipts)\n")
		}
	}
	fmt.Fprintf(w, "counts    sent=%d receipted=%d received=%d lost=%d duplicated=%d redelivered=%d",
		res.Sent, res.Receipted, res.Received, res.Lost, res.Duplicated, res.Redelivered)
	if res.Unreceipted > 0 {
		fmt.Fprintf(w, " unreceipted=%d", res.Unreceipted)
	}
	if res.Foreign > 0 {
		fmt.Fprintf(w, " foreign=%d", res.Foreign)
	}
	fmt.Fprintln(w)
	if res.Broker != nil {
		fmt.Fprintf(w, "broker    pid %d %s\n", cfg.pid, res.Broker)
	}
	if res.Store != nil {
		fmt.Fprintf(w, "store     %s during the run\n", res.Store)
	}
	if res.Series != nil {
		printSeries(w, res.Series, cfg.window > 0)
	}
	switch {
	case res.OK:
		fmt.Fprintln(w, "result    OK")
	default:
		var why []string
		if res.Lost > 0 {
			why = append(why, fmt.Sprintf("%d lost", res.Lost))
		}
		if res.BrokerError {
			why = append(why, "broker sent ERROR")
		}
		if res.Errors > 0 {
			why = append(why, fmt.Sprintf("%d error(s), see stderr", res.Errors))
		}
		fmt.Fprintf(w, "result    FAIL (%s)\n", strings.Join(why, ", "))
	}
}
