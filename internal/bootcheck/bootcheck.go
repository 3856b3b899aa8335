// Package bootcheck boots a disk image under QEMU, with no network and
// a throw-away overlay (-snapshot: the image is never written), and
// watches the guest's first serial port for a marker (a login prompt,
// or a line the caller names): the test a migration's target gets
// before the cut-over, while the source keeps running.
//
// Only what the guest prints on its serial console is seen: a Linux
// guest shows its login prompt there when its kernel and getty use
// ttyS0 (console=ttyS0, the default of cloud images), a BIOS or UEFI
// boot loader its menu when configured so. A guest that writes only to
// its screen never reaches the marker: the result says so, with the
// console's last lines.
package bootcheck

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Options say how the image is booted and what is looked for.
type Options struct {
	// Format is QEMU's name of the image's format (raw, qcow2, vmdk,
	// vpc, vhdx, vdi).
	Format string
	// Marker is the text that says the guest booted ("login:" when "").
	Marker string
	// Timeout bounds the boot (5 minutes when 0).
	Timeout time.Duration
	// Memory is the guest's memory, as QEMU's -m takes it ("1G" when "").
	Memory string
	// Accel is QEMU's accelerator: "kvm", "tcg", or "" for KVM when
	// /dev/kvm can be opened and TCG otherwise.
	Accel string
	// UEFI boots with the OVMF firmware at Firmware (a file readable by
	// QEMU's pflash), instead of the BIOS.
	UEFI     bool
	Firmware string
	// Console, when set, gets a copy of what the guest prints.
	Console io.Writer
	// QEMU is the binary ("qemu-system-x86_64" when "").
	QEMU string
}

// Result is what the boot showed.
type Result struct {
	// Reached says whether the marker appeared.
	Reached bool
	// Seconds is how long it took to appear, or how long the guest ran.
	Seconds float64
	// Tail is the end of the console, for a report.
	Tail string
}

// tailLen is how much of the console a Result keeps.
const tailLen = 2048

// Boot boots image and waits for the marker, the guest's exit, the
// timeout or ctx's end, whichever comes first; the guest is killed then.
// An error is a boot that could not be tried (no QEMU, a bad image
// format); a guest that did not reach the marker is a Result.
func Boot(ctx context.Context, image string, o Options) (*Result, error) {
	o = o.withDefaults()
	if _, err := os.Stat(image); err != nil {
		return nil, fmt.Errorf("test boot: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, o.QEMU, o.args(image)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("test boot: start %s: %w", o.QEMU, err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	reached, tail := watch(out, o.Marker, o.Console)
	res := &Result{Reached: reached, Seconds: time.Since(start).Seconds(), Tail: tail}
	if reached {
		return res, nil
	}
	werr := cmd.Wait()
	if ctx.Err() == nil && werr != nil && res.Seconds < 2 && stderr.Len() > 0 {
		// QEMU refused to start: the image or options, not the guest.
		return nil, fmt.Errorf("test boot of %s: %s", image, firstLine(stderr.String()))
	}
	if errors.Is(ctx.Err(), context.Canceled) {
		return nil, ctx.Err()
	}
	return res, nil
}

func (o Options) withDefaults() Options {
	if o.Marker == "" {
		o.Marker = "login:"
	}
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Minute
	}
	if o.Memory == "" {
		o.Memory = "1G"
	}
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if o.Format == "" {
		o.Format = "raw"
	}
	if o.Accel == "" {
		o.Accel = "tcg"
		if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
			f.Close()
			o.Accel = "kvm"
		}
	}
	return o
}

// args is QEMU's command line: the image on an IDE disk (every guest has
// the driver, unlike virtio), no network, no display, the first serial
// port on stdout, and every write to a temporary overlay.
func (o Options) args(image string) []string {
	a := []string{"-accel", o.Accel, "-m", o.Memory, "-nographic", "-monitor", "none",
		"-serial", "stdio", "-nic", "none", "-no-reboot",
		"-drive", "file=" + strings.ReplaceAll(image, ",", ",,") + ",format=" + o.Format + ",if=ide,snapshot=on"}
	if o.UEFI {
		a = append(a, "-drive", "if=pflash,format=raw,readonly=on,file="+strings.ReplaceAll(o.Firmware, ",", ",,"))
	}
	return a
}

// watch reads the console until marker appears or it ends; it returns
// whether it appeared and the console's tail.
func watch(r io.Reader, marker string, copyTo io.Writer) (bool, string) {
	var seen []byte
	buf := make([]byte, 4096)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if copyTo != nil {
				copyTo.Write(buf[:n])
			}
			seen = append(seen, buf[:n]...)
			if bytes.Contains(seen, []byte(marker)) {
				return true, tail(seen)
			}
			// Keep what a marker across two reads needs, and the tail.
			if keep := max(tailLen, len(marker)); len(seen) > 4*keep {
				seen = append(seen[:0], seen[len(seen)-keep:]...)
			}
		}
		if err != nil {
			return false, tail(seen)
		}
	}
}

func tail(b []byte) string {
	if len(b) > tailLen {
		b = b[len(b)-tailLen:]
	}
	return strings.ToValidUTF8(string(b), "?")
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}
