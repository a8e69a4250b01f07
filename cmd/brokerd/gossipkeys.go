package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"

	"github.com/brokerd/brokerd/cmd/brokerd/node"
	"github.com/spf13/cobra"
)

// gossipKeysCmd is `brokerd gossip-keys list | install KEY | use KEY |
// remove KEY`: serf's keys command for brokerd's gossip keyring, through
// the admin API of any node (which applies the operation on every alive
// member and answers node by node).
func gossipKeysCmd(stdin io.Reader, stdout io.Writer) *cobra.Command {
	c := &cobra.Command{
		Use:   "gossip-keys",
		Short: "List or rotate the gossip encryption keys across the running cluster",
		Long: `Rotate the gossip key without downtime, through the admin API of any node:

  brokerd gossip-keys install NEW   # every node accepts NEW
  brokerd gossip-keys use NEW       # every node encrypts with NEW (refused unless every node has it)
  brokerd gossip-keys remove OLD    # every node forgets OLD (refused while it is a node's primary)
  brokerd gossip-keys list

KEY is base64 (16, 24 or 32 bytes: openssl rand -base64 32), or - to read it
from standard input. Each node keeps its keyring in <data_dir>/gossip-keyring,
which wins over cluster.secret_key_file once it exists; put the new key in
cluster.secret_key_file too, for nodes started with an empty data directory.
The same keys authenticate peer links. An operation that did not reach every
node exits with status 1: repeat it once they are back (each is idempotent).`,
	}
	for _, op := range []struct{ name, short string }{
		{"install", "Add KEY to every node's keyring (they accept it; none encrypts with it yet)"},
		{"use", "Make KEY the primary key of every node (refused unless every alive node has it)"},
		{"remove", "Remove KEY from every node's keyring (refused while it is a node's primary key)"},
	} {
		var target *adminTarget
		sub := &cobra.Command{
			Use:   op.name + " KEY",
			Short: op.short,
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				key, err := readKeyArg(args[0], stdin)
				if err != nil {
					return err
				}
				var res node.GossipKeys
				if err := target.call(http.MethodPost, "/v1/gossip-keys/"+op.name, map[string]string{"key": key}, &res); err != nil {
					return err
				}
				printKeyResult(stdout, res)
				if !res.OK {
					return fmt.Errorf("%s did not take effect on every node (see above); repeat it once they are back", op.name)
				}
				return nil
			},
		}
		target = addAdminFlags(sub)
		c.AddCommand(sub)
	}
	var target *adminTarget
	var asJSON bool
	list := &cobra.Command{
		Use:   "list",
		Short: "List the keys of every node, and on how many nodes each is installed and primary",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var res node.GossipKeys
			if err := target.call(http.MethodGet, "/v1/gossip-keys", nil, &res); err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				if err := enc.Encode(res); err != nil {
					return err
				}
			} else {
				printKeyList(stdout, res)
			}
			if !res.OK {
				return errors.New("some nodes did not answer (see above)")
			}
			return nil
		},
	}
	target = addAdminFlags(list)
	list.Flags().BoolVar(&asJSON, "json", false, "print the JSON as the node returns it")
	c.AddCommand(list)
	return c
}

// readKeyArg returns the key argument, or the first line of stdin for
// "-" (a key on the command line is visible to other local users).
func readKeyArg(arg string, stdin io.Reader) (string, error) {
	if arg != "-" {
		return strings.TrimSpace(arg), nil
	}
	line, err := bufio.NewReader(stdin).ReadString('\n')
	if err != nil && line == "" {
		return "", fmt.Errorf("read the key from stdin: %w", err)
	}
	key := strings.TrimSpace(line)
	if key == "" {
		return "", errors.New("empty key on stdin")
	}
	return key, nil
}

func printKeyList(w io.Writer, res node.GossipKeys) {
	fmt.Fprintf(w, "%d nodes answered of %d asked\n\n", answered(res.Nodes), res.Members)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY ID\tINSTALLED\tPRIMARY\tKEY")
	for _, k := range res.Keys {
		fmt.Fprintf(tw, "%s\t%d/%d\t%d/%d\t%s\n", k.KeyID, k.Nodes, res.Members, k.PrimaryOn, res.Members, k.Key)
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tID\tPRIMARY\tOTHER KEYS\tERROR")
	for _, nk := range res.Nodes {
		primary, others := "-", "-"
		if len(nk.KeyIDs) > 0 {
			primary = nk.KeyIDs[0]
		}
		if len(nk.KeyIDs) > 1 {
			others = strings.Join(nk.KeyIDs[1:], ",")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", nk.NodeName, nk.NodeID, primary, others, nk.Error)
	}
	tw.Flush()
	printNotReached(w, res)
}

func printKeyResult(w io.Writer, res node.GossipKeys) {
	fmt.Fprintf(w, "%s key %s: done on %d of %d nodes\n", res.Op, res.KeyID, answered(res.Nodes), res.Members)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, nk := range res.Nodes {
		state := "ok"
		if !nk.OK {
			state = "FAILED: " + nk.Error
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", nk.NodeName, nk.NodeID, state)
	}
	tw.Flush()
	printNotReached(w, res)
}

func printNotReached(w io.Writer, res node.GossipKeys) {
	for _, m := range res.NotReached {
		fmt.Fprintf(w, "not asked: %s (%s) is %s; it needs the new keys when it comes back\n", m.NodeName, m.NodeID, m.State)
	}
}

func answered(nodes []node.NodeKeys) int {
	n := 0
	for _, nk := range nodes {
		if nk.OK {
			n++
		}
	}
	return n
}
