package writer

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// DefaultPostgreSQLHost is the folder of the server's unix socket on
// Debian and Ubuntu, where "postgresql" connects.
const DefaultPostgreSQLHost = "/var/run/postgresql"

// sqlstateInsufficientPrivilege is what CHECKPOINT says to a role that may
// not run it.
const sqlstateInsufficientPrivilege = "42501"

// PostgreSQL is the writer of a PostgreSQL server: Freeze connects and runs
// CHECKPOINT, so that the crash recovery a restored copy goes through
// replays only the WAL of the window; nothing is held (see the package
// doc), and Thaw closes the connection, which stays open for the window so
// that pg_stat_activity shows the server's admin who is backing it up
// (application_name "sauve").
//
// The role needs the right to CHECKPOINT: a superuser, or from
// PostgreSQL 15 on a member of pg_checkpoint.
type PostgreSQL struct {
	cfg  *pgx.ConnConfig
	name string

	mu     sync.Mutex
	conn   *pgx.Conn
	detail string
}

// NewPostgreSQL returns the writer of the server dsn names: a libpq
// connection string ("host=/run/postgresql user=backup dbname=postgres")
// or URL ("postgres://backup@db.example/postgres"), or the folder of a unix
// socket ("/var/run/postgresql"). "" is DefaultPostgreSQLHost. As with
// psql, what dsn leaves out comes from the PG* environment variables and
// libpq's defaults: the role is the name of the OS user running sauve, the
// password may come from ~/.pgpass; the database, though, is "postgres"
// rather than the role's name, since CHECKPOINT works from any.
func NewPostgreSQL(dsn string) (*PostgreSQL, error) {
	connString := dsn
	switch {
	case dsn == "":
		connString = "host=" + pgQuote(DefaultPostgreSQLHost)
	case strings.HasPrefix(dsn, "/"):
		connString = "host=" + pgQuote(dsn)
	}
	cfg, err := pgx.ParseConfig(connString)
	if err != nil {
		// pgx's error quotes the string with its password masked.
		return nil, fmt.Errorf("postgresql: %w", err)
	}
	if cfg.Database == "" {
		// CHECKPOINT is the whole cluster's, from any database: do not
		// fail on the missing database of a role's name, as libpq would.
		cfg.Database = "postgres"
	}
	if _, ok := cfg.RuntimeParams["application_name"]; !ok {
		cfg.RuntimeParams["application_name"] = "sauve"
	}
	where := cfg.Host
	if cfg.Port != 5432 {
		where += ":" + strconv.Itoa(int(cfg.Port))
	}
	return &PostgreSQL{cfg: cfg, name: "postgresql (" + where + ")"}, nil
}

// pgQuote quotes a value of a libpq key=value connection string.
func pgQuote(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

// Name is "postgresql (HOST)", with ":PORT" when the port is not 5432.
func (p *PostgreSQL) Name() string { return p.name }

// Detail says how long the last CHECKPOINT took.
func (p *PostgreSQL) Detail() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.detail
}

// Freeze connects and runs CHECKPOINT, both within ctx.
func (p *PostgreSQL) Freeze(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.detail = ""
	p.closeLocked(ctx)
	conn, err := pgx.ConnectConfig(ctx, p.cfg.Copy())
	if err != nil {
		return fmt.Errorf("connect as %q: %w", p.cfg.User, ctxErr(ctx, err))
	}
	p.conn = conn
	t0 := time.Now()
	_, err = conn.Exec(ctx, "CHECKPOINT")
	took := time.Since(t0)
	if err != nil {
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == sqlstateInsufficientPrivilege {
			return fmt.Errorf("CHECKPOINT refused to role %q: it must be a superuser or, from PostgreSQL 15 on, a member of pg_checkpoint (GRANT pg_checkpoint TO %s): %w",
				p.cfg.User, pgx.Identifier{p.cfg.User}.Sanitize(), err)
		}
		return fmt.Errorf("CHECKPOINT (after %.1f s): %w", took.Seconds(), ctxErr(ctx, err))
	}
	p.detail = fmt.Sprintf("CHECKPOINT took %.3f s", took.Seconds())
	return nil
}

// Thaw closes the connection. Nothing is held, so there is nothing to lose
// and nothing to report.
func (p *PostgreSQL) Thaw(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closeLocked(ctx)
	return nil
}

func (p *PostgreSQL) closeLocked(ctx context.Context) {
	if p.conn == nil {
		return
	}
	// Close says goodbye within ctx and closes the socket whatever ctx
	// says; its error changes nothing.
	_ = p.conn.Close(ctx)
	p.conn = nil
}

// ctxErr returns err, or with ctx's error joined when ctx is done and err
// does not already say so, so that the caller can tell a deadline from a
// refusal (drivers wrap their own timeout errors instead).
func ctxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		return fmt.Errorf("%w (%w)", cerr, err)
	}
	return err
}
