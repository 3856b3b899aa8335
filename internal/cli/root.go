// Package cli is sauve's command line: commands, flags, environment
// variables, text and --json output, passphrase prompts and progress bars.
// It turns arguments into calls of the pipeline packages and nothing more.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/sauve-backup/sauve/internal/zstdenc"
)

// Version is set at build time with -ldflags "-X ...cli.Version=...".
var Version = "0.1.0-dev"

// globals are the flags every command shares.
type globals struct {
	repo        string
	keyFile     string
	json        bool
	quiet       bool
	noCache     bool
	cacheDir    string
	connections int
	compression string
	level       int // compression, parsed
	progress    string
	s3Endpoint  string
	s3PathStyle bool
	netTimeout  time.Duration
	retryDelay  time.Duration

	usingDefault bool // no --repo or SAUVE_REPO: the default repository
	// keyNames name --key and its variables in messages (zero: the
	// target's; the source of a copy has its own).
	keyNames keyNames

	stdout io.Writer
	stderr io.Writer
}

// usageError marks mistakes in the command line (exit status 2).
type usageError struct{ error }

// ExitError carries an exit status without a message of its own (the
// command printed its report already).
type ExitError struct{ Code int }

func (e *ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

// Main runs the command line and returns the exit status.
func Main(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return Run(ctx, args, os.Stdout, os.Stderr)
}

// Run runs the command line with its output on stdout and stderr and
// returns the exit status; ctx ends it as Ctrl-C does.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	g := &globals{stdout: stdout, stderr: stderr}
	root := newRoot(g)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		return ee.Code
	}
	if errors.Is(err, context.Canceled) {
		fmt.Fprintln(g.stderr, "sauve: interrupted")
		return 130
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(g.stderr, "sauve: %v\nRun 'sauve --help' for usage.\n", err)
		return 2
	}
	if g.json {
		_ = json.NewEncoder(g.stdout).Encode(map[string]string{"error": err.Error()})
	}
	fmt.Fprintf(g.stderr, "sauve: error: %v\n", err)
	var ce codedError
	if errors.As(err, &ce) {
		return ce.code
	}
	return 1
}

// codedError is a failure that ends sauve with another status than 1:
// diff's 2, as diff(1) and cmp(1), where 1 means "they differ".
type codedError struct {
	error
	code int
}

func (e codedError) Unwrap() error { return e.error }

func newRoot(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:   "sauve",
		Short: "Block-level backup, restore and migration of whole disks",
		Long: `sauve backs up disks, partitions and disk images into a deduplicating,
encrypted repository. Every backup is a full restore point but stores only
the chunks that changed.

The repository is given with --repo or $SAUVE_REPO; without either, it is
~/.local/share/sauve/repo ($XDG_DATA_HOME/sauve/repo), which the first
backup creates. It may be:

  /srv/backup/sauve, file:///srv/backup/sauve      a folder
  'https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX]?sp=...&sig=...'
                            an Azure SAS URL, as the portal gives it
  azure://ACCOUNT/CONTAINER[/PREFIX]     with $AZURE_STORAGE_KEY,
                            $AZURE_STORAGE_CONNECTION_STRING or $AZURE_STORAGE_SAS_TOKEN
  s3://BUCKET[/PREFIX]      with $AWS_ACCESS_KEY_ID, $AWS_SECRET_ACCESS_KEY,
                            $AWS_REGION; --s3-endpoint or $AWS_ENDPOINT_URL
                            for S3-compatible services
  sftp://USER@HOST[:PORT]/PATH   with ssh-agent or ~/.ssh/id_* ($SAUVE_SSH_KEY)
                            and ~/.ssh/known_hosts

docs/PERMISSIONS.md lists the rights each command needs.

The repository's key is found with --key, $SAUVE_KEY, or in
$XDG_CONFIG_HOME/sauve/keys/<repository id>.key where 'sauve init' puts it.
A passphrase-protected key reads its passphrase from $SAUVE_PASSPHRASE,
$SAUVE_PASSPHRASE_FILE, or the terminal.`,
		Example: `  export SAUVE_REPO=/srv/backup/sauve
  sauve init
  sauve backup /dev/vda --tag nightly
  sauve snapshots
  sauve restore latest /dev/vdb
  sauve backup /dev/vda --repo 'https://acct.blob.core.windows.net/backups?sp=rcwl&se=2027-01-01&sig=...'`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       Version,
	}
	root.SetOut(g.stdout)
	root.SetErr(g.stderr)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return usageError{err} })
	pf := root.PersistentFlags()
	pf.StringVarP(&g.repo, "repo", "r", os.Getenv("SAUVE_REPO"), "repository: a folder, azure://ACCOUNT/CONTAINER, an Azure SAS URL, s3://BUCKET or sftp://USER@HOST/PATH ($SAUVE_REPO; default ~/.local/share/sauve/repo)")
	pf.StringVar(&g.keyFile, "key", os.Getenv("SAUVE_KEY"), "key file ($SAUVE_KEY; default: the one 'sauve init' saved for this repository)")
	pf.BoolVar(&g.json, "json", false, "print results as JSON on stdout")
	pf.BoolVarP(&g.quiet, "quiet", "q", false, "print nothing but errors (and --json output)")
	pf.StringVar(&g.cacheDir, "cache-dir", os.Getenv("SAUVE_CACHE_DIR"), "local cache of index and chunk lists ($SAUVE_CACHE_DIR; default $XDG_CACHE_HOME/sauve)")
	pf.BoolVar(&g.noCache, "no-cache", false, "do not use the local cache")
	pf.IntVar(&g.connections, "connections", 0, "objects transferred at once (default: 2 for a folder, 4 for Azure, S3 and SFTP)")
	pf.StringVar(&g.compression, "compression", os.Getenv("SAUVE_COMPRESSION"), "zstd level of the chunks a command stores: fast (level 1, the default), better (3), max (9: the smallest, 4-5x the CPU), or 1 to 19 ($SAUVE_COMPRESSION)")
	pf.StringVar(&g.s3Endpoint, "s3-endpoint", "", "S3-compatible service URL, e.g. http://127.0.0.1:9000 (default $AWS_ENDPOINT_URL, else AWS)")
	pf.BoolVar(&g.s3PathStyle, "s3-path-style", false, "address S3 buckets as ENDPOINT/BUCKET (implied for IP and localhost endpoints)")
	pf.DurationVar(&g.netTimeout, "net-timeout", 0, "fail and retry a network transfer that makes no progress for this long (default 1m)")
	pf.StringVar(&g.progress, "progress", "auto", "progress bar on stderr: auto (when stderr is a terminal), always, never")

	// Hidden: profiles for docs/BENCHMARKS.md.
	var prof profiles
	pf.StringVar(&prof.cpu, "cpu-profile", "", "write a CPU profile (pprof) to this file")
	pf.StringVar(&prof.mem, "mem-profile", "", "write a heap profile (pprof) at exit to this file")
	pf.StringVar(&prof.trace, "trace", "", "write an execution trace (go tool trace) to this file")
	// Hidden: tests that inject faults shorten the pauses between retries.
	pf.DurationVar(&g.retryDelay, "retry-max-delay", 0, "longest pause between retries (default 30s)")
	_ = pf.MarkHidden("retry-max-delay")
	_ = pf.MarkHidden("cpu-profile")
	_ = pf.MarkHidden("mem-profile")
	_ = pf.MarkHidden("trace")
	var stopProfile func()
	root.PersistentPreRunE = func(cmd *cobra.Command, args []string) error {
		var err error
		if g.level, err = zstdenc.ParseLevel(g.compression); err != nil {
			return usageError{err}
		}
		stopProfile, err = startProfiles(prof)
		return err
	}
	root.PersistentPostRun = func(cmd *cobra.Command, args []string) {
		if stopProfile != nil {
			stopProfile()
		}
	}

	root.AddCommand(newInitCmd(g), newBackupCmd(g), newSnapshotsCmd(g), newRestoreCmd(g), newCheckCmd(g), newKeyCmd(g))
	root.AddCommand(newShowCmd(g), newRepairCmd(g), newPruneCmd(g))
	root.AddCommand(newExportCmd(g), newConvertCmd(g), newServeCmd(g), newMountCmd(g))
	root.AddCommand(newCopyCmd(g), newMigrateCmd(g))
	root.AddCommand(newThawGuardCmd())
	addMigrateRemote(root)
	root.AddCommand(newAgentCmd(g))
	root.AddCommand(newForgetCmd(g))
	root.AddCommand(newStatsCmd(g))
	root.AddCommand(newLsCmd(g), newGetCmd(g), newFindCmd(g), newDiffCmd(g))
	return root
}

// showProgress says whether to draw progress bars.
func (g *globals) showProgress() bool {
	switch g.progress {
	case "always":
		return true
	case "never":
		return false
	}
	if g.quiet {
		return false
	}
	f, ok := g.stderr.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// printf prints human output unless --quiet or --json.
func (g *globals) printf(format string, args ...any) {
	if g.quiet || g.json {
		return
	}
	fmt.Fprintf(g.stdout, format, args...)
}

// warnf prints a warning on stderr unless --quiet.
func (g *globals) warnf(format string, args ...any) {
	if g.quiet {
		return
	}
	fmt.Fprintf(g.stderr, "sauve: warning: "+format+"\n", args...)
}

// warn is warnf for one message: the callback that library packages
// report warnings through.
func (g *globals) warn(msg string) { g.warnf("%s", msg) }

func (g *globals) printJSON(v any) error {
	enc := json.NewEncoder(g.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// exactArgs is cobra.ExactArgs with a usage error.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError{fmt.Errorf("%s: expects %s", cmd.CommandPath(), what)}
		}
		return nil
	}
}
