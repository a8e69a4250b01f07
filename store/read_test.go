package store

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// testWeigh is not len, so that a store that ignores Config.Weigh is seen.
func testWeigh(v []byte) int64 { return 3*int64(len(v)) + 1 }

// stats is what Buckets should return for m.
func (m *model) stats(weigh func([]byte) int64) []BucketStats {
	var out []BucketStats
	for b := range m.buckets {
		st := BucketStats{Name: b}
		for k, v := range m.data {
			if k.bucket != b {
				continue
			}
			st.Count++
			st.Bytes += weigh([]byte(v))
			st.KeyHash ^= keyMix(k.key)
			if st.FirstKey == 0 && st.Count == 1 || k.key < st.FirstKey {
				st.FirstKey = k.key
			}
			st.LastKey = max(st.LastKey, k.key)
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b BucketStats) int { return strings.Compare(a.Name, b.Name) })
	return out
}

func (m *model) keys(bucket string) []uint64 {
	var out []uint64
	for k := range m.data {
		if k.bucket == bucket {
			out = append(out, k.key)
		}
	}
	slices.Sort(out)
	return out
}

func checkStats(t *testing.T, s *Store, m *model, weigh func([]byte) int64) {
	t.Helper()
	got, err := s.Buckets()
	if err != nil {
		t.Fatalf("Buckets: %v", err)
	}
	want := m.stats(weigh)
	if !reflect.DeepEqual(got, want) && !(len(got) == 0 && len(want) == 0) {
		t.Fatalf("Buckets:\n got %+v\nwant %+v", got, want)
	}
}

// checkScan pages through every bucket of m (and a missing one) with
// random limits and checks the pages join up to exactly its keys, in
// order, with the right values, each page within its limits.
func checkScan(t *testing.T, s *Store, m *model, weigh func([]byte) int64, r *rand.Rand) {
	t.Helper()
	names := []string{"missing"}
	for b := range m.buckets {
		names = append(names, b)
	}
	for _, b := range names {
		var got []uint64
		after := uint64(0)
		for {
			limit, maxBytes := r.IntN(5), r.IntN(200)
			var page []uint64
			var weights []int64
			err := s.Scan(b, after, limit, maxBytes, func(key uint64, value []byte) error {
				if want, ok := m.data[entry{b, key}]; !ok || want != string(value) {
					t.Fatalf("Scan(%q): key %d value %.20q, want %.20q (present %v)", b, key, value, want, ok)
				}
				page = append(page, key)
				weights = append(weights, weigh(value))
				return nil
			})
			if err != nil {
				t.Fatalf("Scan(%q, %d): %v", b, after, err)
			}
			if len(page) == 0 {
				break
			}
			if limit > 0 && len(page) > limit {
				t.Fatalf("Scan limit %d passed %d entries", limit, len(page))
			}
			var sum int64
			for _, w := range weights[:len(weights)-1] {
				sum += w
			}
			if maxBytes > 0 && sum >= int64(maxBytes) {
				t.Fatalf("Scan maxBytes %d went on after %d bytes", maxBytes, sum)
			}
			// Stopped early only at a limit.
			all := m.keys(b)
			if i := slices.Index(all, page[len(page)-1]); i+1 < len(all) &&
				(limit <= 0 || len(page) < limit) && (maxBytes <= 0 || sum+weights[len(weights)-1] < int64(maxBytes)) {
				t.Fatalf("Scan(%q, %d, %d, %d) stopped after %d entries with more to pass", b, after, limit, maxBytes, len(page))
			}
			got = append(got, page...)
			after = page[len(page)-1]
		}
		if want := m.keys(b); !slices.Equal(got, want) {
			t.Fatalf("Scan(%q) pages: %v, want %v", b, got, want)
		}
	}
}

// randomOps is a group of puts (new keys and overwrites), deletes (of
// present and missing keys) and now and then a bucket deletion.
func randomOps(r *rand.Rand) []Op {
	var ops []Op
	for j := r.IntN(6); j >= 0; j-- {
		b := fmt.Sprint("/queue/", r.IntN(4))
		key := uint64(1 + r.IntN(40))
		switch x := r.IntN(20); {
		case x == 0:
			ops = append(ops, Op{Kind: OpDeleteBucket, Bucket: b})
		case x < 7:
			ops = append(ops, del(b, key))
		default:
			ops = append(ops, put(b, key, strings.Repeat("v", r.IntN(50))))
		}
	}
	return ops
}

// TestBucketStats checks Buckets and Scan against a model through random
// histories, after Close and Open, and after crashes whose log replays
// over a bbolt file that already holds part of it.
func TestBucketStats(t *testing.T) {
	for _, weigh := range []func([]byte) int64{nil, testWeigh} {
		t.Run(fmt.Sprint("weigh=", weigh != nil), func(t *testing.T) {
			cfg := testConfig(t.TempDir())
			cfg.Weigh = weigh
			if weigh == nil {
				weigh = weighLen
			}
			r := rand.New(rand.NewPCG(1, 2))
			m := newModel()
			s := open(t, cfg)
			s.Start()
			for round := 0; round < 6; round++ {
				for i := 0; i < 150; i++ {
					ops := randomOps(r)
					if r.IntN(2) == 0 {
						apply(t, s, m, ops...)
					} else {
						var wg sync.WaitGroup
						wg.Add(1)
						s.Submit(ops, false, func(err error) {
							if err != nil {
								t.Error(err)
							}
							wg.Done()
						})
						wg.Wait()
						m.apply(ops)
					}
					if i%50 == 0 {
						checkStats(t, s, m, weigh)
					}
				}
				checkStats(t, s, m, weigh)
				checkScan(t, s, m, weigh, r)
				// The reads above made the applier copy the log into bbolt;
				// these stay in the log only.
				for i := 0; i < 50; i++ {
					apply(t, s, m, randomOps(r)...)
				}
				if round%2 == 0 {
					if err := s.crash(); err != nil {
						t.Fatal(err)
					}
				} else if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				s = open(t, cfg)
				s.Start()
				checkContents(t, s, m)
				checkStats(t, s, m, weigh)
				checkScan(t, s, m, weigh, r)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestStatsOfOldStore: a bbolt file written before stats existed gets
// them counted at Open.
func TestStatsOfOldStore(t *testing.T) {
	cfg := testConfig(t.TempDir())
	m := newModel()
	s := open(t, cfg)
	s.Start()
	apply(t, s, m, put("a", 1, "x"), put("a", 5, "xyz"), put("b", 2, ""), put("c", 1, "c"), del("c", 1))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, cfg)
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.DeleteBucket(statsBucket) }); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = open(t, cfg)
	defer s.Close()
	checkStats(t, s, m, weighLen)
}

func TestScanEdges(t *testing.T) {
	s := start(t, testConfig(t.TempDir()))
	apply(t, s, nil, put("q", 0, "zero"), put("q", 7, "seven"), put("q", ^uint64(0), "max"))
	var keys []uint64
	collect := func(k uint64, _ []byte) error { keys = append(keys, k); return nil }
	// maxBytes smaller than any value still passes one entry.
	if err := s.Scan("q", 0, 0, 1, collect); err != nil || !slices.Equal(keys, []uint64{7}) {
		t.Fatalf("Scan after 0, maxBytes 1: %v %v", keys, err)
	}
	keys = nil
	if err := s.Scan("q", 7, 0, 0, collect); err != nil || !slices.Equal(keys, []uint64{^uint64(0)}) {
		t.Fatalf("Scan after 7: %v %v", keys, err)
	}
	keys = nil
	if err := s.Scan("q", ^uint64(0), 0, 0, collect); err != nil || len(keys) != 0 {
		t.Fatalf("Scan after max: %v %v", keys, err)
	}
	stop := fmt.Errorf("stop")
	if err := s.Scan("q", 0, 0, 0, func(uint64, []byte) error { return stop }); err != stop {
		t.Fatalf("Scan returned %v, want fn's error", err)
	}
	// A deleted bucket is gone from Buckets, and comes back empty-first.
	apply(t, s, nil, Op{Kind: OpDeleteBucket, Bucket: "q"}, Op{Kind: OpDeleteBucket, Bucket: "never"}, del("other", 1))
	if b, err := s.Buckets(); err != nil || len(b) != 0 {
		t.Fatalf("Buckets after delete: %+v %v", b, err)
	}
	apply(t, s, nil, put("q", 3, "abc"), Op{Kind: OpDeleteBucket, Bucket: "q"}, put("q", 4, "de"))
	if b, err := s.Buckets(); err != nil || !reflect.DeepEqual(b, []BucketStats{{Name: "q", Count: 1, Bytes: 2, FirstKey: 4, LastKey: 4, KeyHash: keyMix(4)}}) {
		t.Fatalf("Buckets after delete and put in one commit: %+v %v", b, err)
	}
}

// TestReadsDuringUnsyncedLoad: under SyncAlways, unsynced commits are not
// durable in the log, so a read makes the applier ask the writer for an
// fdatasync, while the writer is busy with more commits. Every read still
// sees every commit acknowledged before it.
func TestReadsDuringUnsyncedLoad(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.WALSize = 1 << 20
	s := start(t, cfg)
	const writers, perWriter = 8, 1500
	var acked atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var pending sync.WaitGroup
			for i := 0; i < perWriter; i++ {
				pending.Add(1)
				s.Submit([]Op{put("q", uint64(w*perWriter+i+1), "v")}, false, func(err error) {
					if err != nil {
						t.Error(err)
					}
					acked.Add(1)
					pending.Done()
				})
				if i%100 == 99 {
					pending.Wait() // bound the queue
				}
			}
			pending.Wait()
		}(w)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for reads := 0; ; reads++ {
		select {
		case <-done:
			if b, err := s.Buckets(); err != nil || len(b) != 1 || b[0].Count != writers*perWriter {
				t.Fatalf("Buckets after the load: %+v, %v", b, err)
			}
			return
		default:
		}
		before := acked.Load()
		b, err := s.Buckets()
		if err != nil {
			t.Fatal(err)
		}
		var n int64
		if len(b) == 1 {
			n = b[0].Count
		}
		if n < before {
			t.Fatalf("read %d: %d entries, but %d commits were acknowledged before it", reads, n, before)
		}
	}
}
