package store

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// rssFileKiB reads RssFile (file-backed resident pages) of this process.
func rssFileKiB(t *testing.T) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status")
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "RssFile:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return n
		}
	}
	t.Skip("no RssFile in /proc/self/status")
	return 0
}

// Reading a large store through bbolt's map makes its pages resident;
// releaseMapped gives them back, and the data reads the same afterwards.
func TestReleaseMapped(t *testing.T) {
	cfg := DefaultConfig(filepath.Join(t.TempDir(), "m.db"))
	cfg.Sync = SyncNone
	s, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	defer s.Close()
	val := make([]byte, 4000)
	const n = 16000 // about 64 MiB
	for i := 0; i < n; i += 500 {
		var ops []Op
		for k := i; k < i+500; k++ {
			ops = append(ops, Op{Kind: OpPut, Bucket: "/queue/m", Key: uint64(k + 1), Value: val})
		}
		if err := s.Apply(ops); err != nil {
			t.Fatal(err)
		}
	}
	read := func() int {
		count := 0
		if err := s.Scan("/queue/m", 0, n+1, 1<<40, func(uint64, []byte) error { count++; return nil }); err != nil {
			t.Fatal(err)
		}
		return count
	}
	if got := read(); got != n {
		t.Fatalf("scan read %d entries, want %d", got, n)
	}
	before := rssFileKiB(t)
	if released, err := releaseMapped(s.db, 0); err != nil || !released {
		t.Fatalf("releaseMapped: %v, %v", released, err)
	}
	after := rssFileKiB(t)
	if before-after < 32<<10 {
		t.Fatalf("RssFile %d KiB before, %d KiB after releasing the map: want at least 32 MiB less", before, after)
	}
	if got := read(); got != n {
		t.Fatalf("after release, scan read %d entries, want %d", got, n)
	}
}

// A started store releases bbolt's map pages once a round while its data
// is above the threshold: draining a large backlog through Scan does not
// leave the file resident in the broker.
func TestMapLoopReleases(t *testing.T) {
	cfg := DefaultConfig(filepath.Join(t.TempDir(), "m.db"))
	cfg.Sync = SyncNone
	tick := make(chan time.Time)
	released := make(chan bool)
	cfg.hooks = &hooks{mapTick: tick, mapReleased: func(r bool) { released <- r }}
	s, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.releaseAbove = 16 << 20
	s.Start()
	closed := false
	defer func() {
		if !closed {
			s.Close()
		}
	}()
	round := func() bool {
		tick <- time.Now()
		return <-released
	}
	val := make([]byte, 4000)
	fill := func(from, to int) {
		for i := from; i < to; i += 500 {
			var ops []Op
			for k := i; k < min(to, i+500); k++ {
				ops = append(ops, Op{Kind: OpPut, Bucket: "/queue/m", Key: uint64(k + 1), Value: val})
			}
			if err := s.Apply(ops); err != nil {
				t.Fatal(err)
			}
		}
	}
	read := func() int {
		count := 0
		if err := s.Scan("/queue/m", 0, 0, 0, func(uint64, []byte) error { count++; return nil }); err != nil {
			t.Fatal(err)
		}
		return count
	}
	fill(0, 1000) // about 4 MiB: below the threshold
	read()
	if round() {
		t.Fatal("released the map of a store below the threshold")
	}
	const n = 12000 // about 48 MiB
	fill(1000, n)
	if got := read(); got != n {
		t.Fatalf("scan read %d entries, want %d", got, n)
	}
	before := rssFileKiB(t)
	if !round() {
		t.Fatal("did not release the map of a store above the threshold")
	}
	after := rssFileKiB(t)
	if before-after < 24<<10 {
		t.Fatalf("RssFile %d KiB before, %d KiB after a round: want at least 24 MiB less", before, after)
	}
	if got := read(); got != n {
		t.Fatalf("after release, scan read %d entries, want %d", got, n)
	}
	// Close stops the loop before it closes bbolt: nothing takes a
	// tick afterwards.
	closed = true
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case tick <- time.Now():
		t.Fatal("the map release loop still runs after Close")
	default:
	}
}
