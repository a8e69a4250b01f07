package store

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// crash stops the store as a process crash would: what was written to the
// log stays there (in the OS), the applier's queue is dropped, nothing is
// synced or checkpointed.
func (s *Store) crash() error { return s.shutdown(true) }

type entry struct {
	bucket string
	key    uint64
}

// model is the expected content of a store.
type model struct {
	data    map[entry]string
	meta    map[string]string
	buckets map[string]bool // created by a Put, until an OpDeleteBucket
}

func newModel() *model {
	return &model{data: map[entry]string{}, meta: map[string]string{}, buckets: map[string]bool{}}
}

func (m *model) apply(ops []Op) {
	for _, op := range ops {
		switch op.Kind {
		case OpPut:
			m.data[entry{op.Bucket, op.Key}] = string(op.Value)
			m.buckets[op.Bucket] = true
		case OpDelete:
			delete(m.data, entry{op.Bucket, op.Key})
		case OpDeleteBucket:
			for k := range m.data {
				if k.bucket == op.Bucket {
					delete(m.data, k)
				}
			}
			delete(m.buckets, op.Bucket)
		case OpPutMeta:
			m.meta[op.Name] = string(op.Value)
		}
	}
}

func (m *model) clone() *model {
	c := newModel()
	for k, v := range m.data {
		c.data[k] = v
	}
	for k, v := range m.meta {
		c.meta[k] = v
	}
	for k := range m.buckets {
		c.buckets[k] = true
	}
	return c
}

// contents reads every queue record and the meta values named in names.
func contents(t testing.TB, s *Store, names []string) *model {
	t.Helper()
	got := newModel()
	err := s.ForEach(func(bucket string, key uint64, value []byte) error {
		got.data[entry{bucket, key}] = string(value)
		return nil
	})
	if err != nil {
		t.Fatalf("ForEach: %v", err)
	}
	for _, n := range names {
		v, err := s.Meta(n)
		if err != nil {
			t.Fatalf("Meta(%q): %v", n, err)
		}
		if v != nil {
			got.meta[n] = string(v)
		}
	}
	return got
}

func (m *model) metaNames() []string {
	var names []string
	for n := range m.meta {
		names = append(names, n)
	}
	return names
}

func diff(got, want *model) string {
	var out []string
	for k, v := range want.data {
		if g, ok := got.data[k]; !ok {
			out = append(out, fmt.Sprintf("missing %v", k))
		} else if g != v {
			out = append(out, fmt.Sprintf("%v = %.20q, want %.20q", k, g, v))
		}
	}
	for k := range got.data {
		if _, ok := want.data[k]; !ok {
			out = append(out, fmt.Sprintf("unexpected %v", k))
		}
	}
	for k, v := range want.meta {
		if got.meta[k] != v {
			out = append(out, fmt.Sprintf("meta %q = %q, want %q", k, got.meta[k], v))
		}
	}
	for k := range got.meta {
		if _, ok := want.meta[k]; !ok {
			out = append(out, fmt.Sprintf("unexpected meta %q", k))
		}
	}
	sort.Strings(out)
	if len(out) > 10 {
		out = append(out[:10], fmt.Sprintf("... %d more", len(out)-10))
	}
	return strings.Join(out, "\n")
}

func checkContents(t testing.TB, s *Store, want *model) {
	t.Helper()
	if d := diff(contents(t, s, want.metaNames()), want); d != "" {
		t.Fatalf("store differs from model:\n%s", d)
	}
}

// testConfig keeps logged commits out of bbolt until a checkpoint or a read
// needs them, so that a crash leaves them to replay.
func testConfig(dir string) Config {
	cfg := DefaultConfig(filepath.Join(dir, "s.db"))
	cfg.WALSize = 256 << 10
	cfg.ApplyInterval = time.Hour
	cfg.Logger = slog.New(slog.DiscardHandler)
	return cfg
}

func open(t testing.TB, cfg Config) *Store {
	t.Helper()
	s, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s
}

func start(t testing.TB, cfg Config) *Store {
	t.Helper()
	s := open(t, cfg)
	s.Start()
	t.Cleanup(func() { s.Close() })
	return s
}

func apply(t testing.TB, s *Store, m *model, ops ...Op) {
	t.Helper()
	if err := s.Apply(ops); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if m != nil {
		m.apply(ops)
	}
}

func put(bucket string, key uint64, value string) Op {
	return Op{Kind: OpPut, Bucket: bucket, Key: key, Value: []byte(value)}
}

func del(bucket string, key uint64) Op { return Op{Kind: OpDelete, Bucket: bucket, Key: key} }

func putMeta(name, value string) Op { return Op{Kind: OpPutMeta, Name: name, Value: []byte(value)} }

// records returns what a replay of the WAL would find, the payloads it
// would replay, and the offset past the last valid record of the newest
// segment.
func records(t testing.TB, path string) (walScan, [][]byte, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	var out [][]byte
	ws, err := scanWAL(f, st.Size(), func(p []byte) error { out = append(out, p); return nil })
	if err != nil {
		t.Fatalf("scan %s: %v", path, err)
	}
	return ws, out, ws.tail
}

func TestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(dir)
	m := newModel()
	s := open(t, cfg)
	if err := s.SetMeta("node_id", []byte("before-start")); err != nil {
		t.Fatal(err)
	}
	m.meta["node_id"] = "before-start"
	s.Start()
	apply(t, s, m, put("/queue/a", 1, "one"), put("/queue/a", 2, "two"), put("/queue/b", 1, "b-one"))
	apply(t, s, m, del("/queue/a", 1), put("/queue/a", 3, ""), putMeta("seq", "65536"))
	apply(t, s, m, put("/queue/a", 2, "two again"), del("/queue/c", 9), put("/queue/a", 4, strings.Repeat("x", 5000)))
	if err := s.SetMeta("joined_at", []byte("123")); err != nil {
		t.Fatal(err)
	}
	m.meta["joined_at"] = "123"
	// Reads see what was acknowledged even though the applier waits an hour.
	checkContents(t, s, m)
	apply(t, s, m, putMeta("seq", "131072"), del("/queue/b", 1))
	checkContents(t, s, m)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, recs, _ := records(t, cfg.Path+".wal"); len(recs) != 0 {
		t.Fatalf("%d records in the log after Close, want 0", len(recs))
	}
	s = open(t, cfg)
	checkContents(t, s, m)
	s.Start()
	apply(t, s, m, put("/queue/a", 5, "five"))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, cfg)
	defer s.Close()
	checkContents(t, s, m)
}

func TestSyncModes(t *testing.T) {
	for _, mode := range []SyncMode{SyncAlways, SyncBatch, SyncNone} {
		t.Run(mode.String(), func(t *testing.T) {
			cfg := testConfig(t.TempDir())
			cfg.Sync = mode
			cfg.SyncInterval = time.Millisecond
			cfg.ApplyInterval = time.Millisecond
			m := newModel()
			s := open(t, cfg)
			s.Start()
			for i := 0; i < 200; i++ {
				apply(t, s, m, put("q", uint64(i), fmt.Sprint(i)), del("q", uint64(i/2)))
			}
			var wg sync.WaitGroup
			wg.Add(1)
			s.Barrier(func(err error) {
				if err != nil {
					t.Error(err)
				}
				wg.Done()
			})
			wg.Wait()
			if err := s.crash(); err != nil {
				t.Fatal(err)
			}
			s = open(t, cfg)
			defer s.Close()
			checkContents(t, s, m)
		})
	}
}

// TestCrashRecovery stops the store as a crash would, with every commit
// still only in the log, and checks that Open brings each one back.
func TestCrashRecovery(t *testing.T) {
	cfg := testConfig(t.TempDir())
	m := newModel()
	s := open(t, cfg)
	s.Start()
	for i := uint64(0); i < 100; i++ {
		ops := []Op{put("/queue/a", i, fmt.Sprint("v", i))}
		if i%3 == 2 {
			ops = append(ops, del("/queue/a", i-2))
		}
		if i%10 == 0 {
			ops = append(ops, putMeta("seq", fmt.Sprint(i)))
		}
		apply(t, s, m, ops...)
	}
	// Unsynced commits survive a process crash too: they are in the OS.
	var wg sync.WaitGroup
	for i := uint64(100); i < 150; i++ {
		ops := []Op{put("/queue/b", i, "nosync"), del("/queue/a", i-100)}
		m.apply(ops)
		wg.Add(1)
		s.Submit(ops, false, func(err error) {
			if err != nil {
				t.Error(err)
			}
			wg.Done()
		})
	}
	wg.Wait()
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	if _, recs, _ := records(t, cfg.Path+".wal"); len(recs) < 100 {
		t.Fatalf("%d records in the log, want every commit (the test needs them unapplied)", len(recs))
	}
	s = open(t, cfg)
	checkContents(t, s, m)
	// Replay emptied the log; a second crash right away loses nothing.
	s.Start()
	apply(t, s, m, put("/queue/c", 1, "after"))
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	s = open(t, cfg)
	defer s.Close()
	checkContents(t, s, m)
}

// crashWith runs groups (one Apply each) on a fresh store and crashes it.
// It returns the model after each group.
func crashWith(t *testing.T, cfg Config, groups [][]Op) []*model {
	t.Helper()
	s := open(t, cfg)
	s.Start()
	m := newModel()
	states := []*model{m.clone()}
	for _, g := range groups {
		apply(t, s, m, g...)
		states = append(states, m.clone())
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	return states
}

func TestTornLastRecord(t *testing.T) {
	var groups [][]Op
	for i := uint64(1); i <= 20; i++ {
		groups = append(groups, []Op{put("q", i, strings.Repeat("v", 100+int(i))), del("q", i-1), putMeta("last", fmt.Sprint(i))})
	}
	for _, how := range []string{"truncate", "flip-payload", "flip-header", "zero-tail"} {
		t.Run(how, func(t *testing.T) {
			cfg := testConfig(t.TempDir())
			states := crashWith(t, cfg, groups)
			path := cfg.Path + ".wal"
			_, recs, end := records(t, path)
			if len(recs) != len(groups) {
				t.Fatalf("%d records, want %d", len(recs), len(groups))
			}
			last := end - int64(recHeaderLen+len(recs[len(recs)-1]))
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			switch how {
			case "truncate":
				data = data[:last+recHeaderLen+20]
			case "flip-payload":
				data[end-3] ^= 0x10
			case "flip-header":
				data[last+1] ^= 0x01 // length
			case "zero-tail":
				copy(data[last+recHeaderLen+50:end], make([]byte, end))
			}
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			s := open(t, cfg)
			defer s.Close()
			checkContents(t, s, states[len(groups)-1])
			if st, _ := os.Stat(path); st.Size() != cfg.WALSize {
				t.Fatalf("log of %d bytes after Open, want %d", st.Size(), cfg.WALSize)
			}
		})
	}
}

// TestStaleGenerationNotReplayed fills both segments of the log so that
// the writer is back in the first one, then writes fewer records there,
// which delete what its previous generation put, and crashes: that
// generation's records past the tail must not come back.
func TestStaleGenerationNotReplayed(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.WALSize = 64 << 10
	s := open(t, cfg)
	s.Start()
	m := newModel()
	val := strings.Repeat("p", 200)
	gen0 := s.walGen()
	var keys []uint64
	for i := uint64(0); s.walGen() < gen0+2; i++ {
		// Every record the same size: the tail of the new generation falls
		// on a record boundary of the old one.
		apply(t, s, m, put("q", 1000+i, val))
		if s.walGen() == gen0 {
			keys = append(keys, 1000+i)
		}
	}
	// The keys the first generation put are in bbolt. Delete half of
	// them, in fewer bytes than that generation used: its records lie
	// past the new tail.
	for _, k := range keys[:len(keys)/2] {
		apply(t, s, m, del("q", k))
	}
	if s.walGen() != gen0+2 {
		t.Fatal("third generation wrapped; write fewer records")
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	ws, recs, _ := records(t, cfg.Path+".wal")
	if ws.maxGen != gen0+2 || ws.newest != 0 || ws.segs[0].prev != gen0+1 {
		t.Fatalf("log at generation %d in segment %d after %d, want %d in 0 after %d", ws.maxGen, ws.newest, ws.segs[0].prev, gen0+2, gen0+1)
	}
	// Replay: the second generation (all of segment 1), then the third.
	if want := len(keys) + 1 + len(keys)/2; len(recs) > want {
		t.Fatalf("replay of %d records, want at most %d", len(recs), want)
	}
	s = open(t, cfg)
	defer s.Close()
	checkContents(t, s, m)
}

// TestStaleSameSizeRecords makes the new generation's tail fall exactly on
// an old record whose bytes are otherwise valid.
func TestStaleSameSizeRecords(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.WALSize = 64 << 10
	s := open(t, cfg)
	s.Start()
	m := newModel()
	gen0 := s.walGen()
	n := uint64(0)
	for ; s.walGen() < gen0+2; n++ {
		apply(t, s, m, put("q", n%10, fmt.Sprintf("old-%06d", n)))
	}
	for i := uint64(0); i < 10; i++ {
		apply(t, s, m, put("q", i, fmt.Sprintf("new-%06d", i)))
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	s = open(t, cfg)
	defer s.Close()
	checkContents(t, s, m)
}

// TestTornHeaderFallsBack: the header of a new generation is torn by a
// crash, whether it was a segment switch (the other segment) or a
// checkpoint (the same one): the old headers are current and their
// records replay again over bbolt, which already holds them.
func TestTornHeaderFallsBack(t *testing.T) {
	for _, sameSeg := range []bool{false, true} {
		t.Run(fmt.Sprint("same-segment=", sameSeg), func(t *testing.T) {
			cfg := testConfig(t.TempDir())
			s := open(t, cfg)
			s.Start()
			m := newModel()
			for i := uint64(0); i < 30; i++ {
				apply(t, s, m, put("q", i, fmt.Sprint(i)), del("q", i/2))
			}
			// The switch or checkpoint got as far as bbolt (a read makes
			// the applier catch up), then tore the new header and crashed.
			checkContents(t, s, m)
			if err := s.crash(); err != nil {
				t.Fatal(err)
			}
			w := s.wal
			gen, seg := w.gen(), w.seg[1-w.cur]
			if sameSeg {
				seg = w.seg[w.cur]
			}
			path := cfg.Path + ".wal"
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			torn := walHeader{gen: gen + 1, salt: 7, prev: gen, prevEnd: w.tail, size: w.size}.encode()
			copy(torn[16:], "torn")
			if _, err := f.WriteAt(torn, seg.hdr+(1-seg.slot)*walBlock); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if ws, recs, _ := records(t, path); ws.maxGen != gen || len(recs) != 30 {
				t.Fatalf("generation %d with %d records, want %d with 30", ws.maxGen, len(recs), gen)
			}
			s = open(t, cfg)
			checkContents(t, s, m)
			s.Close()

			// Every slot damaged: Open refuses rather than guess.
			f, _ = os.OpenFile(path, os.O_RDWR, 0)
			for i := int64(0); i < 4; i++ {
				f.WriteAt(make([]byte, walHeaderLen), i*walBlock)
			}
			f.Close()
			if _, err := Open(cfg); err == nil || !strings.Contains(err.Error(), "no valid header") {
				t.Fatalf("Open with no header: %v", err)
			}
		})
	}
}

// TestScanChain checks that a record is only valid after its predecessor
// in its own generation.
func TestScanChain(t *testing.T) {
	h := walHeader{gen: 5, salt: 0x12345678, size: minWALSize}
	rec := func(payload string, gen uint64, prev uint32) ([]byte, uint32) {
		r := append(make([]byte, recHeaderLen), payload...)
		return r, sealRecord(r, gen, prev, 0)
	}
	build := func(recs ...[]byte) []byte {
		b := make([]byte, walDataStart, minWALSize)
		copy(b, h.encode())
		for _, r := range recs {
			b = append(b, r...)
		}
		return b[:minWALSize]
	}
	count := func(b []byte) int {
		ws, err := scanWAL(bytes.NewReader(b), int64(len(b)), func([]byte) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
		return ws.records
	}
	a, ca := rec("\x01\x01q\x01\x00", 5, h.salt)
	b, cb := rec("\x01\x01q\x02\x00", 5, ca)
	c, _ := rec("\x01\x01q\x03\x00", 5, cb)
	if n := count(build(a, b, c)); n != 3 {
		t.Fatalf("%d records, want 3", n)
	}
	if n := count(build(a, c)); n != 1 {
		t.Fatalf("record out of its chain: %d records, want 1", n)
	}
	if n := count(build(b, a)); n != 0 {
		t.Fatalf("records swapped: %d records, want 0", n)
	}
	other, _ := rec("\x01\x01q\x01\x00", 5, 0x9999)
	if n := count(build(other)); n != 0 {
		t.Fatalf("record of another salt: %d records, want 0", n)
	}
	old, _ := rec("\x01\x01q\x01\x00", 4, h.salt)
	if n := count(build(old)); n != 0 {
		t.Fatalf("record of another generation: %d records, want 0", n)
	}
}

// TestWrapAround runs many writers over a small log, so that it
// checkpoints many times, and compares the result with a model, after a
// crash and after Close.
func TestWrapAround(t *testing.T) {
	for _, crash := range []bool{true, false} {
		t.Run(fmt.Sprint("crash=", crash), func(t *testing.T) {
			cfg := testConfig(t.TempDir())
			cfg.WALSize = 64 << 10
			cfg.ApplyInterval = time.Millisecond
			cfg.MaxBatchOps = 64
			s := open(t, cfg)
			s.Start()
			gen0 := s.walGen()
			const writers = 16
			models := make([]*model, writers)
			var wg sync.WaitGroup
			for w := 0; w < writers; w++ {
				models[w] = newModel()
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(w), 1))
					bucket := fmt.Sprint("/queue/", w%4)
					m := models[w]
					var pending sync.WaitGroup
					for i := 0; i < 400; i++ {
						var ops []Op
						for j := r.IntN(4); j >= 0; j-- {
							key := uint64(w*1000 + r.IntN(200))
							if r.IntN(3) == 0 {
								ops = append(ops, del(bucket, key))
							} else {
								ops = append(ops, put(bucket, key, strings.Repeat(fmt.Sprint(i), 1+r.IntN(60))))
							}
						}
						if r.IntN(20) == 0 {
							ops = append(ops, putMeta(fmt.Sprint("w", w), fmt.Sprint(i)))
						}
						m.apply(ops)
						pending.Add(1)
						s.Submit(ops, r.IntN(2) == 0, func(err error) {
							if err != nil {
								t.Error(err)
							}
							pending.Done()
						})
					}
					pending.Wait()
				}(w)
			}
			wg.Wait()
			if n := s.walGen() - gen0; n < 10 {
				t.Fatalf("%d segment switches, want many", n)
			}
			want := newModel()
			for _, m := range models {
				for k, v := range m.data {
					want.data[k] = v
				}
				for k, v := range m.meta {
					want.meta[k] = v
				}
				for b := range m.buckets {
					want.buckets[b] = true
				}
			}
			if crash {
				if err := s.crash(); err != nil {
					t.Fatal(err)
				}
			} else if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = open(t, cfg)
			defer s.Close()
			checkContents(t, s, want)
			checkStats(t, s, want, weighLen)
		})
	}
}

// TestLargeGroup commits a group larger than the log: it goes to bbolt
// directly, after the logged groups before it, and the logged ones after it
// replay on top.
func TestLargeGroup(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.WALSize = 64 << 10
	s := open(t, cfg)
	s.Start()
	m := newModel()
	apply(t, s, m, put("q", 1, "small"), put("q", 2, "small"), putMeta("x", "1"))
	var big []Op
	for i := uint64(0); i < 100; i++ {
		big = append(big, put("big", i, strings.Repeat("B", 1000)))
	}
	big = append(big, put("q", 1, "from big"), del("q", 2), putMeta("x", "2"))
	apply(t, s, m, big...)
	apply(t, s, m, put("q", 3, "after"), del("big", 7))
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	s = open(t, cfg)
	defer s.Close()
	checkContents(t, s, m)
	checkStats(t, s, m, weighLen)
}

func TestCallbackOrder(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.MaxBatchOps = 7
	s := start(t, cfg)
	var (
		mu  sync.Mutex
		got []int
		wg  sync.WaitGroup
	)
	const n = 2000
	wg.Add(n)
	for i := 0; i < n; i++ {
		var ops []Op
		for j := 0; j < i%5; j++ {
			ops = append(ops, put("q", uint64(i*10+j), "v"))
		}
		done := func(err error) {
			if err != nil {
				t.Error(err)
			}
			mu.Lock()
			got = append(got, i)
			mu.Unlock()
			wg.Done()
		}
		switch i % 3 {
		case 0:
			s.Submit(ops, true, done)
		case 1:
			s.Submit(ops, false, done)
		case 2:
			s.Barrier(done)
		}
	}
	wg.Wait()
	for i, v := range got {
		if v != i {
			t.Fatalf("callback %d was for Submit %d", i, v)
		}
	}
}

func TestInvalidOpFailsAlone(t *testing.T) {
	s := start(t, testConfig(t.TempDir()))
	errs := make([]error, 5)
	var wg sync.WaitGroup
	wg.Add(len(errs))
	batches := [][]Op{
		{put("q", 1, "a")},
		{put("q", 2, "b"), {Kind: 99}},
		{put("q", 3, "c")},
		{putMeta("", "no name")},
		{put(strings.Repeat("b", 40000), 1, "long bucket")},
	}
	for i, ops := range batches {
		s.Submit(ops, true, func(err error) { errs[i] = err; wg.Done() })
	}
	wg.Wait()
	for i, err := range errs {
		if (err != nil) != (i == 1 || i == 3 || i == 4) {
			t.Errorf("batch %d: %v", i, err)
		}
	}
	m := newModel()
	m.apply(batches[0])
	m.apply(batches[2])
	checkContents(t, s, m)
	if err := s.SetMeta("", nil); err == nil {
		t.Error("SetMeta with no name succeeded")
	}
}

func TestClosed(t *testing.T) {
	s := open(t, testConfig(t.TempDir()))
	s.Start()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.Apply([]Op{put("q", 1, "x")}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Apply after Close: %v", err)
	}
	called := false
	s.Submit(nil, false, func(err error) { called = errors.Is(err, ErrClosed) })
	if !called {
		t.Fatal("Submit after Close did not call done with ErrClosed at once")
	}
	if err := s.SetMeta("x", nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("SetMeta after Close: %v", err)
	}

	// Closed before Start: queued Submits are told.
	s = open(t, testConfig(t.TempDir()))
	ch := make(chan error, 1)
	s.Submit([]Op{put("q", 1, "x")}, true, func(err error) { ch <- err })
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-ch; !errors.Is(err, ErrClosed) {
		t.Fatalf("Submit before Start, then Close: %v", err)
	}
}

func TestWALResize(t *testing.T) {
	cfg := testConfig(t.TempDir())
	m := newModel()
	s := open(t, cfg)
	s.Start()
	for i := uint64(0); i < 50; i++ {
		apply(t, s, m, put("q", i, fmt.Sprint(i)))
	}
	s.crash()
	for _, size := range []int64{64 << 10, 1 << 20, 40000} {
		cfg.WALSize = size
		s = open(t, cfg)
		checkContents(t, s, m)
		s.Start()
		apply(t, s, m, put("q", uint64(size), "x"))
		s.crash()
		want := (size + walBlock - 1) / walBlock * walBlock
		if st, _ := os.Stat(cfg.Path + ".wal"); st.Size() != want {
			t.Fatalf("log of %d bytes, want %d", st.Size(), want)
		}
	}
	s = open(t, cfg)
	defer s.Close()
	checkContents(t, s, m)
	cfg.WALSize = 1000
	if _, err := Open(cfg); err == nil {
		t.Fatal("Open with a 1000-byte log succeeded")
	}
}

func TestCodecRoundTrip(t *testing.T) {
	ops := []Op{
		put("a", 0, ""), put("a", 1<<63, "x"), del("a", 5), putMeta("m", "v"), del("a", 6),
		put("b", 7, strings.Repeat("z", 300)), del("", 1), put("", 2, "empty bucket"),
	}
	var e encoder
	for i := range ops {
		e.append(&ops[i])
	}
	var got []Op
	err := decodeOps(e.buf, func(r *rawOp) error {
		op := Op{Kind: r.kind, Key: r.key, Value: append([]byte(nil), r.value...)}
		if r.kind == OpPutMeta {
			op.Name = string(r.name)
			op.Key = 0
		} else {
			op.Bucket = string(r.bucket)
		}
		if r.kind == OpDelete {
			op.Value = nil
		}
		got = append(got, op)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(ops) {
		t.Fatalf("%d ops, want %d", len(got), len(ops))
	}
	for i := range ops {
		w, g := ops[i], got[i]
		if w.Kind != g.Kind || w.Bucket != g.Bucket || w.Key != g.Key || w.Name != g.Name || !bytes.Equal(w.Value, g.Value) {
			t.Errorf("op %d: %+v, want %+v", i, g, w)
		}
	}
	for n := 0; n < len(e.buf); n++ {
		_ = checkOps(e.buf[:n]) // must not panic
	}
}

// TestReadsSeeAcknowledgedCommits checks that Meta and ForEach see each
// commit whose callback ran, although the applier would wait an hour.
func TestReadsSeeAcknowledgedCommits(t *testing.T) {
	s := start(t, testConfig(t.TempDir()))
	for i := uint64(1); i <= 20; i++ {
		v := fmt.Sprint(i)
		apply(t, s, nil, putMeta("seq", v))
		if got, err := s.Meta("seq"); err != nil || string(got) != v {
			t.Fatalf("Meta after commit %d: %q, %v", i, got, err)
		}
		apply(t, s, nil, put("q", i, v))
		n := 0
		if err := s.ForEach(func(string, uint64, []byte) error { n++; return nil }); err != nil || n != int(i) {
			t.Fatalf("ForEach after commit %d: %d records, %v", i, n, err)
		}
	}
	// From a callback too (the completer is not the applier).
	ch := make(chan string, 1)
	s.Submit([]Op{putMeta("cb", "x")}, false, func(err error) {
		v, _ := s.Meta("cb")
		ch <- string(v)
	})
	if v := <-ch; v != "x" {
		t.Fatalf("Meta in callback: %q", v)
	}
}

// TestCallbacksMaySubmit: completion callbacks that submit more work
// (as the broker's do: a committed message can expire on dispatch and be
// deleted) must not deadlock the store, however full its queues are.
func TestCallbacksMaySubmit(t *testing.T) {
	cfg := DefaultConfig(filepath.Join(t.TempDir(), "cb.db"))
	cfg.Sync = SyncNone
	cfg.MaxBatchOps = 4
	s, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	const n = 20000
	var wg sync.WaitGroup
	wg.Add(n)
	val := []byte("v")
	go func() {
		for i := 0; i < n; i++ {
			i := i
			s.Submit([]Op{{Kind: OpPut, Bucket: "/queue/a", Key: uint64(i), Value: val}}, false, func(error) {
				s.Submit([]Op{{Kind: OpDelete, Bucket: "/queue/a", Key: uint64(i)}}, false, func(error) { wg.Done() })
			})
		}
	}()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		s.Close()
	case <-time.After(60 * time.Second):
		// Not closed: Close would wait on the deadlock.
		t.Fatal("callbacks that submit deadlocked the store")
	}
}
