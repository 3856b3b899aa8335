package sftp

import (
	"context"

	"golang.org/x/crypto/ssh"
)

// DialSSH connects to cfg's server and signs in with the keys and under
// the host-key rules of the backend (known_hosts, an unknown or changed
// host key refused), for the other users of SSH: a migration's remote
// target runs sauve there over a session of the client returned.
func DialSSH(ctx context.Context, cfg Config) (*ssh.Client, error) {
	if cfg.Path == "" {
		cfg.Path = "/"
	}
	b, err := Open(cfg)
	if err != nil {
		return nil, err
	}
	return b.dial(ctx, nil)
}
