package cluster

// SetDraining announces (or withdraws) that this node is in maintenance:
// its metadata carries Draining, which every member's Status shows at the
// next gossip of it, and this node's own Status at once. It changes
// nothing else here: the router reads it to prefer undrained owners. It
// may be called before Start (the first metadata gossiped carries it).
func (n *Node) SetDraining(on bool) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.self.Draining == on {
		return nil
	}
	next := n.self
	next.Draining = on
	b, err := next.encode()
	if err != nil {
		return err
	}
	n.self, n.metaB = next, b
	for i := range n.status.Members {
		if n.status.Members[i].ID == n.self.ID {
			n.status.Members[i].Draining = on
		}
	}
	n.signal(n.publish)
	n.signal(n.wake)
	n.log.Info("draining announced", "draining", on)
	return nil
}

// Draining reports whether this node announces that it is draining.
func (n *Node) Draining() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.self.Draining
}
