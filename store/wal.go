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

// The write-ahead log is one preallocated file, overwritten in place:
//
//	block 0 (4 KiB)  header slot for even generations
//	block 1 (4 KiB)  header slot for odd generations
//	8 KiB ...        records of the current generation, back to back
//
// A header slot is magic, version, generation, salt and a CRC-32C of those.
// The valid slot with the higher generation is current; writing the new
// generation into the other slot means a torn header write leaves the old
// one intact.
//
// A record is {length u32, crc u32, generation u64} and length bytes of
// payload (the encoded ops of one group commit). The CRC-32C covers length,
// generation and payload and is chained: it starts from the previous
// record's CRC, or from the generation's random salt for the first record.
// A record is therefore only valid at its own place in its own generation:
// stale bytes past the tail (older generations, or any bytes a client put in
// a message body) are never mistaken for records, short of a 2^-32 chance.
//
// Replay reads records from 8 KiB while they are valid and stops at the first
// invalid one: the torn write of a group that was never acknowledged, or the
// tail of the generation.

const (
	walMagic      = "BRKDWAL1"
	walVersion    = 1
	walBlock      = 4096
	walDataStart  = 2 * walBlock
	walHeaderLen  = 28
	recHeaderLen  = 16
	minWALSize    = 32 << 10
	maxWALSize    = 1 << 30
	replayTxBytes = 16 << 20 // payload bytes per bbolt transaction during replay
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var errNoWALHeader = errors.New("no valid header")

type walHeader struct {
	gen  uint64
	salt uint32
}

func (h walHeader) encode() []byte {
	b := make([]byte, walHeaderLen)
	copy(b, walMagic)
	binary.LittleEndian.PutUint32(b[8:], walVersion)
	binary.LittleEndian.PutUint64(b[12:], h.gen)
	binary.LittleEndian.PutUint32(b[20:], h.salt)
	binary.LittleEndian.PutUint32(b[24:], crc32.Checksum(b[:24], castagnoli))
	return b
}

func decodeWALHeader(b []byte) (walHeader, bool) {
	if len(b) < walHeaderLen || string(b[:8]) != walMagic ||
		binary.LittleEndian.Uint32(b[8:]) != walVersion ||
		binary.LittleEndian.Uint32(b[24:]) != crc32.Checksum(b[:24], castagnoli) {
		return walHeader{}, false
	}
	h := walHeader{gen: binary.LittleEndian.Uint64(b[12:]), salt: binary.LittleEndian.Uint32(b[20:])}
	return h, h.gen != 0
}

func headerSlot(gen uint64) int64 { return int64(gen%2) * walBlock }

func newHeader(gen uint64) walHeader { return walHeader{gen: gen, salt: rand.Uint32()} }

// sealRecord fills the header of rec (recHeaderLen bytes, then the payload)
// and returns its CRC, the chain value for the next record.
func sealRecord(rec []byte, gen uint64, prev uint32) uint32 {
	binary.LittleEndian.PutUint32(rec[0:], uint32(len(rec)-recHeaderLen))
	binary.LittleEndian.PutUint64(rec[8:], gen)
	crc := recordCRC(prev, rec[:recHeaderLen], rec[recHeaderLen:])
	binary.LittleEndian.PutUint32(rec[4:], crc)
	return crc
}

func recordCRC(prev uint32, hdr, payload []byte) uint32 {
	crc := crc32.Update(prev, castagnoli, hdr[0:4])
	crc = crc32.Update(crc, castagnoli, hdr[8:16])
	return crc32.Update(crc, castagnoli, payload)
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

// ReplayStats is what Open replayed from the write-ahead log.
type ReplayStats struct {
	Records  int           // records applied to bbolt
	Bytes    int64         // their payload bytes
	Duration time.Duration // reading and applying them
	// DroppedRecords and DroppedBytes are the records (and their payload
	// bytes) found valid after a corrupt one and dropped under
	// RecoverTruncate, the corrupt one included.
	DroppedRecords int
	DroppedBytes   int64
}

// corruption describes a record in the middle of a generation that fails
// its checksum while the record after it checks.
type corruption struct {
	off     int64 // byte offset of the bad record
	index   int   // its index in the generation
	records int   // records dropped with it (itself included)
	bytes   int64 // their payload bytes
}

// scanResult is what scanRecords found.
type scanResult struct {
	records int
	bytes   int64
	tail    int64       // offset just past the last valid record
	corrupt *corruption // nil for a clean or torn end
}

// scanRecords calls fn with the payload of every valid record of
// generation gen in r between start and end, in order. Each payload is a
// fresh slice that fn may keep. It stops at the first record that does not
// check. That is the end of the generation or a torn write, unless the
// record's header is intact (its length fits and it names gen) and the
// record after it checks when chained from the bad record's stored CRC:
// then it is corruption, described in the result (the caller decides).
func scanRecords(r io.ReaderAt, start, end int64, gen uint64, chain uint32, fn func(payload []byte) error) (scanResult, error) {
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
		length := int64(binary.LittleEndian.Uint32(rh[0:]))
		if length == 0 || length > end-off-recHeaderLen || binary.LittleEndian.Uint64(rh[8:]) != gen {
			break
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(br, payload); err != nil {
			return res, fmt.Errorf("read record at %d: %w", off, err)
		}
		stored := binary.LittleEndian.Uint32(rh[4:])
		crc := recordCRC(chain, rh[:], payload)
		if crc != stored {
			next := off + recHeaderLen + length
			if n, _ := countValid(r, next, end, gen, stored, 1); n > 0 {
				n, b := countValid(r, next, end, gen, stored, -1)
				res.corrupt = &corruption{off: off, index: res.records, records: n + 1, bytes: b + length}
			}
			break
		}
		if err := fn(payload); err != nil {
			return res, fmt.Errorf("record %d at %d: %w", res.records, off, err)
		}
		chain = crc
		res.records++
		res.bytes += length
		off += recHeaderLen + length
		res.tail = off
	}
	return res, nil
}

// countValid counts the valid records of generation gen from off, chained
// from chain, up to max of them (max < 0: all), and their payload bytes.
func countValid(r io.ReaderAt, off, end int64, gen uint64, chain uint32, max int) (int, int64) {
	n, bytes := 0, int64(0)
	var rh [recHeaderLen]byte
	for (max < 0 || n < max) && end-off >= recHeaderLen {
		if _, err := r.ReadAt(rh[:], off); err != nil {
			break
		}
		length := int64(binary.LittleEndian.Uint32(rh[0:]))
		if length == 0 || length > end-off-recHeaderLen || binary.LittleEndian.Uint64(rh[8:]) != gen {
			break
		}
		payload := make([]byte, length)
		if _, err := r.ReadAt(payload, off+recHeaderLen); err != nil {
			break
		}
		crc := recordCRC(chain, rh[:], payload)
		if crc != binary.LittleEndian.Uint32(rh[4:]) {
			break
		}
		chain = crc
		n++
		bytes += length
		off += recHeaderLen + length
	}
	return n, bytes
}

// readHeader returns the current (valid, highest) header of the two slots
// at base and base+walBlock.
func readHeader(r io.ReaderAt, size, base int64) (walHeader, error) {
	var hdr walHeader
	found := false
	for slot := int64(0); slot < 2; slot++ {
		if size < base+slot*walBlock+walHeaderLen {
			break
		}
		b := make([]byte, walHeaderLen)
		if _, err := r.ReadAt(b, base+slot*walBlock); err != nil {
			return walHeader{}, fmt.Errorf("read header: %w", err)
		}
		h, ok := decodeWALHeader(b)
		if ok && headerSlot(h.gen) == slot*walBlock && (!found || h.gen > hdr.gen) {
			hdr, found = h, true
		}
	}
	if !found {
		return walHeader{}, errNoWALHeader
	}
	return hdr, nil
}

// scanWAL reads the header of the WAL in r (size bytes) and calls fn with
// the payload of every valid record of the current generation, in order.
func scanWAL(r io.ReaderAt, size int64, fn func(payload []byte) error) (walHeader, scanResult, error) {
	hdr, err := readHeader(r, size, 0)
	if err != nil {
		return walHeader{}, scanResult{}, err
	}
	res, err := scanRecords(r, walDataStart, size, hdr.gen, hdr.salt, fn)
	return hdr, res, err
}

// wal is the open log file. Only the writer goroutine uses it after Start.
type wal struct {
	f     walFile
	path  string
	size  int64
	gen   uint64
	chain uint32
	tail  int64 // offset of the next record
}

func (w *wal) capacity() int64 { return w.size - walDataStart }

func (w *wal) sync() error { return w.f.Sync() }

// bump starts generation gen+1 with an empty log: the caller has made every
// record of the current generation durable in bbolt. With durable, the new
// header is fdatasynced before any record of the new generation is written.
func (w *wal) bump(durable bool) error {
	h := newHeader(w.gen + 1)
	if _, err := w.f.WriteAt(h.encode(), headerSlot(h.gen)); err != nil {
		return fmt.Errorf("write wal header: %w", err)
	}
	if durable {
		if err := w.sync(); err != nil {
			return fmt.Errorf("sync wal header: %w", err)
		}
	}
	w.gen, w.chain, w.tail = h.gen, h.salt, walDataStart
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
	// apply makes payloads durable in bbolt.
	apply func(payloads [][]byte) error
}

// createWAL writes a zero-filled log of size bytes whose header is
// generation gen next to path, then renames it to path. Writing the zeros
// (rather than fallocate) means later in-place writes change no metadata,
// so fdatasync has only the data to write.
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
	h := newHeader(gen)
	if _, err := f.WriteAt(h.encode(), headerSlot(gen)); err != nil {
		return fail(fmt.Errorf("write header %s: %w", tmp, err))
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
	return &wal{f: o.wrap(osWALFile{f}), path: o.path, size: o.size, gen: gen, chain: h.salt, tail: walDataStart}, nil
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
// and starts a new, empty generation. A missing file is created. It logs a
// summary of the replay and returns it.
func openWAL(o walOptions) (*wal, ReplayStats, error) {
	began := time.Now()
	var rs ReplayStats
	f, err := os.OpenFile(o.path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		w, err := createWAL(o, 1)
		if err == nil {
			rs.Duration = time.Since(began)
			o.log.Info("replayed write-ahead log", "path", o.path, "records", 0, "bytes", 0, "duration", rs.Duration, "created", true)
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
	var (
		pending [][]byte
		bytes   int
	)
	flush := func() error {
		if len(pending) == 0 {
			return nil
		}
		err := o.apply(pending)
		pending, bytes = nil, 0
		return err
	}
	hdr, res, err := scanWAL(f, st.Size(), func(p []byte) error {
		if err := checkOps(p); err != nil {
			return err
		}
		pending = append(pending, p)
		bytes += len(p)
		if bytes >= replayTxBytes {
			return flush()
		}
		return nil
	})
	if err == nil && res.corrupt != nil {
		c := res.corrupt
		if o.recover != RecoverTruncate {
			err = fmt.Errorf("record %d at byte offset %d fails its checksum and %d valid records follow it: %w", c.index, c.off, c.records-1, ErrCorruptLog)
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
		f.Close()
		if errors.Is(err, errNoWALHeader) {
			return nil, rs, fmt.Errorf("replay %s: %w (the file is damaged; moving it away opens the store without its unapplied records)", o.path, err)
		}
		return nil, rs, fmt.Errorf("replay %s: %w", o.path, err)
	}
	rs.Records, rs.Bytes, rs.Duration = res.records, res.bytes, time.Since(began)
	o.log.Info("replayed write-ahead log", "path", o.path, "records", rs.Records, "bytes", rs.Bytes, "duration", rs.Duration)
	if st.Size() != o.size {
		// Every record is in bbolt now, so the log can be replaced.
		f.Close()
		w, err := createWAL(o, hdr.gen+1)
		return w, rs, err
	}
	// Read the rest once, so that the first writes to each page after the
	// tail do not wait for the disk to read it.
	if _, err := io.Copy(io.Discard, io.NewSectionReader(f, res.tail, o.size-res.tail)); err != nil {
		f.Close()
		return nil, rs, fmt.Errorf("read %s: %w", o.path, err)
	}
	w := &wal{f: o.wrap(osWALFile{f}), path: o.path, size: o.size, gen: hdr.gen}
	if err := w.bump(o.durable); err != nil {
		w.f.Close()
		return nil, rs, fmt.Errorf("%s: %w", o.path, err)
	}
	return w, rs, nil
}
