package stomp

import (
	"bufio"
	"bytes"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/brokerd/brokerd/replica"
	"github.com/brokerd/brokerd/store"
	"github.com/go-stomp/stomp/v3/frame"
)

var (
	fuzzOnce sync.Once
	fuzzAddr string
)

// fuzzServer is one server shared by every input of a fuzz run, so state
// left by one input (queues, messages) meets the next, as on a real node.
func fuzzServer(t testing.TB, dir string) string {
	fuzzOnce.Do(func() {
		scfg := store.DefaultConfig(filepath.Join(dir, "fuzz.db"))
		scfg.Sync = store.SyncNone
		st, err := store.Open(scfg)
		if err != nil {
			t.Fatal(err)
		}
		st.Start()
		rcfg := replica.DefaultConfig()
		rcfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
		rep := replica.New(rcfg, st)
		rep.Start()
		cfg := DefaultConfig()
		cfg.Addr = "127.0.0.1:0"
		cfg.Limits = Limits{MaxFrameSize: 4096, MaxHeaderCount: 16, MaxHeaderLineLen: 256, MaxBodySize: 2048}
		cfg.ConnectTimeout = time.Second
		cfg.Logger = rcfg.Logger
		srv := NewServer(cfg, Local(rep))
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		fuzzAddr = srv.Addr().String()
	})
	return fuzzAddr
}

// FuzzServer feeds arbitrary bytes to the server's whole frame path over
// TCP: parsing, validation, the session's handling and the broker behind
// it. The server must not crash or hang; what it answers must be
// well-formed frames; after an ERROR it must say nothing more and close.
func FuzzServer(f *testing.F) {
	seeds := []string{
		"CONNECT\naccept-version:1.2\nhost:/\n\n\x00SEND\ndestination:/queue/a\nreceipt:1\n\nhello\x00SUBSCRIBE\nid:1\ndestination:/queue/a\nack:client\n\n\x00",
		"CONNECT\naccept-version:1.1\nhost:/\n\n\x00SUBSCRIBE\nid:s\ndestination:/topic/t\n\n\x00SEND\ndestination:/topic/t\n\nx\x00DISCONNECT\nreceipt:d\n\n\x00",
		"STOMP\naccept-version:1.2\nhost:/\nheart-beat:10,10\n\n\x00\n\nBEGIN\ntransaction:t\n\n\x00SEND\ndestination:/queue/b\ntransaction:t\ncontent-length:3\n\na\x00b\x00COMMIT\ntransaction:t\nreceipt:c\n\n\x00",
		"CONNECT\n\n\x00SEND\ndestination:/queue/a\n\n\x00ACK\nmessage-id:x\n\n\x00",
		"CONNECT\naccept-version:1.2\nhost:/\n\n\x00SEND\ndestination:/queue/a\nx:a\\tb\n\n\x00",
		"CONNECT\naccept-version:9\n\n\x00",
		"SEND\n\n\x00",
		"CONNECT\naccept-version:1.2\nhost:/\n\n\x00SUBSCRIBE\nid:1\ndestination:/queue/a\nack:client-individual\nprefetch-count:1\n\n\x00NACK\nid:1.1\n\n\x00ACK\nid:1.2\n\n\x00",
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, in []byte) {
		addr := fuzzServer(t, dir)
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		var out bytes.Buffer
		done := make(chan error, 1)
		go func() { _, err := io.Copy(&out, c); done <- err }()
		_, _ = c.Write(in)
		_ = c.(*net.TCPConn).CloseWrite()
		if err := <-done; err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatalf("server did not close the connection within 10 s of EOF; output %q", out.Bytes())
			}
			// A reset after the server's close is fine; the output is checked below.
		}
		r := frame.NewReader(bufio.NewReader(&out))
		sawError := false
		for {
			fr, err := r.Read()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("server sent a malformed frame: %v; output %q", err, out.Bytes())
			}
			if fr == nil {
				continue
			}
			if sawError {
				t.Fatalf("server sent %s after ERROR; output %q", fr.Command, out.Bytes())
			}
			switch fr.Command {
			case frame.CONNECTED, frame.MESSAGE, frame.RECEIPT:
			case frame.ERROR:
				sawError = true
				if fr.Header.Get(frame.Message) == "" {
					t.Fatalf("ERROR without a message header; output %q", out.Bytes())
				}
			default:
				t.Fatalf("server sent a %s frame", fr.Command)
			}
		}
	})
}
