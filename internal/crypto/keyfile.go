package crypto

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/chacha20poly1305"
)

// keyFileVersion is the version of the key file format.
const keyFileVersion = 1

// Argon2id parameters for new key files; stored in the file, so they can
// change without breaking old files.
const (
	argonTime    = 3
	argonMemory  = 64 * 1024 // KiB
	argonThreads = 4
)

// Limits on the Argon2id parameters a key file may ask for. A key file is
// untrusted input: a planted, corrupted or hand-edited file must not make
// sauve allocate gigabytes or spin for minutes before it can even say
// "wrong passphrase". sauve writes time 3, 64 MiB and 4 threads; the limits
// leave room to raise those defaults (4x the memory, 5x the passes, 4x the
// lanes) while bounding the worst case to 256 MiB and about 21 times the
// default's work (seconds, not minutes). Zero passes or threads would make
// the Argon2 package panic.
const (
	maxArgonTime    = 16
	maxArgonMemory  = 256 * 1024 // KiB
	maxArgonThreads = 16
)

type kdfParams struct {
	Algorithm string `json:"algorithm"`
	Salt      []byte `json:"salt"`
	Time      uint32 `json:"time"`
	Memory    uint32 `json:"memory_kib"`
	Threads   uint8  `json:"threads"`
}

type keyPayload struct {
	MetaKey     []byte `json:"meta_key"`
	IDKey       []byte `json:"id_key"`
	DataPublic  []byte `json:"data_public"`
	DataPrivate []byte `json:"data_private,omitempty"`
	OwnerPublic []byte `json:"owner_public"`
	Signer      []byte `json:"signer_seed"`
	Cert        *Cert  `json:"cert,omitempty"`
}

type keyFile struct {
	Version    int    `json:"sauve_key"`
	Repository string `json:"repository"`
	// Parent and Namespace are set in the key of an isolated writer:
	// Repository is then the namespace's repository inside Parent.
	Parent    string      `json:"parent,omitempty"`
	Namespace string      `json:"namespace,omitempty"`
	Kind      Kind        `json:"kind"`
	Created   time.Time   `json:"created"`
	KDF       *kdfParams  `json:"kdf,omitempty"`
	Sealed    []byte      `json:"sealed,omitempty"`
	Payload   *keyPayload `json:"payload,omitempty"`
}

// KeyFileInfo is what a key file tells without its passphrase.
type KeyFileInfo struct {
	Repository string
	// Parent and Namespace are set for an isolated writer's key.
	Parent, Namespace string
	Kind              Kind
	Encrypted         bool
	Created           time.Time
}

// ErrPassphrase is returned for a wrong passphrase.
var ErrPassphrase = errors.New("wrong passphrase for key file")

// ErrNeedPassphrase is returned when a key file is protected and no
// passphrase was given.
var ErrNeedPassphrase = errors.New("key file is protected by a passphrase")

func passKey(pass []byte, p *kdfParams) []byte {
	return argon2.IDKey(pass, p.Salt, p.Time, p.Memory, p.Threads, chacha20poly1305.KeySize)
}

// check refuses parameters outside the limits above before anything is
// allocated (and before a passphrase is asked for).
func (p *kdfParams) check() error {
	switch {
	case p.Memory > maxArgonMemory:
		return fmt.Errorf("key file asks for %s of Argon2 memory; sauve accepts at most %s", kib(p.Memory), kib(maxArgonMemory))
	case p.Time > maxArgonTime:
		return fmt.Errorf("key file asks for %d Argon2 passes; sauve accepts at most %d", p.Time, maxArgonTime)
	case p.Threads > maxArgonThreads:
		return fmt.Errorf("key file asks for %d Argon2 threads; sauve accepts at most %d", p.Threads, maxArgonThreads)
	case p.Time == 0 || p.Threads == 0:
		return fmt.Errorf("key file has invalid Argon2 parameters: %d passes, %d threads (each must be at least 1)", p.Time, p.Threads)
	case p.Memory < 8*uint32(p.Threads):
		return fmt.Errorf("key file has invalid Argon2 parameters: %s of memory for %d threads (at least 8 KiB per thread)", kib(p.Memory), p.Threads)
	}
	return nil
}

// kib formats an Argon2 memory size, given in KiB.
func kib(n uint32) string {
	if n%1024 == 0 {
		return fmt.Sprintf("%d MiB", n/1024)
	}
	return fmt.Sprintf("%d KiB", n)
}

// EncodeKeyFile serialises k, sealed under passphrase unless it is empty.
func EncodeKeyFile(k *Keys, passphrase []byte) ([]byte, error) {
	return encodeKeyFile(k, passphrase, kdfParams{Time: argonTime, Memory: argonMemory, Threads: argonThreads})
}

// encodeKeyFile is EncodeKeyFile with the Argon2id cost parameters of kdf.
func encodeKeyFile(k *Keys, passphrase []byte, kdf kdfParams) ([]byte, error) {
	p := &keyPayload{
		MetaKey: k.MetaKey[:], IDKey: k.IDKey[:], DataPublic: k.DataPublic[:],
		OwnerPublic: k.OwnerPublic, Signer: k.Signer.Seed(), Cert: k.Cert,
	}
	if k.DataPrivate != nil {
		p.DataPrivate = k.DataPrivate[:]
	}
	f := keyFile{Version: keyFileVersion, Repository: k.RepoID, Parent: k.Parent, Namespace: k.Namespace, Kind: k.Kind, Created: time.Now().UTC()}
	if len(passphrase) == 0 {
		f.Payload = p
		return json.MarshalIndent(f, "", "  ")
	}
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return nil, err
	}
	kdf.Algorithm, kdf.Salt = "argon2id", salt
	f.KDF = &kdf
	plain, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	aead, _ := chacha20poly1305.NewX(passKey(passphrase, f.KDF))
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	f.Sealed = aead.Seal(nonce, nonce, plain, []byte(f.Repository))
	return json.MarshalIndent(f, "", "  ")
}

func parseKeyFile(data []byte) (*keyFile, error) {
	var f keyFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("not a sauve key file: %w", err)
	}
	if f.Version == 0 {
		return nil, errors.New("not a sauve key file (no sauve_key version)")
	}
	if f.Version != keyFileVersion {
		return nil, fmt.Errorf("key file version %d is not supported (this sauve reads version %d)", f.Version, keyFileVersion)
	}
	if f.Kind != Full && f.Kind != WriteOnly {
		return nil, fmt.Errorf("key file has unknown kind %q", f.Kind)
	}
	return &f, nil
}

// InspectKeyFile reads what a key file tells without its passphrase.
func InspectKeyFile(data []byte) (KeyFileInfo, error) {
	f, err := parseKeyFile(data)
	if err != nil {
		return KeyFileInfo{}, err
	}
	return KeyFileInfo{Repository: f.Repository, Parent: f.Parent, Namespace: f.Namespace, Kind: f.Kind, Encrypted: f.KDF != nil, Created: f.Created}, nil
}

// DecodeKeyFile parses a key file. passphrase is called only if the file is
// protected.
func DecodeKeyFile(data []byte, passphrase func() ([]byte, error)) (*Keys, error) {
	f, err := parseKeyFile(data)
	if err != nil {
		return nil, err
	}
	p := f.Payload
	if f.KDF != nil {
		if f.KDF.Algorithm != "argon2id" {
			return nil, fmt.Errorf("key file uses unknown KDF %q", f.KDF.Algorithm)
		}
		if err := f.KDF.check(); err != nil {
			return nil, err
		}
		if passphrase == nil {
			return nil, ErrNeedPassphrase
		}
		pass, err := passphrase()
		if err != nil {
			return nil, err
		}
		if len(pass) == 0 {
			return nil, ErrNeedPassphrase
		}
		aead, _ := chacha20poly1305.NewX(passKey(pass, f.KDF))
		if len(f.Sealed) < aead.NonceSize()+aead.Overhead() {
			return nil, errors.New("key file: sealed payload too short")
		}
		plain, err := aead.Open(nil, f.Sealed[:aead.NonceSize()], f.Sealed[aead.NonceSize():], []byte(f.Repository))
		if err != nil {
			return nil, ErrPassphrase
		}
		p = new(keyPayload)
		if err := json.Unmarshal(plain, p); err != nil {
			return nil, fmt.Errorf("key file payload: %w", err)
		}
	}
	if p == nil {
		return nil, errors.New("key file holds no key")
	}
	k := &Keys{RepoID: f.Repository, Parent: f.Parent, Namespace: f.Namespace, Kind: f.Kind, Cert: p.Cert}
	if len(p.MetaKey) != KeySize || len(p.IDKey) != KeySize || len(p.DataPublic) != 32 ||
		len(p.OwnerPublic) != ed25519.PublicKeySize || len(p.Signer) != ed25519.SeedSize {
		return nil, errors.New("key file: a key has the wrong length")
	}
	copy(k.MetaKey[:], p.MetaKey)
	copy(k.IDKey[:], p.IDKey)
	copy(k.DataPublic[:], p.DataPublic)
	k.OwnerPublic = ed25519.PublicKey(p.OwnerPublic)
	k.Signer = ed25519.NewKeyFromSeed(p.Signer)
	switch f.Kind {
	case Full:
		if len(p.DataPrivate) != 32 {
			return nil, errors.New("full key file lacks the data private key")
		}
		priv := [32]byte(p.DataPrivate)
		k.DataPrivate = &priv
	case WriteOnly:
		if len(p.DataPrivate) != 0 {
			return nil, errors.New("write-only key file holds a data private key")
		}
		if k.Cert == nil {
			return nil, errors.New("write-only key file lacks its writer certificate")
		}
	}
	return k, nil
}
