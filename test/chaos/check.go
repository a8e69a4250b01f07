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
	// not count as lost.
	AckUnknown int `json:"ack_unknown"`
	// Lost is receipted ids never consumed: never delivered (LostUnseen of
	// them), or delivered and never acknowledged, nor delivered again.
	Lost       int `json:"lost"`
	LostUnseen int `json:"lost_unseen"`
	Duplicated int `json:"duplicated"` // ids delivered more than once
	DupMarked  int `json:"dup_marked"` // extra deliveries that carried redelivered:true
	// DupUnmarked is extra deliveries without redelivered:true: a copy
	// the broker handed out twice as new. Must be 0 (brokerd marks every
	// message it may have delivered before).
	DupUnmarked int `json:"dup_unmarked"`
	// Resurrected is ids delivered in the final drain after a consumer's
	// ACK of them was receipted: an acknowledged message came back. Must
	// be 0 (faults here are far shorter than replica.tombstone_ttl).
	Resurrected int `json:"resurrected"`
	Unexpected  int `json:"unexpected"` // received, never sent: must be 0
	// Misdelivered is deliveries on a subscription to a destination other
	// than the one the id was sent to (or its dead-letter queue), or whose
	// destination header is not the subscription's, or whose body is not
	// the one sent: must be 0.
	Misdelivered int `json:"misdelivered"`

	LostIDs       []string `json:"lost_ids,omitempty"`
	UnexpectedIDs []string `json:"unexpected_ids,omitempty"`
	UnmarkedIDs   []string `json:"unmarked_ids,omitempty"`
	ResurrectedID []string `json:"resurrected_ids,omitempty"`
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
	if r.Resurrected > 0 {
		f = append(f, fmt.Sprintf("%d messages acknowledged with a receipt were delivered again in the final drain", r.Resurrected))
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
	// outOfOrder counts unmarked deliveries to a client that had already
	// been handed the id: in one client's program order, certain.
	outOfOrder int
	byClient   map[string]bool // clients it was delivered to
	acked      bool            // an ACK of it was receipted
	ackedFirst bool            // ... by a consumer, before the drain
	// lastTo is the client of the latest delivery (history order);
	// maybeAcked says an ACK of that delivery was written and its answer
	// lost: it may have consumed the message. A later delivery voids it
	// (the message came back, so that ACK did not consume it).
	lastTo      string
	maybeAcked  bool
	resurrected bool
}

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
			if e.redelivered {
				s.marked++
			} else if s.byClient[e.client] {
				s.outOfOrder++
			}
			if s.byClient == nil {
				s.byClient = map[string]bool{}
			}
			s.byClient[e.client] = true
			s.lastTo, s.maybeAcked = e.client, false
			if e.client == drainClient && s.ackedFirst {
				s.resurrected = true
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
			if e.client == s.lastTo {
				s.maybeAcked = true
			}
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
		if s.deliveries > 1 {
			r.Duplicated++
			bad := max(s.deliveries-s.marked-1, s.outOfOrder, 0)
			r.DupUnmarked += bad
			r.DupMarked += max(s.deliveries-1-bad, 0)
			if bad > 0 {
				r.UnmarkedIDs = append(r.UnmarkedIDs, id)
			}
		}
		if s.resurrected {
			r.Resurrected++
			r.ResurrectedID = append(r.ResurrectedID, id)
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
	for _, l := range []*[]string{&r.LostIDs, &r.UnexpectedIDs, &r.UnmarkedIDs, &r.MisIDs, &r.ResurrectedID} {
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
	fmt.Fprintf(&b, "received: %d distinct in %d deliveries, %d acknowledged with a receipt, %d receipted ids only with an ACK whose answer was lost\n",
		r.Received, r.Deliveries, r.Consumed, r.AckUnknown)
	fmt.Fprintf(&b, "duplicated: %d ids; extra deliveries marked redelivered %d, UNMARKED %d\n", r.Duplicated, r.DupMarked, r.DupUnmarked)
	fmt.Fprintf(&b, "LOST (receipted, never consumed): %d (%d never delivered)   UNEXPECTED (received, never sent): %d   MISDELIVERED: %d   RESURRECTED: %d",
		r.Lost, r.LostUnseen, r.Unexpected, r.Misdelivered, r.Resurrected)
	for _, l := range []struct {
		name string
		ids  []string
	}{{"lost", r.LostIDs}, {"unexpected", r.UnexpectedIDs}, {"unmarked duplicate", r.UnmarkedIDs}, {"misdelivered", r.MisIDs}, {"resurrected", r.ResurrectedID}} {
		if len(l.ids) > 0 {
			fmt.Fprintf(&b, "\n%s ids: %s", l.name, strings.Join(l.ids, " "))
		}
	}
	return b.String()
}
