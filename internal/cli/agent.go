package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sauve-backup/sauve/internal/agent"
	"github.com/sauve-backup/sauve/internal/agent/writer"
)

// Where the agent keeps its files by default (the systemd unit in
// contrib/ uses the same).
const (
	agentDir            = "/etc/sauve/agent"
	agentKeyPath        = agentDir + "/key"
	agentAuthorizedPath = agentDir + "/authorized_keys"
	agentStatePath      = "/run/sauve-agent/state.json"
)

func newAgentCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the quiescing agent in a guest or on a database host, and manage its keys",
		Long: `The agent runs on the machine whose filesystems a backup must catch at rest
(a VM guest, a database host). A backup connects to it, both sides prove
their Ed25519 keys, the backup asks it to freeze, takes its point-in-time
copy, and asks it to thaw. The agent freezes the --mount filesystems
(fsfreeze), answers with what it froze, and always thaws: when asked, when
the window ends (10s by default), when the connection drops, and when it
is stopped or killed (a guard process thaws even after kill -9; a state
file lets the next start thaw what a crash left).

It listens on TCP with TLS (--listen), and on a QEMU guest's virtio-serial
port (--serial); the backup side reaches the latter through the unix
socket of the VM's chardev. Both carry the same signed protocol
(docs/AGENT.md), which a recorded exchange cannot replay.

Keys: the agent has its own key pair (keygen), and authorized_keys lists
the callers' public keys, each with options: from="10.0.0.0/8,serial"
(where it may connect from; "serial" is the virtio-serial port) and
window=30s (the longest freeze it may ask). The caller has its own key
pair, and checks the agent's key: given (--agent-key), or from a
known-agents file, recorded on first use only with --trust-new.

Every request, accepted or refused, is logged as a JSON line with the
caller's key fingerprint, its address and the outcome.`,
		Example: `  # On the guest:
  sauve agent keygen                       # /etc/sauve/agent/key and key.pub
  sauve agent authorize 'sauve-ed25519 AAAA... backup@vmhost' --from 192.168.122.1,serial --window 30s
  sauve agent run --listen tcp:0.0.0.0:7412 --mount /srv/db
  # On the backup host:
  sauve agent keygen --out ~/.config/sauve/agent/caller.key
  sauve agent freeze 192.168.122.10:7412 --agent-key /tmp/guest-key.pub --hold 2s`,
	}
	cmd.AddCommand(newAgentKeygenCmd(g), newAgentAuthorizeCmd(g), newAgentRunCmd(g), newAgentFreezeCmd(g))
	return cmd
}

func newAgentKeygenCmd(g *globals) *cobra.Command {
	var out, comment string
	cmd := &cobra.Command{
		Use:   "keygen",
		Short: "Make a key pair for an agent or a caller",
		Long: `Write a new Ed25519 private key to --out (mode 0600; an existing file is
never replaced) and its public key to --out.pub, and print the public key
line. The same command makes the agent's key (default path) and a
caller's: give the agent's public key line to the callers (--agent-key),
and a caller's to 'sauve agent authorize' on the agent.`,
		Example: `  sauve agent keygen
  sauve agent keygen --out ~/.config/sauve/agent/caller.key --comment backup@vmhost`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if comment == "" {
				comment = defaultComment()
			}
			if strings.ContainsAny(comment, "\n\r") {
				return usageError{errors.New("--comment: one line")}
			}
			priv, err := agent.GenerateKey()
			if err != nil {
				return err
			}
			pub := agent.PublicOf(priv)
			if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
				return fmt.Errorf("create the folder of %s: %w", out, err)
			}
			if _, err := os.Stat(out + ".pub"); err == nil {
				return fmt.Errorf("%s.pub exists already: not overwritten", out)
			}
			if err := agent.WritePrivateKey(out, priv); err != nil {
				return err
			}
			if err := os.WriteFile(out+".pub", []byte(pub.Line(comment)+"\n"), 0o644); err != nil {
				return fmt.Errorf("write the public key: %w", err)
			}
			if g.json {
				return g.printJSON(map[string]string{"private_key": out, "public_key": pub.Line(comment), "public_key_file": out + ".pub", "fingerprint": pub.Fingerprint()})
			}
			fmt.Fprintln(g.stdout, pub.Line(comment))
			if !g.quiet {
				fmt.Fprintf(g.stderr, "private key %s (keep it secret), public key %s, fingerprint %s\n", out, out+".pub", pub.Fingerprint())
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", agentKeyPath, "private key file to write (the public key goes to FILE.pub)")
	cmd.Flags().StringVar(&comment, "comment", "", "comment of the public key line (default: USER@HOST)")
	return cmd
}

// defaultComment is USER@HOST.
func defaultComment() string {
	host, _ := os.Hostname()
	if u, err := user.Current(); err == nil {
		return u.Username + "@" + host
	}
	return host
}

func newAgentAuthorizeCmd(g *globals) *cobra.Command {
	var from, file, comment string
	var window time.Duration
	cmd := &cobra.Command{
		Use:   "authorize PUBKEY",
		Short: "Allow a caller's key to ask the agent for freezes",
		Long: `Append a caller's public key to the agent's authorized keys (--file). PUBKEY
is the line that the caller's 'sauve agent keygen' printed, or its .pub
file. A key listed already is refused: edit its line to change it.

--from limits where the key is accepted from: IP addresses and CIDR
prefixes, and "serial" for the virtio-serial port (host names are not
accepted). --window is the longest freeze the key may ask (at most 1h);
without it, the agent's --max-window. The running agent reads the file at
every connection: no restart needed.`,
		Example: `  sauve agent authorize 'sauve-ed25519 AAAA... backup@vmhost'
  sauve agent authorize /tmp/caller.key.pub --from 10.0.0.0/8,192.168.1.5 --window 30s
  sauve agent authorize /tmp/caller.key.pub --from serial`,
		Args: exactArgs(1, "the caller's PUBKEY (its line, or its .pub file)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			key, keyComment, err := agent.ReadPublicKeyArg(args[0])
			if err != nil {
				return usageError{err}
			}
			a := agent.AuthorizedKey{Key: key, Comment: keyComment}
			if comment != "" {
				a.Comment = comment
			}
			if strings.ContainsAny(a.Comment, "\n\r") {
				return usageError{errors.New("--comment: one line")}
			}
			if cmd.Flags().Changed("from") {
				if a.From, a.Serial, err = agent.ParseFrom(from); err != nil {
					return usageError{fmt.Errorf("--from: %w", err)}
				}
			}
			if cmd.Flags().Changed("window") {
				if window <= 0 || window > agent.MaxWindow {
					return usageError{fmt.Errorf("--window %s: choose more than 0 and at most %s", window, agent.MaxWindow)}
				}
				a.Window = window
			}
			if err := agent.AppendAuthorized(file, a); err != nil {
				return err
			}
			if g.json {
				return g.printJSON(map[string]string{"file": file, "line": a.String(), "fingerprint": key.Fingerprint()})
			}
			g.printf("%s\n", a.String())
			if !g.quiet && !g.json {
				fmt.Fprintf(g.stderr, "key %s added to %s\n", key.Fingerprint(), file)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&from, "from", "", `addresses the key is accepted from: IPs, CIDR prefixes, "serial" (comma-separated; default: anywhere)`)
	f.DurationVar(&window, "window", 0, "longest freeze the key may ask (default: the agent's --max-window)")
	f.StringVar(&file, "file", agentAuthorizedPath, "the authorized-keys file")
	f.StringVar(&comment, "comment", "", "comment of the line (default: the public key's)")
	return cmd
}

// agentRunFlags are run's flags.
type agentRunFlags struct {
	listen, serial, mounts       []string
	writers, preFreeze, postThaw []string
	key, authorized, log, state  string
	window, maxWindow, handshake time.Duration
}

func newAgentRunCmd(g *globals) *cobra.Command {
	var o agentRunFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Serve freeze requests until SIGTERM or SIGINT",
		Long: `Serve authenticated freeze requests on --listen (TCP, with TLS) and --serial
(a virtio-serial port in a QEMU guest) until SIGTERM or SIGINT, which
thaw first.

A freeze freezes the --mount filesystems in order (FIFREEZE, as fsfreeze
does) under a thaw guard, a process of its own that thaws them when
asked, at the end of the window, and when the agent dies, even by
kill -9. Before freezing, the agent records what it freezes in --state,
and a start that finds the file thaws what it lists: a crash that took
the guard too is undone by the restart (systemd's Restart=on-failure).
One freeze at a time; another caller is refused and told who holds it.

The window of a freeze is what the caller asks, --window when it asks
none; never more than its key's window= option, or --max-window for a
key without one. Every request, accepted or refused, is one JSON line on
--log (default stderr, which journald collects under systemd). The log
is written from a queue: a log file on a frozen filesystem never holds
the agent (lines are dropped, and counted, if it cannot keep up).

Keep --state on a filesystem that is never frozen: /run, the default.`,
		Example: `  sauve agent run --listen tcp:0.0.0.0:7412 --mount /srv/db --mount /srv/wal
  sauve agent run --serial /dev/virtio-ports/org.sauve.agent.0 --mount / --window 5s
  sauve agent run --listen tcp:[::]:7412 --serial /dev/virtio-ports/org.sauve.agent.0 --mount /var/lib/postgresql --log /var/log/sauve-agent.log`,
		Args: exactArgs(0, "no arguments (give --listen and/or --serial)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.agentRun(cmd.Context(), &o)
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&o.listen, "listen", nil, "TCP address to serve with TLS: tcp:HOST:PORT or HOST:PORT (repeatable; e.g. tcp:0.0.0.0:7412)")
	f.StringArrayVar(&o.serial, "serial", nil, "virtio-serial port to serve, e.g. /dev/virtio-ports/org.sauve.agent.0 (repeatable)")
	f.StringArrayVar(&o.mounts, "mount", nil, "mount point of a filesystem to freeze (repeatable; frozen in the order given, thawed in reverse)")
	f.StringArrayVar(&o.writers, "writer", nil, "flush and hold an application before the filesystems freeze (repeatable): postgresql[:DSN], mariadb[:DSN], mysql[:DSN]")
	f.StringArrayVar(&o.preFreeze, "pre-freeze", nil, "run this shell command before the writers and filesystems freeze (repeatable)")
	f.StringArrayVar(&o.postThaw, "post-thaw", nil, "run this shell command after they thaw (repeatable; it always runs once a pre-freeze command has started)")
	f.StringVar(&o.key, "key", agentKeyPath, "the agent's private key ('sauve agent keygen')")
	f.StringVar(&o.authorized, "authorized", agentAuthorizedPath, "the callers' keys ('sauve agent authorize'); read at every connection")
	f.StringVar(&o.log, "log", "", "append the JSON-lines log to this file (default: stderr)")
	f.StringVar(&o.state, "state", agentStatePath, "where a freeze in progress is recorded, for a restart to thaw")
	f.DurationVar(&o.window, "window", agent.DefaultWindow, "window of a freeze whose caller asks none")
	f.DurationVar(&o.maxWindow, "max-window", agent.DefaultMaxWindow, "longest window a key without a window= option may ask")
	f.DurationVar(&o.handshake, "handshake-timeout", agent.DefaultHandshake, "longest time a caller may take to authenticate")
	_ = f.MarkHidden("handshake-timeout")
	return cmd
}

// agentRun is 'sauve agent run'.
func (g *globals) agentRun(ctx context.Context, o *agentRunFlags) error {
	if len(o.listen) == 0 && len(o.serial) == 0 {
		return usageError{errors.New("agent run: give --listen tcp:HOST:PORT and/or --serial PATH")}
	}
	var hostPorts []string
	for _, l := range o.listen {
		hp := strings.TrimPrefix(l, "tcp:")
		if _, _, err := net.SplitHostPort(hp); err != nil {
			return usageError{fmt.Errorf("--listen %q: want tcp:HOST:PORT or HOST:PORT, such as tcp:0.0.0.0:%d", l, agent.DefaultPort)}
		}
		hostPorts = append(hostPorts, hp)
	}
	mounts, err := agentMounts(o.mounts)
	if err != nil {
		return usageError{err}
	}
	for _, p := range o.serial {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("--serial %s: %w (is the VM given a virtserialport with this name?)", p, err)
		}
	}
	key, err := agent.LoadPrivateKey(o.key)
	if err != nil {
		return fmt.Errorf("%w (make one with 'sauve agent keygen --out %s')", err, o.key)
	}
	if _, err := agent.LoadAuthorized(o.authorized); err != nil {
		return err
	}
	logOut, closeLog, err := openAgentLog(o.log, g.stderr)
	if err != nil {
		return err
	}
	lw := agent.NewLogWriter(logOut)
	defer func() {
		lw.Close(2 * time.Second)
		closeLog()
	}()
	log := agent.NewLogger(lw)

	steps, err := o.writerSteps(mounts)
	if err != nil {
		return err
	}
	chain := &agent.Chain{StateFile: o.state, Steps: append(steps, &agent.MountStep{
		Mounts: mounts,
		Warn:   func(s string) { log.Warn("freeze", "warning", s) },
	})}
	if done, err := chain.Recover(ctx); err != nil {
		log.Error("recover", "outcome", "failed", "reason", err.Error())
	} else if len(done) > 0 {
		log.Warn("recover", "outcome", "thawed", "reason", "an earlier run died while frozen", "steps", done)
	}
	host, _ := os.Hostname()
	srv, err := agent.NewServer(agent.Config{
		Key:              key,
		Authorized:       func() (*agent.AuthorizedKeys, error) { return agent.LoadAuthorized(o.authorized) },
		Freezer:          chain,
		Log:              log,
		DefaultWindow:    o.window,
		MaxWindow:        o.maxWindow,
		HandshakeTimeout: o.handshake,
		Host:             host,
		Version:          "sauve " + Version,
	})
	if err != nil {
		return usageError{err}
	}
	var listeners []net.Listener
	for _, hp := range hostPorts {
		ln, err := net.Listen("tcp", hp)
		if err != nil {
			for _, ln := range listeners {
				ln.Close()
			}
			return fmt.Errorf("--listen %s: %w", hp, err)
		}
		listeners = append(listeners, ln)
	}
	if len(mounts) == 0 && len(steps) == 0 {
		log.Warn("start", "warning", "no --mount, --writer or hook: a freeze freezes nothing")
	} else if os.Geteuid() != 0 {
		log.Warn("start", "warning", "not root: freezing filesystems needs CAP_SYS_ADMIN")
	}
	var names []string
	for _, ln := range listeners {
		names = append(names, "tcp:"+ln.Addr().String())
	}
	log.Info("start", "key", srv.PublicKey().Fingerprint(), "listen", names, "serial", o.serial, "mounts", mounts,
		"window", o.window.String(), "max_window", o.maxWindow.String(), "authorized", o.authorized, "pid", os.Getpid())

	// Each server thaws what its sessions froze before it returns, when
	// ctx ends (SIGTERM, SIGINT).
	var wg sync.WaitGroup
	errs := make(chan error, len(listeners)+len(o.serial))
	for _, ln := range listeners {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.ServeTLS(ctx, ln); err != nil {
				errs <- err
			}
		}()
	}
	for _, p := range o.serial {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.ServeSerial(ctx, p); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	log.Info("stop", "reason", "signal")
	if err, ok := <-errs; ok {
		return err
	}
	return nil
}

// agentMounts checks the --mount list: absolute, existing, each once.
func agentMounts(in []string) ([]string, error) {
	var out []string
	for _, m := range in {
		if !filepath.IsAbs(m) {
			return nil, fmt.Errorf("--mount %q: give the mount point's absolute path", m)
		}
		m = filepath.Clean(m)
		if fi, err := os.Stat(m); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("--mount %s: not a directory (%v)", m, err)
		}
		for _, o := range out {
			if o == m {
				return nil, fmt.Errorf("--mount %s is given twice", m)
			}
		}
		out = append(out, m)
	}
	return out, nil
}

// openAgentLog opens the log: a file opened for appending, or stderr.
func openAgentLog(path string, stderr io.Writer) (io.Writer, func(), error) {
	if path == "" || path == "-" {
		return stderr, func() {}, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, nil, fmt.Errorf("--log: %w", err)
	}
	return f, func() { f.Close() }, nil
}

// agentCallerFlags are the flags of a command that calls an agent; the
// backup's --quiesce agent:// can add them too, naming the key's flag
// otherwise than --key, which is the repository's key there.
type agentCallerFlags struct {
	key, agentKey, known string
	trustNew             bool
	timeout              time.Duration
}

func (a *agentCallerFlags) add(f *pflag.FlagSet, keyFlag string) {
	f.StringVar(&a.key, keyFlag, "", "the caller's private key ('sauve agent keygen'; default $XDG_CONFIG_HOME/sauve/agent/caller.key)")
	f.StringVar(&a.agentKey, "agent-key", "", "the agent's public key: its line, or its .pub file (instead of --known)")
	f.StringVar(&a.known, "known", "", "known-agents file: the agents' keys by address (default $XDG_CONFIG_HOME/sauve/agent/known_agents)")
	f.BoolVar(&a.trustNew, "trust-new", false, "accept and record the key of an agent that --known does not list (first use: not authenticated)")
	f.DurationVar(&a.timeout, "agent-timeout", agent.DefaultClientTimeout, "longest wait to connect and authenticate to the agent")
}

// config reads the keys the flags name.
func (a *agentCallerFlags) config() (agent.ClientConfig, error) {
	cfg := agent.ClientConfig{TrustNew: a.trustNew, Timeout: a.timeout}
	keyPath, known := a.key, a.known
	if keyPath == "" || (known == "" && a.agentKey == "") {
		dir, err := configDir()
		if err != nil {
			return cfg, err
		}
		if keyPath == "" {
			keyPath = filepath.Join(dir, "agent", "caller.key")
		}
		if known == "" && a.agentKey == "" {
			known = filepath.Join(dir, "agent", "known_agents")
		}
	}
	key, err := agent.LoadPrivateKey(keyPath)
	if err != nil {
		return cfg, fmt.Errorf("%w (make one with 'sauve agent keygen --out %s')", err, keyPath)
	}
	cfg.Key = key
	if a.agentKey != "" {
		if a.known != "" || a.trustNew {
			return cfg, usageError{errors.New("--agent-key pins the agent's key: --known and --trust-new do not apply")}
		}
		k, _, err := agent.ReadPublicKeyArg(a.agentKey)
		if err != nil {
			return cfg, usageError{fmt.Errorf("--agent-key: %w", err)}
		}
		cfg.AgentKey = k
		return cfg, nil
	}
	cfg.KnownFile = known
	return cfg, nil
}

func newAgentFreezeCmd(g *globals) *cobra.Command {
	var c agentCallerFlags
	var window, hold time.Duration
	cmd := &cobra.Command{
		Use:   "freeze ADDRESS",
		Short: "Ask an agent to freeze, print what it froze, then thaw (a test of the agent)",
		Long: `Connect to the agent at ADDRESS (HOST:PORT, tcp:HOST:PORT, agent://HOST:PORT,
or unix:PATH for the host side of a VM's virtio-serial chardev),
authenticate both ways, ask for a freeze of --window (default: the
agent's), print what it froze, wait --hold, ask the thaw and print
whether the freeze held. The exit status is 1 when it did not (the window
ended first): a backup would then not be application-consistent.

The agent's key is checked: --agent-key gives it, else the known-agents
file lists it by address; --trust-new records the key of an agent it
does not list yet (trust on first use: that first connection proves
nothing).`,
		Example: `  sauve agent freeze 10.0.0.5:7412 --key caller.key --agent-key guest-key.pub
  sauve agent freeze db1:7412 --known /etc/sauve/known_agents --trust-new --window 5s --hold 2s
  sauve agent freeze unix:/run/vm1-agent.sock --agent-key guest-key.pub --json`,
		Args: exactArgs(1, "the agent's ADDRESS"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := c.config()
			if err != nil {
				return err
			}
			return g.agentFreeze(cmd.Context(), args[0], cfg, window, hold)
		},
	}
	// --key shadows the global --key (the repository's), which freeze
	// does not use.
	c.add(cmd.Flags(), "key")
	cmd.Flags().DurationVar(&window, "window", 0, "longest freeze to ask (default: the agent's)")
	cmd.Flags().DurationVar(&hold, "hold", 0, "how long to stay frozen before the thaw (where a backup takes its copy)")
	return cmd
}

// agentFreeze is 'sauve agent freeze'.
func (g *globals) agentFreeze(ctx context.Context, addr string, cfg agent.ClientConfig, window, hold time.Duration) error {
	s, err := agent.Dial(ctx, addr, cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	info := s.Info()
	g.printf("agent %s: %s on %s, key %s; windows %s by default, at most %s for this key\n",
		s.Addr(), info.Agent, info.Host, info.Key.Fingerprint(), info.DefaultWindow, info.MaxWindow)
	rep, err := s.Freeze(ctx, window)
	if err != nil {
		return err
	}
	what := strings.Join(rep.Mounts, ", ")
	if len(rep.Writers) > 0 {
		var ws []string
		for _, w := range rep.Writers {
			ws = append(ws, w.Name)
		}
		what = strings.TrimSuffix("writers "+strings.Join(ws, ", ")+"; "+what, "; ")
	}
	if what == "" {
		what = "nothing"
	}
	g.printf("frozen: %s (took %s, window %s)\n", what, rep.Took.Round(time.Millisecond), rep.Window)
	if hold > 0 {
		select {
		case <-time.After(hold):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	th, terr := s.Thaw(ctx)
	if g.json {
		if err := g.printJSON(map[string]any{"agent": s.Addr(), "agent_key": info.Key.Fingerprint(), "frozen": rep, "thawed": th}); err != nil {
			return err
		}
	}
	if terr != nil && !errors.Is(terr, agent.ErrNotQuiesced) {
		return terr
	}
	if !th.Held {
		g.printf("thawed (%s) after %s: the freeze did NOT hold until the thaw: %s\n", th.Reason, th.Frozen.Round(time.Millisecond), th.Error)
		return terr
	}
	g.printf("thawed: held for %s\n", th.Frozen.Round(time.Millisecond))
	return nil
}

// writerSteps are the steps of the hooks and writers, frozen in that
// order before the filesystems.
func (o *agentRunFlags) writerSteps(mounts []string) ([]agent.Step, error) {
	var steps []agent.Step
	if len(o.preFreeze) > 0 || len(o.postThaw) > 0 {
		steps = append(steps, agent.WriterStep{W: &writer.Hooks{PreFreeze: o.preFreeze, PostThaw: o.postThaw}})
	}
	for _, spec := range o.writers {
		w, err := writer.Parse(spec)
		if err != nil {
			return nil, usageError{fmt.Errorf("--writer %s: %w", spec, err)}
		}
		steps = append(steps, agent.WriterStep{W: w, Mounts: mounts})
	}
	return steps, nil
}
