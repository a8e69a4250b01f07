package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
)

// ErrClosed is returned for work submitted after Close.
var ErrClosed = errors.New("store closed")

// SyncMode says when commits reach the disk.
type SyncMode int

const (
	// SyncAlways fsyncs every commit before its callbacks run.
	SyncAlways SyncMode = iota + 1
	// SyncBatch fsyncs at most every Config.SyncInterval; a crash of the
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
	// Path is the bbolt file; its directory is created if missing.
	Path string
	// Sync is when commits are fsynced.
	Sync SyncMode
	// SyncInterval is the fsync period under SyncBatch.
	SyncInterval time.Duration
	// MaxBatchOps caps the operations of one commit.
	MaxBatchOps int
	// Registerer receives the store's metrics; nil means none.
	Registerer prometheus.Registerer
}

// DefaultConfig returns a Config for path with every field set.
func DefaultConfig(path string) Config {
	return Config{Path: path, Sync: SyncAlways, SyncInterval: 100 * time.Millisecond, MaxBatchOps: 4096}
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
)

// Op is one write. The store keeps Value until the commit is done; the
// caller must not modify it after Submit.
type Op struct {
	Kind   OpKind
	Bucket string
	Key    uint64
	Name   string
	Value  []byte
}

type request struct {
	ops  []Op
	sync bool
	done func(error)
}

var bucketMeta = []byte("meta")

// queuePrefix starts the name of each destination's top-level bucket. A
// top-level bucket costs one page less per commit than a nested one.
const queuePrefix = "q:"

// Store is one node's bbolt file with a group-commit writer.
type Store struct {
	cfg     Config
	db      *bolt.DB
	reqs    chan request
	done    chan []request
	errs    chan error
	mu      sync.Mutex // guards closed, and sends on reqs against close
	closed  bool
	wg      sync.WaitGroup
	stop    chan struct{}
	metrics *metrics

	unsynced bool // writer goroutine only: a commit since the last fsync was not synced
}

type metrics struct {
	commitSeconds prometheus.Histogram
	batchOps      prometheus.Histogram
	commitErrors  prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		commitSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "brokerd_store_commit_seconds",
			Help:    "Time of one group commit (bbolt transaction and fsync).",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
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
	}
	if reg != nil {
		reg.MustRegister(m.commitSeconds, m.batchOps, m.commitErrors)
	}
	return m
}

// Open opens (creating if needed) the bbolt file. It starts no goroutine;
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
	if err := os.MkdirAll(filepath.Dir(cfg.Path), 0o750); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	db, err := bolt.Open(cfg.Path, 0o600, &bolt.Options{
		Timeout:         2 * time.Second,
		NoFreelistSync:  true,
		FreelistType:    bolt.FreelistMapType,
		InitialMmapSize: 64 << 20,
		NoSync:          cfg.Sync != SyncAlways,
	})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open %s: locked by another process", cfg.Path)
		}
		return nil, fmt.Errorf("open %s: %w", cfg.Path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketMeta)
		return err
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init %s: %w", cfg.Path, err)
	}
	return &Store{
		cfg:     cfg,
		db:      db,
		reqs:    make(chan request, 1024),
		done:    make(chan []request, 64),
		stop:    make(chan struct{}),
		metrics: newMetrics(cfg.Registerer),
	}, nil
}

// Start starts the writer goroutines. Close stops them.
func (s *Store) Start() {
	s.wg.Add(2)
	go s.writeLoop()
	go s.completeLoop()
	if s.cfg.Sync == SyncBatch {
		s.wg.Add(1)
		go s.syncLoop()
	}
}

// Submit queues ops for the next group commit. done, if not nil, is called
// after the commit with its outcome; callbacks of successive Submits run in
// submission order on one goroutine and must not block for long. After
// Close, done is called at once with ErrClosed.
//
// With sync (and Config.Sync SyncAlways) the commit is fsynced before done
// runs, and so is every commit before it. Without sync the commit reaches
// the OS but not necessarily the disk: it survives a crash of the process,
// and a machine crash only once a later synced commit (or Barrier) is done.
func (s *Store) Submit(ops []Op, sync bool, done func(error)) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		if done != nil {
			done(ErrClosed)
		}
		return
	}
	// The send happens under mu so Close cannot close reqs under us; the
	// writer never takes mu, so a full channel only waits for it.
	s.reqs <- request{ops: ops, sync: sync, done: done}
	s.mu.Unlock()
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

func (s *Store) writeLoop() {
	defer s.wg.Done()
	defer close(s.done)
	for {
		first, ok := <-s.reqs
		if !ok {
			return
		}
		batch := []request{first}
		n := len(first.ops)
		sync := first.sync
	drain:
		for n < s.cfg.MaxBatchOps {
			select {
			case r, ok := <-s.reqs:
				if !ok {
					break drain
				}
				batch = append(batch, r)
				n += len(r.ops)
				sync = sync || r.sync
			default:
				break drain
			}
		}
		err := s.commit(batch, n, sync)
		for i := range batch {
			batch[i].ops = nil
		}
		if err != nil {
			// Report the failure to each request so no producer is told
			// its message is stored when it is not.
			s.metrics.commitErrors.Inc()
		}
		s.done <- withErr(batch, err)
	}
}

func withErr(batch []request, err error) []request {
	if err == nil {
		return batch
	}
	for i := range batch {
		if d := batch[i].done; d != nil {
			batch[i].done = func(error) { d(err) }
		}
	}
	return batch
}

func (s *Store) commit(batch []request, n int, sync bool) error {
	start := time.Now()
	defer func() {
		s.metrics.commitSeconds.Observe(time.Since(start).Seconds())
		s.metrics.batchOps.Observe(float64(n))
	}()
	if s.cfg.Sync == SyncAlways {
		// Only this goroutine commits, so toggling NoSync here is safe.
		s.db.NoSync = !sync
		if !sync {
			s.unsynced = true
		}
	}
	if n == 0 {
		if sync && s.unsynced && s.cfg.Sync == SyncAlways {
			s.unsynced = false
			return s.db.Sync()
		}
		return nil
	}
	if sync {
		s.unsynced = false
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		var (
			cur     *bolt.Bucket
			curName string
			key     [8]byte
		)
		for _, r := range batch {
			for _, op := range r.ops {
				switch op.Kind {
				case OpPut, OpDelete:
					if cur == nil || curName != op.Bucket {
						b, err := tx.CreateBucketIfNotExists([]byte(queuePrefix + op.Bucket))
						if err != nil {
							return fmt.Errorf("bucket %q: %w", op.Bucket, err)
						}
						cur, curName = b, op.Bucket
					}
					binary.BigEndian.PutUint64(key[:], op.Key)
					var err error
					if op.Kind == OpPut {
						err = cur.Put(key[:], op.Value)
					} else {
						err = cur.Delete(key[:])
					}
					if err != nil {
						return fmt.Errorf("bucket %q key %d: %w", op.Bucket, op.Key, err)
					}
				case OpPutMeta:
					if err := meta.Put([]byte(op.Name), op.Value); err != nil {
						return fmt.Errorf("meta %q: %w", op.Name, err)
					}
				default:
					return fmt.Errorf("unknown op kind %d", op.Kind)
				}
			}
		}
		return nil
	})
}

func (s *Store) completeLoop() {
	defer s.wg.Done()
	for batch := range s.done {
		for _, r := range batch {
			if r.done != nil {
				r.done(nil)
			}
		}
	}
}

func (s *Store) syncLoop() {
	defer s.wg.Done()
	t := time.NewTicker(s.cfg.SyncInterval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			_ = s.db.Sync()
		case <-s.stop:
			return
		}
	}
}

// ForEach calls fn for every (bucket, key, value) in key order within each
// bucket. value is only valid during the call.
func (s *Store) ForEach(fn func(bucket string, key uint64, value []byte) error) error {
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

// Meta returns a copy of the meta value name, or nil if it is not set.
func (s *Store) Meta(name string) ([]byte, error) {
	var out []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get([]byte(name)); v != nil {
			out = append([]byte(nil), v...)
		}
		return nil
	})
	return out, err
}

// SetMeta stores a meta value synchronously, bypassing the group commit.
// Use it before Start or for rare records.
func (s *Store) SetMeta(name string, value []byte) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMeta).Put([]byte(name), value)
	})
	if err == nil && s.cfg.Sync != SyncAlways {
		err = s.db.Sync()
	}
	return err
}

// Close waits for every submitted batch to commit and its callbacks to run,
// fsyncs, and closes the file. It is idempotent.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.reqs)
	close(s.stop)
	s.mu.Unlock()
	s.wg.Wait()
	if s.cfg.Sync != SyncNone {
		_ = s.db.Sync()
	}
	return s.db.Close()
}
