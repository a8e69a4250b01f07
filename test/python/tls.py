#!/usr/bin/python3
"""Drive brokerd's STOMP-over-TLS listener with stomp.py (Debian's python3-stomp).

    /usr/bin/python3 test/python/tls.py HOST PORT CA_FILE CERT_FILE KEY_FILE

Checks:
  x509       a client certificate the broker's CA signed logs in without a
             passcode (auth.x509_login); a receipted SEND comes back to a
             subscriber on the same TLS connection;
  untrusted  a client that does not trust the broker's CA cannot connect.

Prints one line per check and exits 0, or prints FAIL: ... and exits 1.
TestPythonStompPyTLS (test/tls_test.go) runs it.
"""

import queue
import sys
import threading
import uuid

try:
    import stomp
except ImportError as e:
    print("FAIL: cannot import stomp (install Debian's python3-stomp; test/run.sh does): %s" % e, file=sys.stderr)
    sys.exit(2)

TIMEOUT = 5.0


class Listener(stomp.ConnectionListener):
    def __init__(self):
        self.messages = queue.Queue()
        self.receipts = queue.Queue()
        self.errors = []

    def on_message(self, frame):
        self.messages.put(frame)

    def on_receipt(self, frame):
        self.receipts.put(frame.headers.get("receipt-id"))

    def on_error(self, frame):
        self.errors.append(frame)


def connect(host, port, ca, cert, key):
    conn = stomp.Connection12([(host, port)], heartbeats=(0, 0), reconnect_attempts_max=1, timeout=TIMEOUT)
    conn.set_ssl(for_hosts=[(host, port)], ca_certs=ca, cert_file=cert, key_file=key)
    l = Listener()
    conn.set_listener("l", l)
    conn.connect(wait=True)  # no login, no passcode: the certificate is the login
    return conn, l


def main():
    host, port, ca, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    try:
        conn, l = connect(host, port, ca, cert, key)
    except stomp.exception.ConnectFailedException as e:
        print("FAIL: x509: cannot connect over TLS with a trusted client certificate: %r" % e, file=sys.stderr)
        return 1
    dest = "/queue/py-tls-%s" % uuid.uuid4().hex[:8]
    conn.subscribe(dest, "1", ack="auto")
    conn.send(dest, "over tls", receipt="r1")
    try:
        rid = l.receipts.get(timeout=TIMEOUT)
        m = l.messages.get(timeout=TIMEOUT)
    except queue.Empty:
        print("FAIL: x509: no RECEIPT or MESSAGE over TLS (errors %r)" % [(e.headers, e.body) for e in l.errors], file=sys.stderr)
        return 1
    if rid != "r1" or m.body != "over tls":
        print("FAIL: x509: got receipt %r, body %r" % (rid, m.body), file=sys.stderr)
        return 1
    conn.disconnect()
    print("x509 ok")

    # A client that trusts another CA (its own certificate as the only
    # root) must not complete the handshake.
    try:
        conn, l = connect(host, port, cert, cert, key)
        print("FAIL: untrusted: connected to a server whose CA the client does not trust", file=sys.stderr)
        return 1
    except Exception:
        pass
    print("untrusted ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
