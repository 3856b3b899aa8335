package shadow

import (
	"context"
	"fmt"
	"slices"
)

// dialAgreed is dialExport that also checks that the server agreed to
// every meta context asked for: a map of a context it refused would fail
// on its first use, in the middle of the backup.
func dialAgreed(ctx context.Context, network, address, export string, metas []string) (nbdExport, error) {
	e, err := dialExport(ctx, network, address, export, metas)
	if err != nil {
		return nil, err
	}
	c, ok := e.(interface{ Contexts() []string })
	if !ok {
		return e, nil
	}
	for _, m := range metas {
		if !slices.Contains(c.Contexts(), m) {
			e.Close()
			return nil, fmt.Errorf("NBD export %s at %s: the server did not agree to %s", export, address, m)
		}
	}
	return e, nil
}
