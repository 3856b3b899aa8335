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
	Version    int         `json:"sauve_key"`
	Repository string      `json:"repository"`
	Kind       Kind        `json:"kind"`
	Created    time.Time   `json:"created"`
	KDF        *kdfParams  `json:"kdf,omitempty"`
	Sealed     []byte      `json:"sealed,omitempty"`
	Payload    *keyPayload `json:"payload,omitempty"`
}

// KeyFileInfo is what a key file tells without its passphrase.
type KeyFileInfo struct {
	Repository string
	Kind       Kind
	Encrypted  bool
	Created    time.Time
}

// ErrPassphrase is returned for a wrong passphrase.
var ErrPassphrase = errors.New("wrong passphrase for key file")

// ErrNeedPassphrase is returned when a key file is protected and no
// passphrase was given.
var ErrNeedPassphrase = errors.New("key file is protected by a passphrase")

func passKey(pass []byte, p *kdfParams) []byte {
	return argon2.IDKey(pass, p.Salt, p.Time, p.Memory, p.Threads, chacha20poly1305.KeySize)
}

// EncodeKeyFile serialises k, sealed under passphrase unless it is empty.
func EncodeKeyFile(k *Keys, passphrase []byte) ([]byte, error) {
	p := &keyPayload{
		MetaKey: k.MetaKey[:], IDKey: k.IDKey[:], DataPublic: k.DataPublic[:],
		OwnerPublic: k.OwnerPublic, Signer: k.Signer.Seed(), Cert: k.Cert,
	}
	if k.DataPrivate != nil {
		p.DataPrivate = k.DataPrivate[:]
	}
	f := keyFile{Version: keyFileVersion, Repository: k.RepoID, Kind: k.Kind, Created: time.Now().UTC()}
	if len(passphrase) == 0 {
		f.Payload = p
		return json.MarshalIndent(f, "", "  ")
	}
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return nil, err
	}
	f.KDF = &kdfParams{Algorithm: "argon2id", Salt: salt, Time: argonTime, Memory: argonMemory, Threads: argonThreads}
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
	return KeyFileInfo{Repository: f.Repository, Kind: f.Kind, Encrypted: f.KDF != nil, Created: f.Created}, nil
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
		if f.KDF.Memory > 4<<20 || f.KDF.Time > 100 || f.KDF.Threads == 0 {
			return nil, errors.New("key file has implausible KDF parameters")
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
	k := &Keys{RepoID: f.Repository, Kind: f.Kind, Cert: p.Cert}
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
