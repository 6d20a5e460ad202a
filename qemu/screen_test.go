package qemu

import (
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The display terminal's line is found however Bochs's console output is
// cut into writes, and only once.
func TestScreenDrainFindsTheTerminal(t *testing.T) {
	out := "Bochs x86 Emulator 2.7\r\n" + strings.Repeat("ALSA lib noise\r\n", 40) +
		"Bochs connected to screen \"/dev/pts/7\"\r\nNext at t=0\r\nBochs connected to screen \"/dev/pts/9\"\r\n"
	for _, size := range []int{1, 3, 17, len(out)} {
		var got []string
		d := &screenDrain{open: func(p string) { got = append(got, p) }}
		for i := 0; i < len(out); i += size {
			n, err := d.Write([]byte(out[i:min(i+size, len(out))]))
			require.NoError(t, err)
			require.Equal(t, min(size, len(out)-i), n)
		}
		assert.Equal(t, []string{"/dev/pts/7"}, got, "writes of %d bytes", size)
	}
	d := &screenDrain{open: func(string) { t.Fatal("no terminal was named") }}
	_, _ = d.Write([]byte(strings.Repeat("x", 10000)))
	assert.LessOrEqual(t, len(d.buf), len(screenPrefix)+256, "what it keeps is bounded")
}

// A writer on the other side of the terminal never blocks once the harness
// drains it: more than a terminal's buffers of output without a newline
// (Bochs's cursor sequences) all arrive.
func TestDrainScreenKeepsTheWriterGoing(t *testing.T) {
	master, slave, err := openPTY()
	if err != nil {
		t.Skipf("no pseudo terminal here: %v", err)
	}
	defer master.Close()
	path := slave.Name()
	slave.Close()
	r, w := io.Pipe()
	require.NoError(t, drainScreen(path, w))
	const n = 256 << 10
	got := make(chan int)
	go func() {
		total := 0
		buf := make([]byte, 4096)
		for total < n {
			k, err := r.Read(buf)
			if err != nil {
				break
			}
			total += k
		}
		got <- total
	}()
	wrote := make(chan error, 1)
	go func() {
		_, err := master.Write([]byte(strings.Repeat("\x1b[?25l\x1b[?12l\x1b[?25h", n/16+1)[:n]))
		wrote <- err
	}()
	select {
	case err := <-wrote:
		require.NoError(t, err)
	case <-time.After(time.Minute):
		t.Fatal("the write blocked")
	}
	assert.Equal(t, n, <-got)
}
