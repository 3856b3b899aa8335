package local_test

import (
	"testing"

	"github.com/sauve-backup/sauve/internal/backend/backendtest"
	"github.com/sauve-backup/sauve/internal/backend/local"
)

func TestConformance(t *testing.T) {
	be, err := local.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	backendtest.Run(t, be, backendtest.Options{LargeSize: 3<<20 + 1})
}
