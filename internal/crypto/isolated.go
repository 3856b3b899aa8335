package crypto

import (
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/zeebo/blake3"
)

// Isolated returns the full keys of namespace ns of this repository: a
// repository of its own, kept inside this one (docs/FORMAT.md,
// "Isolated namespaces"), whose metadata and ID keys only the owner can
// derive. Its writers learn nothing of the other writers' data, nor they
// of its: they share no key that opens or names anything of the other's.
// Chunk data is sealed to the same data key pair and manifests are
// signed by the same owner, so the owner's one key file opens all.
func (k *Keys) Isolated(ns string) (*Keys, error) {
	if !k.IsOwner() || k.DataPrivate == nil {
		return nil, errors.New("only the owner's full key can open an isolated namespace")
	}
	if k.Namespace != "" {
		return nil, errors.New("namespaces do not nest")
	}
	if err := ValidNamespace(ns); err != nil {
		return nil, err
	}
	secret, err := hkdf.Key(sha256.New, k.Signer.Seed(), []byte(k.RepoID), "sauve isolated namespace v1\x00"+ns, 2*KeySize)
	if err != nil {
		return nil, err
	}
	sub := *k
	sub.RepoID = NamespaceRepoID(k.RepoID, ns)
	sub.Parent, sub.Namespace = k.RepoID, ns
	copy(sub.MetaKey[:], secret[:KeySize])
	copy(sub.IDKey[:], secret[KeySize:])
	return &sub, nil
}

// NamespaceRepoID is the repository ID of namespace ns inside repository
// parent: 32 hex digits of BLAKE3 over both.
func NamespaceRepoID(parent, ns string) string {
	sum := blake3.Sum256([]byte("sauve namespace id v1\x00" + parent + "\x00" + ns))
	return hex.EncodeToString(sum[:16])
}

// ValidNamespace checks a namespace name: 16 lowercase hex digits.
func ValidNamespace(ns string) error {
	if len(ns) != 16 {
		return fmt.Errorf("namespace %q is not 16 hex digits", ns)
	}
	for _, c := range ns {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return fmt.Errorf("namespace %q is not 16 hex digits", ns)
		}
	}
	return nil
}
