package stomp

import (
	"net/netip"
	"sync"
	"time"
)

// Failed logins are slowed per remote address: the n-th failure within
// loginForget of the previous one waits loginDelayBase << (n-1), at most
// loginDelayMax, before its ERROR. A client guessing passwords over one
// connection at a time then makes a few guesses a minute; one that opens
// many is capped by limits.max_connections_per_ip and by the bounded
// password checks.
const (
	loginDelayBase = 100 * time.Millisecond
	loginDelayMax  = 10 * time.Second
	loginForget    = 10 * time.Minute
	// loginGuardMax bounds the addresses remembered; beyond it the
	// oldest failures are forgotten first.
	loginGuardMax = 16384
)

type loginFailures struct {
	n    int
	last time.Time
}

// loginGuard remembers recent failed logins per remote address.
type loginGuard struct {
	mu        sync.Mutex
	fail      map[netip.Addr]*loginFailures
	now       func() time.Time
	base, max time.Duration // loginDelayBase, loginDelayMax (tests change them)
}

func newLoginGuard() *loginGuard {
	return &loginGuard{fail: make(map[netip.Addr]*loginFailures), now: time.Now, base: loginDelayBase, max: loginDelayMax}
}

// setDelays changes the delays (tests).
func (g *loginGuard) setDelays(base, max time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.base, g.max = base, max
}

// failed records a failed login from ip and returns how long to wait
// before answering it.
func (g *loginGuard) failed(ip netip.Addr) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	f := g.fail[ip]
	if f == nil || now.Sub(f.last) > loginForget {
		if f == nil && len(g.fail) >= loginGuardMax {
			g.evict(now)
		}
		f = &loginFailures{}
		g.fail[ip] = f
	}
	f.n++
	f.last = now
	d := g.max
	if f.n <= 20 {
		d = min(g.base<<(f.n-1), g.max)
	}
	return d
}

// evict forgets expired entries and, if that is not enough, arbitrary
// ones (map order is random) down to three quarters of the bound (under
// mu). An attacker with many addresses can thus make the guard forget an
// address early, never grow it.
func (g *loginGuard) evict(now time.Time) {
	for ip, f := range g.fail {
		if now.Sub(f.last) > loginForget {
			delete(g.fail, ip)
		}
	}
	for ip := range g.fail {
		if len(g.fail) <= loginGuardMax*3/4 {
			break
		}
		delete(g.fail, ip)
	}
}

// size is the number of addresses remembered (tests).
func (g *loginGuard) size() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.fail)
}
