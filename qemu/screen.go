package qemu

import (
	"bytes"
	"io"
	"os"
	"syscall"
)

// Bochs with its debugger built in (Debian's) draws the terminal display
// on a pseudo terminal of its own, named on its console as
//
//	Bochs connected to screen "/dev/pts/N"
//
// and keeps writing to it (each screen update moves or redraws the
// cursor). Nothing reads that terminal unless a user attaches to it: after
// some 16 KiB Bochs blocks in the write and the whole machine stops. The
// harness reads it into the screen file.

// screenPrefix starts Bochs's line that names its display terminal.
var screenPrefix = []byte(`Bochs connected to screen "`)

// screenDrain is an io.Writer for Bochs's console output: at the line
// that names the display terminal, it calls open with the terminal's path,
// once.
type screenDrain struct {
	open func(path string)
	buf  []byte
	done bool
}

// Write looks for the display terminal's line in p; it never fails.
func (d *screenDrain) Write(p []byte) (int, error) {
	if d.done {
		return len(p), nil
	}
	d.buf = append(d.buf, p...)
	if i := bytes.Index(d.buf, screenPrefix); i >= 0 {
		rest := d.buf[i+len(screenPrefix):]
		if j := bytes.IndexByte(rest, '"'); j >= 0 {
			d.done = true
			path := string(rest[:j])
			d.buf = nil
			d.open(path)
			return len(p), nil
		}
	}
	// Keep only what could begin the line.
	if keep := len(screenPrefix) + 256; len(d.buf) > keep {
		d.buf = append(d.buf[:0], d.buf[len(d.buf)-keep:]...)
	}
	return len(p), nil
}

// drainScreen reads the terminal at path, in raw mode (a canonical
// terminal would hold a line without a newline, and its writer with it),
// into w until the emulator that owns it closes it.
func drainScreen(path string, w io.Writer) error {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	if err := makeRaw(f); err != nil {
		f.Close()
		return err
	}
	go func() {
		defer f.Close()
		_, _ = io.Copy(w, f)
	}()
	return nil
}
