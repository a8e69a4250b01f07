package store

import (
	"syscall"

	bolt "go.etcd.io/bbolt"
)

// releaseMapped drops this process's page-table entries for bbolt's memory
// map, so that pages read through it (every message a consumer drained)
// stop counting in the broker's resident set. bbolt maps its file shared
// and read-only and writes with pwrite, so the pages stay in the page
// cache and a later read is a minor fault; nothing is lost. It runs inside
// a read transaction, which holds bbolt's mmap lock: the map cannot move
// under it. It does nothing while the data is at most above bytes and
// reports whether it released.
func releaseMapped(db *bolt.DB, above int64) (bool, error) {
	released := false
	err := db.View(func(tx *bolt.Tx) error {
		info := db.Info()
		size := tx.Size()
		if size == 0 || size <= above {
			return nil
		}
		if _, _, e := syscall.Syscall(syscall.SYS_MADVISE, info.Data, uintptr(size), syscall.MADV_DONTNEED); e != 0 {
			return e
		}
		released = true
		return nil
	})
	return released, err
}
