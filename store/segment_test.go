package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	bolt "go.etcd.io/bbolt"
)

// acrossSwitch fills segment 0 of a fresh store, goes on in segment 1 for
// a few records, and crashes. Every record stays in the log (the applier
// waits an hour; nothing reads). It returns the states after each group
// and how many groups went to segment 0.
func acrossSwitch(t *testing.T, cfg Config) ([]*model, int) {
	t.Helper()
	s := open(t, cfg)
	s.ap.flushBytes = 1 << 40 // keep every record out of bbolt
	s.Start()
	m := newModel()
	states := []*model{m.clone()}
	gen0 := s.walGen()
	inFirst := 0
	for i := uint64(1); s.walGen() == gen0 || i < uint64(inFirst)+6; i++ {
		apply(t, s, m, put("q", i, strings.Repeat("s", 300)), del("q", i-1), putMeta("last", fmt.Sprint(i)))
		states = append(states, m.clone())
		if s.walGen() == gen0 {
			inFirst++
		}
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	return states, inFirst
}

// TestReplayAcrossSegments: a crash after a switch replays the older
// segment, then the newer.
func TestReplayAcrossSegments(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.WALSize = 64 << 10
	states, inFirst := acrossSwitch(t, cfg)
	ws, recs, _ := records(t, cfg.Path+".wal")
	if ws.newest != 1 || ws.segs[1].prev != ws.segs[0].gen || len(recs) != len(states)-1 {
		t.Fatalf("scan: newest %d, prev %d, %d records; want segment 1 after %d, %d records (%d in segment 0)",
			ws.newest, ws.segs[1].prev, len(recs), ws.segs[0].gen, len(states)-1, inFirst)
	}
	s := open(t, cfg)
	defer s.Close()
	if rs := s.Replay(); rs.Records != len(states)-1 {
		t.Fatalf("replayed %d records, want %d", rs.Records, len(states)-1)
	}
	checkContents(t, s, states[len(states)-1])
}

// damageOlder applies damage to the log left by acrossSwitch.
func damageOlder(t *testing.T, path string, damage func(data []byte, ws walScan)) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ws, _, _ := records(t, path)
	damage(data, ws)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// lastRecordOf returns the offset of the last record of segment 0 in a
// log left by acrossSwitch.
func lastRecordOf(t *testing.T, data []byte, ws walScan) int64 {
	t.Helper()
	_, start, _ := segBounds(ws.size, 0)
	end := ws.segs[1].prevEnd
	off := start
	for {
		n := int64(binary.LittleEndian.Uint32(data[off:]))
		if off+recHeaderLen+n >= end {
			return off
		}
		off += recHeaderLen + n
	}
}

// TestOlderSegmentDamaged: the older segment was complete and synced
// before the newer began, so even its last record failing is damage, not
// a torn write; and so is losing its header.
func TestOlderSegmentDamaged(t *testing.T) {
	cases := map[string]func(t *testing.T, data []byte, ws walScan) int{
		// returns the index of the first record lost
		"last-record": func(t *testing.T, data []byte, ws walScan) int {
			off := lastRecordOf(t, data, ws)
			data[off+recHeaderLen+5] ^= 1
			n := 0
			_, start, _ := segBounds(ws.size, 0)
			for o := start; o < off; n++ {
				o += recHeaderLen + int64(binary.LittleEndian.Uint32(data[o:]))
			}
			return n
		},
		"middle-record": func(t *testing.T, data []byte, ws walScan) int {
			_, start, _ := segBounds(ws.size, 0)
			o := start
			for i := 0; i < 3; i++ {
				o += recHeaderLen + int64(binary.LittleEndian.Uint32(data[o:]))
			}
			data[o+recHeaderLen+2] ^= 1
			return 3
		},
		"header": func(t *testing.T, data []byte, ws walScan) int {
			copy(data[0:2*walBlock], make([]byte, 2*walBlock))
			return 0
		},
	}
	for name, damage := range cases {
		t.Run(name, func(t *testing.T) {
			cfg := testConfig(t.TempDir())
			cfg.WALSize = 64 << 10
			states, inFirst := acrossSwitch(t, cfg)
			lost := -1
			damageOlder(t, cfg.Path+".wal", func(data []byte, ws walScan) { lost = damage(t, data, ws) })
			if _, err := Open(cfg); !errors.Is(err, ErrCorruptLog) || !strings.Contains(err.Error(), cfg.Path+".wal") {
				t.Fatalf("Open: %v, want ErrCorruptLog naming the file", err)
			}
			cfg.Recover = RecoverTruncate
			s := open(t, cfg)
			defer s.Close()
			rs := s.Replay()
			// A segment without header has no salt to check its records
			// with: they are dropped uncounted.
			if rs.Records != lost || (name != "header" && rs.Records+rs.DroppedRecords != len(states)-1) ||
				(name == "header" && rs.DroppedRecords != len(states)-1-inFirst) {
				t.Fatalf("replay %+v, want %d records and %d dropped (%d in segment 0)", rs, lost, len(states)-1-lost, inFirst)
			}
			checkContents(t, s, states[lost])
		})
	}
}

// TestSwitchWaitsForApplier: when the applier has not yet copied the
// other segment's records into bbolt, the switch waits for it, and no
// record is lost.
func TestSwitchWaitsForApplier(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.WALSize = 64 << 10
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	release, waiting := make(chan struct{}), make(chan struct{})
	var once sync.Once
	cfg.hooks = &hooks{
		update: func(db *bolt.DB, fn func(*bolt.Tx) error) error {
			<-release
			return db.Update(fn)
		},
		switchWait: func() { once.Do(func() { close(waiting) }) },
	}
	s := open(t, cfg)
	s.Start()
	m := newModel()
	gen0 := s.walGen()
	done := make(chan error)
	go func() {
		var err error
		for i := uint64(1); err == nil && s.walGen() < gen0+2; i++ {
			ops := []Op{put("q", i, strings.Repeat("w", 500))}
			if err = s.Apply(ops); err == nil {
				m.apply(ops)
			}
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("the writer went back to segment 0 while its records were not in bbolt (%v)", err)
	case <-waiting:
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if w := counterValue(t, s.metrics.switchWaits); w != 1 {
		t.Fatalf("%v switches waited, want 1", w)
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	cfg = withoutHooks(cfg)
	cfg.Registerer = nil
	s = open(t, cfg)
	defer s.Close()
	checkContents(t, s, m)
}

// v1Log writes a version 1 log (one segment) holding groups.
func v1Log(t *testing.T, path string, size int64, gen uint64, groups [][]Op) {
	t.Helper()
	data := make([]byte, size)
	h := make([]byte, v1HeaderLen)
	copy(h, walMagic)
	binary.LittleEndian.PutUint32(h[8:], 1)
	binary.LittleEndian.PutUint64(h[12:], gen)
	binary.LittleEndian.PutUint32(h[20:], 0xabcdef)
	binary.LittleEndian.PutUint32(h[24:], crc32.Checksum(h[:24], castagnoli))
	copy(data[int64(gen%2)*walBlock:], h)
	chain, off := uint32(0xabcdef), int64(v1DataStart)
	for _, g := range groups {
		enc := encoder{buf: make([]byte, recHeaderLen)}
		for i := range g {
			enc.append(&g[i])
		}
		chain = sealRecordV2(enc.buf, gen, chain)
		off += int64(copy(data[off:], enc.buf))
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestV1LogUpgrade: a log left by the one-segment format is replayed and
// replaced by a two-segment one.
func TestV1LogUpgrade(t *testing.T) {
	cfg := testConfig(t.TempDir())
	s := open(t, cfg) // the bbolt file
	s.Close()
	m := newModel()
	var groups [][]Op
	for i := uint64(1); i <= 10; i++ {
		g := []Op{put("q", i, fmt.Sprint(i)), del("q", i-1), putMeta("v", fmt.Sprint(i))}
		groups = append(groups, g)
		m.apply(g)
	}
	v1Log(t, cfg.Path+".wal", cfg.WALSize, 7, groups)
	s = open(t, cfg)
	if rs := s.Replay(); rs.Records != 10 {
		t.Fatalf("replayed %d records of the version 1 log, want 10", rs.Records)
	}
	checkContents(t, s, m)
	s.Start()
	apply(t, s, m, put("q", 99, "after"))
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	if ws, _, _ := records(t, cfg.Path+".wal"); ws.version != walVersion || ws.maxGen <= 7 {
		t.Fatalf("log version %d at generation %d after the upgrade", ws.version, ws.maxGen)
	}
	s = open(t, cfg)
	defer s.Close()
	checkContents(t, s, m)
}

func counterValue(t testing.TB, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestLogSyncSeconds: every synced commit is one fdatasync of the log,
// timed in brokerd_store_log_sync_seconds; unsynced commits add none.
func TestLogSyncSeconds(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.Registerer = prometheus.NewRegistry()
	s := open(t, cfg)
	s.Start()
	defer s.Close()
	count := func() uint64 {
		var m dto.Metric
		if err := s.metrics.syncSeconds.Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetHistogram().GetSampleCount()
	}
	before := count()
	for i := uint64(1); i <= 5; i++ {
		apply(t, s, nil, put("q", i, "v"))
	}
	if got := count() - before; got != 5 {
		t.Fatalf("%d log fdatasyncs timed for 5 synced commits", got)
	}
	done := make(chan error)
	s.Submit([]Op{put("q", 9, "v")}, false, func(err error) { done <- err })
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := count() - before; got != 5 {
		t.Fatalf("an unsynced commit timed an fdatasync (%d in all)", got)
	}
}
