//go:build linux

package chaos

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-stomp/stomp/v3/frame"
)

// What the clients did, as a history the checker reads.
type evKind uint8

const (
	evSend       evKind = iota + 1 // a SEND was written (its outcome follows)
	evReceipt                      // its RECEIPT came back: the broker promised it
	evError                        // an ERROR came back for it (outcome as the ERROR says)
	evUnknown                      // no answer: connection lost or timed out
	evReceived                     // a MESSAGE carrying the id arrived
	evAcked                        // the RECEIPT of its ACK came back: consumed
	evAckUnknown                   // its ACK was written, but no answer came: maybe consumed
	evAckFailed                    // an ERROR answered its ACK: not consumed, it must come back
)

func (k evKind) String() string {
	return [...]string{"?", "send", "receipt", "error", "unknown", "received", "acked", "ack-unknown", "ack-failed"}[k]
}

type event struct {
	t           time.Time
	kind        evKind
	id          string // message id (x-chaos-id)
	dest        string // evSend: where it was sent; evReceived: the MESSAGE's destination
	node        int    // node the client was connected to
	client      string
	redelivered bool
	bodyOK      bool  // evReceived: the body is the id, as sent
	conn        int64 // evReceived: the consumer connection (unique in the run)
	info        string
}

type history struct {
	mu  sync.Mutex
	evs []event
}

func (h *history) add(e event) {
	e.t = time.Now()
	h.mu.Lock()
	h.evs = append(h.evs, e)
	h.mu.Unlock()
}

func (h *history) snapshot() []event {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]event(nil), h.evs...)
}

// stompConn is a minimal STOMP 1.2 client over the frame codec, with
// deadlines on every read and write (the go-stomp client's Send with a
// receipt waits without a bound, which a paused broker turns into a hang).
type stompConn struct {
	c    net.Conn
	r    *frame.Reader
	w    *frame.Writer
	bw   *bufio.Writer
	node int
	// lastRecv is when the last frame or heart-beat arrived.
	lastRecv time.Time
}

const (
	ioTimeout  = 5 * time.Second // a read with heart-beats every second, or a write
	hbInterval = "1000"          // the client asks the server for a beat every second
)

func dialSTOMP(node int, addr string) (*stompConn, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	bw := bufio.NewWriter(c)
	sc := &stompConn{c: c, r: frame.NewReader(c), w: frame.NewWriter(bw), bw: bw, node: node}
	if err := sc.write(frame.New(frame.CONNECT, frame.AcceptVersion, "1.2", frame.Host, "/", frame.HeartBeat, "0,"+hbInterval)); err != nil {
		c.Close()
		return nil, err
	}
	f, err := sc.read(time.Now().Add(ioTimeout))
	if err != nil {
		c.Close()
		return nil, err
	}
	if f.Command != frame.CONNECTED {
		c.Close()
		return nil, fmt.Errorf("CONNECT to %s: %s %s", addr, f.Command, f.Header.Get(frame.Message))
	}
	return sc, nil
}

func (sc *stompConn) write(f *frame.Frame) error {
	_ = sc.c.SetWriteDeadline(time.Now().Add(ioTimeout))
	if err := sc.w.Write(f); err != nil {
		return err
	}
	return sc.bw.Flush()
}

// read returns the next frame, skipping heart-beats. It fails when nothing
// (not even a heart-beat: the server beats every second) arrives for
// ioTimeout, or when no frame has arrived by deadline (errDeadline).
func (sc *stompConn) read(deadline time.Time) (*frame.Frame, error) {
	for {
		d := time.Now().Add(ioTimeout)
		if deadline.Before(d) {
			d = deadline
		}
		_ = sc.c.SetReadDeadline(d)
		f, err := sc.r.Read()
		if err == nil {
			sc.lastRecv = time.Now()
		}
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() && !time.Now().Before(deadline) {
				return nil, errDeadline
			}
			return nil, err
		}
		if f != nil {
			return f, nil
		}
		if !time.Now().Before(deadline) {
			return nil, errDeadline
		}
	}
}

var errDeadline = errors.New("no frame by the deadline")

func (sc *stompConn) close() { sc.c.Close() }

// clients runs producers and consumers against random nodes.
type clients struct {
	h      *history
	addrs  []string // STOMP address of node i+1
	queues []string
	// receiptWait bounds the wait for one RECEIPT: longer than a failover
	// (the broker retries a SEND whose owner died for about 5 s).
	receiptWait time.Duration

	// consumersOff switches the consumers off (they disconnect and wait),
	// so that a backlog builds up and goes through the next faults.
	consumersOff atomic.Bool

	gapMu  sync.Mutex
	gaps   map[string]*gapTracker // producers: time between RECEIPTs
	cgaps  map[string]*gapTracker // consumers: time between MESSAGEs
	mark   time.Time              // start of the window maxGap reports on
	marked bool
}

// gapTracker follows one producer's receipts: the longest time without
// one since mark.
type gapTracker struct {
	last time.Time
	max  time.Duration
	at   time.Time
}

func (cl *clients) receipted(client string, now time.Time) { cl.track(cl.gaps, client, now) }
func (cl *clients) delivered(client string, now time.Time) { cl.track(cl.cgaps, client, now) }

func (cl *clients) track(gaps map[string]*gapTracker, client string, now time.Time) {
	cl.gapMu.Lock()
	defer cl.gapMu.Unlock()
	g := gaps[client]
	if g == nil {
		g = &gapTracker{last: now}
		gaps[client] = g
	}
	if cl.marked && g.last.Before(cl.mark) {
		g.last = cl.mark
	}
	if d := now.Sub(g.last); d > g.max {
		g.max, g.at = d, now
	}
	g.last = now
}

// resetGaps starts a new window for maxGap.
func (cl *clients) resetGaps() {
	cl.gapMu.Lock()
	defer cl.gapMu.Unlock()
	cl.mark, cl.marked = time.Now(), true
	for _, gaps := range []map[string]*gapTracker{cl.gaps, cl.cgaps} {
		for _, g := range gaps {
			g.max = 0
			g.last = cl.mark
		}
	}
}

// maxGap is the longest any producer went without a RECEIPT since the last
// resetGaps (counting the time since its last receipt up to now), and the
// longest any consumer went without a MESSAGE.
func (cl *clients) maxGap() (prod time.Duration, prodWho string, cons time.Duration, consWho string) {
	cl.gapMu.Lock()
	defer cl.gapMu.Unlock()
	prod, prodWho = longest(cl.gaps)
	cons, consWho = longest(cl.cgaps)
	return
}

func longest(gaps map[string]*gapTracker) (time.Duration, string) {
	var best time.Duration
	var who string
	now := time.Now()
	for name, g := range gaps {
		m := g.max
		if d := now.Sub(g.last); d > m {
			m = d
		}
		if m > best {
			best, who = m, name
		}
	}
	return best, who
}

func (cl *clients) pick(rng *rand.Rand, not int) (int, string) {
	for {
		i := rng.IntN(len(cl.addrs))
		if i+1 != not || len(cl.addrs) == 1 {
			return i + 1, cl.addrs[i]
		}
	}
}

// produce sends receipted messages, one at a time, until ctx ends; on any
// failure it reconnects to another node, as a client library would.
func (cl *clients) produce(ctx context.Context, name string, rng *rand.Rand) {
	seq := 0
	last := 0
	for ctx.Err() == nil {
		node, addr := cl.pick(rng, last)
		last = node
		sc, err := dialSTOMP(node, addr)
		if err != nil {
			sleepCtx(ctx, 100*time.Millisecond)
			continue
		}
		// Move on to another node now and then, as clients behind a load
		// balancer do, so every node sees producers.
		until := time.Now().Add(time.Duration(5+rng.IntN(10)) * time.Second)
		for ctx.Err() == nil && time.Now().Before(until) {
			// Now and then, SENDs covered by one receipt: a transaction's
			// COMMIT, or a DISCONNECT (which ends the connection).
			if b := rng.IntN(16); b < 2 {
				if !cl.burst(sc, name, node, &seq, rng, b == 0) {
					break
				}
				continue
			}
			seq++
			id := name + "-" + strconv.Itoa(seq)
			q := cl.queues[rng.IntN(len(cl.queues))]
			f := frame.New(frame.SEND, frame.Destination, q, frame.Receipt, id, "persistent", "true", "x-chaos-id", id)
			f.Body = []byte(id)
			cl.h.add(event{kind: evSend, id: id, dest: q, node: node, client: name})
			if err := sc.write(f); err != nil {
				cl.h.add(event{kind: evUnknown, id: id, node: node, client: name, info: err.Error()})
				break
			}
			kind, info := cl.awaitReceipt(sc, id)
			cl.h.add(event{kind: kind, id: id, node: node, client: name, info: info})
			if kind != evReceipt {
				break
			}
			cl.receipted(name, time.Now())
		}
		sc.close()
	}
}

// burst sends 2-10 SENDs to random queues covered by one receipt: in a
// transaction (BEGIN, the SENDs, COMMIT with a receipt: all or nothing), or
// without receipts and then a DISCONNECT with one, whose RECEIPT promises
// every earlier frame of the connection. It reports whether the connection
// is still usable (a committed transaction).
func (cl *clients) burst(sc *stompConn, name string, node int, seq *int, rng *rand.Rand, txn bool) bool {
	n := 2 + rng.IntN(9)
	var ids []string
	tx := ""
	outcome := func(kind evKind, info string) {
		for _, id := range ids {
			cl.h.add(event{kind: kind, id: id, node: node, client: name, info: info})
		}
	}
	if txn {
		*seq++
		tx = fmt.Sprintf("tx-%s-%d", name, *seq)
		if err := sc.write(frame.New(frame.BEGIN, frame.Transaction, tx)); err != nil {
			return false
		}
	}
	for i := 0; i < n; i++ {
		*seq++
		id := name + "-" + strconv.Itoa(*seq)
		q := cl.queues[rng.IntN(len(cl.queues))]
		f := frame.New(frame.SEND, frame.Destination, q, "persistent", "true", "x-chaos-id", id)
		if txn {
			f.Header.Add(frame.Transaction, tx)
		}
		f.Body = []byte(id)
		cl.h.add(event{kind: evSend, id: id, dest: q, node: node, client: name})
		ids = append(ids, id)
		if err := sc.write(f); err != nil {
			outcome(evUnknown, err.Error())
			return false
		}
	}
	rid := "burst-" + ids[len(ids)-1]
	end := frame.New(frame.DISCONNECT, frame.Receipt, rid)
	if txn {
		end = frame.New(frame.COMMIT, frame.Transaction, tx, frame.Receipt, rid)
	}
	if err := sc.write(end); err != nil {
		outcome(evUnknown, err.Error())
		return false
	}
	kind, info := cl.awaitReceipt(sc, rid)
	if kind == evError && !txn {
		// A refusal naming the DISCONNECT's receipt says nothing of the
		// SENDs before it.
		kind = evUnknown
	}
	outcome(kind, info)
	if kind == evReceipt {
		cl.receipted(name, time.Now())
	}
	return txn && kind == evReceipt
}

func (cl *clients) awaitReceipt(sc *stompConn, id string) (evKind, string) {
	deadline := time.Now().Add(cl.receiptWait)
	for {
		f, err := sc.read(deadline)
		if err == errDeadline {
			return evUnknown, "no receipt within " + cl.receiptWait.String()
		}
		if err != nil {
			return evUnknown, err.Error()
		}
		switch f.Command {
		case frame.RECEIPT:
			if f.Header.Get(frame.ReceiptId) == id {
				return evReceipt, ""
			}
		case frame.ERROR:
			msg := f.Header.Get(frame.Message)
			info := msg + ": " + string(f.Body)
			if errorOutcome(msg, f.Header.Get(frame.ReceiptId) == id) == "refused" {
				return evError, info
			}
			return evUnknown, info
		}
	}
}

// consume reads every queue from a random node with client-individual
// acknowledgements until ctx ends, moving to another node now and then and
// on any failure.
func (cl *clients) consume(ctx context.Context, name string, rng *rand.Rand) {
	last := 0
	for ctx.Err() == nil {
		if cl.consumersOff.Load() {
			sleepCtx(ctx, 100*time.Millisecond)
			continue
		}
		node, addr := cl.pick(rng, last)
		last = node
		until := time.Now().Add(time.Duration(5+rng.IntN(15)) * time.Second)
		_, _ = cl.consumeFrom(ctx, name, node, addr, until, 0)
		sleepCtx(ctx, 50*time.Millisecond)
	}
}

var errQuiet = errors.New("quiet")

// maxPendingAcks bounds the ACKs a consumer has written and not yet seen
// receipted; further deliveries wait for their ACK. An ACK whose answer is
// lost (the connection ended) leaves its message maybe consumed, which the
// checker cannot hold against the broker, so the bound keeps that set
// small; a delivery whose ACK was never written must come back.
const maxPendingAcks = 4

// consumeFrom subscribes to every queue (and its dead-letter queue) on one
// node and reads until ctx ends, until passes, the consumers are switched
// off, or (quiet > 0) nothing arrived for quiet. Every MESSAGE is
// acknowledged (client-individual) with a receipt, at most maxPendingAcks
// at a time, and the ACK counts only when its RECEIPT comes back. On the
// way out it waits up to 5 s for the ACKs still due (new deliveries are
// left unacknowledged: they come back), and records the ACKs still
// unanswered as unknown. It returns how many messages it got.
func (cl *clients) consumeFrom(ctx context.Context, name string, node int, addr string, until time.Time, quiet time.Duration) (n int, err error) {
	sc, err := dialSTOMP(node, addr)
	if err != nil {
		return 0, err
	}
	defer sc.close()
	conn := connSeq.Add(1)
	type ackReq struct{ ack, id string }
	acks := map[string]string{} // receipt of a written ACK -> message id
	var due []ackReq            // deliveries whose ACK waits for a free slot
	ackSeq := 0
	defer func() {
		for _, id := range acks {
			cl.h.add(event{kind: evAckUnknown, id: id, node: node, client: name, info: "connection ended before the ACK's receipt"})
		}
	}()
	sendAcks := func() error {
		for len(acks) < maxPendingAcks && len(due) > 0 {
			a := due[0]
			due = due[1:]
			ackSeq++
			rid := fmt.Sprintf("ack-%s-%d", name, ackSeq)
			acks[rid] = a.id
			if err := sc.write(frame.New(frame.ACK, frame.Id, a.ack, frame.Receipt, rid)); err != nil {
				return err
			}
		}
		return nil
	}
	subs := map[string]string{} // subscription id -> destination
	for _, q := range cl.queues {
		for _, d := range []string{q, dlqOf(q)} {
			sid := strconv.Itoa(len(subs) + 1)
			subs[sid] = d
			if err := sc.write(frame.New(frame.SUBSCRIBE, frame.Id, sid, frame.Destination, d,
				frame.Ack, "client-individual", "prefetch-count", "32")); err != nil {
				return 0, err
			}
		}
	}
	lastMsg := time.Now()
	var closing time.Time // set when the connection winds down: no new ACKs
	for {
		if closing.IsZero() && (ctx.Err() != nil || !time.Now().Before(until) || (quiet == 0 && cl.consumersOff.Load())) {
			closing = time.Now().Add(5 * time.Second)
		}
		if !closing.IsZero() && (len(acks)+len(due) == 0 || !time.Now().Before(closing)) {
			if ctx.Err() != nil {
				return n, ctx.Err()
			}
			return n, nil
		}
		deadline := time.Now().Add(time.Second) // notice ctx and the switch
		if !closing.IsZero() && closing.Before(deadline) {
			deadline = closing
		}
		if quiet > 0 && closing.IsZero() && lastMsg.Add(quiet).Before(deadline) {
			deadline = lastMsg.Add(quiet)
		}
		f, err := sc.read(deadline)
		if err == errDeadline {
			if quiet > 0 && time.Since(lastMsg) >= quiet && len(acks)+len(due) == 0 {
				return n, errQuiet
			}
			if time.Since(sc.lastRecv) > ioTimeout {
				return n, fmt.Errorf("%s silent for %s", addr, ioTimeout)
			}
			continue
		}
		if err != nil {
			return n, err
		}
		switch f.Command {
		case frame.MESSAGE:
			id := f.Header.Get("x-chaos-id")
			if id == "" {
				id = "body:" + string(f.Body)
			}
			n++
			now := time.Now()
			lastMsg = now
			cl.delivered(name, now)
			// The destination is the subscription's, as the client
			// asked for it, not what the broker's header claims; the
			// header must agree with it.
			dest := subs[f.Header.Get(frame.Subscription)]
			cl.h.add(event{kind: evReceived, id: id, dest: dest, node: node, client: name,
				redelivered: f.Header.Get("redelivered") == "true", conn: conn,
				bodyOK: string(f.Body) == id && f.Header.Get(frame.Destination) == dest})
			if closing.IsZero() {
				due = append(due, ackReq{ack: f.Header.Get(frame.Ack), id: id})
			}
		case frame.RECEIPT:
			rid := f.Header.Get(frame.ReceiptId)
			if id, ok := acks[rid]; ok {
				delete(acks, rid)
				cl.h.add(event{kind: evAcked, id: id, node: node, client: name})
			}
		case frame.ERROR:
			msg := f.Header.Get(frame.Message)
			if id, ok := acks[f.Header.Get(frame.ReceiptId)]; ok && msg == "unknown message" {
				// The broker refused the ACK: the delivery it named is
				// gone (its subscription was re-bound), so the message
				// must come back.
				delete(acks, f.Header.Get(frame.ReceiptId))
				cl.h.add(event{kind: evAckFailed, id: id, node: node, client: name, info: msg + ": " + string(f.Body)})
			}
			return n, fmt.Errorf("ERROR from %s: %s: %s", addr, msg, f.Body)
		}
		if err := sendAcks(); err != nil {
			return n, err
		}
	}
}

// connSeq numbers consumer connections.
var connSeq atomic.Int64

// dlqOf is the dead-letter queue of q (queue.dlq_prefix's default).
func dlqOf(q string) string { return "/queue/DLQ." + strings.TrimPrefix(q, "/queue/") }

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// errorOutcome classifies an ERROR that answered a SEND: "refused" (the
// broker promises nothing was stored) only when the ERROR names the SEND's
// receipt and is one of the refusals brokerd makes before storing anything
// (a queue at its limit, the low-disk alarm); anything else, such as "not
// enough replicas", "internal error" or "server shutting down", leaves the
// outcome unknown. The checker fails a run where a refused SEND arrives.
func errorOutcome(message string, receiptMatches bool) string {
	if receiptMatches && (message == "queue full" || message == "broker low on disk space") {
		return "refused"
	}
	return "unknown"
}
