package store

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"
)

// TestDamageInAppliedRecordKeepsLaterRecords: a bit flips in a record bbolt
// already holds (before the recorded position). The records after it are
// intact and verifiable (chained from the bad record's stored CRC) and were
// acknowledged as synced: Open, with either RecoverMode, logs the damage
// and replays them all.
func TestDamageInAppliedRecordKeepsLaterRecords(t *testing.T) {
	cfg := testConfig(t.TempDir())
	s := open(t, cfg)
	s.ap.flushBytes = 1 << 40
	s.Start()
	m := newModel()
	for i := uint64(1); i <= 20; i++ {
		apply(t, s, m, put("q", i, strings.Repeat("v", 60)), putMeta("last", fmt.Sprint(i)))
		if i == 15 {
			checkStats(t, s, m, weighLen) // the applier catches up: bbolt has 1..15
		}
	}
	if err := s.crash(); err != nil {
		t.Fatal(err)
	}
	_, recs, _ := records(t, cfg.Path+".wal")
	off := int64(walDataStart)
	for _, r := range recs[:3] {
		off += recHeaderLen + int64(len(r))
	}
	data, _ := os.ReadFile(cfg.Path + ".wal")
	data[off+recHeaderLen+5] ^= 0x40 // record 3: in bbolt already
	os.WriteFile(cfg.Path+".wal", data, 0o600)

	for _, mode := range []RecoverMode{RecoverRefuse, RecoverTruncate} {
		var logBuf bytes.Buffer
		cfg.Recover = mode
		cfg.Logger = slog.New(slog.NewTextHandler(&logBuf, nil))
		s = open(t, cfg)
		rs := s.Replay()
		// The first Open applies the 5 records after the applied
		// position; the second finds bbolt holds all 20.
		if rs.Records+rs.Skipped != 20 || rs.DroppedRecords != 0 || (mode == RecoverRefuse && rs.Records != 5) {
			t.Errorf("mode %d: replay %+v, want the 5 records after the applied position, and none dropped", mode, rs)
		}
		if !strings.Contains(logBuf.String(), "bbolt already holds") {
			t.Errorf("mode %d: the damage is not logged: %s", mode, logBuf.String())
		}
		checkContents(t, s, m) // every commit was acknowledged synced, and all are intact in bbolt or the log
		if err := s.crash(); err != nil {
			t.Fatal(err)
		}
		// Open replaced the log: put the damaged one back.
		os.WriteFile(cfg.Path+".wal", data, 0o600)
	}
}

// TestDamagedCRCFieldIsReplayed: a bit flips in the stored CRC of a
// record in the middle of the newer segment. Its payload and every later
// record are intact (the next record checks when chained from its
// computed CRC): Open replays them all and logs the damaged field.
func TestDamagedCRCFieldIsReplayed(t *testing.T) {
	cfg := testConfig(t.TempDir())
	var groups [][]Op
	for i := uint64(1); i <= 20; i++ {
		groups = append(groups, []Op{put("q", i, strings.Repeat("v", 50))})
	}
	states := crashWith(t, cfg, groups)
	_, recs, _ := records(t, cfg.Path+".wal")
	off := int64(walDataStart)
	for _, r := range recs[:5] {
		off += recHeaderLen + int64(len(r))
	}
	data, _ := os.ReadFile(cfg.Path + ".wal")
	data[off+4] ^= 0x01 // record 5's stored CRC
	os.WriteFile(cfg.Path+".wal", data, 0o600)
	var logBuf bytes.Buffer
	cfg.Logger = slog.New(slog.NewTextHandler(&logBuf, nil))
	s := open(t, cfg)
	defer s.Close()
	if rs := s.Replay(); rs.Records+rs.Skipped != 20 {
		t.Errorf("replay %+v", rs)
	}
	if !strings.Contains(logBuf.String(), "damaged CRC field") {
		t.Errorf("the damaged CRC field is not logged: %s", logBuf.String())
	}
	checkContents(t, s, states[20])
}
