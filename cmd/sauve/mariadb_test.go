package main

// MariaDB under a steady InnoDB write load, backed up through the mariadb
// writer (FLUSH TABLES WITH READ LOCK around sauve's freeze of the ext4
// and its reflink copy): the last snapshot restores to a datadir on which
// MariaDB starts by InnoDB crash recovery alone, with a sound table that
// holds every transaction committed before the backup and no half of one.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// mariaInstall is Debian's MariaDB: mariadb-install-db and mariadbd (in
// /usr/sbin, which root's PATH may lack).
type mariaInstall struct{ installDB, mariadbd string }

// mariaInstalled skips the test when not root (loop devices, mounts) or
// when MariaDB is not installed (.ci/packages installs it).
func mariaInstalled(t *testing.T) mariaInstall {
	t.Helper()
	requireRoot(t)
	var bins []string
	for _, name := range []string{"mariadb-install-db", "mariadbd"} {
		p, err := exec.LookPath(name)
		if err != nil {
			if p, err = exec.LookPath("/usr/sbin/" + name); err != nil {
				t.Skipf("MariaDB is not installed: no %s (Debian package mariadb-server, in .ci/packages)", name)
			}
		}
		bins = append(bins, p)
	}
	return mariaInstall{installDB: bins[0], mariadbd: bins[1]}
}

// mariaOptions are the server's options on every datadir of the test, at
// install and at start: as root (mariadbd refuses root unless told), a
// small buffer pool and redo log for a small image. Every commit is
// flushed (innodb_flush_log_at_trx_commit stays 1): a transaction whose
// COMMIT returned must be in every copy taken after it.
func mariaOptions(data string) []string {
	return []string{"--no-defaults", "--user=root", "--datadir=" + data,
		"--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M"}
}

// mariaServer is a running mariadbd on a unix socket of its own, no TCP.
type mariaServer struct {
	*daemon
	sock string
	db   *sql.DB // as the database's root, through unix_socket
}

// start starts mariadbd on data and waits until it accepts connections;
// when the test ends it is killed (SIGKILL: a crash, which InnoDB is made
// for) unless stop did already.
func (mi mariaInstall) start(t *testing.T, data string) *mariaServer {
	t.Helper()
	dir, err := os.MkdirTemp("", "sauve-my-") // short: a socket path has 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &mariaServer{sock: filepath.Join(dir, "sock")}
	cfg := mysql.NewConfig()
	cfg.User, cfg.Net, cfg.Addr = "root", "unix", s.sock
	cfg.Logger = log.New(io.Discard, "", 0)
	connector, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.db = sql.OpenDB(connector)
	cmd := exec.Command(mi.mariadbd, append(mariaOptions(data), "--socket="+s.sock,
		"--skip-networking", "--pid-file="+filepath.Join(dir, "pid"))...)
	s.daemon = startDaemon(t, "mariadbd on "+data, cmd, filepath.Join(dir, "server.log"), syscall.SIGKILL, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return s.db.PingContext(ctx) == nil
	})
	t.Cleanup(func() { s.db.Close() }) // before the server stops
	return s
}

func (s *mariaServer) exec(t *testing.T, query string) {
	t.Helper()
	if _, err := s.db.ExecContext(t.Context(), query); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
}

// transactions counts the load's committed transactions, and checks that
// each is whole: both its rows are there, and each client's counter
// follows the previous one's, so that none is missing before its last.
func (s *mariaServer) transactions(t *testing.T) int {
	t.Helper()
	rows, err := s.db.QueryContext(t.Context(), "SELECT client, COUNT(*), COUNT(DISTINCT n), MAX(n) FROM sauve.load GROUP BY client")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	total := 0
	for rows.Next() {
		var client, n, txns, last int
		if err := rows.Scan(&client, &n, &txns, &last); err != nil {
			t.Fatal(err)
		}
		if n != 2*txns || last != txns {
			t.Fatalf("%s: client %d: %d rows, %d transactions, the last numbered %d: a transaction is half there or missing", s.what, client, n, txns, last)
		}
		total += txns
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return total
}

// MariaDB with its datadir on an ext4 loop-mounted from an image file on
// a reflink XFS, under a steady load of InnoDB transactions: sauve backs
// the image up (twice; 6 times with SAUVE_SOAK=1) holding the server
// through the mariadb writer, each backup a reflink copy taken while the
// ext4 is frozen and the server holds FLUSH TABLES WITH READ LOCK, the
// freeze and the quiesce window each under 2 s, transactions committing
// during it. The last snapshot (all with SAUVE_SOAK=1) restores to a
// clean ext4 on which a second MariaDB starts with no help, CHECK TABLE
// finds the table OK, and it holds every transaction committed before
// the backup began, none half, none begun after it ended.
func TestMariaDBUnderLoad(t *testing.T) {
	mi := mariaInstalled(t)
	rounds, restoreLast := 2, 1
	if os.Getenv("SAUVE_SOAK") == "1" {
		rounds, restoreLast = 6, 6
	}
	start := time.Now()
	e := newEnv(t)
	// 128 MiB holds the system tables, ibdata1, ibtmp1 (12 MiB each) and
	// the 8 MiB redo log, and the load's rows.
	inner := t.TempDir()
	img := ext4OnXFS(t, e, "128M", inner)
	data := filepath.Join(inner, "data")
	sh(t, mi.installDB, append(mariaOptions(data), "--auth-root-authentication-method=socket",
		"--skip-test-db", "--skip-name-resolve")...)
	src := mi.start(t, data)
	src.exec(t, "CREATE DATABASE sauve")
	src.exec(t, `CREATE TABLE sauve.load (id BIGINT AUTO_INCREMENT PRIMARY KEY, client INT NOT NULL,
		n BIGINT NOT NULL, half CHAR(1) NOT NULL, pad VARCHAR(200) NOT NULL, UNIQUE KEY (client, n, half)) ENGINE=InnoDB`)
	t.Logf("server ready in %.1f s", time.Since(start).Seconds())

	// The load: three clients, each committing transactions of two rows,
	// its nth numbered n, unthrottled (bound by the redo log's fsync, which
	// they share by group commit), for as long as the backups last.
	// Stopped when they are done, and at the end of the test however it
	// ends, before the server is killed.
	const clients = 3
	quit, loadErr := make(chan struct{}), make(chan error, clients)
	for c := range clients {
		go func() {
			for n := 1; ; n++ {
				select {
				case <-quit:
					loadErr <- nil
					return
				default:
				}
				if err := loadTxn(src.db, c, n); err != nil {
					loadErr <- fmt.Errorf("client %d, transaction %d: %w", c, n, err)
					return
				}
			}
		}()
	}
	stopLoad := sync.OnceValue(func() error {
		close(quit)
		var errs []error
		for range clients {
			errs = append(errs, <-loadErr)
		}
		return errors.Join(errs...)
	})
	t.Cleanup(func() { stopLoad() })
	for src.transactions(t) == 0 {
		time.Sleep(20 * time.Millisecond)
	}

	writer := "mariadb (" + src.sock + ")"
	backupsAt := time.Now()
	var snaps []dbSnapshot
	for i := range rounds {
		before := src.transactions(t)
		var res quiescedBackup
		t0 := time.Now()
		e.okJSON(&res, "backup", img, "--writer", "mariadb:root@unix("+src.sock+")/")
		took := time.Since(t0)
		after := src.transactions(t)
		what := fmt.Sprintf("backup %d", i+1)
		res.check(t, what, []string{inner}, writer)
		t.Logf("%s: %.2f s, frozen %.3f s, quiesce window %.3f s, %d transactions during it",
			what, took.Seconds(), res.Frozen, res.Quiesce.WindowSeconds, after-before)
		if after <= before {
			t.Fatalf("%s: no transaction committed during the backup: it was not under load", what)
		}
		snaps = append(snaps, dbSnapshot{id: res.Snapshot, mode: what, before: before, after: after})
	}
	if err := stopLoad(); err != nil {
		t.Fatalf("the load stopped: %v", err)
	}
	t.Logf("%d backups in %.1f s, %d transactions", rounds, time.Since(backupsAt).Seconds(), src.transactions(t))
	for _, sn := range snaps[len(snaps)-restoreLast:] {
		checkMariaSnapshot(t, e, mi, sn)
	}
	t.Logf("whole test %.1f s", time.Since(start).Seconds())
}

// loadTxn commits a load client's nth transaction.
func loadTxn(db *sql.DB, client, n int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, half := range []string{"a", "b"} {
		if _, err := tx.ExecContext(ctx, "INSERT INTO sauve.load (client, n, half, pad) VALUES (?, ?, ?, REPEAT('x', 200))", client, n, half); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// checkMariaSnapshot restores a snapshot of the image, checks its ext4,
// and starts MariaDB on the restored datadir, on a socket of its own,
// with no help at all: InnoDB must recover by itself, CHECK TABLE find
// the table OK, and the transactions be those committed by then.
func checkMariaSnapshot(t *testing.T, e *env, mi mariaInstall, sn dbSnapshot) {
	t.Helper()
	out, restored := restoredExt4(t, e, sn.id, sn.mode)
	defer os.Remove(out)
	withMount(t, "ext4", out, true, func(dir string) {
		s := mi.start(t, filepath.Join(dir, "data"))
		// Before the umount withMount defers, also on failure.
		defer s.stop(t, syscall.SIGKILL)
		rows, err := s.db.QueryContext(t.Context(), "CHECK TABLE sauve.load")
		if err != nil {
			t.Fatal(err)
		}
		var table, op, kind, msg, said string
		for rows.Next() {
			if err := rows.Scan(&table, &op, &kind, &msg); err != nil {
				t.Fatal(err)
			}
			said += fmt.Sprintf("%s %s: %s\n", kind, table, msg)
		}
		rows.Close()
		if err := rows.Err(); err != nil || said != "status sauve.load: OK\n" {
			t.Errorf("snapshot %s (%s): CHECK TABLE: %v\n%s", sn.id[:8], sn.mode, err, said)
		}
		n := s.transactions(t)
		if n < sn.before || n > sn.after {
			t.Errorf("snapshot %s (%s): %d transactions, want between %d (committed before the backup) and %d (after it)", sn.id[:8], sn.mode, n, sn.before, sn.after)
		}
		recovered := strings.Contains(s.logText(), "Starting crash recovery")
		t.Logf("snapshot %s (%s): restored in %.1f s, accepting in %.2f s (crash recovery: %v), %d transactions (%d..%d)",
			sn.id[:8], sn.mode, restored.Seconds(), s.ready.Seconds(), recovered, n, sn.before, sn.after)
		// A clean shutdown before the umount.
		s.db.Close()
		s.stop(t, syscall.SIGTERM)
	})
}

// A mariadb writer whose server is not there fails the backup before
// anything is frozen, naming the writer and why; nothing is stored.
func TestMariaDBWriterNoServer(t *testing.T) {
	e := newEnv(t)
	img := xfsImage(t, e)
	sock := filepath.Join(t.TempDir(), "sock") // no server behind it
	e.fail([]string{"mariadb (" + sock + ")", "connect", "no such file"}, "backup", img, "--writer", "mariadb:root@unix("+sock+")/")
	if n := snapshotsOf(t, e); n != 0 {
		t.Fatalf("%d snapshots stored after the writer failed", n)
	}
}

// A MariaDB whose data directory is on no disk of the backup is refused:
// the snapshot would say application-consistent without the database.
func TestMariaDBVolumeNotInBackup(t *testing.T) {
	mi := mariaInstalled(t)
	e := newEnv(t)
	img := xfsImage(t, e)
	data := filepath.Join(t.TempDir(), "data")
	sh(t, mi.installDB, append(mariaOptions(data), "--auth-root-authentication-method=socket", "--skip-test-db", "--skip-name-resolve")...)
	s := mi.start(t, data)
	e.fail([]string{"needs", "its data directory", "on no disk of this backup"}, "backup", img, "--writer", "mariadb:root@unix("+s.sock+")/")
	if n := snapshotsOf(t, e); n != 0 {
		t.Fatalf("%d snapshots stored for a copy that misses the database", n)
	}
}
