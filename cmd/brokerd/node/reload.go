package node

import (
	"errors"
	"fmt"
	"sync"
)

// reloader is one part of the node that rereads its files on reload
// (SIGHUP, POST /v1/reload): the users and ACL files, certificates and
// keys. It must keep what it had when it fails.
type reloader struct {
	name string // for logs: "auth", "stomp.tls", ...
	fn   func() error
}

// reloads lists the node's reloaders; onReload adds one.
type reloads struct {
	mu   sync.Mutex // one reload at a time
	list []reloader
}

func (r *reloads) add(name string, fn func() error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.list = append(r.list, reloader{name, fn})
}

// Reload rereads the users file, the ACL file and every certificate and
// key the node was started with. Existing connections keep their session;
// new connections, and new frames of existing ones, see the new rules. A
// part that fails to load keeps its old rules and its error is returned
// (and logged); the other parts are still reloaded.
func (n *Node) Reload() error {
	n.reload.mu.Lock()
	defer n.reload.mu.Unlock()
	var errs []error
	var done []string
	for _, r := range n.reload.list {
		if err := r.fn(); err != nil {
			n.log.Error("reload failed; keeping the old rules", "part", r.name, "err", err)
			errs = append(errs, fmt.Errorf("%s: %w", r.name, err))
			continue
		}
		done = append(done, r.name)
	}
	n.log.Info("reloaded", "parts", done, "failed", len(errs))
	return errors.Join(errs...)
}
