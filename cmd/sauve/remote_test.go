package main

// End-to-end tests against real storage servers (Azurite, versitygw,
// OpenSSH), each reached through a proxy that counts the bytes on the wire
// and can inject network faults.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/faultproxy"
	sftpbe "github.com/sauve-backup/sauve/internal/backend/sftp"
	"github.com/sauve-backup/sauve/internal/backend/testsrv"
)

// remote is a repository on a real server.
type remote struct {
	kind    string
	repo    string // location through the proxy
	proxy   *faultproxy.Proxy
	secrets []string // must never appear in sauve's output
	setup   func(e *env)
	// sas makes a SAS URL through the proxy with other permissions or
	// times (Azure only).
	sas func(perms string, start, expiry time.Time) string
}

func startProxy(t *testing.T, port int) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.Start(fmt.Sprintf("127.0.0.1:%d", port), faultproxy.Faults{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func azureRemote(t *testing.T) *remote {
	az := testsrv.StartAzurite(t)
	az.CreateContainer(t, "backups")
	p := startProxy(t, az.Port)
	r := &remote{kind: "azure", proxy: p, secrets: []string{testsrv.AzuriteKey}}
	r.sas = func(perms string, start, expiry time.Time) string {
		u := az.SAS(t, "backups", "hosts/web1", perms, start, expiry)
		q, _ := url.Parse(u)
		r.secrets = append(r.secrets, q.Query().Get("sig"))
		return strings.Replace(u, fmt.Sprintf("127.0.0.1:%d", az.Port), p.Addr, 1)
	}
	r.repo = r.sas("racwdl", time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	r.setup = func(e *env) {}
	return r
}

func s3Remote(t *testing.T) *remote {
	srv := testsrv.StartVersity(t)
	srv.CreateBucket(t, "backups")
	port := strings.TrimPrefix(srv.Endpoint, "http://127.0.0.1:")
	var n int
	fmt.Sscan(port, &n)
	p := startProxy(t, n)
	return &remote{kind: "s3", proxy: p, repo: "s3://backups/hosts/web1", secrets: []string{srv.SecretKey}, setup: func(e *env) {
		e.setenv("AWS_ACCESS_KEY_ID", srv.AccessKey)
		e.setenv("AWS_SECRET_ACCESS_KEY", srv.SecretKey)
		e.setenv("AWS_REGION", srv.Region)
		e.setenv("AWS_ENDPOINT_URL", "http://"+p.Addr)
		e.setenv("AWS_EC2_METADATA_DISABLED", "true")
	}}
}

func sftpRemote(t *testing.T) *remote {
	srv := testsrv.StartSSHD(t)
	p := startProxy(t, srv.Port)
	dir := filepath.Join(t.TempDir(), "repo")
	host, port, _ := strings.Cut(p.Addr, ":")
	key, err := os.ReadFile(srv.Key)
	if err != nil {
		t.Fatal(err)
	}
	return &remote{kind: "sftp", proxy: p, repo: fmt.Sprintf("sftp://%s@%s:%s%s", srv.User, host, port, dir), setup: func(e *env) {
		// The user's own ~/.ssh: key and known_hosts, as ssh uses them.
		ssh := filepath.Join(e.dir, ".ssh")
		os.MkdirAll(ssh, 0o700)
		os.WriteFile(filepath.Join(ssh, "id_ed25519"), key, 0o600)
		hostKey := strings.SplitN(srv.HostKeyLine, " ", 2)[1]
		os.WriteFile(filepath.Join(ssh, "known_hosts"), []byte(fmt.Sprintf("[%s]:%s %s\n", host, port, hostKey)), 0o600)
	}}
}

var remotes = []struct {
	name  string
	start func(t *testing.T) *remote
}{{"azure", azureRemote}, {"s3", s3Remote}, {"sftp", sftpRemote}}

// remoteEnv is an environment whose repository is r.
func remoteEnv(t *testing.T, r *remote) *env {
	e := newBareEnv(t)
	e.setenv("SAUVE_REPO", r.repo)
	r.setup(e)
	return e
}

// noSecrets fails if sauve's output shows a secret.
func (r *remote) noSecrets(t *testing.T, outputs ...string) {
	t.Helper()
	for _, o := range outputs {
		for _, s := range r.secrets {
			if s != "" && strings.Contains(o, s) {
				t.Fatalf("sauve's output shows a secret:\n%s", o)
			}
		}
	}
}

// testImage writes a disk image: random data (incompressible), text, a
// hole, and more random data: about 28 MiB of data in 40 MiB.
func testImage(t *testing.T, path string, seed uint64) {
	writeFile(t, path, nil)
	writeAt(t, path, 0, randomBytes(16<<20))
	writeAt(t, path, 16<<20, textBytes(seed, 8<<20))
	writeAt(t, path, 36<<20, randomBytes(4<<20))
}

func TestRemoteRoundTrip(t *testing.T) {
	for _, rk := range remotes {
		t.Run(rk.name, func(t *testing.T) {
			r := rk.start(t)
			e := remoteEnv(t, r)
			init := e.run("init")
			if init.code != 0 {
				t.Fatalf("init: %s", init.stderr)
			}
			r.noSecrets(t, init.stdout, init.stderr)
			if !strings.Contains(init.stdout, "created repository") {
				t.Fatalf("init output: %s", init.stdout)
			}
			src := e.path("disk.img")
			testImage(t, src, 1)
			b1 := e.backup(src)
			if b1.ChunksNew == 0 {
				t.Fatalf("first backup stored nothing: %+v", b1)
			}

			// An unchanged second backup moves almost nothing: the index,
			// snapshots and chunk lists come from the local cache.
			r.proxy.ResetStats()
			b2 := e.backup(src)
			st := r.proxy.Stats()
			if b2.ChunksNew != 0 || b2.ChunksReused != b1.ChunksNew+b1.ChunksReused {
				t.Fatalf("second backup: %+v", b2)
			}
			if moved := st.Up + st.Down; moved*100 > b1.Size {
				t.Fatalf("unchanged backup moved %d bytes (%d up, %d down) for a %d-byte disk: more than 1%%", moved, st.Up, st.Down, b1.Size)
			} else {
				t.Logf("unchanged backup of %d bytes moved %d bytes up, %d down", b1.Size, st.Up, st.Down)
			}

			// Restore into a new file and through stdout.
			out := e.path("out.img")
			r.noSecrets(t, e.ok("restore", "latest", out))
			sameFile(t, src, out)
			res := e.runIn(nil, "restore", b1.Snapshot, "-")
			if res.code != 0 || fileHashBytes([]byte(res.stdout)) != fileHash(t, src, -1) {
				t.Fatalf("restore to stdout: exit %d: %s", res.code, res.stderr)
			}

			chk := e.run("check", "--read-data")
			if chk.code != 0 || !strings.Contains(chk.stdout, "no errors found") {
				t.Fatalf("check --read-data: %s%s", chk.stdout, chk.stderr)
			}
			r.noSecrets(t, chk.stdout, chk.stderr)
			snaps := e.ok("snapshots")
			r.noSecrets(t, snaps)
		})
	}
}

// TestRemoteUnderFaults runs backup, restore and check through a proxy
// that resets connections, stalls them past the idle timeout and cuts
// responses short. Each command must succeed (retrying) or fail cleanly;
// afterwards the repository must be whole and every snapshot restore a
// version of the disk.
func TestRemoteUnderFaults(t *testing.T) {
	for _, rk := range remotes {
		t.Run(rk.name, func(t *testing.T) {
			r := rk.start(t)
			e := remoteEnv(t, r)
			e.ok("init")
			src := e.path("disk.img")
			testImage(t, src, 2)
			seed := uint64(time.Now().UnixNano())
			t.Logf("fault seed %d", seed)
			// Stalls outlast the idle timeout, which is long enough not to
			// fire on a machine busy with other tests; retries pause up
			// to 2s, so that ten attempts span more than a stall or two.
			r.proxy.SetFaults(faultproxy.Faults{Every: 8 << 20, Drop: 2, Stall: 1, Truncate: 2, StallFor: 4 * time.Second, Seed: seed})
			faulty := []string{"--net-timeout", "3s", "--retry-max-delay", "2s"}
			versions := map[string]bool{}
			ok := 0
			for round := 0; round < 3; round++ {
				writeAt(t, src, int64(round)*(4<<20), randomBytes(2<<20))
				versions[fileHash(t, src, -1)] = true
				t0 := time.Now()
				res := e.run(append([]string{"backup", src}, faulty...)...)
				t.Logf("round %d: backup exit %d in %s after %d retries", round, res.code, time.Since(t0).Round(time.Millisecond), strings.Count(res.stderr, "retrying in")+strings.Count(res.stderr, "resuming in"))
				r.noSecrets(t, res.stdout, res.stderr)
				if res.code == 0 {
					ok++
					continue
				}
				t.Logf("round %d: %s", round, lastLines(res.stderr, 3))
				// A clean failure: exit 1 and an error line, nothing else.
				if res.code != 1 || !strings.Contains(res.stderr, "sauve: error:") {
					t.Fatalf("round %d: backup under faults: exit %d\n%s", round, res.code, res.stderr)
				}
			}
			if ok == 0 {
				t.Fatal("no backup succeeded under faults")
			}
			restored := e.path("out.img")
			res := e.run(append([]string{"restore", "latest", restored}, faulty...)...)
			if res.code != 0 {
				t.Fatalf("restore under faults: %s", res.stderr)
			}
			if !versions[fileHash(t, restored, -1)] {
				t.Fatal("restore under faults gives none of the versions backed up")
			}
			res = e.run(append([]string{"check", "--read-data"}, faulty...)...)
			if res.code != 0 {
				r.proxy.SetFaults(faultproxy.Faults{})
				healthy := e.run("check", "--read-data")
				t.Logf("check --read-data on a healthy network: exit %d\n%s%s", healthy.code, healthy.stdout, healthy.stderr)
				t.Fatalf("check --read-data under faults: %s%s", res.stdout, res.stderr)
			}
			st := r.proxy.Stats()
			t.Logf("%d faults struck in %d connections", st.Struck, st.Conns)
			if st.Struck == 0 {
				t.Fatal("no fault struck")
			}
			// With the network healthy again: the repository is whole.
			r.proxy.SetFaults(faultproxy.Faults{})
			res = e.run("check", "--read-data")
			if res.code != 0 || strings.Contains(res.stderr, "warning") && !strings.Contains(res.stderr, "in no index") {
				t.Fatalf("check --read-data after faults: %s%s", res.stdout, res.stderr)
			}
		})
	}
}

// TestRemoteKill9 kills backups in the middle of uploads; the next backup
// completes, reuses what was uploaded, and the repository checks clean.
func TestRemoteKill9(t *testing.T) {
	for _, rk := range remotes {
		t.Run(rk.name, func(t *testing.T) {
			r := rk.start(t)
			e := remoteEnv(t, r)
			e.ok("init", "--pack-size", "2M")
			src := e.path("disk.img")
			writeFile(t, src, randomBytes(48<<20))
			killed := 0
			var stderrs bytes.Buffer
			for round := 0; round < 3; round++ {
				r.proxy.ResetStats()
				c := e.cmd(nil, "backup", src)
				c.Stderr = &stderrs
				if err := c.Start(); err != nil {
					t.Fatal(err)
				}
				// Kill once some packs went up, well before the end.
				deadline := time.Now().Add(20 * time.Second)
				for r.proxy.Stats().Up < int64(6+round*4)<<20 && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
				c.Process.Signal(syscall.SIGKILL)
				if err := c.Wait(); err != nil {
					killed++
				}
				if res := e.run("check"); res.code != 0 {
					t.Fatalf("round %d: check after kill -9: %s%s", round, res.stdout, res.stderr)
				}
			}
			if killed == 0 {
				t.Fatal("no backup was killed while running")
			}
			r.proxy.ResetStats()
			res := e.runIn(nil, "backup", src, "--json")
			if res.code != 0 {
				t.Fatalf("backup after kills: %s", res.stderr)
			}
			var b backupOut
			if err := jsonUnmarshal(res.stdout, &b); err != nil {
				t.Fatal(err)
			}
			stderrs.WriteString(res.stderr)
			// Packs of killed backups were found by their trailers and
			// indexed by the next run.
			if !strings.Contains(stderrs.String(), "left by an interrupted backup; their chunks are reused") {
				t.Errorf("no backup adopted the packs of a killed one:\n%s", stderrs.String())
			}
			up := r.proxy.Stats().Up
			t.Logf("after %d kills: %d chunks reused, %d new; %d MiB uploaded for a 48 MiB disk", killed, b.ChunksReused, b.ChunksNew, up>>20)
			if b.ChunksReused == 0 || up >= 44<<20 {
				t.Fatalf("the backup after the kills uploaded %d bytes and reused %d chunks: it did not reuse the packs already stored", up, b.ChunksReused)
			}
			chk := e.run("check", "--read-data")
			if chk.code != 0 {
				t.Fatalf("check --read-data: %s%s", chk.stdout, chk.stderr)
			}
			out := e.path("out.img")
			e.ok("restore", "latest", out)
			sameFile(t, src, out)
		})
	}
}

func fileHashBytes(b []byte) string { return fmt.Sprintf("%x", sha256.Sum256(b)) }

// TestAzureSASPermissions: a host holding a SAS without delete permission
// backs up; a SAS that lacks what a command needs, or has expired, fails
// with one line saying what is missing, and exit status 1.
func TestAzureSASPermissions(t *testing.T) {
	r := azureRemote(t)
	owner := remoteEnv(t, r)
	owner.ok("init")
	keyDir := filepath.Join(owner.dir, "config", "sauve", "keys")
	keys, _ := filepath.Glob(filepath.Join(keyDir, "*.key"))
	if len(keys) != 1 {
		t.Fatalf("key files: %v", keys)
	}
	writer := e2eHost(t, r, keys[0], r.sas("racwl", time.Now().Add(-time.Hour), time.Now().Add(time.Hour)))
	src := writer.path("disk.img")
	testImage(t, src, 3)
	res := writer.run("backup", src)
	if res.code != 0 {
		t.Fatalf("backup with sp=racwl: %s", res.stderr)
	}
	r.noSecrets(t, res.stdout, res.stderr)

	// The Azure portal's token for the classic recipe: read, write,
	// create, no list, a few minutes left. The backup works, says what it
	// could not do, and warns that the token may expire before its end.
	noList := e2eHost(t, r, keys[0], r.sas("racw", time.Now().Add(-time.Hour), time.Now().Add(5*time.Minute)))
	src2 := noList.path("disk2.img")
	testImage(t, src2, 9)
	res = noList.runIn(nil, "backup", src2, "--json")
	if res.code != 0 {
		t.Fatalf("backup with sp=racw: %s", res.stderr)
	}
	for _, want := range []string{"SAS token (sp=racw) cannot list", "reuses nothing stored before", "expires at"} {
		if !strings.Contains(res.stderr, want) {
			t.Errorf("backup with sp=racw does not say %q:\n%s", want, res.stderr)
		}
	}
	r.noSecrets(t, res.stdout, res.stderr)
	var nb backupOut
	if err := jsonUnmarshal(res.stdout, &nb); err != nil {
		t.Fatal(err)
	}
	// A snapshot written without listing restores like any other.
	full := e2eHost(t, r, keys[0], r.sas("racwdl", time.Now().Add(-time.Hour), time.Now().Add(time.Hour)))
	out2 := full.path("out2.img")
	full.ok("restore", nb.Snapshot, out2)
	sameFile(t, src2, out2)
	full.ok("check", "--read-data")
	stderr := noList.fail([]string{"SAS token (sp=racw) lacks list (l) permission", "sp=rwl"}, "snapshots")
	r.noSecrets(t, stderr)
	if n := strings.Count(strings.TrimSpace(stderr), "\n"); n != 0 {
		t.Errorf("%d lines for one error:\n%s", n+1, stderr)
	}

	expiry := time.Now().Add(-2 * time.Hour).UTC().Truncate(time.Second)
	expired := e2eHost(t, r, keys[0], r.sas("racwdl", time.Now().Add(-5*time.Hour), expiry))
	stderr = expired.fail([]string{"SAS token expired at " + expiry.Format(time.RFC3339)}, "snapshots")
	r.noSecrets(t, stderr)

	// Reading needs r and l only.
	reader := e2eHost(t, r, keys[0], r.sas("rl", time.Now().Add(-time.Hour), time.Now().Add(time.Hour)))
	out := reader.path("out.img")
	reader.ok("restore", "latest", "--source", src, out)
	sameFile(t, src, out)
	reader.ok("check")
}

// e2eHost is another machine: its own home and cache, the repository's
// key, and repo as its repository.
func e2eHost(t *testing.T, r *remote, key, repo string) *env {
	e := newBareEnv(t)
	r.setup(e)
	e.setenv("SAUVE_REPO", repo)
	e.setenv("SAUVE_KEY", key)
	return e
}

// TestS3NoDeletePolicy: credentials whose bucket policy has no
// s3:DeleteObject back up, restore and check.
func TestS3NoDeletePolicy(t *testing.T) {
	srv := testsrv.StartVersity(t)
	srv.CreateBucket(t, "backups")
	srv.CreateUser(t, "web1", "web1-secret-0123456789")
	srv.SetPolicy(t, "backups", `{"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"AWS": ["web1"]}, "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::backups"]},
    {"Effect": "Allow", "Principal": {"AWS": ["web1"]}, "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"], "Resource": ["arn:aws:s3:::backups/*"]}]}`)
	e := newBareEnv(t)
	e.setenv("SAUVE_REPO", "s3://backups/web1")
	e.setenv("AWS_ACCESS_KEY_ID", "web1")
	e.setenv("AWS_SECRET_ACCESS_KEY", "web1-secret-0123456789")
	e.setenv("AWS_REGION", srv.Region)
	e.setenv("AWS_EC2_METADATA_DISABLED", "true")
	e.ok("init", "--s3-endpoint", srv.Endpoint)
	src := e.path("disk.img")
	testImage(t, src, 4)
	e.backup(src, "--s3-endpoint", srv.Endpoint)
	e.backup(src, "--s3-endpoint", srv.Endpoint)
	out := e.path("out.img")
	e.ok("restore", "latest", out, "--s3-endpoint", srv.Endpoint)
	sameFile(t, src, out)
	e.ok("check", "--read-data", "--s3-endpoint", srv.Endpoint)
}

// TestStdinToCloud streams a disk through a pipe into an Azure SAS URL,
// with a progress bar that shows an ETA when --stdin-size is given.
func TestStdinToCloud(t *testing.T) {
	r := azureRemote(t)
	e := remoteEnv(t, r)
	e.ok("init")
	data := append(randomBytes(6<<20), textBytes(5, 10<<20)...)
	res := e.runIn(bytes.NewReader(data), "backup", "-", "--stdin-name", "vda.img", "--stdin-size", "16M", "--progress", "always")
	if res.code != 0 {
		t.Fatalf("backup from stdin: %s", res.stderr)
	}
	if !strings.Contains(res.stderr, "ETA") || !strings.Contains(res.stderr, "backup vda.img") {
		t.Errorf("no progress with ETA on stderr:\n%q", res.stderr)
	}
	r.noSecrets(t, res.stdout, res.stderr)
	out := e.path("vda.img")
	e.ok("restore", "latest", out)
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, data) {
		t.Fatal("stdin round trip through Azure differs")
	}
}

// streamOf generates n bytes of a disk stream: every 256 KiB chunk is
// different (a counter and 24 KiB of random data, then zeros), so every
// chunk is stored, at about a tenth of its size once compressed.
type streamOf struct {
	n, off int64
	rng    *mrand.ChaCha8
}

func (s *streamOf) Read(p []byte) (int, error) {
	if s.off >= s.n {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), s.n-s.off)]
	for i := range p {
		p[i] = 0
	}
	for k := 0; k < len(p); {
		pos := (s.off + int64(k)) % chunk
		switch {
		case pos < 8:
			var ctr [8]byte
			binary.LittleEndian.PutUint64(ctr[:], uint64((s.off+int64(k))/chunk))
			k += copy(p[k:], ctr[pos:])
		case pos < 24<<10:
			end := min(len(p), k+int(24<<10-pos))
			s.rng.Read(p[k:end])
			k = end
		default:
			k += int(min(int64(len(p)-k), chunk-pos))
		}
	}
	s.off += int64(len(p))
	return len(p), nil
}

// TestStdinMemoryIsFlat: streaming 4 GiB through stdin into an Azure
// SAS URL takes no more memory than streaming 512 MiB.
func TestStdinMemoryIsFlat(t *testing.T) {
	r := azureRemote(t)
	e := remoteEnv(t, r)
	e.ok("init", "--pack-size", "4M")
	rss := func(n int64) int64 {
		c := e.cmd(&streamOf{n: n, rng: mrand.NewChaCha8([32]byte{byte(n >> 20), byte(n >> 28)})}, "backup", "-", "--stdin-name", fmt.Sprintf("s%d.img", n>>20), "--json")
		var out, errb bytes.Buffer
		c.Stdout, c.Stderr = &out, &errb
		start := time.Now()
		if err := c.Run(); err != nil {
			t.Fatalf("backup of a %d MiB stream: %v\n%s", n>>20, err, errb.String())
		}
		var b backupOut
		if err := jsonUnmarshal(out.String(), &b); err != nil || b.Size != n || b.ChunksNew != n/chunk {
			t.Fatalf("backup of a %d MiB stream: %+v %v", n>>20, b, err)
		}
		kb := c.ProcessState.SysUsage().(*syscall.Rusage).Maxrss
		t.Logf("%d MiB stream: max RSS %d MiB, %s, %d MiB stored", n>>20, kb>>10, time.Since(start).Round(time.Millisecond), b.BytesStoredRaw>>20)
		return kb << 10
	}
	small := rss(512 << 20)
	large := rss(4 << 30)
	// What may legitimately grow: the in-memory index (about 120 bytes
	// per stored chunk, 2 MiB here, twice that before the GC runs) and
	// pack buffers, allocated only when uploads fall behind (up to
	// connections+1 of them). Memory proportional to the stream would
	// be hundreds of MiB.
	if large > small+small/4+24<<20 {
		t.Fatalf("max RSS grows with the stream: %d MiB for 512 MiB, %d MiB for 4 GiB", small>>20, large>>20)
	}
}

// TestSFTPAppendOnly: an SFTP server that refuses removal and replacing
// renames (internal-sftp -P ..., as docs/PERMISSIONS.md shows) is enough
// for backup, restore and check.
func TestSFTPAppendOnly(t *testing.T) {
	srv := testsrv.StartSSHD(t, "-P", "remove,rmdir,posix-rename,setstat,fsetstat,symlink,hardlink")
	e := newBareEnv(t)
	dir := filepath.Join(t.TempDir(), "repo")
	e.setenv("SAUVE_REPO", srv.URL(dir))
	e.setenv("SAUVE_SSH_KEY", srv.Key)
	e.setenv("SAUVE_SSH_KNOWN_HOSTS", srv.KnownHosts)
	e.ok("init")
	src := e.path("disk.img")
	testImage(t, src, 6)
	e.backup(src)
	writeAt(t, src, 0, randomBytes(1<<20))
	e.backup(src)
	out := e.path("out.img")
	e.ok("restore", "latest", out)
	sameFile(t, src, out)
	e.ok("check", "--read-data")
	// The server does refuse removal: the repository is append-only.
	be, err := sftpbe.Open(sftpbe.Config{User: srv.User, Host: "127.0.0.1", Port: srv.Port, Path: dir,
		KeyFiles: []string{srv.Key}, KnownHosts: []string{srv.KnownHosts}, NoAgent: true})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	if err := be.Remove(context.Background(), backend.Handle{Type: backend.ConfigFile}); !errors.Is(err, backend.ErrPermission) {
		t.Fatalf("remove on the append-only server: %v", err)
	}
	// No temporary file is left: the renames went through.
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && strings.HasPrefix(fi.Name(), ".tmp-") {
			t.Errorf("temporary file left: %s", p)
		}
		return nil
	})
}

// TestAzureAccountCredentials: azure:// with a connection string (init
// creates the container), and a container URL with AZURE_STORAGE_KEY.
func TestAzureAccountCredentials(t *testing.T) {
	az := testsrv.StartAzurite(t)
	e := newBareEnv(t)
	e.setenv("AZURE_STORAGE_CONNECTION_STRING", az.ConnectionString())
	e.setenv("SAUVE_REPO", "azure://"+testsrv.AzuriteAccount+"/newcontainer/vm1")
	out := e.ok("init")
	if !strings.Contains(out, az.URL+"/newcontainer/vm1") || strings.Contains(out, testsrv.AzuriteKey) {
		t.Fatalf("init output: %s", out)
	}
	src := e.path("disk.img")
	testImage(t, src, 7)
	e.backup(src)

	other := newBareEnv(t)
	other.setenv("AZURE_STORAGE_KEY", testsrv.AzuriteKey)
	other.setenv("SAUVE_REPO", az.URL+"/newcontainer/vm1")
	keys, _ := filepath.Glob(filepath.Join(e.dir, "config", "sauve", "keys", "*.key"))
	other.setenv("SAUVE_KEY", keys[0])
	dst := other.path("out.img")
	other.ok("restore", "latest", dst)
	sameFile(t, src, dst)

	// Without credentials: one line that says which variables to set.
	bare := newBareEnv(t)
	bare.setenv("SAUVE_REPO", "azure://"+testsrv.AzuriteAccount+"/newcontainer/vm1")
	bare.fail([]string{"no Azure credentials", "AZURE_STORAGE_KEY"}, "snapshots")
	// A SAS URL cut at the first '&' by an unquoted shell.
	bare.fail([]string{"cut at an '&'"}, "snapshots", "--repo", az.URL+"/newcontainer?sv=2022-11-02")
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
