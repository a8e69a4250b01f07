package node

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// Forwarding operations over peer links (see router.go). Each request is
// answered by RECEIPT or by an ERROR with a code below.
const (
	opSend        = "send"         // body: messages (encodeMessages); durable at the owner before the answer
	opTopic       = "topic"        // body: topic messages, fanned out to the receiver's subscribers
	opSubscribe   = "subscribe"    // destination, x-sub, ack, x-prefetch
	opUnsubscribe = "unsubscribe"  // x-sub, x-failed; body with x-failed: the failed deliveries' tags (uvarints)
	opAck         = "ack"          // x-sub, x-tag, x-nack, x-sync
	opPoll        = "poll"         // body: "sub credit" lines; x-keys; answer: deliveries, x-gone, x-keys
	opPull        = "pull"         // destination, x-after, x-tombstones; answer: replica wire ops, x-count, x-after, x-more, x-exists
	opDests       = "destinations" // answer: JSON of the destinations the node serves (admin)
	opMerge       = "merge"        // destination: the sender released its copy; take the queue over again
	opExists      = "exists"       // destination; answer: x-exists "1" if the queue exists at its owner (replica.Node.QueueExists)
	opAckKeys     = "ack-keys"     // destination; body: uvarint keys to remove (replica.Node.RemoveKeys); durable at the owner before the answer

	hdrSub      = "x-sub"
	hdrPrefetch = "x-prefetch"
	hdrTag      = "x-tag"
	hdrNack     = "x-nack"
	hdrSync     = "x-sync"
	// hdrFailed: on an unsubscribe, "1" when the subscriber's client
	// failed (its connection was lost) holding the deliveries whose tags
	// (uvarints) are the body: they count toward queue.max_redeliveries
	// (replica.Subscription.CloseFailed). With an empty body (a node of
	// the first version that sent it) every handed-out message counts
	// (Close). Absent (and from nodes of earlier versions), every message
	// returns marked only (replica.Subscription.Return).
	hdrFailed = "x-failed"
	hdrGone   = "x-gone"
	hdrAfter  = "x-after"
	hdrCount  = "x-count"
	hdrMore   = "x-more"
	hdrTombs  = "x-tombstones" // on a pull: "1" reads the queue's tombstones instead of its messages
	hdrRetry  = "x-retry"      // on a send: "1" when the sender retries it after a failure or refusal
	// hdrNoCreate: on a send, the indices (comma list) of its messages
	// that may not create their queue (replica.Message.NoCreate); on a
	// subscribe, "1" (replica.SubOptions.NoCreate).
	hdrNoCreate = "x-no-create"
	// hdrExists: on an exists answer, "1" if the queue exists at its
	// owner; on the answer to the first pull of a queue's messages, "1"
	// if the queue's bucket is in the answering node's store (it exists
	// there, even empty), so that a new owner that was not its replica
	// knows it exists (replica.Node.AdoptExisting).
	hdrExists = "x-exists"
	// hdrKeys: on a poll, "1" asks for each delivery's key in its queue;
	// on its answer, "1" says they are there (appendKeyedDelivery).
	hdrKeys = "x-keys"

	codeNotOwner   = "not-owner"
	codeQueueFull  = "queue-full"
	codeLowDisk    = "low-disk"
	codeBadDest    = "bad-destination"
	codeUnknownAck = "unknown-ack"
	codeUnknownSub = "unknown-subscription"
	codeNoQueue    = "no-such-queue" // message: the queue's name
)

// fwdLinks holds one peer link per peer for forwarding (separate from the
// replication links, so that a long poll never waits behind appends).
type fwdLinks struct {
	base   stomp.PeerClientConfig
	addrOf func(id string) string
	// onState, if set, hears each link's state changes (see
	// stomp.PeerClientConfig.OnState).
	onState func(peer string, up bool, err error)

	mu     sync.Mutex
	links  map[string]*stomp.PeerClient
	closed bool
}

func newFwdLinks(base stomp.PeerClientConfig, addrOf func(string) string) *fwdLinks {
	return &fwdLinks{base: base, addrOf: addrOf, links: map[string]*stomp.PeerClient{}}
}

func (f *fwdLinks) get(peer string) (*stomp.PeerClient, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, stomp.ErrPeerClosed
	}
	if c := f.links[peer]; c != nil {
		return c, nil
	}
	cfg := f.base
	cfg.Peer = peer + "/fwd"
	cfg.PeerNodeID = peer
	cfg.AddrFunc = func() string { return f.addrOf(peer) }
	if f.onState != nil {
		cfg.OnState = func(up bool, err error) { f.onState(peer, up, err) }
	}
	c := stomp.NewPeerClient(cfg)
	if err := c.Start(); err != nil {
		return nil, fmt.Errorf("peer link to %s: %w", peer, err)
	}
	f.links[peer] = c
	return c, nil
}

// connected reports whether the link to peer exists and is up.
func (f *fwdLinks) connected(peer string) bool {
	f.mu.Lock()
	c := f.links[peer]
	f.mu.Unlock()
	return c != nil && c.Connected()
}

// request sends one request to peer; done runs once with the answer.
func (f *fwdLinks) request(ctx context.Context, peer, op string, headers []string, body []byte, done func(*frame.Frame, error)) error {
	c, err := f.get(peer)
	if err != nil {
		return err
	}
	return c.Request(ctx, op, headers, body, done)
}

// prune closes and forgets the links to peers keep says no: links are
// made on demand and redialled until closed, so one to a peer the cluster
// forgot would be kept for ever. It returns the peers pruned.
func (f *fwdLinks) prune(keep func(peer string) bool) []string {
	f.mu.Lock()
	var gone []string
	var links []*stomp.PeerClient
	for peer, c := range f.links {
		if !keep(peer) {
			gone = append(gone, peer)
			links = append(links, c)
			delete(f.links, peer)
		}
	}
	f.mu.Unlock()
	for _, c := range links {
		_ = c.Close()
	}
	return gone
}

func (f *fwdLinks) close() {
	f.mu.Lock()
	f.closed = true
	links := f.links
	f.links = nil
	f.mu.Unlock()
	for _, c := range links {
		_ = c.Close()
	}
}

// encodeMessages appends msgs: per message its destination and its
// stored form (replica.EncodeMessage), each length-prefixed.
func encodeMessages(b []byte, msgs []*replica.Message) []byte {
	for _, m := range msgs {
		b = appendBytes(b, []byte(m.Dest))
		b = appendBytes(b, replica.EncodeMessage(m))
	}
	return b
}

var errBadBody = errors.New("malformed forwarded body")

func decodeMessages(b []byte, max int) ([]*replica.Message, error) {
	var msgs []*replica.Message
	for len(b) > 0 {
		if len(msgs) >= max {
			return nil, fmt.Errorf("%w: more than %d messages", errBadBody, max)
		}
		dest, rest, ok := readBytes(b)
		if !ok {
			return nil, errBadBody
		}
		rec, rest, ok := readBytes(rest)
		if !ok {
			return nil, errBadBody
		}
		b = rest
		if _, err := replica.ParseDestination(string(dest)); err != nil {
			return nil, fmt.Errorf("%w: %w", errBadBody, err)
		}
		m, err := replica.DecodeMessage(string(dest), rec)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errBadBody, err)
		}
		msgs = append(msgs, m)
	}
	return msgs, nil
}

func appendBytes(b, v []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(v)))
	return append(b, v...)
}

func readBytes(b []byte) (v, rest []byte, ok bool) {
	n, k := binary.Uvarint(b)
	if k <= 0 || n > uint64(len(b)-k) {
		return nil, nil, false
	}
	return b[k : k+int(n)], b[k+int(n):], true
}

// delivery on the wire: sub, tag, redelivered, count, then the message.
func appendDelivery(b []byte, sub string, tag uint64, d replica.Delivery) []byte {
	b = appendBytes(b, []byte(sub))
	b = binary.AppendUvarint(b, tag)
	r := byte(0)
	if d.Redelivered {
		r = 1
	}
	b = append(b, r)
	b = binary.AppendUvarint(b, uint64(d.Count))
	return encodeMessages(b, []*replica.Message{d.Msg})
}

// appendKeyedDelivery appends the message's key in its queue, then the
// delivery as appendDelivery does. A poll answer is keyed when the poll
// asked (hdrKeys): a node of an earlier version neither asks nor answers
// so, and its deliveries have no key (an ACK after their binding ended
// then takes no effect, as it did).
func appendKeyedDelivery(b []byte, sub string, tag uint64, d replica.Delivery) []byte {
	b = binary.AppendUvarint(b, d.Msg.Seq)
	return appendDelivery(b, sub, tag, d)
}

type wireDelivery struct {
	sub         string
	tag         uint64
	redelivered bool
	count       int
	// key is the message's key in its queue (replica.Message.Seq), which
	// a take-over keeps: an ACK of this delivery after its binding ended
	// removes the message by it (ackKeys). 0 when not known.
	key uint64
	msg *replica.Message
}

func decodeDeliveries(b []byte) ([]wireDelivery, error) { return decodeKeyedDeliveries(b, false) }

// decodeKeyedDeliveries decodes deliveries appended by
// appendKeyedDelivery (keyed) or appendDelivery.
func decodeKeyedDeliveries(b []byte, keyed bool) ([]wireDelivery, error) {
	var out []wireDelivery
	for len(b) > 0 {
		var key uint64
		if keyed {
			var k int
			key, k = binary.Uvarint(b)
			if k <= 0 {
				return nil, errBadBody
			}
			b = b[k:]
		}
		sub, rest, ok := readBytes(b)
		if !ok {
			return nil, errBadBody
		}
		tag, k := binary.Uvarint(rest)
		if k <= 0 || len(rest) < k+1 {
			return nil, errBadBody
		}
		rest = rest[k:]
		red := rest[0] == 1
		rest = rest[1:]
		cnt, k := binary.Uvarint(rest)
		if k <= 0 {
			return nil, errBadBody
		}
		rest = rest[k:]
		dest, rest2, ok := readBytes(rest)
		if !ok {
			return nil, errBadBody
		}
		rec, rest3, ok := readBytes(rest2)
		if !ok {
			return nil, errBadBody
		}
		m, err := replica.DecodeMessage(string(dest), rec)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errBadBody, err)
		}
		out = append(out, wireDelivery{sub: string(sub), tag: tag, redelivered: red, count: int(min(cnt, 1<<30)), key: key, msg: m})
		b = rest3
	}
	return out, nil
}

// failFrame is the refusal of a request whose local part failed with
// err. A queue that does not exist is named alone, so that the sender
// can name it (peerErr).
func failFrame(err error) *frame.Frame {
	var nq *replica.NoSuchQueueError
	if errors.As(err, &nq) {
		return stomp.PeerFail(codeNoQueue, nq.Dest)
	}
	return stomp.PeerFail(failCode(err), err.Error())
}

// noCreateHeader is hdrNoCreate for msgs: the indices of those that may
// not create their queue, "" for none.
func noCreateHeader(msgs []*replica.Message) string {
	var b []byte
	for i, m := range msgs {
		if m.NoCreate {
			if len(b) > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendInt(b, int64(i), 10)
		}
	}
	return string(b)
}

// setNoCreate sets NoCreate on the messages hdrNoCreate h names.
func setNoCreate(msgs []*replica.Message, h string) error {
	if h == "" {
		return nil
	}
	for _, s := range strings.Split(h, ",") {
		i, err := strconv.Atoi(s)
		if err != nil || i < 0 || i >= len(msgs) {
			return fmt.Errorf("%w: %s %q", errBadBody, hdrNoCreate, h)
		}
		msgs[i].NoCreate = true
	}
	return nil
}

// maxForwardMessages bounds the messages of one forwarded request.
const maxForwardMessages = 1 << 16

// maxForwardBody is the body bytes above which a forwarded batch is split.
const maxForwardBody = 4 << 20

// forwardHandler serves the forwarding operations for other nodes.
func forwardHandler(rt *router, log *slog.Logger) func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
	return func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		switch f.Header.Get(stomp.PeerHeaderOp) {
		case opSend:
			msgs, err := decodeMessages(f.Body, maxForwardMessages)
			if err != nil {
				reply(stomp.PeerDrop(err.Error()))
				return
			}
			retry := f.Header.Get(hdrRetry) == "1"
			for _, m := range msgs {
				if m.Dest[:len(replica.QueuePrefix)] != replica.QueuePrefix {
					reply(stomp.PeerDrop("forwarded SEND to a topic"))
					return
				}
			}
			if err := setNoCreate(msgs, f.Header.Get(hdrNoCreate)); err != nil {
				reply(stomp.PeerDrop(err.Error()))
				return
			}
			// Ownership is checked in the worker only, in the order the
			// link delivered them: refused here at once, a SEND would be
			// answered (and retried by its sender) before earlier ones
			// still waiting in the worker.
			// Off the link's reader (taking a queue over pulls from the
			// other nodes, which may be pulling from this one), but in
			// the order the link delivered them: one worker per peer.
			rt.host.sendQueue(peer).push(func() {
				// The view may have changed while it waited.
				v := rt.view()
				for _, m := range msgs {
					if o := rt.ownerOf(v, m.Dest); o != v.self {
						rt.markNotOwned(peer, msgs)
						reply(stomp.PeerFail(codeNotOwner, fmt.Sprintf("%s is owned by %s in this node's view", m.Dest, o)))
						return
					}
				}
				// In the order the link delivered them: a SEND that
				// follows one refused above waits for that one's retry.
				if rt.refusedSince(peer, msgs, retry) {
					rt.markNotOwned(peer, msgs)
					reply(stomp.PeerFail(codeNotOwner, "an earlier SEND of this queue from the same node was refused; it is retried first"))
					return
				}
				for _, m := range msgs {
					if err := rt.ensureOwned(m.Dest); err != nil {
						rt.markNotOwned(peer, msgs) // retried: the ones behind wait for it
						reply(stomp.PeerFail(failCode(err), err.Error()))
						return
					}
				}
				if err := rt.rep.Apply(&replica.Batch{Sends: msgs, Sync: true}, func(err error) {
					if err != nil {
						reply(failFrame(err))
						return
					}
					reply(stomp.PeerOK())
				}); err != nil {
					reply(failFrame(err))
					return
				}
				if retry {
					// Stored (or its outcome unknown, stored anyway)
					// before anything behind it on the link: the SENDs
					// that follow may be accepted again.
					rt.clearNotOwned(peer, msgs)
				}
			})
		case opTopic:
			msgs, err := decodeMessages(f.Body, maxForwardMessages)
			if err != nil {
				reply(stomp.PeerDrop(err.Error()))
				return
			}
			for _, m := range msgs {
				if m.Dest[:len(replica.TopicPrefix)] != replica.TopicPrefix {
					reply(stomp.PeerDrop("topic request for a queue"))
					return
				}
			}
			if err := rt.rep.Apply(&replica.Batch{Sends: msgs}, func(error) {}); err != nil {
				reply(stomp.PeerFail(failCode(err), err.Error()))
				return
			}
			reply(stomp.PeerOK())
		case opSubscribe:
			dest, id := f.Header.Get(frame.Destination), f.Header.Get(hdrSub)
			mode, ok := replica.ParseAckMode(f.Header.Get(frame.Ack))
			prefetch, err := strconv.Atoi(f.Header.Get(hdrPrefetch))
			if !ok || err != nil || prefetch < 0 || id == "" || len(id) > 128 || !validDest(dest) {
				reply(stomp.PeerDrop("malformed subscribe"))
				return
			}
			noCreate := f.Header.Get(hdrNoCreate) == "1"
			go func() {
				err := rt.host.subscribe(peer, id, dest, mode, prefetch, noCreate)
				if err != nil {
					if errors.Is(err, errNotOwner) {
						reply(stomp.PeerFail(codeNotOwner, err.Error()))
						return
					}
					reply(failFrame(err))
					return
				}
				reply(stomp.PeerOK())
			}()
		case opUnsubscribe:
			var failed []uint64
			if f.Header.Get(hdrFailed) == "1" {
				var err error
				if failed, err = decodeKeys(f.Body); err != nil {
					reply(stomp.PeerDrop("malformed unsubscribe"))
					return
				}
				if len(failed) == 0 {
					failed = allFailed
				}
			}
			rt.host.unsubscribe(peer, f.Header.Get(hdrSub), failed)
			reply(stomp.PeerOK())
		case opAck:
			tag, err := strconv.ParseUint(f.Header.Get(hdrTag), 10, 64)
			if err != nil {
				reply(stomp.PeerDrop("malformed ack"))
				return
			}
			err = rt.host.ack(peer, f.Header.Get(hdrSub), tag, f.Header.Get(hdrNack) == "1", f.Header.Get(hdrSync) == "1", func(err error) {
				if err != nil {
					reply(stomp.PeerFail(failCode(err), err.Error()))
					return
				}
				reply(stomp.PeerOK())
			})
			if err != nil {
				code := failCode(err)
				if errors.Is(err, errUnknownSub) {
					code = codeUnknownSub
				}
				reply(stomp.PeerFail(code, err.Error()))
			}
		case opPoll:
			items, err := parsePoll(f.Body)
			if err != nil {
				reply(stomp.PeerDrop(err.Error()))
				return
			}
			go func() {
				keyed := f.Header.Get(hdrKeys) == "1"
				res := rt.host.poll(peer, items, keyed)
				resp := stomp.PeerOK(hdrGone, joinIDs(res.gone))
				if keyed {
					resp.Header.Add(hdrKeys, "1")
				}
				resp.Body = res.body
				reply(resp)
			}()
		case opPull:
			dest := f.Header.Get(frame.Destination)
			after, err := strconv.ParseUint(f.Header.Get(hdrAfter), 10, 64)
			if err != nil || !validDest(dest) {
				reply(stomp.PeerDrop("malformed pull"))
				return
			}
			go func() {
				pull := rt.host.pullChunk
				if f.Header.Get(hdrTombs) == "1" {
					pull = rt.host.pullTombstones
				}
				body, n, last, more, err := pull(dest, after)
				if err != nil {
					reply(stomp.PeerFail("store", err.Error()))
					return
				}
				m := "0"
				if more {
					m = "1"
				}
				hdrs := []string{hdrCount, strconv.Itoa(n), hdrAfter, strconv.FormatUint(last, 10), hdrMore, m}
				if after == 0 && f.Header.Get(hdrTombs) != "1" {
					if ok, err := rt.st.HasBucket(dest); err == nil && ok {
						hdrs = append(hdrs, hdrExists, "1")
					}
				}
				resp := stomp.PeerOK(hdrs...)
				resp.Body = body
				reply(resp)
			}()
		case opMerge:
			dest := f.Header.Get(frame.Destination)
			if !validDest(dest) {
				reply(stomp.PeerDrop("malformed merge"))
				return
			}
			rt.merge(dest)
			reply(stomp.PeerOK())
		case opExists:
			dest := f.Header.Get(frame.Destination)
			if !validDest(dest) {
				reply(stomp.PeerDrop("malformed exists"))
				return
			}
			go func() {
				v := rt.refresh()
				if o := rt.ownerOf(v, dest); o != v.self {
					reply(stomp.PeerFail(codeNotOwner, fmt.Sprintf("%s is owned by %s in this node's view", dest, o)))
					return
				}
				if err := rt.ensureOwned(dest); err != nil {
					reply(stomp.PeerFail(failCode(err), err.Error()))
					return
				}
				ok := "0"
				if rt.rep.QueueExists(dest) {
					ok = "1"
				}
				reply(stomp.PeerOK(hdrExists, ok))
			}()
		case opAckKeys:
			dest := f.Header.Get(frame.Destination)
			keys, err := decodeKeys(f.Body)
			if err != nil || !validDest(dest) {
				reply(stomp.PeerDrop("malformed ack-keys"))
				return
			}
			go func() {
				if err := rt.removeKeysHere(dest, keys); err != nil {
					if errors.Is(err, errNotOwner) {
						reply(stomp.PeerFail(codeNotOwner, err.Error()))
						return
					}
					reply(failFrame(err))
					return
				}
				reply(stomp.PeerOK())
			}()
		case opDests:
			go func() {
				b, err := json.Marshal(rt.ownedDestinations(rt.pr))
				if err != nil {
					reply(stomp.PeerFail("internal", err.Error()))
					return
				}
				resp := stomp.PeerOK()
				resp.Body = b
				reply(resp)
			}()
		case opPurge:
			rt.servePurge(f, reply) // ops.go
		case opBuckets:
			rt.serveBuckets(reply) // ops.go
		case opReleased:
			rt.serveReleased(f, reply) // drain.go
		default:
			reply(stomp.PeerFail("unknown-op", fmt.Sprintf("unknown operation %q", f.Header.Get(stomp.PeerHeaderOp))))
		}
	}
}

// encodeTags appends uvarint tags or keys to b (decodeKeys reads them).
func encodeTags(b []byte, tags []uint64) []byte {
	for _, t := range tags {
		b = binary.AppendUvarint(b, t)
	}
	return b
}

// decodeKeys reads a body of uvarints (message keys, delivery tags), at
// most maxForwardMessages of them.
func decodeKeys(b []byte) ([]uint64, error) {
	var keys []uint64
	for len(b) > 0 {
		k, n := binary.Uvarint(b)
		if n <= 0 || len(keys) >= maxForwardMessages {
			return nil, errors.New("malformed list of keys")
		}
		keys = append(keys, k)
		b = b[n:]
	}
	return keys, nil
}
