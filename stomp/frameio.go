package stomp

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/go-stomp/stomp/v3/frame"
)

// Limits bound what one client frame may make the server allocate.
//
// A zero or negative field means the corresponding DefaultLimits value.
type Limits struct {
	// MaxFrameSize bounds the whole frame as sent on the wire: command line,
	// header lines and the blank line (end-of-line octets included), body and
	// the terminating NUL. Heart-beat EOLs between frames are not counted.
	MaxFrameSize int
	// MaxHeaderCount bounds the number of header lines.
	MaxHeaderCount int
	// MaxHeaderLineLen bounds one header line (or the command line), in
	// bytes, before unescaping and excluding its LF or CRLF.
	MaxHeaderLineLen int
	// MaxBodySize bounds the body, in bytes.
	MaxBodySize int
}

// DefaultLimits returns safe defaults: an 8 MiB body plus 64 KiB of command
// and headers, 128 headers of at most 8 KiB each.
func DefaultLimits() Limits {
	return Limits{
		MaxFrameSize:     8<<20 + 64<<10,
		MaxHeaderCount:   128,
		MaxHeaderLineLen: 8192,
		MaxBodySize:      8 << 20,
	}
}

// fioNormalizeLimits replaces zero or negative fields by their defaults.
func fioNormalizeLimits(l Limits) Limits { return withDefaultLimits(l, DefaultLimits()) }

// withDefaultLimits replaces zero or negative fields of l by those of d.
func withDefaultLimits(l, d Limits) Limits {
	if l.MaxFrameSize <= 0 {
		l.MaxFrameSize = d.MaxFrameSize
	}
	if l.MaxHeaderCount <= 0 {
		l.MaxHeaderCount = d.MaxHeaderCount
	}
	if l.MaxHeaderLineLen <= 0 {
		l.MaxHeaderLineLen = d.MaxHeaderLineLen
	}
	if l.MaxBodySize <= 0 {
		l.MaxBodySize = d.MaxBodySize
	}
	return l
}

const (
	// fioMinReadBuffer is the smallest read buffer; the buffer is otherwise
	// sized to hold one maximal line plus CRLF.
	fioMinReadBuffer = 4096
	// fioWriteBuffer is the size of the frameWriter buffer.
	fioWriteBuffer = 8192
	// fioBodyChunk is the largest allocation made for a content-length body
	// before its bytes arrive: larger bodies grow as data is received, so a
	// client announcing a large body and stalling holds little memory.
	fioBodyChunk = 64 << 10
	// fioScratchKeep and fioScratchHeaders bound the header scratch space
	// kept between frames (bytes, and headers).
	fioScratchKeep    = 4096
	fioScratchHeaders = 64
	// fioMaxDetail bounds client-supplied text quoted in error details.
	fioMaxDetail = 64
)

// fioEscape is a header escaping scheme.
type fioEscape uint8

const (
	fioEscNone fioEscape = iota // STOMP 1.0, and CONNECT/STOMP/CONNECTED frames
	fioEsc11                    // \n \c \\
	fioEsc12                    // \r \n \c \\
)

// fioEscapeFor returns the escaping scheme for a frame with the given command
// in the given negotiated version. Versions other than "1.1" and "1.2" are
// treated as "1.0".
func fioEscapeFor(version, command string) fioEscape {
	switch command {
	case frame.CONNECT, frame.STOMP, frame.CONNECTED:
		return fioEscNone
	}
	switch version {
	case "1.1":
		return fioEsc11
	case "1.2":
		return fioEsc12
	}
	return fioEscNone
}

// fioCommand returns the command constant equal to line, without allocating.
func fioCommand(line []byte) (string, bool) {
	switch string(line) {
	case frame.CONNECT:
		return frame.CONNECT, true
	case frame.STOMP:
		return frame.STOMP, true
	case frame.SEND:
		return frame.SEND, true
	case frame.SUBSCRIBE:
		return frame.SUBSCRIBE, true
	case frame.UNSUBSCRIBE:
		return frame.UNSUBSCRIBE, true
	case frame.ACK:
		return frame.ACK, true
	case frame.NACK:
		return frame.NACK, true
	case frame.BEGIN:
		return frame.BEGIN, true
	case frame.COMMIT:
		return frame.COMMIT, true
	case frame.ABORT:
		return frame.ABORT, true
	case frame.DISCONNECT:
		return frame.DISCONNECT, true
	case frame.CONNECTED:
		return frame.CONNECTED, true
	case frame.MESSAGE:
		return frame.MESSAGE, true
	case frame.RECEIPT:
		return frame.RECEIPT, true
	case frame.ERROR:
		return frame.ERROR, true
	}
	return "", false
}

// fioIsCommand reports whether s is a STOMP command.
func fioIsCommand(s string) bool {
	switch s {
	case frame.CONNECT, frame.STOMP, frame.SEND, frame.SUBSCRIBE,
		frame.UNSUBSCRIBE, frame.ACK, frame.NACK, frame.BEGIN,
		frame.COMMIT, frame.ABORT, frame.DISCONNECT, frame.CONNECTED,
		frame.MESSAGE, frame.RECEIPT, frame.ERROR:
		return true
	}
	return false
}

// fioTrunc truncates client-supplied text quoted in an error detail.
func fioTrunc[T string | []byte](s T) T {
	if len(s) > fioMaxDetail {
		return s[:fioMaxDetail]
	}
	return s
}

// fioUnexpected turns io.EOF met inside a frame into io.ErrUnexpectedEOF.
func fioUnexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// fioParseContentLength parses a content-length value: one or more ASCII
// digits, nothing else. Values that do not fit are saturated, so the caller's
// limit check rejects them.
func fioParseContentLength[T string | []byte](b T) (int, bool) {
	if len(b) == 0 {
		return 0, false
	}
	const saturate = 1 << 62
	n := 0
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		if n < saturate {
			n = n*10 + int(c-'0')
		}
	}
	if n > saturate {
		n = saturate
	}
	return n, true
}

// fioUnescape appends src to dst, decoding header escapes according to mode.
// If src holds an undefined escape sequence (or ends with a lone backslash)
// it returns the offending sequence as bad.
func fioUnescape(dst, src []byte, mode fioEscape) (out, bad []byte) {
	if mode == fioEscNone {
		return append(dst, src...), nil
	}
	for {
		i := bytes.IndexByte(src, '\\')
		if i < 0 {
			return append(dst, src...), nil
		}
		dst = append(dst, src[:i]...)
		if i+1 == len(src) {
			return dst, src[i:]
		}
		var c byte
		switch src[i+1] {
		case 'n':
			c = '\n'
		case 'c':
			c = ':'
		case '\\':
			c = '\\'
		case 'r':
			if mode != fioEsc12 {
				return dst, src[i : i+2]
			}
			c = '\r'
		default:
			return dst, src[i : i+2]
		}
		dst = append(dst, c)
		src = src[i+2:]
	}
}

// frameReader reads client frames, enforcing Limits before allocating.
// It is not safe for concurrent use.
type frameReader struct {
	br  *bufio.Reader
	lim Limits

	// Scratch space reused across frames: the unescaped header bytes of
	// the current frame, the end offsets of each name and value in hbuf,
	// and the name/value strings handed to frame.NewHeader.
	hbuf []byte
	ends []int
	kv   []string
}

// newFrameReader returns a frameReader reading from r with the given limits
// (zero fields take their DefaultLimits value).
func newFrameReader(r io.Reader, lim Limits) *frameReader {
	lim = fioNormalizeLimits(lim)
	size := lim.MaxHeaderLineLen + 2 // room for a maximal line and its CRLF
	if size < fioMinReadBuffer {
		size = fioMinReadBuffer
	}
	return &frameReader{br: bufio.NewReaderSize(r, size), lim: lim}
}

// fioFrame lets a frame and its header share one allocation.
type fioFrame struct {
	f frame.Frame
	h frame.Header
}

// ReadFrame reads one frame. It returns (nil, nil) when it consumed a
// heart-beat (a bare EOL, LF or CRLF, between frames) so the caller can reset
// its read deadline.
//
// version is "1.0", "1.1" or "1.2" (the negotiated version; "1.0" before
// negotiation; anything else is treated as "1.0"). Header unescaping: none
// for 1.0, none for CONNECT/STOMP/CONNECTED frames in any version; 1.1: \n \c
// \\ ; 1.2: \r \n \c \\ ; any other backslash sequence (or a trailing lone
// backslash) gives ErrBadEscape.
//
// The returned frame's Header is never nil; its Body is nil when empty.
// Repeated headers are all kept, in order, so Header.Get returns the first
// one as STOMP requires; so does the content-length the body is read by.
//
// Protocol violations are reported with the errors of errors.go (possibly
// wrapped). I/O errors are returned as they are, except that io.EOF is
// returned exactly only at a frame boundary and becomes io.ErrUnexpectedEOF
// inside a frame. After any error the position in the stream is unspecified
// and the connection should be closed.
func (r *frameReader) ReadFrame(version string) (*frame.Frame, error) {
	line, n, err := r.readLine()
	if err != nil {
		return nil, err
	}
	if len(line) == 0 {
		return nil, nil // heart-beat
	}
	cmd, ok := fioCommand(line)
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrUnknownCommand, fioTrunc(line))
	}
	lim := &r.lim
	size := n
	mode := fioEscapeFor(version, cmd)
	hbuf := r.hbuf[:0]
	ends := r.ends[:0]
	contentLength := -1

	for {
		line, n, err = r.readLine()
		if err != nil {
			return nil, fioUnexpected(err)
		}
		size += n
		if size > lim.MaxFrameSize {
			return nil, r.limitError(ErrFrameTooLarge)
		}
		if len(line) == 0 {
			break
		}
		if len(ends)/2 >= lim.MaxHeaderCount {
			return nil, fmt.Errorf("%w: limit %d", ErrTooManyHeaders, lim.MaxHeaderCount)
		}
		colon := bytes.IndexByte(line, ':')
		if colon < 0 {
			return nil, fmt.Errorf("%w: missing colon in header %q", ErrMalformedFrame, fioTrunc(line))
		}
		if colon == 0 {
			return nil, fmt.Errorf("%w: empty header name", ErrMalformedFrame)
		}
		start := len(hbuf)
		var bad []byte
		if hbuf, bad = fioUnescape(hbuf, line[:colon], mode); bad != nil {
			return nil, fmt.Errorf("%w: %q in header name %q", ErrBadEscape, bad, fioTrunc(line[:colon]))
		}
		keyEnd := len(hbuf)
		if hbuf, bad = fioUnescape(hbuf, line[colon+1:], mode); bad != nil {
			return nil, fmt.Errorf("%w: %q in header %q", ErrBadEscape, bad, fioTrunc(hbuf[start:keyEnd]))
		}
		ends = append(ends, keyEnd, len(hbuf))
		if contentLength < 0 && string(hbuf[start:keyEnd]) == frame.ContentLength {
			v, ok := fioParseContentLength(hbuf[keyEnd:])
			if !ok {
				return nil, fmt.Errorf("%w: %q", ErrBadContentLength, fioTrunc(hbuf[keyEnd:]))
			}
			contentLength = v
		}
	}
	r.hbuf, r.ends = hbuf, ends // keep grown scratch space

	// Bytes the body may take without the frame exceeding MaxFrameSize,
	// keeping one for the terminating NUL.
	frameRoom := lim.MaxFrameSize - size - 1
	if frameRoom < 0 {
		return nil, r.limitError(ErrFrameTooLarge)
	}
	var body []byte
	if contentLength >= 0 {
		if contentLength > lim.MaxBodySize {
			return nil, r.limitError(ErrBodyTooLarge)
		}
		if contentLength > frameRoom {
			return nil, r.limitError(ErrFrameTooLarge)
		}
		body, err = r.readBodyN(contentLength)
	} else {
		body, err = r.readBodyNUL(frameRoom)
	}
	if err != nil {
		return nil, err
	}

	// Build the frame: one string holds every header name and value.
	ff := &fioFrame{}
	if len(ends) > 0 {
		hs := string(hbuf)
		kv := r.kv[:0]
		prev := 0
		for i := 0; i < len(ends); i += 2 {
			k, v := ends[i], ends[i+1]
			kv = append(kv, hs[prev:k], hs[k:v])
			prev = v
		}
		ff.h = *frame.NewHeader(kv...)
		clear(kv) // do not retain this frame's strings
		r.kv = kv[:0]
	}
	ff.f = frame.Frame{Command: cmd, Header: &ff.h, Body: body}

	if cap(r.hbuf) > fioScratchKeep {
		r.hbuf = nil
	}
	if cap(r.ends) > 2*fioScratchHeaders {
		r.ends = nil
	}
	if cap(r.kv) > 2*fioScratchHeaders {
		r.kv = nil
	}
	return &ff.f, nil
}

// readLine reads one line. It returns the line without its LF or CRLF (a
// slice of the read buffer, valid until the next read) and the number of
// bytes consumed. A clean io.EOF before any byte is returned as is.
func (r *frameReader) readLine() (line []byte, n int, err error) {
	raw, err := r.br.ReadSlice('\n')
	if err != nil {
		if err == bufio.ErrBufferFull {
			return nil, 0, fmt.Errorf("%w: limit %d bytes", ErrHeaderTooLong, r.lim.MaxHeaderLineLen)
		}
		if err == io.EOF && len(raw) > 0 {
			err = io.ErrUnexpectedEOF
		}
		return nil, 0, err
	}
	n = len(raw)
	line = raw[:n-1]
	if len(line) > 0 && line[len(line)-1] == '\r' {
		line = line[:len(line)-1]
	}
	if len(line) > r.lim.MaxHeaderLineLen {
		return nil, 0, fmt.Errorf("%w: limit %d bytes", ErrHeaderTooLong, r.lim.MaxHeaderLineLen)
	}
	return line, n, nil
}

// readBodyN reads an n-byte body (n already checked against the limits)
// and the NUL that must follow it. Memory grows with the bytes received, in
// steps of at most doubling, so a stalled client holds little.
func (r *frameReader) readBodyN(n int) ([]byte, error) {
	var body []byte
	if n > 0 {
		body = make([]byte, 0, min(n, fioBodyChunk))
		for {
			m, err := io.ReadFull(r.br, body[len(body):cap(body)])
			body = body[:len(body)+m]
			if err != nil {
				return nil, fioUnexpected(err)
			}
			if len(body) == n {
				break
			}
			grown := make([]byte, len(body), min(n, 2*cap(body)))
			copy(grown, body)
			body = grown
		}
	}
	c, err := r.br.ReadByte()
	if err != nil {
		return nil, fioUnexpected(err)
	}
	if c != 0 {
		return nil, fmt.Errorf("%w: missing NUL after %d-byte body", ErrMalformedFrame, n)
	}
	return body, nil
}

// readBodyNUL reads a body terminated by NUL and consumes the NUL. It fails
// as soon as the bytes received exceed MaxBodySize or frameRoom, without
// waiting for the NUL. The error names the limit the body crosses first, so
// it does not depend on how the input is split into reads.
func (r *frameReader) readBodyNUL(frameRoom int) ([]byte, error) {
	limit, limitErr := r.lim.MaxBodySize, ErrBodyTooLarge
	if frameRoom < limit {
		limit, limitErr = frameRoom, ErrFrameTooLarge
	}
	var body []byte
	for {
		avail := r.br.Buffered()
		if avail == 0 {
			if _, err := r.br.Peek(1); err != nil {
				return nil, fioUnexpected(err)
			}
			avail = r.br.Buffered()
		}
		buf, _ := r.br.Peek(avail) // buffered: no I/O, no error
		i := bytes.IndexByte(buf, 0)
		found := i >= 0
		if found {
			buf = buf[:i]
		}
		if len(body)+len(buf) > limit {
			return nil, r.limitError(limitErr)
		}
		if found && body == nil {
			if len(buf) > 0 {
				body = make([]byte, len(buf))
				copy(body, buf)
			}
		} else {
			body = append(body, buf...)
		}
		if found {
			_, _ = r.br.Discard(len(buf) + 1)
			return body, nil
		}
		_, _ = r.br.Discard(len(buf))
	}
}

// limitError returns ErrBodyTooLarge or ErrFrameTooLarge with the limit.
func (r *frameReader) limitError(err error) error {
	n := r.lim.MaxFrameSize
	if err == ErrBodyTooLarge {
		n = r.lim.MaxBodySize
	}
	return fmt.Errorf("%w: limit %d bytes", err, n)
}

// frameWriter encodes frames to a buffered writer. It is not safe for
// concurrent use.
type frameWriter struct {
	bw  *bufio.Writer
	num [20]byte
}

// newFrameWriter returns a frameWriter writing to w.
func newFrameWriter(w io.Writer) *frameWriter {
	return &frameWriter{bw: bufio.NewWriterSize(w, fioWriteBuffer)}
}

// WriteFrame encodes f for the given version without flushing. Escaping:
// none for 1.0 and for CONNECT, STOMP and CONNECTED frames; 1.1: \\ \n \c (a
// CR in a 1.1 value is written raw); 1.2: \\ \r \n \c. If f.Body is non-empty
// and f has no content-length header, a content-length header is added to
// the output (not to f), after f's headers.
//
// Nothing is written, and an error is returned, if f cannot be encoded
// faithfully: unknown command (ErrUnknownCommand), empty header name, or a
// header holding a LF (or a name holding a colon) when no escaping applies
// (ErrUnencodableFrame), or a first content-length header that differs from
// len(f.Body) (ErrBadContentLength). Repeated headers are written in order.
// Where \r is not escaped (1.0, 1.1, CONNECT/STOMP/CONNECTED), a value that
// ends with CR is read back without it, as the CR joins the line's LF.
func (w *frameWriter) WriteFrame(f *frame.Frame, version string) error {
	cmd := f.Command
	if !fioIsCommand(cmd) {
		return fmt.Errorf("%w: %q", ErrUnknownCommand, fioTrunc(cmd))
	}
	mode := fioEscapeFor(version, cmd)
	h := f.Header
	nh := 0
	if h != nil {
		nh = h.Len()
	}
	hasLength := false
	for i := 0; i < nh; i++ {
		k, v := h.GetAt(i)
		if k == "" {
			return fmt.Errorf("%w: empty header name", ErrUnencodableFrame)
		}
		if mode == fioEscNone && (strings.IndexByte(k, '\n') >= 0 || strings.IndexByte(k, ':') >= 0 || strings.IndexByte(v, '\n') >= 0) {
			return fmt.Errorf("%w: header %q needs escaping", ErrUnencodableFrame, fioTrunc(k))
		}
		if k == frame.ContentLength && !hasLength {
			hasLength = true
			if n, ok := fioParseContentLength(v); !ok || n != len(f.Body) {
				return fmt.Errorf("%w: %q for a %d-byte body", ErrBadContentLength, fioTrunc(v), len(f.Body))
			}
		}
	}

	bw := w.bw
	_, _ = bw.WriteString(cmd)
	_ = bw.WriteByte('\n')
	for i := 0; i < nh; i++ {
		k, v := h.GetAt(i)
		w.writeEscaped(k, mode)
		_ = bw.WriteByte(':')
		w.writeEscaped(v, mode)
		_ = bw.WriteByte('\n')
	}
	if len(f.Body) > 0 && !hasLength {
		_, _ = bw.WriteString(frame.ContentLength)
		_ = bw.WriteByte(':')
		_, _ = bw.Write(strconv.AppendInt(w.num[:0], int64(len(f.Body)), 10))
		_ = bw.WriteByte('\n')
	}
	_ = bw.WriteByte('\n')
	_, _ = bw.Write(f.Body)
	// bufio.Writer errors are sticky: this reports any failure above.
	return bw.WriteByte(0)
}

// writeEscaped writes s with the header escapes of mode.
func (w *frameWriter) writeEscaped(s string, mode fioEscape) {
	if mode == fioEscNone {
		_, _ = w.bw.WriteString(s)
		return
	}
	start := 0
	for i := 0; i < len(s); i++ {
		var esc string
		switch s[i] {
		case '\\':
			esc = `\\`
		case '\n':
			esc = `\n`
		case ':':
			esc = `\c`
		case '\r':
			if mode != fioEsc12 {
				continue
			}
			esc = `\r`
		default:
			continue
		}
		_, _ = w.bw.WriteString(s[start:i])
		_, _ = w.bw.WriteString(esc)
		start = i + 1
	}
	_, _ = w.bw.WriteString(s[start:])
}

// WriteHeartbeat writes a heart-beat: a single "\n". It does not flush.
func (w *frameWriter) WriteHeartbeat() error {
	return w.bw.WriteByte('\n')
}

// Flush writes buffered data to the underlying writer.
func (w *frameWriter) Flush() error {
	return w.bw.Flush()
}

// Buffered returns the number of bytes written but not yet flushed.
func (w *frameWriter) Buffered() int {
	return w.bw.Buffered()
}
