package shadow

// This file stands in for guestagent.go until it is merged; the lead
// deletes it then.

import (
	"context"
	"errors"
	"time"
)

func guestFreeze(ctx context.Context, socket string, timeout time.Duration) (thaw func() (time.Duration, error), err error) {
	return nil, errors.New("guest agent support is not merged yet")
}
