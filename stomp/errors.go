package stomp

import "errors"

// Frame errors. Their messages are short lower-case phrases that can be sent
// to a client as the message header of an ERROR frame. Functions that return
// them usually wrap them with fmt.Errorf("%w: ...") to add detail (a limit, an
// offending header name), so callers must match with errors.Is.
var (
	// ErrFrameTooLarge means a frame (command line, header lines, body and
	// terminating NUL) exceeds Limits.MaxFrameSize.
	ErrFrameTooLarge = errors.New("frame too large")

	// ErrBodyTooLarge means a frame body, or the length announced by its
	// content-length header, exceeds Limits.MaxBodySize.
	ErrBodyTooLarge = errors.New("body too large")

	// ErrTooManyHeaders means a frame has more than Limits.MaxHeaderCount
	// header lines.
	ErrTooManyHeaders = errors.New("too many headers")

	// ErrHeaderTooLong means the command line or a header line, excluding its
	// end of line, exceeds Limits.MaxHeaderLineLen.
	ErrHeaderTooLong = errors.New("header line too long")

	// ErrBadEscape means a header contains a backslash sequence that is not
	// defined for the negotiated STOMP version, or ends with a lone
	// backslash. STOMP 1.2 requires such a frame to be treated as a fatal
	// protocol error.
	ErrBadEscape = errors.New("undefined escape sequence")

	// ErrMalformedFrame means a frame does not follow the STOMP grammar: a
	// header line without a colon or with an empty name, a body announced by
	// content-length that is not followed by a NUL octet, and so on.
	ErrMalformedFrame = errors.New("malformed frame")

	// ErrUnknownCommand means the command line is not a STOMP command.
	ErrUnknownCommand = errors.New("unknown command")

	// ErrBadContentLength means a content-length header is not a base-10
	// non-negative integer, or (when writing) does not match the body length.
	ErrBadContentLength = errors.New("invalid content-length")

	// ErrUnencodableFrame means a frame cannot be written in the requested
	// STOMP version without changing its meaning, for example a header value
	// containing a line feed in a frame written without escaping (STOMP 1.0,
	// CONNECT, STOMP and CONNECTED frames), or an empty header name.
	ErrUnencodableFrame = errors.New("frame cannot be encoded")
)
