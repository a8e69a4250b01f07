package store

import (
	"fmt"
	"path/filepath"
	"time"
)

// The low-disk alarm. Filesystem space is not the whole story: bbolt never
// shrinks its file, so acknowledging messages frees pages inside it, which
// new data reuses, not filesystem space. The free space is therefore the
// filesystem's available bytes plus the bytes of bbolt's free (and pending)
// pages. The write-ahead log is preallocated and needs no more.
//
// LowDisk turns on when the free space is below Config.MinFreeBytes and
// off again once it is at least MinFreeBytes plus an eighth of it, so that
// the alarm does not flap with every message around the threshold.

// diskCheckInterval is how often a started store checks free space.
const diskCheckInterval = time.Second

// LowDisk reports whether the free space for the store (see
// Config.MinFreeBytes) is low. Always false when MinFreeBytes is 0.
func (s *Store) LowDisk() bool { return s.lowDisk.Load() }

// FreeBytes is the free space last measured: the filesystem's available
// bytes plus bbolt's free pages. 0 until measured (MinFreeBytes 0).
func (s *Store) FreeBytes() int64 { return s.freeBytes.Load() }

// checkDisk measures the free space and updates LowDisk and the metrics.
func (s *Store) checkDisk() error {
	fs, err := fsFreeBytes(filepath.Dir(s.cfg.Path))
	if err != nil {
		return fmt.Errorf("free space of %s: %w", filepath.Dir(s.cfg.Path), err)
	}
	free := fs + int64(s.db.Stats().FreeAlloc)
	s.freeBytes.Store(free)
	s.metrics.freeBytes.Set(float64(free))
	minFree := s.cfg.MinFreeBytes
	switch low := s.lowDisk.Load(); {
	case !low && free < minFree:
		s.lowDisk.Store(true)
		s.metrics.diskAlarm.Set(1)
		s.log.Warn("low disk space: refusing new messages", "free_bytes", free, "min_free_bytes", minFree)
	case low && free >= minFree+minFree/8:
		s.lowDisk.Store(false)
		s.metrics.diskAlarm.Set(0)
		s.log.Info("disk space back", "free_bytes", free, "min_free_bytes", minFree)
	}
	return nil
}

// releaseMappedAbove is the size of bbolt's data above which the store
// releases bbolt's map pages from the resident set every
// releaseMappedInterval (see releaseMapped): a consumer draining a backlog
// reads it through the map, and the pages it read would otherwise stay in
// the broker's RSS up to the file's size.
const releaseMappedAbove = 64 << 20

// releaseMappedInterval bounds the map pages resident to those read (by
// Scan, and by the applier's transactions) in that time: on two cores a
// drain at 140k messages/s touched about 130 MiB of them a second. A
// round costs a walk of the map's page tables and minor faults for the
// hot pages (branches, the tail) after it.
const releaseMappedInterval = 250 * time.Millisecond

// mapLoop releases bbolt's map pages every releaseMappedInterval, while
// the data is larger than releaseMappedAbove, until Close (which waits for
// it before closing bbolt).
func (s *Store) mapLoop() {
	defer s.wg.Done()
	var tick <-chan time.Time
	if h := s.cfg.hooks; h != nil && h.mapTick != nil {
		tick = h.mapTick
	} else {
		t := time.NewTicker(releaseMappedInterval)
		defer t.Stop()
		tick = t.C
	}
	var logged bool
	for {
		select {
		case <-tick:
			released, err := releaseMapped(s.db, s.releaseAbove)
			if err != nil && !logged {
				s.log.Warn("cannot release bbolt's mapped pages", "err", err)
				logged = true
			}
			if h := s.cfg.hooks; h != nil && h.mapReleased != nil {
				h.mapReleased(released)
			}
		case <-s.stop:
			return
		}
	}
}

// diskLoop checks free space every diskCheckInterval until Close.
func (s *Store) diskLoop() {
	defer s.wg.Done()
	t := time.NewTicker(diskCheckInterval)
	defer t.Stop()
	var logged bool
	for {
		select {
		case <-t.C:
			if err := s.checkDisk(); err != nil && !logged {
				s.log.Error("cannot measure free disk space", "err", err)
				logged = true
			}
		case <-s.stop:
			return
		}
	}
}
