package agent

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"time"
)

// TLS carries the protocol over TCP for confidentiality (the freeze
// report names mounts and applications). Its certificates are
// self-signed and verified by the key they carry, not by a CA: the key
// is what the known-agents and authorized-keys files pin, and the same
// key then signs the handshake. The exporter of the connection is in the
// handshake's transcript (transcript.go).

// exporterLabel labels the keying material exported from TLS for the
// handshake.
const exporterLabel = "EXPORTER-sauve-agent-v1"

// selfSigned makes a certificate for priv's public key, signed by priv.
// Its dates and names mean nothing to a peer that checks the key.
func selfSigned(priv ed25519.PrivateKey) (tls.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("make the TLS certificate: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "sauve agent " + PublicOf(priv).Fingerprint()},
		NotBefore:    now.Add(-24 * time.Hour),
		NotAfter:     now.Add(100 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, priv.Public(), priv)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("make the TLS certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv}, nil
}

// certKey is the Ed25519 key of the peer's certificate.
func certKey(cs tls.ConnectionState) (PublicKey, error) {
	if len(cs.PeerCertificates) == 0 {
		return PublicKey{}, errors.New("no TLS certificate")
	}
	pub, ok := cs.PeerCertificates[0].PublicKey.(ed25519.PublicKey)
	if !ok || len(pub) != len(PublicKey{}) {
		return PublicKey{}, fmt.Errorf("a TLS certificate with a %T key, not Ed25519", cs.PeerCertificates[0].PublicKey)
	}
	return PublicKey(pub), nil
}

// baseTLS is what both sides share: TLS 1.3 only, this key's
// certificate, and no CA verification (the key is checked instead).
func baseTLS(cert tls.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
	}
}

// serverTLS is the agent's: it asks for the caller's certificate, whose
// key the caller's hello must then name.
func serverTLS(cert tls.Certificate) *tls.Config {
	c := baseTLS(cert)
	c.ClientAuth = tls.RequireAnyClientCert
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		_, err := certKey(cs)
		return err
	}
	return c
}

// clientTLS is the caller's: check is given the agent certificate's key
// and fails the handshake if it is not the one expected.
func clientTLS(cert tls.Certificate, check func(PublicKey) error) *tls.Config {
	c := baseTLS(cert)
	c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	c.Certificates = nil
	// Verification is by the pinned key in VerifyConnection, which runs
	// also when InsecureSkipVerify turns off the CA chain check.
	c.InsecureSkipVerify = true
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		k, err := certKey(cs)
		if err != nil {
			return err
		}
		return check(k)
	}
	return c
}

// exporterOf is the keying material of a TLS connection that the
// handshake binds.
func exporterOf(cs tls.ConnectionState) ([]byte, error) {
	ek, err := cs.ExportKeyingMaterial(exporterLabel, nil, 32)
	if err != nil {
		return nil, fmt.Errorf("TLS exporter: %w", err)
	}
	return ek, nil
}
