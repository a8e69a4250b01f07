package stomp

// Draining: a node in maintenance refuses new clients and, once its
// queues are served elsewhere, ends the sessions it has, so that clients
// reconnect to another node.

// SetDraining makes the server refuse every CONNECT from now on with an
// ERROR "node draining" whose body is detail (which should say where to
// connect instead); "" accepts clients again. Sessions already connected
// are not touched (CloseClients ends them).
func (s *Server) SetDraining(detail string) {
	if detail == "" {
		s.draining.Store(nil)
		return
	}
	s.draining.Store(&detail)
}

// Draining reports whether the server refuses CONNECTs (SetDraining).
func (s *Server) Draining() bool { return s.draining.Load() != nil }

// drainRefusal is the error a CONNECT gets while draining, else nil.
func (s *Server) drainRefusal() *protocolError {
	d := s.draining.Load()
	if d == nil {
		return nil
	}
	return perr("draining", "node draining", "%s", *d)
}

// CloseClients ends every client session as Shutdown does, without
// closing the listeners: each session's earlier frames take effect and
// their receipts go out, then the client gets an ERROR (the drain's,
// while draining) and the connection closes; its unacknowledged messages
// return to their queues. It returns the number of sessions told to end
// and does not wait for them.
func (s *Server) CloseClients() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for sess := range s.sessions {
		sess.shutdown()
	}
	return len(s.sessions)
}

// Sessions is the number of client sessions open now.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}
