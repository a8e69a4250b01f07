//go:build linux

package chaos

import "testing"

// The checker's rules, on small histories (these run in every `go test`,
// without BROKERD_CHAOS).

func sent(id, dest string) []event {
	return []event{{kind: evSend, id: id, dest: dest}, {kind: evReceipt, id: id}}
}

func got(id, dest string, redelivered bool) event {
	return event{kind: evReceived, id: id, dest: dest, redelivered: redelivered, bodyOK: true}
}

func hist(parts ...any) []event {
	var out []event
	for _, p := range parts {
		switch v := p.(type) {
		case event:
			out = append(out, v)
		case []event:
			out = append(out, v...)
		}
	}
	return out
}

func TestCheckConsumedMessageIsNotLost(t *testing.T) {
	r := check(hist(sent("a", "/queue/q"), got("a", "/queue/q", false), event{kind: evAcked, id: "a"}))
	if len(r.failures()) != 0 || r.Consumed != 1 {
		t.Fatalf("a sent, receipted, delivered and acknowledged message: %+v, failures %v", r, r.failures())
	}
}

// A delivery whose ACK never took effect must come back (client-individual
// ack): a broker that drops an unacknowledged in-flight message (its
// consumer's node died, the subscription was re-bound) loses it.
func TestCheckUnackedDeliveryIsNotConsumed(t *testing.T) {
	r := check(hist(sent("a", "/queue/q"), got("a", "/queue/q", false)))
	if r.Lost != 1 || r.LostUnseen != 0 {
		t.Errorf("delivered, never acknowledged, never delivered again: Lost=%d LostUnseen=%d, want 1, 0", r.Lost, r.LostUnseen)
	}
	r = check(hist(sent("a", "/queue/q"), got("a", "/queue/q", false), event{kind: evAckFailed, id: "a"}))
	if r.Lost != 1 {
		t.Errorf("an ACK the broker refused does not consume: Lost=%d, want 1", r.Lost)
	}
	r = check(hist(sent("a", "/queue/q"), got("a", "/queue/q", false), event{kind: evAckUnknown, id: "a"}))
	if r.Lost != 0 || r.AckUnknown != 1 {
		t.Errorf("an ACK whose answer was lost may have consumed: Lost=%d AckUnknown=%d, want 0, 1", r.Lost, r.AckUnknown)
	}
	r = check(hist(sent("a", "/queue/q")))
	if r.Lost != 1 || r.LostUnseen != 1 {
		t.Errorf("never delivered: Lost=%d LostUnseen=%d, want 1, 1", r.Lost, r.LostUnseen)
	}
}

// Duplicates: the same deliveries to two clients, in either order in the
// history, give the same counts, and a second delivery without
// redelivered:true fails the run.
func TestCheckDuplicatesOrderIndependent(t *testing.T) {
	conns := map[string]int64{"c0": 1, "c1": 2}
	to := func(e event, client string) event { e.client, e.conn = client, conns[client]; return e }
	a := check(hist(sent("x", "/queue/q"), to(got("x", "/queue/q", false), "c0"), to(got("x", "/queue/q", true), "c1"), event{kind: evAcked, id: "x"}))
	b := check(hist(sent("x", "/queue/q"), to(got("x", "/queue/q", true), "c1"), to(got("x", "/queue/q", false), "c0"), event{kind: evAcked, id: "x"}))
	if a.DupMarked != 1 || b.DupMarked != 1 || a.DupUnmarked != 0 || b.DupUnmarked != 0 {
		t.Errorf("one unmarked and one marked delivery, in either order: %+v / %+v", a, b)
	}
	c := check(hist(sent("x", "/queue/q"), got("x", "/queue/q", false), got("x", "/queue/q", false), event{kind: evAcked, id: "x"}))
	if c.DupUnmarked != 1 || len(c.failures()) == 0 {
		t.Errorf("two unmarked deliveries must fail: %+v", c)
	}
}

// An ERROR leaves a SEND's outcome unknown unless it names the SEND's
// receipt and is a refusal made before anything is stored.
func TestErrorOutcome(t *testing.T) {
	for _, c := range []struct {
		msg   string
		match bool
		want  string
	}{
		{"internal error", true, "unknown"},
		{"not enough replicas", true, "unknown"},
		{"server shutting down", false, "unknown"},
		{"queue full", false, "unknown"},
		{"queue full", true, "refused"},
		{"broker low on disk space", true, "refused"},
	} {
		if got := errorOutcome(c.msg, c.match); got != c.want {
			t.Errorf("errorOutcome(%q, receipt matches %v) = %q, want %q", c.msg, c.match, got, c.want)
		}
	}
	r := check(hist(event{kind: evSend, id: "r", dest: "/queue/q"}, event{kind: evError, id: "r"}, got("r", "/queue/q", false)))
	if r.RefusedSeen != 1 || len(r.failures()) == 0 {
		t.Errorf("a refused SEND that arrives must fail the run: %+v", r)
	}
}

func TestCheckUnexpectedAndMisdelivered(t *testing.T) {
	r := check(hist(got("ghost", "/queue/q", false)))
	if r.Unexpected != 1 {
		t.Errorf("received, never sent: Unexpected=%d", r.Unexpected)
	}
	r = check(hist(sent("a", "/queue/q"), got("a", "/queue/other", false), event{kind: evAcked, id: "a"}))
	if r.Misdelivered != 1 {
		t.Errorf("delivered on another queue: Misdelivered=%d", r.Misdelivered)
	}
	r = check(hist(sent("a", "/queue/q"), got("a", "/queue/DLQ.q", true), event{kind: evAcked, id: "a"}))
	if r.Misdelivered != 0 || len(r.failures()) != 0 {
		t.Errorf("dead-lettered to its own DLQ is fine: %+v %v", r, r.failures())
	}
	bad := got("a", "/queue/q", false)
	bad.bodyOK = false
	r = check(hist(sent("a", "/queue/q"), bad, event{kind: evAcked, id: "a"}))
	if r.Misdelivered != 1 {
		t.Errorf("wrong body: Misdelivered=%d", r.Misdelivered)
	}
}

// A message dead-lettered is a new message of the dead-letter queue: its
// first delivery there is unmarked (as RabbitMQ's), also on a connection
// that received it from the original queue. A second unmarked delivery
// from the dead-letter queue is still a failure.
func TestCheckDeadLetterFirstDeliveryUnmarked(t *testing.T) {
	q, dlq := "/queue/q", dlqOf("/queue/q")
	on := func(e event) event { e.conn = 7; return e }
	r := check(hist(sent("x", q), on(got("x", q, false)), on(got("x", q, true)), on(got("x", dlq, false)), event{kind: evAcked, id: "x"}))
	if r.DupUnmarked != 0 || r.UnmarkedLater != 0 || r.Misdelivered != 0 || r.DeadLettered != 1 || len(r.failures()) != 0 {
		t.Errorf("delivered, redelivered, then dead-lettered and delivered from %s: %+v, failures %v", dlq, r, r.failures())
	}
	r = check(hist(sent("x", q), got("x", q, false), got("x", dlq, false), got("x", dlq, false), event{kind: evAcked, id: "x"}))
	if r.DupUnmarked != 1 || len(r.failures()) == 0 {
		t.Errorf("two unmarked deliveries from the dead-letter queue must fail: %+v", r)
	}
	r = check(hist(sent("x", q), got("x", q, false), got("x", q, false), got("x", dlq, false), event{kind: evAcked, id: "x"}))
	if r.DupUnmarked != 1 || len(r.failures()) == 0 {
		t.Errorf("two unmarked deliveries from the queue must fail, a dead-letter delivery notwithstanding: %+v", r)
	}
}
