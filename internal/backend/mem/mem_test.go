package mem_test

import (
	"testing"

	"github.com/sauve-backup/sauve/internal/backend/backendtest"
	"github.com/sauve-backup/sauve/internal/backend/mem"
)

func TestConformance(t *testing.T) {
	backendtest.Run(t, mem.New(), backendtest.Options{LargeSize: 3<<20 + 1})
}
