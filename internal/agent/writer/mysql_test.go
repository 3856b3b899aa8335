package writer

import (
	"bufio"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// startMariaDB starts a throw-away MariaDB on a unix socket in a temp
// folder, with no TCP, and returns the socket; the OS user running the
// tests logs in as the database's root through unix_socket.
func startMariaDB(t *testing.T) string {
	t.Helper()
	var bins []string
	for _, name := range []string{"mariadb-install-db", "mariadbd"} {
		p, err := exec.LookPath(name)
		if err != nil {
			if p, err = exec.LookPath("/usr/sbin/" + name); err != nil {
				t.Skipf("MariaDB is not installed: no %s (Debian package mariadb-server)", name)
			}
		}
		bins = append(bins, p)
	}
	dir, _ := serverDir(t, "")
	sock := filepath.Join(dir, "sock")
	data := filepath.Join(dir, "data")
	var asUser []string
	if os.Geteuid() == 0 {
		asUser = []string{"--user=root"} // else mariadbd wants to drop to mysql
	}
	run(t, nil, bins[0], append([]string{"--no-defaults", "--datadir=" + data,
		"--auth-root-authentication-method=socket", "--skip-test-db", "--skip-name-resolve"}, asUser...)...)
	admin := mysqlDSN(t, sock)
	startServer(t, dir, nil, syscall.SIGTERM, func(ctx context.Context) error {
		db := mysqlOpen(admin)
		defer db.Close()
		return db.PingContext(ctx)
	}, bins[1], append([]string{"--no-defaults", "--datadir=" + data, "--socket=" + sock,
		"--skip-networking", "--pid-file=" + filepath.Join(dir, "pid"),
		"--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M",
		"--innodb-flush-log-at-trx-commit=2"}, asUser...)...)
	return sock
}

// mysqlDSN is the DSN of the OS user's database account on sock.
func mysqlDSN(t *testing.T, sock string) string {
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	return u.Username + "@unix(" + sock + ")/"
}

func mysqlOpen(dsn string) *sql.DB {
	cfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		panic(err)
	}
	cfg.Logger = mysql.Logger(nopLogger{})
	c, err := mysql.NewConnector(cfg)
	if err != nil {
		panic(err)
	}
	return sql.OpenDB(c)
}

func myExec(t *testing.T, db interface {
	ExecContext(context.Context, string, ...any) (sql.Result, error)
}, query string) {
	t.Helper()
	if _, err := db.ExecContext(t.Context(), query); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
}

// insert runs an INSERT in the background and says when it is done.
func insert(db *sql.DB, query string) <-chan error {
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := db.ExecContext(ctx, query)
		done <- err
	}()
	return done
}

// waitingFor waits until a statement starting with prefix waits for a lock
// in the server (the proof that it is blocked, not just slow) and fails
// the test if none does within 5 s.
func waitingFor(t *testing.T, db *sql.DB, prefix string) {
	t.Helper()
	for range 250 {
		var n int
		if err := db.QueryRowContext(t.Context(), "SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE ? AND state LIKE 'Waiting for%lock'", prefix+"%").Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%q never waited for a lock", prefix)
}

// running waits until a statement starting with prefix runs.
func running(t *testing.T, db *sql.DB, prefix string) {
	t.Helper()
	for range 250 {
		var n int
		if err := db.QueryRowContext(t.Context(), "SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE ?", prefix+"%").Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%q never ran", prefix)
}

// unblocked fails the test unless the INSERT finishes within 5 s.
func unblocked(t *testing.T, done <-chan error, what string) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("INSERT after %s: %v", what, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("INSERT still blocked 5 s after %s", what)
	}
}

// writesWork fails the test unless a write to table succeeds within 3 s
// (a lock left behind would hold it for good): no global read lock is
// held, granted or waiting.
func writesWork(t *testing.T, db *sql.DB, table string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	if _, err := db.ExecContext(ctx, "INSERT INTO "+table+" VALUES (7)"); err != nil {
		t.Fatalf("INSERT INTO %s: %v: something is still locked", table, err)
	}
	// A session whose FLUSH TABLES WITH READ LOCK was refused or killed
	// may show it in the processlist for a moment while the server ends
	// the closed connection; one that is still there after that waits.
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var n int
		if err := db.QueryRowContext(t.Context(), "SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE 'FLUSH TABLES WITH READ LOCK%'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("a FLUSH TABLES WITH READ LOCK is still in the server")
		}
	}
}

func TestMySQL(t *testing.T) {
	sock := startMariaDB(t)
	admin := mysqlOpen(mysqlDSN(t, sock))
	t.Cleanup(func() { admin.Close() })
	for _, q := range []string{
		"CREATE DATABASE d",
		"CREATE TABLE d.t (i int) ENGINE=InnoDB",
		"CREATE TABLE d.u (i int) ENGINE=InnoDB",
		"INSERT INTO d.t VALUES (1)",
		"CREATE TABLE d.slow (i int) ENGINE=InnoDB",
		"INSERT INTO d.slow VALUES (1)",
		"CREATE USER noreload@localhost IDENTIFIED BY 'hunter2'",
		"GRANT SELECT, INSERT ON *.* TO noreload@localhost",
	} {
		myExec(t, admin, q)
	}

	t.Run("held for the window", func(t *testing.T) {
		w, err := Parse("mariadb:" + sock)
		if err != nil {
			t.Fatal(err)
		}
		if w.Name() != "mariadb ("+sock+")" {
			t.Errorf("Name = %q", w.Name())
		}
		held, err := (&Set{Writers: []Writer{w}, Deadline: 5 * time.Second}).Freeze(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		done := insert(admin, "INSERT INTO d.u VALUES (1)")
		waitingFor(t, admin, "INSERT INTO d.u")
		time.Sleep(200 * time.Millisecond)
		select {
		case err := <-done:
			t.Fatalf("INSERT done during the window: %v", err)
		default:
		}
		if err := held.Thaw(t.Context()); err != nil {
			t.Fatal(err)
		}
		unblocked(t, done, "Thaw")
		r := held.Report()
		if r.Consistency != Application || !r.Writers[0].Frozen {
			t.Errorf("report %+v", r)
		}
		t.Logf("freeze %.3f s, window %.3f s", r.Writers[0].Seconds, r.WindowSeconds)
		writesWork(t, admin, "d.t")
	})

	t.Run("released when sauve dies", func(t *testing.T) {
		cmd := exec.Command(os.Args[0], "-test.run=^TestMySQLHelper$")
		cmd.Env = append(os.Environ(), "SAUVE_WRITER_TEST_SOCKET="+sock)
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		line, err := bufio.NewReader(out).ReadString('\n')
		if line != "frozen\n" {
			t.Fatalf("helper said %q, %v", line, err)
		}
		done := insert(admin, "INSERT INTO d.u VALUES (2)")
		waitingFor(t, admin, "INSERT INTO d.u")
		cmd.Process.Signal(syscall.SIGKILL)
		unblocked(t, done, "kill -9 of the writer's process")
	})

	t.Run("lost during the window", func(t *testing.T) {
		w, err := NewMySQL("mariadb", sock)
		if err != nil {
			t.Fatal(err)
		}
		held, err := (&Set{Writers: []Writer{w}}).Freeze(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		myExec(t, admin, fmt.Sprintf("KILL CONNECTION %d", w.connID))
		writesWork(t, admin, "d.u")
		err = held.Thaw(t.Context())
		if !errors.Is(err, ErrLost) {
			t.Fatalf("Thaw said %v, not ErrLost", err)
		}
		t.Log(err)
		if r := held.Report(); r.Consistency != Crash || !strings.Contains(r.Reason, "mariadb ("+sock+") was released before thaw") {
			t.Errorf("report %+v", r)
		}
	})

	t.Run("without RELOAD", func(t *testing.T) {
		w, err := Parse("mysql:noreload:hunter2@unix(" + sock + ")/")
		if err != nil {
			t.Fatal(err)
		}
		_, err = (&Set{Writers: []Writer{w}}).Freeze(t.Context())
		if err == nil {
			t.Fatal("Freeze succeeded")
		}
		t.Log(err)
		if !strings.Contains(err.Error(), `freeze mysql (`+sock+`): FLUSH TABLES WITH READ LOCK refused to "noreload": it needs the RELOAD privilege`) {
			t.Errorf("error %q", err)
		}
		if strings.Contains(err.Error(), "hunter2") || strings.Contains(w.Name(), "hunter2") {
			t.Error("the password is in the error or the name")
		}
		if w.(*MySQL).conn != nil || strings.Contains(err.Error(), "thaw") {
			t.Error("the failed Freeze left its connection for Thaw")
		}
		writesWork(t, admin, "d.u")
	})

	// A FLUSH TABLES WITH READ LOCK that cannot get the lock fails by the
	// deadline, and leaves nothing locked, waiting or not: either the
	// server's lock_wait_timeout ends it (deadline 2.5 s: 2 s), or the
	// deadline comes first (0.8 s, under the 1 s minimum of
	// lock_wait_timeout) and the writer kills it. The second blocker
	// matters most: a waiting FLUSH TABLES WITH READ LOCK already stops
	// every other session's writes.
	for _, blocker := range []struct {
		name, table string
		block       func(t *testing.T, c *sql.Conn)
		release     func(t *testing.T, c *sql.Conn, id int64)
	}{{
		name:  "LOCK TABLES WRITE",
		table: "d.t",
		block: func(t *testing.T, c *sql.Conn) { myExec(t, c, "LOCK TABLES d.t WRITE") },
		release: func(t *testing.T, c *sql.Conn, _ int64) {
			myExec(t, c, "UNLOCK TABLES")
		},
	}, {
		name:  "long write",
		table: "d.slow",
		block: func(t *testing.T, c *sql.Conn) {
			// One row: 20 s of UPDATE, killed once tested.
			go c.ExecContext(context.Background(), "UPDATE d.slow SET i = SLEEP(20)")
			running(t, admin, "UPDATE d.slow")
		},
		release: func(t *testing.T, _ *sql.Conn, id int64) {
			myExec(t, admin, fmt.Sprintf("KILL QUERY %d", id))
		},
	}} {
		for _, deadline := range []time.Duration{2500 * time.Millisecond, 800 * time.Millisecond} {
			t.Run(fmt.Sprintf("blocked by %s, deadline %s", blocker.name, deadline), func(t *testing.T) {
				c, err := admin.Conn(t.Context())
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				var id int64
				if err := c.QueryRowContext(t.Context(), "SELECT CONNECTION_ID()").Scan(&id); err != nil {
					t.Fatal(err)
				}
				blocker.block(t, c)
				w, err := NewMySQL("mariadb", sock)
				if err != nil {
					t.Fatal(err)
				}
				t0 := time.Now()
				_, err = (&Set{Writers: []Writer{w}, Deadline: deadline}).Freeze(t.Context())
				took := time.Since(t0)
				if err == nil {
					t.Fatal("Freeze succeeded")
				}
				t.Logf("%v (%.2f s)", err, took.Seconds())
				if took > deadline+1500*time.Millisecond {
					t.Errorf("Freeze took %s with a deadline of %s", took, deadline)
				}
				if w.conn != nil || strings.Contains(err.Error(), "thaw") {
					t.Error("the failed Freeze left its connection for Thaw")
				}
				if deadline > 2*time.Second && !strings.Contains(err.Error(), "could not get the lock within 2 s") {
					t.Errorf("error %q", err)
				}
				if deadline < time.Second && !errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("error %q is not the deadline's", err)
				}
				// No FLUSH is left waiting: it got its error, or it was
				// killed (without the KILL, it would still wait here,
				// for the rest of its 1 s lock_wait_timeout).
				var n int
				if err := admin.QueryRowContext(t.Context(), "SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE 'FLUSH TABLES WITH READ LOCK%' AND state LIKE 'Waiting for%lock' AND command <> 'Killed'").Scan(&n); err != nil {
					t.Fatal(err)
				}
				if n != 0 {
					t.Error("the FLUSH TABLES WITH READ LOCK still waits in the server after Freeze returned")
				}
				// Writes elsewhere go on while the blocker still holds.
				writesWork(t, admin, "d.u")
				blocker.release(t, c, id)
				writesWork(t, admin, blocker.table)
			})
		}
	}
}

// TestMySQLHelper is the sauve that TestMySQL kills with kill -9 while
// frozen: it freezes the server of $SAUVE_WRITER_TEST_SOCKET, says
// "frozen", and waits to die.
func TestMySQLHelper(t *testing.T) {
	sock := os.Getenv("SAUVE_WRITER_TEST_SOCKET")
	if sock == "" {
		t.Skip("run by TestMySQL")
	}
	w, err := NewMySQL("mariadb", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := w.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	fmt.Println("frozen")
	time.Sleep(30 * time.Second)
	t.Error("not killed within 30 s")
}

// TestMySQLUnreachable: no server, or one that never answers, fails Freeze
// by the deadline with an error that says so.
func TestMySQLUnreachable(t *testing.T) {
	hung := filepath.Join(t.TempDir(), "sock")
	silentServer(t, "unix", hung)
	for _, tc := range []struct {
		name, dsn string
		is        error
	}{
		{"no server", filepath.Join(t.TempDir(), "sock"), syscall.ENOENT},
		{"hung", "root:secret@unix(" + hung + ")/", context.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, err := NewMySQL("mysql", tc.dsn)
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
			if !errors.Is(err, tc.is) || !strings.Contains(err.Error(), "connect as ") {
				t.Errorf("error %q is not %v", err, tc.is)
			}
			if strings.Contains(err.Error(), "secret") {
				t.Error("the password is in the error")
			}
			if took > 2*time.Second {
				t.Errorf("Freeze took %s with a deadline of 500ms", took)
			}
		})
	}
}

func TestMySQLNames(t *testing.T) {
	for dsn, want := range map[string]string{
		"":                                   "mariadb (" + DefaultMySQLSocket + ")",
		"/tmp/my.sock":                       "mariadb (/tmp/my.sock)",
		"u:pw@tcp(db.example:3306)/":         "mariadb (db.example:3306)",
		"u:pw@unix(/run/x.sock)/?timeout=5s": "mariadb (/run/x.sock)",
	} {
		w, err := NewMySQL("mariadb", dsn)
		if err != nil {
			t.Errorf("%q: %v", dsn, err)
			continue
		}
		if w.Name() != want {
			t.Errorf("NewMySQL(%q).Name() = %q, want %q", dsn, w.Name(), want)
		}
	}
	if _, err := NewMySQL("mysql", "u:hunter2@tcp(db.example:3306"); err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("bad DSN: %v", err)
	}
}
