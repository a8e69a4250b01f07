package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// memStat is one reading of /proc/PID/status, in bytes. RSS = anon + file
// + shmem. RssFile includes bbolt's mmap of its data file: page cache, which
// the kernel reclaims under memory pressure; RssAnon is the heap.
type memStat struct {
	RSS   int64 `json:"rss"`
	Anon  int64 `json:"rss_anon"`
	File  int64 `json:"rss_file"`
	Shmem int64 `json:"rss_shmem"`
	HWM   int64 `json:"vm_hwm"` // the kernel's peak VmRSS since the process started
}

func readMem(pid int) (memStat, error) {
	var m memStat
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return m, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *int64
		switch k {
		case "VmRSS":
			dst = &m.RSS
		case "RssAnon":
			dst = &m.Anon
		case "RssFile":
			dst = &m.File
		case "RssShmem":
			dst = &m.Shmem
		case "VmHWM":
			dst = &m.HWM
		default:
			continue
		}
		f := strings.Fields(v) // "123456 kB"
		if len(f) == 2 && f[1] == "kB" {
			if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
				*dst = n << 10
			}
		}
	}
	return m, nil
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func (m memStat) String() string {
	return fmt.Sprintf("VmRSS %.1f MiB (anon %.1f, file %.1f, shmem %.1f)", mib(m.RSS), mib(m.Anon), mib(m.File), mib(m.Shmem))
}

// memStats summarises the samples of one period.
type memStats struct {
	Samples int     `json:"samples"`
	Last    memStat `json:"last"` // the last reading
	// Peaks of each field, taken separately (so PeakAnon + PeakFile may
	// exceed PeakRSS).
	PeakRSS  int64  `json:"peak_rss"`
	PeakAnon int64  `json:"peak_rss_anon"`
	PeakFile int64  `json:"peak_rss_file"`
	Err      string `json:"error,omitempty"`
}

func (s *memStats) String() string {
	if s.Samples == 0 {
		return "memory: no sample (" + s.Err + ")"
	}
	return fmt.Sprintf("peak VmRSS %.1f MiB (peak anon %.1f, peak file %.1f); last %s",
		mib(s.PeakRSS), mib(s.PeakAnon), mib(s.PeakFile), s.Last)
}

func (s *memStats) add(m memStat) {
	s.Samples++
	s.Last = m
	s.PeakRSS = max(s.PeakRSS, m.RSS)
	s.PeakAnon = max(s.PeakAnon, m.Anon)
	s.PeakFile = max(s.PeakFile, m.File)
}

// memSampler reads a process's memory every interval until stopped.
type memSampler struct {
	pid  int
	mu   sync.Mutex
	st   memStats
	quit chan struct{}
	done chan struct{}
}

func startMemSampler(pid int, every time.Duration) *memSampler {
	s := &memSampler{pid: pid, quit: make(chan struct{}), done: make(chan struct{})}
	s.sample()
	go func() {
		defer close(s.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				s.sample()
			case <-s.quit:
				return
			}
		}
	}()
	return s
}

func (s *memSampler) sample() {
	m, err := readMem(s.pid)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		if s.st.Err == "" {
			s.st.Err = err.Error()
		}
		return
	}
	s.st.add(m)
}

// snapshot returns the figures so far without stopping.
func (s *memSampler) snapshot() memStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st
}

// stop takes a last sample and returns the figures.
func (s *memSampler) stop() memStats {
	close(s.quit)
	<-s.done
	s.sample()
	return s.snapshot()
}

// ---------------------------------------------------------------------------
// brokerd's store counters: wraps of its write-ahead log

// The store's log is reused in place. Depending on the store's version a
// wrap is a checkpoint (wait for bbolt, start again from the top:
// brokerd_store_checkpoints_total) or a switch to the other segment
// (brokerd_store_wal_switches_total; brokerd_store_wal_switch_waits_total
// counts those that had to wait for bbolt to catch up). Whichever of them
// brokerd exports is counted; wraps = checkpoints + switches.
var storeCounters = []string{
	"brokerd_store_checkpoints_total",
	"brokerd_store_wal_switches_total",
	"brokerd_store_wal_switch_waits_total",
}

// storeCounts are the counters' increases during a run; nil = not exported
// by this brokerd.
type storeCounts struct {
	Checkpoints *int64 `json:"checkpoints,omitempty"`
	Switches    *int64 `json:"wal_switches,omitempty"`
	SwitchWaits *int64 `json:"wal_switch_waits,omitempty"`
	Wraps       *int64 `json:"wal_wraps,omitempty"` // checkpoints + switches
	// Medians over the run of brokerd's own latency histograms: from
	// reading a frame with a receipt to writing the RECEIPT, and one
	// fdatasync of its log (interpolated within 50 µs buckets).
	ReceiptP50 *float64 `json:"broker_receipt_p50_ms,omitempty"`
	LogSyncP50 *float64 `json:"broker_log_sync_p50_ms,omitempty"`
}

// The histograms whose medians storeCounts reports.
const (
	receiptHist = "brokerd_stomp_receipt_seconds"
	logSyncHist = "brokerd_store_log_sync_seconds"
)

// histogram is one scrape of a histogram: cumulative counts by upper bound.
type histogram map[float64]float64

// scrapeHistograms reads the unlabelled histograms of names.
func scrapeHistograms(admin string, names ...string) (map[string]histogram, error) {
	resp, err := metricsClient.Get("http://" + admin + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return nil, err
	}
	out := map[string]histogram{}
	for line := range strings.Lines(string(b)) {
		for _, name := range names {
			rest, ok := strings.CutPrefix(line, name+`_bucket{le="`)
			if !ok {
				continue
			}
			le, count, ok := strings.Cut(rest, `"} `)
			if !ok {
				continue
			}
			bound, err1 := strconv.ParseFloat(le, 64)
			n, err2 := strconv.ParseFloat(strings.TrimSpace(count), 64)
			if err1 != nil || err2 != nil {
				continue
			}
			if out[name] == nil {
				out[name] = histogram{}
			}
			out[name][bound] = n
		}
	}
	return out, nil
}

// medianMs is the median, in milliseconds, of the observations between
// scrapes a and b, interpolated linearly within its bucket; ok is false
// without observations or when it falls in the +Inf bucket.
func medianMs(a, b histogram) (float64, bool) {
	bounds := make([]float64, 0, len(b))
	for le := range b {
		bounds = append(bounds, le)
	}
	slices.Sort(bounds)
	if len(bounds) == 0 {
		return 0, false
	}
	total := b[bounds[len(bounds)-1]] - a[bounds[len(bounds)-1]]
	if total <= 0 {
		return 0, false
	}
	half := total / 2
	lo, prev := 0.0, 0.0
	for _, le := range bounds {
		c := b[le] - a[le]
		if c >= half {
			if math.IsInf(le, 1) {
				return 0, false
			}
			frac := 1.0
			if c > prev {
				frac = (half - prev) / (c - prev)
			}
			return (lo + frac*(le-lo)) * 1000, true
		}
		lo, prev = le, c
	}
	return 0, false
}

func (c *storeCounts) String() string {
	var parts []string
	add := func(p *int64, what string) {
		if p != nil {
			parts = append(parts, fmt.Sprintf("%d %s", *p, what))
		}
	}
	add(c.Wraps, "write-ahead log wrap(s)")
	add(c.Checkpoints, "checkpoint(s)")
	add(c.Switches, "segment switch(es)")
	add(c.SwitchWaits, "switch(es) that waited for bbolt")
	if c.ReceiptP50 != nil {
		parts = append(parts, fmt.Sprintf("broker receipt p50 %.3f ms", *c.ReceiptP50))
	}
	if c.LogSyncP50 != nil {
		parts = append(parts, fmt.Sprintf("log fdatasync p50 %.3f ms", *c.LogSyncP50))
	}
	if len(parts) == 0 {
		return "no store counter exported"
	}
	return strings.Join(parts, ", ")
}

var metricsClient = &http.Client{Timeout: 2 * time.Second}

// scrapeCounters reads the unlabelled counters of names present on
// brokerd's /metrics page.
func scrapeCounters(admin string, names []string) (map[string]int64, error) {
	resp, err := metricsClient.Get("http://" + admin + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for line := range strings.Lines(string(b)) {
		for _, name := range names {
			if v, ok := strings.CutPrefix(line, name+" "); ok {
				if f, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
					out[name] = int64(f)
				}
			}
		}
	}
	return out, nil
}

// wraps is checkpoints + switches in a scrape.
func wraps(m map[string]int64) int64 {
	return m[storeCounters[0]] + m[storeCounters[1]]
}

// storeWatch counts brokerd's store counters between its creation and
// stop, and, once attached to a series, polls them to place them in time.
type storeWatch struct {
	admin string
	first map[string]int64 // nil when the first scrape failed
	hists map[string]histogram
	quit  chan struct{}
	done  chan struct{}
	once  sync.Once
}

func newStoreWatch(admin string) *storeWatch {
	w := &storeWatch{admin: admin, quit: make(chan struct{}), done: make(chan struct{})}
	m, err := scrapeCounters(admin, storeCounters)
	switch {
	case err != nil:
		fmt.Fprintln(os.Stderr, "bench: -admin:", err)
	case len(m) == 0:
		fmt.Fprintf(os.Stderr, "bench: -admin: none of %s on http://%s/metrics\n", strings.Join(storeCounters, ", "), admin)
	default:
		w.first = m
	}
	w.hists, _ = scrapeHistograms(admin, receiptHist, logSyncHist)
	return w
}

// attach starts polling into s, four times a second.
func (w *storeWatch) attach(s *series) {
	if w.first == nil {
		return
	}
	w.once.Do(func() {
		go func() {
			defer close(w.done)
			prev := w.first
			t := time.NewTicker(250 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-w.quit:
					return
				case now := <-t.C:
					m, err := scrapeCounters(w.admin, storeCounters)
					if err != nil {
						continue
					}
					s.storeEvents(now.UnixNano(), wraps(m)-wraps(prev), m[storeCounters[2]]-prev[storeCounters[2]])
					prev = m
				}
			}
		}()
	})
}

// stop returns the counters' increases since newStoreWatch (nil when they
// could not be read).
func (w *storeWatch) stop() *storeCounts {
	close(w.quit)
	w.once.Do(func() { close(w.done) }) // never attached
	<-w.done
	if w.first == nil {
		return nil
	}
	m, err := scrapeCounters(w.admin, storeCounters)
	if err != nil {
		return nil
	}
	var c storeCounts
	delta := func(name string) *int64 {
		a, ok1 := w.first[name]
		b, ok2 := m[name]
		if !ok1 || !ok2 {
			return nil
		}
		d := b - a
		return &d
	}
	c.Checkpoints = delta(storeCounters[0])
	c.Switches = delta(storeCounters[1])
	c.SwitchWaits = delta(storeCounters[2])
	if h, err := scrapeHistograms(w.admin, receiptHist, logSyncHist); err == nil && w.hists != nil {
		median := func(name string) *float64 {
			if h[name] == nil {
				return nil
			}
			if v, ok := medianMs(w.hists[name], h[name]); ok {
				return &v
			}
			return nil
		}
		c.ReceiptP50 = median(receiptHist)
		c.LogSyncP50 = median(logSyncHist)
	}
	if c.Checkpoints != nil || c.Switches != nil {
		n := wraps(m) - wraps(w.first)
		c.Wraps = &n
	}
	return &c
}
