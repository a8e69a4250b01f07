package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
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
// brokerd's checkpoint counter

const ckptMetric = "brokerd_store_checkpoints_total"

var metricsClient = &http.Client{Timeout: 2 * time.Second}

// scrapeCounter reads one unlabelled counter from a Prometheus text page.
func scrapeCounter(admin, name string) (int64, error) {
	resp, err := metricsClient.Get("http://" + admin + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				return 0, fmt.Errorf("%s: %w", name, err)
			}
			return int64(f), nil
		}
	}
	return 0, fmt.Errorf("no %s on http://%s/metrics", name, admin)
}

// ckptWatch counts brokerd's store checkpoints between its creation and
// stop, and, once attached to a series, polls every second to place them.
type ckptWatch struct {
	admin string
	first int64
	ok    bool
	quit  chan struct{}
	done  chan struct{}
	once  sync.Once
}

func newCkptWatch(admin string) *ckptWatch {
	w := &ckptWatch{admin: admin, quit: make(chan struct{}), done: make(chan struct{})}
	n, err := scrapeCounter(admin, ckptMetric)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench: -admin:", err)
	} else {
		w.first, w.ok = n, true
	}
	return w
}

// attach starts polling into s, four times a second.
func (w *ckptWatch) attach(s *series) {
	if !w.ok {
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
					n, err := scrapeCounter(w.admin, ckptMetric)
					if err != nil {
						continue
					}
					s.checkpoints(now.UnixNano(), n-prev)
					prev = n
				}
			}
		}()
	})
}

// stop returns the number of checkpoints since newCkptWatch (-1 when the
// counter could not be read).
func (w *ckptWatch) stop() int64 {
	close(w.quit)
	w.once.Do(func() { close(w.done) }) // never attached
	<-w.done
	if !w.ok {
		return -1
	}
	n, err := scrapeCounter(w.admin, ckptMetric)
	if err != nil {
		return -1
	}
	return n - w.first
}
