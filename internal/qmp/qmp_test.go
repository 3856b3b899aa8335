package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// startQEMU runs a machine-less qemu-system-x86_64 named vm1 with a QMP
// socket, which it returns.
func startQEMU(t *testing.T) (sock string, cmd *exec.Cmd) {
	t.Helper()
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 is not installed")
	}
	sock = filepath.Join(t.TempDir(), "qmp.sock")
	cmd = exec.Command(bin, "-M", "none", "-nodefaults", "-display", "none", "-name", "vm1",
		"-qmp", "unix:"+sock+",server=on,wait=off")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			return sock, cmd
		}
		if i == 200 {
			t.Fatalf("qemu made no socket %s in 10s", sock)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func dial(t *testing.T, sock string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func qemuVersion(t *testing.T) Version {
	out, err := exec.Command("qemu-system-x86_64", "--version").Output()
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`version (\d+)\.(\d+)\.(\d+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no version in %q", out)
	}
	var v Version
	v.Major, _ = strconv.Atoi(string(m[1]))
	v.Minor, _ = strconv.Atoi(string(m[2]))
	v.Micro, _ = strconv.Atoi(string(m[3]))
	return v
}

func TestQEMU(t *testing.T) {
	sock, _ := startQEMU(t)
	c := dial(t, sock)
	ctx := context.Background()
	if got, want := c.Version().String(), qemuVersion(t).String(); got != want {
		t.Errorf("Version = %s, qemu-system-x86_64 --version says %s", got, want)
	}
	var name struct{ Name string }
	if err := c.Execute(ctx, "query-name", nil, &name); err != nil || name.Name != "vm1" {
		t.Errorf("query-name = %+v, %v; want vm1", name, err)
	}
	for _, tc := range []struct {
		command string
		args    any
		class   string
	}{
		{"no-such-command", nil, "CommandNotFound"},
		{"query-name", map[string]any{"bogus": 1}, "GenericError"},
		{"blockdev-del", map[string]any{"node-name": "nothere"}, "GenericError"},
	} {
		err := c.Execute(ctx, tc.command, tc.args, nil)
		var qe *Error
		if !errors.As(err, &qe) || qe.Class != tc.class || qe.Desc == "" || !strings.HasPrefix(err.Error(), tc.command+": ") {
			t.Errorf("%s: error %v (%#v), want class %s", tc.command, err, qe, tc.class)
		}
	}
	// The connection still works after error replies.
	if err := c.Execute(ctx, "query-name", nil, &name); err != nil {
		t.Error(err)
	}
}

// Replies reach the goroutine whose command they answer, whatever the
// interleaving.
func TestConcurrent(t *testing.T) {
	sock, _ := startQEMU(t)
	c := dial(t, sock)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				if (g+i)%2 == 0 {
					var r struct{ Name string }
					if err := c.Execute(ctx, "query-name", nil, &r); err != nil || r.Name != "vm1" {
						errs <- fmt.Errorf("query-name: %+v %v", r, err)
						return
					}
				} else {
					var r struct{ QEMU struct{ Major int } }
					if err := c.Execute(ctx, "query-version", nil, &r); err != nil || r.QEMU.Major == 0 {
						errs <- fmt.Errorf("query-version: %+v %v", r, err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestEvents(t *testing.T) {
	sock, _ := startQEMU(t)
	c := dial(t, sock)
	ctx := context.Background()
	stops := c.Subscribe("STOP")
	all := c.Subscribe()
	for _, cmd := range []string{"stop", "cont"} {
		if err := c.Execute(ctx, cmd, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	next := func(s *Subscription) Event {
		select {
		case e := <-s.C:
			return e
		case <-time.After(5 * time.Second):
			t.Fatal("no event in 5s")
		}
		return Event{}
	}
	if e := next(stops); e.Name != "STOP" || e.Time.IsZero() || time.Since(e.Time) > time.Minute {
		t.Errorf("event %+v, want STOP now", e)
	}
	if e, f := next(all), next(all); e.Name != "STOP" || f.Name != "RESUME" {
		t.Errorf("events %s, %s; want STOP, RESUME", e.Name, f.Name)
	}
	select {
	case e := <-stops.C:
		t.Errorf("STOP subscription got %s", e.Name)
	case <-time.After(100 * time.Millisecond):
	}
	stops.Close()
	stops.Close()
	if _, ok := <-stops.C; ok {
		t.Error("closed subscription still open")
	}
	c.Close()
	if _, ok := <-all.C; ok {
		t.Error("subscription open after Close")
	}
}

// When QEMU goes away, waiting and later commands fail at once.
func TestQEMUGone(t *testing.T) {
	sock, cmd := startQEMU(t)
	c := dial(t, sock)
	sub := c.Subscribe()
	cmd.Process.Kill()
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("connection not ended 5s after QEMU was killed")
	}
	if _, ok := <-sub.C; ok {
		t.Error("subscription open after QEMU died")
	}
	err := c.Execute(context.Background(), "query-name", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "closed by QEMU") {
		t.Errorf("Execute after QEMU died: %v", err)
	}
}

// fakeServer listens on a unix socket and runs serve for each connection.
func fakeServer(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "fake.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				serve(conn)
			}()
		}
	}()
	return sock
}

const greeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 6}, "package": ""}, "capabilities": []}}` + "\r\n"

// answerCapabilities greets and answers qmp_capabilities, then returns
// a reader of later commands.
func answerCapabilities(conn net.Conn) *bufio.Reader {
	conn.Write([]byte(greeting))
	br := bufio.NewReader(conn)
	line, err := br.ReadBytes('\n')
	if err != nil {
		return br
	}
	var req struct{ ID json.RawMessage }
	json.Unmarshal(line, &req)
	fmt.Fprintf(conn, `{"return": {}, "id": %s}`+"\r\n", req.ID)
	return br
}

func TestNotQMP(t *testing.T) {
	for _, tc := range []struct {
		name  string
		serve func(net.Conn)
		want  string
	}{
		{"ssh", func(c net.Conn) { c.Write([]byte("SSH-2.0-OpenSSH_9.2\r\n")); io.Copy(io.Discard, c) },
			`is not a QEMU monitor (QMP) socket: it greeted with "SSH-2.0-OpenSSH_9.2"`},
		{"json", func(c net.Conn) { c.Write([]byte(`{"return": {}}` + "\n")); io.Copy(io.Discard, c) },
			"is not a QEMU monitor (QMP) socket"},
		{"other greeting", func(c net.Conn) { c.Write([]byte(`{"QMP": {"hello": 1}}` + "\n")); io.Copy(io.Discard, c) },
			"is not a QEMU monitor (QMP) socket"},
		{"hangs up", func(net.Conn) {}, "closed the connection without a greeting"},
		{"silent", func(c net.Conn) { io.Copy(io.Discard, c) }, "sent no QMP greeting within"},
		{"endless line", func(c net.Conn) {
			b := make([]byte, 1<<20)
			for i := 0; i <= MaxLine>>20; i++ {
				if _, err := c.Write(b); err != nil {
					return
				}
			}
		}, "longer than 16 MiB"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := fakeServer(t, tc.serve)
			wait := 500 * time.Millisecond
			if tc.name == "endless line" {
				wait = 5 * time.Second // 16 MiB through a socket, under -race too
			}
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			start := time.Now()
			c, err := Dial(ctx, sock)
			if err == nil {
				c.Close()
				t.Fatal("Dial accepted it")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), sock) {
				t.Errorf("error %q, want one naming %s and saying %q", err, sock, tc.want)
			}
			if time.Since(start) > wait+time.Second {
				t.Errorf("Dial took %v", time.Since(start))
			}
		})
	}
	t.Run("not a socket", func(t *testing.T) {
		f := filepath.Join(t.TempDir(), "file")
		os.WriteFile(f, []byte("x"), 0o600)
		if _, err := Dial(context.Background(), f); err == nil || !strings.Contains(err.Error(), f) {
			t.Errorf("Dial of a file: %v", err)
		}
	})
}

// A monitor that stops answering costs the caller its deadline, no more.
func TestDeadline(t *testing.T) {
	sock := fakeServer(t, func(c net.Conn) {
		io.Copy(io.Discard, answerCapabilities(c))
	})
	c, err := Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Version() != (Version{6, 2, 0, ""}) {
		t.Errorf("Version %+v, want 6.2.0", c.Version())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = c.Execute(ctx, "query-name", nil, nil)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > time.Second {
		t.Errorf("Execute: %v after %v, want the deadline after 200ms", err, time.Since(start))
	}
}

// A reply longer than MaxLine ends the connection instead of growing
// memory.
func TestLongReply(t *testing.T) {
	sock := fakeServer(t, func(c net.Conn) {
		br := answerCapabilities(c)
		br.ReadBytes('\n')
		c.Write([]byte(`{"return": "`))
		b := []byte(strings.Repeat("x", 1<<20))
		for i := 0; i <= MaxLine>>20; i++ {
			if _, err := c.Write(b); err != nil {
				return
			}
		}
	})
	c, err := Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Execute(context.Background(), "query-name", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "longer than 16 MiB") {
		t.Errorf("Execute: %v, want a too-long message", err)
	}
}

// qemu-storage-daemon greets and answers as qemu-system does.
func TestStorageDaemon(t *testing.T) {
	bin, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Skip("qemu-storage-daemon is not installed")
	}
	sock := filepath.Join(t.TempDir(), "qsd.sock")
	cmd := exec.Command(bin, "--chardev", "socket,id=m,path="+sock+",server=on,wait=off", "--monitor", "chardev=m",
		"--blockdev", "null-co,node-name=null0,size=1048576")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	c := dial(t, sock)
	if !c.Version().AtLeast(qemuVersion(t).Major, qemuVersion(t).Minor) {
		t.Errorf("version %s", c.Version())
	}
	var nodes []struct {
		NodeName string `json:"node-name"`
	}
	if err := c.Execute(context.Background(), "query-named-block-nodes", nil, &nodes); err != nil || len(nodes) != 1 || nodes[0].NodeName != "null0" {
		t.Errorf("query-named-block-nodes = %+v, %v", nodes, err)
	}
}

// A file passed with add-fd is QEMU's, in the fd set it names.
func TestExecuteWithFile(t *testing.T) {
	sock, _ := startQEMU(t)
	c := dial(t, sock)
	ctx := context.Background()
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var added struct {
		FdsetID int `json:"fdset-id"`
	}
	if err := c.ExecuteWithFile(ctx, "add-fd", map[string]any{"opaque": "test-fd"}, &added, f); err != nil {
		t.Fatal(err)
	}
	var sets []struct {
		FdsetID int `json:"fdset-id"`
		Fds     []struct{ Opaque string }
	}
	if err := c.Execute(ctx, "query-fdsets", nil, &sets); err != nil {
		t.Fatal(err)
	}
	if len(sets) != 1 || sets[0].FdsetID != added.FdsetID || len(sets[0].Fds) != 1 || sets[0].Fds[0].Opaque != "test-fd" {
		t.Errorf("query-fdsets = %+v after add-fd", sets)
	}
	// Without a file, add-fd fails: the file went with the command.
	err = c.Execute(ctx, "add-fd", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) {
		t.Errorf("add-fd without a file: %v", err)
	}
}
