package main

import "testing"

// bucketOf and bucketTop agree: every value lies in its bucket, buckets are
// contiguous and within ~3% wide.
func TestBuckets(t *testing.T) {
	prevTop := int64(-1)
	for i := 0; i < nBuckets; i++ {
		top := bucketTop(i)
		if i > 0 && top <= uint64(prevTop) {
			t.Fatalf("bucket %d top %d <= previous %d", i, top, prevTop)
		}
		lo := uint64(prevTop + 1)
		if bucketOf(lo) != i || bucketOf(top) != i {
			t.Fatalf("bucket %d: [%d,%d] maps to %d,%d", i, lo, top, bucketOf(lo), bucketOf(top))
		}
		if lo >= 64 && float64(top-lo+1)/float64(lo) > 1.0/32+1e-9 {
			t.Fatalf("bucket %d [%d,%d] wider than 1/32", i, lo, top)
		}
		prevTop = int64(top)
		if top > 1<<62 {
			break
		}
	}
	if b := bucketOf(^uint64(0)); b >= nBuckets {
		t.Fatalf("max value maps to %d >= %d", b, nBuckets)
	}
}

func TestSeriesP99(t *testing.T) {
	s := &series{start: 0}
	for i := int64(1); i <= 1000; i++ {
		s.receipt(5e8, i*1e6) // 1..1000 ms in second 0
	}
	s.receipt(1.5e9, 7e6)
	p := s.points()
	if len(p) != 2 || p[0].Rcpt != 1000 || p[0].Max != 1000 || p[1].Rcpt != 1 {
		t.Fatalf("points %+v", p)
	}
	if p[0].P99 < 990 || p[0].P99 > 990*1.04 {
		t.Fatalf("p99 %v, want ~990", p[0].P99)
	}
}
