package node

import (
	"net"
	"path/filepath"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/stomp"
	"github.com/go-stomp/stomp/v3/frame"
)

// maxQueuedReplication bounds the replication bytes queued and unanswered
// per peer.
const maxQueuedReplication = 64 << 20

// setupReplication makes a clustered node one broker with the others:
// its queue writes are replicated (PeerReplicator over peerLinks), its
// clients' operations on queues other nodes own are forwarded (router),
// and its peer server answers both for the other nodes. The peer server
// listens once Start runs, before the cluster advertises its address.
// antiEntropyInterval is how often an owner checks its queues' copies on
// the other replicas (replica.PeerReplicator.EnableAntiEntropy).
const antiEntropyInterval = 30 * time.Second

func (n *Node) setupReplication() error {
	cfg := n.cfg
	key, err := readSecretKey(cfg.Cluster.SecretKeyFile)
	if err != nil {
		return err
	}
	n.secret = key
	// The gossip keys: the keyring file in the data directory once a
	// rotation has written it, else the configured key. The same ring
	// encrypts gossip and authenticates peer links, so both follow a
	// rotation (gossipkeys.go).
	kr, fromFile, err := cluster.OpenKeyring(filepath.Join(cfg.Node.DataDir, gossipKeyringFile), key)
	if err != nil {
		return err
	}
	var keys func() [][]byte // nil: no secret, no peer authentication
	if kr != nil {
		keys = kr.Keys
		n.keyring = kr // the membership's too (clusterConfig)
	}
	if fromFile {
		n.log.Info("gossip keys read from the keyring file, which wins over cluster.secret_key_file",
			"file", kr.Path(), "keys", len(kr.Keys()), "primary_id", cluster.KeyID(kr.Primary()))
	}
	// Mutual TLS on peer links, certificates reread on reload.
	var tf *tlsFiles
	if t := cfg.Cluster.TLS; t.CertFile != "" {
		if tf, err = newTLSFiles("cluster.tls", t.CertFile, t.KeyFile, t.CAFile, "ca_file"); err != nil {
			return err
		}
		n.reload.add("cluster.tls", tf.reload)
	}
	status := func() cluster.Status {
		if n.cl == nil {
			return cluster.Status{NodeID: n.id}
		}
		return n.cl.Status()
	}
	// A peer frame carries up to pollBytes of deliveries plus one whole
	// message, or a forwarded chunk (maxForwardBody) plus one message.
	lim := stomp.DefaultPeerLimits()
	need := int64(cfg.Limits.MaxBodySize) + max(pollBytes, maxForwardBody) + 64<<10
	if int64(lim.MaxBodySize) < need {
		lim.MaxBodySize = int(need)
		lim.MaxFrameSize = int(need) + 64<<10
	}
	ccfg := stomp.DefaultPeerClientConfig()
	ccfg.Limits = lim
	// Redial soon after a partition heals or a node restarts: writes
	// that need the peer fail until its link is back.
	ccfg.BackoffMax = 500 * time.Millisecond
	ccfg.SecretKeys = keys
	if tf != nil {
		ccfg.TLS = tf.mutualClientConfig()
	}
	ccfg.NodeID = n.id
	// Links speak the build's protocol versions, and use version 2's
	// checksums only once every member speaks it (cluster.Node's
	// effective version; README, Rolling upgrades).
	ccfg.Protocols = cluster.BuildProtocols()
	ccfg.Protocol = func() int {
		if n.cl == nil {
			return 1
		}
		return n.cl.ProtocolVersion()
	}
	ccfg.Host = cfg.Cluster.Name
	ccfg.Logger = n.log
	ccfg.Registerer = n.reg
	if n.opts.PeerDial != nil {
		ccfg.Dial = n.opts.PeerDial
	}
	var rt *router
	addrOf := func(id string) string { return rt.peerAddr(id) }
	n.fwd = newFwdLinks(ccfg, addrOf)
	rt = newRouter(n.rep, n.st, cfg.Replica.Factor, status, n.fwd, n.log, n.reg)
	n.fwd.onState = rt.linkState // a peer refused over TLS counts as down (linkState)
	n.rt = rt
	n.links = newPeerLinks(ccfg, addrOf, maxQueuedReplication, n.log)
	n.pr = replica.NewPeerReplicator(cfg.Replica.Factor, cfg.WriteQuorum(), rt.replicaView, n.links, n.log)
	n.pr.EnableCatchUp(n.st)
	n.pr.EnableAntiEntropy(n.st, n.rep.AdoptedQueues, antiEntropyInterval, rt.merge)
	if n.reg != nil {
		n.reg.MustRegister(n.pr.Collector())
	}
	rt.pr = n.pr
	rt.pruneRep = n.links.prune
	n.rep.SetReplicator(n.pr)

	addr := cfg.Cluster.PeerAddr
	if addr == "" {
		// Beside the gossip address, on a free port (advertised).
		host, _, err := net.SplitHostPort(cfg.Cluster.GossipAddr)
		if err != nil {
			host = ""
		}
		addr = net.JoinHostPort(host, "0")
	}
	scfg := stomp.DefaultPeerServerConfig()
	scfg.Limits = lim
	scfg.Addr = addr
	scfg.SecretKeys = keys
	if tf != nil {
		scfg.TLS = tf.mutualServerConfig()
	}
	scfg.NodeID = n.id
	scfg.Protocols = cluster.BuildProtocols()
	scfg.Logger = n.log
	scfg.Registerer = n.reg
	appendH := replicationHandler(n.rep, func() cluster.EpochID { return status().EpochID })
	fwdH := forwardHandler(rt, n.log)
	keysH := gossipKeysPeerHandler(kr, n.log)
	n.peerSrv = stomp.NewPeerServer(scfg, stomp.PeerHandlerFunc(func(peer string, f *frame.Frame, reply func(*frame.Frame)) {
		switch f.Header.Get(stomp.PeerHeaderOp) {
		case opAppend:
			appendH.HandlePeer(peer, f, reply)
		case opGossipKeys:
			keysH(peer, f, reply)
		default:
			fwdH(peer, f, reply)
		}
	}))
	return nil
}

// stopReplication ends forwarding and replication, after the STOMP
// sessions closed.
func (n *Node) stopReplication() {
	if n.rt == nil {
		return
	}
	n.replStop.Do(n.stopReplicationOnce)
}

func (n *Node) stopReplicationOnce() {
	// Requests from other nodes first: nothing new reaches the router or
	// the replicator while they close.
	if n.peerSrv != nil {
		_ = n.peerSrv.Close()
	}
	n.rt.close()
	n.fwd.close()
	n.pr.Close()
	n.links.Close()
}
