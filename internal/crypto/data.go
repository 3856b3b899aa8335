package crypto

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
)

// ErrWriteOnly is returned when a key without the data private key is asked
// to decrypt chunk data.
var ErrWriteOnly = errors.New("this key is write-only: it can back up but cannot decrypt chunk data; use the repository's full key to restore")

const dataInfo = "sauve data v1"

// DataSealer encrypts chunk data for one writing session. Its AES-256-GCM
// key comes from X25519 between a fresh ephemeral key and the repository's
// public key; the ephemeral public key is stored in every pack the session
// writes, and is all a reader with the private key needs.
type DataSealer struct {
	ephemeral [32]byte
	aead      cipher.AEAD
}

func deriveDataAEAD(shared, ephemeral, recipient []byte) (cipher.AEAD, error) {
	salt := make([]byte, 0, 64)
	salt = append(append(salt, ephemeral...), recipient...)
	key, err := hkdf.Key(sha256.New, shared, salt, dataInfo, KeySize)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// NewDataSealer starts a session that seals to the X25519 public key pub.
func NewDataSealer(pub [32]byte) (*DataSealer, error) {
	recipient, err := ecdh.X25519().NewPublicKey(pub[:])
	if err != nil {
		return nil, fmt.Errorf("repository data key: %w", err)
	}
	eph, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	shared, err := eph.ECDH(recipient)
	if err != nil {
		return nil, fmt.Errorf("x25519: %w", err)
	}
	s := &DataSealer{}
	copy(s.ephemeral[:], eph.PublicKey().Bytes())
	s.aead, err = deriveDataAEAD(shared, s.ephemeral[:], pub[:])
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Ephemeral is the public half of the session key, stored in pack headers.
func (s *DataSealer) Ephemeral() [32]byte { return s.ephemeral }

// Overhead is how many bytes Seal adds.
func (s *DataSealer) Overhead() int { return s.aead.NonceSize() + s.aead.Overhead() }

// Seal appends nonce || ciphertext to dst. The chunk ID goes in additional
// so that a blob cannot be passed off under another ID.
func (s *DataSealer) Seal(dst, plaintext, additional []byte) []byte {
	nonce := make([]byte, s.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		panic(fmt.Sprintf("crypto/rand failed: %v", err))
	}
	dst = append(dst, nonce...)
	return s.aead.Seal(dst, nonce, plaintext, additional)
}

// DataOpener decrypts chunk data with the repository's private key. It
// caches one AEAD per writing session.
type DataOpener struct {
	priv *ecdh.PrivateKey
	pub  []byte
	mu   sync.Mutex
	aead map[[32]byte]cipher.AEAD
}

// NewDataOpener returns an opener for the X25519 private key priv.
func NewDataOpener(priv [32]byte) (*DataOpener, error) {
	k, err := ecdh.X25519().NewPrivateKey(priv[:])
	if err != nil {
		return nil, fmt.Errorf("repository data key: %w", err)
	}
	return &DataOpener{priv: k, pub: k.PublicKey().Bytes(), aead: map[[32]byte]cipher.AEAD{}}, nil
}

func (o *DataOpener) session(ephemeral [32]byte) (cipher.AEAD, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if a, ok := o.aead[ephemeral]; ok {
		return a, nil
	}
	pub, err := ecdh.X25519().NewPublicKey(ephemeral[:])
	if err != nil {
		return nil, fmt.Errorf("pack session key: %w", err)
	}
	shared, err := o.priv.ECDH(pub)
	if err != nil {
		return nil, fmt.Errorf("pack session key: %w", err)
	}
	a, err := deriveDataAEAD(shared, ephemeral[:], o.pub)
	if err != nil {
		return nil, err
	}
	o.aead[ephemeral] = a
	return a, nil
}

// Open decrypts a blob sealed by the session whose ephemeral public key is
// given.
func (o *DataOpener) Open(dst []byte, ephemeral [32]byte, sealed, additional []byte) ([]byte, error) {
	return o.open(dst, false, ephemeral, sealed, additional)
}

// OpenInPlace is Open that decrypts over sealed's own storage (which it
// overwrites, also when it fails) instead of allocating the plaintext.
func (o *DataOpener) OpenInPlace(ephemeral [32]byte, sealed, additional []byte) ([]byte, error) {
	return o.open(nil, true, ephemeral, sealed, additional)
}

func (o *DataOpener) open(dst []byte, inPlace bool, ephemeral [32]byte, sealed, additional []byte) ([]byte, error) {
	if o == nil {
		return nil, ErrWriteOnly
	}
	a, err := o.session(ephemeral)
	if err != nil {
		return nil, err
	}
	if len(sealed) < a.NonceSize()+a.Overhead() {
		return nil, fmt.Errorf("sealed blob too short (%d bytes)", len(sealed))
	}
	if inPlace {
		dst = sealed[a.NonceSize():a.NonceSize()]
	}
	out, err := a.Open(dst, sealed[:a.NonceSize()], sealed[a.NonceSize():], additional)
	if err != nil {
		return nil, ErrAuth
	}
	return out, nil
}
