package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// ErrClosed is returned for work submitted after Close.
var ErrClosed = errors.New("store closed")

// ErrCorruptLog is wrapped by Open's error when a record in the middle of
// the write-ahead log fails its checksum while the records after it check
// and show it had been synced (see Replay in the package documentation):
// damage, not a write torn by a crash. Config.Recover decides.
var ErrCorruptLog = errors.New("write-ahead log corrupt")

// RecoverMode says what Open does with a write-ahead log corrupt in the
// middle (ErrCorruptLog).
type RecoverMode int

const (
	// RecoverRefuse fails Open, naming the file and the byte offset. The
	// default.
	RecoverRefuse RecoverMode = iota + 1
	// RecoverTruncate drops the bad record and every record after it,
	// logging what was dropped, and opens the store without them.
	RecoverTruncate
)

func (m RecoverMode) String() string {
	switch m {
	case RecoverRefuse:
		return "refuse"
	case RecoverTruncate:
		return "truncate"
	}
	return fmt.Sprintf("RecoverMode(%d)", int(m))
}

// SyncMode says when commits reach the disk.
type SyncMode int

const (
	// SyncAlways fsyncs (fdatasyncs the log) for every commit with sync set
	// before its callbacks run.
	SyncAlways SyncMode = iota + 1
	// SyncBatch fsyncs about every Config.SyncInterval; a crash of the
	// machine (not of the process) can lose the last interval.
	SyncBatch
	// SyncNone never fsyncs. For tests.
	SyncNone
)

func (m SyncMode) String() string {
	switch m {
	case SyncAlways:
		return "always"
	case SyncBatch:
		return "batch"
	case SyncNone:
		return "none"
	}
	return fmt.Sprintf("SyncMode(%d)", int(m))
}

// ParseSyncMode reads "always", "batch" or "none".
func ParseSyncMode(s string) (SyncMode, error) {
	switch strings.ToLower(s) {
	case "always":
		return SyncAlways, nil
	case "batch":
		return SyncBatch, nil
	case "none":
		return SyncNone, nil
	}
	return 0, fmt.Errorf("unknown sync mode %q (want always, batch or none)", s)
}

// Config configures a Store.
type Config struct {
	// Path is the bbolt file; its directory is created if missing. The
	// write-ahead log is Path + ".wal".
	Path string
	// Sync is when commits are fsynced.
	Sync SyncMode
	// SyncInterval is the fsync period under SyncBatch.
	SyncInterval time.Duration
	// MaxBatchOps caps the operations of one commit.
	MaxBatchOps int
	// WALSize is the size of the write-ahead log file, written once with
	// zeros and then overwritten in place; rounded up to 4 KiB, at least
	// 32 KiB and at most 1 GiB. It holds 16 KiB of headers and two
	// segments of half the rest each. A group commit larger than a
	// segment goes to bbolt directly. Default 64 MiB.
	WALSize int64
	// ApplyInterval is the shortest time between two bbolt transactions
	// that copy logged commits into bbolt (each is fsynced; fewer of them
	// leave the disk to the log); after a slow transaction the applier
	// waits 4 times its duration if that is longer. Reads, segment
	// switches, checkpoints and a quarter of a segment queued do not wait
	// for it.
	// Under SyncBatch the interval is at least SyncInterval. Default 10ms.
	ApplyInterval time.Duration
	// Weigh gives the weight of a value in BucketStats.Bytes and Scan's
	// maxBytes; nil means len(value). It must be a pure function of the
	// value and stay the same across restarts: the stats keep the sums of
	// its results, computed once per write.
	Weigh func(value []byte) int64
	// MinFreeBytes turns on the low-disk alarm (LowDisk) while the free
	// space for the store (the filesystem's available bytes plus bbolt's
	// free pages) is below it; checked every second once started. 0
	// disables it.
	MinFreeBytes int64
	// Recover is what Open does with a log corrupt in the middle; 0 means
	// RecoverRefuse.
	Recover RecoverMode
	// Logger receives the replay summary and failures; nil means
	// slog.Default().
	Logger *slog.Logger
	// Registerer receives the store's metrics; nil means none.
	Registerer prometheus.Registerer

	// hooks lets tests inject faults; nil in production.
	hooks *hooks
}

// hooks are the store's fault-injection seams for tests.
type hooks struct {
	// wrapWAL wraps the log file once it is open.
	wrapWAL func(walFile) walFile
	// update runs every bbolt write transaction that applies ops (the
	// applier's, replay's, commitDirect's) in place of db.Update.
	update func(db *bolt.DB, fn func(*bolt.Tx) error) error
	// switchWait is called when a segment switch has to wait for the
	// applier.
	switchWait func()
	// mapTick replaces mapLoop's ticker; mapReleased is called after
	// each of its rounds with whether it released the map's pages.
	mapTick     chan time.Time
	mapReleased func(bool)
}

// DefaultConfig returns a Config for path with every field set.
func DefaultConfig(path string) Config {
	return Config{
		Path:          path,
		Sync:          SyncAlways,
		SyncInterval:  100 * time.Millisecond,
		MaxBatchOps:   4096,
		WALSize:       64 << 20,
		ApplyInterval: 10 * time.Millisecond,
		Recover:       RecoverRefuse,
	}
}

// OpKind is what an Op does.
type OpKind int

const (
	// OpPut stores Value under (Bucket, Key).
	OpPut OpKind = iota + 1
	// OpDelete removes (Bucket, Key); deleting a missing key is not an error.
	OpDelete
	// OpPutMeta stores Value under the meta key Name.
	OpPutMeta
	// OpDeleteBucket removes Bucket with its entries and stats; deleting
	// a missing bucket is not an error.
	OpDeleteBucket
	// OpTombstone removes (Bucket, Key) as OpDelete does and remembers
	// that it was removed: until the tombstone expires (two rotations,
	// see OpRotateTombstones), a put of that key into Bucket is ignored.
	// So a removal and a put of the same key give the same state in
	// either order (see tombstone.go).
	OpTombstone
	// OpRotateTombstones forgets the tombstones older than the last
	// rotation: each lives between one and two rotation periods.
	OpRotateTombstones
	// OpDeleteMeta removes the meta key Name; removing a missing one is
	// not an error.
	OpDeleteMeta
)

func (k OpKind) String() string {
	switch k {
	case OpPut:
		return "put"
	case OpDelete:
		return "delete"
	case OpPutMeta:
		return "put-meta"
	case OpDeleteBucket:
		return "delete-bucket"
	case OpTombstone:
		return "tombstone"
	case OpRotateTombstones:
		return "rotate-tombstones"
	case OpDeleteMeta:
		return "delete-meta"
	}
	return fmt.Sprintf("OpKind(%d)", int(k))
}

// Op is one write. The store reads Value until the commit is done; the
// caller must not modify it after Submit.
type Op struct {
	Kind   OpKind
	Bucket string
	Key    uint64
	Name   string
	Value  []byte
}

type request struct {
	ops   []Op
	sync  bool
	force bool // fdatasync the log whatever the SyncMode (SetMeta)
	done  func(error)
	err   error
}

var (
	bucketMeta  = []byte("meta")
	statsBucket = []byte("stats")
)

// queuePrefix starts the name of each destination's top-level bucket. A
// top-level bucket costs one page less per commit than a nested one.
const queuePrefix = "q:"

// Store is one node's bbolt file behind a write-ahead log with a
// group-commit writer.
type Store struct {
	cfg  Config
	log  *slog.Logger
	db   *bolt.DB
	wal  *wal
	ap   *applier
	reqs chan request
	// done carries committed batches to the completer. It is a queue
	// without bound, so the writer never waits for callbacks: a callback
	// that Submits more work while reqs is full would otherwise wait for
	// the writer, which would wait for the callback.
	done    *batchQueue
	mu      sync.Mutex // guards closed, crashed, and sends on reqs against close
	closed  bool
	crashed bool // set with closed by crash: stop without a checkpoint
	// startMu guards started and noStart. It is not mu: a Submit waiting
	// on a full reqs before Start holds mu.
	startMu sync.Mutex
	started bool
	noStart bool // Close has begun; Start does nothing
	wg      sync.WaitGroup
	stop    chan struct{}
	// closing is closed when Close begins, before it takes mu, so that a
	// Submit blocked on a full reqs (holding mu) gives up.
	closing     chan struct{}
	closingOnce sync.Once
	metrics     *metrics
	replay      ReplayStats

	groupBytes   int // encoded bytes that end a group
	durable      bool
	releaseAbove int64 // mapLoop releases bbolt's map pages above this data size

	// syncReq asks the writer, the only goroutine that syncs the log, for
	// an fdatasync (from the applier and the SyncBatch loop).
	syncReq chan struct{}

	// failure is the first storage error, sticky; failed is closed then.
	failOnce sync.Once
	failure  atomic.Pointer[error]
	failed   chan struct{}

	lowDisk    atomic.Bool
	freeBytes  atomic.Int64
	walGenSeen atomic.Uint64 // the log's generation, for tests

	// Writer goroutine only.
	seq      uint64 // sequence number of the last record written
	syncNext bool   // the next commit fdatasyncs the log for a sync request

	written atomic.Uint64 // last record whose write returned
	synced  atomic.Uint64 // last record covered by a finished fdatasync
}

type metrics struct {
	commitSeconds prometheus.Histogram
	syncSeconds   prometheus.Histogram
	batchOps      prometheus.Histogram
	commitErrors  prometheus.Counter
	applySeconds  prometheus.Histogram
	checkpoints   prometheus.Counter
	failed        prometheus.Gauge
	switches      prometheus.Counter
	switchWaits   prometheus.Counter
	diskAlarm     prometheus.Gauge
	freeBytes     prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		commitSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "brokerd_store_commit_seconds",
			Help:    "Time of one group commit (write-ahead log write, and fdatasync when synced).",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
		}),
		syncSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "brokerd_store_log_sync_seconds",
			Help: "Time of one fdatasync of the write-ahead log.",
			// As stomp's latencyBuckets: 50 µs steps up to half a millisecond.
			Buckets: []float64{
				0.00005, 0.0001, 0.00015, 0.0002, 0.00025, 0.0003, 0.00035, 0.0004, 0.00045, 0.0005,
				0.0006, 0.0008, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
			},
		}),
		batchOps: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "brokerd_store_commit_ops",
			Help:    "Operations per group commit.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 14),
		}),
		commitErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "brokerd_store_commit_errors_total",
			Help: "Commits that failed.",
		}),
		applySeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "brokerd_store_apply_seconds",
			Help:    "Time of one bbolt transaction copying logged commits into bbolt (with its fsync).",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
		}),
		checkpoints: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "brokerd_store_checkpoints_total",
			Help: "Times the write-ahead log was emptied after its records were made durable in bbolt (Close, groups larger than a segment).",
		}),
		failed: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "brokerd_store_failed",
			Help: "1 once a write or fsync of the store's files failed: the store acknowledges nothing more.",
		}),
		switches: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "brokerd_store_wal_switches_total",
			Help: "Times the writer moved to the other segment of the write-ahead log.",
		}),
		switchWaits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "brokerd_store_wal_switch_waits_total",
			Help: "Segment switches that waited for the applier to copy the segment's old records into bbolt.",
		}),
		diskAlarm: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "brokerd_store_disk_alarm",
			Help: "1 while the free space for the store is below its minimum (new messages are refused).",
		}),
		freeBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "brokerd_store_free_bytes",
			Help: "Free space for the store: the filesystem's available bytes plus bbolt's free pages.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.commitSeconds, m.syncSeconds, m.batchOps, m.commitErrors, m.applySeconds, m.checkpoints, m.failed, m.switches, m.switchWaits, m.diskAlarm, m.freeBytes)
	}
	return m
}

// update runs fn in a bbolt write transaction (through the test hook when
// one is set).
func (c *Config) update(db *bolt.DB, fn func(*bolt.Tx) error) error {
	if c.hooks != nil && c.hooks.update != nil {
		return c.hooks.update(db, fn)
	}
	return db.Update(fn)
}

// Open opens (creating if needed) the bbolt file and its write-ahead log,
// and replays the log into bbolt: every commit that was written to the log
// before a crash is in bbolt when Open returns. It starts no goroutine;
// call Start before Submit.
func Open(cfg Config) (*Store, error) {
	if cfg.Sync == 0 {
		cfg.Sync = SyncAlways
	}
	if cfg.MaxBatchOps <= 0 {
		cfg.MaxBatchOps = 4096
	}
	if cfg.SyncInterval <= 0 {
		cfg.SyncInterval = 100 * time.Millisecond
	}
	if cfg.WALSize == 0 {
		cfg.WALSize = 64 << 20
	}
	if cfg.WALSize < minWALSize || cfg.WALSize > maxWALSize {
		return nil, fmt.Errorf("store: WALSize %d out of range [%d, %d]", cfg.WALSize, minWALSize, maxWALSize)
	}
	cfg.WALSize = (cfg.WALSize + walBlock - 1) / walBlock * walBlock
	if cfg.ApplyInterval <= 0 {
		cfg.ApplyInterval = 10 * time.Millisecond
	}
	if cfg.Recover == 0 {
		cfg.Recover = RecoverRefuse
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "store")
	if err := os.MkdirAll(filepath.Dir(cfg.Path), 0o750); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	durable := cfg.Sync != SyncNone
	// The freelist is persisted (NoFreelistSync false): Open reads it
	// instead of visiting every page of the file, which at a backlog of
	// millions of messages took seconds and made the whole file resident.
	// A file written without it gets it on this Open (bbolt's one-time
	// scan and commit). The hashmap freelist allocates from a map of free
	// spans; the array one scans every free id for each allocation, which
	// after a large backlog drains is millions of ids per commit.
	db, err := bolt.Open(cfg.Path, 0o600, &bolt.Options{
		Timeout:         2 * time.Second,
		NoFreelistSync:  false,
		FreelistType:    bolt.FreelistMapType,
		InitialMmapSize: 64 << 20,
		NoSync:          !durable,
		NoGrowSync:      !durable,
	})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open %s: locked by another process", cfg.Path)
		}
		return nil, fmt.Errorf("open %s: %w", cfg.Path, err)
	}
	var applied walPos
	err = db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(bucketMeta); err != nil {
			return err
		}
		if err := initStats(tx, cfg.Weigh); err != nil {
			return err
		}
		applied = readWALApplied(tx)
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init %s: %w", cfg.Path, err)
	}
	// The bbolt lock held from here on also guards the log.
	w, rs, err := openWAL(walOptions{
		path:    cfg.Path + ".wal",
		size:    cfg.WALSize,
		durable: durable,
		recover: cfg.Recover,
		log:     log,
		wrap:    cfg.wrapWAL,
		applied: applied,
		apply: func(payloads [][]byte, pos walPos) error {
			if err := applyPayloads(db, &cfg, payloads, pos); err != nil {
				return fmt.Errorf("apply to %s: %w", cfg.Path, err)
			}
			return nil
		},
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	s := &Store{
		cfg:          cfg,
		log:          log,
		db:           db,
		wal:          w,
		reqs:         make(chan request, 1024),
		done:         newBatchQueue(),
		stop:         make(chan struct{}),
		closing:      make(chan struct{}),
		metrics:      newMetrics(cfg.Registerer),
		replay:       rs,
		groupBytes:   int(min(4<<20, w.capacity()/4)),
		releaseAbove: releaseMappedAbove,
		durable:      durable,
		syncReq:      make(chan struct{}, 1),
		failed:       make(chan struct{}),
	}
	interval := cfg.ApplyInterval
	if cfg.Sync == SyncBatch {
		interval = max(interval, cfg.SyncInterval)
	}
	s.ap = newApplier(s, interval, int(w.capacity()/4))
	s.walGenSeen.Store(w.gen())
	return s, nil
}

func (c *Config) wrapWAL(f walFile) walFile {
	if c.hooks != nil && c.hooks.wrapWAL != nil {
		return c.hooks.wrapWAL(f)
	}
	return f
}

// Replay returns what Open replayed from the write-ahead log.
func (s *Store) Replay() ReplayStats { return s.replay }

// Failed is closed when the store fails: a write or fsync of the log or of
// bbolt returned an error. From then on every commit, read and Close
// return that error (Err); nothing more is acknowledged. The node should
// stop: the next Open replays whatever the log holds durably.
func (s *Store) Failed() <-chan struct{} { return s.failed }

// Err returns the error that failed the store, or nil.
func (s *Store) Err() error {
	if p := s.failure.Load(); p != nil {
		return *p
	}
	return nil
}

// setFailed fails the store with err, once.
func (s *Store) setFailed(err error) {
	s.failOnce.Do(func() {
		s.failure.Store(&err)
		close(s.failed)
		s.metrics.failed.Set(1)
		s.log.Error("storage failed; acknowledging nothing more", "err", err)
		s.ap.fail(err)
	})
}

// Start starts the writer goroutines. Close stops them.
func (s *Store) Start() {
	s.startMu.Lock()
	defer s.startMu.Unlock()
	if s.started || s.noStart {
		return
	}
	s.started = true
	go s.ap.run()
	s.wg.Add(2)
	go s.writeLoop()
	go s.completeLoop()
	if s.cfg.Sync == SyncBatch {
		s.wg.Add(1)
		go s.syncLoop()
	}
	s.wg.Add(1)
	go s.mapLoop()
	if s.cfg.MinFreeBytes > 0 {
		if err := s.checkDisk(); err != nil {
			s.log.Error("cannot measure free disk space", "err", err)
		}
		s.wg.Add(1)
		go s.diskLoop()
	}
}

// Submit queues ops for the next group commit. done, if not nil, is called
// after the commit with its outcome; callbacks of successive Submits run in
// submission order on one goroutine and must not block for long. After
// Close, done is called at once with ErrClosed; after the store failed,
// with its error (Err).
//
// With sync (and Config.Sync SyncAlways) the commit is fsynced before done
// runs, and so is every commit before it. Without sync the commit reaches
// the OS but not necessarily the disk: it survives a crash of the process,
// and a machine crash only once a later synced commit (or Barrier) is done.
//
// A Submit whose ops bbolt would refuse (unknown kind, over-long names or
// values) fails alone; the others of its group commit. That does not fail
// the store.
func (s *Store) Submit(ops []Op, sync bool, done func(error)) {
	s.submit(request{ops: ops, sync: sync, done: done})
}

func (s *Store) submit(r request) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		if r.done != nil {
			r.done(ErrClosed)
		}
		return
	}
	// The send happens under mu so Close cannot close reqs under us; the
	// writer never takes mu, so a full channel only waits for it, or (before
	// Start, when nothing drains reqs) for Close, which signals closing
	// before it takes mu.
	select {
	case s.reqs <- r:
		s.mu.Unlock()
	case <-s.closing:
		s.mu.Unlock()
		if r.done != nil {
			r.done(ErrClosed)
		}
	}
}

// Barrier calls done once every earlier Submit is committed and, under
// SyncAlways, on disk.
func (s *Store) Barrier(done func(error)) { s.Submit(nil, true, done) }

// Apply submits ops and waits for their commit.
func (s *Store) Apply(ops []Op) error {
	ch := make(chan error, 1)
	s.Submit(ops, true, func(err error) { ch <- err })
	return <-ch
}

// requestSync asks the writer for an fdatasync of the log.
func (s *Store) requestSync() {
	select {
	case s.syncReq <- struct{}{}:
	default:
	}
}

// serveSync is the writer's answer to requestSync.
func (s *Store) serveSync() {
	if s.durable && s.Err() == nil && s.synced.Load() < s.written.Load() {
		if err := s.syncLog(); err != nil {
			s.setFailed(err)
			return
		}
	}
	if s.ap.wantSync.CompareAndSwap(true, false) {
		s.ap.signal()
	}
}

func (s *Store) writeLoop() {
	defer s.wg.Done()
	defer s.done.close()
	for {
		var first request
		select {
		case r, ok := <-s.reqs:
			if !ok {
				s.finalCheckpoint()
				return
			}
			first = r
		case <-s.syncReq:
			if len(s.reqs) > 0 && s.durable {
				// A commit is waiting: its fdatasync serves the request.
				s.syncNext = true
				continue
			}
			s.serveSync()
			continue
		}
		batch := []request{first}
		n := len(first.ops)
		size := 0
		for i := range first.ops {
			size += opSize(&first.ops[i])
		}
	drain:
		for n < s.cfg.MaxBatchOps && size < s.groupBytes {
			select {
			case r, ok := <-s.reqs:
				if !ok {
					break drain
				}
				batch = append(batch, r)
				n += len(r.ops)
				for i := range r.ops {
					size += opSize(&r.ops[i])
				}
			default:
				break drain
			}
		}
		s.commit(batch, size)
		if s.syncNext {
			s.syncNext = false
			s.serveSync() // wakes the applier; syncs only if commit did not
		}
		for i := range batch {
			batch[i].ops = nil
		}
		s.done.push(batch)
	}
}

// finalCheckpoint empties the log on Close, so the next Open has nothing
// to replay.
func (s *Store) finalCheckpoint() {
	s.mu.Lock()
	crashed := s.crashed
	s.mu.Unlock()
	if crashed || s.Err() != nil {
		return
	}
	if err := s.checkpoint(); err != nil {
		s.setFailed(err)
	}
}

// fail marks every request of batch as failed with err.
func (s *Store) fail(batch []request, err error) {
	s.metrics.commitErrors.Inc()
	for i := range batch {
		if batch[i].err == nil {
			batch[i].err = err
		}
	}
}

// commit logs one group: encode, write at the tail of the log, fdatasync if
// a request wants it, queue for bbolt. Errors go to the requests' err; a
// failed write or sync fails the store.
func (s *Store) commit(batch []request, size int) {
	if err := s.Err(); err != nil {
		s.fail(batch, err)
		return
	}
	start := time.Now()
	enc := encoder{buf: make([]byte, recHeaderLen, recHeaderLen+size)}
	var t touched
	n := 0
	sync := s.syncNext
	for i := range batch {
		r := &batch[i]
		for j := range r.ops {
			if err := validateOp(&r.ops[j]); err != nil {
				r.err = err
				break
			}
		}
		if r.err != nil {
			continue
		}
		for j := range r.ops {
			enc.append(&r.ops[j])
			t.add(&r.ops[j])
		}
		n += len(r.ops)
		sync = sync || r.force || (r.sync && s.cfg.Sync == SyncAlways)
	}
	defer func() {
		s.metrics.commitSeconds.Observe(time.Since(start).Seconds())
		s.metrics.batchOps.Observe(float64(n))
	}()
	var err error
	if n == 0 {
		if sync && s.synced.Load() < s.written.Load() {
			err = s.syncLog()
		}
	} else if int64(len(enc.buf)) > s.wal.capacity() {
		err = s.commitDirect(enc.buf[recHeaderLen:])
	} else {
		err = s.logRecord(enc.buf, sync, t)
	}
	if err != nil {
		s.setFailed(err)
	}
	// The store may also have failed meanwhile (the applier): then this
	// group reports the failure, durable or not.
	if err := s.Err(); err != nil {
		s.fail(batch, err)
	}
}

// logRecord writes rec (header space, then payload) at the tail of the log,
// switching segments first if it does not fit, and queues it for bbolt.
func (s *Store) logRecord(rec []byte, sync bool, t touched) error {
	w := s.wal
	if w.tail+int64(len(rec)) > w.seg[w.cur].end {
		if err := s.switchSegment(); err != nil {
			return err
		}
	}
	chain := sealRecord(rec, w.gen(), w.chain, w.durable)
	if _, err := w.f.WriteAt(rec, w.tail); err != nil {
		return fmt.Errorf("write %s: %w", w.path, err)
	}
	w.chain = chain
	w.tail += int64(len(rec))
	s.seq++
	w.seg[w.cur].last = s.seq
	s.written.Store(s.seq)
	if sync {
		if err := s.syncLog(); err != nil {
			return err
		}
	}
	payload := rec[recHeaderLen:]
	if cap(payload) > 2*len(payload)+4096 {
		// The buffer was sized by an upper bound (opSize), several times
		// too large for small deletes; the applier may hold many records,
		// so it gets a copy of the right size.
		payload = bytes.Clone(payload)
	}
	s.ap.enqueue(payload, s.seq, walPos{w.gen(), w.tail}, t)
	return nil
}

// switchSegment starts a new generation in the other segment, after the
// current one. The current segment's records are made durable first (a
// replay must find them complete before the other's), and the other's old
// records must be in bbolt, which the applier has usually done long ago.
func (s *Store) switchSegment() error {
	w := s.wal
	if s.durable && s.synced.Load() < s.written.Load() {
		if err := s.syncLog(); err != nil {
			return err
		}
	}
	other := 1 - w.cur
	if last := w.seg[other].last; last > 0 {
		if s.ap.appliedUpTo() < last {
			s.metrics.switchWaits.Inc()
			if h := s.cfg.hooks; h != nil && h.switchWait != nil {
				h.switchWait()
			}
		}
		if err := s.ap.waitApplied(last); err != nil {
			return err
		}
	}
	if err := w.begin(other, w.gen(), w.tail, s.durable); err != nil {
		return err
	}
	s.walGenSeen.Store(w.gen())
	s.metrics.switches.Inc()
	return nil
}

// syncLog fdatasyncs the log; every record written before is then durable.
// Only the writer goroutine calls it.
func (s *Store) syncLog() error {
	seq := s.written.Load()
	start := time.Now()
	if err := s.wal.sync(); err != nil {
		return fmt.Errorf("sync %s: %w", s.wal.path, err)
	}
	s.metrics.syncSeconds.Observe(time.Since(start).Seconds())
	s.synced.Store(seq)
	if s.ap.wantSync.Load() && s.ap.wantSync.CompareAndSwap(true, false) {
		s.ap.signal()
	}
	return nil
}

// commitDirect applies a group too large for the log straight to bbolt.
// The log is emptied first: replaying older records over this group would
// undo it.
func (s *Store) commitDirect(payload []byte) error {
	if err := s.checkpoint(); err != nil {
		return err
	}
	start := time.Now()
	// Not in the log: no position to record (the checkpoint started a
	// new generation, whose records all come after this group).
	err := applyPayloads(s.db, &s.cfg, [][]byte{payload}, walPos{})
	s.metrics.applySeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		return fmt.Errorf("apply to %s: %w", s.cfg.Path, err)
	}
	return nil
}

// checkpoint makes every logged record durable in the log and then in
// bbolt, and starts a new generation of the log with nothing before it.
// Writer only.
func (s *Store) checkpoint() error {
	if s.durable && s.synced.Load() < s.written.Load() {
		if err := s.syncLog(); err != nil {
			return err
		}
	}
	if err := s.ap.waitApplied(s.written.Load()); err != nil {
		return err
	}
	if err := s.wal.reset(s.durable); err != nil {
		return err
	}
	s.walGenSeen.Store(s.wal.gen())
	s.metrics.checkpoints.Inc()
	return nil
}

// applyLogged is the applier's transaction: payloads the log holds
// durably go to bbolt, with pos, the log position of the last one.
func (s *Store) applyLogged(payloads [][]byte, pos walPos) error {
	start := time.Now()
	err := applyPayloads(s.db, &s.cfg, payloads, pos)
	s.metrics.applySeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		s.metrics.commitErrors.Inc()
		return fmt.Errorf("apply to %s: %w", s.cfg.Path, err)
	}
	return nil
}

func (s *Store) completeLoop() {
	defer s.wg.Done()
	for {
		batches, ok := s.done.popAll()
		if !ok {
			return
		}
		for _, batch := range batches {
			for _, r := range batch {
				if r.done != nil {
					r.done(r.err)
				}
			}
		}
	}
}

// batchQueue is an unbounded FIFO of committed batches.
type batchQueue struct {
	mu     sync.Mutex
	q      [][]request
	closed bool
	signal chan struct{}
}

func newBatchQueue() *batchQueue { return &batchQueue{signal: make(chan struct{}, 1)} }

func (b *batchQueue) push(batch []request) {
	b.mu.Lock()
	b.q = append(b.q, batch)
	b.mu.Unlock()
	b.wake()
}

func (b *batchQueue) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.wake()
}

func (b *batchQueue) wake() {
	select {
	case b.signal <- struct{}{}:
	default:
	}
}

// popAll waits for batches and returns them all, in order; ok is false
// once the queue is closed and empty.
func (b *batchQueue) popAll() ([][]request, bool) {
	for {
		b.mu.Lock()
		if len(b.q) > 0 {
			q := b.q
			b.q = nil
			b.mu.Unlock()
			return q, true
		}
		if b.closed {
			b.mu.Unlock()
			return nil, false
		}
		b.mu.Unlock()
		<-b.signal
	}
}

// syncLoop asks the writer for an fdatasync every SyncInterval under
// SyncBatch.
func (s *Store) syncLoop() {
	defer s.wg.Done()
	t := time.NewTicker(s.cfg.SyncInterval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			if s.synced.Load() < s.written.Load() {
				s.requestSync()
			}
		case <-s.stop:
			return
		}
	}
}

// ForEach calls fn for every (bucket, key, value) in key order within each
// bucket. value is only valid during the call. It sees every commit whose
// callback ran before it was called.
func (s *Store) ForEach(fn func(bucket string, key uint64, value []byte) error) error {
	if err := s.ap.waitCurrent(); err != nil {
		return err
	}
	return s.db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			if !bytes.HasPrefix(name, []byte(queuePrefix)) {
				return nil
			}
			bucket := string(name[len(queuePrefix):])
			return b.ForEach(func(k, v []byte) error {
				if len(k) != 8 {
					return fmt.Errorf("bucket %q: key of %d bytes", bucket, len(k))
				}
				return fn(bucket, binary.BigEndian.Uint64(k), v)
			})
		})
	})
}

// Meta returns a copy of the meta value name, or nil if it is not set. It
// sees every commit whose callback ran before it was called.
func (s *Store) Meta(name string) ([]byte, error) {
	if err := s.ap.waitCurrent(); err != nil {
		return nil, err
	}
	var out []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get([]byte(name)); v != nil {
			out = append([]byte(nil), v...)
		}
		return nil
	})
	return out, err
}

// MetaPrefix calls fn with a copy of every meta value whose name starts
// with prefix, in name order. It sees every commit whose callback ran
// before it was called.
func (s *Store) MetaPrefix(prefix string, fn func(name string, value []byte) error) error {
	if err := s.ap.waitCurrent(); err != nil {
		return err
	}
	type kv struct {
		name  string
		value []byte
	}
	var all []kv
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketMeta).Cursor()
		for k, v := c.Seek([]byte(prefix)); k != nil && bytes.HasPrefix(k, []byte(prefix)); k, v = c.Next() {
			all = append(all, kv{string(k), bytes.Clone(v)})
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, e := range all {
		if err := fn(e.name, e.value); err != nil {
			return err
		}
	}
	return nil
}

// SetMeta stores a meta value and waits until it is on disk, whatever the
// SyncMode. Before Start it is a bbolt transaction of its own; after, a
// commit of its own that is fsynced, in order with the Submits before it.
// Use it for rare records.
func (s *Store) SetMeta(name string, value []byte) error {
	op := Op{Kind: OpPutMeta, Name: name, Value: value}
	if err := validateOp(&op); err != nil {
		return err
	}
	s.startMu.Lock()
	if s.noStart {
		s.startMu.Unlock()
		return ErrClosed
	}
	if !s.started {
		// Nothing is in the log (Open replayed and emptied it) and, until
		// Start, nothing writes to bbolt but us.
		defer s.startMu.Unlock()
		err := s.db.Update(func(tx *bolt.Tx) error {
			return tx.Bucket(bucketMeta).Put([]byte(name), value)
		})
		if err == nil && !s.durable {
			err = s.db.Sync()
		}
		return err
	}
	s.startMu.Unlock()
	ch := make(chan error, 1)
	s.submit(request{ops: []Op{op}, sync: true, force: true, done: func(err error) { ch <- err }})
	return <-ch
}

// Close waits for every submitted batch to commit and its callbacks to run,
// copies the log into bbolt, and closes the files. It is idempotent.
func (s *Store) Close() error {
	return s.shutdown(false)
}

func (s *Store) shutdown(crash bool) error {
	s.closingOnce.Do(func() { close(s.closing) })
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.crashed = crash
	close(s.reqs)
	close(s.stop)
	s.mu.Unlock()
	s.startMu.Lock()
	s.noStart = true
	started := s.started
	s.startMu.Unlock()
	if started {
		if crash {
			// Drop the applier's queue first, as a crash would.
			s.ap.finish(true)
		}
		s.wg.Wait()
		s.ap.finish(false)
	} else {
		for r := range s.reqs {
			if r.done != nil {
				r.done(ErrClosed)
			}
		}
	}
	var err error
	if !crash {
		err = s.Err()
	}
	if cerr := s.wal.f.Close(); cerr != nil && err == nil {
		err = cerr
	}
	if cerr := s.db.Close(); cerr != nil && err == nil {
		err = cerr
	}
	return err
}

// walGen is the current generation of the log (for tests and benchmarks;
// not synchronised with the writer beyond a race-free read).
func (s *Store) walGen() uint64 { return s.walGenSeen.Load() }
