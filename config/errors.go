package config

import "errors"

// ErrUnknownKey is returned, wrapped, for a key in the config file or a
// BROKERD_ environment variable that matches no setting.
var ErrUnknownKey = errors.New("unknown key")

// KeyError reports what is wrong with the value of one key. Load and Validate
// return every problem with a value as a *KeyError (possibly several, joined
// with errors.Join); find them with errors.As.
type KeyError struct {
	Key string // the key, e.g. "stomp.addr"
	Err error  // what is wrong with its value
}

// Error is the key followed by the problem, on one line:
// `stomp.addr: "61613" is not host:port`.
func (e *KeyError) Error() string { return e.Key + ": " + e.Err.Error() }

// Unwrap returns e.Err.
func (e *KeyError) Unwrap() error { return e.Err }
