package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/repo"
)

func newKeyCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "key",
		Short: "Show, export and protect keys",
		Long: `Manage the keys of a repository.

A full key backs up, restores and certifies other keys. A write-only key
(sauve key export --write-only) backs up and deduplicates but cannot decrypt
any chunk: give it to the machines that only send backups, so that a stolen
machine cannot read the repository. Its backups are signed and verified on
restore like the owner's.`,
		Example: `  sauve key show
  sauve key export --write-only --name web1 /tmp/web1.key
  sauve key export --write-only --name vmhost --host 'vm-*' /tmp/vmhost.key
  sauve key list
  sauve key revoke web1
  SAUVE_NEW_PASSPHRASE='new words' sauve key passwd`,
	}
	cmd.AddCommand(newKeyExportCmd(g), newKeyShowCmd(g), newKeyPasswdCmd(g), newKeyListCmd(g), newKeyRevokeCmd(g))
	return cmd
}

// keyForRepo loads the key of the repository at --repo.
func (g *globals) keyForRepo(cmd *cobra.Command) (*crypto.Keys, string, error) {
	be, err := g.openBackend()
	if err != nil {
		return nil, "", err
	}
	cfg, err := repo.ReadConfig(cmd.Context(), be)
	if err != nil {
		return nil, "", err
	}
	return g.loadKeys(cfg.ID)
}

func newKeyExportCmd(g *globals) *cobra.Command {
	var writeOnly, isolated bool
	var name string
	var hosts []string
	cmd := &cobra.Command{
		Use:   "export FILE",
		Short: "Write a copy of the key, or a write-only key, to FILE",
		Long: `Write a key for the repository to FILE (mode 0600, never overwritten).

With --write-only the new key can back up but not restore; it gets its own
signing key, certified by the owner's, and --name labels it (default: this
host; "owner" is reserved). Its certificate names the hosts it may back up
(--host, repeatable, with shell-style patterns such as 'vm-*'; default: its
name): a snapshot it signs for another host is marked, never taken as
'latest', so a stolen key cannot plant the disk that another machine's
restore would pick. Without --write-only, FILE is a copy of the full key.
The new file is protected by the passphrase from $SAUVE_NEW_PASSPHRASE, or
one asked on the terminal.

A write-only key reads the metadata of every host's backups (host names,
partitions, which chunks are equal, zero or changed) and can confirm a
guess of a chunk's content. With --isolated it gets a namespace of its own
instead: a repository inside this one, under isolated/<namespace>, with
metadata and ID keys that only the owner can derive. It then learns nothing
of the other hosts' backups nor they of its, at the cost of deduplication
with them (docs/BENCHMARKS.md measures it). The owner's key reads every
namespace: snapshots, restore, check and repair span them all.

What a write-only key can and cannot do is in docs/SECURITY.md.`,
		Example: `  sauve key export --write-only --name web1 /tmp/web1.key
  sauve key export --write-only --name hv1 --host 'vm-*' --host hv1 /tmp/hv1.key
  sauve key export --write-only --isolated --name payroll /tmp/payroll.key
  sauve key export /media/usb/sauve-full.key`,
		Args: exactArgs(1, "the FILE to write"),
		RunE: func(cmd *cobra.Command, args []string) error {
			keys, _, err := g.keyForRepo(cmd)
			if err != nil {
				return err
			}
			out := keys
			if isolated && !writeOnly {
				return usageError{errors.New("--isolated applies to --write-only keys")}
			}
			if writeOnly {
				if name == "" {
					name, _ = os.Hostname()
				}
				if err := crypto.ValidWriterName(name); err != nil {
					return usageError{err}
				}
				from := keys
				if isolated {
					if from, err = g.createNamespace(cmd.Context(), keys); err != nil {
						return err
					}
				}
				if out, err = from.DeriveWriteOnly(name, hosts...); err != nil {
					return usageError{err}
				}
			} else if len(hosts) > 0 {
				return usageError{errors.New("--host applies to --write-only keys")}
			} else if keys.Kind != crypto.Full {
				return errors.New("this key is write-only: it cannot export a full key")
			}
			pass, err := newPassphrase()
			if err != nil {
				return err
			}
			data, err := crypto.EncodeKeyFile(out, pass)
			if err != nil {
				return err
			}
			if err := writeKeyFile(args[0], data); err != nil {
				return err
			}
			if g.json {
				return g.printJSON(map[string]any{"file": args[0], "kind": out.Kind, "repository": out.RepoID, "passphrase": len(pass) > 0})
			}
			g.printf("wrote %s key for repository %s to %s\n", out.Kind, out.RepoID, args[0])
			return nil
		},
	}
	cmd.Flags().BoolVar(&writeOnly, "write-only", false, "make a key that can back up but not restore")
	cmd.Flags().StringVar(&name, "name", "", "name of the writer in its certificate (default: host name)")
	cmd.Flags().BoolVar(&isolated, "isolated", false, "give the write-only key a namespace of its own: it and the other writers learn nothing of each other's backups (no deduplication between them)")
	cmd.Flags().StringArrayVar(&hosts, "host", nil, "host (or pattern, e.g. 'vm-*') the write-only key may back up (repeatable; default: its name)")
	return cmd
}

// newPassphrase reads the passphrase for a new key file.
func newPassphrase() ([]byte, error) {
	if p, ok := os.LookupEnv("SAUVE_NEW_PASSPHRASE"); ok {
		return []byte(p), nil
	}
	if _, ok := os.LookupEnv("SAUVE_PASSPHRASE"); ok {
		// Non-interactive: keep the passphrase the caller uses.
		return passphrase("", false)
	}
	return passphrase("Passphrase for the new key file (empty for none): ", true)
}

func newKeyShowCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "show",
		Short:   "Describe the key in use",
		Example: `  sauve key show --repo /srv/backup/sauve`,
		Args:    exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			keys, path, err := g.keyForRepo(cmd)
			if err != nil {
				return err
			}
			signer := "owner"
			if keys.Cert != nil {
				signer = keys.Cert.Name
			}
			info := map[string]any{
				"file": path, "repository": keys.RepoID, "kind": keys.Kind, "can_restore": keys.CanDecrypt(),
				"signer": signer, "signer_key": fmt.Sprintf("%x", keys.Signer.Public()),
			}
			if g.json {
				return g.printJSON(info)
			}
			g.printf("key file:    %s\nrepository:  %s\nkind:        %s\ncan restore: %v\nsigns as:    %s\n", path, keys.RepoID, keys.Kind, keys.CanDecrypt(), signer)
			return nil
		},
	}
}

func newKeyPasswdCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "passwd",
		Short: "Change the passphrase of the key file",
		Long: `Re-encrypt the key file under a new passphrase ($SAUVE_NEW_PASSPHRASE or the
terminal; empty removes protection). The file is replaced atomically.`,
		Example: `  sauve key passwd --key /root/sauve.key`,
		Args:    exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			keys, path, err := g.keyForRepo(cmd)
			if err != nil {
				return err
			}
			pass, err := newPassphrase()
			if err != nil {
				return err
			}
			data, err := crypto.EncodeKeyFile(keys, pass)
			if err != nil {
				return err
			}
			tmp := path + ".new"
			os.Remove(tmp)
			if err := writeKeyFile(tmp, data); err != nil {
				return err
			}
			if err := os.Rename(tmp, path); err != nil {
				os.Remove(tmp)
				return fmt.Errorf("replace key file: %w", err)
			}
			if g.json {
				return g.printJSON(map[string]any{"file": path, "passphrase": len(pass) > 0})
			}
			g.printf("changed the passphrase of %s\n", path)
			return nil
		},
	}
}

// createNamespace makes an isolated namespace in the repository and
// records it in the owner's ledger; it returns the owner's keys for it.
func (g *globals) createNamespace(ctx context.Context, owner *crypto.Keys) (*crypto.Keys, error) {
	if !owner.IsOwner() {
		return nil, errors.New("only the owner's key can create an isolated namespace")
	}
	r, err := g.openRepo(ctx, false)
	if err != nil {
		return nil, err
	}
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, err
	}
	ns := hex.EncodeToString(b[:])
	sub, err := owner.Isolated(ns)
	if err != nil {
		return nil, err
	}
	be, err := g.namespaceBackend(ns)
	if err != nil {
		return nil, err
	}
	if err := repo.Init(ctx, be, sub, repo.NamespaceConfig(r.Config(), sub.RepoID)); err != nil {
		return nil, fmt.Errorf("create isolated namespace %s: %w", ns, err)
	}
	if err := r.SaveLedger(ctx, []repo.LedgerEvent{{Kind: repo.EventNamespace, Namespace: ns}}); err != nil {
		return nil, fmt.Errorf("record isolated namespace %s: %w", ns, err)
	}
	return sub, nil
}
