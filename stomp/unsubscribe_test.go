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

// TestSessionUnsubscribeReceiptAfterBarrier: closing a subscription returns
// its unacknowledged messages with their delivery counts raised, which the
// replica submits to the store without a sync. The RECEIPT of the
// UNSUBSCRIBE promises those writes are durable: a store barrier issued
// after the close must have completed before it.
func TestSessionUnsubscribeReceiptAfterBarrier(t *testing.T) {
	rb, srv := testServerCfg(t, nil)
	addr := srv.Addr().String()
	q := "/queue/unsub-barrier"
	c := tdial(t, addr)
	c.connect()
	c.write(tframe(frame.SEND, "m", "destination:"+q, "receipt:p"))
	c.receipt("p")
	c.write(tframe(frame.SUBSCRIBE, "", "id:0", "destination:"+q, "ack:client-individual"))
	if m := c.read(); m.Command != frame.MESSAGE {
		t.Fatalf("want MESSAGE, got %s %v", m.Command, m.Header)
	}
	c.write(tframe(frame.UNSUBSCRIBE, "", "id:0", "receipt:u"))
	c.receipt("u")
	rb.mu.Lock()
	log := append([]string(nil), rb.log...)
	rb.mu.Unlock()
	found := false
	for _, l := range log {
		if l == "barrier done, issued after 1 closes" {
			found = true
		}
	}
	if !found {
		t.Fatalf("RECEIPT for UNSUBSCRIBE before any store barrier issued after the close completed; broker calls: %q", log)
	}
	// The message came back with its delivery counted.
	c.write(tframe(frame.SUBSCRIBE, "", "id:1", "destination:"+q))
	m := c.read()
	if m.Command != frame.MESSAGE || m.Header.Get("x-delivery-count") != "1" {
		t.Fatalf("want the message back with x-delivery-count:1, got %s %v", m.Command, m.Header)
	}
}
