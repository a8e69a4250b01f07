package test

// Disk-full behaviour of the real binary, on a small tmpfs: fail-stop when
// the store cannot write, and the low-disk alarm before it comes to that.
// Mounting needs root; the tests skip otherwise.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-stomp/stomp/v3/frame"
)

// mountTmpfs mounts a tmpfs of size (mount's syntax, "16m") on a fresh
// directory and unmounts it when the test ends (after the processes started
// later are killed: cleanups run last-registered first).
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs for the data directory (run the tests as root)")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs (no CAP_SYS_ADMIN?): %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// remountTmpfs changes the size of the tmpfs on dir, keeping its files.
func remountTmpfs(t *testing.T, dir, size string) {
	t.Helper()
	if out, err := exec.Command("mount", "-o", "remount,size="+size, dir).CombinedOutput(); err != nil {
		t.Fatalf("remount %s with size %s: %v: %s", dir, size, err, out)
	}
}

// freeBytes is the space left for an unprivileged writer on dir's
// filesystem.
func freeBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatalf("statfs %s: %v", dir, err)
	}
	return int64(st.Bavail) * int64(st.Bsize)
}

// fill writes a file of n bytes (real blocks, not a hole).
func fill(t *testing.T, path string, n int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = 'f'
	}
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := f.Write(buf[:k]); err != nil {
			t.Fatalf("fill %s: %v", path, err)
		}
		n -= k
	}
}

// stompClient is a bare STOMP 1.2 connection whose errors are values, for
// tests in which the broker is expected to refuse or go away.
type stompClient struct {
	c net.Conn
	r *frame.Reader
	w *frame.Writer
}

func connectClient(addr string) (*stompClient, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	sc := &stompClient{c: c, r: frame.NewReader(bufio.NewReader(c)), w: frame.NewWriter(c)}
	f, err := sc.roundTrip(frame.New(frame.CONNECT, frame.AcceptVersion, "1.2", frame.Host, "/", frame.HeartBeat, "0,0"))
	if err != nil {
		c.Close()
		return nil, err
	}
	if f.Command != frame.CONNECTED {
		c.Close()
		return nil, fmt.Errorf("CONNECT answered with %s %v %q", f.Command, f.Header, f.Body)
	}
	return sc, nil
}

// roundTrip writes f and returns the next frame, within 10 s.
func (sc *stompClient) roundTrip(f *frame.Frame) (*frame.Frame, error) {
	_ = sc.c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := sc.w.Write(f); err != nil {
		return nil, err
	}
	return sc.next()
}

// next reads the next frame that is not a heart-beat, within 10 s.
func (sc *stompClient) next() (*frame.Frame, error) {
	_ = sc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		f, err := sc.r.Read()
		if err != nil {
			return nil, err
		}
		if f != nil {
			return f, nil
		}
	}
}

// send sends body to q with a receipt and returns the answer: RECEIPT (nil
// error), ERROR (as an error frame), or a connection error.
func (sc *stompClient) send(q, receipt, body string) (*frame.Frame, error) {
	f := frame.New(frame.SEND, frame.Destination, q, frame.Receipt, receipt, frame.ContentType, "text/plain", "persistent", "true")
	f.Body = []byte(body)
	return sc.roundTrip(f)
}

func (sc *stompClient) close() { sc.c.Close() }

// body returns a message body of size bytes that starts with id and a space.
func body(id string, size int) string {
	return id + " " + strings.Repeat("x", size-len(id)-1)
}

// TestProcessFailStopDiskFull: the data directory is a 16 MiB tmpfs; the
// write-ahead log (1 MiB, preallocated) always has room, bbolt runs out.
// brokerd is sent receipted 64 KiB messages until it refuses: it must exit
// with status 3 within a bounded time and log the cause at error level, and
// after a restart with more space every message that got a RECEIPT is
// delivered (from the log), once.
func TestProcessFailStopDiskFull(t *testing.T) {
	mnt := mountTmpfs(t, "16m")
	dataDir := filepath.Join(mnt, "data")
	env := []string{"BROKERD_STORE_WAL_SIZE=1MiB", "BROKERD_STORE_MIN_FREE_BYTES=0", "BROKERD_LOG_FORMAT=json"}
	p := startProc(t, dataDir, procOpts{env: env})
	q := uniqueQueue(t)

	const size = 64 << 10
	receipted := map[string]bool{}
	var refusal string // how the broker stopped answering
	sc, err := connectClient(p.stompAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { sc.close() }()
	for i := 0; i < 2000 && refusal == ""; i++ {
		id := fmt.Sprintf("m-%05d", i)
		f, err := sc.send(q, id, body(id, size))
		switch {
		case err != nil:
			refusal = "connection: " + err.Error()
		case f.Command == frame.RECEIPT && f.Header.Get(frame.ReceiptId) == id:
			receipted[id] = true
		case f.Command == frame.ERROR:
			refusal = fmt.Sprintf("ERROR %q (receipt-id %q)", f.Header.Get(frame.Message), f.Header.Get(frame.ReceiptId))
		default:
			t.Fatalf("SEND %s answered with %s %v", id, f.Command, f.Header)
		}
	}
	if refusal == "" {
		t.Fatalf("2000 messages of 64 KiB accepted on a 16 MiB tmpfs")
	}
	t.Logf("%d messages receipted, then %s", len(receipted), refusal)
	if len(receipted) == 0 {
		t.Fatal("not one message was accepted before the disk was full")
	}

	// Fail-stop: the process exits by itself, non-zero, and says why.
	code, ok := p.wait(20 * time.Second)
	if !ok {
		t.Fatalf("brokerd still running 20 s after its store ran out of space")
	}
	if code != 3 {
		t.Errorf("exit status %d after the store failed, want 3", code)
	}
	logs := p.stderr.String()
	var sawCause bool
	for _, line := range strings.Split(logs, "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) != nil {
			continue
		}
		if rec["level"] == "ERROR" && strings.Contains(fmt.Sprint(rec["err"]), "no space left on device") {
			sawCause = true
		}
	}
	if !sawCause {
		t.Errorf("no error-level log line with the cause (no space left on device); stderr:\n%s", logs)
	}
	// It stopped listening: nobody can send to a failed store.
	if c, err := connectClient(p.stompAddr); err == nil {
		c.close()
		t.Errorf("STOMP still accepts connections after the process exited")
	}

	// More room, restart: the log is replayed; every receipted message is
	// there exactly once.
	remountTmpfs(t, mnt, "256m")
	p2 := p.restart(procOpts{env: env})
	got := drain(t, p2.dial(), q, 2*time.Second)
	seen := map[string]int{}
	for _, b := range got {
		id, _, _ := strings.Cut(b, " ")
		if len(b) != size {
			t.Errorf("%s came back with %d bytes, want %d", id, len(b), size)
		}
		seen[id]++
	}
	missing := 0
	for id := range receipted {
		if seen[id] == 0 {
			missing++
			if missing <= 10 {
				t.Errorf("%s got a RECEIPT but is gone after the disk-full stop and restart", id)
			}
		}
	}
	for id, n := range seen {
		if n > 1 {
			t.Errorf("%s delivered %d times after restart", id, n)
		}
	}
	if missing > 0 {
		t.Errorf("%d of %d receipted messages missing", missing, len(receipted))
	}
	t.Logf("after restart: %d messages, %d receipted before the stop", len(got), len(receipted))
}

// healthz returns /healthz's status code and JSON body.
func healthz(t *testing.T, p *proc) (int, map[string]string) {
	t.Helper()
	code, b := p.get("/healthz")
	var body map[string]string
	if err := json.Unmarshal(b, &body); err != nil {
		t.Fatalf("GET /healthz: %d %q: %v", code, b, err)
	}
	return code, body
}

// sendUntilRefused sends receipted messages of size bytes, one per pace,
// until one is refused with an ERROR whose message contains want (returned),
// for at most d; accepted ids are added to receipted. The pace keeps the
// disk from filling faster than the broker's free-space check (every
// second) can raise the alarm: this tests the alarm, not the fail-stop.
func sendUntilRefused(t *testing.T, p *proc, q, prefix string, size int, pace time.Duration, receipted map[string]bool, want string, d time.Duration) *frame.Frame {
	t.Helper()
	deadline := time.Now().Add(d)
	var sc *stompClient
	defer func() {
		if sc != nil {
			sc.close()
		}
	}()
	for i := 0; ; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("no SEND refused with %q within %v (%d accepted)", want, d, i)
		}
		if sc == nil {
			var err error
			if sc, err = connectClient(p.stompAddr); err != nil {
				t.Fatalf("connect: %v", err)
			}
		}
		id := fmt.Sprintf("%s-%05d", prefix, i)
		f, err := sc.send(q, id, body(id, size))
		if err != nil {
			t.Fatalf("SEND %s: %v", id, err)
		}
		switch f.Command {
		case frame.RECEIPT:
			receipted[id] = true
			time.Sleep(pace)
		case frame.ERROR:
			if msg := f.Header.Get(frame.Message); !strings.Contains(msg, want) {
				t.Fatalf("SEND %s: ERROR %q, want %q", id, msg, want)
			}
			if rid := f.Header.Get(frame.ReceiptId); rid != id {
				t.Errorf("ERROR for SEND %s has receipt-id %q, want %q", id, rid, id)
			}
			return f
		default:
			t.Fatalf("SEND %s answered with %s", id, f.Command)
		}
	}
}

// sendAccepted retries one receipted SEND on fresh connections (a refusal
// may close the connection) until it gets its RECEIPT, for at most d, and
// fails the test if every try was refused.
func sendAccepted(t *testing.T, p *proc, q, id string, size int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	var last string
	for try := 0; time.Now().Before(deadline); try++ {
		sc, err := connectClient(p.stompAddr)
		if err != nil {
			t.Fatalf("connect: %v", err)
		}
		f, err := sc.send(q, fmt.Sprintf("%s-try%d", id, try), body(id, size))
		sc.close()
		if err != nil {
			t.Fatalf("SEND %s: %v", id, err)
		}
		if f.Command == frame.RECEIPT {
			return
		}
		last = f.Header.Get(frame.Message)
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("SEND %s still refused after %v: %q", id, d, last)
}

// TestProcessLowDiskAlarm: with store.min_free_bytes set, a broker whose
// disk fills up refuses SENDs (ERROR "broker low on disk space", carrying
// the receipt-id, nothing stored) instead of failing, says so on /healthz
// (still 200: consumers must reach it to drain) and in
// brokerd_store_disk_alarm, keeps delivering to consumers and taking their
// ACKs, and accepts SENDs again without a restart once space comes back:
// first by draining (bbolt's free pages count as free), then by deleting a
// file that filled the disk.
func TestProcessLowDiskAlarm(t *testing.T) {
	mnt := mountTmpfs(t, "64m")
	dataDir := filepath.Join(mnt, "data")
	const minFree = 8 << 20
	env := []string{"BROKERD_STORE_WAL_SIZE=1MiB", fmt.Sprintf("BROKERD_STORE_MIN_FREE_BYTES=%d", minFree)}
	p := startProc(t, dataDir, procOpts{env: env})
	q := uniqueQueue(t)
	if code, h := healthz(t, p); code != http.StatusOK || h["status"] != "ok" {
		t.Fatalf("/healthz before: %d %v", code, h)
	}
	if v, ok := p.metric("brokerd_store_disk_alarm"); !ok || v != 0 {
		t.Fatalf("brokerd_store_disk_alarm = %v (present %v) before filling, want 0", v, ok)
	}

	// Leave about 6 MiB above the threshold, for messages to fill.
	filler := filepath.Join(mnt, "filler")
	fill(t, filler, freeBytes(t, mnt)-minFree-6<<20)

	const size = 64 << 10
	receipted := map[string]bool{}
	// 64 KiB every 50 ms: 1.3 MiB/s, against 8 MiB kept free.
	sendUntilRefused(t, p, q, "a", size, 50*time.Millisecond, receipted, "broker low on disk space", 30*time.Second)
	t.Logf("%d messages accepted before the alarm; %d bytes free", len(receipted), freeBytes(t, mnt))
	if len(receipted) == 0 {
		t.Fatal("the alarm refused the first SEND: the filler left too little room")
	}
	if code, h := healthz(t, p); code != http.StatusOK || h["status"] != "degraded" || h["reason"] != "low disk space" {
		t.Errorf("/healthz during the alarm: %d %v, want 200 degraded, low disk space", code, h)
	}
	p.waitMetric(eq(1), "brokerd_store_disk_alarm")
	if _, err := connectClient(p.stompAddr); err != nil {
		t.Fatalf("a client cannot connect during the alarm: %v", err)
	}

	// Consumers still receive and acknowledge everything.
	rc := p.raw()
	rc.connect()
	rc.frame("SUBSCRIBE", "", "id", "s", "destination", q, "ack", "client-individual", "receipt", "sub")
	pending := rc.awaitReceipt("sub")
	got := map[string]bool{}
	for len(got) < len(receipted) {
		var m *frame.Frame
		if len(pending) > 0 {
			m, pending = pending[0], pending[1:]
		} else if m = rc.read(); m.Command != frame.MESSAGE {
			t.Fatalf("want MESSAGE, got %s %v", m.Command, m.Header)
		}
		id, _, _ := strings.Cut(string(m.Body), " ")
		if !receipted[id] || got[id] {
			t.Fatalf("delivered %q: not receipted, or twice (a refused SEND must store nothing)", id)
		}
		got[id] = true
		rid := "ack-" + id
		rc.frame("ACK", "", "id", m.Header.Get(frame.Ack), "receipt", rid)
		pending = append(pending, rc.awaitReceipt(rid)...)
	}

	// Drained: bbolt's freed pages are free space, so SENDs are accepted
	// again without a restart, though the file did not shrink.
	sendAccepted(t, p, q, "after-drain", size, 15*time.Second)
	if code, h := healthz(t, p); code != http.StatusOK || h["status"] != "ok" {
		t.Errorf("/healthz after the drain: %d %v, want 200 ok", code, h)
	}
	p.waitMetric(eq(0), "brokerd_store_disk_alarm")

	// Another file takes the room: refused again; it goes: accepted again.
	filler2 := filepath.Join(mnt, "filler2")
	fill(t, filler2, freeBytes(t, mnt)-minFree/2)
	sendUntilRefused(t, p, q, "b", size, 50*time.Millisecond, map[string]bool{}, "broker low on disk space", 30*time.Second)
	if err := os.Remove(filler2); err != nil {
		t.Fatal(err)
	}
	sendAccepted(t, p, q, "after-delete", size, 15*time.Second)
	p.waitMetric(eq(0), "brokerd_store_disk_alarm")
	if p.exited() {
		t.Fatalf("brokerd exited during the alarm")
	}
}
