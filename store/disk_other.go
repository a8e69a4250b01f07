//go:build !(linux || darwin || freebsd)

package store

import "errors"

func fsFreeBytes(string) (int64, error) {
	return 0, errors.New("free space unknown on this platform")
}
