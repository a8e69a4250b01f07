package main

import (
	"math"
	"testing"
)

func TestMedianMs(t *testing.T) {
	a := histogram{0.0001: 10, 0.0002: 10, 0.0003: 10, math.Inf(1): 10}
	// 100 new observations: 20 up to 0.1 ms, 40 in (0.1, 0.2], 40 in (0.2, 0.3].
	b := histogram{0.0001: 30, 0.0002: 70, 0.0003: 110, math.Inf(1): 110}
	got, ok := medianMs(a, b)
	// The 50th falls 30/40 of the way into (0.1, 0.2].
	if !ok || math.Abs(got-0.175) > 1e-9 {
		t.Fatalf("median = %v, %v; want 0.175 ms", got, ok)
	}
	if _, ok := medianMs(b, b); ok {
		t.Fatal("median of no observations reported")
	}
	c := histogram{0.0001: 30, 0.0002: 30, 0.0003: 30, math.Inf(1): 200}
	if _, ok := medianMs(a, c); ok {
		t.Fatal("median in the +Inf bucket reported")
	}
}
