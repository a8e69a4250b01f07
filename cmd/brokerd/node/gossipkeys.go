package node

// Gossip key rotation across a running cluster, as serf's keys command:
// the admin API of any node applies a key operation to its own keyring
// and, over peer links, to every other alive member's, and answers node
// by node, so the operator sees any node that missed it. The keyring
// encrypts gossip (memberlist) and authenticates peer links (their
// handshake's proof), and each node persists it in its data directory
// (cluster.Keyring), so a restarted node comes back with the rotated
// keys.
//
// Rotation without downtime: install the new key (every node accepts it),
// use it (every node encrypts with it; refused unless every alive node
// has it), remove the old one (refused while it is a node's primary).

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

const (
	// opGossipKeys applies a key operation to the receiver's keyring:
	// header x-keys-op (list, install, use or remove), body the key's
	// bytes (none for list); the answer's body is the receiver's keys
	// afterwards (gossipKeysBody).
	opGossipKeys = "gossip-keys"
	hdrKeysOp    = "x-keys-op"

	// gossipKeyringFile is the keyring's file in the data directory.
	gossipKeyringFile = "gossip-keyring"

	// gossipKeysTimeout bounds each node's answer to a key operation.
	gossipKeysTimeout = 5 * time.Second

	codeNoKeyring = "no-keyring"
	codeKeyring   = "keyring"
)

// Key operations.
const (
	keyOpList    = "list"
	keyOpInstall = "install"
	keyOpUse     = "use"
	keyOpRemove  = "remove"
)

// gossipKeysBody is a node's keys on the wire, base64, the primary
// first.
type gossipKeysBody struct {
	Keys []string `json:"keys"`
}

// applyKeyOp applies op to kr and returns its keys afterwards.
func applyKeyOp(kr *cluster.Keyring, op string, key []byte) ([][]byte, error) {
	if kr == nil {
		return nil, cluster.ErrNoKeyring
	}
	var err error
	switch op {
	case keyOpList:
	case keyOpInstall:
		err = kr.Install(key)
	case keyOpUse:
		err = kr.Use(key)
	case keyOpRemove:
		err = kr.Remove(key)
	default:
		err = fmt.Errorf("unknown key operation %q", op)
	}
	if err != nil {
		return nil, err
	}
	return kr.Keys(), nil
}

// gossipKeysPeerHandler serves opGossipKeys for the other nodes on this
// node's keyring kr (nil: gossip not encrypted). A change is persisted
// (fsynced) before the answer, off the link's reader.
func gossipKeysPeerHandler(kr *cluster.Keyring, log *slog.Logger) func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
	return func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		op, key := f.Header.Get(hdrKeysOp), bytes.Clone(f.Body)
		go func() {
			keys, err := applyKeyOp(kr, op, key)
			if err != nil {
				code := codeKeyring
				if errors.Is(err, cluster.ErrNoKeyring) {
					code = codeNoKeyring
				}
				reply(stomp.PeerFail(code, err.Error()))
				return
			}
			if op != keyOpList {
				log.Info("gossip keyring changed", "change", op, "key_id", cluster.KeyID(key), "by_node", peer,
					"primary_id", cluster.KeyID(keys[0]), "keys", len(keys))
			}
			resp := stomp.PeerOK()
			resp.Body, _ = json.Marshal(gossipKeysBody{Keys: encodeKeys(keys)})
			reply(resp)
		}()
	}
}

func encodeKeys(keys [][]byte) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = base64.StdEncoding.EncodeToString(k)
	}
	return out
}

// NodeKeys is one node's answer to a key operation.
type NodeKeys struct {
	NodeID   string `json:"node_id"`
	NodeName string `json:"node_name"`
	// OK: the operation took effect on this node (for list: it
	// answered).
	OK bool `json:"ok"`
	// Keys are the node's keys afterwards, base64, the primary first;
	// KeyIDs name them (cluster.KeyID).
	Keys   []string `json:"keys,omitempty"`
	KeyIDs []string `json:"key_ids,omitempty"`
	Error  string   `json:"error,omitempty"`
}

// MemberRef names a member the operation did not reach.
type MemberRef struct {
	NodeID   string `json:"node_id"`
	NodeName string `json:"node_name"`
	State    string `json:"state"`
}

// KeyUse is one key as GET /v1/gossip-keys sums it over the nodes.
type KeyUse struct {
	Key       string `json:"key"`
	KeyID     string `json:"key_id"`
	Nodes     int    `json:"nodes"`      // nodes that have it installed
	PrimaryOn int    `json:"primary_on"` // nodes that encrypt with it
}

// GossipKeys is the answer of the admin API's key operations.
type GossipKeys struct {
	Op string `json:"op"`
	// KeyID names the operation's key (not for list).
	KeyID string `json:"key_id,omitempty"`
	// OK: every node asked answered, and the operation took effect on
	// each.
	OK bool `json:"ok"`
	// Members is how many nodes were asked: the alive (and suspect)
	// members, this node included.
	Members int `json:"members"`
	// Keys sums every key over the nodes that answered (list only).
	Keys       []KeyUse    `json:"keys,omitempty"`
	Nodes      []NodeKeys  `json:"nodes"`
	NotReached []MemberRef `json:"not_reached,omitempty"`
}

// keyFanout runs op with key on this node and every other alive member,
// at once, and returns each node's answer (this node first, then by name)
// and the members not asked (dead or left).
func (n *Node) keyFanout(op string, key []byte) ([]NodeKeys, []MemberRef) {
	st := n.cl.Status()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var out []NodeKeys
	var missed []MemberRef
	add := func(nk NodeKeys) {
		mu.Lock()
		out = append(out, nk)
		mu.Unlock()
	}
	for _, m := range st.Members {
		nk := NodeKeys{NodeID: m.ID, NodeName: m.Name}
		if m.ID == st.NodeID {
			keys, err := applyKeyOp(n.cl.Keyring(), op, key)
			if err == nil && op != keyOpList {
				n.log.Info("gossip keyring changed", "change", op, "key_id", cluster.KeyID(key), "by", "admin",
					"primary_id", cluster.KeyID(keys[0]), "keys", len(keys))
			}
			add(nk.with(keys, err))
			continue
		}
		if m.State != "alive" && m.State != "suspect" {
			missed = append(missed, MemberRef{NodeID: m.ID, NodeName: m.Name, State: m.State})
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			add(nk.with(n.remoteKeyOp(m.ID, op, key)))
		}()
	}
	wg.Wait()
	sort.Slice(out, func(i, j int) bool {
		if (out[i].NodeID == st.NodeID) != (out[j].NodeID == st.NodeID) {
			return out[i].NodeID == st.NodeID
		}
		return out[i].NodeName+out[i].NodeID < out[j].NodeName+out[j].NodeID
	})
	return out, missed
}

func (nk NodeKeys) with(keys [][]byte, err error) NodeKeys {
	if err != nil {
		nk.Error = err.Error()
		return nk
	}
	nk.OK = true
	nk.Keys = encodeKeys(keys)
	for _, k := range keys {
		nk.KeyIDs = append(nk.KeyIDs, cluster.KeyID(k))
	}
	return nk
}

// remoteKeyOp runs op on node id over its peer link.
func (n *Node) remoteKeyOp(id, op string, key []byte) ([][]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), gossipKeysTimeout)
	defer cancel()
	type answer struct {
		keys [][]byte
		err  error
	}
	ch := make(chan answer, 1)
	err := n.fwd.request(ctx, id, opGossipKeys, []string{hdrKeysOp, op}, key, func(f *frame.Frame, err error) {
		if err != nil {
			ch <- answer{err: err}
			return
		}
		var b gossipKeysBody
		if err := json.Unmarshal(f.Body, &b); err != nil || len(b.Keys) == 0 {
			ch <- answer{err: fmt.Errorf("malformed answer %q", f.Body)}
			return
		}
		var keys [][]byte
		for _, s := range b.Keys {
			k, err := base64.StdEncoding.DecodeString(s)
			if err != nil {
				ch <- answer{err: fmt.Errorf("malformed answer %q", f.Body)}
				return
			}
			keys = append(keys, k)
		}
		ch <- answer{keys: keys}
	})
	if err != nil {
		return nil, fmt.Errorf("not reached over its peer link: %w", err)
	}
	select {
	case a := <-ch:
		var pe *stomp.PeerError
		if errors.As(a.err, &pe) {
			return nil, errors.New(pe.Message)
		}
		return a.keys, a.err
	case <-ctx.Done():
		return nil, fmt.Errorf("no answer within %v (the operation may have taken effect)", gossipKeysTimeout)
	}
}

// gossipKeysRoutes adds the key operations to the admin API:
//
//	GET  /v1/gossip-keys          every node's keys, and each key's use
//	POST /v1/gossip-keys/install  {"key": base64}: every node accepts it
//	POST /v1/gossip-keys/use      {"key": base64}: every node encrypts with it
//	POST /v1/gossip-keys/remove   {"key": base64}: every node drops it
//
// Each applies to this node and every other alive member and answers 200
// with GossipKeys, whose ok is false if any node failed or did not answer
// (its error says why); the operation can be repeated (each is
// idempotent). use is refused (409, nothing changed) unless every alive
// node answers and has the key installed; remove is refused while the key
// is a node's primary. 400: a malformed request or key; 409: this node is
// not in a cluster or does not encrypt gossip. One operation at a time on
// each node.
func (n *Node) gossipKeysRoutes(mux *http.ServeMux) {
	var mu sync.Mutex
	ready := func(w http.ResponseWriter) bool {
		switch {
		case n.cl == nil || n.rt == nil:
			http.Error(w, "this node is not in a cluster (cluster.gossip_addr)", http.StatusConflict)
		case n.cl.Keyring() == nil:
			http.Error(w, cluster.ErrNoKeyring.Error()+": set cluster.secret_key_file on every node and restart them first", http.StatusConflict)
		default:
			return true
		}
		return false
	}
	mux.HandleFunc("GET /v1/gossip-keys", func(w http.ResponseWriter, r *http.Request) {
		if !ready(w) {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		nodes, missed := n.keyFanout(keyOpList, nil)
		// A member away (dead, left) missed it: not OK, so that the
		// operator repeats it once the member is back.
		res := GossipKeys{Op: keyOpList, Members: len(nodes), Nodes: nodes, NotReached: missed, OK: len(missed) == 0}
		byKey := map[string]*KeyUse{}
		for _, nk := range nodes {
			res.OK = res.OK && nk.OK
			for i, k := range nk.Keys {
				u := byKey[k]
				if u == nil {
					u = &KeyUse{Key: k, KeyID: nk.KeyIDs[i]}
					byKey[k] = u
				}
				u.Nodes++
				if i == 0 {
					u.PrimaryOn++
				}
			}
		}
		for _, u := range byKey {
			res.Keys = append(res.Keys, *u)
		}
		sort.Slice(res.Keys, func(i, j int) bool {
			a, b := res.Keys[i], res.Keys[j]
			if a.PrimaryOn != b.PrimaryOn {
				return a.PrimaryOn > b.PrimaryOn
			}
			return a.KeyID < b.KeyID
		})
		writeJSON(w, res)
	})
	mux.HandleFunc("POST /v1/gossip-keys/{op}", func(w http.ResponseWriter, r *http.Request) {
		op := r.PathValue("op")
		if op != keyOpInstall && op != keyOpUse && op != keyOpRemove {
			http.Error(w, "unknown key operation "+op+": install, use or remove", http.StatusNotFound)
			return
		}
		var req struct {
			Key string `json:"key"`
		}
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil || req.Key == "" {
			http.Error(w, `want JSON {"key": "base64 key"}`, http.StatusBadRequest)
			return
		}
		key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(req.Key))
		if err != nil {
			http.Error(w, "key: not base64: "+err.Error(), http.StatusBadRequest)
			return
		}
		if err := cluster.ValidKey(key); err != nil {
			http.Error(w, "key: "+err.Error()+" (e.g. openssl rand -base64 32)", http.StatusBadRequest)
			return
		}
		if !ready(w) {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if op == keyOpUse || op == keyOpRemove {
			// As serf: check every alive node first, and change nothing
			// if one could not follow.
			if why := n.keyPrecheck(op, key); why != "" {
				http.Error(w, why+"; nothing changed", http.StatusConflict)
				return
			}
		}
		nodes, missed := n.keyFanout(op, key)
		res := GossipKeys{Op: op, KeyID: cluster.KeyID(key), Members: len(nodes), Nodes: nodes, NotReached: missed, OK: len(missed) == 0}
		for _, nk := range nodes {
			res.OK = res.OK && nk.OK
		}
		writeJSON(w, res)
	})
}

// keyPrecheck lists every alive node's keys and says why op with key
// must not run, or "": use needs the key on every node, remove needs it
// primary on none, and both need an answer from every node.
func (n *Node) keyPrecheck(op string, key []byte) string {
	nodes, missed := n.keyFanout(keyOpList, nil)
	if len(missed) > 0 {
		// A member away would come back with keys the others no longer
		// use (use) or without the key they use (remove): it could not
		// rejoin. Install first while it is away, then use and remove
		// once it is back (or once it is forgotten, cluster.forget_after).
		var away []string
		for _, m := range missed {
			away = append(away, m.NodeName+" ("+m.NodeID+", "+m.State+")")
		}
		return fmt.Sprintf("%s key %s: members away could not follow: %s", op, cluster.KeyID(key), strings.Join(away, ", "))
	}
	enc := base64.StdEncoding.EncodeToString(key)
	var silent, lacking, primary []string
	for _, nk := range nodes {
		name := nk.NodeName + " (" + nk.NodeID + ")"
		switch {
		case !nk.OK:
			silent = append(silent, name+": "+nk.Error)
		case op == keyOpUse && !slices.Contains(nk.Keys, enc):
			lacking = append(lacking, name)
		case op == keyOpRemove && len(nk.Keys) > 0 && nk.Keys[0] == enc:
			primary = append(primary, name)
		}
	}
	switch {
	case len(silent) > 0:
		return fmt.Sprintf("%s key %s: could not list the keys of every alive node: %s", op, cluster.KeyID(key), strings.Join(silent, "; "))
	case len(lacking) > 0:
		return fmt.Sprintf("use key %s: not installed on %s (install it first)", cluster.KeyID(key), strings.Join(lacking, ", "))
	case len(primary) > 0:
		return fmt.Sprintf("remove key %s: it is the primary key of %s (use another key first)", cluster.KeyID(key), strings.Join(primary, ", "))
	}
	return ""
}
