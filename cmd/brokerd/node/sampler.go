package node

import (
	"math"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// The metrics the sampler reads from the node's registry.
const (
	metricPublished   = "brokerd_messages_published_total"
	metricDelivered   = "brokerd_messages_delivered_total"
	metricReceipt     = "brokerd_stomp_receipt_seconds"
	metricConnections = "brokerd_stomp_connections"
)

// sampleRegisterer registers every collector in Registerer and, the ones
// that describe a metric the sampler reads, in Sample too, which the
// sampler gathers: not the whole registry, every second, whose
// per-destination series and count of open files cost in proportion to
// the queues clients create and the connections they open.
type sampleRegisterer struct {
	prometheus.Registerer
	Sample *prometheus.Registry
}

func newSampleRegisterer(reg prometheus.Registerer) sampleRegisterer {
	return sampleRegisterer{Registerer: reg, Sample: prometheus.NewRegistry()}
}

func (r sampleRegisterer) Register(c prometheus.Collector) error {
	if err := r.Registerer.Register(c); err != nil {
		return err
	}
	if describesSampled(c) {
		return r.Sample.Register(c)
	}
	return nil
}

func (r sampleRegisterer) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

// describesSampled reports whether c describes one of the sampler's
// metrics.
func describesSampled(c prometheus.Collector) bool {
	ch := make(chan *prometheus.Desc)
	go func() {
		c.Describe(ch)
		close(ch)
	}()
	found := false
	for d := range ch {
		s := d.String()
		for _, name := range []string{metricPublished, metricDelivered, metricReceipt, metricConnections} {
			if strings.Contains(s, `fqName: "`+name+`"`) {
				found = true
			}
		}
	}
	return found
}

// Sample is one second of a node's traffic, as the cluster page charts it.
// Rates are per second over the interval since the previous sample.
// P50 and P99 are nil when no receipt was written in the interval.
type Sample struct {
	// T is the end of the interval, in Unix milliseconds.
	T int64 `json:"t"`
	// Sent is messages accepted by this node's destinations per second
	// (brokerd_messages_published_total).
	Sent float64 `json:"sent"`
	// Delivered is messages handed to subscribers per second
	// (brokerd_messages_delivered_total).
	Delivered float64 `json:"delivered"`
	// Receipts is RECEIPT frames written per second.
	Receipts float64 `json:"receipts"`
	// P50 and P99 are receipt latency quantiles in milliseconds, estimated
	// from brokerd_stomp_receipt_seconds over the interval.
	P50 *float64 `json:"p50_ms"`
	P99 *float64 `json:"p99_ms"`
	// Connections is the open STOMP connections at T.
	Connections float64 `json:"connections"`
}

// counters is one reading of the cumulative metrics a Sample is the
// difference of.
type counters struct {
	at          time.Time
	published   float64
	delivered   float64
	connections float64
	// bounds are the receipt histogram's upper bounds (the last is +Inf);
	// cum[i] is the cumulative count of observations <= bounds[i].
	bounds []float64
	cum    []uint64
}

// readCounters extracts the sampled metrics from a registry's families.
func readCounters(mfs []*dto.MetricFamily, at time.Time) counters {
	c := counters{at: at}
	for _, mf := range mfs {
		switch mf.GetName() {
		case metricPublished:
			for _, m := range mf.GetMetric() {
				c.published += m.GetCounter().GetValue()
			}
		case metricDelivered:
			for _, m := range mf.GetMetric() {
				c.delivered += m.GetCounter().GetValue()
			}
		case metricConnections:
			for _, m := range mf.GetMetric() {
				c.connections += m.GetGauge().GetValue()
			}
		case metricReceipt:
			ms := mf.GetMetric()
			if len(ms) == 0 {
				continue
			}
			h := ms[0].GetHistogram()
			for _, b := range h.GetBucket() {
				c.bounds = append(c.bounds, b.GetUpperBound())
				c.cum = append(c.cum, b.GetCumulativeCount())
			}
			c.bounds = append(c.bounds, math.Inf(1))
			c.cum = append(c.cum, h.GetSampleCount())
		}
	}
	return c
}

// diff is the sample for the interval from prev to c.
func (c counters) diff(prev counters) Sample {
	s := Sample{T: c.at.UnixMilli(), Connections: c.connections}
	secs := c.at.Sub(prev.at).Seconds()
	if secs <= 0 {
		return s
	}
	rate := func(cur, old float64) float64 { return math.Max(0, cur-old) / secs }
	s.Sent = rate(c.published, prev.published)
	s.Delivered = rate(c.delivered, prev.delivered)
	if len(c.cum) == 0 || len(c.cum) != len(prev.cum) {
		return s
	}
	delta := make([]uint64, len(c.cum))
	for i := range c.cum {
		if c.cum[i] >= prev.cum[i] {
			delta[i] = c.cum[i] - prev.cum[i]
		}
	}
	total := delta[len(delta)-1]
	s.Receipts = float64(total) / secs
	if total == 0 {
		return s
	}
	p50 := 1000 * bucketQuantile(0.5, c.bounds, delta)
	p99 := 1000 * bucketQuantile(0.99, c.bounds, delta)
	s.P50, s.P99 = &p50, &p99
	return s
}

// bucketQuantile estimates the q-quantile of the observations counted in a
// cumulative histogram (cum[i] observations <= bounds[i], the last bound
// +Inf) as Prometheus's histogram_quantile does: linear interpolation
// within the bucket the rank falls in, the lowest bucket starting at 0,
// and the highest finite bound for ranks in the +Inf bucket. It returns
// NaN without observations.
func bucketQuantile(q float64, bounds []float64, cum []uint64) float64 {
	if len(cum) == 0 || len(cum) != len(bounds) || cum[len(cum)-1] == 0 {
		return math.NaN()
	}
	total := float64(cum[len(cum)-1])
	rank := q * total
	i := 0
	for i < len(cum) && float64(cum[i]) < rank {
		i++
	}
	if i >= len(cum) {
		i = len(cum) - 1
	}
	if math.IsInf(bounds[i], 1) {
		if i == 0 {
			return math.NaN()
		}
		return bounds[i-1]
	}
	lo, below := 0.0, 0.0
	if i > 0 {
		lo, below = bounds[i-1], float64(cum[i-1])
	}
	in := float64(cum[i]) - below
	if in <= 0 {
		return bounds[i]
	}
	return lo + (bounds[i]-lo)*(rank-below)/in
}

// sampler records, every interval, the node's message rates and receipt
// latency into a ring of the last size samples (Samples reads it). Run
// owns its one goroutine; Close stops it and waits.
type sampler struct {
	reg   prometheus.Gatherer
	every time.Duration
	size  int

	mu   sync.Mutex
	ring []Sample // the last len(ring) samples, oldest at head once full
	head int      // where the next sample goes once the ring is full
	prev counters
	have bool // prev holds a reading

	stop      chan struct{}
	done      chan struct{}
	startOnce sync.Once
	started   bool // set in startOnce: run was started
	stopOnce  sync.Once
}

// newSampler returns a sampler of reg keeping size samples taken every
// interval. It starts nothing: see Start.
func newSampler(reg prometheus.Gatherer, every time.Duration, size int) *sampler {
	return &sampler{reg: reg, every: every, size: size, ring: make([]Sample, 0, size), stop: make(chan struct{}), done: make(chan struct{})}
}

// Start takes a first reading and starts the goroutine that samples every
// interval until Close.
func (s *sampler) Start() {
	s.startOnce.Do(func() {
		s.sample(time.Now())
		s.started = true
		go s.run()
	})
}

func (s *sampler) run() {
	defer close(s.done)
	t := time.NewTicker(s.every)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			s.sample(now)
		}
	}
}

// sample reads the registry and appends the difference with the previous
// reading to the ring.
func (s *sampler) sample(now time.Time) {
	mfs, err := s.reg.Gather()
	if err != nil && len(mfs) == 0 {
		return // nothing to read: the interval is skipped, rates stay right
	}
	c := readCounters(mfs, now)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.have {
		s.push(c.diff(s.prev))
	}
	s.prev, s.have = c, true
}

func (s *sampler) push(x Sample) {
	if len(s.ring) < s.size {
		s.ring = append(s.ring, x)
		return
	}
	s.ring[s.head] = x
	s.head = (s.head + 1) % s.size
}

// Samples returns, oldest first, the samples taken after since (Unix
// milliseconds; 0 for all). The caller owns the returned slice.
func (s *sampler) Samples(since int64) []Sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Sample, 0, len(s.ring))
	for i := range s.ring {
		x := s.ring[(s.head+i)%len(s.ring)]
		if x.T > since {
			out = append(out, x)
		}
	}
	return out
}

// Close stops the sampling goroutine and waits for it. It is idempotent,
// and safe on a sampler never started (a Start after Close starts nothing).
func (s *sampler) Close() {
	s.stopOnce.Do(func() { close(s.stop) })
	s.startOnce.Do(func() {}) // waits for a Start in progress
	if s.started {
		<-s.done
	}
}
