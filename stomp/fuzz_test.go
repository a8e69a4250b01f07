package stomp

import (
	"bytes"
	"errors"
	"io"
	"slices"
	"testing"
	"testing/iotest"

	"github.com/go-stomp/stomp/v3/frame"
)

// FuzzFrameReader feeds arbitrary bytes to frameReader with small limits and
// checks that it never panics; that every frame it returns is within the
// limits (the wire size exactly, the rest from the decoded frame); that a
// one-byte-at-a-time reader gives identical results and a reader with
// default limits identical results up to the first limit error; and that a
// 1.2 frame survives a frameWriter/frameReader round trip.
func FuzzFrameReader(f *testing.F) {
	seeds := []string{
		"",
		"\n",
		"\r\n\n",
		"CONNECT\naccept-version:1.0,1.1,1.2\nhost:/\nlogin:u\npasscode:p\\x\n\n\x00",
		"STOMP\r\naccept-version:1.2\r\nheart-beat:0,1000\r\n\r\n\x00",
		"CONNECTED\nversion:1.2\nserver:b\\n\n\n\x00",
		"SEND\ndestination:/queue/a\n\nhello\x00\n",
		"SEND\ndestination:/q\ncontent-length:5\n\n\x00\x01\x00\x02\x00\x00",
		"SEND\ncontent-length:3\ncontent-length:5\n\nabc\x00",
		"SEND\ncontent-length:007\n\n1234567\x00",
		"SUBSCRIBE\nid:0\ndestination:/topic/t\nack:client-individual\n\n\x00",
		"UNSUBSCRIBE\nid:0\n\n\x00ACK\nid:1\n\n\x00NACK\nid:2\n\n\x00",
		"BEGIN\ntransaction:t\n\n\x00COMMIT\ntransaction:t\n\n\x00ABORT\ntransaction:t\n\n\x00",
		"DISCONNECT\nreceipt:77\n\n\x00",
		"MESSAGE\nk\\r\\n\\c\\\\:\\r\\n\\c\\\\x\nfoo:1\nfoo:2\n\n\x00",
		"RECEIPT\nreceipt-id:1\n\n\x00ERROR\nmessage:bad\\c x\n\nbody\x00",
		"SEND\nfoo:a\rb\nbar:c\r\r\nurl:http://x:80/\nempty:\n\n\x00",
		// Invalid frames.
		"FOO\n\n\x00",
		"send\n\n\x00",
		"SEND\nfoo\n\n\x00",
		"SEND\n:bar\n\n\x00",
		"SEND\nfoo:a\\tb\n\n\x00",
		"SEND\nfoo:abc\\\n\n\x00",
		"SEND\ncontent-length:-1\n\n\x00",
		"SEND\ncontent-length:99999999999999999999999\n\n",
		"SEND\ncontent-length:3\n\nabcd\x00",
		"SEND\ncontent-length:3\n\nab",
		"SEND\n\n" + string(bytes.Repeat([]byte("b"), 100)) + "\x00",
		"SEND\n" + string(bytes.Repeat([]byte("k"), 40)) + ":v\n\n\x00",
		"SEND\na:1\nb:2\nc:3\nd:4\ne:5\n\n\x00",
	}
	for _, s := range seeds {
		for _, knobs := range []uint32{0, 1, 2, 0xffffffff, 0x12345678} {
			f.Add([]byte(s), knobs)
		}
	}

	f.Fuzz(func(t *testing.T, data []byte, knobs uint32) {
		// knobs picks the version and small limits, so that fuzzed inputs
		// hit them, and hit them exactly.
		version := [...]string{"1.0", "1.1", "1.2"}[knobs%3]
		lim := fioFuzzLimits(knobs)
		src := bytes.NewReader(data)
		plain := newFrameReader(src, lim)
		// consumed is the exact number of input bytes ReadFrame has used.
		consumed := func() int { return len(data) - src.Len() - plain.br.Buffered() }
		slow := newFrameReader(iotest.OneByteReader(bytes.NewReader(data)), lim)
		loose := newFrameReader(bytes.NewReader(data), DefaultLimits())
		for range 100 {
			before := consumed()
			fr, err := plain.ReadFrame(version)
			wire := consumed() - before

			// Splitting the input into one-byte reads changes nothing.
			fr2, err2 := slow.ReadFrame(version)
			fioSameResult(t, "one-byte reader", fr, err, fr2, err2)

			// Larger limits change nothing but limit errors.
			fr3, err3 := loose.ReadFrame(version)
			if fioLimitError(err) {
				if !fioKnownError(err) {
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			fioSameResult(t, "default-limits reader", fr, err, fr3, err3)

			if err != nil {
				if !fioKnownError(err) {
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			if fr == nil {
				if wire < 1 || wire > 2 {
					t.Fatalf("heart-beat consumed %d bytes", wire)
				}
				continue
			}
			if wire > lim.MaxFrameSize {
				t.Fatalf("%d-byte frame accepted, limit %d", wire, lim.MaxFrameSize)
			}
			fioCheckLimits(t, fr, lim)
			if version == "1.2" && fioEscapeFor(version, fr.Command) == fioEsc12 {
				fioCheckRoundTrip(t, fr)
			}
		}
	})
}

// fioFuzzLimits derives small limits from the fuzzer's knobs.
func fioFuzzLimits(knobs uint32) Limits {
	return Limits{
		MaxFrameSize:     16 + int(knobs>>2&0xff), // 16..271
		MaxBodySize:      1 + int(knobs>>10&0x7f), // 1..128
		MaxHeaderLineLen: 8 + int(knobs>>17&0x3f), // 8..71
		MaxHeaderCount:   1 + int(knobs>>23&0x7),  // 1..8
	}
}

// fioSameResult fails unless two ReadFrame results are identical.
func fioSameResult(t *testing.T, what string, f1 *frame.Frame, err1 error, f2 *frame.Frame, err2 error) {
	t.Helper()
	if (err1 == nil) != (err2 == nil) || (err1 != nil && err1.Error() != err2.Error()) {
		t.Fatalf("error %v, %s error %v", err1, what, err2)
	}
	if (f1 == nil) != (f2 == nil) {
		t.Fatalf("frame %v, %s frame %v", f1, what, f2)
	}
	if f1 != nil && (f1.Command != f2.Command || !slices.Equal(fioPairs(f1.Header), fioPairs(f2.Header)) || !bytes.Equal(f1.Body, f2.Body)) {
		t.Fatalf("frame %q %q %q, %s frame %q %q %q",
			f1.Command, fioPairs(f1.Header), f1.Body, what, f2.Command, fioPairs(f2.Header), f2.Body)
	}
}

// fioLimitError reports whether err is a Limits violation.
func fioLimitError(err error) bool {
	return errors.Is(err, ErrFrameTooLarge) || errors.Is(err, ErrBodyTooLarge) ||
		errors.Is(err, ErrTooManyHeaders) || errors.Is(err, ErrHeaderTooLong)
}

// fioKnownError reports whether err is an end of input or a frame error.
func fioKnownError(err error) bool {
	if err == io.EOF {
		return true
	}
	for _, target := range []error{
		io.ErrUnexpectedEOF, ErrFrameTooLarge, ErrBodyTooLarge, ErrTooManyHeaders,
		ErrHeaderTooLong, ErrBadEscape, ErrMalformedFrame, ErrUnknownCommand, ErrBadContentLength,
	} {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}

// fioCheckLimits checks that a frame read with lim is within lim. Unescaping
// only shrinks header lines, so decoded sizes bound the wire sizes from below.
func fioCheckLimits(t *testing.T, f *frame.Frame, lim Limits) {
	t.Helper()
	if !fioIsCommand(f.Command) {
		t.Fatalf("unknown command %q returned", f.Command)
	}
	if f.Header.Len() > lim.MaxHeaderCount {
		t.Fatalf("%d headers, limit %d", f.Header.Len(), lim.MaxHeaderCount)
	}
	if len(f.Body) > lim.MaxBodySize {
		t.Fatalf("%d-byte body, limit %d", len(f.Body), lim.MaxBodySize)
	}
	size := len(f.Command) + 1 + 1 + len(f.Body) + 1
	for i := 0; i < f.Header.Len(); i++ {
		k, v := f.Header.GetAt(i)
		if k == "" {
			t.Fatalf("empty header name returned")
		}
		if n := len(k) + 1 + len(v); n > lim.MaxHeaderLineLen {
			t.Fatalf("%d-byte header line, limit %d", n, lim.MaxHeaderLineLen)
		}
		size += len(k) + 1 + len(v) + 1
	}
	if size > lim.MaxFrameSize {
		t.Fatalf("%d-byte frame, limit %d", size, lim.MaxFrameSize)
	}
	if s, ok := f.Header.Contains(frame.ContentLength); ok {
		if n, ok := fioParseContentLength(s); !ok || n != len(f.Body) {
			t.Fatalf("content-length %q with a %d-byte body", s, len(f.Body))
		}
	}
}

// fioCheckRoundTrip writes f as STOMP 1.2 and reads it back.
func fioCheckRoundTrip(t *testing.T, f *frame.Frame) {
	t.Helper()
	var buf bytes.Buffer
	w := newFrameWriter(&buf)
	if err := w.WriteFrame(f, "1.2"); err != nil {
		t.Fatalf("WriteFrame(%q %q %q): %v", f.Command, fioPairs(f.Header), f.Body, err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	written := buf.String()
	r := newFrameReader(&buf, DefaultLimits())
	got, err := r.ReadFrame("1.2")
	if err != nil || got == nil {
		t.Fatalf("reading back %q: %v %v", written, got, err)
	}
	want := fioExpectRead(f)
	if got.Command != want.cmd || !slices.Equal(fioPairs(got.Header), want.hdr) || string(got.Body) != want.body {
		t.Fatalf("round trip of %q: got %q %q %q, want %q %q %q",
			written, got.Command, fioPairs(got.Header), got.Body, want.cmd, want.hdr, want.body)
	}
	if _, err := r.ReadFrame("1.2"); err != io.EOF {
		t.Fatalf("round trip of %q: trailing data: %v", written, err)
	}
}
