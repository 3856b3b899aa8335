package crypto

import (
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"path"
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
	RepoID string
	// Parent and Namespace are set for the keys of an isolated
	// namespace (see Isolated): RepoID is then the namespace's own
	// repository, kept inside the repository Parent.
	Parent, Namespace string
	Kind              Kind
	MetaKey           [KeySize]byte
	IDKey             [KeySize]byte
	DataPublic        [32]byte
	DataPrivate       *[32]byte // nil in a write-only key
	// OwnerPublic is the repository owner's signing key: every manifest
	// must be signed by it or by a writer it certified.
	OwnerPublic ed25519.PublicKey
	// Signer signs the manifests this key writes: the owner key itself in a
	// full key, a writer key certified by the owner in a write-only key.
	Signer ed25519.PrivateKey
	Cert   *Cert // nil when Signer is the owner key
}

// Cert is the owner's statement that a writer key may sign manifests,
// index objects and packs, and for which hosts.
type Cert struct {
	// Version is 2 for certificates that list Hosts, absent (1) before.
	Version   int       `json:"version,omitempty"`
	Repo      string    `json:"repository"`
	Signer    []byte    `json:"signer"`
	Name      string    `json:"name"`
	Hosts     []string  `json:"hosts,omitempty"`
	Created   time.Time `json:"created"`
	Signature []byte    `json:"signature"`
}

// maxCertBytes bounds an encoded certificate (it is read from storage).
const maxCertBytes = 8 << 10

func (c *Cert) signedBytes() []byte {
	v := "1"
	if c.Version >= 2 {
		v = "2"
	}
	b := []byte("sauve writer certificate v" + v + "\x00")
	b = append(b, c.Repo...)
	b = append(b, 0)
	b = append(b, c.Signer...)
	b = append(b, c.Name...)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint64(b, uint64(c.Created.UnixNano()))
	if c.Version >= 2 {
		b = binary.BigEndian.AppendUint32(b, uint32(len(c.Hosts)))
		for _, h := range c.Hosts {
			b = append(b, h...)
			b = append(b, 0)
		}
	}
	return b
}

func (c *Cert) encode() []byte {
	b, _ := json.Marshal(c)
	return b
}

func decodeCert(b []byte) (*Cert, error) {
	if len(b) > maxCertBytes {
		return nil, fmt.Errorf("%d bytes is too long for a certificate", len(b))
	}
	var c Cert
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, err
	}
	if c.Version > 2 {
		return nil, fmt.Errorf("certificate version %d is not supported", c.Version)
	}
	return &c, nil
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
// this (full) key. name labels the writer in the certificate; hosts are
// the host-name patterns its manifests may name (default: name).
func (k *Keys) DeriveWriteOnly(name string, hosts ...string) (*Keys, error) {
	if k.Kind != Full || k.Cert != nil {
		return nil, errors.New("only a full key can create a write-only key")
	}
	if err := ValidWriterName(name); err != nil {
		return nil, err
	}
	if len(hosts) == 0 {
		hosts = []string{name}
	}
	for _, h := range hosts {
		if _, err := path.Match(h, ""); err != nil || h == "" {
			return nil, fmt.Errorf("host pattern %q is not a valid pattern", h)
		}
	}
	pub, sk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	c := &Cert{Version: 2, Repo: k.RepoID, Signer: pub, Name: name, Hosts: hosts, Created: time.Now().UTC()}
	c.Signature = ed25519.Sign(k.Signer, c.signedBytes())
	return &Keys{
		RepoID: k.RepoID, Parent: k.Parent, Namespace: k.Namespace, Kind: WriteOnly, MetaKey: k.MetaKey, IDKey: k.IDKey,
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
		if s.Cert == nil || !ed25519.PublicKey(s.Cert.Signer).Equal(signer) {
			return ErrUntrustedSigner
		}
		if err := k.VerifyCert(s.Cert); err != nil {
			return err
		}
	}
	if !ed25519.Verify(signer, manifestMessage(msg), s.Signature) {
		return errors.New("signature does not match the manifest (tampered with)")
	}
	return nil
}

// SignerName describes who signed: "owner" or the certified writer's name.
func (s Signature) SignerName() string { return DisplayName(s.Cert) }

// DisplayName is how a signer is shown: "owner" for the owner (no
// certificate), else the writer's name, marked as a writer when it could
// be mistaken for the owner (a certificate issued before the name was
// reserved).
func DisplayName(c *Cert) string {
	if c == nil {
		return OwnerName
	}
	if ValidWriterName(c.Name) != nil {
		return fmt.Sprintf("writer %q", c.Name)
	}
	return c.Name
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
