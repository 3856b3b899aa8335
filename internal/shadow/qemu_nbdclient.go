package shadow

import (
	"context"
	"fmt"
	"slices"

	"github.com/sauve-backup/sauve/internal/nbd"
)

const nbdStateZero = nbd.StateZero

// dialExport connects to a fleecing export with the meta contexts of its
// maps.
func dialExport(ctx context.Context, network, address, export string, metas []string) (nbdExport, error) {
	c, err := nbd.Dial(ctx, network, address, nbd.Options{Export: export, MetaContexts: metas})
	if err != nil {
		return nil, err
	}
	// A map of a context the server did not agree to would fail on its
	// first use, in the middle of the backup: refuse it here.
	for _, m := range metas {
		if !slices.Contains(c.Contexts(), m) {
			c.Close()
			return nil, fmt.Errorf("NBD export %s at %s: the server did not agree to %s", export, address, m)
		}
	}
	return c, nil
}
