package cli

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/repo"
)

// writerSeen is a signer found in the repository.
type writerSeen struct {
	repo      *repo.Repository // the repository (or namespace) it wrote to
	num       repo.WriterNum
	w         repo.KnownWriter
	snapshots int
	last      time.Time
}

// writersSeen loads the index and snapshots of the repository and its
// isolated namespaces and returns every writer key (not the owner) that
// signed something in them.
func (g *globals) writersSeen(ctx context.Context) (*repoSet, []writerSeen, error) {
	set, err := g.openSet(ctx, true)
	if err != nil {
		return nil, nil, err
	}
	var out []writerSeen
	for _, r := range set.all {
		snaps, err := g.snapshots(ctx, r)
		if err != nil {
			return nil, nil, err
		}
		byNum := map[repo.WriterNum]*writerSeen{}
		for n := repo.WriterNum(1); n < repo.NoWriter; n++ {
			w, ok := r.Writers().Get(n)
			if !ok {
				break
			}
			if n != r.Self() || !r.Keys().IsOwner() {
				byNum[n] = &writerSeen{repo: r, num: n, w: w}
			}
		}
		for _, sn := range snaps {
			if ws := byNum[sn.Writer]; ws != nil {
				ws.snapshots++
				if sn.Time.After(ws.last) {
					ws.last = sn.Time
				}
			}
		}
		for _, ws := range byNum {
			out = append(out, *ws)
		}
	}
	slices.SortFunc(out, func(a, b writerSeen) int {
		return strings.Compare(a.w.Name()+hex.EncodeToString(a.w.Key[:]), b.w.Name()+hex.EncodeToString(b.w.Key[:]))
	})
	return set, out, nil
}

func newKeyListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the write-only keys that have written to the repository",
		Long: `List every writer key whose signature is on something in the repository
(snapshots, index objects, packs): its name, key fingerprint, the hosts its
certificate allows, how many snapshots it signed, and whether the owner
revoked it.`,
		Example: `  sauve key list
  sauve key list --json`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			_, ws, err := g.writersSeen(cmd.Context())
			if err != nil {
				return err
			}
			if g.json {
				out := []map[string]any{}
				for _, w := range ws {
					out = append(out, writerJSON(w))
				}
				return g.printJSON(out)
			}
			tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "Name\tKey\tHosts\tSnapshots\tLast\tRevoked")
			for _, w := range ws {
				last, revoked := "", ""
				if !w.last.IsZero() {
					last = w.last.Local().Format("2006-01-02 15:04")
				}
				if !w.w.RevokedAt.IsZero() {
					revoked = w.w.RevokedAt.Local().Format("2006-01-02 15:04")
				}
				fmt.Fprintf(tw, "%s\t%x\t%s\t%d\t%s\t%s\n", w.w.Name(), w.w.Key[:8], strings.Join(scopeOf(w.w), ","), w.snapshots, last, revoked)
			}
			tw.Flush()
			return nil
		},
	}
}

func scopeOf(w repo.KnownWriter) []string {
	if w.Cert == nil {
		return nil
	}
	return w.Cert.Scope()
}

func writerJSON(w writerSeen) map[string]any {
	m := map[string]any{"name": w.w.Name(), "key": hex.EncodeToString(w.w.Key[:]), "hosts": scopeOf(w.w), "snapshots": w.snapshots, "revoked": !w.w.RevokedAt.IsZero()}
	if ns := w.repo.Keys().Namespace; ns != "" {
		m["namespace"] = ns
	}
	if !w.last.IsZero() {
		m["last_snapshot"] = w.last
	}
	if !w.w.RevokedAt.IsZero() {
		m["revoked_at"] = w.w.RevokedAt
	}
	return m
}

func newKeyRevokeCmd(g *globals) *cobra.Command {
	var dry bool
	cmd := &cobra.Command{
		Use:   "revoke NAME|KEY",
		Short: "Revoke a write-only key: its snapshots are marked and its word no longer trusted",
		Long: `Revoke the write-only key named NAME (or whose key fingerprint starts with
KEY, as 'sauve key list' shows it; at least 8 hex digits). Needs the owner's
key. The revocation is recorded in the repository's ledger, signed by the
owner: every snapshot the key signed is then marked (never 'latest'; name
it by ID to restore it anyway), and no backup reuses chunks on its word
alone. Revoke a key that was stolen or that left service, and take its
storage credentials away too: revoking does not stop it from writing
objects, only from being believed.`,
		Example: `  sauve key list
  sauve key revoke web1
  sauve key revoke 3f2a9c01d4e5b6a7`,
		Args: exactArgs(1, "the NAME or KEY fingerprint of the writer to revoke"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			set, ws, err := g.writersSeen(ctx)
			if err != nil {
				return err
			}
			if !set.main.Keys().IsOwner() {
				return errors.New("only the owner's key can revoke a writer")
			}
			match := matchWriters(ws, args[0])
			if len(match) == 0 {
				return fmt.Errorf("no writer named or with a key starting %q has signed anything in this repository ('sauve key list' shows those that have)", args[0])
			}
			if !dry {
				for _, w := range match {
					ev := []repo.LedgerEvent{{Kind: repo.EventWriterRevoked, Signer: w.w.Key[:], Name: w.w.Name()}}
					if err := w.repo.SaveLedger(ctx, ev); err != nil {
						return namespaceErr(w.repo, err)
					}
				}
			}
			if g.json {
				out := []map[string]any{}
				for _, w := range match {
					out = append(out, writerJSON(w))
				}
				return g.printJSON(map[string]any{"revoked": out, "dry_run": dry})
			}
			verb := "revoked"
			if dry {
				verb = "would revoke"
			}
			for _, w := range match {
				g.printf("%s writer %s (key %x, %d snapshots)\n", verb, w.w.Name(), w.w.Key[:8], w.snapshots)
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&dry, "dry-run", "n", false, "say which keys would be revoked")
	return cmd
}

// matchWriters finds writers by name, or by key fingerprint prefix.
func matchWriters(ws []writerSeen, arg string) []writerSeen {
	var out []writerSeen
	lower := strings.ToLower(arg)
	for _, w := range ws {
		byKey := len(lower) >= 8 && strings.HasPrefix(hex.EncodeToString(w.w.Key[:]), lower)
		if byKey || (w.w.Cert != nil && w.w.Cert.Name == arg) {
			out = append(out, w)
		}
	}
	return out
}
