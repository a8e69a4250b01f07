package node

import (
	"testing"
)

// TestReview13SamplerGathersOnlyItsMetrics: the cluster page's sampler
// runs every second, whether anyone looks or not, so it must not gather
// the whole registry: the per-destination series (three per queue, which
// clients create at will) and the process collector (which counts the
// open files, one per connection) cost in proportion to the queues and
// connections (about 170 ms a second for 50,000 queues). It reads the
// four metrics it charts, and nothing else.
func TestReview13SamplerGathersOnlyItsMetrics(t *testing.T) {
	cfg := adminTestConfig(t)
	n, _ := startAdminNode(t, cfg)
	mfs, err := n.page.samples.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{metricPublished: true, metricDelivered: true, metricReceipt: true, metricConnections: true}
	seen := 0
	for _, mf := range mfs {
		if !want[mf.GetName()] {
			t.Errorf("the sampler gathers %s every second", mf.GetName())
		} else {
			seen++
		}
	}
	if seen == 0 {
		t.Error("the sampler gathers none of its metrics")
	}
}
