package writer

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
)

// A Declarer is a Writer that names the paths its application needs in
// the copy, as a VSS writer declares its components: a database's data
// and WAL directories and tablespaces. A snapshot set missing one of
// them would not restore the application, and is refused.
type Declarer interface {
	Volumes(ctx context.Context) ([]Volume, error)
}

// Volume is one path an application needs, and what it is to it.
type Volume struct {
	Path string // absolute, symlinks resolved
	What string // "data directory", "WAL", "tablespace NAME"
}

// Volumes asks the server for its data directory, its WAL directory
// (pg_wal, often a symlink to another disk) and its tablespaces. The
// paths are the server's: meaningful where sauve runs beside it.
func (p *PostgreSQL) Volumes(ctx context.Context) ([]Volume, error) {
	conn, err := pgx.ConnectConfig(ctx, p.cfg.Copy())
	if err != nil {
		return nil, fmt.Errorf("connect as %q: %w", p.cfg.User, ctxErr(ctx, err))
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var data string
	if err := conn.QueryRow(ctx, "SHOW data_directory").Scan(&data); err != nil {
		return nil, fmt.Errorf("SHOW data_directory (the role needs pg_read_all_settings or superuser): %w", err)
	}
	vols := []Volume{{Path: data, What: "data directory"}, {Path: filepath.Join(data, "pg_wal"), What: "WAL"}}
	rows, err := conn.Query(ctx, "SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace WHERE pg_tablespace_location(oid) <> ''")
	if err != nil {
		return nil, fmt.Errorf("list the tablespaces: %w", err)
	}
	for rows.Next() {
		var name, loc string
		if err := rows.Scan(&name, &loc); err != nil {
			rows.Close()
			return nil, fmt.Errorf("list the tablespaces: %w", err)
		}
		vols = append(vols, Volume{Path: loc, What: "tablespace " + name})
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list the tablespaces: %w", err)
	}
	for i := range vols {
		// pg_wal and tablespaces are symlinks where they live elsewhere.
		if r, err := filepath.EvalSymlinks(vols[i].Path); err == nil {
			vols[i].Path = r
		}
	}
	return vols, nil
}

// MissingVolume returns an error naming the first volume of the set's
// Declarers that holds is not true of, nil when every one is covered. A
// writer that cannot be asked fails it under Abort; under Degrade it is
// skipped, since its freeze fails the same way and degrades the snapshot.
func (s *Set) MissingVolume(ctx context.Context, holds func(path string) (bool, error)) error {
	for _, w := range s.Writers {
		d, ok := w.(Declarer)
		if !ok {
			continue
		}
		vols, err := d.Volumes(ctx)
		if err != nil && s.Policy == Degrade {
			continue
		}
		if err != nil {
			return fmt.Errorf("ask %s which volumes it needs: %w", w.Name(), err)
		}
		for _, v := range vols {
			ok, err := holds(v.Path)
			if err != nil {
				return fmt.Errorf("%s needs %s (%s): %w", w.Name(), v.Path, v.What, err)
			}
			if !ok {
				return fmt.Errorf("%s needs %s (its %s), which is on no disk of this backup: the copy would not restore it; back up that disk too", w.Name(), v.Path, v.What)
			}
		}
	}
	return nil
}

// OnFilesystems is the holds of MissingVolume for a copy of the
// filesystems mounted at mounts: true for a path on one of them.
func OnFilesystems(mounts []string) func(path string) (bool, error) {
	return func(path string) (bool, error) {
		fi, err := os.Stat(path)
		if err != nil {
			return false, err
		}
		for _, m := range mounts {
			if mi, err := os.Stat(m); err == nil && devOf(mi) == devOf(fi) {
				return true, nil
			}
		}
		return false, nil
	}
}

// Volumes asks the server for its data directory and, where they are set
// apart from it, InnoDB's data and redo log directories. The paths are
// the server's: meaningful where sauve runs beside it.
func (m *MySQL) Volumes(ctx context.Context) ([]Volume, error) {
	connector, err := mysql.NewConnector(m.cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	db := sql.OpenDB(connector)
	defer db.Close()
	var datadir, dataHome, logHome sql.NullString
	err = db.QueryRowContext(ctx, "SELECT @@datadir, @@innodb_data_home_dir, @@innodb_log_group_home_dir").Scan(&datadir, &dataHome, &logHome)
	if err != nil {
		return nil, fmt.Errorf("ask %s for its directories (as %q): %w", m.name, m.cfg.User, ctxErr(ctx, err))
	}
	vols := []Volume{{Path: datadir.String, What: "data directory"}}
	for _, v := range []struct {
		dir  sql.NullString
		what string
	}{{dataHome, "InnoDB data"}, {logHome, "InnoDB redo log"}} {
		if p := v.dir.String; p != "" && p != "./" && filepath.IsAbs(p) {
			vols = append(vols, Volume{Path: p, What: v.what})
		}
	}
	for i := range vols {
		if r, err := filepath.EvalSymlinks(vols[i].Path); err == nil {
			vols[i].Path = r
		}
	}
	return vols, nil
}
