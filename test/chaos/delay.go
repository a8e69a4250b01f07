//go:build linux

package chaos

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"golang.org/x/sys/unix"
)

// This kernel has no sch_netem, so delay is done in user space: an iptables
// rule in the node's namespace hands every packet the node sends on its
// link to an NFQUEUE, and the suite accepts each one d later. The order of
// packets is kept (one delay for all, verdicts in arrival order), so TCP
// sees a longer round trip, not reordering.

const delayQueue = 7 // the NFQUEUE number the suite uses

// maxDelayed bounds the packets held in user space; beyond it the kernel
// drops (the queue's own length limit).
const maxDelayed = 4096

type delayer struct {
	nf     *nfqueue.Nfqueue
	cancel context.CancelFunc
	d      time.Duration

	mu      sync.Mutex
	pending []delayed
	wake    chan struct{}
	quit    chan struct{} // closed by close
	done    chan struct{} // closed when release has returned
}

type delayed struct {
	id  uint32
	due time.Time
}

// delay delays every packet node i sends by d until the returned stop is
// called (after the rule is removed by heal, or before: stop removes it).
func (nw *network) delay(i int, d time.Duration) (stop func(), err error) {
	nsf, err := os.Open("/var/run/netns/" + nodeNS(i))
	if err != nil {
		return nil, err
	}
	defer nsf.Close()
	nf, err := nfqueue.Open(&nfqueue.Config{
		NetNS:        int(nsf.Fd()),
		NfQueue:      delayQueue,
		MaxQueueLen:  maxDelayed,
		Copymode:     nfqueue.NfQnlCopyMeta,
		AfFamily:     unix.AF_INET,
		WriteTimeout: time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("nfqueue in %s: %w", nodeNS(i), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	dl := &delayer{nf: nf, cancel: cancel, d: d, wake: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{})}
	hook := func(a nfqueue.Attribute) int {
		if a.PacketID == nil {
			return 0
		}
		dl.mu.Lock()
		dl.pending = append(dl.pending, delayed{id: *a.PacketID, due: time.Now().Add(d)})
		dl.mu.Unlock()
		select {
		case dl.wake <- struct{}{}:
		default:
		}
		return 0
	}
	errf := func(e error) int {
		if ctx.Err() != nil {
			return 1 // closing: stop reading
		}
		return 0
	}
	if err := nf.RegisterWithErrorFunc(ctx, hook, errf); err != nil {
		cancel()
		nf.Close()
		return nil, err
	}
	go dl.release()
	// --queue-bypass: should the suite die, packets pass instead of
	// being dropped while nobody reads the queue.
	q := strconv.Itoa(delayQueue)
	if _, err := inNS(nodeNS(i), "iptables", "-w", "-A", "OUTPUT", "-o", nodeLink(i), "-j", "NFQUEUE", "--queue-num", q, "--queue-bypass"); err != nil {
		dl.close()
		return nil, err
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			_, _ = inNS(nodeNS(i), "iptables", "-w", "-D", "OUTPUT", "-o", nodeLink(i), "-j", "NFQUEUE", "--queue-num", q, "--queue-bypass")
			dl.close()
		})
	}, nil
}

// release accepts every held packet once its delay has passed, in order;
// at close, everything still held at once.
func (dl *delayer) release() {
	defer close(dl.done)
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		dl.mu.Lock()
		now := time.Now()
		n := 0
		for n < len(dl.pending) && !dl.pending[n].due.After(now) {
			n++
		}
		due := dl.pending[:n:n]
		dl.pending = dl.pending[n:]
		next := time.Hour
		if len(dl.pending) > 0 {
			next = time.Until(dl.pending[0].due)
		}
		dl.mu.Unlock()
		for _, p := range due {
			_ = dl.nf.SetVerdict(p.id, nfqueue.NfAccept)
		}
		t.Reset(next)
		select {
		case <-dl.wake:
		case <-t.C:
		case <-dl.quit:
			dl.mu.Lock()
			rest := dl.pending
			dl.pending = nil
			dl.mu.Unlock()
			for _, p := range rest {
				_ = dl.nf.SetVerdict(p.id, nfqueue.NfAccept)
			}
			return
		}
	}
}

func (dl *delayer) close() {
	close(dl.quit)
	<-dl.done
	dl.cancel()
	dl.nf.Close()
}
