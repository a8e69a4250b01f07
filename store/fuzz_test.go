package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"testing"
)

// memWALFile is a log file in memory.
type memWALFile struct{ b []byte }

func (m *memWALFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memWALFile) WriteAt(p []byte, off int64) (int, error) {
	return copy(m.b[off:], p), nil
}

func (m *memWALFile) Sync() error  { return nil }
func (m *memWALFile) Close() error { return nil }

// fuzzGroups is the fixed history the fuzz seeds are written with. It is
// short: the fuzzer minimizes inputs.
func fuzzGroups() [][]Op {
	var groups [][]Op
	for i := uint64(1); i <= 6; i++ {
		g := []Op{put("a", i, fmt.Sprint(i))}
		if i%2 == 0 {
			g = append(g, del("a", i-1), put("b", i, ""))
		}
		if i%3 == 0 {
			g = append(g, putMeta("seq", fmt.Sprint(i)))
		}
		if i == 5 {
			g = append(g, Op{Kind: OpDeleteBucket, Bucket: "b"})
		}
		groups = append(groups, g)
	}
	return groups
}

// fuzzLog writes the fuzz history into an in-memory log of size bytes the
// way the writer does (every group synced but the fifth): a generation in segment 0, then, from group
// switchAt on (if > 0), a new generation in segment 1 after it, whose
// header says segment 0's records end at prevEnd.
func fuzzLog(size int64, switchAt int) (file []byte, w *wal, prevEnd int64) {
	f := &memWALFile{b: make([]byte, size)}
	w = newWAL(f, "fuzz.wal", size)
	w.seg[0].gen = 2
	if err := w.begin(0, 0, 0, false); err != nil {
		panic(err)
	}
	for i, g := range fuzzGroups() {
		if i == switchAt && switchAt > 0 {
			prevEnd = w.tail
			if err := w.begin(1, w.gen(), w.tail, false); err != nil {
				panic(err)
			}
		}
		enc := encoder{buf: make([]byte, recHeaderLen)}
		for j := range g {
			enc.append(&g[j])
		}
		w.chain = sealRecord(enc.buf, w.gen(), w.chain, w.durable)
		w.tail += int64(copy(f.b[w.tail:], enc.buf))
		if i != 4 {
			// Every group but the fifth is synced at once: the records
			// after it say so.
			if err := w.sync(); err != nil {
				panic(err)
			}
		}
	}
	return f.b, w, prevEnd
}

// fuzzWALSize is the size of the fuzzed log: the smallest the store
// takes, two segments of 8 KiB.
const fuzzWALSize = minWALSize

// fuzzWALFile turns a fuzz input into a log of fuzzWALSize bytes. The
// input is mostly the file itself, shortened, which keeps the fuzzer's
// inputs small: a mode byte ('T': replay with RecoverTruncate), the bytes
// of the four header slots, a u16 n, then n bytes of segment 0's records
// and the rest for segment 1's.
func fuzzWALFile(in []byte) (file []byte, mode RecoverMode) {
	mode = RecoverRefuse
	if len(in) > 0 && in[0] == 'T' {
		mode = RecoverTruncate
	}
	if len(in) > 0 {
		in = in[1:]
	}
	file = make([]byte, fuzzWALSize)
	for i := int64(0); i < 4; i++ {
		in = in[copy(file[i*walBlock:i*walBlock+walHeaderLen], in):]
	}
	n := 0
	if len(in) >= 2 {
		n = int(binary.LittleEndian.Uint16(in))
		in = in[2:]
	}
	n = min(n, len(in))
	_, s0, e0 := segBounds(fuzzWALSize, 0)
	_, s1, e1 := segBounds(fuzzWALSize, 1)
	copy(file[s0:e0], in[:n])
	copy(file[s1:e1], in[n:])
	return file, mode
}

// compactWAL is the inverse of fuzzWALFile for a log whose segments hold
// n0 and n1 bytes of records.
func compactWAL(mode byte, file []byte, n0, n1 int) []byte {
	out := []byte{mode}
	for i := int64(0); i < 4; i++ {
		out = append(out, file[i*walBlock:i*walBlock+walHeaderLen]...)
	}
	out = binary.LittleEndian.AppendUint16(out, uint16(n0))
	_, s0, _ := segBounds(fuzzWALSize, 0)
	_, s1, _ := segBounds(fuzzWALSize, 1)
	out = append(out, file[s0:s0+int64(n0)]...)
	return append(out, file[s1:s1+int64(n1)]...)
}

// applyToModel applies a payload to m as the applier applies it to bbolt.
func applyToModel(m *model, p []byte) error {
	return decodeOps(p, func(r *rawOp) error {
		op := Op{Kind: r.kind, Bucket: string(r.bucket), Key: r.key, Name: string(r.name), Value: append([]byte(nil), r.value...)}
		m.apply([]Op{op})
		return nil
	})
}

// FuzzWALReplay replays arbitrary bytes as a log (the replay Open runs,
// into a model instead of bbolt, so that each input costs microseconds).
// It must not panic, and if it succeeds the result must be the state after
// some prefix of the history the seeds were written with: a record is
// only accepted with its chained checksum, and a segment only after the
// one its header names. Damage with RecoverRefuse is ErrCorruptLog.
func FuzzWALReplay(f *testing.F) {
	var states []*model
	m := newModel()
	states = append(states, m.clone())
	for _, g := range fuzzGroups() {
		m.apply(g)
		states = append(states, m.clone())
	}
	for _, switchAt := range []int{0, 3} {
		file, w, prevEnd := fuzzLog(fuzzWALSize, switchAt)
		_, s0, _ := segBounds(fuzzWALSize, 0)
		_, s1, _ := segBounds(fuzzWALSize, 1)
		n0, n1 := int(w.tail-s0), 0
		if switchAt > 0 {
			n0, n1 = int(prevEnd-s0), int(w.tail-s1)
		}
		compact := compactWAL('R', file, n0, n1)
		if rebuilt, _ := fuzzWALFile(compact); !bytes.Equal(rebuilt, file) {
			f.Fatal("fuzzWALFile does not rebuild the seed")
		}
		if got := fuzzReplay(f, file, RecoverRefuse); got == nil || diff(got, states[len(states)-1]) != "" {
			f.Fatalf("seed with switch at %d does not replay the history", switchAt)
		}
		f.Add(compact)
		f.Add(compactWAL('T', file, n0, n1))
		f.Add(compact[:len(compact)-7])
		f.Add(compact[:1+4*walHeaderLen])
		// Damage in the middle (a payload byte of the second record), and
		// a lost header of segment 0.
		damaged := bytes.Clone(file)
		damaged[s0+recHeaderLen+int64(binary.LittleEndian.Uint32(file[s0:]))+recHeaderLen+1] ^= 0x20
		f.Add(compactWAL('R', damaged, n0, n1))
		f.Add(compactWAL('T', damaged, n0, n1))
		// The fifth group, never synced, torn: cut with the sixth. Its
		// stored CRC field damaged: replayed.
		off5 := s0
		if switchAt > 0 {
			off5 = s1
		}
		for i := 0; i < 4-switchAt; i++ {
			off5 += recHeaderLen + int64(binary.LittleEndian.Uint32(file[off5:]))
		}
		damaged = bytes.Clone(file)
		damaged[off5+recHeaderLen] ^= 0x20
		f.Add(compactWAL('R', damaged, n0, n1))
		damaged = bytes.Clone(file)
		damaged[off5+4] ^= 0x20
		f.Add(compactWAL('R', damaged, n0, n1))
		damaged = bytes.Clone(file)
		copy(damaged[:2*walBlock], make([]byte, 2*walBlock))
		f.Add(compactWAL('T', damaged, n0, n1))
	}
	f.Add([]byte{})
	f.Add([]byte("R" + walMagic))
	f.Fuzz(func(t *testing.T, in []byte) {
		file, mode := fuzzWALFile(in)
		got := fuzzReplay(t, file, mode)
		if got == nil {
			return
		}
		for _, st := range states {
			if diff(got, st) == "" {
				return
			}
		}
		t.Fatalf("replay is no prefix of the history: %v", got)
	})
}

// fuzzReplay replays file into a model; nil if replay refused it.
func fuzzReplay(t testing.TB, file []byte, mode RecoverMode) *model {
	got := newModel()
	_, _, err := replayLog(bytes.NewReader(file), int64(len(file)), walOptions{
		path:    "fuzz.wal",
		size:    fuzzWALSize,
		recover: mode,
		log:     slog.New(slog.DiscardHandler),
		apply: func(payloads [][]byte, _ walPos) error {
			for _, p := range payloads {
				if err := applyToModel(got, p); err != nil {
					return err
				}
			}
			return nil
		},
	})
	if err != nil {
		if mode == RecoverTruncate && errors.Is(err, ErrCorruptLog) {
			t.Fatalf("RecoverTruncate replay failed with %v", err)
		}
		return nil
	}
	return got
}
