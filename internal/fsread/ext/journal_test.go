package ext

import (
	"bytes"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestExtJournalTransactions: journals written by debugfs (jbd2
// without checksums, csum v2 and v3; 32- and 64-bit block numbers) hold
// transactions that write blocks and revoke some: the reader shows what
// e2fsck's recovery writes, and only for committed transactions.
func TestExtJournalTransactions(t *testing.T) {
	if _, err := exec.LookPath("debugfs"); err != nil {
		t.Skip("needs debugfs")
	}
	for _, c := range []struct {
		name string
		mkfs []string
		jo   string
	}{
		{"plain-64bit", []string{"-t", "ext4"}, "jo"},
		{"csum3", []string{"-t", "ext4"}, "jo -c -v 3"},
		{"csum2-32bit", []string{"-t", "ext4", "-O", "^64bit,^metadata_csum"}, "jo -c -v 2"},
		{"ext3-1k", []string{"-t", "ext3", "-b", "1024"}, "jo"},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := mkImage(t, 16<<20, c.mkfs...)
			dir := t.TempDir()
			var blocks [4][]byte
			for i := range blocks {
				blocks[i] = make([]byte, 1024)
				rand.Read(blocks[i])
				os.WriteFile(filepath.Join(dir, string(rune('a'+i))), blocks[i], 0o644)
			}
			// Escaping: a block that starts with the jbd2 magic.
			copy(blocks[3], []byte{0xC0, 0x3B, 0x39, 0x98})
			os.WriteFile(filepath.Join(dir, "d"), blocks[3], 0o644)
			// Transaction 1 writes blocks 3000-3002; transaction 2
			// revokes 3001 and writes 3003 (escaped); a third, not
			// committed, writes 3000 again.
			script := c.jo + "\njw -b 3000,3001,3002 " + filepath.Join(dir, "abc") + "\njc\n" +
				"jo\njw -r 3001\njw -b 3003 " + filepath.Join(dir, "d") + "\njc\n"
			abc := append(append(append([]byte(nil), blocks[0]...), blocks[1]...), blocks[2]...)
			os.WriteFile(filepath.Join(dir, "abc"), abc, 0o644)
			os.WriteFile(filepath.Join(dir, "script"), []byte(script), 0o644)
			out, err := exec.Command("debugfs", "-w", "-f", filepath.Join(dir, "script"), img).CombinedOutput()
			if err != nil || bytes.Contains(out, []byte("rror")) {
				t.Fatalf("debugfs: %v\n%s", err, out)
			}
			f := openImage(t, img, Options{})
			bs := f.sb.bs
			if f.Replayed() == 0 {
				t.Fatalf("nothing replayed (debugfs: %s)", out)
			}
			recovered := filepath.Join(t.TempDir(), "recovered.img")
			b, _ := os.ReadFile(img)
			os.WriteFile(recovered, b, 0o644)
			exec.Command("e2fsck", "-fy", recovered).Run() // exits 1 when it fixed things
			want, _ := os.ReadFile(recovered)
			for blk := int64(3000); blk <= 3003; blk++ {
				got := make([]byte, bs)
				must(t, f.readAt(got, blk*bs))
				if !bytes.Equal(got, want[blk*bs:(blk+1)*bs]) {
					t.Errorf("block %d differs from e2fsck's recovery", blk)
				}
			}
			for blk := int64(3000); blk <= 3003; blk++ {
				if !bytes.Equal(want[blk*bs:(blk+1)*bs], b[blk*bs:(blk+1)*bs]) {
					return // e2fsck replayed something: the test means something
				}
			}
			t.Fatal("e2fsck replayed none of the blocks")
		})
	}
}
