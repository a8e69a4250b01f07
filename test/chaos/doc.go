// Package chaos is brokerd's chaos suite: real brokerd binaries, each in
// its own Linux network namespace, joined by veth pairs to a bridge in a
// namespace of its own (addresses 198.18.0.1-N; the test process reaches
// them as 198.18.0.254), under a randomised schedule of faults while
// producers and consumers record a history.
//
//	BROKERD_CHAOS=1 go test -race -v -run TestChaos ./test/chaos            # short profile (~3.5 min)
//	BROKERD_CHAOS=1 go test -v -run TestChaos ./test/chaos -chaos.duration=30m -timeout 60m
//	BROKERD_CHAOS=1 go test -v -run TestChaos ./test/chaos -chaos.seed=N    # replay a schedule (same flags)
//	BROKERD_CHAOS=1 go test -v -run TestChaos ./test/chaos -chaos.tls=false # peer links and gossip in the clear
//
// It needs root and the commands ip (iproute2) and iptables; test/run.sh
// installs iptables and runs the short profile.
//
// The cluster: 5 nodes, M=3 active members, R=2 copies, W=2, secured as
// a production cluster would be (security.go): at the start the run makes
// a CA and a certificate per node for mutual TLS on peer links
// (cluster.tls.*, as BROKERD_ variables), a gossip key
// (cluster.secret_key_file), and an admin token (admin.token_file, which
// brokerd requires as the admin address is not loopback) that every admin
// call of the suite sends; once the cluster forms, each node's peer port
// must refuse a plain-text CONNECT. -chaos.tls=false runs peer links and
// gossip in the clear (the token stays). Clients:
// producers send receipted messages with unique ids (header x-chaos-id,
// body the id) to 16 queues, one at a time, each to a random node, moving
// to another node every few seconds and at any failure; one time in eight
// they send 2-10 SENDs covered by one receipt instead (a transaction and
// its receipted COMMIT, or unreceipted SENDs and a receipted DISCONNECT).
// Consumers read all 16 queues and their dead-letter queues from a random
// node with client-individual acknowledgements, each ACK with a receipt
// (at most 4 awaiting one; the rest wait), and move likewise. A SEND without an answer within 15 s counts as unknown, as does
// one answered by an ERROR other than a refusal made before storing (a
// queue at its limit, the low-disk alarm) naming its receipt.
//
// The schedule is drawn up front from the seed (printed, and written to
// schedule.txt); its first steps are every fault once, in a random order,
// and each must act (a skipped "lose" fails the run), the rest are drawn
// at random. Each step
// is a fault, held 4-11 s and then healed, after which the cluster is given
// up to 60 s to agree again (every node's /v1/cluster converged, on the
// same epoch and an active set of 3, every node alive in every view; the
// time is reported). Three steps in four pick the victim among the active
// members at the time (they own the queues and hold the copies); in one
// step in three the consumers are off, so a backlog builds and goes
// through the next faults. The faults:
//
//   - kill: kill -9 of a node, restarted at heal;
//   - pause: SIGSTOP, SIGCONT at heal;
//   - isolate: one node cut from every other node;
//   - split: a minority and a majority;
//   - bridge: two sides that both reach one node in the middle;
//   - loss: 10-30% of one node's packets dropped, both ways;
//   - delay: every packet one node sends held 50-300 ms (in user space,
//     through an NFQUEUE: the kernel has no sch_netem); the step fails if
//     a TCP connect to the node is not slowed by at least half of it;
//   - lose: a node lost for good: killed, its data directory deleted, a
//     fresh node started in its place. Applied only once every owner
//     trusts every replica's copy again (brokerd_replication_copies), as
//     losing a second disk before the first is rebuilt may lose data with
//     R=2;
//   - clock: one node's wall clock steps 1-59 minutes forward or back, and
//     back at heal. The suite builds brokerd with -tags chaos, whose wall
//     clock (message keys, expiry, the seat times it advertises) adds the
//     offset written to chaos-clock-offset in its data directory
//     (cmd/brokerd/node/clock_chaos.go); the step fails unless the node
//     logs that it took the offset.
//
// Partitions are iptables rules in the nodes' namespaces, so they cut
// gossip, peer links and everything else between the separated nodes
// alike (a step whose DROP rules matched no packet fails); the clients, on the test's own host, keep reaching every node (so
// both sides of a partition get traffic).
//
// After the schedule, a rolling restart under load (each node SIGTERM,
// which must exit 0, and restarted in turn) reports the producers' and the
// consumers' longest pause. Then the consumers stop for 5 s (leaving a
// backlog), the producers stop, every fault is healed, the cluster must
// agree, every queue is drained from every node, and every node must
// report every queue empty. The checker (check.go) fails the run on a
// receipted message never consumed (lost: never delivered, or delivered and
// neither acknowledged with a receipt nor delivered again; an ACK whose
// answer was lost excuses it, even if it was delivered again after, as
// the other side of a partition may do), a message received that was
// never sent (unexpected), a refused SEND that arrived, two deliveries of
// one message without redelivered:true (an unmarked one after a marked one
// on one connection is reported), a delivery on a subscription to the
// wrong destination or with the wrong destination header or body, a
// brokerd that exited by itself, or a cluster that did not agree within
// the bound; it reports duplicates, SENDs whose outcome was unknown and
// how many of them arrived, ACKs whose answer was lost, and messages
// acknowledged with a receipt that the final drain got again (a second
// copy of a SEND stored twice, or an acknowledged copy that came back). A failure ends the schedule early; the run still
// heals, drains, checks and prints its summary, which ends with a JSON
// line (also printed as a "CHAOS {...}" line).
//
// Everything the run creates is named bkc-*: at start, namespaces and links
// an earlier killed run left are removed, with the processes inside them,
// and its /tmp/brokerd-chaos-* directory; at the end (pass, fail, or
// SIGINT/SIGTERM) everything is removed again. brokerd processes get a
// parent-death signal, so they die with the test binary however it ends;
// the schedule, the rolling restart (per node) and the drain are budgeted
// against the test's -timeout, and a watchdog just before it, like
// SIGINT, checks and keeps the history so far and cleans up. One run at a
// time: a second one refuses to start while a lock file in /tmp is held.
// The run directory (node logs, data, history.jsonl) is kept when the run
// fails or with -chaos.keep.
//
// TestChaosRollingUpgrade (upgrade_test.go, about a minute) runs the same
// clients against 3 nodes built from this source without build tags
// (protocol version 1) and upgrades them under load, one at a time and
// through the rolling restart's steps, to the -tags brokerd_proto2 build
// (versions 1..2): every node must report version 1 in /v1/cluster while
// an old node is a member, with no checksummed peer request although the
// new nodes' links to each other speak 2, and version 2 with checksums
// verified once all are new; then the drain and the same history checks.
//
//	BROKERD_CHAOS=1 go test -v -run TestChaosRollingUpgrade ./test/chaos
package chaos
