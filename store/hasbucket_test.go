package store

import "testing"

// HasBucket tells a queue whose messages were all removed (its bucket is
// there, empty) from one never written or deleted; a new owner learns
// from it that a drained queue exists.
func TestHasBucket(t *testing.T) {
	s := open(t, testConfig(t.TempDir()))
	s.Start()
	has := func(name string) bool {
		t.Helper()
		ok, err := s.HasBucket(name)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if has("q") {
		t.Fatal("a bucket never written is there")
	}
	apply(t, s, nil, put("q", 1, "m"))
	apply(t, s, nil, del("q", 1))
	if !has("q") {
		t.Fatal("a bucket emptied by its deletes is gone: the drained queue would no longer exist")
	}
	apply(t, s, nil, Op{Kind: OpDeleteBucket, Bucket: "q"})
	if has("q") {
		t.Fatal("a deleted bucket is still there")
	}
}
