package location

import (
	"context"
	"net/url"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Parsed
		err  string
	}{
		{in: "/srv/backup", want: Parsed{Kind: Local, Path: "/srv/backup", Display: "/srv/backup"}},
		{in: "relative/repo", want: Parsed{Kind: Local, Path: "relative/repo", Display: "relative/repo"}},
		{in: "file:///srv/backup", want: Parsed{Kind: Local, Path: "/srv/backup", Display: "file:///srv/backup"}},
		{in: "azure://acct/cont", want: Parsed{Kind: Azure, Account: "acct", Container: "cont", Display: "azure://acct/cont"}},
		{in: "azure://acct/cont/a/b/", want: Parsed{Kind: Azure, Account: "acct", Container: "cont", Prefix: "a/b", Display: "azure://acct/cont/a/b"}},
		{in: "azure://acct", err: "want azure://ACCOUNT/CONTAINER"},
		{in: "azure://acct/cont?sig=x", err: "take no query"},
		{in: "https://acct.blob.core.windows.net/cont/vm1?sv=2022-11-02&sp=rwl&sig=SECRET", want: Parsed{Kind: Azure, SASURL: "https://acct.blob.core.windows.net/cont/vm1?sv=2022-11-02&sp=rwl&sig=SECRET", Display: "https://acct.blob.core.windows.net/cont/vm1"}},
		{in: "http://127.0.0.1:10000/devstoreaccount1/cont", want: Parsed{Kind: Azure, Account: "devstoreaccount1", Endpoint: "http://127.0.0.1:10000/devstoreaccount1/", Container: "cont", Display: "http://127.0.0.1:10000/devstoreaccount1/cont"}},
		{in: "s3://bucket", want: Parsed{Kind: S3, Bucket: "bucket", Display: "s3://bucket"}},
		{in: "s3://bucket/pre/fix/", want: Parsed{Kind: S3, Bucket: "bucket", Prefix: "pre/fix", Display: "s3://bucket/pre/fix"}},
		{in: "s3://", err: "want s3://BUCKET"},
		{in: "sftp://bob@host.example:2222/srv/repo", want: Parsed{Kind: SFTP, User: "bob", Host: "host.example", Port: 2222, Path: "/srv/repo", Display: "sftp://bob@host.example:2222/srv/repo"}},
		{in: "sftp://host/~/repo", want: Parsed{Kind: SFTP, Host: "host", Path: "repo", Display: "sftp://host/~/repo"}},
		{in: "sftp://bob:pw@host/repo", err: "passwords in the URL are not supported"},
		{in: "sftp://host", err: "name a directory"},
		{in: "sftp://host:99999/x", err: "bad port"},
		{in: "gs://bucket", err: `scheme "gs" is not supported`},
		{in: "", err: "empty"},
	} {
		got, err := Parse(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("Parse(%q): %v, want error with %q", c.in, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("Parse(%q) = %+v, %v\nwant %+v", c.in, got, err, c.want)
		}
	}
}

func TestOpenNeedsCredentials(t *testing.T) {
	env := map[string]string{}
	getenv := func(k string) string { return env[k] }
	_, _, err := Open(context.Background(), "azure://acct/cont", Options{Getenv: getenv})
	if err == nil || !strings.Contains(err.Error(), "AZURE_STORAGE_KEY") {
		t.Fatalf("azure without credentials: %v", err)
	}
	env["AZURE_STORAGE_CONNECTION_STRING"] = "DefaultEndpointsProtocol=https;AccountName=other;AccountKey=c2VjcmV0;"
	_, _, err = Open(context.Background(), "azure://acct/cont", Options{Getenv: getenv})
	if err == nil || !strings.Contains(err.Error(), `for account "other", not "acct"`) || strings.Contains(err.Error(), "c2VjcmV0") {
		t.Fatalf("connection string of another account: %v", err)
	}
	env = map[string]string{"AZURE_STORAGE_KEY": "not base64!"}
	_, _, err = Open(context.Background(), "azure://acct/cont", Options{Getenv: getenv})
	if err == nil || strings.Contains(err.Error(), "not base64!") {
		t.Fatalf("bad key: %v", err)
	}
	env = map[string]string{"AZURE_STORAGE_SAS_TOKEN": "?sv=2022-11-02&sp=rl&se=2099-01-01T00:00:00Z&sig=SECRET"}
	be, kind, err := Open(context.Background(), "azure://acct/cont/p", Options{Getenv: getenv})
	if err != nil || kind != Azure || be.Location() != "https://acct.blob.core.windows.net/cont/p" {
		t.Fatalf("azure:// with AZURE_STORAGE_SAS_TOKEN: %v %v", be, err)
	}
	// An expired SAS is refused before any request.
	_, _, err = Open(context.Background(), "https://acct.blob.core.windows.net/cont?sv=2022-11-02&sp=rl&se=2020-01-01T00:00:00Z&sig=SECRET", Options{})
	if err == nil || !strings.Contains(err.Error(), "expired at 2020-01-01T00:00:00Z") || strings.Contains(err.Error(), "SECRET") {
		t.Fatalf("expired SAS: %v", err)
	}
}

func TestDefaultConnections(t *testing.T) {
	for k, want := range map[Kind]int{Local: 2, Azure: 4, S3: 4, SFTP: 4} {
		if got := DefaultConnections(k); got != want {
			t.Errorf("DefaultConnections(%s) = %d, want %d", k, got, want)
		}
	}
}

// FuzzParse: no location string makes Parse panic, and no error shows a
// SAS signature.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"/srv/repo", "file:///x", "azure://a/b/c", "s3://bucket/p", "sftp://u@h:22/p", "sftp://h/~/p",
		"https://acct.blob.core.windows.net/c01/p?sv=2022-11-02&sp=racwdl&se=2026-01-01T00:00:00Z&sig=SIGVALUE",
		"http://127.0.0.1:10000/devstoreaccount1/c01?sig=SIGVALUE", "http://[::1]:10000/acct/c?sig=SIGVALUE",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := Parse(s)
		secret := ""
		if u, uerr := url.Parse(s); uerr == nil {
			if v := u.Query().Get("sig"); len(v) >= 4 {
				secret = v
			}
		}
		if secret == "" {
			return
		}
		if err != nil {
			if strings.Contains(err.Error(), secret) {
				t.Fatalf("Parse(%q) error shows the signature: %v", s, err)
			}
			return
		}
		if p.Kind != Local && strings.Contains(p.Display, secret) {
			t.Fatalf("Parse(%q).Display shows the SAS: %q", s, p.Display)
		}
	})
}
