//go:build linux

package chaos

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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
// lets packets through undelayed (fail-open).
const maxDelayed = 4096

type delayer struct {
	nf     *nfqueue.Nfqueue
	cancel context.CancelFunc
	d      time.Duration
	held   atomic.Int64 // packets delayed so far

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
// called (after the rule is removed by heal, or before: stop removes it);
// stop says how many packets the queue held and how many the kernel could
// not queue (nfnetlink_queue's counters).
func (nw *network) delay(i int, d time.Duration) (stop func() string, err error) {
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
		// Should the queue overflow, packets pass instead of being
		// dropped: the nemesis is delay, not loss.
		Flags: nfqueue.NfQaCfgFlagFailOpen,
	})
	if err != nil {
		return nil, fmt.Errorf("nfqueue in %s: %w", nodeNS(i), err)
	}
	// A receive buffer large enough for a burst of the node's packets
	// while the suite is slow to read (under -race): a packet the kernel
	// cannot hand over passes undelayed (fail-open). SO_RCVBUFFORCE, as
	// root, is not capped by net.core.rmem_max.
	if rc, err := nf.Con.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20)
		})
	}
	ctx, cancel := context.WithCancel(context.Background())
	dl := &delayer{nf: nf, cancel: cancel, d: d, wake: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{})}
	hook := func(a nfqueue.Attribute) int {
		if a.PacketID == nil {
			return 0
		}
		dl.held.Add(1)
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
	var report string
	return func() string {
		once.Do(func() {
			report = queueStats(i)
			_, _ = inNS(nodeNS(i), "iptables", "-w", "-D", "OUTPUT", "-o", nodeLink(i), "-j", "NFQUEUE", "--queue-num", q, "--queue-bypass")
			dl.close()
			report = fmt.Sprintf("(%d packets delayed, %s)", dl.held.Load(), report)
		})
		return report
	}, nil
}

// queueStats reads the delay queue's line of
// /proc/net/netfilter/nfnetlink_queue in node i's namespace: packets the
// kernel dropped because the queue was full (queue_dropped) or could not
// send to the suite (user_dropped); with fail-open, overflowing packets
// pass rather than drop.
func queueStats(i int) string {
	out, err := inNS(nodeNS(i), "cat", "/proc/net/netfilter/nfnetlink_queue")
	if err != nil {
		return "nfqueue counters unavailable"
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 7 && f[0] == strconv.Itoa(delayQueue) {
			return fmt.Sprintf("nfqueue dropped %s (queue full) %s (user)", f[5], f[6])
		}
	}
	return "nfqueue counters not found"
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
