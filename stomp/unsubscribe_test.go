package stomp

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/go-stomp/stomp/v3/frame"
)

// TestSessionUnsubscribeLosesNothingSilently: an auto-ack subscriber that
// unsubscribes while messages stream to it, then a second subscriber:
// every message arrives, and any that arrives twice is marked redelivered.
func TestSessionUnsubscribeLosesNothingSilently(t *testing.T) {
	_, addr := testServer(t)
	const N = 2000
	for round := 0; round < 5; round++ {
		q := fmt.Sprintf("/queue/u%d", round)
		p, _ := net.Dial("tcp", addr)
		var sb strings.Builder
		sb.WriteString("CONNECT\naccept-version:1.2\nhost:/\n\n\x00")
		for i := 0; i < N; i++ {
			fmt.Fprintf(&sb, "SEND\ndestination:%s\n\n%d\x00", q, i)
		}
		sb.WriteString("DISCONNECT\nreceipt:d\n\n\x00")
		io.WriteString(p, sb.String())
		io.ReadAll(p)
		p.Close()
		seen := map[string]int{}
		flagged := 0
		consume := func(unsub bool) {
			c, _ := net.Dial("tcp", addr)
			defer c.Close()
			s := "CONNECT\naccept-version:1.2\nhost:/\n\n\x00SUBSCRIBE\nid:1\ndestination:" + q + "\n\n\x00"
			if unsub {
				s += "UNSUBSCRIBE\nid:1\nreceipt:u\n\n\x00"
			}
			io.WriteString(c, s)
			r := frame.NewReader(bufio.NewReader(c))
			for {
				c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
				f, err := r.Read()
				if err != nil {
					return
				}
				if f == nil {
					continue
				}
				if f.Command == "RECEIPT" {
					io.WriteString(c, "DISCONNECT\nreceipt:x\n\n\x00")
				}
				if f.Command == "MESSAGE" {
					seen[string(f.Body)]++
					if f.Header.Get("redelivered") == "true" {
						flagged++
					}
				}
			}
		}
		consume(true)
		consume(false)
		dups := 0
		for _, v := range seen {
			if v > 1 {
				dups += v - 1
			}
		}
		if len(seen) != N || dups > flagged {
			t.Fatalf("round %d: distinct %d of %d, duplicates %d, flagged redelivered %d", round, len(seen), N, dups, flagged)
		}
		if dups > 0 {
			t.Logf("round %d: %d duplicates, %d flagged", round, dups, flagged)
		}
	}
}
