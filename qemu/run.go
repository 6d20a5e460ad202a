package qemu

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

// Result is what a boot produced.
type Result struct {
	Dir   string   // where the logs are
	Lines []string // tamahv's serial console, line by line
	Guest []string // the guest's serial console, line by line
	// GuestAt holds when each guest line appeared, since the start.
	GuestAt []time.Duration
	Matched string        // the line that ended the run, if any
	Elapsed time.Duration // from emulator start to the end
	// MatchedAfter is when the matched line appeared.
	MatchedAfter time.Duration
}

// Serial returns tamahv's whole serial console.
func (r *Result) Serial() string { return strings.Join(r.Lines, "\n") }

// GuestLine returns the first guest line with the prefix, and when it
// appeared; ok is false if none did.
func (r *Result) GuestLine(prefix string) (line string, at time.Duration, ok bool) {
	for i, l := range r.Guest {
		if strings.HasPrefix(l, prefix) {
			return l, r.GuestAt[i], true
		}
	}
	return "", 0, false
}

// where says where a run was: the last line of each console.
func (r *Result) where() string {
	last := func(l []string) string {
		if len(l) == 0 {
			return "none"
		}
		return fmt.Sprintf("%q", l[len(l)-1])
	}
	return "tamahv's last line " + last(r.Lines) + ", the guest's last line " + last(r.Guest)
}

// GuestSerial returns the guest's whole serial console.
func (r *Result) GuestSerial() string { return strings.Join(r.Guest, "\n") }

// ErrTimeout is returned when the outer time limit ends a boot.
var ErrTimeout = errors.New("qemu: time limit reached")

// ErrStall is returned when a boot ends because neither console grew for
// Config.Stall.
var ErrStall = errors.New("qemu: no progress")

// Run boots c.ISO and follows its serial consoles: each complete line is
// copied to echo (if not nil) and passed to until, the guest's behind
// "guest| "; the run ends when until
// returns true, when the emulator exits, when neither console grew for
// c.Stall (ErrStall, saying where both consoles were), or at the outer
// limit c.Timeout (ErrTimeout). The
// emulator is ended through the process group of the process Run started,
// and its logs stay in the result's Dir.
func Run(ctx context.Context, c Config, echo io.Writer, until func(line string) bool) (*Result, error) {
	if err := c.fill(); err != nil {
		return nil, err
	}
	dir := c.Dir
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "tamahv-"+string(c.Emulator)+"-"); err != nil {
			return nil, err
		}
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	res := &Result{Dir: dir}
	if c.Emulator == KVM {
		if err := KVMStatus(); err != nil {
			return res, fmt.Errorf("qemu: KVM with nested VMX is not available: %w", err)
		}
	}
	prog, args, err := command(&c, dir)
	if err != nil {
		return res, err
	}
	if _, err := exec.LookPath(prog); err != nil {
		return res, fmt.Errorf("qemu: %s is not installed: %w", prog, err)
	}
	serial, guestLog := SerialLog(dir), GuestLog(dir)
	_ = os.Remove(serial)
	_ = os.Remove(guestLog)
	out, err := os.Create(dirFile(dir, string(c.Emulator)+".out"))
	if err != nil {
		return res, err
	}
	defer out.Close()

	cmd := exec.Command(prog, args...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var tty *os.File
	if c.Emulator == Bochs {
		// Bochs's terminal display needs a terminal: give it a pseudo
		// terminal of its own and keep what it draws in the .out file.
		master, slave, err := openPTY()
		if err != nil {
			return res, err
		}
		defer master.Close()
		tty = slave
		cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
		// Its display goes to a terminal of its own, which the harness
		// reads (screen.go).
		screen, err := os.Create(dirFile(dir, "bochs.screen"))
		if err != nil {
			slave.Close()
			return res, err
		}
		defer screen.Close()
		drain := &screenDrain{open: func(path string) {
			if err := drainScreen(path, screen); err != nil {
				fmt.Fprintf(out, "\nqemu: reading Bochs's display terminal %s: %v\n", path, err)
			}
		}}
		go func() { _, _ = io.Copy(io.MultiWriter(out, drain), master) }()
	} else {
		cmd.Stdout, cmd.Stderr = out, out
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		if tty != nil {
			tty.Close()
		}
		return res, fmt.Errorf("qemu: starting %s: %w", prog, err)
	}
	if tty != nil {
		tty.Close()
	}
	pid := cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() {
		// The emulator leads its own process group: end all of it.
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}

	limit := time.NewTimer(c.Timeout)
	defer limit.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var f, g follower
	g.guest = true
	progress := start // when a console last grew
	for {
		select {
		case <-ctx.Done():
			stop()
			<-exited
			res.Elapsed = time.Since(start)
			return res, ctx.Err()
		case <-limit.C:
			stop()
			<-exited
			f.poll(serial, res, echo, nil, start)
			g.poll(guestLog, res, echo, nil, start)
			res.Elapsed = time.Since(start)
			return res, fmt.Errorf("%w after %v: %s (logs in %s)", ErrTimeout, c.Timeout, res.where(), dir)
		case err := <-exited:
			g.poll(guestLog, res, echo, until, start)
			g.flush(res, echo, until, start)
			f.poll(serial, res, echo, until, start)
			f.flush(res, echo, until, start)
			res.Elapsed = time.Since(start)
			if res.Matched != "" {
				return res, nil
			}
			return res, fmt.Errorf("qemu: %s exited (%v) before the expected output (logs in %s)", prog, err, dir)
		case <-tick.C:
			offs := f.off + g.off
			if g.poll(guestLog, res, echo, until, start) || f.poll(serial, res, echo, until, start) {
				stop()
				<-exited
				res.Elapsed = time.Since(start)
				return res, nil
			}
			now := time.Now()
			if f.off+g.off != offs {
				progress = now
			} else if now.Sub(progress) >= c.Stall {
				stop()
				<-exited
				res.Elapsed = time.Since(start)
				return res, fmt.Errorf("%w for %v, %v after the start: %s (logs in %s)", ErrStall, c.Stall, res.Elapsed.Round(time.Second), res.where(), dir)
			}
		}
	}
}

func dirFile(dir, name string) string { return dir + string(os.PathSeparator) + name }

// GuestPrefix marks the guest's console lines for echo and until.
const GuestPrefix = "guest| "

// follower reads a serial log as it grows and splits it into lines.
type follower struct {
	off     int64
	partial []byte
	guest   bool // the guest's console: kept apart, never matched
}

// poll reads what was added since the last call. It reports whether until
// matched a line.
func (f *follower) poll(path string, res *Result, echo io.Writer, until func(string) bool, start time.Time) bool {
	fh, err := os.Open(path)
	if err != nil {
		return false
	}
	defer fh.Close()
	if _, err := fh.Seek(f.off, io.SeekStart); err != nil {
		return false
	}
	b, _ := io.ReadAll(fh)
	f.off += int64(len(b))
	f.partial = append(f.partial, b...)
	for {
		i := bytes.IndexByte(f.partial, '\n')
		if i < 0 {
			return false
		}
		line := cleanLine(f.partial[:i])
		f.partial = f.partial[i+1:]
		if f.take(line, res, echo, until, start) {
			return true
		}
	}
}

// flush takes an unterminated last line.
func (f *follower) flush(res *Result, echo io.Writer, until func(string) bool, start time.Time) {
	if len(f.partial) > 0 {
		f.take(cleanLine(f.partial), res, echo, until, start)
		f.partial = nil
	}
}

func (f *follower) take(line string, res *Result, echo io.Writer, until func(string) bool, start time.Time) bool {
	shown := line
	if f.guest {
		res.Guest = append(res.Guest, line)
		res.GuestAt = append(res.GuestAt, time.Since(start))
		shown = GuestPrefix + line
	} else {
		res.Lines = append(res.Lines, line)
	}
	if echo != nil {
		fmt.Fprintln(echo, shown)
	}
	line = shown
	if until != nil && res.Matched == "" && until(line) {
		res.Matched = line
		res.MatchedAfter = time.Since(start)
		return true
	}
	return false
}

// cleanLine drops carriage returns and the terminal escape sequences GRUB
// writes to the serial console.
func cleanLine(b []byte) string {
	var out []byte
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case c == '\r':
		case c == 0x1b:
			// ESC [ parameters final-byte
			if i+1 < len(b) && b[i+1] == '[' {
				i += 2
				for i < len(b) && (b[i] < 0x40 || b[i] > 0x7e) {
					i++
				}
			}
		default:
			out = append(out, c)
		}
	}
	return string(out)
}
