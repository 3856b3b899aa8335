package agent

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// KeyType is the first word of a public key line. It is not OpenSSH's
// "ssh-ed25519" on purpose: an agent key is not a login key, and a line
// copied from one file type into the other is refused instead of
// silently granting something else.
const KeyType = "sauve-ed25519"

// maxKeyFile bounds a private key file read (a PEM block of a 48-byte
// PKCS #8 structure is about 120 bytes).
const maxKeyFile = 16 << 10

// PublicKey is an agent's or a caller's Ed25519 public key.
type PublicKey [ed25519.PublicKeySize]byte

// Fingerprint names the key in logs and errors, in OpenSSH's style:
// SHA256: and the unpadded base64 of the SHA-256 of the 32 key bytes.
func (k PublicKey) Fingerprint() string {
	h := sha256.Sum256(k[:])
	return "SHA256:" + base64.RawStdEncoding.EncodeToString(h[:])
}

// String is the key as it is written in files: KeyType and its base64.
func (k PublicKey) String() string {
	return KeyType + " " + base64.StdEncoding.EncodeToString(k[:])
}

// Line is the key with a comment, as keygen prints it.
func (k PublicKey) Line(comment string) string {
	if comment == "" {
		return k.String()
	}
	return k.String() + " " + comment
}

func (k PublicKey) ed25519() ed25519.PublicKey { return ed25519.PublicKey(k[:]) }

// PublicOf returns the public key of priv.
func PublicOf(priv ed25519.PrivateKey) PublicKey {
	var k PublicKey
	copy(k[:], priv.Public().(ed25519.PublicKey))
	return k
}

// ParsePublicKey reads "sauve-ed25519 BASE64 [COMMENT]" and returns the
// key and the comment.
func ParsePublicKey(s string) (PublicKey, string, error) {
	s = strings.TrimSpace(s)
	typ, rest, _ := strings.Cut(s, " ")
	if typ != KeyType {
		return PublicKey{}, "", fmt.Errorf("a public key starts with %q, not %.40q", KeyType, typ)
	}
	rest = strings.TrimLeft(rest, " \t")
	b64, comment, _ := strings.Cut(rest, " ")
	k, err := decodeKey(b64)
	if err != nil {
		return PublicKey{}, "", err
	}
	return k, strings.TrimSpace(comment), nil
}

// decodeKey reads the base64 of a 32-byte public key.
func decodeKey(b64 string) (PublicKey, error) {
	var k PublicKey
	if len(b64) != base64.StdEncoding.EncodedLen(len(k)) {
		return k, fmt.Errorf("a public key is %d base64 characters, not %d", base64.StdEncoding.EncodedLen(len(k)), len(b64))
	}
	b, err := base64.StdEncoding.Strict().DecodeString(b64)
	if err != nil || len(b) != len(k) {
		return k, fmt.Errorf("public key %.12q...: not base64 of %d bytes", b64, len(k))
	}
	copy(k[:], b)
	return k, nil
}

// GenerateKey makes a new key pair.
func GenerateKey() (ed25519.PrivateKey, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate an Ed25519 key: %w", err)
	}
	return priv, nil
}

// EncodePrivateKey is the key file's content: PKCS #8 in PEM, the form
// openssl reads, so an administrator can inspect it with standard tools.
func EncodePrivateKey(priv ed25519.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("encode the private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParsePrivateKey reads a key file's content.
func ParsePrivateKey(data []byte) (ed25519.PrivateKey, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, errors.New("not a PEM \"PRIVATE KEY\" block (make one with 'sauve agent keygen')")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("not a PKCS #8 private key: %w", err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("a %T, not an Ed25519 key", k)
	}
	return priv, nil
}

// LoadPrivateKey reads the key file at path. It refuses a file that others
// than its owner may read: that key is no longer secret.
func LoadPrivateKey(path string) (ed25519.PrivateKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read the key: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read the key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("key %s: others may read it (mode %04o): chmod 600 it, or make a new one", path, fi.Mode().Perm())
	}
	data, err := io.ReadAll(io.LimitReader(f, maxKeyFile+1))
	if err != nil {
		return nil, fmt.Errorf("read the key %s: %w", path, err)
	}
	if len(data) > maxKeyFile {
		return nil, fmt.Errorf("key %s: larger than %d bytes: not a key file", path, maxKeyFile)
	}
	priv, err := ParsePrivateKey(data)
	if err != nil {
		return nil, fmt.Errorf("key %s: %w", path, err)
	}
	return priv, nil
}

// WritePrivateKey writes a new key file at path, mode 0600. It never
// replaces a file: a key overwritten by mistake locks every caller out.
func WritePrivateKey(path string, priv ed25519.PrivateKey) error {
	data, err := EncodePrivateKey(priv)
	if err != nil {
		return err
	}
	return writeNew(path, data, 0o600)
}

// writeNew creates path with data; it fails if path exists.
func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%s exists already: not overwritten", path)
		}
		return fmt.Errorf("create %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// ReadPublicKeyArg reads a public key given on a command line: the key
// line itself, or the name of a file whose first line it is (a .pub
// file that keygen wrote).
func ReadPublicKeyArg(arg string) (PublicKey, string, error) {
	if strings.HasPrefix(strings.TrimSpace(arg), KeyType+" ") {
		return ParsePublicKey(arg)
	}
	f, err := os.Open(arg)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return PublicKey{}, "", fmt.Errorf("%.60q is neither a public key (%s BASE64) nor a file", arg, KeyType)
		}
		return PublicKey{}, "", fmt.Errorf("read the public key: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxKeyFile))
	if err != nil {
		return PublicKey{}, "", fmt.Errorf("read the public key %s: %w", arg, err)
	}
	line, _, _ := strings.Cut(string(data), "\n")
	k, c, err := ParsePublicKey(line)
	if err != nil {
		return PublicKey{}, "", fmt.Errorf("public key file %s: %w", arg, err)
	}
	return k, c, nil
}
