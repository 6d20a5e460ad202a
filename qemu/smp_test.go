package qemu

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCPUCount(t *testing.T) {
	dir := t.TempDir()
	c := Config{Emulator: Bochs, ISO: fakeISO(t), CPUs: 2}
	require.NoError(t, c.fill())
	assert.Contains(t, bochsrc(&c, dir), "cpu: model=corei7_skylake_x, count=2,")
	c = Config{Emulator: TCG, ISO: c.ISO, CPUs: 4}
	require.NoError(t, c.fill())
	_, args, err := command(&c, dir)
	require.NoError(t, err)
	assert.Contains(t, strings.Join(args, " "), "-smp 4")
	c = Config{ISO: c.ISO}
	require.NoError(t, c.fill())
	assert.Equal(t, 1, c.CPUs)
	for _, n := range []int{-1, MaxCPUs + 1} {
		c = Config{ISO: c.ISO, CPUs: n}
		assert.Error(t, c.fill(), "%d processors", n)
	}
}

// TestBochsSMP boots the Linux guest under tamahv on a two-processor
// Bochs: tamahv finds the second processor in the MADT, parks it in VMX
// root operation before the guest starts and hides it from the guest's
// MADT, so the guest runs on the one processor tamahv virtualizes and no
// processor runs natively.
func TestBochsSMP(t *testing.T) {
	iso := isoForTest(t)
	needEmulator(t, Bochs)
	res := bootUntilHalted(t, Config{Emulator: Bochs, ISO: iso, CPUs: 2, Timeout: 8 * time.Minute})
	t.Logf("tamahv:\n%s", res.Serial())
	for _, want := range []string{
		"tamahv: processors: 2 listed (MADT), bootstrap APIC ID 0",
		"tamahv: AP APIC ID 1: parked in VMX root operation",
		"tamahv: hidden from the guest: APIC IDs [1]",
		"tamahv: guest started",
	} {
		l, _ := lineWith(res.Lines, want)
		assert.NotEmpty(t, l, "tamahv did not print %q", want)
	}
	if l, at, ok := res.GuestLine("guest: init started"); ok {
		t.Logf("%s, after %v of wall time", l, at.Round(time.Millisecond))
	}
	exited, _ := lineWith(res.Lines, "tamahv: guest exited")
	require.Equal(t, "tamahv: guest exited (status 0)", strings.SplitN(exited, " after", 2)[0], "tamahv:\n%s", res.Serial())
	for _, l := range res.Guest {
		if strings.Contains(l, "smp") || strings.Contains(l, "CPU") || strings.Contains(l, "APIC") {
			t.Log(l)
		}
	}
	for _, want := range []string{"guest: kernel log clean", "hvguest: running under tamahv"} {
		l, _, ok := res.GuestLine(want)
		assert.True(t, ok, "the guest did not print %q", want)
		assert.NotContains(t, l, "FAILED")
	}
	assert.True(t, guestContains(res, "smp: Brought up 1 node, 1 CPU"), "the guest runs on one processor")
	assert.True(t, guestContains(res, "smpboot: Total of 1 processors activated"))
	assert.False(t, guestContains(res, "Brought up 1 node, 2 CPUs"), "the guest brought up a processor tamahv does not virtualize")
}

// guestContains reports whether a guest line contains s (kernel lines
// start with a timestamp).
func guestContains(res *Result, s string) bool {
	for _, l := range res.Guest {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}

// TestBochsSMPModels boots tamahv with 4 processors on each Bochs model
// the guest runs on, up to the guest's start: every AP is parked and
// hidden (make e2e-smp, or TAMAHV_E2E_SMP=1).
func TestBochsSMPModels(t *testing.T) {
	if os.Getenv("TAMAHV_E2E_SMP") == "" {
		t.Skip("on demand: make e2e-smp (TAMAHV_E2E_SMP=1)")
	}
	iso := isoForTest(t)
	needEmulator(t, Bochs)
	for _, model := range []string{"corei7_skylake_x", "broadwell_ult"} {
		t.Run(model, func(t *testing.T) {
			res := bootUntil(t, Config{Emulator: Bochs, ISO: iso, Model: model, CPUs: 4, Timeout: 4 * time.Minute},
				func(l string) bool { return strings.HasPrefix(l, "tamahv: guest started") || l == "tamahv: halted" })
			t.Logf("tamahv:\n%s", res.Serial())
			l, _ := lineWith(res.Lines, "tamahv: processors: 4 listed (MADT)")
			assert.NotEmpty(t, l)
			for id := 1; id < 4; id++ {
				l, _ := lineWith(res.Lines, fmt.Sprintf("tamahv: AP APIC ID %d: parked in VMX root operation", id))
				assert.NotEmpty(t, l, "AP %d", id)
			}
			l, _ = lineWith(res.Lines, "tamahv: hidden from the guest: APIC IDs [1 2 3]")
			assert.NotEmpty(t, l)
			l, _ = lineWith(res.Lines, "tamahv: guest started")
			assert.NotEmpty(t, l)
		})
	}
}
