package writer

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// postgresBin is the newest of Debian's PostgreSQL bin folders.
func postgresBin(t *testing.T) string {
	t.Helper()
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/postgres")
	if len(bins) == 0 {
		t.Skip("PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/postgres (Debian package postgresql)")
	}
	version := func(p string) int {
		v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(p))))
		return v
	}
	sort.Slice(bins, func(i, j int) bool { return version(bins[i]) > version(bins[j]) })
	return filepath.Dir(bins[0])
}

// startPostgres starts a throw-away PostgreSQL on a unix socket in a temp
// folder, as the postgres OS user, and returns the socket's folder; its
// superuser is postgres, and every role logs in without a password.
func startPostgres(t *testing.T) string {
	t.Helper()
	bin := postgresBin(t)
	dir, cred := serverDir(t, "postgres")
	data := filepath.Join(dir, "data")
	run(t, cred, filepath.Join(bin, "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-N", "-E", "UTF8", "--locale=C")
	startServer(t, dir, cred, syscall.SIGINT, func(ctx context.Context) error {
		conn, err := pgx.Connect(ctx, pgDSN(dir, "postgres"))
		if err == nil {
			conn.Close(ctx)
		}
		return err
	}, filepath.Join(bin, "postgres"), "-D", data, "-k", dir, "-c", "listen_addresses=", "-c", "fsync=off")
	return dir
}

func pgDSN(dir, role string) string {
	return "host=" + dir + " user=" + role + " dbname=postgres"
}

// pgAdmin connects as the superuser.
func pgAdmin(t *testing.T, dir string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), pgDSN(dir, "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func pgExec(t *testing.T, conn *pgx.Conn, sql string) {
	t.Helper()
	if _, err := conn.Exec(t.Context(), sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// pgSessions counts the sessions of application_name sauve.
func pgSessions(t *testing.T, conn *pgx.Conn) int {
	t.Helper()
	var n int
	if err := conn.QueryRow(t.Context(), "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sauve'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// pgSessionsGone waits for the sauve sessions to end (a backend exits on
// its own time after its client said goodbye) and returns how many are
// left.
func pgSessionsGone(t *testing.T, conn *pgx.Conn) int {
	t.Helper()
	n := pgSessions(t, conn)
	for i := 0; n != 0 && i < 100; i++ {
		time.Sleep(20 * time.Millisecond)
		n = pgSessions(t, conn)
	}
	return n
}

func TestPostgreSQL(t *testing.T) {
	dir := startPostgres(t)
	admin := pgAdmin(t, dir)
	pgExec(t, admin, "CREATE TABLE t (i int)")
	pgExec(t, admin, "CREATE ROLE checker LOGIN IN ROLE pg_checkpoint")
	pgExec(t, admin, "CREATE ROLE nobody LOGIN")

	checkpoint := func(t *testing.T) (lsn string, at time.Time, requested int64) {
		t.Helper()
		if err := admin.QueryRow(t.Context(), "SELECT checkpoint_lsn::text, checkpoint_time FROM pg_control_checkpoint()").Scan(&lsn, &at); err != nil {
			t.Fatal(err)
		}
		if err := admin.QueryRow(t.Context(), "SELECT checkpoints_req FROM pg_stat_bgwriter").Scan(&requested); err != nil {
			t.Fatal(err)
		}
		return lsn, at, requested
	}

	// Both the superuser and a role of pg_checkpoint may, and the
	// checkpoint really happens: pg_control's latest checkpoint moves
	// past the write made before, and the checkpointer counts one more
	// requested checkpoint.
	for _, role := range []string{"postgres", "checker"} {
		t.Run("CHECKPOINT as "+role, func(t *testing.T) {
			pgExec(t, admin, "INSERT INTO t SELECT generate_series(1, 1000)")
			var written string
			if err := admin.QueryRow(t.Context(), "SELECT pg_current_wal_insert_lsn()::text").Scan(&written); err != nil {
				t.Fatal(err)
			}
			lsn0, _, req0 := checkpoint(t)
			w, err := NewPostgreSQL(pgDSN(dir, role))
			if err != nil {
				t.Fatal(err)
			}
			if w.Name() != "postgresql ("+dir+")" {
				t.Errorf("Name = %q", w.Name())
			}
			held, err := (&Set{Writers: []Writer{w}, Deadline: 5 * time.Second}).Freeze(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			lsn1, at1, req1 := checkpoint(t)
			var moved bool
			if err := admin.QueryRow(t.Context(), "SELECT $1::pg_lsn > $2::pg_lsn AND $1::pg_lsn >= $3::pg_lsn", lsn1, lsn0, written).Scan(&moved); err != nil {
				t.Fatal(err)
			}
			if !moved {
				t.Errorf("checkpoint at %s, was %s, WAL written to %s before the freeze: no CHECKPOINT", lsn1, lsn0, written)
			}
			// The checkpointer reports its counts on its own time.
			for i := 0; req1 <= req0 && i < 100; i++ {
				time.Sleep(20 * time.Millisecond)
				_, _, req1 = checkpoint(t)
			}
			if req1 <= req0 {
				t.Errorf("checkpoints_req %d, was %d", req1, req0)
			}
			if n := pgSessions(t, admin); n != 1 {
				t.Errorf("%d sauve sessions during the window, want 1", n)
			}
			r := held.Report()
			if r.Consistency != Application || !strings.HasPrefix(r.Writers[0].Detail, "CHECKPOINT took ") {
				t.Errorf("report %+v", r)
			}
			t.Logf("checkpoint %s at %s; %s, freeze %.3f s", lsn1, at1.Format(time.TimeOnly), r.Writers[0].Detail, r.Writers[0].Seconds)
			if err := held.Thaw(t.Context()); err != nil {
				t.Fatal(err)
			}
			if n := pgSessionsGone(t, admin); n != 0 {
				t.Errorf("%d sauve sessions after thaw", n)
			}
		})
	}

	t.Run("refused without pg_checkpoint", func(t *testing.T) {
		w, err := NewPostgreSQL(pgDSN(dir, "nobody"))
		if err != nil {
			t.Fatal(err)
		}
		_, err = (&Set{Writers: []Writer{w}}).Freeze(t.Context())
		if err == nil {
			t.Fatal("Freeze succeeded")
		}
		t.Log(err)
		for _, want := range []string{`freeze postgresql (` + dir + `): CHECKPOINT refused to role "nobody"`, `GRANT pg_checkpoint TO "nobody"`, "SQLSTATE 42501"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error does not say %q", want)
			}
		}
		if n := pgSessionsGone(t, admin); n != 0 {
			t.Errorf("%d sauve sessions left after the failed freeze", n)
		}
	})

	t.Run("socket folder and PG environment", func(t *testing.T) {
		t.Setenv("PGUSER", "checker")
		w, err := Parse("postgres:" + dir)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Freeze(t.Context()); err != nil {
			t.Fatal(err)
		}
		if err := w.Thaw(t.Context()); err != nil {
			t.Fatal(err)
		}
	})
}

// silentServer accepts connections on network, address and never answers:
// a server that hangs.
func silentServer(t *testing.T, network, address string) net.Addr {
	t.Helper()
	l, err := net.Listen(network, address)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { l.Close(); <-done })
	go func() {
		defer close(done)
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	return l.Addr()
}

// TestPostgreSQLUnreachable: no server, or one that never answers, fails
// Freeze by the deadline with an error that says so.
func TestPostgreSQLUnreachable(t *testing.T) {
	empty := t.TempDir()
	hung := t.TempDir()
	silentServer(t, "unix", filepath.Join(hung, ".s.PGSQL.5432"))
	tcp := silentServer(t, "tcp", "127.0.0.1:0").(*net.TCPAddr)
	for _, tc := range []struct {
		name, dsn string
		is        error
	}{
		{"no server", "host=" + empty + " user=postgres", syscall.ENOENT},
		{"hung unix socket", "host=" + hung + " user=postgres", context.DeadlineExceeded},
		{"hung TCP", "host=127.0.0.1 port=" + strconv.Itoa(tcp.Port) + " user=postgres password=secret", context.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, err := NewPostgreSQL(tc.dsn)
			if err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			_, err = (&Set{Writers: []Writer{w}, Deadline: 500 * time.Millisecond}).Freeze(t.Context())
			took := time.Since(t0)
			if err == nil {
				t.Fatal("Freeze succeeded")
			}
			t.Logf("%v (%.2f s)", err, took.Seconds())
			if !errors.Is(err, tc.is) || !strings.Contains(err.Error(), `connect as "postgres"`) {
				t.Errorf("error %q is not %v", err, tc.is)
			}
			if strings.Contains(err.Error(), "secret") || strings.Contains(w.Name(), "secret") {
				t.Error("the password is in the error or the name")
			}
			if took > 2*time.Second {
				t.Errorf("Freeze took %s with a deadline of 500ms", took)
			}
		})
	}
}

func TestPostgreSQLNames(t *testing.T) {
	// The default is Debian's socket folder, and Name never shows a
	// password.
	w, err := NewPostgreSQL("")
	if err != nil {
		t.Fatal(err)
	}
	if w.Name() != "postgresql (/var/run/postgresql)" {
		t.Errorf("Name = %q", w.Name())
	}
	w, err = NewPostgreSQL("postgres://u:hunter2@db.example:5433/x")
	if err != nil {
		t.Fatal(err)
	}
	if w.Name() != "postgresql (db.example:5433)" {
		t.Errorf("Name = %q", w.Name())
	}
	if _, err := NewPostgreSQL("postgres://u:hunter2@db.example:notaport/x"); err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("bad URL: %v", err)
	}
}
