package writer

import (
	"fmt"
	"strings"
)

// Parse returns the writer a --writer flag names, KIND or KIND:DSN:
//
//	postgresql           the server on DefaultPostgreSQLHost (/var/run/postgresql)
//	postgresql:DSN       a libpq connection string or URL ("host=/run/pg user=backup",
//	                     "postgres://backup@db.example:5433/postgres"), or a socket folder
//	mariadb, mysql       the server on DefaultMySQLSocket (/run/mysqld/mysqld.sock)
//	mariadb:DSN          a Go MySQL driver DSN ("backup:pw@unix(/run/mysqld/mysqld.sock)/",
//	mysql:DSN            "backup:pw@tcp(db.example:3306)/"), or a socket path
//
// KIND is case-insensitive, and "postgres" is "postgresql". Everything
// after the first colon is the DSN, verbatim. See NewPostgreSQL and
// NewMySQL for the defaults of what a DSN leaves out (the user is the OS
// user's name). Hooks are not named here: --pre-freeze and --post-thaw
// build a Hooks.
func Parse(spec string) (Writer, error) {
	kind, dsn, hasDSN := strings.Cut(spec, ":")
	kind = strings.ToLower(strings.TrimSpace(kind))
	if hasDSN && dsn == "" {
		return nil, fmt.Errorf("writer %q: empty DSN after the colon (leave out the colon for the default)", spec)
	}
	switch kind {
	case "postgresql", "postgres":
		w, err := NewPostgreSQL(dsn)
		if err != nil {
			return nil, err
		}
		return w, nil
	case "mariadb", "mysql":
		w, err := NewMySQL(kind, dsn)
		if err != nil {
			return nil, err
		}
		return w, nil
	}
	return nil, fmt.Errorf("unknown writer %q: want postgresql, mariadb or mysql, each optionally followed by :DSN", kind)
}
