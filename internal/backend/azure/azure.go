// Package azure stores a repository in an Azure Blob Storage container,
// through the official Azure SDK for Go (azblob).
//
// Credentials are a SAS URL exactly as the Azure portal hands it out, an
// account key, or a connection string (see Config). Every object is a block
// blob. Small objects go up in one Put Blob; larger ones (packs) are cut into
// blocks that are staged in parallel and then committed with one Put Block
// List, which is what makes the object appear, whole: a killed upload leaves
// only uncommitted blocks, which are invisible and which Azure discards
// after a week. Every write carries If-None-Match: *, so sauve never
// overwrites a blob: the config is create-only, and a content-addressed
// object that exists already is the same object.
//
// The SDK's own retries are off: the retry wrapper (package retry) retries
// every backend alike. Errors are classified here: 403s are permanent and,
// for a SAS, explained (which permission letter the token lacks, or when it
// expired); 404 is backend.ErrNotExist; 408, 429, 5xx and network errors are
// left transient.
package azure

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/netx"
)

// Defaults.
const (
	// DefaultConnections is how many objects are transferred at once.
	DefaultConnections = 4
	// DefaultBlockSize is the size of the blocks a large object is cut
	// into; objects up to this size go up in one request.
	DefaultBlockSize = 8 << 20
	// DefaultBlockParallel is how many blocks of one object are staged
	// at once.
	DefaultBlockParallel = 4
)

// Config says which container to use and how to sign in. Exactly one of
// SASURL, ConnectionString and AccountKey (with Endpoint) is set.
type Config struct {
	// SASURL is a container URL with a SAS token in its query, and
	// optionally a prefix in its path:
	// https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX?sp=...&sig=...
	SASURL string

	// ConnectionString is an Azure Storage connection string (it may name
	// a BlobEndpoint, as emulators need).
	ConnectionString string

	// AccountKey signs requests for the account named in Endpoint.
	AccountKey string
	// Endpoint is the account's blob endpoint,
	// https://ACCOUNT.blob.core.windows.net/ by default.
	Endpoint string
	Account  string

	Container string // not used with SASURL
	Prefix    string // not used with SASURL

	// Retry, when set, retries each block of a large object on its own
	// (retry.Do); nil tries once.
	Retry func(ctx context.Context, what string, fn func() error) error

	Connections   int           // objects in flight (sizes the connection pool)
	BlockSize     int           // 0: DefaultBlockSize
	BlockParallel int           // 0: DefaultBlockParallel
	IdleTimeout   time.Duration // 0: netx.DefaultIdleTimeout
}

// Backend is a repository in an Azure Blob container.
type Backend struct {
	cc        *container.Client
	canCreate bool // account credentials: may create the container
	container string
	prefix    string // "" or ends in "/"
	location  string
	sas       *sasInfo
	blockSize int
	parallel  int
	retry     func(ctx context.Context, what string, fn func() error) error
}

// Open checks cfg and returns a backend. It does not contact Azure.
func Open(cfg Config) (*Backend, error) {
	if cfg.Connections <= 0 {
		cfg.Connections = DefaultConnections
	}
	if cfg.BlockSize <= 0 {
		cfg.BlockSize = DefaultBlockSize
	}
	if cfg.BlockParallel <= 0 {
		cfg.BlockParallel = DefaultBlockParallel
	}
	opts := &container.ClientOptions{ClientOptions: policy.ClientOptions{
		Transport: netx.HTTPClient(cfg.Connections*cfg.BlockParallel, cfg.IdleTimeout),
		Retry:     policy.RetryOptions{MaxRetries: -1},
		Telemetry: policy.TelemetryOptions{Disabled: true},
	}}
	b := &Backend{blockSize: cfg.BlockSize, parallel: cfg.BlockParallel, retry: cfg.Retry}
	if b.retry == nil {
		b.retry = func(_ context.Context, _ string, fn func() error) error { return fn() }
	}
	var err error
	switch {
	case cfg.SASURL != "":
		var u *parsedURL
		u, err = parseBlobURL(cfg.SASURL)
		if err != nil {
			return nil, err
		}
		if u.sas == nil {
			return nil, fmt.Errorf("%s: no SAS token in the URL (it needs ?sv=...&sig=...)", u.String())
		}
		b.sas, b.container, b.prefix, b.location = u.sas, u.container, u.prefix, u.String()
		if err := b.sas.validity(time.Now()); err != nil {
			return nil, fmt.Errorf("%s: %w", b.location, err)
		}
		b.cc, err = container.NewClientWithNoCredential(u.containerURL()+"?"+u.rawQuery, opts)
	case cfg.ConnectionString != "":
		if err := checkName(cfg.Container); err != nil {
			return nil, err
		}
		b.container, b.prefix, b.canCreate = cfg.Container, normPrefix(cfg.Prefix), true
		b.cc, err = container.NewClientFromConnectionString(cfg.ConnectionString, cfg.Container, opts)
		if err == nil {
			b.location = strings.TrimSuffix(stripQuery(b.cc.URL()), "/") + "/" + b.prefix
		} else {
			err = fmt.Errorf("AZURE_STORAGE_CONNECTION_STRING: %v", err) // never echo the string itself
		}
	case cfg.AccountKey != "":
		if err := checkName(cfg.Container); err != nil {
			return nil, err
		}
		ep := cfg.Endpoint
		if ep == "" {
			if cfg.Account == "" {
				return nil, errors.New("azure: no storage account name")
			}
			ep = "https://" + cfg.Account + ".blob.core.windows.net/"
		}
		var cred *container.SharedKeyCredential
		cred, err = container.NewSharedKeyCredential(cfg.Account, cfg.AccountKey)
		if err != nil {
			return nil, fmt.Errorf("AZURE_STORAGE_KEY is not a valid account key (base64): %v", errors.Unwrap(err))
		}
		b.container, b.prefix, b.canCreate = cfg.Container, normPrefix(cfg.Prefix), true
		cu := strings.TrimSuffix(ep, "/") + "/" + cfg.Container
		b.location = cu + "/" + b.prefix
		b.cc, err = container.NewClientWithSharedKeyCredential(cu, cred, opts)
	default:
		return nil, errors.New("azure: no credentials: give a SAS URL, or set AZURE_STORAGE_KEY or AZURE_STORAGE_CONNECTION_STRING")
	}
	if err != nil {
		return nil, err
	}
	b.location = strings.TrimSuffix(b.location, "/")
	return b, nil
}

func checkName(c string) error {
	if len(c) < 3 || len(c) > 63 || strings.Trim(c, "abcdefghijklmnopqrstuvwxyz0123456789-") != "" || c[0] == '-' || strings.Contains(c, "--") {
		return fmt.Errorf("azure container name %q: must be 3 to 63 lower-case letters, digits and single hyphens", c)
	}
	return nil
}

func normPrefix(p string) string {
	p = strings.Trim(p, "/")
	if p == "" {
		return ""
	}
	return p + "/"
}

func stripQuery(u string) string {
	if i := strings.IndexByte(u, '?'); i >= 0 {
		return u[:i]
	}
	return u
}

// Location implements backend.Backend: the container URL and prefix,
// never the SAS token or key.
func (b *Backend) Location() string { return b.location }

func (b *Backend) name(h backend.Handle) string { return b.prefix + h.Path() }

// contentAddressed says whether an object's name is the hash of its
// content, so that an existing object of that name is the same object.
func contentAddressed(t backend.FileType) bool { return backend.ContentAddressed(t) }

// Save implements backend.Backend.
func (b *Backend) Save(ctx context.Context, h backend.Handle, rd io.ReadSeeker, size int64) error {
	err := b.save(ctx, h, rd, size)
	if err != nil && b.canCreate && h.Type == backend.ConfigFile && bloberror.HasCode(err, bloberror.ContainerNotFound) {
		// 'sauve init' with account credentials creates the container.
		if _, cerr := b.cc.Create(ctx, nil); cerr != nil && !bloberror.HasCode(cerr, bloberror.ContainerAlreadyExists) {
			return b.classify(cerr, "create container "+b.container, opCreateContainer, h)
		}
		if _, serr := rd.Seek(0, io.SeekStart); serr != nil {
			return serr
		}
		err = b.save(ctx, h, rd, size)
	}
	if err == nil {
		return nil
	}
	if bloberror.HasCode(err, bloberror.BlobAlreadyExists, bloberror.ConditionNotMet) || isStatus(err, http.StatusPreconditionFailed) {
		if contentAddressed(h.Type) {
			return nil
		}
		return fmt.Errorf("%s in %s: %w", h, b.location, backend.ErrExists)
	}
	return b.classify(err, "save "+h.String(), opWrite, h)
}

func (b *Backend) save(ctx context.Context, h backend.Handle, rd io.ReadSeeker, size int64) error {
	bb := b.cc.NewBlockBlobClient(b.name(h))
	createOnly := &blob.AccessConditions{ModifiedAccessConditions: &blob.ModifiedAccessConditions{IfNoneMatch: to.Ptr(azcore.ETagAny)}}
	if size <= int64(b.blockSize) {
		_, err := bb.Upload(ctx, nopCloser{rd}, &blockblob.UploadOptions{AccessConditions: createOnly})
		return err
	}
	ra, ok := rd.(io.ReaderAt)
	if !ok {
		buf := make([]byte, size)
		if _, err := io.ReadFull(rd, buf); err != nil {
			return &backend.Permanent{Err: fmt.Errorf("read %s to upload: %w", h, err)}
		}
		ra = bytes.NewReader(buf)
	}
	// Block IDs carry a random session tag: blocks staged by an earlier,
	// killed upload of the same blob are never mistaken for ours.
	var tag [8]byte
	_, _ = rand.Read(tag[:])
	n := int((size + int64(b.blockSize) - 1) / int64(b.blockSize))
	ids := make([]string, n)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(b.parallel)
	for i := range n {
		ids[i] = base64.StdEncoding.EncodeToString(fmt.Appendf(nil, "%s-%08d", hex.EncodeToString(tag[:]), i))
		off := int64(i) * int64(b.blockSize)
		sec := io.NewSectionReader(ra, off, min(int64(b.blockSize), size-off))
		g.Go(func() error {
			// A transactional MD5 lets the service reject a block damaged
			// on the way (and is Azurite's fast path: without one it
			// computes a CRC64 in JavaScript).
			sum := md5.New()
			if _, err := io.Copy(sum, sec); err != nil {
				return &backend.Permanent{Err: fmt.Errorf("read %s to upload: %w", h, err)}
			}
			md := sum.Sum(nil)
			// A failed block is retried alone, not the whole object:
			// under a high fault rate whole objects might never make it.
			return b.retry(gctx, fmt.Sprintf("save %s block %d", h, i), func() error {
				if _, err := sec.Seek(0, io.SeekStart); err != nil {
					return &backend.Permanent{Err: err}
				}
				_, err := bb.StageBlock(gctx, ids[i], nopCloser{sec}, &blockblob.StageBlockOptions{
					TransactionalValidation: blob.TransferValidationTypeMD5(md),
				})
				return markPermanent(err)
			})
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return b.retry(ctx, "commit "+h.String(), func() error {
		_, err := bb.CommitBlockList(ctx, ids, &blockblob.CommitBlockListOptions{AccessConditions: createOnly})
		return markPermanent(err)
	})
}

// markPermanent marks an SDK error that no retry fixes (a 4xx other than
// 408 and 429) as permanent, keeping it whole for classify.
func markPermanent(err error) error {
	if err == nil {
		return nil
	}
	if transient(err) {
		return brief(err)
	}
	return &backend.Permanent{Err: err}
}

type nopCloser struct{ io.ReadSeeker }

func (nopCloser) Close() error { return nil }

// Load implements backend.Backend.
func (b *Backend) Load(ctx context.Context, h backend.Handle, off, length int64) (io.ReadCloser, error) {
	resp, err := b.cc.NewBlobClient(b.name(h)).DownloadStream(ctx, &blob.DownloadStreamOptions{
		Range: blob.HTTPRange{Offset: off, Count: length},
	})
	if err != nil {
		return nil, b.classify(err, "load "+h.String(), opRead, h)
	}
	return resp.Body, nil
}

// Stat implements backend.Backend.
func (b *Backend) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	resp, err := b.cc.NewBlobClient(b.name(h)).GetProperties(ctx, nil)
	if err != nil {
		return backend.Info{}, b.classify(err, "stat "+h.String(), opRead, h)
	}
	var size int64
	if resp.ContentLength != nil {
		size = *resp.ContentLength
	}
	var mod time.Time
	if resp.LastModified != nil {
		mod = *resp.LastModified
	}
	return backend.Info{Name: h.Name, Size: size, ModTime: mod}, nil
}

// List implements backend.Backend.
func (b *Backend) List(ctx context.Context, t backend.FileType, fn func(backend.Info) error) error {
	prefix := b.prefix + string(t) + "/"
	pager := b.cc.NewListBlobsFlatPager(&container.ListBlobsFlatOptions{Prefix: &prefix, MaxResults: to.Ptr(int32(5000))})
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			if bloberror.HasCode(err, bloberror.ContainerNotFound) {
				return nil // nothing stored yet; Save reports the container
			}
			return b.classify(err, "list "+string(t), opList, backend.Handle{Type: t})
		}
		for _, it := range page.Segment.BlobItems {
			if it.Name == nil {
				continue
			}
			name := *it.Name
			name = name[strings.LastIndexByte(name, '/')+1:]
			fi := backend.Info{Name: name}
			if p := it.Properties; p != nil {
				if p.ContentLength != nil {
					fi.Size = *p.ContentLength
				}
				if p.LastModified != nil {
					fi.ModTime = *p.LastModified
				}
			}
			if err := fn(fi); err != nil {
				return err
			}
		}
	}
	return nil
}

// Remove implements backend.Backend.
func (b *Backend) Remove(ctx context.Context, h backend.Handle) error {
	_, err := b.cc.NewBlobClient(b.name(h)).Delete(ctx, nil)
	if err != nil {
		return b.classify(err, "remove "+h.String(), opDelete, h)
	}
	return nil
}

// Close implements backend.Backend.
func (b *Backend) Close() error { return nil }

func isStatus(err error, code int) bool {
	var re *azcore.ResponseError
	return errors.As(err, &re) && re.StatusCode == code
}

// parsedURL is a container URL split into its parts.
type parsedURL struct {
	scheme, host string
	pathStyle    bool // http://127.0.0.1:10000/ACCOUNT/CONTAINER (emulators)
	account      string
	container    string
	prefix       string // "" or ends in "/"
	rawQuery     string
	sas          *sasInfo
}

// String is the URL without its query (no secrets).
func (u *parsedURL) String() string {
	return strings.TrimSuffix(u.containerURL()+"/"+u.prefix, "/")
}

func (u *parsedURL) containerURL() string {
	if u.pathStyle {
		return u.scheme + "://" + u.host + "/" + u.account + "/" + u.container
	}
	return u.scheme + "://" + u.host + "/" + u.container
}

// parseBlobURL splits a container URL as the portal or an emulator gives
// it. The account is the first label of the host name, or, for an IP
// address, localhost or a host name without dots (emulators), the first
// element of the path.
func parseBlobURL(raw string) (*parsedURL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		// url's error repeats the whole URL, SAS included.
		return nil, errors.New("azure: the URL does not parse")
	}
	p := &parsedURL{scheme: u.Scheme, host: u.Host, rawQuery: u.RawQuery}
	if p.scheme != "https" && p.scheme != "http" {
		return nil, fmt.Errorf("azure: URL scheme %q: want https", u.Scheme)
	}
	hostname := u.Hostname()
	if hostname == "" {
		return nil, errors.New("azure: the URL names no host")
	}
	parts := strings.Split(strings.Trim(u.Path, "/"), "/")
	if len(parts) == 1 && parts[0] == "" {
		parts = nil
	}
	if isIPOrLocal(hostname) {
		p.pathStyle = true
		if len(parts) == 0 {
			return nil, fmt.Errorf("azure: %s://%s: the URL names no storage account (path-style URLs are http://HOST:PORT/ACCOUNT/CONTAINER)", u.Scheme, u.Host)
		}
		p.account, parts = parts[0], parts[1:]
	} else {
		p.account, _, _ = strings.Cut(hostname, ".")
	}
	if p.account == "" || strings.Trim(p.account, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") != "" {
		return nil, fmt.Errorf("azure: %s://%s: %q is not a storage account name", u.Scheme, u.Host, p.account)
	}
	if len(parts) == 0 {
		return nil, fmt.Errorf("azure: %s: the URL names no container (https://ACCOUNT.blob.core.windows.net/CONTAINER?SAS)", (&parsedURL{scheme: p.scheme, host: p.host, pathStyle: p.pathStyle, account: p.account}).containerURL())
	}
	p.container = parts[0]
	if err := checkName(p.container); err != nil {
		return nil, err
	}
	p.prefix = normPrefix(strings.Join(parts[1:], "/"))
	if u.RawQuery != "" {
		q, err := url.ParseQuery(u.RawQuery)
		if err != nil {
			return nil, fmt.Errorf("azure: %s: the SAS token does not parse", p.String())
		}
		if q.Get("sig") != "" {
			p.sas = parseSAS(q)
		} else if q.Get("sv") != "" || q.Get("sp") != "" || q.Get("se") != "" {
			return nil, fmt.Errorf("azure: %s: the SAS token has no signature (no sig parameter): was the URL cut at an '&' by the shell? Put it in single quotes", p.String())
		}
	}
	return p, nil
}

func isIPOrLocal(host string) bool {
	if host == "localhost" || !strings.Contains(host, ".") {
		return true
	}
	return strings.Trim(host, "0123456789.") == "" || strings.Contains(host, ":")
}

// ParseURL reports whether raw is an Azure Blob container URL, and what it
// names, without its secrets. It is for the location parser.
func ParseURL(raw string) (location string, hasSAS bool, err error) {
	u, err := parseBlobURL(raw)
	if err != nil {
		return "", false, err
	}
	return u.String(), u.sas != nil, nil
}

// AccountFromURL returns the account and container endpoint of a
// container URL without SAS, for use with an account key.
func AccountFromURL(raw string) (account, endpoint, container, prefix string, err error) {
	u, err := parseBlobURL(raw)
	if err != nil {
		return "", "", "", "", err
	}
	ep := u.scheme + "://" + u.host + "/"
	if u.pathStyle {
		ep += u.account + "/"
	}
	return u.account, ep, u.container, u.prefix, nil
}
