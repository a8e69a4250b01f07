#!/usr/bin/python3
"""Fail over with stomp.py to the nodes CONNECTED listed (README, Finding the other nodes).

    /usr/bin/python3 test/python/failover.py HOST PORT

Connects to HOST:PORT only, remembers the x-brokerd-nodes header of its
CONNECTED (printing LEARNED host:port,...), prints READY and waits for the
connection to drop (the test stops that node). Then it connects again with
the remembered list, the next node first, prints RECONNECTED host:port,
and sends and receives a receipted message there (GOT ...). Exits 0, or
prints FAIL: ... to stderr and exits 1. TestPythonStompPyFailover
(test/discovery_test.go) runs it against an in-process cluster.
"""

import sys
import threading

try:
    import stomp
except ImportError as e:
    print("FAIL: cannot import stomp (install Debian's python3-stomp; test/run.sh does): %s" % e, file=sys.stderr)
    sys.exit(2)

seeds = [(sys.argv[1], int(sys.argv[2]))]


# As in README.md: keep the list from the last CONNECTED, the node just
# reached last.
class Nodes(stomp.ConnectionListener):
    def __init__(self):
        self.hosts = list(seeds)
        self.lost = threading.Event()
        self.got = threading.Event()
        self.body = None

    def on_connected(self, frame):
        listed = [a.rsplit(":", 1) for a in frame.headers.get("x-brokerd-nodes", "").split(",") if a]
        if listed:
            hosts = [(h.strip("[]"), int(p)) for h, p in listed]
            self.hosts = hosts[1:] + hosts[:1] + [s for s in seeds if s not in hosts]

    def on_disconnected(self):
        self.lost.set()

    def on_message(self, frame):
        self.body = frame.body
        self.got.set()


nodes = Nodes()


def connect():
    # Each attempt tries every host of the list in turn.
    conn = stomp.Connection12(nodes.hosts, reconnect_attempts_max=3, heartbeats=(0, 0))
    conn.set_listener("nodes", nodes)
    conn.connect(wait=True)
    return conn


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


conn = connect()
print("LEARNED " + ",".join("%s:%d" % hp for hp in nodes.hosts), flush=True)
print("READY", flush=True)
if not nodes.lost.wait(30):
    fail("the connection did not drop within 30 s")
nodes.lost.clear()
try:
    conn = connect()
except stomp.exception.ConnectFailedException as e:
    fail("no node of %s answered: %r" % (nodes.hosts, e))
host, port = conn.transport.current_host_and_port
print("RECONNECTED %s:%d" % (host, port), flush=True)
conn.subscribe("/queue/failover", id="1", ack="auto")
conn.send("/queue/failover", "after failover", receipt="r1")
if not nodes.got.wait(10):
    fail("the message sent after the failover did not come back")
print("GOT " + str(nodes.body), flush=True)
conn.disconnect()
