//go:build linux

package chaos

import (
	"fmt"
	"sort"
	"strings"
)

// result is what the checker finds in a history.
type result struct {
	Attempted   int `json:"attempted"`    // SENDs written
	Receipted   int `json:"receipted"`    // RECEIPT came back: must be consumed
	Refused     int `json:"refused"`      // ERROR that refused the SEND before storing it
	Unknown     int `json:"unknown"`      // no answer, or an ERROR that leaves the outcome unknown
	UnknownSeen int `json:"unknown_seen"` // of those, how many arrived
	RefusedSeen int `json:"refused_seen"` // refused SENDs that arrived anyway: must be 0
	Received    int `json:"received"`     // distinct ids received
	Deliveries  int `json:"deliveries"`   // MESSAGE frames
	Consumed    int `json:"consumed"`     // distinct ids whose ACK was receipted
	// AckUnknown is receipted ids never seen acknowledged, only with an
	// ACK whose answer was lost: they may have been consumed, so they do
	// not count as lost. AckUnknownLater is how many of them were
	// delivered again after that ACK: during a partition both sides serve
	// a queue, so a later delivery on the other side does not prove the
	// ACK failed.
	AckUnknown      int `json:"ack_unknown"`
	AckUnknownLater int `json:"ack_unknown_later"`
	// Lost is receipted ids never consumed: never delivered (LostUnseen of
	// them), or delivered and never acknowledged, nor delivered again.
	Lost       int `json:"lost"`
	LostUnseen int `json:"lost_unseen"`
	Duplicated int `json:"duplicated"` // ids delivered more than once
	DupMarked  int `json:"dup_marked"` // extra deliveries that carried redelivered:true
	// DupUnmarked is extra deliveries without redelivered:true: two
	// unmarked deliveries of one id. Must be 0.
	DupUnmarked int `json:"dup_unmarked"`
	// UnmarkedLater is unmarked deliveries on a connection that had
	// already received the id (marked): reported, not failed. The
	// original copy of a SEND whose forward timed out is stored unmarked
	// while the router's retry stores a marked one, and either may be
	// delivered first; during a partition the owner on one side hands out
	// its copy as new while the other side's hands out its inherited copy
	// marked.
	UnmarkedLater int `json:"unmarked_later"`
	// DeadLettered is ids delivered from a dead-letter queue: their
	// deliveries failed queue.max_redeliveries times (the consumers'
	// connections, closed without DISCONNECT, count as failures).
	// Reported, not failed: a rise without more client faults would be
	// healthy messages dead-lettered.
	DeadLettered int `json:"dead_lettered"`
	// AckedAgain is ids delivered in the final drain after a consumer's
	// ACK of them was receipted: a second copy of a SEND stored twice (a
	// retry after an attempt whose outcome was unknown; copies keep the
	// message-id), or an acknowledged copy that came back. Reported: the
	// client cannot tell the two apart.
	AckedAgain int `json:"acked_again"`
	Unexpected int `json:"unexpected"` // received, never sent: must be 0
	// Misdelivered is deliveries on a subscription to a destination other
	// than the one the id was sent to (or its dead-letter queue), or whose
	// destination header is not the subscription's, or whose body is not
	// the one sent: must be 0.
	Misdelivered int `json:"misdelivered"`

	LostIDs       []string `json:"lost_ids,omitempty"`
	UnexpectedIDs []string `json:"unexpected_ids,omitempty"`
	UnmarkedIDs   []string `json:"unmarked_ids,omitempty"`
	AckedAgainIDs []string `json:"acked_again_ids,omitempty"`
	MisIDs        []string `json:"misdelivered_ids,omitempty"`
}

// failures lists what makes a run fail.
func (r result) failures() []string {
	var f []string
	if r.Lost > 0 {
		f = append(f, fmt.Sprintf("%d receipted messages lost (%d never delivered, %d delivered but never acknowledged nor delivered again)", r.Lost, r.LostUnseen, r.Lost-r.LostUnseen))
	}
	if r.Unexpected > 0 {
		f = append(f, fmt.Sprintf("%d messages received that were never sent", r.Unexpected))
	}
	if r.RefusedSeen > 0 {
		f = append(f, fmt.Sprintf("%d SENDs refused with an ERROR were delivered anyway", r.RefusedSeen))
	}
	if r.DupUnmarked > 0 {
		f = append(f, fmt.Sprintf("%d extra deliveries did not carry redelivered:true", r.DupUnmarked))
	}
	if r.Misdelivered > 0 {
		f = append(f, fmt.Sprintf("%d deliveries on the wrong destination or with the wrong body", r.Misdelivered))
	}
	if r.Receipted == 0 {
		f = append(f, "no SEND was receipted: the run tested nothing")
	}
	return f
}

type idState struct {
	outcome    evKind // last answer to its SEND (evSend: none yet)
	sent       bool
	dest       string
	deliveries int
	marked     int // deliveries with redelivered:true
	// dlqUnmarked: unmarked deliveries from the dead-letter queue. A
	// message dead-lettered is a new message of that queue: its first
	// delivery there carries no redelivered:true (as RabbitMQ's), and is
	// not a duplicate of its deliveries from the original queue.
	dlqUnmarked int
	dlq         bool // delivered from the dead-letter queue
	// outOfOrder counts unmarked deliveries on a connection that had
	// already received the id from the same queue: one connection's
	// order is certain.
	outOfOrder int
	byConn     map[connDest]bool // connections (and queue kind) it was delivered on
	acked      bool              // an ACK of it was receipted
	ackedFirst bool              // ... by a consumer, before the drain
	maybeAcked bool              // an ACK was written and its answer lost
	lastTo     string            // the client of the latest delivery
	laterThan  bool              // delivered again after maybeAcked was set
	ackedAgain bool
}

// connDest is a consumer connection and whether the delivery came from a
// dead-letter queue.
type connDest struct {
	conn int64
	dlq  bool
}

// isDLQ reports whether dest is a dead-letter queue (queue.dlq_prefix's
// default, as dlqOf).
func isDLQ(dest string) bool { return strings.HasPrefix(dest, "/queue/DLQ.") }

// drainClient is the client name of the final drain, which starts after
// every consumer has stopped.
const drainClient = "drain"

// check reads a history. A SEND's outcome is its last answer (one is
// recorded per SEND). The counts do not depend on how concurrent clients'
// events interleave in the history, except where one client's own order
// decides (a second delivery to the same client) or the drain's (which
// runs after every other consumer has stopped).
func check(evs []event) result {
	var r result
	ids := map[string]*idState{}
	get := func(id string) *idState {
		s := ids[id]
		if s == nil {
			s = &idState{}
			ids[id] = s
		}
		return s
	}
	mis := map[string]bool{}
	for _, e := range evs {
		s := get(e.id)
		switch e.kind {
		case evSend:
			r.Attempted++
			s.sent, s.dest, s.outcome = true, e.dest, evSend
		case evReceipt, evUnknown, evError:
			s.outcome = e.kind
		case evReceived:
			s.deliveries++
			r.Deliveries++
			cd := connDest{e.conn, isDLQ(e.dest)}
			switch {
			case e.redelivered:
				s.marked++
			case s.byConn[cd]:
				s.outOfOrder++
			}
			if !e.redelivered && cd.dlq {
				s.dlqUnmarked++
			}
			s.dlq = s.dlq || cd.dlq
			if s.byConn == nil {
				s.byConn = map[connDest]bool{}
			}
			s.byConn[cd] = true
			if s.maybeAcked {
				s.laterThan = true
			}
			s.lastTo = e.client
			if e.client == drainClient && s.ackedFirst {
				s.ackedAgain = true
			}
			if !e.bodyOK {
				mis[e.id] = true
			}
		case evAcked:
			s.acked = true
			if e.client != drainClient {
				s.ackedFirst = true
			}
		case evAckUnknown:
			s.maybeAcked = true
		}
	}
	// Destinations are checked once every SEND is known (a delivery can
	// be appended before its SEND's event by a racing client).
	for _, e := range evs {
		if e.kind != evReceived {
			continue
		}
		if s := ids[e.id]; s.sent && e.dest != s.dest && e.dest != dlqOf(s.dest) {
			mis[e.id] = true
		}
	}
	for id, s := range ids {
		seen := s.deliveries > 0
		if seen {
			r.Received++
		}
		if s.acked {
			r.Consumed++
		}
		if s.dlq {
			r.DeadLettered++
		}
		if s.deliveries > 1 {
			r.Duplicated++
			// One unmarked delivery from the queue, and one from its
			// dead-letter queue, are first deliveries.
			unmarked := s.deliveries - s.marked
			bad := max(unmarked-s.dlqUnmarked-1, 0) + max(s.dlqUnmarked-1, 0)
			r.UnmarkedLater += s.outOfOrder
			r.DupUnmarked += bad
			r.DupMarked += max(s.deliveries-1-bad, 0)
			if bad > 0 {
				r.UnmarkedIDs = append(r.UnmarkedIDs, id)
			}
		}
		if s.ackedAgain {
			r.AckedAgain++
			r.AckedAgainIDs = append(r.AckedAgainIDs, id)
		}
		if mis[id] {
			r.Misdelivered++
			r.MisIDs = append(r.MisIDs, id)
		}
		if !s.sent {
			if seen {
				r.Unexpected++
				r.UnexpectedIDs = append(r.UnexpectedIDs, id)
			}
			continue
		}
		switch s.outcome {
		case evReceipt:
			r.Receipted++
			switch {
			case s.acked:
			case s.maybeAcked:
				r.AckUnknown++
				if s.laterThan {
					r.AckUnknownLater++
				}
			default:
				r.Lost++
				if !seen {
					r.LostUnseen++
				}
				r.LostIDs = append(r.LostIDs, id)
			}
		case evError:
			r.Refused++
			if seen {
				r.RefusedSeen++
			}
		default: // evUnknown, or a SEND still waiting when the run ended
			r.Unknown++
			if seen {
				r.UnknownSeen++
			}
		}
	}
	for _, l := range []*[]string{&r.LostIDs, &r.UnexpectedIDs, &r.UnmarkedIDs, &r.MisIDs, &r.AckedAgainIDs} {
		sort.Strings(*l)
		if len(*l) > 50 {
			*l = (*l)[:50]
		}
	}
	return r
}

func (r result) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sends: %d attempted, %d receipted, %d refused (%d of them arrived anyway), %d unknown (%d of them arrived)\n",
		r.Attempted, r.Receipted, r.Refused, r.RefusedSeen, r.Unknown, r.UnknownSeen)
	fmt.Fprintf(&b, "received: %d distinct in %d deliveries, %d acknowledged with a receipt, %d receipted ids only with an ACK whose answer was lost (%d of them delivered again after it)\n",
		r.Received, r.Deliveries, r.Consumed, r.AckUnknown, r.AckUnknownLater)
	fmt.Fprintf(&b, "duplicated: %d ids; extra deliveries marked redelivered %d, UNMARKED %d; unmarked after a marked one on one connection %d\n", r.Duplicated, r.DupMarked, r.DupUnmarked, r.UnmarkedLater)
	fmt.Fprintf(&b, "dead-lettered: %d ids delivered from a dead-letter queue\n", r.DeadLettered)
	fmt.Fprintf(&b, "acknowledged with a receipt, then delivered again in the drain: %d\n", r.AckedAgain)
	fmt.Fprintf(&b, "LOST (receipted, never consumed): %d (%d never delivered)   UNEXPECTED (received, never sent): %d   MISDELIVERED: %d",
		r.Lost, r.LostUnseen, r.Unexpected, r.Misdelivered)
	for _, l := range []struct {
		name string
		ids  []string
	}{{"lost", r.LostIDs}, {"unexpected", r.UnexpectedIDs}, {"unmarked duplicate", r.UnmarkedIDs}, {"misdelivered", r.MisIDs}, {"acked, then delivered again in the drain", r.AckedAgainIDs}} {
		if len(l.ids) > 0 {
			fmt.Fprintf(&b, "\n%s ids: %s", l.name, strings.Join(l.ids, " "))
		}
	}
	return b.String()
}
