package writer

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	// What the PG* variables would change is not what is tested here.
	for _, v := range []string{"PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGSERVICEFILE"} {
		t.Setenv(v, "")
	}
	for _, tc := range []struct{ spec, name string }{
		{"postgresql", "postgresql (/var/run/postgresql)"},
		{" PostgreSQL", "postgresql (/var/run/postgresql)"},
		{"postgres", "postgresql (/var/run/postgresql)"},
		{"postgresql:/run/pg", "postgresql (/run/pg)"},
		{"postgresql:/run/it's here", "postgresql (/run/it's here)"},
		{"postgresql:host=/tmp port=5433 user=backup", "postgresql (/tmp:5433)"},
		{"postgresql:postgres://backup:pw@db.example/app", "postgresql (db.example)"},
		{"mariadb", "mariadb (/run/mysqld/mysqld.sock)"},
		{"MySQL", "mysql (/run/mysqld/mysqld.sock)"},
		{"mariadb:/tmp/my.sock", "mariadb (/tmp/my.sock)"},
		{"mysql:backup:pw@tcp(db.example:3306)/", "mysql (db.example:3306)"},
		{"mariadb:backup:a:b@unix(/run/x.sock)/", "mariadb (/run/x.sock)"}, // a colon in the password
	} {
		w, err := Parse(tc.spec)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.spec, err)
			continue
		}
		if w.Name() != tc.name {
			t.Errorf("Parse(%q).Name() = %q, want %q", tc.spec, w.Name(), tc.name)
		}
	}
	if w, err := Parse("mariadb:backup:a:b@unix(/run/x.sock)/"); err != nil || w.(*MySQL).cfg.User != "backup" || w.(*MySQL).cfg.Passwd != "a:b" {
		t.Errorf("the DSN is not taken verbatim after the first colon: %v", err)
	}
	if w, err := Parse("postgresql:/run/it's here"); err != nil || w.(*PostgreSQL).cfg.Host != "/run/it's here" {
		t.Errorf("socket folder with a quote: %v", err)
	}
	for _, tc := range []struct{ spec, want string }{
		{"", `unknown writer "": want postgresql, mariadb or mysql`},
		{"oracle:scott/tiger", `unknown writer "oracle"`},
		{"hooks", `unknown writer "hooks"`},
		{"postgresql:", "empty DSN after the colon"},
		{"mysql:", "empty DSN after the colon"},
		{"postgresql:host=/tmp port=notaport", "postgresql: cannot parse"},
		{"mysql:backup:hunter2@db.example", "mysql: invalid DSN"},
	} {
		w, err := Parse(tc.spec)
		if err == nil {
			t.Errorf("Parse(%q) = %s, want an error", tc.spec, w.Name())
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q): %q does not say %q", tc.spec, err, tc.want)
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("Parse(%q): the password is in %q", tc.spec, err)
		}
	}
}

// FuzzParse: no spec panics Parse; what it accepts has a name of the kind
// asked for, made of the address alone.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"postgresql", "postgres:/run/pg", "postgresql:host=/tmp port=5433", "postgresql:postgres://u:pw@h:1/db?sslmode=disable",
		"postgresql:host='a b' password='x\\'y'", "mariadb", "mysql:u:pw@tcp(h:3306)/db?timeout=1s", "mariadb:/s", "x:y", ":", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, spec string) {
		w, err := Parse(spec)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		kind, _, _ := strings.Cut(spec, ":")
		kind = strings.ToLower(strings.TrimSpace(kind))
		var want string
		switch w := w.(type) {
		case *PostgreSQL:
			if kind != "postgresql" && kind != "postgres" {
				t.Fatalf("%q gave a PostgreSQL writer", spec)
			}
			want = "postgresql (" + w.cfg.Host
			if w.cfg.Port != 5432 {
				want += ":"
			}
		case *MySQL:
			if kind != "mysql" && kind != "mariadb" {
				t.Fatalf("%q gave a MySQL writer", spec)
			}
			want = kind + " ("
		default:
			t.Fatalf("%q gave a %T", spec, w)
		}
		if name := w.Name(); !strings.HasPrefix(name, want) || !strings.HasSuffix(name, ")") {
			t.Fatalf("Parse(%q).Name() = %q, want %q...)", spec, name, want)
		}
	})
}
