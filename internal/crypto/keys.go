package crypto

import (
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Kind says what a key can do.
type Kind string

// Key kinds.
const (
	// Full keys back up, restore and certify writers.
	Full Kind = "full"
	// WriteOnly keys back up and read metadata but cannot decrypt data.
	WriteOnly Kind = "write-only"
)

// Keys is everything one key file holds.
type Keys struct {
	RepoID      string
	Kind        Kind
	MetaKey     [KeySize]byte
	IDKey       [KeySize]byte
	DataPublic  [32]byte
	DataPrivate *[32]byte // nil in a write-only key
	// OwnerPublic is the repository owner's signing key: every manifest
	// must be signed by it or by a writer it certified.
	OwnerPublic ed25519.PublicKey
	// Signer signs the manifests this key writes: the owner key itself in a
	// full key, a writer key certified by the owner in a write-only key.
	Signer ed25519.PrivateKey
	Cert   *Cert // nil when Signer is the owner key
}

// Cert is the owner's statement that a writer key may sign manifests.
type Cert struct {
	Repo      string    `json:"repository"`
	Signer    []byte    `json:"signer"`
	Name      string    `json:"name"`
	Created   time.Time `json:"created"`
	Signature []byte    `json:"signature"`
}

func (c *Cert) signedBytes() []byte {
	b := []byte("sauve writer certificate v1\x00")
	b = append(b, c.Repo...)
	b = append(b, 0)
	b = append(b, c.Signer...)
	b = append(b, c.Name...)
	b = append(b, 0)
	return binary.BigEndian.AppendUint64(b, uint64(c.Created.UnixNano()))
}

func random32() (k [32]byte) {
	if _, err := rand.Read(k[:]); err != nil {
		panic(fmt.Sprintf("crypto/rand failed: %v", err))
	}
	return k
}

// Generate makes the full key of a new repository.
func Generate(repoID string) (*Keys, error) {
	k := &Keys{RepoID: repoID, Kind: Full, MetaKey: random32(), IDKey: random32()}
	x, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	priv := [32]byte(x.Bytes())
	k.DataPrivate = &priv
	k.DataPublic = [32]byte(x.PublicKey().Bytes())
	pub, sk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	k.OwnerPublic, k.Signer = pub, sk
	return k, nil
}

// CanDecrypt reports whether the key holds the data private key.
func (k *Keys) CanDecrypt() bool { return k.DataPrivate != nil }

// DeriveWriteOnly makes a write-only key with a new signing key certified by
// this (full) key. name labels the writer (a host, say) in the certificate.
func (k *Keys) DeriveWriteOnly(name string) (*Keys, error) {
	if k.Kind != Full || k.Cert != nil {
		return nil, errors.New("only a full key can create a write-only key")
	}
	pub, sk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	c := &Cert{Repo: k.RepoID, Signer: pub, Name: name, Created: time.Now().UTC()}
	c.Signature = ed25519.Sign(k.Signer, c.signedBytes())
	return &Keys{
		RepoID: k.RepoID, Kind: WriteOnly, MetaKey: k.MetaKey, IDKey: k.IDKey,
		DataPublic: k.DataPublic, OwnerPublic: k.OwnerPublic, Signer: sk, Cert: c,
	}, nil
}

// Signature is what a manifest carries to prove who wrote it.
type Signature struct {
	Signer    []byte `json:"signer"`
	Cert      *Cert  `json:"cert,omitempty"`
	Signature []byte `json:"signature"`
}

func manifestMessage(msg []byte) []byte {
	return append([]byte("sauve manifest v1\x00"), msg...)
}

// Sign signs msg with the key's signer.
func (k *Keys) Sign(msg []byte) Signature {
	return Signature{
		Signer:    k.Signer.Public().(ed25519.PublicKey),
		Cert:      k.Cert,
		Signature: ed25519.Sign(k.Signer, manifestMessage(msg)),
	}
}

// ErrUntrustedSigner is returned when a manifest is signed by a key the
// repository owner never certified.
var ErrUntrustedSigner = errors.New("signed by a key the repository owner did not certify")

// Verify checks that msg was signed by the owner key or by a writer the
// owner certified. Trust comes from the OwnerPublic in the caller's key
// file, not from the repository, so whoever can write to the repository
// cannot plant a signer.
func (k *Keys) Verify(msg []byte, s Signature) error {
	if len(s.Signer) != ed25519.PublicKeySize || len(s.Signature) != ed25519.SignatureSize {
		return errors.New("malformed signature")
	}
	signer := ed25519.PublicKey(s.Signer)
	if !signer.Equal(k.OwnerPublic) {
		c := s.Cert
		if c == nil {
			return ErrUntrustedSigner
		}
		if c.Repo != k.RepoID || !ed25519.PublicKey(c.Signer).Equal(signer) ||
			len(c.Signature) != ed25519.SignatureSize ||
			!ed25519.Verify(k.OwnerPublic, c.signedBytes(), c.Signature) {
			return ErrUntrustedSigner
		}
	}
	if !ed25519.Verify(signer, manifestMessage(msg), s.Signature) {
		return errors.New("signature does not match the manifest (tampered with)")
	}
	return nil
}

// SignerName describes who signed: "owner" or the certified writer's name.
func (s Signature) SignerName() string {
	if s.Cert == nil {
		return "owner"
	}
	return s.Cert.Name
}

// DataSealer starts a data-sealing session to the repository's public key.
func (k *Keys) DataSealer() (*DataSealer, error) { return NewDataSealer(k.DataPublic) }

// DataOpener returns an opener, or ErrWriteOnly for a write-only key.
func (k *Keys) DataOpener() (*DataOpener, error) {
	if k.DataPrivate == nil {
		return nil, ErrWriteOnly
	}
	return NewDataOpener(*k.DataPrivate)
}
