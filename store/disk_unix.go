//go:build linux || darwin || freebsd

package store

import "syscall"

// fsFreeBytes is the space of dir's filesystem available to this process.
func fsFreeBytes(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}
