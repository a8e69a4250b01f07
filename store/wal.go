package store

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"time"
)

// The write-ahead log is one preallocated file, overwritten in place, in
// two segments:
//
//	blocks 0-1 (4 KiB each)  the two header slots of segment 0
//	blocks 2-3               the two header slots of segment 1
//	16 KiB ...               segment 0's records, back to back
//	16 KiB + segment size    segment 1's records (the rest of the file)
//
// The writer fills one segment while the applier copies the other's
// records into bbolt in the background; when the segment is full, it
// starts a new generation in the other one, which waits only if the
// applier has not yet applied that segment's old records.
//
// Generations number the segments' contents across both segments. A header
// is magic, version, generation, salt, prev, prevEnd and a CRC-32C of
// those: prev is the generation of the other segment whose records come
// just before this one's (0 when none do: after a checkpoint, Open or a
// group too large for the log) and prevEnd the offset where its records
// end. Each segment's valid slot with the higher generation is current; a
// new generation is written into the other slot, so a torn header write
// leaves the old one intact.
//
// A record is {length u32, crc u32, generation u32, durable u32} and length
// bytes of payload (the encoded ops of one group commit). generation is the
// low 32 bits of the header's; durable is the file offset up to which a
// completed fdatasync had made the record's segment durable when the record
// was written (the segment's start when none had since the generation
// began). The CRC-32C covers length, generation, durable and payload and is
// chained: it starts from the previous
// record's CRC, or from the generation's random salt for the first record.
// A record is therefore only valid at its own place in its own generation:
// stale bytes past the tail (older generations, or any bytes a client put in
// a message body) are never mistaken for records, short of a 2^-32 chance.
//
// Replay takes the segment with the newer current generation. If its prev
// is the other segment's current generation, the other's records replay
// first, and must end exactly at prevEnd (that segment was complete and
// synced before the newer one began: anything else is damage). Then the
// newer segment's records replay while they are valid; the first invalid
// one is the torn write of a group that was never acknowledged, or the
// tail. A record whose checksum fails although its header is intact (its
// length fits, it names the generation) is looked at further, in order:
//
//   - if the next record checks when chained from the bad one's computed
//     CRC, only the stored CRC field is damaged: the record is replayed,
//     with a logged warning, and the scan goes on;
//   - else, if the record is at or before the position bbolt has applied
//     (bbolt holds it), the damage is logged and the scan goes on, chained
//     from its stored CRC;
//   - else, if records after it check when chained from its stored CRC and
//     the last of them has a durable end at or past the bad record's end,
//     the bad record had been synced: damage in the middle. Damage fails
//     Open with ErrCorruptLog, naming the file and byte offset, unless
//     Config.Recover is RecoverTruncate, which drops the damaged record and
//     everything after it;
//   - else it is an unsynced write torn by a power loss (pages of unsynced
//     writes reach the disk in any order): it and the valid records after
//     it are cut as a torn tail, and the cut is logged.
//
// In the older segment, which was synced whole before the newer began, a
// record that does not check (and is not one of the first two cases) is
// damage whatever the durable ends say.
//
// Version 2 logs (the same layout, records with a 64-bit generation and no
// durable end) are replayed with the rules above but for the durable end: a
// bad record followed by records that check is damage. Version 1 logs (one
// segment, header slots by generation parity, records from 8 KiB, as
// version 2) are replayed too. Either is then replaced by a version 3 log.

const (
	walMagic      = "BRKDWAL1"
	walVersion    = 3
	walBlock      = 4096
	walDataStart  = 4 * walBlock
	walHeaderLen  = 52
	recHeaderLen  = 16
	minWALSize    = 32 << 10
	maxWALSize    = 1 << 30
	replayTxBytes = 16 << 20 // payload bytes per bbolt transaction during replay

	v1HeaderLen = 28
	v1DataStart = 2 * walBlock
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var errNoWALHeader = errors.New("no valid header")

type walHeader struct {
	gen     uint64
	salt    uint32
	prev    uint64 // generation of the other segment replayed before this one; 0: none
	prevEnd int64  // where prev's records end
	size    int64  // the log's size, which places the segments
	version uint32 // when decoded
}

func (h walHeader) encode() []byte {
	b := make([]byte, walHeaderLen)
	copy(b, walMagic)
	binary.LittleEndian.PutUint32(b[8:], walVersion)
	binary.LittleEndian.PutUint64(b[12:], h.gen)
	binary.LittleEndian.PutUint32(b[20:], h.salt)
	binary.LittleEndian.PutUint64(b[24:], h.prev)
	binary.LittleEndian.PutUint64(b[32:], uint64(h.prevEnd))
	binary.LittleEndian.PutUint64(b[40:], uint64(h.size))
	binary.LittleEndian.PutUint32(b[48:], crc32.Checksum(b[:48], castagnoli))
	return b
}

// decodeWALHeader decodes a version 2 or 3 header (the same layout), or
// a version 1 one (which has no prev).
func decodeWALHeader(b []byte) (walHeader, bool) {
	if len(b) < v1HeaderLen || string(b[:8]) != walMagic {
		return walHeader{}, false
	}
	h := walHeader{version: binary.LittleEndian.Uint32(b[8:]), gen: binary.LittleEndian.Uint64(b[12:]), salt: binary.LittleEndian.Uint32(b[20:])}
	switch h.version {
	case 1:
		if binary.LittleEndian.Uint32(b[24:]) != crc32.Checksum(b[:24], castagnoli) {
			return walHeader{}, false
		}
	case 2, walVersion:
		if len(b) < walHeaderLen || binary.LittleEndian.Uint32(b[48:]) != crc32.Checksum(b[:48], castagnoli) {
			return walHeader{}, false
		}
		h.prev = binary.LittleEndian.Uint64(b[24:])
		h.prevEnd = int64(binary.LittleEndian.Uint64(b[32:]))
		h.size = int64(binary.LittleEndian.Uint64(b[40:]))
		if h.size < minWALSize || h.size > maxWALSize || h.size%walBlock != 0 {
			return walHeader{}, false
		}
	default:
		return walHeader{}, false
	}
	return h, h.gen != 0
}

func newHeader(gen, prev uint64, prevEnd, size int64) walHeader {
	return walHeader{gen: gen, salt: rand.Uint32(), prev: prev, prevEnd: prevEnd, size: size}
}

// sealRecord fills the version 3 header of rec (recHeaderLen bytes, then
// the payload) and returns its CRC, the chain value for the next record.
// durable is the file offset up to which a completed fdatasync had made
// the record's segment durable when it was written.
func sealRecord(rec []byte, gen uint64, prev uint32, durable int64) uint32 {
	binary.LittleEndian.PutUint32(rec[0:], uint32(len(rec)-recHeaderLen))
	binary.LittleEndian.PutUint32(rec[8:], uint32(gen))
	binary.LittleEndian.PutUint32(rec[12:], uint32(durable))
	crc := recordCRC(prev, rec[:recHeaderLen], rec[recHeaderLen:])
	binary.LittleEndian.PutUint32(rec[4:], crc)
	return crc
}

// sealRecordV2 fills a version 1 or 2 record header (a 64-bit generation);
// tests write such logs with it.
func sealRecordV2(rec []byte, gen uint64, prev uint32) uint32 {
	binary.LittleEndian.PutUint32(rec[0:], uint32(len(rec)-recHeaderLen))
	binary.LittleEndian.PutUint64(rec[8:], gen)
	crc := recordCRC(prev, rec[:recHeaderLen], rec[recHeaderLen:])
	binary.LittleEndian.PutUint32(rec[4:], crc)
	return crc
}

// recHeaderFits reports whether the record header rh, at a place with
// room bytes left in its segment, has a length that fits and names
// generation gen in the record format of version.
func recHeaderFits(rh []byte, room int64, gen uint64, version uint32) bool {
	length := int64(binary.LittleEndian.Uint32(rh[0:]))
	if length == 0 || length > room-recHeaderLen {
		return false
	}
	if version >= 3 {
		return binary.LittleEndian.Uint32(rh[8:]) == uint32(gen)
	}
	return binary.LittleEndian.Uint64(rh[8:]) == gen
}

func recordCRC(prev uint32, hdr, payload []byte) uint32 {
	crc := crc32.Update(prev, castagnoli, hdr[0:4])
	crc = crc32.Update(crc, castagnoli, hdr[8:16])
	return crc32.Update(crc, castagnoli, payload)
}

// segBounds returns where segment i's header slots and records lie in a
// version 2 log of size bytes (the header slots are in the same place
// whatever the size).
func segBounds(size int64, i int) (hdr, start, end int64) {
	half := (size - walDataStart) / 2 / walBlock * walBlock
	if i == 0 {
		return 0, walDataStart, walDataStart + half
	}
	return 2 * walBlock, walDataStart + half, size
}

// walFile is the log's file: *os.File with Sync an fdatasync. Tests wrap
// it to inject faults.
type walFile interface {
	io.ReaderAt
	io.WriterAt
	Sync() error // fdatasync
	Close() error
}

type osWALFile struct{ *os.File }

func (f osWALFile) Sync() error { return fdatasync(f.File) }

// walPos is a place in the log: the end of a record of generation gen.
// Generations only grow (a new log starts above every generation bbolt
// has seen), so positions order records in time: by generation, then by
// offset.
type walPos struct {
	gen uint64
	end int64 // offset just past the record
}

// covers reports whether the record ending at q is at or before p.
func (p walPos) covers(q walPos) bool {
	return q.gen < p.gen || (q.gen == p.gen && q.end <= p.end)
}

func (p walPos) encode() []byte {
	b := make([]byte, 16)
	binary.BigEndian.PutUint64(b, p.gen)
	binary.BigEndian.PutUint64(b[8:], uint64(p.end))
	return b
}

func decodeWALPos(b []byte) walPos {
	if len(b) != 16 {
		return walPos{}
	}
	return walPos{gen: binary.BigEndian.Uint64(b), end: int64(binary.BigEndian.Uint64(b[8:]))}
}

// ReplayStats is what Open replayed from the write-ahead log.
type ReplayStats struct {
	Records  int           // records applied to bbolt
	Bytes    int64         // their payload bytes
	Duration time.Duration // reading and applying them
	// Skipped and SkippedBytes are the valid records (and their payload
	// bytes) that bbolt already had: at or before the log position its
	// last transaction recorded. They are read and their checksums
	// checked, not applied.
	Skipped      int
	SkippedBytes int64
	// DroppedRecords and DroppedBytes are the records (and their payload
	// bytes) found valid after a corrupt one and dropped under
	// RecoverTruncate, the corrupt one included.
	DroppedRecords int
	DroppedBytes   int64
}

// corruption describes a record in the middle of a generation that fails
// its checksum while records after it check: damage, or (cut) a torn
// unsynced tail followed by records that were not made durable either.
type corruption struct {
	off     int64 // byte offset of the bad record
	index   int   // its index in the generation
	records int   // records dropped with it (itself included)
	bytes   int64 // their payload bytes
}

// scanNote is a damaged record that replay read past: its stored CRC
// field alone was damaged (crcField), or it was at or before the applied
// position, which bbolt already holds.
type scanNote struct {
	off      int64
	index    int
	crcField bool
}

// scanOpts are scanRecords' parameters beyond the segment.
type scanOpts struct {
	version uint32 // the log's format: records of 1 and 2 name a 64-bit generation, of 3 a 32-bit one and a durable end
	applied walPos // records at or before it are in bbolt already
}

// scanResult is what scanRecords found.
type scanResult struct {
	records int
	bytes   int64
	tail    int64       // offset just past the last valid record
	corrupt *corruption // nil for a clean or torn end
	cut     *corruption // a torn unsynced record followed by valid, unsynced ones, all cut
	notes   []scanNote
}

// scanRecords calls fn with the payload and position of every valid
// record of generation gen in r between start and end, in order. Each
// payload is a fresh slice that fn may keep. It stops at the first record
// that does not check: the end of the generation or a torn write, except
// when the record's header is intact (its length fits and it names gen)
// and
//   - the record after it checks when chained from the bad record's
//     computed CRC: only the stored CRC field is damaged; the record is
//     passed to fn, noted, and the scan goes on;
//   - else, the bad record is at or before o.applied (bbolt has it): it is
//     passed to fn (which skips it), noted, and the scan goes on, chained
//     from its stored CRC;
//   - else, records after it check when chained from its stored CRC: in a
//     version 3 log, that is corruption (described in the result; the
//     caller decides) only if the last of them says a completed fdatasync
//     had made the log durable past the bad record's end; otherwise the
//     bad record was an unsynced write torn by a power loss and the scan
//     ends there, the records cut described in cut. In older logs it is
//     corruption.
func scanRecords(r io.ReaderAt, start, end int64, gen uint64, chain uint32, o scanOpts, fn func(payload []byte, pos walPos) error) (scanResult, error) {
	res := scanResult{tail: start}
	if end <= start {
		return res, nil
	}
	br := bufio.NewReaderSize(io.NewSectionReader(r, start, end-start), int(min(1<<20, end-start)))
	off := start
	var rh [recHeaderLen]byte
	for end-off >= recHeaderLen {
		if _, err := io.ReadFull(br, rh[:]); err != nil {
			return res, fmt.Errorf("read record at %d: %w", off, err)
		}
		if !recHeaderFits(rh[:], end-off, gen, o.version) {
			break
		}
		length := int64(binary.LittleEndian.Uint32(rh[0:]))
		payload := make([]byte, length)
		if _, err := io.ReadFull(br, payload); err != nil {
			return res, fmt.Errorf("read record at %d: %w", off, err)
		}
		stored := binary.LittleEndian.Uint32(rh[4:])
		crc := recordCRC(chain, rh[:], payload)
		next := off + recHeaderLen + length
		if crc != stored {
			switch {
			case countValid(r, next, end, gen, crc, o.version, 1).n > 0:
				res.notes = append(res.notes, scanNote{off: off, index: res.records, crcField: true})
			case o.applied.covers(walPos{gen, next}):
				res.notes = append(res.notes, scanNote{off: off, index: res.records})
				crc = stored
			default:
				v := countValid(r, next, end, gen, stored, o.version, -1)
				if v.n > 0 {
					c := &corruption{off: off, index: res.records, records: v.n + 1, bytes: v.bytes + length}
					if o.version < 3 || v.durable >= next {
						res.corrupt = c
					} else {
						res.cut = c
					}
				}
				return res, nil
			}
		}
		if err := fn(payload, walPos{gen, next}); err != nil {
			return res, fmt.Errorf("record %d at %d: %w", res.records, off, err)
		}
		chain = crc
		res.records++
		res.bytes += length
		off = next
		res.tail = off
	}
	return res, nil
}

// validRun is what countValid found.
type validRun struct {
	n       int
	bytes   int64
	durable int64 // the last record's durable end (version 3)
}

// countValid counts the valid records of generation gen from off, chained
// from chain, up to max of them (max < 0: all), and their payload bytes.
func countValid(r io.ReaderAt, off, end int64, gen uint64, chain uint32, version uint32, max int) validRun {
	var v validRun
	var rh [recHeaderLen]byte
	for (max < 0 || v.n < max) && end-off >= recHeaderLen {
		if _, err := r.ReadAt(rh[:], off); err != nil {
			break
		}
		if !recHeaderFits(rh[:], end-off, gen, version) {
			break
		}
		length := int64(binary.LittleEndian.Uint32(rh[0:]))
		payload := make([]byte, length)
		if _, err := r.ReadAt(payload, off+recHeaderLen); err != nil {
			break
		}
		crc := recordCRC(chain, rh[:], payload)
		if crc != binary.LittleEndian.Uint32(rh[4:]) {
			break
		}
		chain = crc
		v.n++
		v.bytes += length
		v.durable = int64(binary.LittleEndian.Uint32(rh[12:]))
		off += recHeaderLen + length
	}
	return v
}

// slotHeader is one segment's current header.
type slotHeader struct {
	walHeader
	slot int64 // 0 or 1
	ok   bool
}

// readHeader returns the current (valid, highest) header of the two slots
// at base and base+walBlock. With v1, it looks for version 1 headers in
// their slots by generation parity; else for version 2 ones.
func readHeader(r io.ReaderAt, size, base int64, v1 bool) (slotHeader, error) {
	var cur slotHeader
	for slot := int64(0); slot < 2; slot++ {
		if size < base+slot*walBlock+walHeaderLen {
			break
		}
		b := make([]byte, walHeaderLen)
		if _, err := r.ReadAt(b, base+slot*walBlock); err != nil {
			return cur, fmt.Errorf("read header: %w", err)
		}
		h, ok := decodeWALHeader(b)
		if !ok || (h.version == 1) != v1 || (v1 && int64(h.gen%2) != slot) {
			continue
		}
		if !cur.ok || h.gen > cur.gen {
			cur = slotHeader{walHeader: h, slot: slot, ok: true}
		}
	}
	return cur, nil
}

// walScan is what scanWAL found.
type walScan struct {
	version uint32        // the newest header's
	segs    [2]slotHeader // version 2 or 3: each segment's current header
	newest  int           // the segment with the newer generation
	records int
	bytes   int64
	tail    int64       // offset just past the newest segment's last valid record
	corrupt *corruption // offsets are the file's
	cut     *corruption // a torn unsynced record of the newest segment and the valid ones cut after it
	notes   []scanNote  // damaged records read past
	maxGen  uint64      // highest generation seen
	size    int64       // the log size the newest header gives (version 2 or 3)
}

// scanWAL reads the headers of the log in r (size bytes) and calls fn with
// the payload of every record to replay, in order (see the format above).
// Each payload is a fresh slice that fn may keep. Damage is reported in
// the result's corrupt, and fn has been called for the records before it.
func scanWAL(r io.ReaderAt, size int64, fn func(payload []byte) error) (walScan, error) {
	return scanWALPos(r, size, walPos{}, func(p []byte, _ walPos) error { return fn(p) })
}

// scanWALPos is scanWAL, also passing each record's position; records at
// or before applied are in bbolt already (see scanRecords).
func scanWALPos(r io.ReaderAt, size int64, applied walPos, fn func(payload []byte, pos walPos) error) (walScan, error) {
	var ws walScan
	v1, err := readHeader(r, size, 0, true)
	if err != nil {
		return ws, err
	}
	if v1.ok {
		ws.version, ws.maxGen = 1, v1.gen
		res, err := scanRecords(r, v1DataStart, size, v1.gen, v1.salt, scanOpts{version: 1, applied: applied}, fn)
		ws.records, ws.bytes, ws.tail, ws.corrupt, ws.notes = res.records, res.bytes, res.tail, res.corrupt, res.notes
		return ws, err
	}
	for i := range ws.segs {
		base, _, _ := segBounds(minWALSize, i)
		if ws.segs[i], err = readHeader(r, size, base, false); err != nil {
			return ws, err
		}
	}
	a, b := ws.segs[0], ws.segs[1]
	switch {
	case !a.ok && !b.ok:
		return ws, errNoWALHeader
	case !a.ok || (b.ok && b.gen > a.gen):
		ws.newest = 1
	}
	n, o := ws.segs[ws.newest], ws.segs[1-ws.newest]
	ws.maxGen, ws.size, ws.version = n.gen, n.size, n.version
	opts := scanOpts{version: n.version, applied: applied}
	// The segments are where the newest header says, whatever the file's
	// size now; records past its end are missing.
	bounds := func(i int) (int64, int64, int64) {
		hdr, start, end := segBounds(n.size, i)
		return hdr, start, min(end, size)
	}
	_, nStart, nEnd := bounds(ws.newest)
	if n.prev != 0 {
		oBase, oStart, oEnd := bounds(1 - ws.newest)
		// dropRest describes damage at off: that record, what follows it
		// in the older segment, and the whole newer segment.
		dropRest := func(off int64, index int, following int, bytes int64) {
			v := countValid(r, nStart, nEnd, n.gen, n.salt, n.version, -1)
			ws.corrupt = &corruption{off: off, index: index, records: 1 + following + v.n, bytes: bytes + v.bytes}
		}
		if !o.ok || o.gen != n.prev || o.size != n.size || o.version != n.version || n.prevEnd < oStart || n.prevEnd > oEnd {
			// The segment whose records come first lost its header.
			dropRest(oBase, 0, 0, 0)
			ws.corrupt.records--
			return ws, nil
		}
		res, err := scanRecords(r, oStart, n.prevEnd, o.gen, o.salt, opts, fn)
		ws.records, ws.bytes, ws.notes = res.records, res.bytes, res.notes
		if err != nil {
			return ws, err
		}
		if c := res.corrupt; c != nil {
			dropRest(c.off, c.index, c.records-1, c.bytes)
			return ws, nil
		}
		if c := res.cut; c != nil {
			// The older segment was synced whole: nothing there is an
			// unsynced tail.
			dropRest(c.off, c.index, c.records-1, c.bytes)
			return ws, nil
		}
		if res.tail != n.prevEnd {
			// The older segment was complete and synced before the newer
			// began: a record that does not check there is damage.
			dropRest(res.tail, res.records, 0, 0)
			return ws, nil
		}
	}
	res, err := scanRecords(r, nStart, nEnd, n.gen, n.salt, opts, fn)
	ws.records += res.records
	ws.bytes += res.bytes
	ws.tail, ws.corrupt, ws.cut = res.tail, res.corrupt, res.cut
	for _, c := range []*corruption{ws.corrupt, ws.cut} {
		if c != nil {
			c.index += ws.records - res.records
		}
	}
	for _, nt := range res.notes {
		nt.index += ws.records - res.records
		ws.notes = append(ws.notes, nt)
	}
	return ws, err
}

// segment is one of the log's two segments.
type segment struct {
	hdr, start, end int64  // header slots; records
	gen             uint64 // current generation (0: none)
	slot            int64  // slot of the current header; the next goes to the other
	last            uint64 // sequence number of its last record written since Open (0: none)
}

// wal is the open log file. Only the writer goroutine uses it after Start.
type wal struct {
	f     walFile
	path  string
	size  int64
	seg   [2]segment
	floor uint64 // new generations are above this (bbolt's applied position)
	cur   int    // segment being written
	chain uint32 // CRC of the last record written, or the salt
	tail  int64  // offset of the next record
	// durable is the offset up to which a completed fdatasync has made
	// the current segment's records durable (its start: none yet).
	durable int64
}

func newWAL(f walFile, path string, size int64) *wal {
	w := &wal{f: f, path: path, size: size}
	for i := range w.seg {
		w.seg[i].hdr, w.seg[i].start, w.seg[i].end = segBounds(size, i)
		w.seg[i].slot = 1
	}
	return w
}

// capacity is the largest record the log takes (segment 0 is the smaller).
func (w *wal) capacity() int64 { return w.seg[0].end - w.seg[0].start }

func (w *wal) gen() uint64 { return w.seg[w.cur].gen }

func (w *wal) sync() error {
	tail := w.tail
	if err := w.f.Sync(); err != nil {
		return err
	}
	w.durable = tail
	return nil
}

// begin starts a new generation in segment i, whose records come after
// those of generation prev (0: none) ending at prevEnd. The caller has
// made the segment's old records durable in bbolt. With durable, the
// header is fdatasynced before any record of the new generation is
// written.
func (w *wal) begin(i int, prev uint64, prevEnd int64, durable bool) error {
	sg := &w.seg[i]
	h := newHeader(max(w.seg[0].gen, w.seg[1].gen, w.floor)+1, prev, prevEnd, w.size)
	slot := 1 - sg.slot
	if _, err := w.f.WriteAt(h.encode(), sg.hdr+slot*walBlock); err != nil {
		return fmt.Errorf("write %s header: %w", w.path, err)
	}
	if durable {
		if err := w.sync(); err != nil {
			return fmt.Errorf("sync %s header: %w", w.path, err)
		}
	}
	sg.gen, sg.slot, sg.last = h.gen, slot, 0
	w.cur, w.chain, w.tail, w.durable = i, h.salt, sg.start, sg.start
	return nil
}

// reset starts a new generation with nothing before it: the caller has
// made every record durable in bbolt.
func (w *wal) reset(durable bool) error {
	if err := w.begin(w.cur, 0, 0, durable); err != nil {
		return err
	}
	w.seg[1-w.cur].last = 0
	return nil
}

// walOptions are openWAL's parameters.
type walOptions struct {
	path    string
	size    int64
	durable bool
	recover RecoverMode
	log     *slog.Logger
	wrap    func(walFile) walFile
	// applied is the log position bbolt has applied up to (zero: none
	// recorded): records at or before it are not applied again.
	applied walPos
	// apply makes payloads durable in bbolt, recording pos, the position
	// of the last one, in the same transaction.
	apply func(payloads [][]byte, pos walPos) error
}

// createWAL writes a zero-filled log of o.size bytes next to o.path whose
// segment 0 starts generation gen, then renames it to o.path. Writing the
// zeros (rather than fallocate) means later in-place writes change no
// metadata, so fdatasync has only the data to write.
func createWAL(o walOptions, gen uint64) (*wal, error) {
	tmp := o.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", tmp, err)
	}
	fail := func(err error) (*wal, error) {
		f.Close()
		os.Remove(tmp)
		return nil, err
	}
	zero := make([]byte, min(1<<20, o.size))
	for off := int64(0); off < o.size; off += int64(len(zero)) {
		chunk := zero
		if rest := o.size - off; rest < int64(len(chunk)) {
			chunk = chunk[:rest]
		}
		if _, err := f.WriteAt(chunk, off); err != nil {
			return fail(fmt.Errorf("preallocate %s: %w", tmp, err))
		}
	}
	w := newWAL(osWALFile{f}, tmp, o.size)
	gen = max(gen, o.applied.gen+1)
	w.seg[0].gen = gen - 1 // begin numbers from the highest generation
	if err := w.begin(0, 0, 0, false); err != nil {
		return fail(err)
	}
	if o.durable {
		if err := f.Sync(); err != nil {
			return fail(fmt.Errorf("sync %s: %w", tmp, err))
		}
	}
	if err := os.Rename(tmp, o.path); err != nil {
		return fail(fmt.Errorf("rename %s: %w", tmp, err))
	}
	if o.durable {
		if err := syncDir(filepath.Dir(o.path)); err != nil {
			f.Close()
			return nil, err
		}
	}
	w.f, w.path = o.wrap(w.f), o.path
	return w, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// openWAL opens the log at o.path, replays its records through o.apply,
// and starts a new generation with nothing before it. A missing file is
// created; a log of another size or version is replaced once replayed. It
// logs a summary of the replay and returns it.
func openWAL(o walOptions) (*wal, ReplayStats, error) {
	began := time.Now()
	var rs ReplayStats
	f, err := os.OpenFile(o.path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		w, err := createWAL(o, 1)
		if err == nil {
			rs.Duration = time.Since(began)
			o.log.Info("replayed write-ahead log", "path", o.path, "records", 0, "bytes", 0, "skipped", 0, "duration", rs.Duration, "created", true)
		}
		return w, rs, err
	}
	if err != nil {
		return nil, rs, fmt.Errorf("open %s: %w", o.path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, rs, fmt.Errorf("stat %s: %w", o.path, err)
	}
	ws, rs, err := replayLog(f, st.Size(), o)
	if err != nil {
		f.Close()
		return nil, rs, err
	}
	rs.Duration = time.Since(began)
	o.log.Info("replayed write-ahead log", "path", o.path, "records", rs.Records, "bytes", rs.Bytes,
		"skipped", rs.Skipped, "skipped_bytes", rs.SkippedBytes, "duration", rs.Duration)
	if st.Size() != o.size || ws.version != walVersion || ws.size != o.size {
		// Every record is in bbolt now, so the log can be replaced.
		f.Close()
		w, err := createWAL(o, ws.maxGen+1)
		return w, rs, err
	}
	// Read both segments once, so that the first writes to each page do
	// not wait for the disk to read it.
	if _, err := io.Copy(io.Discard, io.NewSectionReader(f, walDataStart, o.size-walDataStart)); err != nil {
		f.Close()
		return nil, rs, fmt.Errorf("read %s: %w", o.path, err)
	}
	w := newWAL(o.wrap(osWALFile{f}), o.path, o.size)
	w.floor = o.applied.gen
	for i, h := range ws.segs {
		if h.ok {
			w.seg[i].gen, w.seg[i].slot = h.gen, h.slot
		}
	}
	w.cur = 0
	if err := w.reset(o.durable); err != nil {
		w.f.Close()
		return nil, rs, err
	}
	return w, rs, nil
}

// replayLog scans the log in r (size bytes) and applies the records to
// replay through o.apply, in transactions of about replayTxBytes. Records
// at or before o.applied are in bbolt already: their checksums are checked
// (the chain runs through them, and damage there is still damage) but
// they are neither decoded nor applied. Damage is an error wrapping
// ErrCorruptLog, or with RecoverTruncate is dropped and logged.
func replayLog(r io.ReaderAt, size int64, o walOptions) (walScan, ReplayStats, error) {
	var rs ReplayStats
	var (
		pending [][]byte
		bytes   int
		last    walPos
	)
	flush := func() error {
		if len(pending) == 0 {
			return nil
		}
		err := o.apply(pending, last)
		pending, bytes = nil, 0
		return err
	}
	ws, err := scanWALPos(r, size, o.applied, func(p []byte, pos walPos) error {
		if o.applied.covers(pos) {
			rs.Skipped++
			rs.SkippedBytes += int64(len(p))
			return nil
		}
		if err := checkOps(p); err != nil {
			return err
		}
		pending = append(pending, p)
		bytes += len(p)
		last = pos
		rs.Records++
		rs.Bytes += int64(len(p))
		if bytes >= replayTxBytes {
			return flush()
		}
		return nil
	})
	for _, nt := range ws.notes {
		if nt.crcField {
			o.log.Warn("write-ahead log record with a damaged CRC field: its payload checks against the next record, replayed", "path", o.path, "offset", nt.off, "record", nt.index)
		} else {
			o.log.Warn("damaged write-ahead log record that bbolt already holds: skipped, later records replayed", "path", o.path, "offset", nt.off, "record", nt.index)
		}
	}
	if c := ws.cut; c != nil {
		o.log.Warn("cut a torn unsynced write-ahead log tail", "path", o.path, "offset", c.off,
			"records", c.records, "bytes", c.bytes)
	}
	if err == nil && ws.corrupt != nil {
		c := ws.corrupt
		if o.recover != RecoverTruncate {
			err = fmt.Errorf("record %d at byte offset %d does not check and %d valid records follow it: %w", c.index, c.off, c.records-1, ErrCorruptLog)
		} else {
			rs.DroppedRecords, rs.DroppedBytes = c.records, c.bytes
			o.log.Warn("dropped corrupt write-ahead log records", "path", o.path, "offset", c.off,
				"records", c.records, "bytes", c.bytes)
		}
	}
	if err == nil {
		err = flush()
	}
	if err != nil {
		if errors.Is(err, errNoWALHeader) {
			return ws, rs, fmt.Errorf("replay %s: %w (the file is damaged; moving it away opens the store without its unapplied records)", o.path, err)
		}
		return ws, rs, fmt.Errorf("replay %s: %w", o.path, err)
	}
	return ws, rs, nil
}
