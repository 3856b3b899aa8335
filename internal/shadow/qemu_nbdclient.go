package shadow

import (
	"context"

	"github.com/sauve-backup/sauve/internal/nbd"
)

const nbdStateZero = nbd.StateZero

// nbdReaders is how many chunk reads a backup keeps in flight on a
// fleecing export (bench/qemu-live.sh: one at a time left the CPUs idle
// waiting for QEMU's replies).
const nbdReaders = 4

// dialExport connects to a fleecing export with the meta contexts of its
// maps.
func dialExport(ctx context.Context, network, address, export string, metas []string) (nbdExport, error) {
	c, err := nbd.Dial(ctx, network, address, nbd.Options{Export: export, MetaContexts: metas})
	if err != nil {
		return nil, err
	}
	return c, nil
}
