package test

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"
)

// debianPython is Debian's interpreter, which sees the python3-stomp
// package (a python3 earlier on PATH, e.g. from pyenv, does not).
const debianPython = "/usr/bin/python3"

// requireStompPy skips the test, or fails it when CI=true, unless
// /usr/bin/python3 can import stomp.
func requireStompPy(t *testing.T) {
	t.Helper()
	why := ""
	if _, err := os.Stat(debianPython); err != nil {
		why = debianPython + " is missing"
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, debianPython, "-c", "import stomp").CombinedOutput()
		if err != nil {
			why = "cannot import stomp with " + debianPython + ": " + err.Error() + ": " + string(out)
		}
	}
	if why == "" {
		return
	}
	msg := why + " (run test/run.sh, which installs Debian's python3-stomp)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// TestPythonStompPy runs test/python/roundtrip.py, which drives the broker
// with stomp.py: round trip with receipts, client-individual ACK, NACK and
// redelivery, transactions.
func TestPythonStompPy(t *testing.T) {
	requireStompPy(t)
	b := startBroker(t, nil)
	host, port, err := net.SplitHostPort(b.addr())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, debianPython, "python/roundtrip.py", host, port)
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1")
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	t.Logf("roundtrip.py:\n%s", out)
	if ctx.Err() != nil {
		t.Fatalf("roundtrip.py timed out: %v", ctx.Err())
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		t.Fatalf("roundtrip.py exited with status %d", ee.ExitCode())
	}
	if err != nil {
		t.Fatalf("roundtrip.py: %v", err)
	}
}
