package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/brokerd/brokerd/cluster"
	"github.com/spf13/cobra"
)

var adminClient = &http.Client{Timeout: 5 * time.Second}

// adminCall sends a request to a node's admin address and decodes JSON.
func adminCall(method, addr, path string, body any, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://"+addr+path, rd)
	if err != nil {
		return fmt.Errorf("--admin-addr %q: %w", addr, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := adminClient.Do(req)
	if err != nil {
		return fmt.Errorf("admin %s: %w", addr, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("admin %s: %w", addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("admin %s: %s: %s", addr, resp.Status, strings.TrimSpace(string(b)))
	}
	return json.Unmarshal(b, out)
}

// destCounts is, per node ID, how many queues it owns and how many it
// holds a copy of (besides the owner's).
type destCounts struct{ owns, copies int }

// queueCounts reads GET /v1/destinations (best effort: nil on error).
func queueCounts(addr string) map[string]destCounts {
	var ds []struct {
		Owner    string `json:"owner"`
		Replicas []struct {
			ID    string `json:"id"`
			State string `json:"state"`
		} `json:"replicas"`
	}
	if err := adminCall(http.MethodGet, addr, "/v1/destinations", nil, &ds); err != nil {
		return nil
	}
	out := map[string]destCounts{}
	for _, d := range ds {
		if d.Owner == "" {
			continue
		}
		c := out[d.Owner]
		c.owns++
		out[d.Owner] = c
		for _, r := range d.Replicas {
			if r.ID != d.Owner {
				c := out[r.ID]
				c.copies++
				out[r.ID] = c
			}
		}
	}
	return out
}

func printStatus(w io.Writer, s cluster.Status, counts map[string]destCounts) {
	conv := "yes"
	if !s.Converged {
		conv = "NO"
	}
	fmt.Fprintf(w, "cluster %s  node %s (%s)  epoch %d  converged %s  active members wanted %d\n\n",
		s.ClusterName, s.NodeName, s.NodeID, s.Epoch, conv, s.ActiveMembersWanted)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	head := "NAME\tID\tROLE\tSTATE\tSTOMP\tADMIN\tACTIVE SINCE"
	if counts != nil {
		head += "\tOWNS\tCOPIES"
	}
	fmt.Fprintln(tw, head)
	for _, m := range s.Members {
		since := "-"
		if m.ActiveSince != nil {
			since = *m.ActiveSince
		}
		line := fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s", m.Name, m.ID, m.Role, m.State, m.STOMPAddr, m.AdminAddr, since)
		if counts != nil {
			c := counts[m.ID]
			line += fmt.Sprintf("\t%d\t%d", c.owns, c.copies)
		}
		fmt.Fprintln(tw, line)
	}
	tw.Flush()
}

func statusCmd(stdout io.Writer) *cobra.Command {
	var addr string
	var asJSON bool
	c := &cobra.Command{
		Use:   "status",
		Short: "Print a node's view of the cluster (GET /v1/cluster on its admin address)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var s cluster.Status
			if err := adminCall(http.MethodGet, addr, "/v1/cluster", nil, &s); err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(s)
			}
			var counts map[string]destCounts
			if len(s.ActiveSet) > 0 {
				counts = queueCounts(addr)
			}
			printStatus(stdout, s, counts)
			return nil
		},
	}
	c.Flags().StringVar(&addr, "admin-addr", "127.0.0.1:8613", "admin address of the node to ask")
	c.Flags().BoolVar(&asJSON, "json", false, "print the JSON as the node returns it")
	return c
}

func activeMembersCmd(stdout io.Writer) *cobra.Command {
	var addr string
	c := &cobra.Command{
		Use:   "active-members N",
		Short: "Change M, the wanted number of active members, cluster-wide (PUT /v1/cluster/active-members)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := strconv.Atoi(args[0])
			if err != nil || v < 1 {
				return fmt.Errorf("active members must be an integer >= 1, got %q", args[0])
			}
			var s cluster.Status
			if err := adminCall(http.MethodPut, addr, "/v1/cluster/active-members", map[string]int{"value": v}, &s); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "active members wanted: %d (spreading by gossip)\n", s.ActiveMembersWanted)
			return nil
		},
	}
	c.Flags().StringVar(&addr, "admin-addr", "127.0.0.1:8613", "admin address of any node")
	return c
}
