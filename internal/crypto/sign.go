package crypto

import (
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"path"
	"strings"
)

// OwnerName is how the owner is shown; no writer may be certified under it.
const OwnerName = "owner"

// ValidWriterName checks a name for a writer certificate: printable, not
// empty, and never the owner's name, so that a writer cannot be mistaken
// for the owner wherever signers are shown.
func ValidWriterName(name string) error {
	if name == "" || len(name) > 255 {
		return errors.New("a writer name must be 1 to 255 characters")
	}
	if strings.EqualFold(strings.TrimSpace(name), OwnerName) {
		return fmt.Errorf("%q is reserved for the repository owner: choose another writer name", name)
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("writer name %q holds a control character", name)
		}
	}
	return nil
}

// Scope returns the host patterns the writer may back up: the certificate's
// hosts, or its name when it lists none (certificates of version 1).
func (c *Cert) Scope() []string {
	if len(c.Hosts) > 0 {
		return c.Hosts
	}
	return []string{c.Name}
}

// Allows reports whether a manifest naming host is within the writer's
// scope. Patterns are path.Match globs ("*" allows every host).
func (c *Cert) Allows(host string) bool {
	for _, p := range c.Scope() {
		if ok, err := path.Match(p, host); err == nil && ok {
			return true
		}
	}
	return false
}

// verifyCert checks that the owner key certified c for repository repo.
func verifyCert(owner ed25519.PublicKey, repo string, c *Cert) error {
	if c == nil {
		return ErrUntrustedSigner
	}
	if c.Repo != repo || len(c.Signer) != ed25519.PublicKeySize || len(c.Signature) != ed25519.SignatureSize {
		return ErrUntrustedSigner
	}
	if !ed25519.Verify(owner, c.signedBytes(), c.Signature) {
		return ErrUntrustedSigner
	}
	return nil
}

// VerifyCert checks that c was issued by this repository's owner.
func (k *Keys) VerifyCert(c *Cert) error { return verifyCert(k.OwnerPublic, k.RepoID, c) }

// SignerPublic returns the public half of the key's signing key.
func (k *Keys) SignerPublic() [32]byte {
	return [32]byte(k.Signer.Public().(ed25519.PublicKey))
}

// IsOwner reports whether the key signs as the repository owner.
func (k *Keys) IsOwner() bool {
	return k.Cert == nil && ed25519.PublicKey(k.OwnerPublic).Equal(k.Signer.Public())
}

// Domains separate what a signature is for, so that a signature over one
// kind of object never verifies as another.
const (
	DomainIndex   = "sauve index v2"
	DomainTrailer = "sauve pack trailer v2"
	DomainLedger  = "sauve ledger v2"
	// DomainSession signs write-session announcements.
	DomainSession = "sauve session v2"
)

func domainMessage(domain string, msg []byte) []byte {
	b := make([]byte, 0, len(domain)+1+len(msg))
	b = append(b, domain...)
	b = append(b, 0)
	return append(b, msg...)
}

// SignerBlock identifies who signed an object: the signing key and, for a
// writer, the owner's certificate for it.
type SignerBlock struct {
	Key  [32]byte
	Cert *Cert // nil for the owner
}

const signatureLen = ed25519.SignatureSize

// SignObject frames msg and signs it in domain with the key's signer:
//
//	u32 len(msg) || msg || u16 len(cert) || cert JSON (empty for the owner) || signer key (32) || Ed25519 signature (64)
//
// The signature covers everything before it, so the object says who signed
// it and that claim is bound too.
func (k *Keys) SignObject(msg []byte, domain string) []byte {
	var cert []byte
	if k.Cert != nil {
		cert = k.Cert.encode()
	}
	b := make([]byte, 0, 4+len(msg)+2+len(cert)+32+signatureLen)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(msg)))
	b = append(b, msg...)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(cert)))
	b = append(b, cert...)
	pub := k.SignerPublic()
	b = append(b, pub[:]...)
	return append(b, ed25519.Sign(k.Signer, domainMessage(domain, b))...)
}

// ErrSignature marks an object whose signature is missing, malformed or
// wrong, or whose signer the owner did not certify.
var ErrSignature = errors.New("bad signature")

// OpenSigned checks what SignObject made and returns the message and its
// signer: the signature must verify, and a signer other than the owner
// (as k knows it, never as the object claims) must carry a certificate
// the owner issued for it in this repository. Revocation is the caller's
// business.
func (k *Keys) OpenSigned(b []byte, domain string) (msg []byte, who SignerBlock, err error) {
	if len(b) < 4+2+32+signatureLen {
		return nil, who, fmt.Errorf("%w: object too short to hold one", ErrSignature)
	}
	n := binary.LittleEndian.Uint32(b)
	if uint64(n) > uint64(len(b)-(4+2+32+signatureLen)) {
		return nil, who, fmt.Errorf("%w: message length %d exceeds the object", ErrSignature, n)
	}
	msg = b[4 : 4+n]
	rest := b[4+n:]
	cl := int(binary.LittleEndian.Uint16(rest))
	if 2+cl+32+signatureLen != len(rest) {
		return nil, who, fmt.Errorf("%w: certificate length %d does not fit", ErrSignature, cl)
	}
	copy(who.Key[:], rest[2+cl:])
	sig := rest[2+cl+32:]
	if !ed25519.Verify(who.Key[:], domainMessage(domain, b[:len(b)-signatureLen]), sig) {
		return nil, who, fmt.Errorf("%w: it does not match the object (tampered with)", ErrSignature)
	}
	if ed25519.PublicKey(k.OwnerPublic).Equal(ed25519.PublicKey(who.Key[:])) {
		return msg, who, nil
	}
	if cl == 0 {
		return nil, who, fmt.Errorf("%w: %v", ErrSignature, ErrUntrustedSigner)
	}
	c, err := decodeCert(rest[2 : 2+cl])
	if err != nil {
		return nil, who, fmt.Errorf("%w: certificate: %v", ErrSignature, err)
	}
	if !ed25519.PublicKey(c.Signer).Equal(ed25519.PublicKey(who.Key[:])) {
		return nil, who, fmt.Errorf("%w: the certificate is for another key", ErrSignature)
	}
	if err := k.VerifyCert(c); err != nil {
		return nil, who, fmt.Errorf("%w: %v", ErrSignature, err)
	}
	who.Cert = c
	return msg, who, nil
}
