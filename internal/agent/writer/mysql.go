package writer

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"os/user"
	"strings"
	"sync"
	"time"

	"github.com/go-sql-driver/mysql"
)

// DefaultMySQLSocket is the server's unix socket on Debian and Ubuntu, for
// MariaDB and MySQL alike, where "mariadb" and "mysql" connect.
const DefaultMySQLSocket = "/run/mysqld/mysqld.sock"

// DefaultMySQLHold is how long the server keeps the lock of a MySQL writer
// when sauve says nothing more (MySQL.Hold).
const DefaultMySQLHold = time.Minute

// The server's error numbers the writer explains.
const (
	erNoSuchThread    = 1094 // ER_NO_SUCH_THREAD: KILL of a connection gone already
	erLockWaitTimeout = 1205 // ER_LOCK_WAIT_TIMEOUT
	erSpecificAccess  = 1227 // ER_SPECIFIC_ACCESS_DENIED_ERROR: FTWRL without RELOAD
)

// killMargin is at least how much earlier than the freeze deadline the
// server is asked to give up waiting for the lock, so that in the common
// case the server says why itself and the KILL from a second connection is
// not needed.
const killMargin = 250 * time.Millisecond

// MySQL is the writer of a MySQL or MariaDB server: Freeze takes
// FLUSH TABLES WITH READ LOCK on a connection of its own and Thaw releases
// it (UNLOCK TABLES) and closes the connection.
//
// The lock lives and dies with that connection: a sauve killed during the
// window leaves nothing locked, since the server drops the locks of a
// closed connection. For the same reason a sauve that hangs holds the lock
// at most Hold (the session's wait_timeout). The user needs the RELOAD
// privilege.
type MySQL struct {
	flavor string
	cfg    *mysql.Config
	name   string
	// Hold is how long the server keeps the lock while sauve says nothing
	// (DefaultMySQLHold when 0): past it, the server closes the
	// connection, the database runs again, and Thaw says the lock was
	// lost (ErrLost). Set it before Freeze.
	Hold time.Duration

	mu     sync.Mutex
	db     *sql.DB
	conn   *sql.Conn
	connID int64
}

// NewMySQL returns the writer of the server dsn names, flavor ("mariadb"
// or "mysql") being only what Name says. dsn is a Go MySQL driver DSN
// ("backup:secret@unix(/run/mysqld/mysqld.sock)/",
// "backup:secret@tcp(db.example:3306)/"), or the path of a unix socket;
// "" is DefaultMySQLSocket. Without a user, the user is the name of the OS
// user running sauve, which is what MariaDB's unix_socket authentication
// (Debian's default for root) expects.
func NewMySQL(flavor, dsn string) (*MySQL, error) {
	var cfg *mysql.Config
	switch {
	case dsn == "" || strings.HasPrefix(dsn, "/"):
		cfg = mysql.NewConfig()
		cfg.Net, cfg.Addr = "unix", dsn
		if dsn == "" {
			cfg.Addr = DefaultMySQLSocket
		}
	default:
		var err error
		if cfg, err = mysql.ParseDSN(dsn); err != nil {
			// The driver's errors do not quote the DSN, and so no password.
			return nil, fmt.Errorf("%s: %w", flavor, err)
		}
	}
	if cfg.User == "" {
		if u, err := user.Current(); err == nil {
			cfg.User = u.Username
		}
	}
	// The driver logs broken connections to stderr by default; what
	// matters reaches the caller as an error.
	cfg.Logger = mysql.Logger(nopLogger{})
	where := cfg.Addr
	if cfg.Net != "unix" && cfg.Net != "tcp" {
		where = cfg.Net + "(" + cfg.Addr + ")"
	}
	return &MySQL{flavor: flavor, cfg: cfg, name: flavor + " (" + where + ")"}, nil
}

type nopLogger struct{}

func (nopLogger) Print(...any) {}

// Name is "mariadb (ADDRESS)" or "mysql (ADDRESS)".
func (m *MySQL) Name() string { return m.name }

// Freeze connects and takes the global read lock, waiting for it no longer
// than ctx allows; a Freeze that fails leaves nothing locked, and no
// connection open.
func (m *MySQL) Freeze(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closeLocked()
	err := m.freezeLocked(ctx)
	if err != nil {
		// So that an open connection always means a lock held, which
		// is what Thaw goes by.
		m.closeLocked()
	}
	return err
}

func (m *MySQL) freezeLocked(ctx context.Context) error {
	conn, err := m.connect(ctx)
	if err != nil {
		return err
	}
	m.conn = conn
	if err := conn.QueryRowContext(ctx, "SELECT CONNECTION_ID()").Scan(&m.connID); err != nil {
		return fmt.Errorf("SELECT CONNECTION_ID(): %w", ctxErr(ctx, err))
	}
	wait := lockWait(ctx)
	hold := m.Hold
	if hold <= 0 {
		hold = DefaultMySQLHold
	}
	set := fmt.Sprintf("SET SESSION lock_wait_timeout = %d, SESSION wait_timeout = %d",
		wait, int64(math.Ceil(hold.Seconds())))
	if _, err := conn.ExecContext(ctx, set); err != nil {
		return fmt.Errorf("%s: %w", set, ctxErr(ctx, err))
	}
	t0 := time.Now()
	_, err = conn.ExecContext(ctx, "FLUSH TABLES WITH READ LOCK")
	if err == nil {
		return nil
	}
	var me *mysql.MySQLError
	isMy := errors.As(err, &me)
	switch {
	case isMy && me.Number == erSpecificAccess:
		return fmt.Errorf("FLUSH TABLES WITH READ LOCK refused to %q: it needs the RELOAD privilege (GRANT RELOAD ON *.* TO ...): %w", m.cfg.User, err)
	case isMy && me.Number == erLockWaitTimeout:
		return fmt.Errorf("FLUSH TABLES WITH READ LOCK could not get the lock within %d s: another session holds a table lock or runs a long write (SHOW PROCESSLIST says which); nothing is locked: %w", wait, err)
	}
	// The deadline passed first, or the connection broke: the statement
	// may still be waiting in the server, and while it waits it blocks
	// every other session's writes. Kill it from a second connection
	// rather than trusting the server to notice the first one closed.
	kerr := m.killLocked(ctx)
	err = fmt.Errorf("FLUSH TABLES WITH READ LOCK (after %.1f s): %w", time.Since(t0).Seconds(), ctxErr(ctx, err))
	if kerr != nil {
		return errors.Join(err, kerr)
	}
	return err
}

// connect opens the writer's own connection: a pool of one, so that every
// statement, and the lock, run on the same session.
func (m *MySQL) connect(ctx context.Context) (*sql.Conn, error) {
	connector, err := mysql.NewConnector(m.cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	m.db = sql.OpenDB(connector)
	m.db.SetMaxOpenConns(1)
	conn, err := m.db.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("connect as %q: %w", m.cfg.User, ctxErr(ctx, err))
	}
	return conn, nil
}

// lockWait is lock_wait_timeout for ctx: whole seconds (what MySQL takes),
// at least killMargin before ctx's deadline, and at least 1 (0 means "do
// not wait" to MariaDB and is refused by MySQL): under 1.25 s, the
// deadline comes first and the statement is killed.
func lockWait(ctx context.Context) int64 {
	dl, ok := ctx.Deadline()
	if !ok {
		return int64(DefaultDeadline / time.Second)
	}
	return max(1, int64((time.Until(dl)-killMargin)/time.Second))
}

// killLocked kills the writer's connection from a new one, on a context
// that the expired ctx does not cut short.
func (m *MySQL) killLocked(ctx context.Context) error {
	kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	connector, err := mysql.NewConnector(m.cfg)
	if err != nil {
		return fmt.Errorf("kill the waiting FLUSH TABLES WITH READ LOCK: %w", err)
	}
	db := sql.OpenDB(connector)
	defer db.Close()
	if _, err := db.ExecContext(kctx, fmt.Sprintf("KILL CONNECTION %d", m.connID)); err != nil {
		var me *mysql.MySQLError
		if errors.As(err, &me) && me.Number == erNoSuchThread {
			return nil
		}
		return fmt.Errorf("kill the waiting FLUSH TABLES WITH READ LOCK (connection %d): %w", m.connID, err)
	}
	return nil
}

// Thaw releases the lock and closes the connection. A connection that
// died during the window lost the lock with it: Thaw then says so
// (ErrLost).
func (m *MySQL) Thaw(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.conn == nil { // no lock: Freeze failed, or Thaw ran already
		return nil
	}
	_, err := m.conn.ExecContext(ctx, "UNLOCK TABLES")
	m.closeLocked() // releases the lock whatever UNLOCK said
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("UNLOCK TABLES: %w (the connection is closed, which releases the lock)", ctxErr(ctx, err))
	}
	return fmt.Errorf("UNLOCK TABLES: the lock was lost with its connection during the window (%w): %w", ErrLost, err)
}

func (m *MySQL) closeLocked() {
	if m.conn != nil {
		_ = m.conn.Close()
		m.conn = nil
	}
	if m.db != nil {
		_ = m.db.Close()
		m.db = nil
	}
}
