package netsim

import (
	"bytes"
	"io"
	"log"
	"sync"
	"testing"
	"time"
)

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) { l.mu.Lock(); defer l.mu.Unlock(); return l.b.Write(p) }

var logOut io.Writer = io.Discard

func TestExpJoinTime(t *testing.T) {
	for iter := 0; iter < 30; iter++ {
		n := New()
		var nodes []*node
		lb := &lockedBuf{}
		logOut = lb
		for _, name := range []string{"a", "b", "c", "d", "e"} {
			nd := startNode(t, n, name)
			nodes = append(nodes, nd)
		}
		_ = log.New
		for _, nd := range nodes[1:] {
			_, err := nd.ml.Join([]string{n.Host("a").Addr()})
			if err != nil {
				t.Fatal(err)
			}
		}
		s := time.Now()
		for {
			ok := true
			for _, nd := range nodes {
				if len(nd.members()) != 5 {
					ok = false
				}
			}
			if ok {
				break
			}
			time.Sleep(10 * time.Millisecond)
			if time.Since(s) > 300*time.Millisecond && time.Since(s) < 320*time.Millisecond {
				for _, nd := range nodes { t.Log("mid", nd.name, nd.members()) }
			}
		}
		d := time.Since(s)
		if d > 300*time.Millisecond {
			t.Log(iter, "slow", d)
			for _, nd := range nodes { t.Log(nd.name, nd.members()) }
			t.Log(lb.b.String())
			break
		}
		for _, nd := range nodes {
			nd.ml.Shutdown()
		}

	}
}
