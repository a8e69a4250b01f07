package store

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
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

// scanWAL reads the header of the WAL in r (size bytes) and calls fn with
// the payload of every valid record of the current generation, in order.
// Each payload is a fresh slice that fn may keep. It returns the header, the
// number of records and the offset just past the last valid one.
func scanWAL(r io.ReaderAt, size int64, fn func(payload []byte) error) (walHeader, int, int64, error) {
	var hdr walHeader
	found := false
	for slot := int64(0); slot < 2; slot++ {
		if size < slot*walBlock+walHeaderLen {
			break
		}
		b := make([]byte, walHeaderLen)
		if _, err := r.ReadAt(b, slot*walBlock); err != nil {
			return walHeader{}, 0, 0, fmt.Errorf("read header: %w", err)
		}
		h, ok := decodeWALHeader(b)
		if ok && headerSlot(h.gen) == slot*walBlock && (!found || h.gen > hdr.gen) {
			hdr, found = h, true
		}
	}
	if !found {
		return walHeader{}, 0, 0, errNoWALHeader
	}
	if size <= walDataStart {
		return hdr, 0, walDataStart, nil
	}
	br := bufio.NewReaderSize(io.NewSectionReader(r, walDataStart, size-walDataStart), int(min(1<<20, size-walDataStart)))
	off := int64(walDataStart)
	chain := hdr.salt
	n := 0
	var rh [recHeaderLen]byte
	for size-off >= recHeaderLen {
		if _, err := io.ReadFull(br, rh[:]); err != nil {
			return hdr, n, off, fmt.Errorf("read record at %d: %w", off, err)
		}
		length := int64(binary.LittleEndian.Uint32(rh[0:]))
		if length == 0 || length > size-off-recHeaderLen || binary.LittleEndian.Uint64(rh[8:]) != hdr.gen {
			break
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(br, payload); err != nil {
			return hdr, n, off, fmt.Errorf("read record at %d: %w", off, err)
		}
		crc := recordCRC(chain, rh[:], payload)
		if crc != binary.LittleEndian.Uint32(rh[4:]) {
			break
		}
		if err := fn(payload); err != nil {
			return hdr, n, off, fmt.Errorf("record %d at %d: %w", n, off, err)
		}
		chain = crc
		n++
		off += recHeaderLen + length
	}
	return hdr, n, off, nil
}

// wal is the open log file. Only the writer goroutine uses it after Start,
// except sync, which the applier and the sync loop may call too.
type wal struct {
	f     *os.File
	path  string
	size  int64
	gen   uint64
	chain uint32
	tail  int64 // offset of the next record
}

func (w *wal) capacity() int64 { return w.size - walDataStart }

func (w *wal) sync() error { return fdatasync(w.f) }

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

// createWAL writes a zero-filled log of size bytes whose header is
// generation gen next to path, then renames it to path. Writing the zeros
// (rather than fallocate) means later in-place writes change no metadata,
// so fdatasync has only the data to write.
func createWAL(path string, size int64, gen uint64, durable bool) (*wal, error) {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", tmp, err)
	}
	fail := func(err error) (*wal, error) {
		f.Close()
		os.Remove(tmp)
		return nil, err
	}
	zero := make([]byte, min(1<<20, size))
	for off := int64(0); off < size; off += int64(len(zero)) {
		chunk := zero
		if rest := size - off; rest < int64(len(chunk)) {
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
	if durable {
		if err := f.Sync(); err != nil {
			return fail(fmt.Errorf("sync %s: %w", tmp, err))
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("rename %s: %w", tmp, err))
	}
	if durable {
		if err := syncDir(filepath.Dir(path)); err != nil {
			f.Close()
			return nil, err
		}
	}
	return &wal{f: f, path: path, size: size, gen: gen, chain: h.salt, tail: walDataStart}, nil
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

// openWAL opens the log at path, replays its records through apply (which
// must make them durable before it returns), and starts a new, empty
// generation. A missing file is created.
func openWAL(path string, size int64, durable bool, apply func(payloads [][]byte) error) (*wal, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return createWAL(path, size, 1, durable)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	var (
		pending [][]byte
		bytes   int
	)
	flush := func() error {
		if len(pending) == 0 {
			return nil
		}
		err := apply(pending)
		pending, bytes = nil, 0
		return err
	}
	hdr, _, end, err := scanWAL(f, st.Size(), func(p []byte) error {
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
	if err == nil {
		err = flush()
	}
	if err != nil {
		f.Close()
		if errors.Is(err, errNoWALHeader) {
			return nil, fmt.Errorf("replay %s: %w (the file is damaged; moving it away opens the store without its unapplied records)", path, err)
		}
		return nil, fmt.Errorf("replay %s: %w", path, err)
	}
	if st.Size() != size {
		// Every record is in bbolt now, so the log can be replaced.
		f.Close()
		return createWAL(path, size, hdr.gen+1, durable)
	}
	// Read the rest once, so that the first writes to each page after the
	// tail do not wait for the disk to read it.
	if _, err := io.Copy(io.Discard, io.NewSectionReader(f, end, size-end)); err != nil {
		f.Close()
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	w := &wal{f: f, path: path, size: size, gen: hdr.gen}
	if err := w.bump(durable); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return w, nil
}
