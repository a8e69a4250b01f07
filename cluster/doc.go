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
//   - An epoch (EpochID) is a counter and the hash of one active set; the
//     replication layer compares epochs with EpochID.Compare (counter,
//     then set hash), a total order. Equal EpochIDs name the same set.
//   - The epoch a node advertises never goes back, across restarts too: it
//     is persisted through State before it is advertised, and a node that
//     cannot persist it keeps advertising (and acting under) the old one.
//   - A node that moves to another set takes a counter above every counter
//     it has used or sees claimed for another set (or the one already
//     claimed for the new set, if higher); while its set is unchanged it
//     adopts the highest counter claimed for that set and ignores the
//     others. So two sides of a partition may reach the same counter, with
//     different EpochIDs; after they merge, the merged epoch is above
//     every epoch either side used for another set (Decide states it
//     exactly).
//
// Protocol versions (version.go): each build speaks a range of versions,
// gossiped in Meta; the cluster's effective version is the lowest maximum
// among the alive members, and a node with no version in common with the
// members is not admitted (memberlist's merge and alive delegates).
//
// Lock order in Node: evalMu, then mu. evalMu (not mu) is held while an
// epoch is persisted, so memberlist's callbacks never wait for an fsync.
package cluster
