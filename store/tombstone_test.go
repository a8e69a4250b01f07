package store

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	bolt "go.etcd.io/bbolt"
)

func tomb(bucket string, key uint64) Op { return Op{Kind: OpTombstone, Bucket: bucket, Key: key} }

var rotate = Op{Kind: OpRotateTombstones}

// tombModel is what the store must hold: the entries put and not removed,
// where a put of a key with a live tombstone is ignored.
type tombModel struct {
	data  map[entry]string
	gen   [2]map[entry]bool
	cur   int
	count map[string]int64
}

func newTombModel() *tombModel {
	return &tombModel{data: map[entry]string{}, gen: [2]map[entry]bool{{}, {}}, count: map[string]int64{}}
}

func (m *tombModel) apply(ops []Op) {
	for _, op := range ops {
		e := entry{op.Bucket, op.Key}
		switch op.Kind {
		case OpPut:
			if m.gen[0][e] || m.gen[1][e] {
				continue
			}
			if _, ok := m.data[e]; !ok {
				m.count[op.Bucket]++
			}
			m.data[e] = string(op.Value)
		case OpDelete, OpTombstone:
			if _, ok := m.data[e]; ok {
				m.count[op.Bucket]--
				delete(m.data, e)
			}
			if op.Kind == OpTombstone {
				m.gen[m.cur][e] = true
			}
		case OpRotateTombstones:
			m.cur = 1 - m.cur
			m.gen[m.cur] = map[entry]bool{}
		}
	}
}

func (m *tombModel) tombstones(bucket string) []uint64 {
	var keys []uint64
	for _, g := range m.gen {
		for e := range g {
			if e.bucket == bucket {
				keys = append(keys, e.key)
			}
		}
	}
	slices.Sort(keys)
	return slices.Compact(keys)
}

func checkTombModel(t *testing.T, s *Store, m *tombModel, buckets []string) {
	t.Helper()
	got := map[entry]string{}
	if err := s.ForEach(func(b string, k uint64, v []byte) error {
		got[entry{b, k}] = string(v)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for e, v := range m.data {
		if got[e] != v {
			t.Fatalf("%v = %q, want %q", e, got[e], v)
		}
	}
	for e := range got {
		if _, ok := m.data[e]; !ok {
			t.Fatalf("unexpected %v (removed, or put after its tombstone)", e)
		}
	}
	stats, err := s.Buckets()
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range stats {
		if st.Count != m.count[st.Name] {
			t.Fatalf("bucket %s counts %d entries, want %d", st.Name, st.Count, m.count[st.Name])
		}
	}
	for _, b := range buckets {
		var keys []uint64
		if err := s.ScanTombstones(b, 0, 0, func(k uint64) error {
			keys = append(keys, k)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if want := m.tombstones(b); !slices.Equal(keys, want) {
			t.Fatalf("tombstones of %s = %v, want %v", b, keys, want)
		}
	}
}

// A removal and a put of the same key commute: the acknowledgement that
// reaches a replica before the copy of its message keeps it removed.
func TestTombstoneBeforePut(t *testing.T) {
	cfg := testConfig(t.TempDir())
	s := start(t, cfg)
	m := newTombModel()
	ops := [][]Op{
		{tomb("/queue/a", 5)},
		{put("/queue/a", 5, "stale copy"), put("/queue/a", 6, "live")},
		{put("/queue/a", 7, "x"), tomb("/queue/a", 7), put("/queue/a", 7, "rewrite after ack")},
	}
	for _, g := range ops {
		if err := s.Apply(g); err != nil {
			t.Fatal(err)
		}
		m.apply(g)
	}
	checkTombModel(t, s, m, []string{"/queue/a"})
	if _, ok := m.data[entry{"/queue/a", 5}]; ok {
		t.Fatal("model keeps a tombstoned key")
	}
	// Two rotations forget the tombstones: the key may be put again.
	for _, g := range [][]Op{{rotate}, {put("/queue/a", 5, "still dead")}, {rotate}, {put("/queue/a", 5, "forgotten")}} {
		if err := s.Apply(g); err != nil {
			t.Fatal(err)
		}
		m.apply(g)
	}
	checkTombModel(t, s, m, []string{"/queue/a"})
	if m.data[entry{"/queue/a", 5}] != "forgotten" {
		t.Fatal("a put after two rotations is not kept")
	}
}

// Random puts, deletes, tombstones and rotations over buckets whose names
// are prefixes of each other, checked against the model live, after a
// crash (the log replays) and after a clean restart.
func TestTombstoneModel(t *testing.T) {
	for seed := range uint64(4) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			cfg := testConfig(t.TempDir())
			buckets := []string{"/queue/a", "/queue/ab", "/queue/b"}
			s := open(t, cfg)
			s.Start()
			m := newTombModel()
			for i := range 300 {
				var g []Op
				for range 1 + rng.IntN(6) {
					b := buckets[rng.IntN(len(buckets))]
					k := 1 + rng.Uint64N(40)
					switch r := rng.IntN(20); {
					case r < 10:
						g = append(g, put(b, k, fmt.Sprint("v", i)))
					case r < 13:
						g = append(g, del(b, k))
					case r < 19:
						g = append(g, tomb(b, k))
					default:
						g = append(g, rotate)
					}
				}
				if err := s.Apply(g); err != nil {
					t.Fatal(err)
				}
				m.apply(g)
				if i%50 == 0 {
					checkTombModel(t, s, m, buckets)
				}
			}
			checkTombModel(t, s, m, buckets)
			if err := s.crash(); err != nil {
				t.Fatal(err)
			}
			s = open(t, cfg)
			checkTombModel(t, s, m, buckets)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = start(t, cfg)
			checkTombModel(t, s, m, buckets)
		})
	}
}

func TestScanTombstonesLimit(t *testing.T) {
	s := start(t, testConfig(t.TempDir()))
	var ops []Op
	for k := uint64(1); k <= 10; k++ {
		ops = append(ops, tomb("/queue/q", k))
		if k == 5 {
			ops = append(ops, rotate)
		}
	}
	ops = append(ops, tomb("/queue/q", 3)) // in both generations
	if err := s.Apply(ops); err != nil {
		t.Fatal(err)
	}
	var got []uint64
	after := uint64(0)
	for {
		var page []uint64
		if err := s.ScanTombstones("/queue/q", after, 3, func(k uint64) error {
			page = append(page, k)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		if len(page) > 3 {
			t.Fatalf("page of %d keys, limit 3", len(page))
		}
		got = append(got, page...)
		after = page[len(page)-1]
	}
	if want := []uint64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}; !slices.Equal(got, want) {
		t.Fatalf("paged tombstones = %v, want %v", got, want)
	}
}

// The key hash in a bucket's stats depends only on the keys it holds, not
// on the history that led there, and a store written before the hash
// existed gets it at Open.
func TestBucketKeyHash(t *testing.T) {
	a := start(t, testConfig(t.TempDir()))
	b := start(t, testConfig(t.TempDir()))
	if err := a.Apply([]Op{put("/queue/h", 1, "x"), put("/queue/h", 2, "y"), put("/queue/h", 3, "z"), del("/queue/h", 2)}); err != nil {
		t.Fatal(err)
	}
	if err := b.Apply([]Op{put("/queue/h", 3, "z"), tomb("/queue/h", 7), put("/queue/h", 1, "x"), put("/queue/h", 1, "x again"), put("/queue/h", 7, "dead")}); err != nil {
		t.Fatal(err)
	}
	sa, err := a.Bucket("/queue/h")
	if err != nil {
		t.Fatal(err)
	}
	sb, err := b.Bucket("/queue/h")
	if err != nil {
		t.Fatal(err)
	}
	if sa.Count != 2 || sa.KeyHash == 0 || sa.KeyHash != sb.KeyHash || sa.Count != sb.Count {
		t.Fatalf("same keys, different summaries: %+v vs %+v", sa, sb)
	}
	if err := b.Apply([]Op{put("/queue/h", 4, "w")}); err != nil {
		t.Fatal(err)
	}
	if sb, _ = b.Bucket("/queue/h"); sb.KeyHash == sa.KeyHash {
		t.Fatal("a key more, same hash")
	}
	if none, err := a.Bucket("/queue/none"); err != nil || none.Count != 0 || none.KeyHash != 0 {
		t.Fatalf("missing bucket: %+v, %v", none, err)
	}

	// A stats record of the old format (no hash) is upgraded at Open.
	cfg := testConfig(t.TempDir())
	s := open(t, cfg)
	s.Start()
	if err := s.Apply([]Op{put("/queue/h", 1, "x"), put("/queue/h", 3, "z")}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(cfg.Path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		k := []byte(queuePrefix + "/queue/h")
		v := tx.Bucket(statsBucket).Get(k)
		return tx.Bucket(statsBucket).Put(k, bytes.Clone(v[:statsLenV1]))
	}); err != nil {
		t.Fatal(err)
	}
	db.Close()
	s = start(t, cfg)
	up, err := s.Bucket("/queue/h")
	if err != nil {
		t.Fatal(err)
	}
	if up.Count != 2 || up.KeyHash != sa.KeyHash {
		t.Fatalf("upgraded stats %+v, want count 2 and hash %x", up, sa.KeyHash)
	}
}

func TestMetaDeleteAndPrefix(t *testing.T) {
	cfg := testConfig(t.TempDir())
	s := open(t, cfg)
	s.Start()
	ops := []Op{putMeta("txn/1", "a"), putMeta("txn/2", "b"), putMeta("txo", "c"), putMeta("txn/3", "d"), {Kind: OpDeleteMeta, Name: "txn/2"}, {Kind: OpDeleteMeta, Name: "missing"}}
	if err := s.Apply(ops); err != nil {
		t.Fatal(err)
	}
	list := func() string {
		var out []string
		if err := s.MetaPrefix("txn/", func(name string, v []byte) error {
			out = append(out, name+"="+string(v))
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return fmt.Sprint(out)
	}
	if got := list(); got != "[txn/1=a txn/3=d]" {
		t.Fatalf("MetaPrefix = %s", got)
	}
	// The delete replays from the log after a crash.
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	s = start(t, cfg)
	if got := list(); got != "[txn/1=a txn/3=d]" {
		t.Fatalf("after a crash MetaPrefix = %s", got)
	}
}
