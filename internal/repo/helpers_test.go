package repo

import (
	"testing"

	"github.com/sauve-backup/sauve/internal/crypto"
)

func testKeys(t testing.TB) *crypto.Keys {
	t.Helper()
	cfg, err := NewConfig(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	k, err := crypto.Generate(cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	k.MetaKey = [32]byte(testMetaKey)
	return k
}

func testKeysF(f *testing.F) *crypto.Keys { return testKeys(f) }

var testMetaKey = []byte("0123456789abcdef0123456789abcdef")
