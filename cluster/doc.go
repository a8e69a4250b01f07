// Package cluster is membership: which brokerd nodes are alive (gossip,
// through hashicorp/memberlist) and which M of them are the active
// members. There is no leader: every node computes the active set with the
// same pure function (Agree) from the same gossiped view, and advertises a
// hash of what it computed, so that each node can tell when all agree.
//
// The pure part (agree.go, decide.go) takes time and views as parameters
// and is table-tested. The memberlist glue (node.go) is thin: it gossips
// each node's Meta, feeds views to Decide, and publishes the outcome.
//
// Invariants:
//   - Same view and M in, same ordered active set out, on every node.
//   - A member that is active stays active while it is alive and among the
//     first M by rank; a node that restarts comes back as an observer, so
//     an old member rejoining does not push out the one that replaced it.
//   - An observer claims a seat only after it has been in the agreed set
//     for PromotionDelay, so a member that flaps does not cause churn.
//   - The epoch a node advertises never decreases, and grows whenever the
//     active set it computes changes.
package cluster
