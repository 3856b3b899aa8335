package sftp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/netx"
)

func homeDir() string {
	if h, err := os.UserHomeDir(); err == nil {
		return h
	}
	return "/"
}

// tilde shortens a path under the home directory for messages.
func tilde(p string) string {
	h := homeDir()
	if h != "/" && strings.HasPrefix(p, h+"/") {
		return "~" + p[len(h):]
	}
	return p
}

// authMethods gathers the agent's keys and the key files. desc lists what
// was found, for the message when the server refuses them all.
func authMethods(cfg Config) ([]ssh.AuthMethod, []string, error) {
	var (
		signers []ssh.Signer
		desc    []string
		skipped []string
	)
	var agentSigners func() ([]ssh.Signer, error)
	if sock := os.Getenv("SSH_AUTH_SOCK"); sock != "" && !cfg.NoAgent {
		if c, err := net.Dial("unix", sock); err == nil {
			agentSigners = agent.NewClient(c).Signers
			desc = append(desc, "the keys in ssh-agent")
		} else {
			skipped = append(skipped, fmt.Sprintf("ssh-agent at %s: %v", sock, err))
		}
	}
	files := cfg.KeyFiles
	explicit := len(files) > 0
	if !explicit {
		for _, n := range []string{"id_ed25519", "id_ecdsa", "id_rsa"} {
			files = append(files, filepath.Join(homeDir(), ".ssh", n))
		}
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			if explicit {
				return nil, nil, fmt.Errorf("ssh key %s: %w", f, err)
			}
			continue
		}
		s, err := ssh.ParsePrivateKey(data)
		var pm *ssh.PassphraseMissingError
		switch {
		case errors.As(err, &pm):
			skipped = append(skipped, tilde(f)+" is protected by a passphrase (add it to ssh-agent with ssh-add)")
			continue
		case err != nil:
			return nil, nil, fmt.Errorf("ssh key %s: %w", f, err)
		}
		signers = append(signers, s)
		desc = append(desc, tilde(f))
	}
	if len(desc) == 0 {
		msg := "sftp: no SSH key to sign in with: start ssh-agent with your key loaded, or create ~/.ssh/id_ed25519, or name a key with SAUVE_SSH_KEY"
		if len(skipped) > 0 {
			msg += " (" + strings.Join(skipped, "; ") + ")"
		}
		return nil, nil, errors.New(msg)
	}
	methods := []ssh.AuthMethod{ssh.PublicKeysCallback(func() ([]ssh.Signer, error) {
		all := signers
		if agentSigners != nil {
			if as, err := agentSigners(); err == nil {
				all = append(as, signers...)
			}
		}
		return all, nil
	})}
	return methods, append(desc, skipped...), nil
}

// knownHosts returns the host key check.
func knownHosts(files []string) (ssh.HostKeyCallback, []string, error) {
	if len(files) == 0 {
		for _, f := range []string{filepath.Join(homeDir(), ".ssh", "known_hosts"), "/etc/ssh/ssh_known_hosts"} {
			if _, err := os.Stat(f); err == nil {
				files = append(files, f)
			}
		}
	}
	shown := make([]string, len(files))
	for i, f := range files {
		shown[i] = tilde(f)
	}
	if len(files) == 0 {
		shown = []string{"~/.ssh/known_hosts"} // no file: every host is unknown
	}
	cb, err := knownhosts.New(files...)
	if err != nil {
		return nil, nil, fmt.Errorf("sftp: read known hosts: %w", err)
	}
	return cb, shown, nil
}

// dial connects and signs in. algos, when set, limits the host key
// algorithms to those known_hosts has for the server.
func (b *Backend) dial(ctx context.Context, algos []string) (*ssh.Client, error) {
	return b.dialHost(ctx, algos, nil, nil)
}

// dialHost is dial; prev and prevKey are the refusal that made it retry
// with algos, reported if the server has no key of those types.
func (b *Backend) dialHost(ctx context.Context, algos []string, prev *knownhosts.KeyError, prevKey ssh.PublicKey) (*ssh.Client, error) {
	var presented ssh.PublicKey
	cfg := &ssh.ClientConfig{
		User: b.cfg.User,
		Auth: b.auth,
		HostKeyCallback: func(hostname string, remote net.Addr, key ssh.PublicKey) error {
			presented = key
			return b.hostKeys(hostname, remote, key)
		},
		HostKeyAlgorithms: algos,
		Timeout:           b.cfg.IdleTimeout,
	}
	conn, err := netx.Dialer{Timeout: b.cfg.IdleTimeout}.DialContext(ctx, "tcp", b.addr)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", b.addr, err)
	}
	c, chans, reqs, err := ssh.NewClientConn(conn, b.addr, cfg)
	if err != nil {
		conn.Close()
		var ke *knownhosts.KeyError
		if errors.As(err, &ke) {
			if len(ke.Want) > 0 && algos == nil && !sameType(ke.Want, presented) {
				// known_hosts has a key of another type for this
				// host: ask the server for that type instead.
				return b.dialHost(ctx, wantAlgos(ke.Want), ke, presented)
			}
			return nil, b.hostKeyError(ke, presented)
		}
		if prev != nil && strings.Contains(err.Error(), "no common algorithm for host key") {
			return nil, b.hostKeyError(prev, prevKey)
		}
		if strings.Contains(err.Error(), "unable to authenticate") {
			return nil, fmt.Errorf("SSH server %s refused user %s with %s: add the public key to ~%s/.ssh/authorized_keys there: %w",
				b.addr, b.cfg.User, strings.Join(b.authDesc, ", "), b.cfg.User, backend.ErrPermission)
		}
		return nil, fmt.Errorf("SSH handshake with %s: %w", b.addr, err)
	}
	return ssh.NewClient(c, chans, reqs), nil
}

func sameType(want []knownhosts.KnownKey, key ssh.PublicKey) bool {
	if key == nil {
		return true
	}
	for _, w := range want {
		if w.Key.Type() == key.Type() {
			return true
		}
	}
	return false
}

func wantAlgos(want []knownhosts.KnownKey) []string {
	var out []string
	for _, w := range want {
		switch t := w.Key.Type(); t {
		case ssh.KeyAlgoRSA:
			out = append(out, ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA)
		default:
			out = append(out, t)
		}
	}
	return out
}

// hostKeyError explains an unknown or changed host key.
func (b *Backend) hostKeyError(ke *knownhosts.KeyError, key ssh.PublicKey) error {
	fp, typ := "", "key"
	if key != nil {
		fp, typ = ssh.FingerprintSHA256(key), key.Type()
	}
	host := b.cfg.Host
	scanHost := host
	if b.cfg.Port != 22 {
		scanHost = "-p " + strconv.Itoa(b.cfg.Port) + " " + host
		host = "[" + host + "]:" + strconv.Itoa(b.cfg.Port)
	}
	if len(ke.Want) == 0 {
		return fmt.Errorf("the SSH host key of %s is not known (%s %s): check that fingerprint with the server's administrator, then add it to %s, for example with 'ssh-keyscan %s >> ~/.ssh/known_hosts': %w",
			host, typ, fp, strings.Join(b.khFiles, " or "), scanHost, backend.ErrPermission)
	}
	w := ke.Want[0]
	return fmt.Errorf("the SSH host key of %s has CHANGED: it is now %s %s, but %s line %d has %s %s; someone may be intercepting the connection, or the server was reinstalled: if you are sure it is the latter, remove the old key with 'ssh-keygen -R %s' and add the new one: %w",
		host, typ, fp, tilde(w.Filename), w.Line, w.Key.Type(), ssh.FingerprintSHA256(w.Key), host, backend.ErrPermission)
}
