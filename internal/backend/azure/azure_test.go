package azure_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/azure"
	"github.com/sauve-backup/sauve/internal/backend/backendtest"
	"github.com/sauve-backup/sauve/internal/backend/testsrv"
)

func sig(sasURL string) string {
	u, _ := url.Parse(sasURL)
	return u.Query().Get("sig")
}

func TestConformanceConnectionString(t *testing.T) {
	az := testsrv.StartAzurite(t)
	be, err := azure.Open(azure.Config{ConnectionString: az.ConnectionString(), Container: "repo", Prefix: "hosts/a", BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	// The config save creates the container.
	backendtest.Run(t, be, backendtest.Options{LargeSize: 5<<20 + 123, Secrets: []string{testsrv.AzuriteKey}})
}

func TestConformanceSAS(t *testing.T) {
	az := testsrv.StartAzurite(t)
	az.CreateContainer(t, "backups")
	u := az.SAS(t, "backups", "vm1/disks", "racwdl", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	be, err := azure.Open(azure.Config{SASURL: u, BlockSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if want := az.URL + "/backups/vm1/disks"; be.Location() != want {
		t.Errorf("Location() = %q, want %q", be.Location(), want)
	}
	backendtest.Run(t, be, backendtest.Options{LargeSize: 3<<20 + 1, Secrets: []string{sig(u), "sig="}})
}

// TestSASPermissions checks that each missing permission is named, and
// that a SAS without delete permission is enough to write.
func TestSASPermissions(t *testing.T) {
	az := testsrv.StartAzurite(t)
	az.CreateContainer(t, "cone")
	ctx := context.Background()
	valid := func(perms string) *azure.Backend {
		be, err := azure.Open(azure.Config{SASURL: az.SAS(t, "cone", "", perms, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))})
		if err != nil {
			t.Fatal(err)
		}
		return be
	}
	data, name := backendtest.Payload(1000)
	h := backend.Handle{Type: backend.IndexFile, Name: name}

	noDelete := valid("racwl")
	if err := noDelete.Save(ctx, h, bytes.NewReader(data), int64(len(data))); err != nil {
		t.Fatalf("save with sp=racwl: %v", err)
	}
	if err := noDelete.List(ctx, backend.IndexFile, func(backend.Info) error { return nil }); err != nil {
		t.Fatalf("list with sp=racwl: %v", err)
	}
	err := noDelete.Remove(ctx, h)
	wantErr(t, err, backend.ErrPermission, "lacks delete (d) permission", "to remove index/"+name)
	if _, err := noDelete.Stat(ctx, h); err != nil {
		t.Fatalf("the object is gone after a refused delete: %v", err)
	}

	noList := valid("racwd")
	err = noList.List(ctx, backend.IndexFile, func(backend.Info) error { return nil })
	wantErr(t, err, backend.ErrPermission, "lacks list (l) permission, needed to read the index", "sp=rwl")

	noRead := valid("cwl")
	_, err = noRead.Load(ctx, h, 0, 0)
	wantErr(t, err, backend.ErrPermission, "lacks read (r) permission")

	readOnly := valid("rl")
	d2, n2 := backendtest.Payload(100)
	err = readOnly.Save(ctx, backend.Handle{Type: backend.IndexFile, Name: n2}, bytes.NewReader(d2), 100)
	wantErr(t, err, backend.ErrPermission, "lacks write (w) permission", "to store index/")

	// A backup's token announces its write session: it creates the
	// announcement and reads back its storage time, nothing more.
	d3, n3 := backendtest.Payload(200)
	sh := backend.Handle{Type: backend.SessionFile, Name: n3}
	backup := valid("rwl")
	if err := backup.Save(ctx, sh, bytes.NewReader(d3), 200); err != nil {
		t.Fatalf("announce with sp=rwl: %v", err)
	}
	if fi, err := backup.Stat(ctx, sh); err != nil || fi.ModTime.IsZero() {
		t.Fatalf("storage time of an announcement with sp=rwl: %+v %v", fi, err)
	}
	err = readOnly.Save(ctx, backend.Handle{Type: backend.SessionFile, Name: n2}, bytes.NewReader(d2), 100)
	wantErr(t, err, backend.ErrPermission, "lacks write (w) permission", "to store sessions/")

	expiry := time.Now().Add(-90 * time.Minute).UTC().Truncate(time.Second)
	_, err = azure.Open(azure.Config{SASURL: az.SAS(t, "cone", "", "racwdl", time.Now().Add(-3*time.Hour), expiry)})
	wantErr(t, err, backend.ErrPermission, "SAS token expired at "+expiry.Format(time.RFC3339), "90 minutes ago")

	_, err = azure.Open(azure.Config{SASURL: az.SAS(t, "cone", "", "racwdl", time.Now().Add(2*time.Hour), time.Now().Add(3*time.Hour))})
	wantErr(t, err, backend.ErrPermission, "not valid before")

	// A token whose signature does not match (revoked key, cut URL).
	bad := strings.Replace(az.SAS(t, "cone", "", "racwdl", time.Now().Add(-time.Hour), time.Now().Add(time.Hour)), "sig=", "sig=AAAA", 1)
	be, err := azure.Open(azure.Config{SASURL: bad})
	if err != nil {
		t.Fatal(err)
	}
	_, err = be.Stat(ctx, h)
	wantErr(t, err, backend.ErrPermission, "signature")
	if strings.Contains(err.Error(), sig(bad)) {
		t.Fatalf("error shows the signature: %v", err)
	}
}

func wantErr(t *testing.T, err, target error, subs ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want one with %q", subs)
	}
	if !errors.Is(err, target) {
		t.Fatalf("error %q is not %v", err, target)
	}
	if !backend.IsPermanent(err) {
		t.Fatalf("error %q would be retried", err)
	}
	for _, s := range subs {
		if !strings.Contains(err.Error(), s) {
			t.Fatalf("error %q lacks %q", err, s)
		}
	}
}

func TestMissingContainer(t *testing.T) {
	az := testsrv.StartAzurite(t)
	ctx := context.Background()
	u := testsrv.ContainerSAS(t, az.URL, testsrv.AzuriteAccount, testsrv.AzuriteKey, "nosuch", "", "racwdl", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	be, err := azure.Open(azure.Config{SASURL: u})
	if err != nil {
		t.Fatal(err)
	}
	cfg := backend.Handle{Type: backend.ConfigFile}
	if _, err := be.Stat(ctx, cfg); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("Stat in a missing container: %v", err)
	}
	err = be.Save(ctx, cfg, bytes.NewReader([]byte("x")), 1)
	if err == nil || !strings.Contains(err.Error(), `container "nosuch" does not exist`) {
		t.Fatalf("Save into a missing container with a SAS: %v", err)
	}
}

func TestParseURL(t *testing.T) {
	for _, c := range []struct {
		in, loc, err string
		sas          bool
	}{
		{"https://acct.blob.core.windows.net/c01?sp=racwdl&st=2026-01-01T00:00:00Z&se=2099-01-01T00:00:00Z&spr=https&sv=2022-11-02&sr=c&sig=abc%2Bdef%3D", "https://acct.blob.core.windows.net/c01", "", true},
		{"https://acct.blob.core.windows.net/c01/vm/disk?sv=2022-11-02&sig=x", "https://acct.blob.core.windows.net/c01/vm/disk", "", true},
		{"http://127.0.0.1:10000/devstoreaccount1/c01?sv=1&sig=x", "http://127.0.0.1:10000/devstoreaccount1/c01", "", true},
		{"http://localhost:10000/devstoreaccount1/c01/p", "http://localhost:10000/devstoreaccount1/c01/p", "", false},
		{"https://acct.blob.core.windows.net/?sv=1&ss=b&srt=sco&sig=x", "", "names no container", false},
		{"http://127.0.0.1:10000/?sig=x", "", "names no storage account", false},
		{"https://acct.blob.core.windows.net/Bad_Name?sig=x", "", "container name", false},
		{"ftp://acct/c01", "", "want https", false},
		{"https://acct.blob.core.windows.net/c01?sp=racwdl", "", "was the URL cut at an '&' by the shell", false},
	} {
		loc, sas, err := azure.ParseURL(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("ParseURL(%q): %v, want error with %q", c.in, err, c.err)
			}
			if err != nil && strings.Contains(err.Error(), "sig=") {
				t.Errorf("ParseURL(%q): error shows the SAS: %v", c.in, err)
			}
			continue
		}
		if err != nil || loc != c.loc || sas != c.sas {
			t.Errorf("ParseURL(%q) = %q, %v, %v; want %q, %v", c.in, loc, sas, err, c.loc, c.sas)
		}
	}
}

func TestConformanceUnderFaults(t *testing.T) {
	az := testsrv.StartAzurite(t)
	az.CreateContainer(t, "faulty")
	u := az.SAS(t, "faulty", "", "racwdl", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	backendtest.RunUnderFaults(t, fmt.Sprintf("127.0.0.1:%d", az.Port), backendtest.Options{LargeSize: 6 << 20}, func(addr string) backend.Backend {
		be, err := azure.Open(azure.Config{SASURL: strings.Replace(u, fmt.Sprintf("127.0.0.1:%d", az.Port), addr, 1), BlockSize: 1 << 20, IdleTimeout: 1500 * time.Millisecond, Retry: backendtest.Retry})
		if err != nil {
			t.Fatal(err)
		}
		return be
	})
}

func TestPartialUploadInvisible(t *testing.T) {
	az := testsrv.StartAzurite(t)
	az.CreateContainer(t, "partial")
	u := az.SAS(t, "partial", "", "racwdl", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	backendtest.RunPartialUpload(t, fmt.Sprintf("127.0.0.1:%d", az.Port), backendtest.Options{LargeSize: 6 << 20}, func(addr string) backend.Backend {
		be, err := azure.Open(azure.Config{SASURL: strings.Replace(u, fmt.Sprintf("127.0.0.1:%d", az.Port), addr, 1), BlockSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		return be
	})
}
