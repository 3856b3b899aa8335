package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

type copyOut struct {
	Mode             string `json:"mode"`
	ModeDescription  string `json:"mode_description"`
	SnapshotsCopied  int    `json:"snapshots_copied"`
	SnapshotsSkipped int    `json:"snapshots_skipped"`
	ChunksCopied     int64  `json:"chunks_copied"`
	ChunksReused     int64  `json:"chunks_reused"`
	BytesRead        int64  `json:"bytes_read"`
	BytesWritten     int64  `json:"bytes_written"`
	Packs            int    `json:"packs"`
}

func (e *env) copyJSON(args ...string) copyOut {
	e.t.Helper()
	var c copyOut
	e.okJSON(&c, append([]string{"copy"}, args...)...)
	return c
}

// checked runs check --read-data on repo and fails unless it finds the
// repository whole.
func (e *env) checked(repo string) {
	e.t.Helper()
	chk := e.run("check", "--read-data", "--repo", repo)
	if chk.code != 0 || !strings.Contains(chk.stdout, "no errors found") {
		e.t.Fatalf("check --read-data of %s: %s%s", repo, chk.stdout, chk.stderr)
	}
}

// TestCopyAcrossBackends copies two snapshots from a folder to S3
// (versitygw), S3 to Azure (Azurite) and Azure to another folder, one
// copy path each: the S3 repository made with init --from-repo keeps
// chunk IDs, Azure's has another ID key, the last folder another chunk
// size.
func TestCopyAcrossBackends(t *testing.T) {
	e := newEnv(t)
	s3, az := s3Remote(t), azureRemote(t)
	s3.setup(e)
	az.setup(e)
	local, local2 := e.repo, e.path("repo2")

	img := e.path("disk.img")
	writeFile(t, img, nil)
	writeAt(t, img, 0, randomBytes(2<<20))
	writeAt(t, img, 3<<20, textBytes(7, 1<<20))
	b1 := e.backup(img, "--tag", "nightly")
	writeAt(t, img, 1<<20, randomBytes(256<<10))
	e.backup(img, "--tag", "nightly")
	want := fileHash(t, img, -1)

	e.ok("init", "--repo", s3.repo, "--from-repo", local)
	c := e.copyJSON("--repo", s3.repo, "--from-repo", local)
	if c.Mode != "same-ids" || c.SnapshotsCopied != 2 || c.ChunksCopied == 0 || c.ChunksReused == 0 {
		t.Fatalf("local to S3: %+v, want two snapshots on the same-ID path, sharing chunks", c)
	}

	// Copying again adds nothing.
	out := e.ok("copy", "--repo", s3.repo, "--from-repo", local)
	if !strings.Contains(out, "skipped 2 already copied") || !strings.Contains(out, "same chunk IDs: chunks copied without re-hashing") {
		t.Fatalf("second copy to S3:\n%s", out)
	}
	if c := e.copyJSON("--repo", s3.repo, "--from-repo", local); c.SnapshotsCopied != 0 || c.SnapshotsSkipped != 2 || c.BytesWritten != 0 || c.BytesRead != 0 {
		t.Fatalf("third copy to S3: %+v, want nothing read or written", c)
	}

	e.ok("init", "--repo", az.repo)
	out = e.ok("copy", "--repo", az.repo, "--from-repo", s3.repo)
	if !strings.Contains(out, "different ID key: re-hashed") {
		t.Fatalf("S3 to Azure:\n%s", out)
	}
	az.noSecrets(t, out)

	e.ok("init", "--repo", local2, "--chunk-size", "64K")
	// Only the latest snapshot, named, then the rest.
	if c := e.copyJSON("--repo", local2, "--from-repo", az.repo, "latest"); c.Mode != "rechunk" || c.SnapshotsCopied != 1 {
		t.Fatalf("Azure to a folder, latest: %+v", c)
	}
	if c := e.copyJSON("--repo", local2, "--from-repo", az.repo, "--host", b1.Host); c.SnapshotsCopied != 1 || c.SnapshotsSkipped != 1 {
		t.Fatalf("Azure to a folder, the rest: %+v", c)
	}

	for _, r := range []string{s3.repo, az.repo, local2} {
		e.checked(r)
	}
	// The last copy restores byte for byte, and its snapshots say where
	// they came from.
	e.restored("latest", img, "--repo", local2)
	var snaps []struct {
		ID   string   `json:"id"`
		Tags []string `json:"tags"`
	}
	e.okJSON(&snaps, "snapshots", "--repo", local2)
	if len(snaps) != 2 || !slices.Equal(snaps[1].Tags, []string{"nightly"}) {
		t.Fatalf("snapshots of the last copy: %+v", snaps)
	}
	restored := e.path("first.img")
	e.ok("restore", snaps[0].ID, restored, "--repo", local2)
	if fileHash(t, restored, -1) == want {
		t.Fatal("the first snapshot's copy restores the second's disk")
	}
}

// TestCopyBadInput: a missing source, a wrong or write-only source key
// each fail with one clear line, and the target is left as it was.
func TestCopyBadInput(t *testing.T) {
	e := newEnv(t)
	img := e.path("disk.img")
	writeFile(t, img, randomBytes(1<<20))
	e.backup(img)
	target := e.path("target")
	var ini struct {
		KeyFile string `json:"key_file"`
	}
	e.okJSON(&ini, "init", "--repo", target)
	before := treeOf(t, target)
	wo := e.path("wo.key")
	e.ok("key", "export", "--write-only", "--name", "web1", wo)
	targetKey := ini.KeyFile

	for _, c := range []struct {
		name string
		args []string
		want []string
	}{
		{"missing source", []string{"--from-repo", e.path("nowhere")}, []string{"source repository", "no sauve repository"}},
		{"wrong source key", []string{"--from-repo", e.repo, "--from-key", targetKey}, []string{"source repository", "belongs to repository"}},
		{"write-only source key", []string{"--from-repo", e.repo, "--from-key", wo}, []string{"write-only", "full key"}},
		{"no source", []string{}, []string{"--from-repo"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			stderr := e.fail(c.want, append([]string{"copy", "--repo", target}, c.args...)...)
			if n := strings.Count(strings.TrimSpace(stderr), "\n"); n > 1 {
				t.Fatalf("more than one error line:\n%s", stderr)
			}
			if after := treeOf(t, target); !slices.Equal(before, after) {
				t.Fatalf("the target changed: %v, then %v", before, after)
			}
		})
	}
	if _, err := os.Stat(e.path("nowhere")); err == nil {
		t.Fatal("copy created the missing source")
	}
}

// treeOf lists the files under dir.
func treeOf(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			out = append(out, strings.TrimPrefix(p, dir))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestCopyKill9 kills a copy with SIGKILL once some packs are stored:
// the next run reuses them (the own-packs journal) instead of uploading
// them again, and the copy is whole.
func TestCopyKill9(t *testing.T) {
	e := newEnv(t)
	img := e.path("disk.img")
	writeFile(t, img, randomBytes(48<<20))
	e.backup(img)
	target := e.path("target")
	e.ok("init", "--repo", target, "--pack-size", "1M", "--from-repo", e.repo)

	var stderrs bytes.Buffer
	c := e.cmd(nil, "copy", "--repo", target, "--from-repo", e.repo, "--connections", "1")
	c.Stderr = &stderrs
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(filepath.Join(target, "data")); err == nil && dirSize(t, filepath.Join(target, "data")) >= 8<<20 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	c.Process.Signal(syscall.SIGKILL)
	if err := c.Wait(); err == nil {
		t.Fatalf("the copy ended before it was killed:\n%s", stderrs.String())
	}
	var snaps []json.RawMessage
	e.okJSON(&snaps, "snapshots", "--repo", target)
	if len(snaps) != 0 {
		t.Fatalf("the killed copy left %d snapshots in the target", len(snaps))
	}

	res := e.run("copy", "--repo", target, "--from-repo", e.repo, "--json")
	if res.code != 0 {
		t.Fatalf("copy after kill -9: %s", res.stderr)
	}
	var out copyOut
	if err := json.Unmarshal([]byte(res.stdout), &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(res.stderr, "left by an interrupted copy or backup; their chunks are reused") {
		t.Errorf("the copy did not adopt the packs of the killed one:\n%s", res.stderr)
	}
	t.Logf("after kill -9: %d chunks copied, %d reused, %d MiB written for a 48 MiB disk", out.ChunksCopied, out.ChunksReused, out.BytesWritten>>20)
	if out.SnapshotsCopied != 1 || out.ChunksReused == 0 || out.BytesWritten >= 44<<20 {
		t.Fatalf("copy after kill -9: %+v: it did not reuse the packs already stored", out)
	}
	e.checked(target)
	e.restored("latest", img, "--repo", target)
}
