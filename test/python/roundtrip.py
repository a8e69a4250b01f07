#!/usr/bin/python3
"""Drive brokerd with stomp.py (Debian's python3-stomp), a client that is not Go.

    /usr/bin/python3 test/python/roundtrip.py HOST PORT [LOGIN PASSCODE]

Checks, each on fresh queues:
  roundtrip    a few messages sent with receipts come back in order, with
               their headers;
  ack          client-individual: ACKed messages are gone, the one not ACKed
               comes back to the next session;
  nack         NACK redelivers with redelivered:true and the same message-id;
  transaction  BEGIN, SEND x2, COMMIT delivers both; BEGIN, SEND, ABORT
               delivers nothing.

Prints one line per check and exits 0, or prints FAIL: ... to stderr and exits 1.
TestPythonStompPy (test/python_test.go) runs it against an in-process broker.
"""

import queue
import signal
import sys
import threading
import time
import uuid

try:
    import stomp
except ImportError as e:  # the test looks for this message
    print("FAIL: cannot import stomp (install Debian's python3-stomp; test/run.sh does): %s" % e, file=sys.stderr)
    sys.exit(2)

TIMEOUT = 5.0  # seconds for any one expected frame


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


class Collector(stomp.ConnectionListener):
    """Collects MESSAGE, RECEIPT and ERROR frames from one connection."""

    def __init__(self):
        self.messages = queue.Queue()
        self.cond = threading.Condition()
        self.receipts = set()
        self.errors = []
        self.disconnected = False

    def on_message(self, frame):
        self.messages.put(frame)

    def on_receipt(self, frame):
        with self.cond:
            self.receipts.add(frame.headers.get("receipt-id"))
            self.cond.notify_all()

    def on_error(self, frame):
        with self.cond:
            self.errors.append(frame)
            self.cond.notify_all()

    def on_disconnected(self):
        with self.cond:
            self.disconnected = True
            self.cond.notify_all()

    def wait_receipt(self, rid, what):
        deadline = time.monotonic() + TIMEOUT
        with self.cond:
            while rid not in self.receipts:
                if self.errors:
                    e = self.errors[0]
                    raise Failure("%s: ERROR %s %r instead of RECEIPT %s" % (what, e.headers, e.body, rid))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure("%s: no RECEIPT %s within %.0fs" % (what, rid, TIMEOUT))
                self.cond.wait(left)

    def get(self, what):
        try:
            return self.messages.get(timeout=TIMEOUT)
        except queue.Empty:
            raise Failure("%s: no MESSAGE within %.0fs (errors: %s)" % (what, TIMEOUT, [(e.headers, e.body) for e in self.errors]))

    def none(self, what, wait=0.5):
        try:
            f = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise Failure("%s: unexpected MESSAGE %r %s" % (what, f.body, f.headers))


class Client:
    """One STOMP 1.2 connection with receipts made easy."""

    def __init__(self, host, port, login=None, passcode=None):
        self.conn = stomp.Connection12([(host, port)], heartbeats=(0, 0), reconnect_attempts_max=1, timeout=TIMEOUT)
        self.l = Collector()
        self.conn.set_listener("collector", self.l)
        try:
            self.conn.connect(login, passcode, wait=True)
        except stomp.exception.ConnectFailedException:
            raise Failure("cannot connect to %s:%s (errors: %s)" % (host, port, [(e.headers, e.body) for e in self.l.errors]))
        self.n = 0

    def rid(self):
        self.n += 1
        return "r-%d-%s" % (self.n, uuid.uuid4().hex[:8])

    def send(self, dest, body, what, **headers):
        r = self.rid()
        self.conn.send(dest, body, headers=headers, receipt=r)
        self.l.wait_receipt(r, what)

    def subscribe(self, dest, sid, ack, what, **headers):
        r = self.rid()
        self.conn.subscribe(dest, sid, ack=ack, headers=headers, receipt=r)
        self.l.wait_receipt(r, what)

    def ack(self, frame, what, transaction=None):
        r = self.rid()
        self.conn.ack(frame.headers["ack"], transaction=transaction, receipt=r)
        self.l.wait_receipt(r, what)

    def nack(self, frame, what):
        r = self.rid()
        self.conn.nack(frame.headers["ack"], receipt=r)
        self.l.wait_receipt(r, what)

    def close(self):
        if self.conn.is_connected():
            # With a receipt stomp.py waits for it and stops its transport.
            self.conn.disconnect(receipt=self.rid())


def new_queue(name):
    return "/queue/py-%s-%s" % (name, uuid.uuid4().hex[:12])


def test_roundtrip(host, port, login, passcode):
    q = new_queue("roundtrip")
    c = Client(host, port, login, passcode)
    try:
        bodies = ["one", "two", "thrée ünïcode", "x" * 10000]
        for i, b in enumerate(bodies):
            c.send(q, b, "roundtrip send", **{"x-seq": str(i), "x-colon": "a:b\\c"})
        c.subscribe(q, "s1", "auto", "roundtrip subscribe")
        for i, b in enumerate(bodies):
            f = c.l.get("roundtrip message %d" % i)
            check(f.body == b, "roundtrip: message %d body %r, want %r" % (i, f.body[:50], b[:50]))
            check(f.headers.get("x-seq") == str(i), "roundtrip: x-seq %r, want %d" % (f.headers.get("x-seq"), i))
            check(f.headers.get("x-colon") == "a:b\\c", "roundtrip: escaped header came back as %r" % f.headers.get("x-colon"))
            check(f.headers.get("destination") == q, "roundtrip: destination %r" % f.headers.get("destination"))
            check(f.headers.get("subscription") == "s1", "roundtrip: subscription %r" % f.headers.get("subscription"))
            check(f.headers.get("message-id"), "roundtrip: no message-id")
        c.l.none("roundtrip")
    finally:
        c.close()
    print("ok roundtrip: %d messages with receipts" % len(bodies))


def test_client_individual(host, port, login, passcode):
    q = new_queue("ack")
    c = Client(host, port, login, passcode)
    try:
        for b in ["m0", "m1", "m2"]:
            c.send(q, b, "ack send")
        c.subscribe(q, "s1", "client-individual", "ack subscribe")
        got = [c.l.get("ack message %d" % i) for i in range(3)]
        check([f.body for f in got] == ["m0", "m1", "m2"], "ack: got %r" % [f.body for f in got])
        for f in got:
            check(f.headers.get("ack"), "ack: MESSAGE without an ack header in client-individual mode: %s" % f.headers)
        # client-individual: ACKing m2 must not acknowledge m1.
        c.ack(got[2], "ack m2")
        c.ack(got[0], "ack m0")
        c.l.none("ack")
    finally:
        c.close()
    c = Client(host, port, login, passcode)
    try:
        c.subscribe(q, "s2", "client-individual", "ack resubscribe")
        f = c.l.get("ack redelivery of m1")
        check(f.body == "m1", "ack: after the session ended got %r, want m1 (the one not ACKed)" % f.body)
        check(f.headers.get("redelivered") == "true", "ack: m1 again without redelivered:true: %s" % f.headers)
        c.ack(f, "ack m1")
        c.l.none("ack after m1")
    finally:
        c.close()
    print("ok client-individual ack: ACKed messages gone, the other one redelivered")


def test_nack(host, port, login, passcode):
    q = new_queue("nack")
    c = Client(host, port, login, passcode)
    try:
        c.send(q, "again", "nack send")
        c.subscribe(q, "s1", "client-individual", "nack subscribe")
        f = c.l.get("nack first delivery")
        check(f.body == "again", "nack: got %r" % f.body)
        check("redelivered" not in f.headers, "nack: first delivery has redelivered: %s" % f.headers)
        c.nack(f, "nack")
        g = c.l.get("nack redelivery")
        check(g.body == "again", "nack: redelivered body %r" % g.body)
        check(g.headers.get("redelivered") == "true", "nack: redelivery without redelivered:true: %s" % g.headers)
        check(g.headers.get("message-id") == f.headers.get("message-id"),
              "nack: message-id changed from %s to %s" % (f.headers.get("message-id"), g.headers.get("message-id")))
        c.ack(g, "nack then ack")
        c.l.none("nack after ack")
    finally:
        c.close()
    print("ok nack: redelivered with redelivered:true")


def test_transaction(host, port, login, passcode):
    q = new_queue("tx")
    c = Client(host, port, login, passcode)
    try:
        c.subscribe(q, "s1", "auto", "tx subscribe")
        tx = c.conn.begin()
        c.conn.send(q, "tx-1", transaction=tx)
        c.conn.send(q, "tx-2", transaction=tx)
        c.l.none("tx before COMMIT", wait=0.3)
        r = c.rid()
        c.conn.commit(tx, receipt=r)
        c.l.wait_receipt(r, "tx COMMIT")
        got = [c.l.get("tx committed message %d" % i).body for i in range(2)]
        check(got == ["tx-1", "tx-2"], "tx: after COMMIT got %r, want ['tx-1', 'tx-2']" % got)

        tx = c.conn.begin()
        c.conn.send(q, "tx-aborted", transaction=tx)
        r = c.rid()
        c.conn.abort(tx, receipt=r)
        c.l.wait_receipt(r, "tx ABORT")
        # A later plain message proves the aborted one is not just late.
        c.send(q, "after-abort", "tx send after ABORT")
        f = c.l.get("tx message after ABORT")
        check(f.body == "after-abort", "tx: after ABORT got %r, want after-abort" % f.body)
        c.l.none("tx after ABORT")
    finally:
        c.close()
    print("ok transaction: COMMIT delivers both, ABORT delivers nothing")


def main(argv):
    if len(argv) not in (3, 5):
        print("usage: %s HOST PORT [LOGIN PASSCODE]" % argv[0], file=sys.stderr)
        return 2
    host, port = argv[1], int(argv[2])
    login, passcode = (argv[3], argv[4]) if len(argv) == 5 else (None, None)

    def on_alarm(*_):
        print("FAIL: timed out after 60s", file=sys.stderr)
        sys.stderr.flush()
        import os
        os._exit(1)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)

    print("stomp.py %s" % ".".join(str(x) for x in stomp.__version__))
    try:
        for t in (test_roundtrip, test_client_individual, test_nack, test_transaction):
            t(host, port, login, passcode)
    except Failure as e:
        print("FAIL: %s" % e, file=sys.stderr)
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
