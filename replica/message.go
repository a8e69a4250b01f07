package replica

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"
)

// Kind is the kind of a destination.
type Kind int

const (
	// KindQueue is a /queue/ destination: each message to one subscriber, stored.
	KindQueue Kind = iota + 1
	// KindTopic is a /topic/ destination: each message to every subscriber present, not stored.
	KindTopic
)

func (k Kind) String() string {
	switch k {
	case KindQueue:
		return "queue"
	case KindTopic:
		return "topic"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Destination prefixes.
const (
	QueuePrefix = "/queue/"
	TopicPrefix = "/topic/"
)

// ParseDestination returns the kind of a destination name, or
// ErrBadDestination.
func ParseDestination(dest string) (Kind, error) {
	switch {
	case strings.HasPrefix(dest, QueuePrefix) && len(dest) > len(QueuePrefix):
		return KindQueue, nil
	case strings.HasPrefix(dest, TopicPrefix) && len(dest) > len(TopicPrefix):
		return KindTopic, nil
	}
	return 0, fmt.Errorf("%w: %q (want /queue/NAME or /topic/NAME)", ErrBadDestination, dest)
}

// Message is one message as the broker keeps it. Headers hold the
// application's headers as key/value pairs in order (the transport headers
// such as destination, message-id, receipt and transaction are not in it).
// A Message is immutable once published, except for the fields the owning
// queue guards (deliveries).
type Message struct {
	Dest    string
	Seq     uint64
	ID      string
	Headers []string
	Body    []byte
	// Expires is the expiry in milliseconds since the epoch, 0 for never.
	Expires int64
	// unconfirmed: stored without its write quorum while handed out
	// (destination.unconfirmed); not stored.
	unconfirmed bool
	// Deliveries counts earlier deliveries that ended without an ACK, and
	// possible ones: a SEND stored again by a retry after an attempt that
	// may have stored it (and so may have been delivered) starts at 1.
	Deliveries int
	// NoCreate refuses the SEND with ErrNoSuchQueue, storing nothing, if
	// its queue does not exist (its sender may not create queues there).
	// Not stored, and ignored for topics.
	NoCreate bool
}

// Expired reports whether the message has expired at now.
func (m *Message) Expired(now time.Time) bool {
	return m.Expires > 0 && now.UnixMilli() >= m.Expires
}

// Header returns the first value of the application header name.
func (m *Message) Header(name string) (string, bool) {
	for i := 0; i+1 < len(m.Headers); i += 2 {
		if m.Headers[i] == name {
			return m.Headers[i+1], true
		}
	}
	return "", false
}

const codecVersion = 1

// encode is the stored form: version, deliveries, expires, header count,
// headers and body, lengths as uvarints.
func (m *Message) encode() []byte {
	n := 1 + 3*binary.MaxVarintLen64 + len(m.Body)
	for _, h := range m.Headers {
		n += binary.MaxVarintLen64 + len(h)
	}
	b := make([]byte, 0, n+binary.MaxVarintLen64+len(m.ID))
	b = append(b, codecVersion)
	b = binary.AppendUvarint(b, uint64(m.Deliveries))
	b = binary.AppendVarint(b, m.Expires)
	b = binary.AppendUvarint(b, uint64(len(m.ID)))
	b = append(b, m.ID...)
	b = binary.AppendUvarint(b, uint64(len(m.Headers)))
	for _, h := range m.Headers {
		b = binary.AppendUvarint(b, uint64(len(h)))
		b = append(b, h...)
	}
	b = binary.AppendUvarint(b, uint64(len(m.Body)))
	b = append(b, m.Body...)
	return b
}

var errCorrupt = errors.New("corrupt message record")

// EncodeMessage returns m's stored form (ID, headers, body, expiry and
// delivery count), which DecodeMessage reads back; peer links carry it.
func EncodeMessage(m *Message) []byte { return m.encode() }

// DecodeMessage parses EncodeMessage's form for destination dest. It
// copies what it keeps.
func DecodeMessage(dest string, b []byte) (*Message, error) { return decodeMessage(dest, 0, b) }

// decodeMessage parses a stored record. It copies what it keeps.
func decodeMessage(dest string, seq uint64, b []byte) (*Message, error) {
	if len(b) < 1 || b[0] != codecVersion {
		return nil, fmt.Errorf("%w: version", errCorrupt)
	}
	b = b[1:]
	m := &Message{Dest: dest, Seq: seq}
	uv := func() (uint64, bool) {
		v, n := binary.Uvarint(b)
		if n <= 0 {
			return 0, false
		}
		b = b[n:]
		return v, true
	}
	str := func() (string, bool) {
		l, ok := uv()
		if !ok || l > uint64(len(b)) {
			return "", false
		}
		s := string(b[:l])
		b = b[l:]
		return s, true
	}
	d, ok := uv()
	if !ok || d > math.MaxInt32 {
		return nil, fmt.Errorf("%w: deliveries", errCorrupt)
	}
	m.Deliveries = int(d)
	exp, n := binary.Varint(b)
	if n <= 0 {
		return nil, fmt.Errorf("%w: expires", errCorrupt)
	}
	b = b[n:]
	m.Expires = exp
	if m.ID, ok = str(); !ok {
		return nil, fmt.Errorf("%w: id", errCorrupt)
	}
	nh, ok := uv()
	if !ok || nh > uint64(len(b)) || nh%2 != 0 {
		return nil, fmt.Errorf("%w: header count", errCorrupt)
	}
	m.Headers = make([]string, nh)
	for i := range m.Headers {
		if m.Headers[i], ok = str(); !ok {
			return nil, fmt.Errorf("%w: header", errCorrupt)
		}
	}
	bl, ok := uv()
	if !ok || bl != uint64(len(b)) {
		return nil, fmt.Errorf("%w: body", errCorrupt)
	}
	m.Body = append([]byte(nil), b...)
	return m, nil
}

// StoredBodyLen returns the body length of a stored message record, for
// the store's per-queue byte counts (store.Config.Weigh); 0 for a record
// it cannot read.
func StoredBodyLen(b []byte) int64 {
	if len(b) < 1 || b[0] != codecVersion {
		return 0
	}
	b = b[1:]
	skip := func() bool { // one uvarint
		_, n := binary.Uvarint(b)
		if n <= 0 {
			return false
		}
		b = b[n:]
		return true
	}
	str := func() bool {
		l, n := binary.Uvarint(b)
		if n <= 0 || l > uint64(len(b)-n) {
			return false
		}
		b = b[n+int(l):]
		return true
	}
	if !skip() {
		return 0
	}
	if _, n := binary.Varint(b); n <= 0 {
		return 0
	} else {
		b = b[n:]
	}
	if !str() {
		return 0
	}
	nh, n := binary.Uvarint(b)
	if n <= 0 || nh > uint64(len(b)) {
		return 0
	}
	b = b[n:]
	for i := uint64(0); i < nh; i++ {
		if !str() {
			return 0
		}
	}
	bl, n := binary.Uvarint(b)
	if n <= 0 || bl != uint64(len(b)-n) {
		return 0
	}
	return int64(bl)
}
