package main

// backup --parity and repair packs end to end: one pack deleted and
// another damaged in place (in different groups) come back, check
// --read-data passes and the snapshot restores byte-exact.

import (
	"bytes"
	"encoding/hex"
	"os"
	"path/filepath"
	"sort"
	"testing"
)

func TestParityRepairsLostAndDamagedPacks(t *testing.T) {
	for _, tg := range pruneTargets[:2] { // local, S3
		t.Run(tg.name, func(t *testing.T) {
			e := tg.start(t)
			e.ok("init", "--pack-size", "1M")
			src := e.path("disk.img")
			img := randomBytes(12 << 20)
			writeFile(t, src, img)
			b := e.backup(src, "--parity", "4")
			// A quarter more space: 12 MiB of packs, 3 MiB of parity.
			if b.ParityBytes < 3<<20 || b.ParityBytes > 5<<20 {
				t.Fatalf("parity of 4-pack groups over 12 MiB: %d bytes", b.ParityBytes)
			}
			if tg.name != "local" {
				return // the damage below is done to a folder; S3 covers the writing of parity
			}
			packs := packFiles(t, e.repo)
			sort.Strings(packs)
			if len(packs) < 8 {
				t.Fatalf("only %d packs", len(packs))
			}
			pars, _ := filepath.Glob(filepath.Join(e.repo, "parity", "*"))
			if len(pars) != (len(packs)+3)/4 {
				t.Fatalf("%d parity objects for %d packs", len(pars), len(packs))
			}
			// One pack of each of two groups: the first member named in
			// each parity header ("SVPAR001", u32 n, then 32-byte IDs
			// each followed by a u64 size).
			first := func(par string) string {
				h, err := os.ReadFile(par)
				if err != nil || len(h) < 44 {
					t.Fatalf("parity object %s: %v", par, err)
				}
				id := hex.EncodeToString(h[12:44])
				return filepath.Join(e.repo, "data", id[:2], id)
			}
			lost, damaged := first(pars[0]), first(pars[1])
			want := map[string][]byte{}
			for _, p := range []string{lost, damaged} {
				want[p], _ = os.ReadFile(p)
			}
			os.Remove(lost)
			data := bytes.Clone(want[damaged])
			data[len(data)/2] ^= 0x40
			os.WriteFile(damaged, data, 0o600)
			if res := e.run("check", "--read-data"); res.code == 0 {
				t.Fatal("check --read-data passed over a lost and a damaged pack")
			}
			out := e.ok("repair", "packs")
			for _, p := range []string{lost, damaged} {
				got, _ := os.ReadFile(p)
				if !bytes.Equal(got, want[p]) {
					t.Fatalf("pack %s not rebuilt byte for byte:\n%s", filepath.Base(p)[:8], out)
				}
			}
			e.ok("check", "--read-data")
			res := e.path("out.img")
			e.ok("restore", b.Snapshot, res)
			sameFile(t, src, res)
		})
	}
}

// TestRepairParity: packs backed up without parity get it afterwards,
// and a lost one comes back.
func TestRepairParity(t *testing.T) {
	e := newEnv(t, "--pack-size", "1M")
	src := e.path("disk.img")
	writeFile(t, src, randomBytes(6<<20))
	b := e.backup(src)
	e.ok("repair", "parity", "--parity", "3")
	if out := e.ok("repair", "parity", "--parity", "3"); !bytes.Contains([]byte(out), []byte("0 given parity now")) {
		t.Fatalf("a second repair parity found work:\n%s", out)
	}
	packs := packFiles(t, e.repo)
	want, _ := os.ReadFile(packs[0])
	os.Remove(packs[0])
	e.ok("repair", "packs")
	if got, _ := os.ReadFile(packs[0]); !bytes.Equal(got, want) {
		t.Fatal("the lost pack was not rebuilt from the parity given afterwards")
	}
	out := e.path("out.img")
	e.ok("restore", b.Snapshot, out)
	sameFile(t, src, out)
}
