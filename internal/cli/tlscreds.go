package cli

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
)

// loadTLSCreds reads a qemu-style x509 credentials folder (ca-cert.pem,
// server-cert.pem, server-key.pem) into a server config that requires
// a client certificate signed by the CA. "" is no TLS.
func loadTLSCreds(dir string) (*tls.Config, error) {
	if dir == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("--tls-creds %s: load the server certificate and key: %w", dir, err)
	}
	caFile := filepath.Join(dir, "ca-cert.pem")
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("--tls-creds %s: %w", dir, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("--tls-creds %s: %s holds no PEM certificate", dir, caFile)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}, nil
}
