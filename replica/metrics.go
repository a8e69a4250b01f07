package replica

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	published    *prometheus.CounterVec
	delivered    prometheus.Counter
	acked        prometheus.Counter
	redelivered  prometheus.Counter
	deadLettered prometheus.Counter
	expired      prometheus.Counter
	dropped      prometheus.Counter
	rejected     prometheus.Counter
	droppedHead  prometheus.Counter
	idleRemoved  prometheus.Counter
	corrupt      prometheus.Counter
	inherited    prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, n *Node) *metrics {
	m := &metrics{
		published: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "brokerd_messages_published_total", Help: "Messages accepted (queue: committed to the store).",
		}, []string{"kind"}),
		delivered:    prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_messages_delivered_total", Help: "Messages handed to subscribers, redeliveries included."}),
		acked:        prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_messages_acknowledged_total", Help: "Messages acknowledged (auto mode: written to the connection)."}),
		redelivered:  prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_messages_redelivered_total", Help: "Messages returned to their queue by NACK or the end of a session after reaching the wire."}),
		deadLettered: prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_messages_dead_lettered_total", Help: "Messages moved to a dead-letter queue."}),
		expired:      prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_messages_expired_total", Help: "Messages dropped because their expires time passed."}),
		dropped:      prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_topic_messages_dropped_total", Help: "Topic messages dropped for a subscriber whose buffer was full."}),
		rejected:     prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_queue_rejected_total", Help: "SENDs refused because their queue was at queue.max_length or queue.max_bytes (overflow reject-publish)."}),
		droppedHead:  prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_queue_dropped_head_total", Help: "Oldest pending messages removed to keep a queue within queue.max_length or queue.max_bytes (overflow drop-head)."}),
		corrupt:      prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_queue_corrupt_records_total", Help: "Stored messages that could not be decoded and were skipped (left in the store)."}),
		idleRemoved:  prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_queues_idle_removed_total", Help: "Empty queues removed after queue.idle_delete_after without subscribers."}),
		inherited: prometheus.NewCounter(prometheus.CounterOpts{Name: "brokerd_messages_redelivered_after_failover_total",
			Help: "First deliveries here of messages inherited from a previous owner (a failover or a re-placement), marked redelivered because that owner may have delivered them."}),
	}
	if reg != nil {
		reg.MustRegister(m.published, m.delivered, m.acked, m.redelivered, m.deadLettered, m.expired, m.dropped,
			m.rejected, m.droppedHead, m.idleRemoved, m.corrupt, m.inherited, &depthCollector{n: n})
	}
	return m
}

var (
	depthDesc     = prometheus.NewDesc("brokerd_destination_pending", "Messages waiting for a subscriber, per destination.", []string{"destination", "kind"}, nil)
	inflightDesc  = prometheus.NewDesc("brokerd_destination_in_flight", "Messages delivered and not yet acknowledged, per destination.", []string{"destination", "kind"}, nil)
	consumersDesc = prometheus.NewDesc("brokerd_destination_consumers", "Subscriptions, per destination.", []string{"destination", "kind"}, nil)
)

// depthCollector reports per-destination gauges at scrape time.
type depthCollector struct{ n *Node }

func (c *depthCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- depthDesc
	ch <- inflightDesc
	ch <- consumersDesc
}

func (c *depthCollector) Collect(ch chan<- prometheus.Metric) {
	for _, d := range c.n.Destinations() {
		ch <- prometheus.MustNewConstMetric(depthDesc, prometheus.GaugeValue, float64(d.Pending), d.Name, d.Kind)
		ch <- prometheus.MustNewConstMetric(inflightDesc, prometheus.GaugeValue, float64(d.InFlight), d.Name, d.Kind)
		ch <- prometheus.MustNewConstMetric(consumersDesc, prometheus.GaugeValue, float64(d.Consumers), d.Name, d.Kind)
	}
}

var (
	lagOpsDesc = prometheus.NewDesc("brokerd_replication_lag_ops",
		"Writes (messages, acknowledgements, delivery counts) this owner sent a replica of the destination and the replica has not yet confirmed durable.", []string{"destination", "peer"}, nil)
	lagBytesDesc = prometheus.NewDesc("brokerd_replication_lag_bytes",
		"Bytes of message records in brokerd_replication_lag_ops.", []string{"destination", "peer"}, nil)
	copiesDesc = prometheus.NewDesc("brokerd_replication_copies",
		"Other replicas' copies of the queues this node owns, by what it knows of them: synced (complete), catching_up (being rebuilt), unknown (to rebuild before relying on it).", []string{"state"}, nil)
	catchUpBytesDesc = prometheus.NewDesc("brokerd_replication_catchup_bytes_total",
		"Bytes sent to rebuild replicas' copies (catch-ups).", nil, nil)
	catchUpsDesc = prometheus.NewDesc("brokerd_replication_catchups_total",
		"Catch-ups begun: a replica's copy of a queue rebuilt from this owner's.", nil, nil)
	checksDesc = prometheus.NewDesc("brokerd_replication_checks_total",
		"Anti-entropy checks of replicas' copies, by result: match, diverged (rebuilt, or merged when the replica holds messages the owner lacks), failed (no answer; rebuilt).", []string{"result"}, nil)
)

// Collector returns the replicator's metrics: replication lag per
// destination and replica, the state of the copies, catch-ups and
// anti-entropy checks.
func (p *PeerReplicator) Collector() prometheus.Collector { return replCollector{p} }

type replCollector struct{ p *PeerReplicator }

func (c replCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{lagOpsDesc, lagBytesDesc, copiesDesc, catchUpBytesDesc, catchUpsDesc, checksDesc} {
		ch <- d
	}
}

func (c replCollector) Collect(ch chan<- prometheus.Metric) {
	p := c.p
	p.lagMu.Lock()
	for k, v := range p.lag {
		ch <- prometheus.MustNewConstMetric(lagOpsDesc, prometheus.GaugeValue, float64(v.ops), k[1], k[0])
		ch <- prometheus.MustNewConstMetric(lagBytesDesc, prometheus.GaugeValue, float64(v.bytes), k[1], k[0])
	}
	p.lagMu.Unlock()
	var states [3]int
	p.stateMu.Lock()
	for _, m := range p.synced {
		for _, info := range m {
			states[info.state]++
		}
	}
	p.stateMu.Unlock()
	for i, name := range []string{"unknown", "catching_up", "synced"} {
		ch <- prometheus.MustNewConstMetric(copiesDesc, prometheus.GaugeValue, float64(states[i]), name)
	}
	ch <- prometheus.MustNewConstMetric(catchUpBytesDesc, prometheus.CounterValue, float64(p.cuBytes.Load()))
	ch <- prometheus.MustNewConstMetric(catchUpsDesc, prometheus.CounterValue, float64(p.cuBegun.Load()))
	for i, name := range []string{"match", "diverged", "failed"} {
		ch <- prometheus.MustNewConstMetric(checksDesc, prometheus.CounterValue, float64(p.checks[i].Load()), name)
	}
}
