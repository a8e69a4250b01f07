package test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-stomp/stomp/v3"
)

// TestProcessCorruptLogRecover: a write-ahead log damaged in the middle (a
// record fails its checksum while later ones check: not a torn last write)
// stops the start with store.recover: refuse (the default), naming the key
// that lets it start; with store.recover: truncate it starts.
func TestProcessCorruptLogRecover(t *testing.T) {
	// A long apply interval keeps the records in the log only: damage in a
	// record bbolt already holds is read past (the store's own tests cover
	// that); damage in one it does not hold must stop the start.
	p := startProc(t, t.TempDir(), procOpts{env: []string{"BROKERD_STORE_APPLY_INTERVAL=1h"}})
	q := uniqueQueue(t)
	prod := p.dial()
	for i := 0; i < 20; i++ {
		if err := prod.Send(q, "text/plain", []byte(fmt.Sprintf("m-%02d %s", i, strings.Repeat("x", 1000))), stomp.SendOpt.Receipt); err != nil {
			t.Fatalf("send: %v", err)
		}
	}
	// kill -9: the log keeps its records (a clean stop would empty it).
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, ok := p.wait(10 * time.Second); !ok {
		t.Fatal("brokerd did not die from SIGKILL")
	}

	// Flip a byte inside the record that holds m-05 (found by its body, not
	// by the log's layout): it fails its checksum while the records of
	// m-06..m-19 after it check, which is damage, not a torn last write.
	wal := filepath.Join(p.dataDir, "brokerd.db.wal")
	data, err := os.ReadFile(wal)
	if err != nil {
		t.Fatal(err)
	}
	off := bytes.Index(data, []byte("m-05 xxxx"))
	if off < 0 {
		t.Fatalf("m-05 not found in %s", wal)
	}
	f, err := os.OpenFile(wal, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{data[off+8] ^ 0xff}, int64(off+8)); err != nil {
		t.Fatal(err)
	}
	f.Close()

	args := []string{"--data-dir", p.dataDir, "--stomp-addr", freeAddr(t), "--admin-addr", freeAddr(t)}
	refused := spawn(t, args, nil, nil)
	code, ok := refused.wait(20 * time.Second)
	if !ok {
		t.Fatal("brokerd started on a log corrupt in the middle with store.recover: refuse")
	}
	msg := refused.stderr.String()
	t.Logf("refused (exit %d): %s", code, strings.TrimSpace(msg))
	if code == 0 || !strings.Contains(msg, "write-ahead log corrupt") || !strings.Contains(msg, "store.recover: truncate") {
		t.Fatalf("exit %d, stderr %q: want a failed start that says the log is corrupt and names store.recover: truncate", code, msg)
	}

	p2 := p.restart(procOpts{env: []string{"BROKERD_STORE_RECOVER=truncate"}})
	if p2.exited() {
		t.Fatal("brokerd with store.recover: truncate exited")
	}
	if _, ok := p2.destination(q); !ok {
		t.Logf("queue %s not present after truncation (its messages were all in the dropped records)", q)
	}
}
