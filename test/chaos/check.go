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
	Receipted   int `json:"receipted"`    // RECEIPT came back: must arrive
	Refused     int `json:"refused"`      // ERROR that refused the SEND
	Unknown     int `json:"unknown"`      // no answer, or an ERROR that says the outcome is unknown
	UnknownSeen int `json:"unknown_seen"` // of those, how many arrived
	RefusedSeen int `json:"refused_seen"` // refused SENDs that arrived anyway
	Received    int `json:"received"`     // distinct ids received
	Deliveries  int `json:"deliveries"`   // MESSAGE frames
	Lost        int `json:"lost"`         // receipted, never received: must be 0
	Duplicated  int `json:"duplicated"`   // ids received more than once
	DupMarked   int `json:"dup_marked"`   // extra deliveries that carried redelivered:true
	Unexpected  int `json:"unexpected"`   // received, never sent: must be 0

	LostIDs       []string `json:"lost_ids,omitempty"`
	UnexpectedIDs []string `json:"unexpected_ids,omitempty"`
}

// check reads a history. A SEND's outcome is its last answer; a SEND that
// was both receipted and later reported otherwise cannot happen (one
// outcome is recorded per SEND).
func check(evs []event) result {
	var r result
	outcome := map[string]evKind{}
	errInfo := map[string]string{}
	recv := map[string]int{}
	redeliveredExtra := 0
	for _, e := range evs {
		switch e.kind {
		case evSend:
			r.Attempted++
			outcome[e.id] = evSend
		case evReceipt, evUnknown:
			outcome[e.id] = e.kind
		case evError:
			outcome[e.id] = e.kind
			errInfo[e.id] = e.info
		case evReceived:
			recv[e.id]++
			r.Deliveries++
			if recv[e.id] > 1 && e.redelivered {
				redeliveredExtra++
			}
		}
	}
	for id, k := range outcome {
		_, seen := recv[id]
		switch k {
		case evReceipt:
			r.Receipted++
			if !seen {
				r.Lost++
				r.LostIDs = append(r.LostIDs, id)
			}
		case evError:
			if errorOutcome(errInfo[id]) == "unknown" {
				r.Unknown++
				if seen {
					r.UnknownSeen++
				}
			} else {
				r.Refused++
				if seen {
					r.RefusedSeen++
				}
			}
		default: // evUnknown, or a SEND still waiting when the run ended
			r.Unknown++
			if seen {
				r.UnknownSeen++
			}
		}
	}
	for id, n := range recv {
		r.Received++
		if n > 1 {
			r.Duplicated++
		}
		if _, ok := outcome[id]; !ok {
			r.Unexpected++
			r.UnexpectedIDs = append(r.UnexpectedIDs, id)
		}
	}
	r.DupMarked = redeliveredExtra
	sort.Strings(r.LostIDs)
	sort.Strings(r.UnexpectedIDs)
	if len(r.LostIDs) > 50 {
		r.LostIDs = r.LostIDs[:50]
	}
	if len(r.UnexpectedIDs) > 50 {
		r.UnexpectedIDs = r.UnexpectedIDs[:50]
	}
	return r
}

func (r result) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sends: %d attempted, %d receipted, %d refused (%d of them arrived anyway), %d unknown (%d of them arrived)\n",
		r.Attempted, r.Receipted, r.Refused, r.RefusedSeen, r.Unknown, r.UnknownSeen)
	fmt.Fprintf(&b, "received: %d distinct in %d deliveries; duplicated %d (extra deliveries marked redelivered: %d)\n",
		r.Received, r.Deliveries, r.Duplicated, r.DupMarked)
	fmt.Fprintf(&b, "LOST (receipted, never received): %d   UNEXPECTED (received, never sent): %d", r.Lost, r.Unexpected)
	if len(r.LostIDs) > 0 {
		fmt.Fprintf(&b, "\nlost ids: %s", strings.Join(r.LostIDs, " "))
	}
	if len(r.UnexpectedIDs) > 0 {
		fmt.Fprintf(&b, "\nunexpected ids: %s", strings.Join(r.UnexpectedIDs, " "))
	}
	return b.String()
}
