package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/spf13/cobra"
)

// Operator commands: queues, purge, drain, undrain. Their refusals exit
// with a status that says which (as rabbitmqctl does, from sysexits.h);
// other failures exit 1.
const (
	// exitNotFound: the queue or node named does not exist (EX_DATAERR).
	exitNotFound = 65
	// exitUnreachable: the node's admin API could not be reached
	// (EX_UNAVAILABLE).
	exitUnreachable = 69
	// exitRefused: the cluster refused for now: a drain that would leave
	// a queue or the cluster without an undrained owner, a hand-off not
	// finished in time, a purge without its write quorum (EX_TEMPFAIL).
	exitRefused = 75
	// exitAuth: the admin token or client certificate was refused, or
	// the node's certificate not trusted (EX_NOPERM).
	exitAuth = 77
)

// exitError is a command's error with the exit status it calls for.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// exitCodeOf is the exit status for a command's error: the one an
// exitError carries, else exitFail.
func exitCodeOf(err error) int {
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return exitFail
}

// classify gives an admin call's error the exit status of its kind.
func classify(err error) error {
	if err == nil {
		return nil
	}
	var se *adminStatusError
	if errors.As(err, &se) {
		switch se.Status {
		case http.StatusUnauthorized, http.StatusForbidden:
			return &exitError{exitAuth, err}
		case http.StatusNotFound:
			return &exitError{exitNotFound, err}
		case http.StatusConflict, http.StatusServiceUnavailable:
			return &exitError{exitRefused, err}
		}
		return err
	}
	var ua x509.UnknownAuthorityError
	var ci x509.CertificateInvalidError
	var hn x509.HostnameError
	var ae tls.AlertError
	if errors.As(err, &ua) || errors.As(err, &ci) || errors.As(err, &hn) || errors.As(err, &ae) {
		return &exitError{exitAuth, err}
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return &exitError{exitUnreachable, err}
	}
	return err
}

// queueRow is a queue as GET /v1/queues returns it.
type queueRow struct {
	Name      string `json:"name"`
	Pending   int    `json:"pending"`
	InFlight  int    `json:"in_flight"`
	Consumers int    `json:"consumers"`
	Bytes     int64  `json:"pending_bytes"`
	Owner     string `json:"owner"`
	OwnerName string `json:"owner_name"`
	Idle      bool   `json:"idle"`
	Replicas  []struct {
		ID    string `json:"id"`
		Name  string `json:"name"`
		State string `json:"state"`
	} `json:"replicas"`
}

func printQueues(w io.Writer, qs []queueRow) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "QUEUE\tPENDING\tIN FLIGHT\tCONSUMERS\tOWNER\tREPLICAS")
	for _, q := range qs {
		owner := q.OwnerName
		if owner == "" {
			owner = q.Owner
		}
		if q.Idle {
			owner += " (idle)" // not served since its owner started: counted from its copies
		}
		var reps []string
		for _, r := range q.Replicas {
			name := r.Name
			if name == "" {
				name = r.ID
			}
			reps = append(reps, name+"("+r.State+")")
		}
		if len(reps) == 0 {
			reps = []string{"-"}
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%s\n", q.Name, q.Pending, q.InFlight, q.Consumers, owner, strings.Join(reps, " "))
	}
	tw.Flush()
}

func queuesCmd(stdout io.Writer) *cobra.Command {
	var target *adminTarget
	var asJSON bool
	c := &cobra.Command{
		Use:   "queues",
		Short: "List the queues with their pending and in-flight counts, owner and replica set (GET /v1/queues)",
		Long: "List the queues with their pending (ready) and in-flight (delivered, unacknowledged) counts as their owner\n" +
			"counts them, their owner and their replica set, cluster-wide (any node answers). A queue no node has\n" +
			"served since its owner started is shown idle, with the messages of its fullest copy as pending.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var raw json.RawMessage
			if err := target.call(http.MethodGet, "/v1/queues", nil, &raw); err != nil {
				return classify(err)
			}
			if asJSON {
				_, err := fmt.Fprintf(stdout, "%s\n", raw)
				return err
			}
			var qs []queueRow
			if err := json.Unmarshal(raw, &qs); err != nil {
				return fmt.Errorf("GET /v1/queues: %w", err)
			}
			printQueues(stdout, qs)
			return nil
		},
	}
	target = addAdminFlags(c)
	c.Flags().BoolVar(&asJSON, "json", false, "print the JSON as the node returns it")
	return c
}

func purgeCmd(stdout io.Writer) *cobra.Command {
	var target *adminTarget
	c := &cobra.Command{
		Use:   "purge QUEUE",
		Short: "Remove a queue's ready messages cluster-wide (POST /v1/queues/{name}/purge)",
		Long: "Remove a queue's ready messages cluster-wide, as RabbitMQ's purge: messages delivered and not yet\n" +
			"acknowledged stay. QUEUE is /queue/NAME or NAME. Any node forwards the purge to the queue's owner; the\n" +
			"removals are replicated as acknowledgements are, so a purged message does not come back after a\n" +
			"failover. Prints how many messages were removed. Exit status: 65 no such queue, 69 node unreachable,\n" +
			"75 the owner could not make the removals durable on its replicas, 77 authentication refused.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var res struct {
				Queue   string `json:"queue"`
				Removed int    `json:"removed"`
			}
			target.timeout = 3 * time.Minute // a large queue takes a while
			if err := target.call(http.MethodPost, "/v1/queues/"+url.PathEscape(args[0])+"/purge", nil, &res); err != nil {
				return classify(err)
			}
			fmt.Fprintf(stdout, "purged %s: %d messages removed\n", res.Queue, res.Removed)
			return nil
		},
	}
	target = addAdminFlags(c)
	return c
}

// drainState is GET/POST /v1/drain's answer.
type drainState struct {
	NodeID        string `json:"node_id"`
	NodeName      string `json:"node_name"`
	Draining      bool   `json:"draining"`
	OwnedQueues   int    `json:"owned_queues"`
	ClientsClosed int    `json:"clients_closed"`
	Clients       int    `json:"clients"`
	// PendingTransactions: recorded multi-owner COMMITs whose remaining
	// messages are on the node's disk only.
	PendingTransactions int `json:"pending_transactions"`
}

// nodeTarget finds node (a name or an ID) in the cluster as the node at
// target sees it and returns a target for its admin address, with
// target's credentials and scheme.
func nodeTarget(target *adminTarget, node string) (*adminTarget, cluster.MemberStatus, error) {
	var s cluster.Status
	if err := target.call(http.MethodGet, "/v1/cluster", nil, &s); err != nil {
		return nil, cluster.MemberStatus{}, classify(err)
	}
	var names []string
	for _, m := range s.Members {
		if m.Name == node || m.ID == node {
			if m.State != "alive" && m.State != "suspect" {
				return nil, m, &exitError{exitUnreachable, fmt.Errorf("node %s (%s) is %s in %s's view", m.Name, m.ID, m.State, s.NodeName)}
			}
			if m.AdminAddr == "" {
				return nil, m, &exitError{exitUnreachable, fmt.Errorf("node %s (%s) serves no admin API (admin.addr is empty)", m.Name, m.ID)}
			}
			t := *target
			t.addr = m.AdminAddr
			if strings.HasPrefix(target.addr, "https://") {
				t.addr = "https://" + m.AdminAddr
			}
			return &t, m, nil
		}
		names = append(names, m.Name)
	}
	sort.Strings(names)
	return nil, cluster.MemberStatus{}, &exitError{exitNotFound, fmt.Errorf("no node named %q in the cluster (members: %s)", node, strings.Join(names, ", "))}
}

func drainCmd(stdout io.Writer) *cobra.Command {
	var target *adminTarget
	var wait time.Duration
	c := &cobra.Command{
		Use:   "drain NODE",
		Short: "Put a node in maintenance: it hands its queues to other replicas and stops taking clients (POST /v1/drain)",
		Long: "Put a node in maintenance before stopping it: it hands ownership of its queues to other replicas (it\n" +
			"stays a replica), refuses new STOMP connections, ends its client sessions once its queues moved, and\n" +
			"/healthz answers 503 \"draining\". It stays drained across restarts until brokerd undrain. NODE is a\n" +
			"node name or ID; the command reads the cluster from --admin-addr (any node) and calls NODE's own\n" +
			"admin address, with the same credentials. It waits up to --wait for the hand-off, for the transactions\n" +
			"recorded there to be applied, and for every alive\n" +
			"node to see the drain. Drain one node at a time.\n" +
			"Exit status: 65 unknown node, 69 node unreachable, 75 refused (no other undrained replica could own a\n" +
			"queue, or the hand-off did not finish within --wait: do not stop the node yet), 77 authentication refused.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			nt, m, err := nodeTarget(target, args[0])
			if err != nil {
				return err
			}
			var st drainState
			if err := nt.call(http.MethodPost, "/v1/drain", nil, &st); err != nil {
				return classify(err)
			}
			deadline := time.Now().Add(wait)
			for (st.OwnedQueues > 0 || st.Clients > 0 || st.PendingTransactions > 0) && time.Now().Before(deadline) {
				time.Sleep(200 * time.Millisecond)
				if err := nt.call(http.MethodGet, "/v1/drain", nil, &st); err != nil {
					return classify(err)
				}
			}
			if st.OwnedQueues > 0 {
				return &exitError{exitRefused, fmt.Errorf("node %s is draining but still owns %d queues after %v: do not stop it yet (run brokerd drain again to wait more)", m.Name, st.OwnedQueues, wait)}
			}
			if st.PendingTransactions > 0 {
				return &exitError{exitRefused, fmt.Errorf("node %s is draining but still completes %d transactions recorded there (their remaining messages are on its disk only) after %v: do not stop it yet (run brokerd drain again to wait more)", m.Name, st.PendingTransactions, wait)}
			}
			if err := waitSeen(nt, m, true, deadline); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "node %s (%s) drained: it owns no queue, takes no new client, %d client sessions ended, %d still open\n", m.Name, m.ID, st.ClientsClosed, st.Clients)
			return nil
		},
	}
	target = addAdminFlags(c)
	c.Flags().DurationVar(&wait, "wait", 40*time.Second, "how long to wait for the node's queues to move and its clients to leave")
	return c
}

func undrainCmd(stdout io.Writer) *cobra.Command {
	var target *adminTarget
	var wait time.Duration
	c := &cobra.Command{
		Use:   "undrain NODE",
		Short: "End a node's maintenance: it takes clients and owns queues again (POST /v1/undrain)",
		Long: "End a node's maintenance (brokerd drain): it takes clients again and becomes the owner of its queues\n" +
			"again. NODE is a node name or ID, found as for drain; the command waits (--wait) until every alive node\n" +
			"sees it undrained. Exit status: 65 unknown node, 69 node unreachable, 75 not seen by every node in time,\n" +
			"77 authentication refused.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			nt, m, err := nodeTarget(target, args[0])
			if err != nil {
				return err
			}
			var st drainState
			// The node answers once the others released its queues (up to
			// 3 s when one is slow): longer than a call's usual 5 s.
			post := *nt
			post.timeout = 20 * time.Second
			if err := post.call(http.MethodPost, "/v1/undrain", nil, &st); err != nil {
				return classify(err)
			}
			if err := waitSeen(nt, m, false, time.Now().Add(wait)); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "node %s (%s) undrained: it takes clients and owns queues again\n", m.Name, m.ID)
			return nil
		},
	}
	target = addAdminFlags(c)
	c.Flags().DurationVar(&wait, "wait", 20*time.Second, "how long to wait for every alive node to see the node undrained")
	return c
}

// waitSeen waits until every alive member, asked at its own admin
// address (with nt's credentials), sees node m draining (or not, with
// draining false), or deadline: a drain or undrain spreads by gossip, and
// the next operation (another drain, a stop) must be judged on it.
func waitSeen(nt *adminTarget, m cluster.MemberStatus, draining bool, deadline time.Time) error {
	var last string
	for {
		var s cluster.Status
		if err := nt.call(http.MethodGet, "/v1/cluster", nil, &s); err != nil {
			return classify(err)
		}
		var behind []string
		for _, o := range s.Members {
			if o.ID == m.ID || o.AdminAddr == "" || (o.State != "alive" && o.State != "suspect") {
				continue
			}
			t := *nt
			t.addr = o.AdminAddr
			if strings.HasPrefix(nt.addr, "https://") {
				t.addr = "https://" + o.AdminAddr
			}
			var os cluster.Status
			if err := t.call(http.MethodGet, "/v1/cluster", nil, &os); err != nil {
				behind = append(behind, o.Name+" ("+err.Error()+")")
				continue
			}
			seen := false
			for _, x := range os.Members {
				if x.ID == m.ID {
					seen = x.Draining == draining
				}
			}
			if !seen {
				behind = append(behind, o.Name)
			}
		}
		if len(behind) == 0 {
			return nil
		}
		last = strings.Join(behind, ", ")
		if time.Now().After(deadline) {
			word := "draining"
			if !draining {
				word = "undrained"
			}
			return &exitError{exitRefused, fmt.Errorf("node %s: not every node sees it %s yet (%s): wait before the next drain or stop", m.Name, word, last)}
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// opsCmds are the operator commands, for the root command.
func opsCmds(stdout io.Writer) []*cobra.Command {
	return []*cobra.Command{queuesCmd(stdout), purgeCmd(stdout), drainCmd(stdout), undrainCmd(stdout)}
}
