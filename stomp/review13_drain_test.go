package stomp

import (
	"bufio"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestReview13UndrainWhileSessionsEnd: a drain ends the client sessions
// (CloseClients) and each session, as it ends, sends the drain's ERROR.
// The session read the drained state twice (once to choose the drain's
// ERROR, once for its text), so an undrain between the two reads gave
// errorFrame a nil error and the session goroutine panicked: the whole
// process died. brokerd undrain right after a drain (an operator who
// changed their mind, or a script) races exactly those endings. Here
// the drained state flips continuously while the sessions end; every
// client must get an ERROR (the drain's or the shutdown's) and the
// process must live.
func TestReview13UndrainWhileSessionsEnd(t *testing.T) {
	_, srv := testServerCfg(t, nil)
	for round := 0; round < 15; round++ {
		var conns []net.Conn
		for i := 0; i < 16; i++ {
			c, err := net.Dial("tcp", srv.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			io.WriteString(c, "CONNECT\naccept-version:1.2\nhost:/\n\n\x00")
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil || line != "CONNECTED\n" {
				t.Fatalf("CONNECT: %q %v", line, err)
			}
			conns = append(conns, c)
		}
		srv.SetDraining("draining")
		var stop atomic.Bool
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				srv.SetDraining("")
				srv.SetDraining("draining")
			}
		}()
		srv.CloseClients()
		for _, c := range conns {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			b, _ := io.ReadAll(c)
			if !strings.HasPrefix(string(b), "ERROR\n") {
				t.Fatalf("round %d: a session ended by CloseClients sent %q, want an ERROR", round, b)
			}
		}
		stop.Store(true)
		wg.Wait()
		srv.SetDraining("")
	}
}
