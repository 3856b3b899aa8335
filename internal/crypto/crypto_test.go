package crypto

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestKeyFileRoundTrip(t *testing.T) {
	k, err := Generate("0123456789abcdef0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	for _, pass := range []string{"", "correct horse"} {
		data, err := EncodeKeyFile(k, []byte(pass))
		if err != nil {
			t.Fatal(err)
		}
		info, err := InspectKeyFile(data)
		if err != nil || info.Encrypted != (pass != "") || info.Repository != k.RepoID || info.Kind != Full {
			t.Fatalf("inspect: %+v %v", info, err)
		}
		got, err := DecodeKeyFile(data, func() ([]byte, error) { return []byte(pass), nil })
		if err != nil {
			t.Fatal(err)
		}
		if got.MetaKey != k.MetaKey || got.IDKey != k.IDKey || *got.DataPrivate != *k.DataPrivate ||
			!got.OwnerPublic.Equal(k.OwnerPublic) || !got.Signer.Equal(k.Signer) {
			t.Fatal("decoded key differs")
		}
		if pass != "" {
			if plain := bytes.Contains(data, k.MetaKey[:]); plain {
				t.Fatal("protected key file holds the key in the clear")
			}
			_, err := DecodeKeyFile(data, func() ([]byte, error) { return []byte("wrong"), nil })
			if !errors.Is(err, ErrPassphrase) {
				t.Fatalf("wrong passphrase: %v", err)
			}
			if _, err := DecodeKeyFile(data, nil); !errors.Is(err, ErrNeedPassphrase) {
				t.Fatalf("no passphrase: %v", err)
			}
		}
	}
}

func TestWriteOnlyKey(t *testing.T) {
	owner, _ := Generate("r1")
	wo, err := owner.DeriveWriteOnly("web1")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := EncodeKeyFile(wo, nil)
	wo, err = DecodeKeyFile(data, nil)
	if err != nil {
		t.Fatal(err)
	}
	if wo.CanDecrypt() || bytes.Contains(data, owner.DataPrivate[:]) {
		t.Fatal("write-only key can decrypt")
	}
	if _, err := wo.DataOpener(); !errors.Is(err, ErrWriteOnly) {
		t.Fatalf("DataOpener: %v", err)
	}
	if _, err := wo.DeriveWriteOnly("x"); err == nil {
		t.Fatal("a write-only key certified another key")
	}
	// The writer seals data the owner can open.
	s, _ := wo.DataSealer()
	sealed := s.Seal(nil, []byte("chunk"), []byte("id"))
	o, _ := owner.DataOpener()
	if p, err := o.Open(nil, s.Ephemeral(), sealed, []byte("id")); err != nil || string(p) != "chunk" {
		t.Fatalf("owner cannot open writer's data: %v", err)
	}
	if _, err := o.Open(nil, s.Ephemeral(), sealed, []byte("other id")); !errors.Is(err, ErrAuth) {
		t.Fatal("blob opened under another ID")
	}
	// Signatures: owner and certified writer pass; tampering, and a writer
	// certified by another owner, fail.
	msg := []byte(`{"manifest":1}`)
	for _, k := range []*Keys{owner, wo} {
		if err := owner.Verify(msg, k.Sign(msg)); err != nil {
			t.Errorf("%s signature: %v", k.Kind, err)
		}
		if err := wo.Verify(msg, k.Sign(msg)); err != nil {
			t.Errorf("%s signature verified by writer: %v", k.Kind, err)
		}
		if err := owner.Verify([]byte(`{"manifest":2}`), k.Sign(msg)); err == nil {
			t.Errorf("%s: tampered message verified", k.Kind)
		}
	}
	stranger, _ := Generate("r1")
	sw, _ := stranger.DeriveWriteOnly("intruder")
	if err := owner.Verify(msg, sw.Sign(msg)); !errors.Is(err, ErrUntrustedSigner) {
		t.Errorf("foreign writer: %v", err)
	}
	if err := owner.Verify(msg, stranger.Sign(msg)); !errors.Is(err, ErrUntrustedSigner) {
		t.Errorf("foreign owner: %v", err)
	}
}

func TestMetaSealer(t *testing.T) {
	var k1, k2 [32]byte
	k2[0] = 1
	m1, m2 := NewMetaSealer(k1), NewMetaSealer(k2)
	s := m1.Seal(nil, []byte("index"), []byte("ad"))
	if p, err := m1.Open(nil, s, []byte("ad")); err != nil || string(p) != "index" {
		t.Fatal(err)
	}
	if _, err := m2.Open(nil, s, []byte("ad")); !errors.Is(err, ErrAuth) {
		t.Fatal("opened with the wrong key")
	}
	s[len(s)-1] ^= 1
	if _, err := m1.Open(nil, s, []byte("ad")); !errors.Is(err, ErrAuth) {
		t.Fatal("opened tampered data")
	}
	if _, err := m1.Open(nil, s[:10], nil); err == nil {
		t.Fatal("opened a short object")
	}
}

func FuzzDecodeKeyFile(f *testing.F) {
	k, _ := Generate("r")
	plain, _ := EncodeKeyFile(k, nil)
	wo, _ := k.DeriveWriteOnly("w")
	wdata, _ := EncodeKeyFile(wo, nil)
	f.Add(plain)
	f.Add(wdata)
	f.Add([]byte(`{"sauve_key":1,"kind":"full","kdf":{"algorithm":"argon2id","memory_kib":4294967295,"time":1,"threads":1}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := DecodeKeyFile(b, func() ([]byte, error) { return []byte("x"), nil })
		if err != nil {
			return
		}
		if len(got.OwnerPublic) != 32 || (got.Kind == Full) != got.CanDecrypt() {
			t.Fatal("accepted an inconsistent key")
		}
	})
}

// BenchmarkChunkID compares the keyed chunk hash sauve uses (BLAKE3) with
// the alternative the design allowed (HMAC-SHA256, with SHA-NI where the
// CPU has it), at the chunk sizes considered.
func BenchmarkChunkID(b *testing.B) {
	key := [32]byte{1}
	for _, size := range []int{64 << 10, 256 << 10, 1 << 20} {
		buf := bytes.Repeat([]byte{7, 1, 9}, size/3+1)[:size]
		h := NewHasher(key)
		b.Run(fmt.Sprintf("blake3-keyed/%dKiB", size>>10), func(b *testing.B) {
			b.SetBytes(int64(size))
			for b.Loop() {
				h.Sum(buf)
			}
		})
		b.Run(fmt.Sprintf("hmac-sha256/%dKiB", size>>10), func(b *testing.B) {
			b.SetBytes(int64(size))
			for b.Loop() {
				m := hmac.New(sha256.New, key[:])
				m.Write(buf)
				m.Sum(nil)
			}
		})
	}
}

// TestKeyFileKDFLimits checks that a key file asking for more Argon2 work
// than sauve ever configures is refused at once, with the parameter named,
// before a passphrase is asked for or memory allocated.
func TestKeyFileKDFLimits(t *testing.T) {
	k, err := Generate("0123456789abcdef0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	data, err := EncodeKeyFile(k, []byte("pass"))
	if err != nil {
		t.Fatal(err)
	}
	edit := func(field string, v any) []byte {
		var f map[string]any
		if err := json.Unmarshal(data, &f); err != nil {
			t.Fatal(err)
		}
		f["kdf"].(map[string]any)[field] = v
		b, err := json.Marshal(f)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	cases := []struct {
		field string
		value any
		want  string
	}{
		{"memory_kib", 4 << 20, "key file asks for 4096 MiB of Argon2 memory; sauve accepts at most 256 MiB"},
		{"memory_kib", 512 << 10, "key file asks for 512 MiB of Argon2 memory; sauve accepts at most 256 MiB"},
		{"memory_kib", 300001, "key file asks for 300001 KiB of Argon2 memory"},
		{"time", 100, "key file asks for 100 Argon2 passes; sauve accepts at most 16"},
		{"time", 17, "key file asks for 17 Argon2 passes"},
		{"threads", 255, "key file asks for 255 Argon2 threads; sauve accepts at most 16"},
		{"time", 0, "0 passes"}, // the Argon2 package panics on these
		{"threads", 0, "0 threads"},
		{"memory_kib", 8, "8 KiB of memory for 4 threads"},
	}
	for _, tc := range cases {
		asked := false
		_, err := DecodeKeyFile(edit(tc.field, tc.value), func() ([]byte, error) { asked = true; return []byte("pass"), nil })
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s %v: got %v, want an error with %q", tc.field, tc.value, err, tc.want)
		}
		if asked {
			t.Errorf("%s %v: the passphrase was asked for before the parameters were checked", tc.field, tc.value)
		}
	}
	// Parameters a later sauve might choose, within the limits, still work.
	data, err = encodeKeyFile(k, []byte("pass"), kdfParams{Time: 4, Memory: 96 << 10, Threads: 8})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DecodeKeyFile(data, func() ([]byte, error) { return []byte("pass"), nil }); err != nil {
		t.Fatalf("key file with time 4, 96 MiB, 8 threads: %v", err)
	}
}

func TestIsolated(t *testing.T) {
	owner, err := Generate("0123456789abcdef0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	a, err := owner.Isolated("00112233445566ff")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := owner.Isolated("00112233445566ff")
	c, _ := owner.Isolated("0011223344556600")
	if a.MetaKey != b.MetaKey || a.IDKey != b.IDKey || a.RepoID != b.RepoID {
		t.Fatal("a namespace's keys are not derived the same twice")
	}
	if a.MetaKey == owner.MetaKey || a.IDKey == owner.IDKey || a.MetaKey == c.MetaKey || a.IDKey == c.IDKey || a.RepoID == c.RepoID {
		t.Fatal("namespaces share keys")
	}
	if a.Parent != owner.RepoID || a.Namespace != "00112233445566ff" || !a.IsOwner() {
		t.Fatalf("namespace keys: parent %q, namespace %q, owner %v", a.Parent, a.Namespace, a.IsOwner())
	}
	w, _ := owner.DeriveWriteOnly("web1")
	if _, err := w.Isolated("00112233445566ff"); err == nil {
		t.Fatal("a write-only key derived a namespace's keys")
	}
	if _, err := a.Isolated("00112233445566ff"); err == nil {
		t.Fatal("namespaces nest")
	}
	if _, err := owner.Isolated("../x"); err == nil {
		t.Fatal("bad namespace name accepted")
	}
	iw, _ := a.DeriveWriteOnly("payroll")
	data, err := EncodeKeyFile(iw, nil)
	if err != nil {
		t.Fatal(err)
	}
	back, err := DecodeKeyFile(data, nil)
	if err != nil || back.Namespace != a.Namespace || back.Parent != owner.RepoID || back.MetaKey != a.MetaKey {
		t.Fatalf("isolated writer key file: %+v, %v", back, err)
	}
}
