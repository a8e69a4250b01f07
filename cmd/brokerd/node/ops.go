package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// Operator commands (brokerd queues, purge, drain, undrain): the admin
// routes and the purge's forwarding to the queue's owner.

// opPurge asks the owner of a queue to purge it (replica.Node.Purge):
// destination; answer: x-count, the messages removed. The removals are
// durable at the owner and on its write quorum before the answer.
const opPurge = "purge"

// opBuckets asks a node for the queues it holds a copy of (for GET
// /v1/queues); answer: JSON []bucketInfo, at most maxBucketsListed.
const opBuckets = "buckets"

// maxBucketsListed bounds the copies one node lists for GET /v1/queues.
const maxBucketsListed = 10000

// maxBucketsBytes bounds the JSON of those copies: well under a peer
// link's body limit (16 MiB), whatever the names' length (up to a header
// line each), so the answer is never refused as too large.
const maxBucketsBytes = 8 << 20

// purgeBudget bounds a purge, forwarded or not: a very large queue that
// takes longer keeps what was removed, and the purge can be run again.
const purgeBudget = 2 * time.Minute

// QueueInfo is a queue as GET /v1/queues shows it: its counts at its
// owner (pending: ready to deliver; in_flight: delivered, not yet
// acknowledged), its owner and its replica set. A queue no node serves
// at the moment (nobody used it since its owner started) has Idle set,
// the owner placement names, and as pending the most messages a copy
// holds.
type QueueInfo struct {
	DestInfo
	Idle bool `json:"idle,omitempty"`
}

// bucketInfo is a node's copy of a queue (opBuckets).
type bucketInfo struct {
	Name  string `json:"name"`
	Count int64  `json:"count"`
	Bytes int64  `json:"bytes"`
}

// localBuckets lists the non-empty queue copies in this node's store.
func (rt *router) localBuckets() []bucketInfo {
	bs, err := rt.st.Buckets()
	if err != nil {
		return nil
	}
	var out []bucketInfo
	size := 2
	for _, b := range bs {
		if b.Count > 0 && validDest(b.Name) && len(out) < maxBucketsListed {
			bi := bucketInfo{b.Name, b.Count, b.Bytes}
			j, err := json.Marshal(bi)
			if err != nil || size+len(j)+1 > maxBucketsBytes {
				break
			}
			size += len(j) + 1
			out = append(out, bi)
		}
	}
	return out
}

// serveBuckets answers opBuckets.
func (rt *router) serveBuckets(reply func(*frame.Frame)) {
	go func() {
		b, err := json.Marshal(rt.localBuckets())
		if err != nil {
			reply(stomp.PeerFail("internal", err.Error()))
			return
		}
		resp := stomp.PeerOK()
		resp.Body = b
		reply(resp)
	}()
}

// idleQueues is the queues some alive node holds a copy of that are not
// in served, with their owner by placement.
func (rt *router) idleQueues(served map[string]bool) []QueueInfo {
	v := rt.view()
	copies := map[string]bucketInfo{}
	add := func(bs []bucketInfo) {
		for _, b := range bs {
			if c, ok := copies[b.Name]; !served[b.Name] && (!ok || b.Count > c.Count) {
				copies[b.Name] = b
			}
		}
	}
	add(rt.localBuckets())
	var mu sync.Mutex
	var wg sync.WaitGroup
	for peer := range v.peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ch := make(chan []bucketInfo, 1)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			if err := rt.fwd.request(ctx, peer, opBuckets, nil, nil, func(f *frame.Frame, err error) {
				var bs []bucketInfo
				if err == nil {
					_ = json.Unmarshal(f.Body, &bs)
				}
				ch <- bs
			}); err != nil {
				return
			}
			select {
			case bs := <-ch:
				mu.Lock()
				add(bs)
				mu.Unlock()
			case <-ctx.Done():
			}
		}()
	}
	wg.Wait()
	names := map[string]string{}
	for _, m := range rt.status().Members {
		names[m.ID] = m.Name
	}
	var out []QueueInfo
	for _, b := range copies {
		qi := QueueInfo{Idle: true, DestInfo: DestInfo{DestinationInfo: replica.DestinationInfo{Name: b.Name, Kind: replica.KindQueue.String(), Pending: int(b.Count), Bytes: b.Bytes}}}
		qi.Owner = rt.ownerOf(v, b.Name)
		qi.OwnerName = names[qi.Owner]
		for _, id := range replica.ReplicaSet(b.Name, v.active, rt.r) {
			qi.Replicas = append(qi.Replicas, ReplicaInfo{ID: id, Name: names[id], State: "idle"})
		}
		out = append(out, qi)
	}
	return out
}

// opsRoutes registers the operator routes on the admin mux.
func (n *Node) opsRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/queues", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, n.queues())
	})
	mux.HandleFunc("POST /v1/queues/{name}/purge", func(w http.ResponseWriter, r *http.Request) {
		dest := queueName(r.PathValue("name"))
		if !validDest(dest) {
			http.Error(w, fmt.Sprintf("%q is not a queue name (want /queue/NAME, or NAME)", r.PathValue("name")), http.StatusBadRequest)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), purgeBudget)
		defer cancel()
		removed, err := n.purge(ctx, dest)
		var nq *replica.NoSuchQueueError
		switch {
		case errors.As(err, &nq) || errors.Is(err, replica.ErrNoSuchQueue):
			http.Error(w, fmt.Sprintf("no such queue: %s", dest), http.StatusNotFound)
			return
		case err != nil:
			http.Error(w, fmt.Sprintf("purge of %s failed after removing %d messages: %v", dest, removed, err), http.StatusServiceUnavailable)
			return
		}
		writeJSON(w, map[string]any{"queue": dest, "removed": removed})
	})
	mux.HandleFunc("GET /v1/drain", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, n.DrainState())
	})
	mux.HandleFunc("POST /v1/drain", func(w http.ResponseWriter, r *http.Request) {
		st, err := n.Drain()
		switch {
		case errors.Is(err, ErrDrainRefused):
			http.Error(w, err.Error(), http.StatusConflict)
			return
		case err != nil:
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, st)
	})
	mux.HandleFunc("POST /v1/undrain", func(w http.ResponseWriter, r *http.Request) {
		st, err := n.Undrain()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, st)
	})
}

// queueName is dest with /queue/ added when it has no destination
// prefix: "orders" is "/queue/orders".
func queueName(name string) string {
	if strings.HasPrefix(name, "/") {
		return name
	}
	return replica.QueuePrefix + name
}

// queues lists the queues: clustered, every alive node's, each as its
// owner counts it, and those no node serves now (Idle) from their
// copies.
func (n *Node) queues() []QueueInfo {
	out := []QueueInfo{}
	if n.rt == nil {
		for _, d := range n.rep.Destinations() {
			if d.Kind == replica.KindQueue.String() {
				out = append(out, QueueInfo{DestInfo: DestInfo{DestinationInfo: d, Owner: n.id, OwnerName: n.cfg.Node.Name}})
			}
		}
		return out
	}
	served := map[string]bool{}
	for _, d := range n.rt.clusterDestinations() {
		if d.Kind == replica.KindQueue.String() {
			out = append(out, QueueInfo{DestInfo: d})
			served[d.Name] = true
		}
	}
	out = append(out, n.rt.idleQueues(served)...)
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// purge removes queue dest's ready messages at its owner, this node or
// another (forwarded), following a change of owner for up to
// notOwnerRetry. It returns how many were removed.
func (n *Node) purge(ctx context.Context, dest string) (int, error) {
	if n.rt == nil {
		if !n.rep.QueueExists(dest) {
			return 0, &replica.NoSuchQueueError{Dest: dest}
		}
		return n.rep.Purge(ctx, dest)
	}
	return n.rt.purge(ctx, dest)
}

func (rt *router) purge(ctx context.Context, dest string) (int, error) {
	deadline := time.Now().Add(notOwnerRetry)
	v := rt.view()
	for {
		var removed int
		var err error
		switch o := rt.ownerOf(v, dest); o {
		case "":
			err = errNoActiveSet
		case v.self:
			removed, err = rt.purgeHere(ctx, dest)
		default:
			removed, err = rt.askPurge(ctx, o, dest)
		}
		if err == nil || !(isNotOwner(err) || errors.Is(err, errNotOwner) || errors.Is(err, errNoActiveSet)) || time.Now().After(deadline) {
			return removed, peerErrKeep(err)
		}
		select {
		case <-ctx.Done():
			return removed, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		v = rt.refresh()
	}
}

// peerErrKeep maps a peer's refusal back to the replica error (a queue
// that does not exist stays a NoSuchQueueError); other errors are kept.
func peerErrKeep(err error) error {
	var pe *stomp.PeerError
	if errors.As(err, &pe) {
		return peerErr(err)
	}
	return err
}

// purgeHere purges dest, which this node owns in its current view.
func (rt *router) purgeHere(ctx context.Context, dest string) (int, error) {
	v := rt.refresh()
	if o := rt.ownerOf(v, dest); o != v.self {
		return 0, fmt.Errorf("%w: %s is owned by %s", errNotOwner, dest, o)
	}
	if err := rt.ensureOwned(dest); err != nil {
		return 0, err
	}
	if !rt.rep.QueueExists(dest) {
		return 0, &replica.NoSuchQueueError{Dest: dest}
	}
	return rt.rep.Purge(ctx, dest)
}

// askPurge sends opPurge to owner.
func (rt *router) askPurge(ctx context.Context, owner, dest string) (int, error) {
	type answer struct {
		f   *frame.Frame
		err error
	}
	ch := make(chan answer, 1)
	if err := rt.fwd.request(ctx, owner, opPurge, []string{frame.Destination, dest}, nil, func(f *frame.Frame, err error) {
		ch <- answer{f, err}
	}); err != nil {
		return 0, err
	}
	select {
	case a := <-ch:
		if a.err != nil {
			return 0, a.err
		}
		removed, err := strconv.Atoi(a.f.Header.Get(hdrCount))
		if err != nil {
			return 0, fmt.Errorf("purge at %s: bad %s header %q", owner, hdrCount, a.f.Header.Get(hdrCount))
		}
		return removed, nil
	case <-ctx.Done():
		return 0, fmt.Errorf("purge at %s: %w (the purge may go on there)", owner, ctx.Err())
	}
}

// servePurge answers a forwarded opPurge (forwardHandler).
func (rt *router) servePurge(f *frame.Frame, reply func(*frame.Frame)) {
	dest := f.Header.Get(frame.Destination)
	if !validDest(dest) {
		reply(stomp.PeerDrop("malformed purge"))
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), purgeBudget)
		defer cancel()
		removed, err := rt.purgeHere(ctx, dest)
		switch {
		case errors.Is(err, errNotOwner):
			reply(stomp.PeerFail(codeNotOwner, err.Error()))
		case err != nil:
			reply(failFrame(err))
		default:
			reply(stomp.PeerOK(hdrCount, strconv.Itoa(removed)))
		}
	}()
}
