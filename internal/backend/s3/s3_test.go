package s3_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/backendtest"
	"github.com/sauve-backup/sauve/internal/backend/s3"
	"github.com/sauve-backup/sauve/internal/backend/testsrv"
)

func open(t *testing.T, srv *testsrv.S3Server, bucket, prefix, access, secret string) *s3.Backend {
	t.Helper()
	be, err := s3.Open(context.Background(), s3.Config{
		Bucket: bucket, Prefix: prefix, Endpoint: srv.Endpoint, Region: srv.Region,
		AccessKey: access, SecretKey: secret, PartSize: 5 << 20,
	})
	if err != nil {
		t.Fatal(err)
	}
	return be
}

func TestConformance(t *testing.T) {
	srv := testsrv.StartVersity(t)
	// The bucket does not exist: saving the config creates it, as init does.
	be := open(t, srv, "sauve-repo", "hosts/a", srv.AccessKey, srv.SecretKey)
	if want := srv.Endpoint + "/sauve-repo/hosts/a"; be.Location() != want {
		t.Errorf("Location() = %q, want %q", be.Location(), want)
	}
	backendtest.Run(t, be, backendtest.Options{LargeSize: 11<<20 + 7, Secrets: []string{srv.SecretKey}})
}

// TestNoDeletePolicy: a user whose bucket policy allows reading, listing
// and writing but not deleting can do everything a backup needs, and
// nothing it stored can be removed with its keys.
func TestNoDeletePolicy(t *testing.T) {
	srv := testsrv.StartVersity(t)
	srv.CreateBucket(t, "backups")
	srv.CreateUser(t, "writer", "writer-secret-0123456789")
	srv.SetPolicy(t, "backups", `{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Principal": {"AWS": ["writer"]}, "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::backups"]},
    {"Effect": "Allow", "Principal": {"AWS": ["writer"]}, "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"], "Resource": ["arn:aws:s3:::backups/*"]}
  ]}`)
	ctx := context.Background()
	be := open(t, srv, "backups", "", "writer", "writer-secret-0123456789")
	cfg := backend.Handle{Type: backend.ConfigFile}
	if err := be.Save(ctx, cfg, bytes.NewReader([]byte("config")), 6); err != nil {
		t.Fatalf("save config: %v", err)
	}
	if err := be.Save(ctx, cfg, bytes.NewReader([]byte("other!")), 6); !errors.Is(err, backend.ErrExists) {
		t.Fatalf("overwrite config: %v, want ErrExists", err)
	}
	data, name := backendtest.Payload(7 << 20) // multipart
	h := backend.Handle{Type: backend.PackFile, Name: name}
	if err := be.Save(ctx, h, backend.NewByteReader(data), int64(len(data))); err != nil {
		t.Fatalf("save pack: %v", err)
	}
	if err := be.List(ctx, backend.PackFile, func(backend.Info) error { return nil }); err != nil {
		t.Fatalf("list: %v", err)
	}
	if _, err := backend.ReadRange(ctx, be, h, 100, 1000); err != nil {
		t.Fatalf("read: %v", err)
	}
	err := be.Remove(ctx, h)
	if !errors.Is(err, backend.ErrPermission) || !strings.Contains(err.Error(), "s3:DeleteObject") {
		t.Fatalf("remove without s3:DeleteObject: %v, want a permission error naming it", err)
	}
	if _, err := be.Stat(ctx, h); err != nil {
		t.Fatalf("pack gone after refused delete: %v", err)
	}
	// A write session's announcement: created, and its storage time read
	// back, with these rights alone.
	sd, sn := backendtest.Payload(300)
	sh := backend.Handle{Type: backend.SessionFile, Name: sn}
	if err := be.Save(ctx, sh, bytes.NewReader(sd), int64(len(sd))); err != nil {
		t.Fatalf("announce a write session: %v", err)
	}
	if fi, err := be.Stat(ctx, sh); err != nil || fi.ModTime.IsZero() {
		t.Fatalf("storage time of an announcement: %+v %v", fi, err)
	}

	// Without s3:ListBucket, listing names what is missing and why.
	srv.CreateUser(t, "nolist", "nolist-secret-0123456789")
	srv.SetPolicy(t, "backups", `{"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"AWS": ["nolist"]}, "Action": ["s3:GetObject", "s3:PutObject"], "Resource": ["arn:aws:s3:::backups/*"]}]}`)
	nl := open(t, srv, "backups", "", "nolist", "nolist-secret-0123456789")
	err = nl.List(ctx, backend.IndexFile, func(backend.Info) error { return nil })
	if !errors.Is(err, backend.ErrPermission) || !strings.Contains(err.Error(), "s3:ListBucket") || !strings.Contains(err.Error(), "to read the index") {
		t.Fatalf("list without s3:ListBucket: %v", err)
	}
	if !backend.IsPermanent(err) {
		t.Fatal("a refused list would be retried")
	}
}

func TestBadCredentials(t *testing.T) {
	srv := testsrv.StartVersity(t)
	srv.CreateBucket(t, "backups")
	ctx := context.Background()
	for _, c := range []struct{ access, secret, want string }{
		{"nobody", "whatever-secret", "InvalidAccessKeyId"},
		{srv.AccessKey, "wrong-secret-0123456789", "SignatureDoesNotMatch"},
	} {
		be := open(t, srv, "backups", "", c.access, c.secret)
		_, err := be.Stat(ctx, backend.Handle{Type: backend.ConfigFile})
		if err == nil || !errors.Is(err, backend.ErrPermission) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("access %q: %v, want a permission error naming %s", c.access, err, c.want)
		}
		if err != nil && strings.Contains(err.Error(), c.secret) {
			t.Errorf("error shows the secret: %v", err)
		}
	}
}

func TestConformanceUnderFaults(t *testing.T) {
	srv := testsrv.StartVersity(t)
	srv.CreateBucket(t, "faulty")
	backendtest.RunUnderFaults(t, strings.TrimPrefix(srv.Endpoint, "http://"), backendtest.Options{LargeSize: 12 << 20}, func(addr string) backend.Backend {
		be, err := s3.Open(context.Background(), s3.Config{
			Bucket: "faulty", Endpoint: "http://" + addr, Region: srv.Region, AccessKey: srv.AccessKey, SecretKey: srv.SecretKey,
			PartSize: 5 << 20, IdleTimeout: 1500 * time.Millisecond, Retry: backendtest.Retry,
		})
		if err != nil {
			t.Fatal(err)
		}
		return be
	})
}

func TestPartialUploadInvisible(t *testing.T) {
	srv := testsrv.StartVersity(t)
	srv.CreateBucket(t, "partial")
	backendtest.RunPartialUpload(t, strings.TrimPrefix(srv.Endpoint, "http://"), backendtest.Options{LargeSize: 12 << 20}, func(addr string) backend.Backend {
		be, err := s3.Open(context.Background(), s3.Config{
			Bucket: "partial", Endpoint: "http://" + addr, Region: srv.Region, AccessKey: srv.AccessKey, SecretKey: srv.SecretKey, PartSize: 5 << 20,
		})
		if err != nil {
			t.Fatal(err)
		}
		return be
	})
}

// TestSignedPayloads: the fallback for services without CRC-32C checksum
// headers (payloads signed with SHA-256) passes the suite too, and keeps
// cut uploads invisible.
func TestSignedPayloads(t *testing.T) {
	srv := testsrv.StartVersity(t)
	be := open(t, srv, "signed", "", srv.AccessKey, srv.SecretKey)
	be.ForceSigned()
	backendtest.Run(t, be, backendtest.Options{LargeSize: 11 << 20})
	srv.CreateBucket(t, "partial")
	backendtest.RunPartialUpload(t, strings.TrimPrefix(srv.Endpoint, "http://"), backendtest.Options{LargeSize: 12 << 20}, func(addr string) backend.Backend {
		be, err := s3.Open(context.Background(), s3.Config{
			Bucket: "partial", Endpoint: "http://" + addr, Region: srv.Region, AccessKey: srv.AccessKey, SecretKey: srv.SecretKey, PartSize: 5 << 20,
		})
		if err != nil {
			t.Fatal(err)
		}
		be.ForceSigned()
		return be
	})
}
