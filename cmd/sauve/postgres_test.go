package main

// PostgreSQL under pgbench load, backed up through the writers and the
// hooks (issue 12): every snapshot must restore to a cluster that starts
// by crash recovery alone, that pg_amcheck finds sound, and whose pgbench
// tables still balance.

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// pgInstall is Debian's PostgreSQL: the newest of its bin folders (its
// pg_amcheck, initdb and postgres are not in PATH) and the OS user its
// servers run as, since postgres and initdb refuse to run as root.
type pgInstall struct {
	bin  string
	cred *syscall.Credential
}

// pgInstalled skips the test when not root (loop devices, mounts) or when
// PostgreSQL is not installed (.ci/packages installs it).
func pgInstalled(t *testing.T) pgInstall {
	t.Helper()
	requireRoot(t)
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/postgres")
	major := func(p string) int {
		v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(p))))
		return v
	}
	sort.Slice(bins, func(i, j int) bool { return major(bins[i]) > major(bins[j]) })
	if len(bins) == 0 {
		t.Skip("PostgreSQL is not installed (Debian package postgresql, in .ci/packages)")
	}
	pi := pgInstall{bin: filepath.Dir(bins[0])}
	for _, tool := range []string{"initdb", "pg_isready", "psql", "pgbench", "pg_amcheck"} {
		if _, err := os.Stat(pi.tool(tool)); err != nil {
			t.Skipf("PostgreSQL is installed without %s: %v", tool, err)
		}
	}
	// The package makes the user: its absence is a broken install, not a
	// reason to skip.
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Fatalf("PostgreSQL is installed but there is no OS user postgres to run it as: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	pi.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
	return pi
}

func (pi pgInstall) tool(name string) string { return filepath.Join(pi.bin, name) }

// dir makes a folder under /tmp that the postgres user owns, for a
// socket, a log or a mount point. Not under t.TempDir: its parents are
// root's and closed to other users, and postgres must reach what is in it.
func (pi pgInstall) dir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "sauve-pg-"+prefix+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chown(dir, int(pi.cred.Uid), int(pi.cred.Gid)); err != nil {
		t.Fatal(err)
	}
	return dir
}

// asPostgres runs a command as the postgres user and fails the test with
// its output if it fails.
// initCluster makes a cluster in dir/pgdata, owned by the servers' user,
// whose WAL is kept to maxWAL (min 32MB) so that the image holding it
// stays small; it returns the cluster's folder.
func (pi pgInstall) initCluster(t *testing.T, dir, maxWAL string) string {
	t.Helper()
	data := filepath.Join(dir, "pgdata")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	os.Chown(data, int(pi.cred.Uid), int(pi.cred.Gid))
	pi.asPostgres(t, "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "-N")
	conf, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer conf.Close()
	if _, err := fmt.Fprintf(conf, "max_wal_size = %s\nmin_wal_size = 32MB\n", maxWAL); err != nil {
		t.Fatal(err)
	}
	return data
}

func (pi pgInstall) asPostgres(t *testing.T, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(pi.tool(name), args...)
	cmd.Dir = "/" // the test's folder may be closed to postgres
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: pi.cred}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// pgServer is a running postmaster on a unix socket of its own.
type pgServer struct {
	*daemon
	pi   pgInstall
	data string
	sock string
	port int
}

// startPG starts postgres on data, listening only on a unix socket in a
// folder of its own, and waits until it accepts connections. The port
// only names the socket (.s.PGSQL.PORT) and the SysV shared memory key,
// as no TCP is listened on; each server still gets its own. When the test
// ends the server is stopped at once (SIGQUIT, PostgreSQL's immediate
// shutdown, then SIGKILL to its process group) unless stop did already.
func (pi pgInstall) startPG(t *testing.T, data string, port int) *pgServer {
	t.Helper()
	s := &pgServer{pi: pi, data: data, sock: pi.dir(t, "sock"), port: port}
	cmd := exec.Command(pi.tool("postgres"), "-D", data, "-k", s.sock, "-p", strconv.Itoa(port), "-c", "listen_addresses=")
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: pi.cred}
	s.daemon = startDaemon(t, "postgres on "+data, cmd, filepath.Join(s.sock, "server.log"), syscall.SIGQUIT, func() bool {
		return exec.Command(pi.tool("pg_isready"), "-q", "-h", s.sock, "-p", strconv.Itoa(port)).Run() == nil
	})
	return s
}

// conn is psql's and pgbench's connection options (as root: every role
// logs in without a password on these clusters).
func (s *pgServer) conn() []string {
	return []string{"-h", s.sock, "-p", strconv.Itoa(s.port), "-U", "postgres"}
}

// psql runs one statement and returns its unaligned, headerless result.
func (s *pgServer) psql(t *testing.T, db, sql string) string {
	t.Helper()
	args := append(s.conn(), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql)
	return strings.TrimSpace(sh(t, s.pi.tool("psql"), args...))
}

func (s *pgServer) history(t *testing.T) int {
	t.Helper()
	n, err := strconv.Atoi(s.psql(t, "postgres", "SELECT count(*) FROM pgbench_history"))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// pgLoad is what the backup rounds of TestPostgresUnderLoad share.
type pgLoad struct {
	e       *env
	src     *pgServer // the cluster under load
	thawLog string    // the hooks' post-thaw commands append here
	inner   string    // the ext4 holding PGDATA
	agent   *agentHost
}

// pgWriterSpec is the --writer of the cluster under load.
func (l *pgLoad) pgWriterSpec() string {
	// The libpq key=value form, the one a DSN with a socket folder and a
	// port not 5432 needs.
	return fmt.Sprintf("postgresql:host=%s port=%d user=postgres dbname=postgres", l.src.sock, l.src.port)
}

// pgQuiesce is one way of holding PostgreSQL still for a backup. A new way
// (the agent's) is one more entry in pgQuiesceModes: setup, when not nil,
// runs once before the first backup (to start an agent, say); flags are
// sauve backup's flags; writer is the name the snapshot must record.
type pgQuiesce struct {
	name   string
	setup  func(t *testing.T, l *pgLoad)
	flags  func(l *pgLoad) []string
	writer func(l *pgLoad) string
	// byAgent: the agent freezes the ext4 (with its postgresql writer),
	// so sauve takes its copy with --no-freeze.
	byAgent bool
}

var pgQuiesceModes = []pgQuiesce{
	{
		name:   "writer",
		flags:  func(l *pgLoad) []string { return []string{"--writer", l.pgWriterSpec()} },
		writer: func(l *pgLoad) string { return fmt.Sprintf("postgresql (%s:%d)", l.src.sock, l.src.port) },
	},
	{
		name: "hooks",
		flags: func(l *pgLoad) []string {
			checkpoint := strings.Join(append([]string{l.src.pi.tool("psql")}, append(l.src.conn(), "-X", "-q", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", "CHECKPOINT")...), " ")
			return []string{"--pre-freeze", checkpoint, "--post-thaw", `echo "$SAUVE_PHASE $SAUVE_DISKS" >> ` + l.thawLog}
		},
		writer: func(*pgLoad) string { return "hooks" },
	},
	{
		name: "agent",
		setup: func(t *testing.T, l *pgLoad) {
			l.agent = startAgentOn(t, l.e, l.inner, "--writer", l.pgWriterSpec())
		},
		flags: func(l *pgLoad) []string {
			return []string{"--quiesce", "agent://" + l.agent.addr, "--agent-caller-key", l.agent.callerKey, "--agent-key", l.agent.agentPub, "--no-freeze"}
		},
		writer:  func(l *pgLoad) string { return "agent " + l.agent.addr },
		byAgent: true,
	},
}

// dbSnapshot is one backup taken under load, with the transactions (for
// pgbench, its pgbench_history rows) committed just before it started
// and just after it ended: the restored copy, one instant in between,
// holds a count in that range.
type dbSnapshot struct {
	id, mode       string
	before, after  int
	frozen, window float64
}

// quiescedBackup is what backup --json says of a backup held still by
// writers.
type quiescedBackup struct {
	Snapshot string       `json:"snapshot"`
	Copy     string       `json:"point_in_time_copy"`
	Frozen   float64      `json:"frozen_seconds"`
	Mounts   []string     `json:"frozen_mounts"`
	Quiesce  *quiesceJSON `json:"quiesce"`
}

// check fails the test (what names the backup) unless the backup is a
// reflink copy taken with mounts frozen, application-consistent through
// writer alone, and both its freeze and its quiesce window are under 2 s
// (the bound; both measured by sauve: frozen_seconds from
// FIFREEZE to the guard's thaw, window_seconds from the first writer's
// freeze to the last one's thaw).
func (b quiescedBackup) check(t *testing.T, what string, mounts []string, writer string) {
	t.Helper()
	if b.Copy != "reflink" || !slices.Equal(b.Mounts, mounts) {
		t.Fatalf("%s: copy %q with %v frozen, want a reflink copy with %v frozen", what, b.Copy, b.Mounts, mounts)
	}
	q := b.Quiesce
	if q == nil || q.Consistency != "application" || len(q.Writers) != 1 || q.Writers[0].Name != writer || !q.Writers[0].Frozen {
		t.Fatalf("%s: quiesce %+v, want application-consistent through %s", what, q, writer)
	}
	if b.Frozen <= 0 || b.Frozen >= 2 || q.WindowSeconds <= 0 || q.WindowSeconds >= 2 {
		t.Errorf("%s: frozen %.3f s, quiesce window %.3f s: each must be under 2 s", what, b.Frozen, q.WindowSeconds)
	}
}

// restoredExt4 restores snapshot id of an ext4 image to a file in the
// test's folder, for the caller to remove once done, and checks the ext4: frozen for the copy (its
// journal flushed and marked so), it needs no journal replay and has
// nothing to repair. what names the snapshot in messages.
func restoredExt4(t *testing.T, e *env, id, what string) (string, time.Duration) {
	t.Helper()
	out := e.path("restored-" + id[:8] + ".img")
	t0 := time.Now()
	e.ok("restore", id, out)
	took := time.Since(t0)
	if o, err := exec.Command("e2fsck", "-f", "-n", out).CombinedOutput(); err != nil {
		t.Fatalf("snapshot %s (%s): e2fsck -fn of the restored image: %v\n%s", id[:8], what, err, o)
	}
	return out, took
}

// PostgreSQL with PGDATA on an ext4 loop-mounted from an image file on a
// reflink XFS, under pgbench load: sauve backs the image up again and
// again, holding the database in turn through the postgresql writer,
// through hooks, and through a sauve agent (TLS, both keys checked) whose
// postgresql writer and freeze of the ext4 hold it for sauve's reflink
// copy (--no-freeze), each backup a reflink copy taken while the ext4 is
// frozen, each freeze and quiesce window under 2 s. Every snapshot
// restored (the last three; all 20 with SAUVE_SOAK=1) holds a clean
// ext4 on which PostgreSQL starts by crash recovery alone, pg_amcheck
// finds nothing, and pgbench's balances agree.
func TestPostgresUnderLoad(t *testing.T) {
	pi := pgInstalled(t)
	rounds, restoreLast := 3, 3
	if os.Getenv("SAUVE_SOAK") == "1" {
		rounds, restoreLast = 20, 20
	}
	start := time.Now()
	e := newEnv(t)

	// The image: an ext4 in a file on the reflink XFS. 256 MiB holds
	// pgbench at scale 2 (about 35 MB of tables) and the WAL that
	// max_wal_size lets it keep.
	inner := pi.dir(t, "inner")
	img := ext4OnXFS(t, e, "256M", inner)
	// fsync and synchronous_commit stay on: a committed transaction must
	// be in every copy taken after its commit returned. A small WAL keeps
	// the image small.
	data := pi.initCluster(t, inner, "64MB")
	src := pi.startPG(t, data, 6543)
	sh(t, pi.tool("pgbench"), append(src.conn(), "-i", "-q", "-s", "2", "postgres")...)
	// pg_amcheck checks only databases with the amcheck extension;
	// installed here, it is in every copy, and the restored clusters are
	// checked as they are.
	for _, db := range []string{"postgres", "template1"} {
		src.psql(t, db, "CREATE EXTENSION amcheck")
	}
	// The bulk load leaves some 40 MB of dirty buffers; flushed here, the
	// first backup's CHECKPOINT is one of steady load like the others,
	// not one of pgbench -i.
	src.psql(t, "postgres", "CHECKPOINT")
	t.Logf("cluster ready in %.1f s", time.Since(start).Seconds())

	// The load, for as long as the backups last.
	bench := pi.startBench(t, src, filepath.Join(e.dir, "pgbench.log"))

	l := &pgLoad{e: e, src: src, thawLog: filepath.Join(e.dir, "post-thaw.log"), inner: inner}
	for _, m := range pgQuiesceModes {
		if m.setup != nil {
			m.setup(t, l)
		}
	}
	backupsAt := time.Now()
	var snaps []dbSnapshot
	hookRounds := 0
	for i := range rounds {
		m := pgQuiesceModes[i%len(pgQuiesceModes)]
		before := src.history(t)
		var res quiescedBackup
		t0 := time.Now()
		e.okJSON(&res, append([]string{"backup", img}, m.flags(l)...)...)
		took := time.Since(t0)
		after := src.history(t)
		q := res.Quiesce
		if q == nil {
			t.Fatalf("round %d (%s): no quiesce record", i+1, m.name)
		}
		wantMounts := []string{inner}
		if m.byAgent {
			wantMounts = nil // the agent froze it
			if len(q.Writers) != 1 || !strings.Contains(q.Writers[0].Detail, inner) || !strings.Contains(q.Writers[0].Detail, "postgresql") {
				t.Fatalf("round %d (%s): the agent's report %+v does not name its postgresql writer and %s", i+1, m.name, q.Writers, inner)
			}
			res.Frozen = q.WindowSeconds
		}
		t.Logf("round %d (%s): backup %.2f s, frozen %.3f s, quiesce window %.3f s, %d transactions during it",
			i+1, m.name, took.Seconds(), res.Frozen, q.WindowSeconds, after-before)
		res.check(t, fmt.Sprintf("round %d (%s)", i+1, m.name), wantMounts, m.writer(l))
		if after <= before {
			t.Fatalf("round %d (%s): no transaction committed during the backup: it was not under load", i+1, m.name)
		}
		if m.name == "hooks" {
			hookRounds++
			if got := strings.Count(string(mustRead(t, l.thawLog)), "post-thaw "+img+"\n"); got != hookRounds {
				t.Fatalf("round %d: post-thaw logged %d times after %d backups through hooks", i+1, got, hookRounds)
			}
		}
		snaps = append(snaps, dbSnapshot{id: res.Snapshot, mode: m.name, before: before, after: after, frozen: res.Frozen, window: q.WindowSeconds})
	}
	bench.stillRunning(t, "the backups")
	// The load stops before the restores: they are checked one by one on
	// an idle machine, and the live cluster has nothing more to prove.
	bench.stop()
	t.Logf("%d backups in %.1f s, %d transactions", rounds, time.Since(backupsAt).Seconds(), src.history(t))

	restoresAt := time.Now()
	for i, sn := range snaps[max(0, len(snaps)-restoreLast):] {
		checkPGSnapshot(t, e, pi, sn, 6544+i)
	}
	t.Logf("%d restores checked in %.1f s; whole test %.1f s", min(len(snaps), restoreLast), time.Since(restoresAt).Seconds(), time.Since(start).Seconds())
}

// checkPGSnapshot restores a snapshot of the image, checks its ext4, and
// starts PostgreSQL on the restored PGDATA, on a socket and port of its
// own, with no other help than the removal of postmaster.pid: it must
// recover, pass pg_amcheck, and keep pgbench's invariant.
func checkPGSnapshot(t *testing.T, e *env, pi pgInstall, sn dbSnapshot, port int) {
	t.Helper()
	out, restored := restoredExt4(t, e, sn.id, sn.mode)
	defer os.Remove(out)
	withMount(t, "ext4", out, true, func(dir string) {
		data := filepath.Join(dir, "pgdata")
		// The copy was taken of a running server, so its postmaster.pid
		// names that server's PID, which is still alive on this machine:
		// postgres would take the copy for a data folder in use and
		// refuse to start. On another machine the PID would be stale and
		// postgres would ignore the file; removing it is what an admin
		// restoring beside the live server does, and nothing else is done.
		if err := os.Remove(filepath.Join(data, "postmaster.pid")); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		s := pi.startPG(t, data, port)
		// Before the umount withMount defers, also on failure.
		defer s.stop(t, syscall.SIGQUIT)
		if log := s.logText(); !strings.Contains(log, "database system was not properly shut down; automatic recovery in progress") {
			t.Errorf("snapshot %s (%s): the restored cluster did not go through crash recovery:\n%s", sn.id[:8], sn.mode, log)
		}
		args := append(s.conn(), "--all", "--heapallindexed", "--parent-check")
		if o, err := exec.Command(pi.tool("pg_amcheck"), args...).CombinedOutput(); err != nil || len(o) != 0 {
			t.Errorf("snapshot %s (%s): pg_amcheck --all: %v\n%s", sn.id[:8], sn.mode, err, o)
		}
		sums := s.psql(t, "postgres", `SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),
			(SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)`)
		if f := strings.Split(sums, "|"); len(f) != 4 || f[0] != f[1] || f[1] != f[2] || f[2] != f[3] {
			t.Errorf("snapshot %s (%s): accounts|branches|tellers|history sums %s: pgbench's invariant is broken", sn.id[:8], sn.mode, sums)
		}
		// Every transaction committed before the backup began is in the
		// copy, none committed after it ended.
		if n := s.history(t); n < sn.before || n > sn.after {
			t.Errorf("snapshot %s (%s): %d history rows, want between %d (committed before the backup) and %d (after it)", sn.id[:8], sn.mode, n, sn.before, sn.after)
		}
		t.Logf("snapshot %s (%s): restored in %.1f s, recovered and accepting in %.2f s, sums %s", sn.id[:8], sn.mode, restored.Seconds(), s.ready.Seconds(), sums)
		// A clean stop before the umount.
		s.stop(t, syscall.SIGINT)
	})
}

// A postgresql writer whose server is not there fails the backup before
// anything is frozen: the error names the writer and why, and no
// snapshot is stored. With --hook-failure continue the snapshot is stored
// as crash-consistent instead, saying why.
func TestPostgresWriterNoServer(t *testing.T) {
	e := newEnv(t)
	img := xfsImage(t, e)
	sock := t.TempDir() // a folder with no server's socket in it
	writer := fmt.Sprintf("postgresql:host=%s port=6545 user=postgres dbname=postgres", sock)
	name := fmt.Sprintf("postgresql (%s:6545)", sock)
	e.fail([]string{name, "connect", ".s.PGSQL.6545"}, "backup", img, "--writer", writer)
	if n := snapshotsOf(t, e); n != 0 {
		t.Fatalf("%d snapshots stored after the writer failed (--hook-failure abort)", n)
	}
	var res struct {
		Quiesce *quiesceJSON `json:"quiesce"`
	}
	e.okJSON(&res, "backup", img, "--writer", writer, "--hook-failure", "continue")
	if q := res.Quiesce; q == nil || q.Consistency != "crash" || !strings.Contains(q.Reason, "connect") {
		t.Fatalf("quiesce %+v, want crash-consistent saying the writer could not connect", q)
	}
	if n := snapshotsOf(t, e); n != 1 {
		t.Fatalf("%d snapshots after --hook-failure continue, want 1", n)
	}
}

// A writer's volumes must be in the copy: a PostgreSQL whose data
// directory is on no disk of the backup is refused before anything is
// frozen, and nothing is stored.
func TestPostgresVolumeNotInBackup(t *testing.T) {
	e := newEnv(t)
	pi := pgInstalled(t)
	img := xfsImage(t, e)
	data := filepath.Join(pi.dir(t, "elsewhere"), "data")
	pi.asPostgres(t, "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-N", "--locale=C")
	s := pi.startPG(t, data, 6547)
	writer := fmt.Sprintf("postgresql:host=%s port=6547 user=postgres dbname=postgres", s.sock)
	e.fail([]string{"needs", "its data directory", "on no disk of this backup"}, "backup", img, "--writer", writer)
	if n := snapshotsOf(t, e); n != 0 {
		t.Fatalf("%d snapshots stored for a copy that misses the database", n)
	}
}

// pgBench is pgbench's TPC-B-like load running on a cluster.
type pgBench struct {
	log  string
	done chan struct{}
	stop func() // kills it and waits for it; again is a no-op
}

// startBench starts pgbench on two clients, unthrottled (bound by fsync
// here, a few hundred transactions a second), logging to log, and
// returns once its first transaction is in src's history. It runs until
// stop, and is killed at the end of the test however it ends. -T is only
// an upper bound; -n skips the VACUUM that pgbench -i just did.
func (pi pgInstall) startBench(t *testing.T, src *pgServer, log string) *pgBench {
	t.Helper()
	logf, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(pi.tool("pgbench"), append(src.conn(), "-n", "-c", "2", "-j", "2", "-T", "3600", "postgres")...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	b := &pgBench{log: log, done: make(chan struct{})}
	go func() { cmd.Wait(); close(b.done) }()
	b.stop = sync.OnceFunc(func() { cmd.Process.Kill(); <-b.done })
	t.Cleanup(b.stop)
	for src.history(t) == 0 {
		select {
		case <-b.done:
			t.Fatalf("pgbench exited: %s", mustRead(t, log))
		case <-time.After(50 * time.Millisecond):
		}
	}
	return b
}

// stillRunning fails the test if pgbench has stopped during what.
func (b *pgBench) stillRunning(t *testing.T, what string) {
	t.Helper()
	select {
	case <-b.done:
		t.Fatalf("pgbench stopped during %s: %s", what, mustRead(t, b.log))
	default:
	}
}
