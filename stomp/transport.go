package stomp

// Transport is how a client reached the server: the listener its
// connection came in on.
type Transport uint8

const (
	TransportTCP Transport = iota // stomp.addr
	TransportTLS                  // stomp.tls.addr
	TransportWS                   // stomp.ws_addr, STOMP over WebSocket
	TransportWSS                  // stomp.wss_addr, STOMP over secure WebSocket
)

// String returns the transport's name as logs and metrics show it: tcp,
// tls, ws or wss.
func (t Transport) String() string {
	switch t {
	case TransportTCP:
		return "tcp"
	case TransportTLS:
		return "tls"
	case TransportWS:
		return "ws"
	case TransportWSS:
		return "wss"
	}
	return "unknown"
}
