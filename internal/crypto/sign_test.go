package crypto

import (
	"bytes"
	"testing"
)

func TestSignedObjects(t *testing.T) {
	owner, _ := Generate("0123456789abcdef0123456789abcdef")
	w, _ := owner.DeriveWriteOnly("web1", "web1", "vm-*")
	other, _ := Generate("fedcba9876543210fedcba9876543210")
	stranger, _ := other.DeriveWriteOnly("web1")
	for _, tc := range []struct {
		name   string
		signer *Keys
		domain string
		ok     bool
	}{
		{"owner", owner, DomainIndex, true},
		{"writer", w, DomainIndex, true},
		{"other domain", w, DomainLedger, false},
		{"another repository's owner", other, DomainIndex, false},
		{"another repository's writer", stranger, DomainIndex, false},
	} {
		obj := tc.signer.SignObject([]byte("message"), DomainIndex)
		msg, who, err := owner.OpenSigned(obj, tc.domain)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err %v", tc.name, err)
			continue
		}
		if err == nil && (!bytes.Equal(msg, []byte("message")) || who.Key != tc.signer.SignerPublic() || (who.Cert == nil) != (tc.signer == owner)) {
			t.Errorf("%s: message %q, signer %x, cert %v", tc.name, msg, who.Key[:4], who.Cert)
		}
	}
	// Any flipped byte is refused.
	obj := w.SignObject([]byte("message"), DomainIndex)
	for i := range obj {
		bad := bytes.Clone(obj)
		bad[i] ^= 1
		if _, _, err := owner.OpenSigned(bad, DomainIndex); err == nil {
			t.Fatalf("flipped byte %d accepted", i)
		}
	}
	if !w.Cert.Allows("vm-12") || w.Cert.Allows("db1") || !w.Cert.Allows("web1") {
		t.Error("host scope")
	}
	if _, err := owner.DeriveWriteOnly("Owner"); err == nil {
		t.Error("a writer named Owner was certified")
	}
}

func FuzzOpenSigned(f *testing.F) {
	owner, _ := Generate("0123456789abcdef0123456789abcdef")
	w, _ := owner.DeriveWriteOnly("web1")
	f.Add(w.SignObject([]byte("message"), DomainIndex))
	f.Add(owner.SignObject(nil, DomainIndex))
	f.Fuzz(func(t *testing.T, b []byte) {
		msg, who, err := owner.OpenSigned(b, DomainIndex)
		if err != nil {
			return
		}
		// What verifies came from the owner or a writer it certified.
		if who.Cert == nil && who.Key != owner.SignerPublic() {
			t.Fatal("an uncertified signer verified")
		}
		if len(msg) > len(b) {
			t.Fatal("message longer than the object")
		}
	})
}
