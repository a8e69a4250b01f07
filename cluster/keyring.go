package cluster

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/hashicorp/memberlist"
)

// Keyring errors. Match them with errors.Is.
var (
	// ErrNoKeyring means gossip is not encrypted on this node (no
	// cluster.secret_key_file and no keyring file), so it has no keys
	// to list or change: encryption cannot be turned on at run time.
	ErrNoKeyring = errors.New("gossip is not encrypted on this node (no cluster.secret_key_file)")

	// ErrBadKey means a key is not 16, 24 or 32 bytes (AES-128, -192 or
	// -256).
	ErrBadKey = errors.New("a gossip key must be 16, 24 or 32 bytes")

	// ErrKeyNotInstalled means a key to use as primary is not in the
	// keyring: install it first (on every node).
	ErrKeyNotInstalled = errors.New("key not installed")

	// ErrRemovePrimary means the key to remove is the primary key, which
	// encrypts everything the node sends: use another key first.
	ErrRemovePrimary = errors.New("the primary key cannot be removed")
)

// Keyring holds a node's gossip keys: memberlist's keyring, which
// encrypts every gossip packet with the primary key and accepts packets
// encrypted with any of its keys, kept in a file so that a restarted node
// comes back with the keys the cluster rotated to.
//
// The file (<data_dir>/gossip-keyring, as serf's keyring file) is a JSON
// array of base64 keys, the primary first, mode 0600. Every change is
// written to a temporary file, fsynced and renamed over it, and the
// directory fsynced, before the method returns; a change that cannot be
// persisted is undone and its error returned. Once the file exists it
// wins over the key a node was configured with.
//
// A Keyring is safe for concurrent use; changes are serialized.
type Keyring struct {
	path string // "" keeps the keys in memory only
	ml   *memberlist.Keyring

	mu sync.Mutex // serializes changes and their persistence
}

// ValidKey checks a gossip key's size.
func ValidKey(key []byte) error {
	if l := len(key); l != 16 && l != 24 && l != 32 {
		return fmt.Errorf("%w, got %d", ErrBadKey, l)
	}
	return nil
}

// KeyID names a key in logs and answers without revealing it: the first
// 8 bytes of its SHA-256, in hex.
func KeyID(key []byte) string {
	s := sha256.Sum256(key)
	return hex.EncodeToString(s[:8])
}

// NewKeyring returns a keyring of the one key primary, kept in memory.
func NewKeyring(primary []byte) (*Keyring, error) {
	if err := ValidKey(primary); err != nil {
		return nil, err
	}
	ml, err := memberlist.NewKeyring(nil, bytes.Clone(primary))
	if err != nil {
		return nil, err
	}
	return &Keyring{ml: ml}, nil
}

// OpenKeyring returns the keyring persisted at path if the file exists
// (fromFile true), else one holding the configured key (written to path
// at the first change). With neither it returns nil, nil: gossip is not
// encrypted.
func OpenKeyring(path string, configured []byte) (kr *Keyring, fromFile bool, err error) {
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		keys, err := parseKeyring(b)
		if err != nil {
			return nil, false, fmt.Errorf("gossip keyring %s: %w", path, err)
		}
		ml, err := memberlist.NewKeyring(keys, keys[0])
		if err != nil {
			return nil, false, fmt.Errorf("gossip keyring %s: %w", path, err)
		}
		return &Keyring{path: path, ml: ml}, true, nil
	case !errors.Is(err, os.ErrNotExist):
		return nil, false, fmt.Errorf("gossip keyring: %w", err)
	case len(configured) == 0:
		return nil, false, nil
	}
	kr, err = NewKeyring(configured)
	if err != nil {
		return nil, false, err
	}
	kr.path = path
	return kr, false, nil
}

func parseKeyring(b []byte) ([][]byte, error) {
	var enc []string
	if err := json.Unmarshal(b, &enc); err != nil {
		return nil, fmt.Errorf("not a JSON array of base64 keys: %w", err)
	}
	if len(enc) == 0 {
		return nil, errors.New("no key")
	}
	keys := make([][]byte, 0, len(enc))
	for i, s := range enc {
		k, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return nil, fmt.Errorf("key %d: not base64: %w", i+1, err)
		}
		if err := ValidKey(k); err != nil {
			return nil, fmt.Errorf("key %d: %w", i+1, err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// Path is the keyring's file, "" for one kept in memory.
func (k *Keyring) Path() string { return k.path }

// Keys returns a copy of the keys, the primary first; the caller owns it.
func (k *Keyring) Keys() [][]byte {
	ks := k.ml.GetKeys()
	out := make([][]byte, len(ks))
	for i, key := range ks {
		out[i] = bytes.Clone(key)
	}
	return out
}

// Primary returns a copy of the primary key.
func (k *Keyring) Primary() []byte { return bytes.Clone(k.ml.GetPrimaryKey()) }

// has reports whether key is in the ring.
func (k *Keyring) has(key []byte) bool {
	for _, x := range k.ml.GetKeys() {
		if bytes.Equal(x, key) {
			return true
		}
	}
	return false
}

// Install adds key to the ring: packets encrypted with it are accepted
// from now on; the primary key is unchanged. Installing a key already in
// the ring changes nothing. It returns once the ring is persisted.
func (k *Keyring) Install(key []byte) error {
	if err := ValidKey(key); err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.has(key) {
		return nil
	}
	if err := k.ml.AddKey(bytes.Clone(key)); err != nil {
		return err
	}
	if replaced, err := k.persist(); err != nil {
		if !replaced {
			_ = k.ml.RemoveKey(key)
		}
		return err
	}
	return nil
}

// Use makes key, which must be installed, the primary key: it encrypts
// every packet from now on. Every other node must have it installed
// first. It returns once the ring is persisted.
func (k *Keyring) Use(key []byte) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.has(key) {
		return fmt.Errorf("%w: %s (install it first)", ErrKeyNotInstalled, KeyID(key))
	}
	prev := k.ml.GetPrimaryKey()
	if bytes.Equal(prev, key) {
		return nil
	}
	if err := k.ml.UseKey(key); err != nil {
		return err
	}
	if replaced, err := k.persist(); err != nil {
		if !replaced {
			_ = k.ml.UseKey(prev)
		}
		return err
	}
	return nil
}

// Remove drops key from the ring: packets encrypted with it are refused
// from now on. The primary key cannot be removed (ErrRemovePrimary);
// removing a key not in the ring changes nothing. It returns once the
// ring is persisted.
func (k *Keyring) Remove(key []byte) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if bytes.Equal(k.ml.GetPrimaryKey(), key) {
		return fmt.Errorf("%w: %s is this node's primary key (use another key first)", ErrRemovePrimary, KeyID(key))
	}
	if !k.has(key) {
		return nil
	}
	if err := k.ml.RemoveKey(key); err != nil {
		return err
	}
	if replaced, err := k.persist(); err != nil {
		if !replaced {
			_ = k.ml.AddKey(bytes.Clone(key))
		}
		return err
	}
	return nil
}

// persist writes the ring to its file (nothing for a ring in memory):
// a temporary file, fsynced, renamed over the file, then the directory
// fsynced. replaced reports whether the file was replaced: an error after
// that (the directory's fsync) leaves the change in the file, so the
// caller keeps it in memory too. Called with mu held.
func (k *Keyring) persist() (replaced bool, err error) {
	if k.path == "" {
		return false, nil
	}
	keys := k.ml.GetKeys()
	enc := make([]string, len(keys))
	for i, key := range keys {
		enc[i] = base64.StdEncoding.EncodeToString(key)
	}
	b, err := json.Marshal(enc)
	if err != nil {
		return false, err
	}
	tmp := k.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return false, fmt.Errorf("write gossip keyring: %w", err)
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, k.path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return false, fmt.Errorf("write gossip keyring %s: %w", k.path, err)
	}
	d, err := os.Open(filepath.Dir(k.path))
	if err != nil {
		return true, fmt.Errorf("sync gossip keyring's directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return true, fmt.Errorf("sync gossip keyring's directory: %w", err)
	}
	return true, nil
}

// Keyring is the node's gossip keyring, nil when gossip is not encrypted.
func (n *Node) Keyring() *Keyring { return n.cfg.Keyring }

// GossipKeys returns this node's gossip keys, the primary first (the
// caller owns them), or ErrNoKeyring.
func (n *Node) GossipKeys() ([][]byte, error) {
	if n.cfg.Keyring == nil {
		return nil, ErrNoKeyring
	}
	return n.cfg.Keyring.Keys(), nil
}

// InstallGossipKey adds key to this node's keyring (see Keyring.Install).
func (n *Node) InstallGossipKey(key []byte) error {
	return n.changeKeyring("installed", key, (*Keyring).Install)
}

// UseGossipKey makes key this node's primary gossip key (see
// Keyring.Use). Every other node must have it installed first, or they
// refuse this node's packets.
func (n *Node) UseGossipKey(key []byte) error {
	return n.changeKeyring("made primary", key, (*Keyring).Use)
}

// RemoveGossipKey removes key from this node's keyring (see
// Keyring.Remove).
func (n *Node) RemoveGossipKey(key []byte) error {
	return n.changeKeyring("removed", key, (*Keyring).Remove)
}

func (n *Node) changeKeyring(what string, key []byte, op func(*Keyring, []byte) error) error {
	kr := n.cfg.Keyring
	if kr == nil {
		return ErrNoKeyring
	}
	if err := op(kr, key); err != nil {
		return err
	}
	n.log.Info("gossip keyring changed", "change", what, "key_id", KeyID(key), "primary_id", KeyID(kr.Primary()), "keys", len(kr.Keys()), "file", kr.Path())
	return nil
}
