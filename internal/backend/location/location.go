// Package location turns a repository location, as a user writes it on the
// command line, into a backend: a folder, an Azure Blob container (by
// azure:// name or by the SAS URL the Azure portal hands out), an S3 bucket
// or a directory on an SFTP server. Credentials come from the environment
// variables each service's own tools read. Remote backends are wrapped in
// the retry policy.
//
// Nothing this package returns, error messages included, contains a
// secret: SAS signatures, keys and connection strings stay out of them.
package location

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/azure"
	"github.com/sauve-backup/sauve/internal/backend/local"
	"github.com/sauve-backup/sauve/internal/backend/retry"
	"github.com/sauve-backup/sauve/internal/backend/s3"
	"github.com/sauve-backup/sauve/internal/backend/sftp"
)

// Kind is the type of backend a location names.
type Kind string

// Kinds.
const (
	Local Kind = "local"
	Azure Kind = "azure"
	S3    Kind = "s3"
	SFTP  Kind = "sftp"
)

// DefaultConnections is the number of objects in flight when the user does
// not say (--connections). A folder gains nothing past two; remote
// services hide their latency behind more, and every pack in flight holds
// a pack buffer (32 MiB by default), so the default stays modest; large
// objects are split into parallel blocks or parts besides.
func DefaultConnections(k Kind) int {
	switch k {
	case Azure:
		return azure.DefaultConnections
	case S3:
		return s3.DefaultConnections
	case SFTP:
		return sftp.DefaultConnections
	}
	return 2
}

// Options tune the backend.
type Options struct {
	// S3Endpoint overrides AWS_ENDPOINT_URL; S3PathStyle forces
	// path-style bucket addressing.
	S3Endpoint  string
	S3PathStyle bool
	// Connections sizes connection pools (0: the kind's default).
	Connections int
	// IdleTimeout fails a network transfer that makes no progress for
	// this long (0: one minute).
	IdleTimeout time.Duration
	// Retry is the retry policy for remote backends.
	Retry retry.Options
	// Getenv reads the environment (nil: os.Getenv).
	Getenv func(string) string
}

// Parsed is what a location string names.
type Parsed struct {
	Kind Kind
	// Display is the location without secrets.
	Display string

	Path string // local: folder; sftp: path on the server

	// Azure: SASURL, or Account + Container + Prefix (+ Endpoint for a
	// URL without SAS).
	SASURL    string
	Account   string
	Container string
	Prefix    string
	Endpoint  string

	Bucket string // S3 (Prefix too)

	User string // SFTP
	Host string
	Port int
}

// Parse reads a location:
//
//	/srv/backup, ./repo, file:///srv/backup      a folder
//	azure://ACCOUNT/CONTAINER[/PREFIX]           Azure Blob, key or connection string from the environment
//	https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX]?sv=...&sig=...
//	http://127.0.0.1:10000/ACCOUNT/CONTAINER[/PREFIX]?...   (emulators: path-style)
//	s3://BUCKET[/PREFIX]                         S3 or S3-compatible
//	sftp://[USER@]HOST[:PORT]/PATH               SFTP; /~/PATH is relative to the login directory
func Parse(s string) (Parsed, error) {
	if s == "" {
		return Parsed{}, errors.New("empty repository location")
	}
	scheme, rest, hasScheme := strings.Cut(s, "://")
	if !hasScheme || strings.ContainsAny(scheme, "/\\ ") {
		return Parsed{Kind: Local, Path: s, Display: s}, nil
	}
	switch strings.ToLower(scheme) {
	case "file":
		return Parsed{Kind: Local, Path: rest, Display: s}, nil
	case "azure":
		parts := strings.SplitN(strings.Trim(rest, "/"), "/", 3)
		if len(parts) < 2 || parts[0] == "" || parts[1] == "" {
			return Parsed{}, fmt.Errorf("repository %q: want azure://ACCOUNT/CONTAINER[/PREFIX]", s)
		}
		if strings.Contains(rest, "?") {
			return Parsed{}, errors.New("azure:// locations take no query: paste a SAS URL as https://ACCOUNT.blob.core.windows.net/CONTAINER?... instead")
		}
		p := Parsed{Kind: Azure, Account: parts[0], Container: parts[1]}
		if len(parts) == 3 {
			p.Prefix = strings.Trim(parts[2], "/")
		}
		p.Display = strings.TrimSuffix("azure://"+p.Account+"/"+p.Container+"/"+p.Prefix, "/")
		return p, nil
	case "http", "https":
		display, hasSAS, err := azure.ParseURL(s)
		if err != nil {
			return Parsed{}, fmt.Errorf("repository URL: %w", err)
		}
		p := Parsed{Kind: Azure, Display: display}
		if hasSAS {
			p.SASURL = s
			return p, nil
		}
		p.Account, p.Endpoint, p.Container, p.Prefix, err = azure.AccountFromURL(s)
		p.Prefix = strings.Trim(p.Prefix, "/")
		return p, err
	case "s3":
		bucket, prefix, _ := strings.Cut(strings.Trim(rest, "/"), "/")
		if bucket == "" {
			return Parsed{}, fmt.Errorf("repository %q: want s3://BUCKET[/PREFIX]", s)
		}
		p := Parsed{Kind: S3, Bucket: bucket, Prefix: strings.Trim(prefix, "/")}
		p.Display = strings.TrimSuffix("s3://"+bucket+"/"+p.Prefix, "/")
		return p, nil
	case "sftp":
		u, err := url.Parse(s)
		if err != nil || u.Host == "" {
			return Parsed{}, fmt.Errorf("repository %q: want sftp://[USER@]HOST[:PORT]/PATH", s)
		}
		if _, hasPass := u.User.Password(); hasPass {
			return Parsed{}, errors.New("sftp: passwords in the URL are not supported: sign in with an SSH key (ssh-agent or ~/.ssh/id_*)")
		}
		p := Parsed{Kind: SFTP, User: u.User.Username(), Host: u.Hostname(), Display: s}
		if ps := u.Port(); ps != "" {
			if p.Port, err = strconv.Atoi(ps); err != nil || p.Port <= 0 || p.Port > 65535 {
				return Parsed{}, fmt.Errorf("repository %q: bad port %q", s, ps)
			}
		}
		switch {
		case u.Path == "" || u.Path == "/":
			return Parsed{}, fmt.Errorf("repository %q: name a directory: sftp://HOST/PATH (or /~/PATH under the login directory)", s)
		case strings.HasPrefix(u.Path, "/~/"):
			p.Path = strings.TrimPrefix(u.Path, "/~/")
		default:
			p.Path = u.Path
		}
		return p, nil
	}
	return Parsed{}, fmt.Errorf("repository location: scheme %q is not supported (use a folder, azure://, https:// (an Azure SAS URL), s3:// or sftp://)", scheme)
}

// Open parses s and returns its backend (remote ones wrapped in retries)
// and its kind. It does not contact the service.
func Open(ctx context.Context, s string, opts Options) (backend.Backend, Kind, error) {
	p, err := Parse(s)
	if err != nil {
		return nil, "", err
	}
	getenv := opts.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	retryFn := func(ctx context.Context, what string, fn func() error) error {
		return retry.Do(ctx, opts.Retry, what, fn)
	}
	conns := opts.Connections
	if conns <= 0 {
		conns = DefaultConnections(p.Kind)
	}
	var be backend.Backend
	switch p.Kind {
	case Local:
		be, err = local.Open(p.Path)
		return be, Local, err
	case Azure:
		be, err = openAzure(p, getenv, conns, opts.IdleTimeout, retryFn)
	case S3:
		endpoint := opts.S3Endpoint
		if endpoint == "" {
			endpoint = getenv("AWS_ENDPOINT_URL_S3")
		}
		if endpoint == "" {
			endpoint = getenv("AWS_ENDPOINT_URL")
		}
		be, err = s3.Open(ctx, s3.Config{
			Bucket: p.Bucket, Prefix: p.Prefix, Endpoint: endpoint, PathStyle: opts.S3PathStyle,
			Connections: conns, IdleTimeout: opts.IdleTimeout, Retry: retryFn,
		})
	case SFTP:
		cfg := sftp.Config{User: p.User, Host: p.Host, Port: p.Port, Path: p.Path, Connections: conns, IdleTimeout: opts.IdleTimeout, Retry: retryFn}
		if k := getenv("SAUVE_SSH_KEY"); k != "" {
			cfg.KeyFiles = []string{k}
		}
		if k := getenv("SAUVE_SSH_KNOWN_HOSTS"); k != "" {
			cfg.KnownHosts = []string{k}
		}
		be, err = sftp.Open(cfg)
	}
	if err != nil {
		return nil, "", err
	}
	return retry.New(be, opts.Retry), p.Kind, nil
}

func openAzure(p Parsed, getenv func(string) string, conns int, idle time.Duration, retryFn func(context.Context, string, func() error) error) (backend.Backend, error) {
	cfg := azure.Config{Connections: conns, IdleTimeout: idle, Container: p.Container, Prefix: p.Prefix, Account: p.Account, Endpoint: p.Endpoint, Retry: retryFn}
	if p.SASURL != "" {
		cfg.SASURL = p.SASURL
		return azure.Open(cfg)
	}
	cs := getenv("AZURE_STORAGE_CONNECTION_STRING")
	key := getenv("AZURE_STORAGE_KEY")
	sasToken := strings.TrimPrefix(getenv("AZURE_STORAGE_SAS_TOKEN"), "?")
	switch {
	case key != "":
		cfg.AccountKey = key
	case cs != "":
		if name := connField(cs, "AccountName"); name != "" && p.Account != "" && name != p.Account {
			return nil, fmt.Errorf("%s: AZURE_STORAGE_CONNECTION_STRING is for account %q, not %q", p.Display, name, p.Account)
		}
		cfg.ConnectionString = cs
	case sasToken != "":
		ep := p.Endpoint
		if ep == "" {
			ep = "https://" + p.Account + ".blob.core.windows.net/"
		}
		cfg.SASURL = strings.TrimSuffix(ep, "/") + "/" + p.Container + "/" + p.Prefix + "?" + sasToken
	default:
		return nil, fmt.Errorf("%s: no Azure credentials: set AZURE_STORAGE_KEY (the account key), AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_SAS_TOKEN, or give a SAS URL as the repository", p.Display)
	}
	return azure.Open(cfg)
}

// connField returns a field of a connection string.
func connField(cs, name string) string {
	for _, kv := range strings.Split(cs, ";") {
		k, v, ok := strings.Cut(kv, "=")
		if ok && strings.EqualFold(strings.TrimSpace(k), name) {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// Sub returns the location of the folder (or prefix) seg inside location
// s, in the same form: an isolated namespace lives there, reached with the
// same credentials.
func Sub(s, seg string) (string, error) {
	p, err := Parse(s)
	if err != nil {
		return "", err
	}
	if seg == "" || strings.ContainsAny(seg, "?#\\") || strings.Contains(seg, "..") {
		return "", fmt.Errorf("bad sub-location %q", seg)
	}
	if p.Kind == Local {
		if rest, ok := strings.CutPrefix(s, "file://"); ok {
			return "file://" + filepath.Join(rest, seg), nil
		}
		return filepath.Join(s, seg), nil
	}
	base, query, hasQuery := strings.Cut(s, "?")
	out := strings.TrimRight(base, "/") + "/" + seg
	if hasQuery {
		out += "?" + query
	}
	return out, nil
}
