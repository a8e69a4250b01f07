package cluster

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// resolveTimeout bounds one resolution of the join list (its names are
// looked up at the same time).
const resolveTimeout = 5 * time.Second

// maxAddrsPerName bounds the addresses one name of the join list adds: a
// headless Service answers with one per pod.
const maxAddrsPerName = 256

// joinResolver turns the join list into gossip addresses (ip:port): an IP
// address stays as it is, a DNS name becomes every address it resolves to,
// A and AAAA. memberlist resolves names itself, but only through the
// system resolver, and says nothing about what it found; here the node
// logs each change of a name's addresses and each failure, once.
//
// resolve may be called from several goroutines (Start, then the rejoin
// loop); mu guards the last outcomes.
type joinResolver struct {
	r   *net.Resolver
	log *slog.Logger

	mu   sync.Mutex
	last map[string]string // join entry -> its last outcome as logged
}

func newJoinResolver(r *net.Resolver, log *slog.Logger) *joinResolver {
	if r == nil {
		r = net.DefaultResolver
	}
	return &joinResolver{r: r, log: log, last: make(map[string]string)}
}

// resolve returns the gossip addresses of entries (host:port each), sorted
// and without duplicates. An entry whose name does not resolve adds none:
// it is logged (when its outcome changed) and tried again at the next
// call. Names are looked up concurrently, each bounded by ctx.
func (j *joinResolver) resolve(ctx context.Context, entries []string) []string {
	results := make([][]string, len(entries))
	var wg sync.WaitGroup
	for i, e := range entries {
		host, port, err := net.SplitHostPort(e)
		if err != nil {
			j.note(e, "error: not host:port", nil, err)
			continue
		}
		if ip, err := netip.ParseAddr(host); err == nil {
			results[i] = []string{netip.AddrPortFrom(ip.Unmap(), parsePort(port)).String()}
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = j.lookup(ctx, e, host, port)
		}()
	}
	wg.Wait()
	var all []string
	for _, r := range results {
		all = append(all, r...)
	}
	slices.Sort(all)
	return slices.Compact(all)
}

// lookup resolves the name of entry e and logs what changed.
func (j *joinResolver) lookup(ctx context.Context, e, host, port string) []string {
	ips, err := j.r.LookupIPAddr(ctx, host)
	if err != nil {
		if ctx.Err() == nil || errors.Is(ctx.Err(), context.DeadlineExceeded) {
			j.note(e, "error: "+err.Error(), nil, err)
		} // else the node is closing: nothing to report
		return nil
	}
	p := parsePort(port)
	addrs := make([]string, 0, len(ips))
	for _, ip := range ips {
		a, ok := netip.AddrFromSlice(ip.IP)
		if !ok {
			continue
		}
		// A zone (fe80::1%eth0) is kept: a link-local peer needs it.
		addrs = append(addrs, netip.AddrPortFrom(a.Unmap().WithZone(ip.Zone), p).String())
	}
	slices.Sort(addrs)
	addrs = slices.Compact(addrs)
	if len(addrs) > maxAddrsPerName {
		addrs = addrs[:maxAddrsPerName]
	}
	j.note(e, strings.Join(addrs, ","), addrs, nil)
	return addrs
}

// note logs the outcome of resolving e when it differs from the last one:
// the addresses at info, a failure at warn.
func (j *joinResolver) note(e, outcome string, addrs []string, err error) {
	j.mu.Lock()
	prev, seen := j.last[e]
	j.last[e] = outcome
	j.mu.Unlock()
	if seen && prev == outcome {
		return
	}
	if err != nil {
		j.log.Warn("join address not resolved; retrying", "join", e, "err", err)
		return
	}
	j.log.Info("join address resolved", "join", e, "addrs", addrs)
}

// hasNames reports whether an entry of the join list is a DNS name, not
// an IP address.
func hasNames(entries []string) bool {
	for _, e := range entries {
		host, _, err := net.SplitHostPort(e)
		if err != nil {
			continue
		}
		if _, err := netip.ParseAddr(host); err != nil {
			return true
		}
	}
	return false
}

// normalAddr is addr (ip:port) as resolve writes it, so that addresses
// from memberlist and from the resolver compare equal; addr itself when it
// is not ip:port.
func normalAddr(addr string) string {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return addr
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
}

func parsePort(p string) uint16 {
	n, _ := strconv.ParseUint(p, 10, 16)
	return uint16(n)
}
