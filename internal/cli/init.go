package cli

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/repo"
)

func newInitCmd(g *globals) *cobra.Command {
	var chunkSize, packSize string
	var from sourceFlags
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create a repository and its key",
		Long: `Create a new, empty repository at --repo (default ~/.local/share/sauve/repo)
and a full key for it.

The key file is written with mode 0600 to --key if given, otherwise to
$XDG_CONFIG_HOME/sauve/keys/<repository id>.key (~/.config when XDG_CONFIG_HOME
is unset). It is protected by a passphrase taken from $SAUVE_PASSPHRASE, or
asked for on the terminal (leave it empty for none). Without the key the
backups cannot be read: keep a copy somewhere other than the machine and the
repository.

With --from-repo SOURCE, the new repository takes the chunk size (and, unless
--pack-size says otherwise, the pack size) and the ID key of SOURCE, and
fresh keys otherwise: chunks then have the same IDs in both, and 'sauve
copy' between them carries chunk lists over without hashing anything again.
It needs the key of SOURCE (--from-key; full or write-only: both hold the
ID key). Whoever holds a key of either repository can then tell which
chunks the other holds (see docs/SECURITY.md).`,
		Example: `  sauve init --repo /srv/backup/sauve
  SAUVE_PASSPHRASE='correct horse' sauve init --repo /mnt/usb/sauve --key /root/usb.key
  sauve init --repo s3://offsite/sauve --from-repo /srv/backup/sauve`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cs, err := parseSize(chunkSize)
			if err != nil {
				return usageError{fmt.Errorf("--chunk-size: %w", err)}
			}
			ps, err := parseSize(packSize)
			if err != nil {
				return usageError{fmt.Errorf("--pack-size: %w", err)}
			}
			var idKey *[crypto.KeySize]byte
			var fromID any // the source's ID in --json output, or null
			if from.repo != "" {
				src, err := from.openSource(ctx, g, false)
				if err != nil {
					return err
				}
				scs := int64(src.Config().ChunkSize)
				if cmd.Flags().Changed("chunk-size") && cs != scs {
					return usageError{fmt.Errorf("--chunk-size %s: the source repository's chunks are of %d bytes, which --from-repo takes", chunkSize, scs)}
				}
				cs = scs
				if !cmd.Flags().Changed("pack-size") {
					ps = int64(src.Config().PackSize)
				}
				k := src.Keys().IDKey
				idKey, fromID = &k, src.Config().ID
			}
			be, err := g.openBackend()
			if err != nil {
				return err
			}
			info, err := g.initRepo(ctx, be, cs, ps, idKey)
			if err != nil {
				return err
			}
			cfg, path, pass := info.cfg, info.keyPath, info.passphrase
			if g.json {
				return g.printJSON(map[string]any{
					"id": cfg.ID, "location": be.Location(), "key_file": path,
					"chunk_size": cfg.ChunkSize, "pack_size": cfg.PackSize, "passphrase": len(pass) > 0,
					"same_chunk_ids_as": fromID,
				})
			}
			g.printf("created repository %s at %s\n", cfg.ID, be.Location())
			if from.repo != "" {
				g.printf("chunk size %s and ID key taken from the source repository: 'sauve copy' from it keeps chunk IDs\n", bytesIEC(int64(cfg.ChunkSize)))
			}
			g.printf("key saved to %s\n", path)
			if len(pass) == 0 {
				g.printf("the key file has no passphrase: anyone who can read it can read the backups\n")
			}
			g.printf("keep a copy of the key file elsewhere: without it the backups cannot be restored\n")
			return nil
		},
	}
	cmd.Flags().StringVar(&chunkSize, "chunk-size", fmt.Sprint(repo.DefaultChunkSize), "chunk size, a power of two from 4K to 8M (fixed for the repository's life)")
	cmd.Flags().StringVar(&packSize, "pack-size", fmt.Sprint(repo.DefaultPackSize), "target size of pack objects")
	from.add(cmd, "repository whose chunk size and ID key the new one takes, for copies between them")
	return cmd
}

type initInfo struct {
	cfg        repo.Config
	keyPath    string
	passphrase []byte
}

// initRepo creates a repository and its key file. idKey, when set, is
// the ID key to share with another repository (init --from-repo).
func (g *globals) initRepo(ctx context.Context, be backend.Backend, chunkSize, packSize int64, idKey ...*[crypto.KeySize]byte) (*initInfo, error) {
	cfg, err := repo.NewConfig(int(chunkSize), int(packSize))
	if err != nil {
		return nil, usageError{err}
	}
	if _, err := repo.ReadConfig(ctx, be); err == nil {
		return nil, fmt.Errorf("%s already holds a repository", be.Location())
	}
	keys, err := crypto.Generate(cfg.ID)
	if err != nil {
		return nil, err
	}
	if len(idKey) > 0 && idKey[0] != nil {
		keys.IDKey = *idKey[0]
	}
	path := g.keyFile
	if path == "" {
		if path, err = defaultKeyPath(cfg.ID); err != nil {
			return nil, err
		}
	}
	pass, err := passphrase("Passphrase for the new key (empty for none): ", true)
	if err != nil {
		return nil, err
	}
	data, err := crypto.EncodeKeyFile(keys, pass)
	if err != nil {
		return nil, err
	}
	// The key goes first: a repository without its key is useless, a key
	// without a repository is harmless.
	if err := writeKeyFile(path, data); err != nil {
		return nil, err
	}
	if err := repo.Init(ctx, be, keys, cfg); err != nil {
		os.Remove(path)
		return nil, err
	}
	return &initInfo{cfg: cfg, keyPath: path, passphrase: pass}, nil
}
