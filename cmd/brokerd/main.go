// Command brokerd runs one node of a brokerd STOMP broker cluster.
//
//	brokerd                       # single node, embedded defaults
//	brokerd --config brokerd.yaml # see brokerd.example.yaml
//	brokerd passwd alice          # print a users-file line
//	brokerd status                # a node's view of the cluster (admin API)
//	brokerd reload                # reread users, ACL, certificates, admin token (as SIGHUP)
//	brokerd queues                # every queue: pending, in flight, owner, replicas
//	brokerd purge QUEUE           # remove a queue's ready messages cluster-wide
//	brokerd drain NODE            # maintenance: hand its queues over, take no clients
//	brokerd undrain NODE          # end maintenance
//
// The commands that call the admin API take --admin-addr, --token-file,
// --ca-file, --cert-file and --key-file.
package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/brokerd/brokerd/cmd/brokerd/node"
	"github.com/brokerd/brokerd/config"
	"github.com/brokerd/brokerd/stomp"
	"github.com/spf13/cobra"
)

func main() {
	os.Exit(run(os.Args[1:], os.Environ(), os.Stdin, os.Stdout, os.Stderr))
}

// exit codes
const (
	exitOK     = 0
	exitFail   = 1
	exitConfig = 2
	// exitStoreFailed: the store failed (a write or fsync of the log or of
	// bbolt); a restart replays the write-ahead log.
	exitStoreFailed = 3
)

// Shutdown bounds: the node's own, and how long main waits for it before
// exiting anyway (a store whose fsync hangs must not keep the process up).
const (
	shutdownTimeout = 5 * time.Second
	shutdownHardCap = 10 * time.Second
)

func run(args, environ []string, stdin io.Reader, stdout, stderr io.Writer) int {
	code := exitOK
	root := &cobra.Command{
		Use:           "brokerd",
		Short:         "A leaderless, replicated STOMP message broker",
		Long:          "brokerd runs one broker node. With no flags it serves STOMP on 127.0.0.1:61613 and admin HTTP on 127.0.0.1:8613, keeping its data in ./data.",
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.Load(cmd.Flags(), environ)
			if err != nil {
				code = exitConfig
				return err
			}
			code = serve(cfg, stderr)
			return nil
		},
	}
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	config.RegisterFlags(root.Flags())
	root.AddCommand(passwdCmd(stdin, stdout), versionCmd(stdout))
	// Commands that call a node's admin API (their flags: addAdminFlags).
	root.AddCommand(statusCmd(stdout))
	root.AddCommand(activeMembersCmd(stdout))
	root.AddCommand(reloadCmd(stdout))
	root.AddCommand(opsCmds(stdout)...) // queues, purge, drain, undrain (ops.go)
	root.AddCommand(gossipKeysCmd(stdin, stdout))
	if err := root.Execute(); err != nil {
		fmt.Fprintf(stderr, "brokerd: %v\n", err)
		if code == exitOK {
			code = exitCodeOf(err)
		}
	}
	return code
}

func newLogger(cfg config.Log, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Level))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// serve runs the node until SIGTERM or SIGINT, or until its store fails.
func serve(cfg config.Config, stderr io.Writer) int {
	log := newLogger(cfg.Log, stderr)
	n, err := node.New(cfg, log)
	if err != nil {
		fmt.Fprintf(stderr, "brokerd: %v\n", err)
		return exitFail
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := n.Start(); err != nil {
		fmt.Fprintf(stderr, "brokerd: %v\n", err)
		return exitFail
	}
	log.Info("brokerd started", "node_id", n.ID(), "stomp", n.STOMPAddr(), "stomp_tls", n.STOMPTLSAddr(), "stomp_ws", n.STOMPWSAddr(), "stomp_wss", n.STOMPWSSAddr(), "admin", n.AdminAddr(), "data_dir", cfg.Node.DataDir)
	code := exitOK
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
wait:
	for {
		select {
		case <-hup:
			log.Info("SIGHUP: reloading users, ACL, certificates, keys and the admin token")
			_ = n.Reload() // logged; a part that fails keeps its old rules
		case <-ctx.Done():
			log.Info("shutting down")
			break wait
		case <-n.Failed():
			log.Error("exiting: the store failed", "err", n.Err(), "exit_code", exitStoreFailed)
			code = exitStoreFailed
			break wait
		}
	}
	stop() // a second signal kills the process the default way
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- n.Shutdown(sctx) }()
	select {
	case err := <-done:
		if err != nil {
			log.Warn("shutdown incomplete", "err", err)
		}
	case <-time.After(shutdownHardCap):
		log.Error("shutdown did not finish; exiting anyway", "waited", shutdownHardCap)
		if code == exitOK {
			code = exitFail
		}
		return code
	}
	if code != exitOK {
		log.Error("stopped after a store failure", "err", n.Err(), "exit_code", code)
		return code
	}
	log.Info("stopped")
	return exitOK
}

func passwdCmd(stdin io.Reader, stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "passwd NAME",
		Short: "Read a password on stdin and print a users-file line (NAME:bcrypt-hash) for auth.users_file",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			line, err := bufio.NewReader(stdin).ReadString('\n')
			if err != nil && line == "" {
				return fmt.Errorf("read password from stdin: %w", err)
			}
			pw := strings.TrimRight(line, "\r\n")
			if pw == "" {
				return fmt.Errorf("empty password")
			}
			out, err := stomp.HashPassword(args[0], pw)
			if err != nil {
				return err
			}
			fmt.Fprintln(stdout, out)
			return nil
		},
	}
}

func versionCmd(stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run:   func(*cobra.Command, []string) { fmt.Fprintln(stdout, "brokerd", node.Version) },
	}
}
