//go:build !linux

package store

import bolt "go.etcd.io/bbolt"

// releaseMapped does nothing beyond Linux.
func releaseMapped(*bolt.DB, int64) (bool, error) { return false, nil }
