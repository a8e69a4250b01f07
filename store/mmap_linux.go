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
// under it.
func releaseMapped(db *bolt.DB) error {
	return db.View(func(tx *bolt.Tx) error {
		info := db.Info()
		size := uintptr(tx.Size())
		if size == 0 {
			return nil
		}
		if _, _, e := syscall.Syscall(syscall.SYS_MADVISE, info.Data, size, syscall.MADV_DONTNEED); e != 0 {
			return e
		}
		return nil
	})
}
