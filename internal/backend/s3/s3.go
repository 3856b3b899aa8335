// Package s3 stores a repository in a bucket of Amazon S3 or an
// S3-compatible service (MinIO, Ceph RGW, Wasabi, versitygw, ...).
//
// It uses the AWS SDK for Go v2 rather than minio-go: it is the reference
// implementation of the protocol, it reads credentials, region and
// endpoint exactly as the AWS CLI does (AWS_ACCESS_KEY_ID, AWS_PROFILE,
// AWS_REGION, AWS_ENDPOINT_URL, shared config files, SSO, instance roles),
// and it exposes conditional writes (If-None-Match) on PutObject and
// CompleteMultipartUpload, which the create-only config needs. Its
// modules are split per service, so only S3 and the config loader are
// compiled in.
//
// Small objects go up in one PutObject; packs are cut into parts uploaded
// in parallel and become visible, whole, only when CompleteMultipartUpload
// succeeds; a failed upload is aborted, and one cut short by a kill stays
// an invisible incomplete upload (a bucket lifecycle rule
// AbortIncompleteMultipartUpload clears those). Every write carries
// If-None-Match: *, so sauve never overwrites an object.
//
// The SDK's retries are off: package retry retries every backend alike.
// Every upload carries its CRC-32C (x-amz-checksum-crc32c), which the
// service verifies, so that a body cut short is refused; the payload is
// then left out of the signature (UNSIGNED-PAYLOAD), saving the SHA-256
// pass over every pack that signing it costs. Measured against versitygw,
// an unsigned upload without a checksum that was cut short by kill -9 was
// stored truncated, under the pack's name. A service that refuses checksum
// headers gets signed payloads instead, which it verifies as well.
package s3

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/netx"
)

// Defaults.
const (
	DefaultConnections  = 4
	DefaultPartSize     = 8 << 20
	DefaultPartParallel = 4
	minPartSize         = 5 << 20 // S3's minimum for all parts but the last
)

// Config says which bucket to use and how.
type Config struct {
	Bucket string
	Prefix string
	// Endpoint is the service URL for S3-compatible services; empty
	// means AWS (or AWS_ENDPOINT_URL, which the SDK reads).
	Endpoint string
	// Region; empty means AWS_REGION / the profile's, else us-east-1.
	Region string
	// PathStyle addresses the bucket as ENDPOINT/BUCKET rather than
	// BUCKET.ENDPOINT. It is implied for endpoints that are IP addresses
	// or localhost.
	PathStyle bool
	// AccessKey and SecretKey, when set, override the SDK's credential
	// chain (tests; the CLI leaves them to the environment).
	AccessKey, SecretKey string

	Connections  int
	PartSize     int
	PartParallel int
	IdleTimeout  time.Duration
	// Retry, when set, retries each part of a large object on its own
	// (retry.Do); nil tries once.
	Retry func(ctx context.Context, what string, fn func() error) error
}

// Backend is a repository in an S3 bucket.
type Backend struct {
	client   *s3.Client
	bucket   string
	prefix   string
	location string
	region   string
	partSize int
	parallel int
	retry    func(ctx context.Context, what string, fn func() error) error
	// plainSigned is set once the service refuses CRC-32C checksums:
	// bodies are then signed (SHA-256) instead, which it verifies too.
	plainSigned atomic.Bool
	// noConditional is set once the service refuses If-None-Match.
	noConditional atomic.Bool
}

// Open loads credentials and returns a backend. It does not contact the
// service.
func Open(ctx context.Context, cfg Config) (*Backend, error) {
	if err := checkBucket(cfg.Bucket); err != nil {
		return nil, err
	}
	if cfg.Connections <= 0 {
		cfg.Connections = DefaultConnections
	}
	if cfg.PartSize <= 0 {
		cfg.PartSize = DefaultPartSize
	}
	cfg.PartSize = max(cfg.PartSize, minPartSize)
	if cfg.PartParallel <= 0 {
		cfg.PartParallel = DefaultPartParallel
	}
	loadOpts := []func(*awsconfig.LoadOptions) error{
		// A BuildableClient, so that the SDK can still add AWS_CA_BUNDLE.
		awsconfig.WithHTTPClient(awshttp.NewBuildableClient().WithTransportOptions(func(tr *http.Transport) {
			netx.ConfigureTransport(tr, cfg.Connections*cfg.PartParallel, cfg.IdleTimeout)
		})),
		awsconfig.WithRetryer(func() aws.Retryer { return aws.NopRetryer{} }),
	}
	if cfg.Region != "" {
		loadOpts = append(loadOpts, awsconfig.WithRegion(cfg.Region))
	}
	if cfg.AccessKey != "" {
		loadOpts = append(loadOpts, awsconfig.WithCredentialsProvider(credentials.NewStaticCredentialsProvider(cfg.AccessKey, cfg.SecretKey, "")))
	}
	ac, err := awsconfig.LoadDefaultConfig(ctx, loadOpts...)
	if err != nil {
		return nil, fmt.Errorf("s3: load AWS configuration: %w", err)
	}
	if ac.Region == "" {
		ac.Region = "us-east-1"
	}
	endpoint := cfg.Endpoint
	if endpoint == "" && ac.BaseEndpoint != nil {
		endpoint = *ac.BaseEndpoint
	}
	if endpoint == "" {
		endpoint = os.Getenv("AWS_ENDPOINT_URL_S3")
	}
	pathStyle := cfg.PathStyle
	if endpoint != "" {
		u, err := url.Parse(endpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("s3 endpoint %q: want a URL such as https://s3.example.com or http://127.0.0.1:9000", endpoint)
		}
		if h := u.Hostname(); h == "localhost" || net.ParseIP(h) != nil {
			pathStyle = true // a bucket cannot be a sub-domain of an IP address
		}
	}
	client := s3.NewFromConfig(ac, func(o *s3.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
		o.UsePathStyle = pathStyle
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
	})
	loc := "s3://" + cfg.Bucket
	if endpoint != "" {
		loc = strings.TrimSuffix(endpoint, "/") + "/" + cfg.Bucket
	}
	b := &Backend{
		client: client, bucket: cfg.Bucket, prefix: normPrefix(cfg.Prefix), region: ac.Region,
		partSize: cfg.PartSize, parallel: cfg.PartParallel, retry: cfg.Retry,
	}
	if b.retry == nil {
		b.retry = func(_ context.Context, _ string, fn func() error) error { return fn() }
	}
	b.location = strings.TrimSuffix(loc+"/"+b.prefix, "/")
	return b, nil
}

func checkBucket(b string) error {
	if len(b) < 3 || len(b) > 63 || strings.Trim(b, "abcdefghijklmnopqrstuvwxyz0123456789.-") != "" {
		return fmt.Errorf("s3 bucket name %q: must be 3 to 63 lower-case letters, digits, dots and hyphens", b)
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

// Location implements backend.Backend.
func (b *Backend) Location() string { return b.location }

func (b *Backend) key(h backend.Handle) string { return b.prefix + h.Path() }

func contentAddressed(t backend.FileType) bool { return backend.ContentAddressed(t) }

// Save implements backend.Backend.
func (b *Backend) Save(ctx context.Context, h backend.Handle, rd io.ReadSeeker, size int64) error {
	err := b.save(ctx, h, rd, size)
	if err != nil && h.Type == backend.ConfigFile && code(err) == "NoSuchBucket" {
		// 'sauve init' creates the bucket, as the AWS CLI's mb would.
		if cerr := b.createBucket(ctx); cerr != nil {
			return cerr
		}
		if _, serr := rd.Seek(0, io.SeekStart); serr != nil {
			return serr
		}
		err = b.save(ctx, h, rd, size)
	}
	if err != nil && isNotImplemented(err) && !b.noConditional.Load() {
		// An older S3-compatible service that does not do conditional
		// writes: fall back to a check before the write.
		b.noConditional.Store(true)
		if _, serr := rd.Seek(0, io.SeekStart); serr != nil {
			return serr
		}
		err = b.save(ctx, h, rd, size)
	}
	if err == nil {
		return nil
	}
	var p *backend.Permanent
	if errors.As(err, &p) && !errors.Is(err, backend.ErrPermission) && !errors.Is(err, backend.ErrNotExist) && code(err) == "" && status(err) == 0 {
		return err // from retries that gave up, explained already
	}
	if isPreconditionFailed(err) {
		if contentAddressed(h.Type) {
			return nil // the same content is stored already
		}
		return fmt.Errorf("%s in %s: %w", h, b.location, backend.ErrExists)
	}
	return b.classify(err, "save "+h.String(), opWrite, h)
}

func (b *Backend) createBucket(ctx context.Context) error {
	in := &s3.CreateBucketInput{Bucket: &b.bucket}
	if b.region != "us-east-1" {
		in.CreateBucketConfiguration = &types.CreateBucketConfiguration{LocationConstraint: types.BucketLocationConstraint(b.region)}
	}
	_, err := b.client.CreateBucket(ctx, in)
	if err != nil && code(err) != "BucketAlreadyOwnedByYou" {
		return b.classify(err, "create bucket "+b.bucket, opCreateBucket, backend.Handle{Type: backend.ConfigFile})
	}
	return nil
}

func (b *Backend) ifNoneMatch() *string {
	if b.noConditional.Load() {
		return nil
	}
	return aws.String("*")
}

func (b *Backend) save(ctx context.Context, h backend.Handle, rd io.ReadSeeker, size int64) error {
	key := b.key(h)
	if b.noConditional.Load() && !contentAddressed(h.Type) {
		if _, err := b.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &b.bucket, Key: &key}); err == nil {
			return fmt.Errorf("%s in %s: %w", h, b.location, backend.ErrExists)
		}
	}
	if size <= int64(b.partSize) {
		in := &s3.PutObjectInput{Bucket: &b.bucket, Key: &key, Body: rd, ContentLength: aws.Int64(size), IfNoneMatch: b.ifNoneMatch()}
		if b.plainSigned.Load() {
			_, err := b.client.PutObject(ctx, in)
			return err
		}
		sum, err := crc32c(rd)
		if err != nil {
			return &backend.Permanent{Err: fmt.Errorf("read %s to upload: %w", h, err)}
		}
		in.ChecksumCRC32C = &sum
		_, err = b.client.PutObject(ctx, in, unsignedPayload)
		if b.checksumRefused(err) {
			if _, serr := rd.Seek(0, io.SeekStart); serr != nil {
				return serr
			}
			in.ChecksumCRC32C = nil
			_, err = b.client.PutObject(ctx, in)
		}
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
	return b.multipart(ctx, key, ra, size)
}

// multipart uploads parts in parallel and completes the upload, or aborts
// it on failure so that it leaves nothing behind.
func (b *Backend) multipart(ctx context.Context, key string, ra io.ReaderAt, size int64) (err error) {
	var up *s3.CreateMultipartUploadOutput
	err = b.retry(ctx, "start upload of "+key, func() error {
		var err error
		in := &s3.CreateMultipartUploadInput{Bucket: &b.bucket, Key: &key}
		if !b.plainSigned.Load() {
			in.ChecksumAlgorithm = types.ChecksumAlgorithmCrc32c
		}
		up, err = b.client.CreateMultipartUpload(ctx, in)
		if b.checksumRefused(err) {
			in.ChecksumAlgorithm = ""
			up, err = b.client.CreateMultipartUpload(ctx, in)
		}
		return markPermanent(err)
	})
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			// Abort even when ctx is cancelled, but do not hang on it.
			actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			_, _ = b.client.AbortMultipartUpload(actx, &s3.AbortMultipartUploadInput{Bucket: &b.bucket, Key: &key, UploadId: up.UploadId})
		}
	}()
	n := int((size + int64(b.partSize) - 1) / int64(b.partSize))
	parts := make([]types.CompletedPart, n)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(b.parallel)
	for i := range n {
		off := int64(i) * int64(b.partSize)
		length := min(int64(b.partSize), size-off)
		g.Go(func() error {
			num := int32(i + 1)
			// A failed part is retried alone, not the whole object.
			var sum *string
			var opts []func(*s3.Options)
			if up.ChecksumAlgorithm != "" || !b.plainSigned.Load() {
				s, err := crc32c(io.NewSectionReader(ra, off, length))
				if err != nil {
					return &backend.Permanent{Err: err}
				}
				sum, opts = &s, []func(*s3.Options){unsignedPayload}
			}
			return b.retry(gctx, fmt.Sprintf("save %s part %d", key, num), func() error {
				res, err := b.client.UploadPart(gctx, &s3.UploadPartInput{
					Bucket: &b.bucket, Key: &key, UploadId: up.UploadId, PartNumber: &num,
					Body: io.NewSectionReader(ra, off, length), ContentLength: aws.Int64(length),
					ChecksumCRC32C: sum,
				}, opts...)
				if err != nil {
					return markPermanent(err)
				}
				parts[i] = types.CompletedPart{ETag: res.ETag, PartNumber: &num, ChecksumCRC32C: sum}
				return nil
			})
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	tried := false
	return b.retry(ctx, "complete upload of "+key, func() error {
		_, err := b.client.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
			Bucket: &b.bucket, Key: &key, UploadId: up.UploadId,
			MultipartUpload: &types.CompletedMultipartUpload{Parts: parts},
			IfNoneMatch:     b.ifNoneMatch(),
		})
		if err != nil && tried && code(err) == "NoSuchUpload" {
			// An earlier attempt completed the upload but its answer was
			// lost: the object is there if it has the right size.
			if out, herr := b.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &b.bucket, Key: &key}); herr == nil && aws.ToInt64(out.ContentLength) == size {
				return nil
			}
		}
		tried = true
		return markPermanent(err)
	})
}

// markPermanent marks an SDK error that no retry fixes (a 4xx other than
// 408 and 429, or an error code that says so) as permanent, keeping it
// whole for classify.
func markPermanent(err error) error {
	if err == nil {
		return nil
	}
	if transient(err) {
		return brief(err)
	}
	return &backend.Permanent{Err: err}
}

// checksumRefused reports (once) a service that does not take CRC-32C
// checksum headers, and switches to signed payloads.
func (b *Backend) checksumRefused(err error) bool {
	if err == nil || b.plainSigned.Load() {
		return false
	}
	switch code(err) {
	case "NotImplemented", "InvalidArgument", "InvalidRequest", "XAmzContentSHA256Mismatch":
		b.plainSigned.Store(true)
		return true
	}
	return false
}

// crc32c returns the base64 CRC-32C of what rd holds, and rewinds it.
func crc32c(rd io.ReadSeeker) (string, error) {
	h := crc32.New(crc32.MakeTable(crc32.Castagnoli))
	if _, err := io.Copy(h, rd); err != nil {
		return "", err
	}
	if _, err := rd.Seek(0, io.SeekStart); err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(h.Sum(nil)), nil
}

// unsignedPayload leaves the body out of the request signature: the
// CRC-32C header makes the server verify it at a fraction of the cost of
// the SHA-256 a signed payload needs.
func unsignedPayload(o *s3.Options) {
	o.APIOptions = append(o.APIOptions, v4.SwapComputePayloadSHA256ForUnsignedPayloadMiddleware)
}

// Load implements backend.Backend.
func (b *Backend) Load(ctx context.Context, h backend.Handle, off, length int64) (io.ReadCloser, error) {
	key := b.key(h)
	in := &s3.GetObjectInput{Bucket: &b.bucket, Key: &key}
	switch {
	case length > 0:
		in.Range = aws.String(fmt.Sprintf("bytes=%d-%d", off, off+length-1))
	case off > 0:
		in.Range = aws.String(fmt.Sprintf("bytes=%d-", off))
	}
	out, err := b.client.GetObject(ctx, in)
	if err != nil {
		return nil, b.classify(err, "load "+h.String(), opRead, h)
	}
	return out.Body, nil
}

// Stat implements backend.Backend.
func (b *Backend) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	key := b.key(h)
	out, err := b.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &b.bucket, Key: &key})
	if err != nil {
		if c := code(err); status(err) == http.StatusForbidden && (c == "" || c == "Forbidden") {
			// A HEAD answer has no body, so no reason: a GET of one
			// byte tells a bad key from a missing right.
			g, gerr := b.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &b.bucket, Key: &key, Range: aws.String("bytes=0-0")})
			if gerr != nil {
				err = gerr
			} else {
				g.Body.Close()
			}
		}
		return backend.Info{}, b.classify(err, "stat "+h.String(), opRead, h)
	}
	return backend.Info{Name: h.Name, Size: aws.ToInt64(out.ContentLength), ModTime: aws.ToTime(out.LastModified)}, nil
}

// List implements backend.Backend.
func (b *Backend) List(ctx context.Context, t backend.FileType, fn func(backend.Info) error) error {
	prefix := b.prefix + string(t) + "/"
	p := s3.NewListObjectsV2Paginator(b.client, &s3.ListObjectsV2Input{Bucket: &b.bucket, Prefix: &prefix})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			if code(err) == "NoSuchBucket" {
				return nil // nothing stored yet; Save reports the bucket
			}
			return b.classify(err, "list "+string(t), opList, backend.Handle{Type: t})
		}
		for _, o := range page.Contents {
			name := aws.ToString(o.Key)
			name = name[strings.LastIndexByte(name, '/')+1:]
			if name == "" || strings.HasPrefix(name, ".") {
				continue
			}
			if err := fn(backend.Info{Name: name, Size: aws.ToInt64(o.Size), ModTime: aws.ToTime(o.LastModified)}); err != nil {
				return err
			}
		}
	}
	return nil
}

// Remove implements backend.Backend.
func (b *Backend) Remove(ctx context.Context, h backend.Handle) error {
	key := b.key(h)
	_, err := b.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &b.bucket, Key: &key})
	if err != nil {
		return b.classify(err, "remove "+h.String(), opDelete, h)
	}
	return nil
}

// Close implements backend.Backend.
func (b *Backend) Close() error { return nil }

// Client returns the SDK client (tests use it to set up buckets).
func (b *Backend) Client() *s3.Client { return b.client }
