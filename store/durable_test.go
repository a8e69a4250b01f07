package store

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"testing"
)

// TestDurableEndDecidesDamage: a record that fails its checksum while the
// records after it check is damage in a version 3 log only if a later
// record's durable end covers it (an fdatasync had completed past it);
// otherwise it is a torn unsynced tail, cut with the records after it. A
// version 2 log keeps its rule: damage.
func TestDurableEndDecidesDamage(t *testing.T) {
	const gen = 5
	for _, tc := range []struct {
		name    string
		version uint32
		durable bool // the third record says the second was synced
		corrupt bool
	}{
		{"v3 unsynced", 3, false, false},
		{"v3 synced", 3, true, true},
		{"v2", 2, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := walHeader{gen: gen, salt: 0x12345678, size: minWALSize}
			hb := h.encode()
			binary.LittleEndian.PutUint32(hb[8:], tc.version)
			binary.LittleEndian.PutUint32(hb[48:], crc32.Checksum(hb[:48], castagnoli))
			b := make([]byte, minWALSize)
			copy(b, hb)
			off, chain := int64(walDataStart), h.salt
			var ends []int64
			for i, p := range []string{"\x01\x01q\x01\x00", "\x01\x01q\x02\x00", "\x01\x01q\x03\x00"} {
				r := append(make([]byte, recHeaderLen), p...)
				if tc.version == 2 {
					chain = sealRecordV2(r, gen, chain)
				} else {
					durable := int64(walDataStart)
					if i == 2 && tc.durable {
						durable = ends[1]
					}
					chain = sealRecord(r, gen, chain, durable)
				}
				off += int64(copy(b[off:], r))
				ends = append(ends, off)
			}
			b[ends[0]+recHeaderLen+1] ^= 0x10 // the second record's payload
			ws, err := scanWAL(bytes.NewReader(b), int64(len(b)), func([]byte) error { return nil })
			if err != nil {
				t.Fatal(err)
			}
			if ws.records != 1 || (ws.corrupt != nil) != tc.corrupt || (ws.cut != nil) == tc.corrupt {
				t.Fatalf("records %d corrupt %+v cut %+v", ws.records, ws.corrupt, ws.cut)
			}
			c := ws.corrupt
			if c == nil {
				c = ws.cut
			}
			if c.off != ends[0] || c.records != 2 {
				t.Fatalf("%+v", c)
			}
		})
	}
}
