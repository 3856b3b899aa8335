package testsrv

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The versitygw pin in .ci/services is the one the tests expect.
func TestVersityPinMatchesServices(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(ModuleRoot(t), ".ci", "services"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "VERSITYGW_VERSION="+VersityVersion+"\n") {
		t.Fatalf(".ci/services does not pin versitygw %s", VersityVersion)
	}
}
