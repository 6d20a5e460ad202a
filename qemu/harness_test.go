package qemu

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The test binary doubles as a fake emulator: with TAMAHV_FAKE_EMU set it
// writes the lines of that variable to the file named by "-serial file:",
// then exits or waits to be killed as TAMAHV_FAKE_EXIT says.
func TestMain(m *testing.M) {
	if script, ok := os.LookupEnv("TAMAHV_FAKE_EMU"); ok {
		fakeEmulator(script)
		return
	}
	os.Exit(m.Run())
}

func fakeEmulator(script string) {
	var serial string
	for i, a := range os.Args {
		if a == "-serial" && i+1 < len(os.Args) && serial == "" {
			serial = strings.TrimPrefix(os.Args[i+1], "file:") // COM1
		}
	}
	f, err := os.Create(serial)
	if err != nil {
		os.Exit(3)
	}
	_ = os.WriteFile(serial+".pid", []byte(fmt.Sprint(os.Getpid())), 0o644)
	for _, l := range strings.Split(script, "|") {
		fmt.Fprint(f, l)
		time.Sleep(20 * time.Millisecond)
	}
	f.Close()
	if os.Getenv("TAMAHV_FAKE_EXIT") == "1" {
		os.Exit(0)
	}
	time.Sleep(time.Hour)
}

func fakeISO(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "fake.iso")
	require.NoError(t, os.WriteFile(p, []byte("iso"), 0o644))
	return p
}

func fakeConfig(t *testing.T, script string, exit bool, timeout time.Duration) Config {
	t.Setenv("TAMAHV_FAKE_EMU", script)
	if exit {
		t.Setenv("TAMAHV_FAKE_EXIT", "1")
	} else {
		t.Setenv("TAMAHV_FAKE_EXIT", "0")
	}
	return Config{Emulator: TCG, ISO: fakeISO(t), Timeout: timeout, Dir: t.TempDir(), Program: os.Args[0]}
}

func TestRunStopsAtTheLineAndKillsItsProcess(t *testing.T) {
	c := fakeConfig(t, "\x1b[H\x1b[Jboot\r\n|tamahv: VMX o|n (revision 0x2b)\n|tamahv: halted\n", false, 20*time.Second)
	var echo strings.Builder
	res, err := Run(context.Background(), c, &echo, func(l string) bool { return strings.HasPrefix(l, "tamahv: VMX on") })
	require.NoError(t, err)
	assert.Equal(t, "tamahv: VMX on (revision 0x2b)", res.Matched)
	assert.Equal(t, []string{"boot", "tamahv: VMX on (revision 0x2b)"}, res.Lines)
	assert.Equal(t, "boot\ntamahv: VMX on (revision 0x2b)\n", echo.String())
	pid := readPID(t, c.Dir)
	assert.ErrorIs(t, syscall.Kill(pid, 0), syscall.ESRCH, "the emulator was ended")
}

func TestRunTimeLimit(t *testing.T) {
	c := fakeConfig(t, "nothing useful\n", false, 500*time.Millisecond)
	start := time.Now()
	res, err := Run(context.Background(), c, nil, func(string) bool { return false })
	assert.ErrorIs(t, err, ErrTimeout)
	assert.Less(t, time.Since(start), 10*time.Second)
	assert.Equal(t, []string{"nothing useful"}, res.Lines, "the log is still read")
	assert.ErrorIs(t, syscall.Kill(readPID(t, c.Dir), 0), syscall.ESRCH)
}

// A run whose consoles stop growing ends at the stall limit, long before
// its outer limit, saying where it was.
func TestRunStall(t *testing.T) {
	c := fakeConfig(t, "tamahv: guest started\n|tamahv: alive: 10 exits (vCPU 0: 10)\n", false, time.Minute)
	c.Stall = 500 * time.Millisecond
	start := time.Now()
	res, err := Run(context.Background(), c, nil, func(string) bool { return false })
	assert.ErrorIs(t, err, ErrStall)
	assert.NotErrorIs(t, err, ErrTimeout)
	assert.ErrorContains(t, err, `tamahv's last line "tamahv: alive: 10 exits (vCPU 0: 10)", the guest's last line none`)
	assert.Less(t, time.Since(start), 30*time.Second)
	assert.Len(t, res.Lines, 2)
	assert.ErrorIs(t, syscall.Kill(readPID(t, c.Dir), 0), syscall.ESRCH)
}

// A run that keeps writing lines goes on past the stall limit.
func TestRunSlowButProgressing(t *testing.T) {
	lines := make([]string, 0, 101)
	for i := 0; i < 100; i++ {
		lines = append(lines, fmt.Sprintf("tamahv: alive: %d exits\n", i))
	}
	lines = append(lines, "tamahv: halted\n")
	c := fakeConfig(t, strings.Join(lines, "|"), false, time.Minute)
	c.Stall = time.Second // the script runs for about 2 s, a line every 20 ms
	res, err := Run(context.Background(), c, nil, func(l string) bool { return l == "tamahv: halted" })
	require.NoError(t, err)
	assert.Greater(t, res.MatchedAfter, c.Stall, "the run outlived its stall limit")
	assert.Len(t, res.Lines, 101)
}

func TestRunEmulatorExitsEarly(t *testing.T) {
	c := fakeConfig(t, "only this", true, 20*time.Second)
	res, err := Run(context.Background(), c, nil, func(l string) bool { return l == "never" })
	assert.ErrorContains(t, err, "exited")
	assert.Equal(t, []string{"only this"}, res.Lines, "an unterminated last line is kept")
	// And when the awaited line came last, without a newline, it counts.
	c = fakeConfig(t, "a\n|tamahv: halted", true, 20*time.Second)
	res, err = Run(context.Background(), c, nil, func(l string) bool { return l == "tamahv: halted" })
	require.NoError(t, err)
	assert.Equal(t, "tamahv: halted", res.Matched)
}

func readPID(t *testing.T, dir string) int {
	b, err := os.ReadFile(SerialLog(dir) + ".pid")
	require.NoError(t, err)
	var pid int
	_, err = fmt.Sscan(string(b), &pid)
	require.NoError(t, err)
	return pid
}

func TestConfigErrors(t *testing.T) {
	_, err := Run(context.Background(), Config{Emulator: "vbox", ISO: fakeISO(t)}, nil, nil)
	assert.ErrorContains(t, err, "unknown emulator")
	_, err = Run(context.Background(), Config{ISO: "/nonexistent.iso"}, nil, nil)
	assert.Error(t, err)
	_, err = Run(context.Background(), Config{ISO: fakeISO(t), Stall: -time.Second}, nil, nil)
	assert.ErrorContains(t, err, "negative time limit")
	_, err = Run(context.Background(), Config{ISO: fakeISO(t), MemMiB: 256}, nil, nil)
	assert.ErrorContains(t, err, "at least 512")
	_, err = Run(context.Background(), Config{Emulator: TCG, ISO: fakeISO(t), Program: "/nonexistent/qemu", Dir: t.TempDir()}, nil, nil)
	assert.ErrorContains(t, err, "not installed")
}

func TestCommands(t *testing.T) {
	dir := t.TempDir()
	c := Config{Emulator: Bochs, ISO: fakeISO(t), Model: "tigerlake"}
	require.NoError(t, c.fill())
	prog, args, err := command(&c, dir)
	require.NoError(t, err)
	assert.Equal(t, "bochs", prog)
	assert.Equal(t, []string{"-q", "-f", filepath.Join(dir, "bochsrc"), "-rc", filepath.Join(dir, "bochs.cmds")}, args)
	rc, err := os.ReadFile(filepath.Join(dir, "bochsrc"))
	require.NoError(t, err)
	assert.Contains(t, string(rc), "cpu: model=tigerlake, count=1")
	assert.Contains(t, string(rc), "megs: 1024")
	assert.Contains(t, string(rc), fmt.Sprintf("com1: enabled=1, mode=file, dev=%q", SerialLog(dir)))
	assert.Contains(t, string(rc), "display_library: term")

	c = Config{Emulator: TCG, ISO: c.ISO}
	require.NoError(t, c.fill())
	prog, args, err = command(&c, dir)
	require.NoError(t, err)
	assert.Equal(t, "qemu-system-x86_64", prog)
	assert.Contains(t, strings.Join(args, " "), "-cpu max")
	assert.Contains(t, strings.Join(args, " "), "-serial file:"+SerialLog(dir))
	assert.NotContains(t, strings.Join(args, " "), "kvm")
	c.Emulator = KVM
	_, args, _ = command(&c, dir)
	assert.Contains(t, strings.Join(args, " "), "-enable-kvm -cpu host,+vmx")
}

func TestKVMDecision(t *testing.T) {
	amd := "processor\t: 0\nflags\t\t: fpu svm sse2\n"
	intel := "processor\t: 0\nflags\t\t: fpu vmx sse2\n"
	assert.ErrorContains(t, kvmVMX(amd, ""), "no VMX")
	assert.ErrorContains(t, kvmVMX(intel, "N"), "nested virtualization is off")
	assert.NoError(t, kvmVMX(intel, "Y"))
	assert.NoError(t, kvmVMX(intel, "1"))
}

func TestParseEmulatorAndVersion(t *testing.T) {
	e, err := ParseEmulator("KVM")
	require.NoError(t, err)
	assert.Equal(t, KVM, e)
	_, err = ParseEmulator("xen")
	assert.Error(t, err)
	v, err := TamagoVersion("../go.mod")
	require.NoError(t, err)
	assert.Equal(t, "v1.26.0", v)
	root, err := TamagoGoroot(v)
	require.NoError(t, err)
	assert.True(t, strings.HasSuffix(root, filepath.Join("tamago-go", "tamago-go1.26.0")), root)
}

func TestCleanLine(t *testing.T) {
	assert.Equal(t, "  Booting `tamahv'", cleanLine([]byte("\x1b[H\x1b[J\x1b[1;1H  Booting `tamahv'\r")))
	assert.Equal(t, "", cleanLine([]byte("\x1b[")))
}
