package shadow

// This file stands in for the NBD client (internal/nbd) until it is
// merged.

import (
	"context"
	"errors"
)

const nbdStateZero = 2

func dialExport(ctx context.Context, network, address, export string, metas []string) (nbdExport, error) {
	return nil, errors.New("the NBD client is not merged yet")
}
