package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// -mode fsync measures what one durable commit of a write-ahead log costs on
// a disk: it appends records of -size bytes plus a 96-byte header (about
// what brokerd logs for a 256-byte SEND) to a file in -fsync-dir, each
// followed by fdatasync, for -duration, and prints the p50 and p99 of one
// write+fdatasync. Like brokerd's log, the file is written with zeros and
// synced first, so the timed writes overwrite allocated blocks and
// fdatasync has no metadata to commit (an append would time a journal
// commit as well). compare.sh runs it on brokerd's data directory just
// before each brokerd run (FSYNC_DIR), so a receipt's latency can be set
// against the disk's in the same run: what is above it is the broker's
// path, not the disk.
func fsyncMain(c config) int {
	if c.fsyncDir == "" {
		fmt.Fprintln(os.Stderr, "bench: -mode fsync needs -fsync-dir")
		return 2
	}
	res, err := fsyncProbe(c.fsyncDir, c.size+96, c.duration)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	b, _ := json.Marshal(res)
	if !c.jsonOnly {
		fmt.Printf("fdatasync of a %d-byte append in %s: p50 %.3f ms  p99 %.3f ms  (%d in %s)\n",
			res.Record, res.Dir, res.P50, res.P99, res.N, c.duration)
	}
	fmt.Println(string(b))
	return 0
}

type fsyncResult struct {
	Mode   string  `json:"mode"`
	Dir    string  `json:"dir"`
	Record int     `json:"record_bytes"`
	N      int     `json:"n"`
	P50    float64 `json:"fsync_p50_ms"`
	P99    float64 `json:"fsync_p99_ms"`
}

func fsyncProbe(dir string, record int, d time.Duration) (fsyncResult, error) {
	f, err := os.CreateTemp(dir, ".bench-fsync-*")
	if err != nil {
		return fsyncResult{}, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	const size = 16 << 20
	zero := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(zero)) {
		if _, err := f.WriteAt(zero, off); err != nil {
			return fsyncResult{}, err
		}
	}
	if err := f.Sync(); err != nil {
		return fsyncResult{}, err
	}
	buf := make([]byte, record)
	for i := range buf {
		buf[i] = byte(i)
	}
	var lat []time.Duration
	var off int64
	for end := time.Now().Add(d); time.Now().Before(end); {
		t := time.Now()
		if _, err := f.WriteAt(buf, off); err != nil {
			return fsyncResult{}, err
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return fsyncResult{}, fmt.Errorf("fdatasync %s: %w", f.Name(), err)
		}
		lat = append(lat, time.Since(t))
		off += int64(record)
		if off+int64(record) > size {
			off = 0
		}
	}
	if len(lat) == 0 {
		return fsyncResult{}, errors.New("fsync probe: no sample (duration too short)")
	}
	slices.Sort(lat)
	ms := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))]) / 1e6 }
	return fsyncResult{Mode: "fsync", Dir: dir, Record: record, N: len(lat), P50: ms(0.50), P99: ms(0.99)}, nil
}
