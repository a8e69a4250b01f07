package main

import (
	"fmt"
	"io"
	"math/bits"
	"slices"
	"sync"
)

// Per-second figures (-series): for every second of a run, counted from its
// start, the receipts that arrived in it with their latency p99 and max, the
// distinct messages first delivered in it, and (with -admin) the wraps of
// brokerd's write-ahead log in it (checkpoints or segment switches, and the
// switches that had to wait for bbolt). A stall of the broker, e.g. while
// its log wraps, shows as a second with a high max, or with no receipts at
// all while producers were waiting.
//
// Latencies go into a log-linear histogram of microseconds (32 sub-buckets
// per power of two, so a percentile is within ~3% of the true value; the
// reported p99 is its bucket's upper bound, capped at the exact max), so the
// cost is one lock and one increment per receipt and ~7.5 KB per second of
// run, whatever the rate.

const (
	subBits  = 5
	nBuckets = (64 - subBits + 1) << subBits
)

// bucketOf maps a latency in microseconds to its histogram bucket.
func bucketOf(us uint64) int {
	if us < 1<<(subBits+1) {
		return int(us)
	}
	e := bits.Len64(us) - (subBits + 1)
	return (e+1)<<subBits + int(us>>e) - 1<<subBits
}

// bucketTop is the largest value (µs) in bucket i.
func bucketTop(i int) uint64 {
	if i < 1<<(subBits+1) {
		return uint64(i)
	}
	e := i>>subBits - 1
	m := uint64(i&(1<<subBits-1)) + 1<<subBits
	return (m+1)<<e - 1
}

type second struct {
	hist  *[nBuckets]uint32 // receipt latencies, allocated on first use
	n     int64             // receipts
	max   int64             // nanos
	recv  int64             // first-time deliveries
	wraps int64             // write-ahead log wraps (with -admin)
	waits int64             // of which switches that waited for bbolt
	known bool              // store figures known for this second
}

type series struct {
	mu    sync.Mutex
	start int64 // unix nanos
	secs  []second
}

func newSeries(start interface{ UnixNano() int64 }) *series {
	return &series{start: start.UnixNano()}
}

// at returns the second holding unix-nanos t (nil before the start).
// Callers hold mu.
func (s *series) at(t int64) *second {
	if t < s.start {
		return nil
	}
	i := int((t - s.start) / 1e9)
	if i >= len(s.secs) {
		s.secs = append(s.secs, make([]second, i+1-len(s.secs))...)
	}
	return &s.secs[i]
}

func (s *series) receipt(at, lat int64) {
	lat = max(lat, 0)
	s.mu.Lock()
	if sec := s.at(at); sec != nil {
		if sec.hist == nil {
			sec.hist = new([nBuckets]uint32)
		}
		sec.hist[bucketOf(uint64(lat/1000))]++
		sec.n++
		sec.max = max(sec.max, lat)
	}
	s.mu.Unlock()
}

func (s *series) received(at int64) {
	s.mu.Lock()
	if sec := s.at(at); sec != nil {
		sec.recv++
	}
	s.mu.Unlock()
}

// storeEvents records the log wraps and switch waits observed by the poll
// at unix-nanos at (they happened during the 250 ms poll interval before
// it).
func (s *series) storeEvents(at, wraps, waits int64) {
	s.mu.Lock()
	if sec := s.at(at - 125e6); sec != nil {
		sec.wraps += wraps
		sec.waits += waits
		sec.known = true
	}
	s.mu.Unlock()
}

// point is one second of the JSON series.
type point struct {
	T     int     `json:"t"`               // second since the start
	Rcpt  int64   `json:"rcpt"`            // receipts that arrived in it
	P99   float64 `json:"rcpt_p99_ms"`     // their p99 (±3%)
	Max   float64 `json:"rcpt_max_ms"`     // their max (exact)
	Recv  int64   `json:"recv"`            // distinct messages first delivered in it
	Wraps *int64  `json:"wraps,omitempty"` // write-ahead log wraps (with -admin)
	Waits *int64  `json:"waits,omitempty"` // of which switches that waited for bbolt
}

func (s *series) points() []point {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]point, len(s.secs))
	for i := range s.secs {
		sec := &s.secs[i]
		p := point{T: i, Rcpt: sec.n, Max: ms(sec.max), Recv: sec.recv}
		if sec.n > 0 {
			want := (sec.n*99 + 99) / 100 // ceil(0.99 n)
			var acc int64
			for b, c := range sec.hist {
				acc += int64(c)
				if acc >= want {
					p.P99 = min(ms(int64(bucketTop(b)+1)*1000), p.Max)
					break
				}
			}
		}
		if sec.known {
			a, b := sec.wraps, sec.waits
			p.Wraps, p.Waits = &a, &b
		}
		out[i] = p
	}
	return out
}

// printSeries writes the human summary of a series: the worst seconds by
// receipt max, and seconds near a log wrap against the others.
func printSeries(w io.Writer, pts []point, receipts bool) {
	if len(pts) == 0 {
		return
	}
	if !receipts {
		var lo, hi int64 = -1, 0
		for _, p := range pts {
			if lo < 0 || p.Recv < lo {
				lo = p.Recv
			}
			hi = max(hi, p.Recv)
		}
		fmt.Fprintf(w, "per-sec   %d s; deliveries per second min %d max %d (see the JSON series)\n", len(pts), lo, hi)
		return
	}
	st := summarize(pts)
	fmt.Fprintf(w, "per-sec   %d s; receipt p99 per second: median %.3f ms, worst %.3f ms; seconds without a receipt: %d\n",
		len(pts), st.MedianP99, st.WorstP99, st.Idle)
	worst := slices.Clone(pts)
	slices.SortStableFunc(worst, func(a, b point) int {
		switch {
		case a.Max > b.Max:
			return -1
		case a.Max < b.Max:
			return 1
		}
		return 0
	})
	for i, p := range worst[:min(5, len(worst))] {
		ck := ""
		if p.Wraps != nil {
			ck = fmt.Sprintf("  log wraps %d (t-1..t+1: %d)", *p.Wraps, nearWraps(pts, p.T))
			if *p.Waits > 0 {
				ck += fmt.Sprintf(", %d waited for bbolt", *p.Waits)
			}
		}
		fmt.Fprintf(w, "  worst#%d  t=%3ds  receipts %7d  p99 %9.3f ms  max %9.3f ms%s\n", i+1, p.T, p.Rcpt, p.P99, p.Max, ck)
	}
	// Seconds near a log wrap (within a second: the counters are polled)
	// against the others, when known.
	var withMax, withP99, otherMax, otherP99 float64
	nWith, nOther := 0, 0
	for _, p := range pts {
		if p.Wraps == nil {
			continue
		}
		if nearWraps(pts, p.T) > 0 {
			nWith++
			withMax, withP99 = max(withMax, p.Max), max(withP99, p.P99)
		} else {
			nOther++
			otherMax, otherP99 = max(otherMax, p.Max), max(otherP99, p.P99)
		}
	}
	switch {
	case nWith+nOther == 0:
	case nWith == 0:
		fmt.Fprintln(w, "  no write-ahead log wrap during the run")
	default:
		fmt.Fprintf(w, "  %d s within 1 s of a log wrap: worst p99 %.3f ms, worst max %.3f ms; %d s not: worst p99 %.3f ms, worst max %.3f ms\n",
			nWith, withP99, withMax, nOther, otherP99, otherMax)
	}
}

// nearWraps is the number of log wraps in seconds t-1, t and t+1.
func nearWraps(pts []point, t int) int64 {
	var n int64
	for i := max(t-1, 0); i <= t+1 && i < len(pts); i++ {
		if c := pts[i].Wraps; c != nil {
			n += *c
		}
	}
	return n
}

// seriesStats condenses a series for the JSON line (and compare.sh).
type seriesStats struct {
	MedianP99 float64 `json:"sec_p99_median_ms"` // median over seconds with receipts of the per-second p99
	WorstP99  float64 `json:"sec_p99_worst_ms"`  // worst per-second p99
	Idle      int     `json:"sec_idle"`          // seconds without a receipt (the last, partial, one aside)
}

func summarize(pts []point) seriesStats {
	var st seriesStats
	var p99s []float64
	for i, p := range pts {
		if p.Rcpt > 0 {
			p99s = append(p99s, p.P99)
		} else if i < len(pts)-1 {
			st.Idle++
		}
	}
	slices.Sort(p99s)
	if len(p99s) > 0 {
		st.MedianP99 = p99s[len(p99s)/2]
		st.WorstP99 = p99s[len(p99s)-1]
	}
	return st
}
