package store

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// tmpfs mounts a tmpfs of size bytes in a new temporary directory and
// returns its path; it is unmounted at the end of the test (register the
// store's Close after this, so that it runs first). It skips the test
// where mounting is not allowed.
func tmpfs(t *testing.T, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+itoa(size)); err != nil {
		t.Skipf("cannot mount a tmpfs (%v): this test needs a small filesystem to fill", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

func itoa(n int64) string {
	var b []byte
	for n >= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
		n /= 10
	}
	return string(append([]byte{byte('0' + n)}, b...))
}

// TestLowDisk fills a small filesystem until the alarm is on, deletes
// entries (which frees bbolt pages, not filesystem space) and sees the
// alarm clear without a restart.
func TestLowDisk(t *testing.T) {
	dir := tmpfs(t, 16<<20)
	cfg := testConfig(dir)
	cfg.MinFreeBytes = 4 << 20
	s := start(t, cfg)
	if err := s.checkDisk(); err != nil {
		t.Fatal(err)
	}
	if s.LowDisk() {
		t.Fatalf("LowDisk on an empty 16 MiB filesystem (free %d)", s.FreeBytes())
	}
	val := strings.Repeat("x", 64<<10)
	var key uint64
	for !s.LowDisk() {
		for i := 0; i < 8; i++ {
			key++
			if err := s.Apply([]Op{put("q", key, val)}); err != nil {
				t.Fatalf("Apply %d with %d bytes free: %v", key, s.FreeBytes(), err)
			}
		}
		if _, err := s.Buckets(); err != nil { // into bbolt
			t.Fatalf("Buckets after %d entries, %d bytes free: %v", key, s.FreeBytes(), err)
		}
		if err := s.checkDisk(); err != nil {
			t.Fatal(err)
		}
		if key > 1000 {
			t.Fatalf("no alarm after %d entries of 64 KiB, %d bytes free", key, s.FreeBytes())
		}
	}
	full := s.FreeBytes()
	if full >= cfg.MinFreeBytes {
		t.Fatalf("LowDisk with %d bytes free, minimum %d", full, cfg.MinFreeBytes)
	}
	// Acknowledge (delete) half the messages: bbolt's file does not
	// shrink, its free pages grow.
	var ops []Op
	for k := uint64(1); k <= key/2; k++ {
		ops = append(ops, del("q", k))
	}
	if err := s.Apply(ops); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Buckets(); err != nil {
		t.Fatal(err)
	}
	if err := s.checkDisk(); err != nil {
		t.Fatal(err)
	}
	if s.LowDisk() {
		t.Fatalf("LowDisk still on after deleting %d of %d entries: %d bytes free (was %d)", key/2, key, s.FreeBytes(), full)
	}
}

// TestBoltENOSPC: bbolt's write fails for lack of space on a real (small)
// filesystem. The store fails; nothing later is acknowledged; once there
// is space again, Open replays every acknowledged commit from the log.
func TestBoltENOSPC(t *testing.T) {
	dir := tmpfs(t, 4<<20)
	cfg := testConfig(dir)
	s := open(t, cfg)
	s.Start()
	m := newModel()
	val := strings.Repeat("y", 32<<10)
	var (
		err    error
		failed []Op // the commit that got the error
	)
	for key := uint64(1); key < 1000; key++ {
		ops := []Op{put("q", key, val)}
		if err = s.Apply(ops); err != nil {
			failed = ops
			break
		}
		m.apply(ops)
		if _, err = s.Buckets(); err != nil { // into bbolt
			break
		}
	}
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("filling a 4 MiB filesystem: %v, want ENOSPC", err)
	}
	waitFailed(t, s)
	checkFailedForGood(t, s, syscall.ENOSPC)
	if err := syscall.Mount("tmpfs", dir, "tmpfs", syscall.MS_REMOUNT, "size=64m"); err != nil {
		t.Fatalf("grow the tmpfs: %v", err)
	}
	s = open(t, cfg)
	defer s.Close()
	// A commit that got the error may still have reached the log before
	// the store noticed the failure (its outcome is unknown to the
	// client); every acknowledged one must be there.
	got := contents(t, s, nil)
	if d := diff(got, m); d != "" {
		withFailed := m.clone()
		withFailed.apply(failed)
		if d2 := diff(got, withFailed); d2 != "" {
			t.Fatalf("store after the failure and a replay differs from the acknowledged commits:\n%s", d)
		}
	}
}
