package machine

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseOptions(t *testing.T) {
	o, err := ParseOptions("hc.ring3=secret swap.deadline=5s smp.park log.alive=10s smp.kickcheck=50")
	require.NoError(t, err)
	assert.Equal(t, Options{SwapDeadline: 5 * time.Second, Alive: 10 * time.Second, KickCheck: 50}, o)
	o, err = ParseOptions("")
	require.NoError(t, err)
	assert.Equal(t, Options{}, o, "nothing set: the defaults")
	o, err = ParseOptions("swap.deadline=1s swap.deadline=2m")
	require.NoError(t, err)
	assert.Equal(t, 2*time.Minute, o.SwapDeadline, "the last one counts")
	for _, bad := range []string{
		"swap.deadline=5", "swap.deadline=", "swap.deadline=fast", "swap.deadline=-1s",
		"swap.deadline=10ms", "swap.deadline=11m", "log.alive=0s", "log.alive=500ms", "log.alive=2h",
		"smp.kickcheck=0", "smp.kickcheck=-1", "smp.kickcheck=x", "smp.kickcheck=1000001", "smp.kickcheck=",
	} {
		_, err := ParseOptions(bad)
		assert.ErrorIs(t, err, ErrOption, bad)
	}
	_, err = ParseOptions("swap.deadline=fast")
	assert.ErrorContains(t, err, "swap.deadline")
}

func TestParseFallback(t *testing.T) {
	o, err := ParseOptions("log.alive=1s")
	require.NoError(t, err)
	assert.False(t, o.Native, "tamahv halts unless told otherwise")
	o, err = ParseOptions("fallback=native")
	require.NoError(t, err)
	assert.Equal(t, Options{Native: true}, o)
	o, err = ParseOptions("fallback=native fallback=halt")
	require.NoError(t, err)
	assert.False(t, o.Native, "the last one counts")
	for _, bad := range []string{"fallback=", "fallback=Native", "fallback=yes", "fallback=native,halt"} {
		_, err := ParseOptions(bad)
		assert.ErrorIs(t, err, ErrOption, bad)
		assert.ErrorContains(t, err, "fallback", bad)
	}
	assert.True(t, NativeFallback("swap.deadline=fast fallback=native"), "another option's error does not hide it")
	assert.True(t, NativeFallback("fallback=native fallback=bad"), "the last valid one counts")
	assert.False(t, NativeFallback("fallback=native fallback=halt"))
	assert.False(t, NativeFallback("fallback native"))
}

func TestParseTrapINIT(t *testing.T) {
	for v, want := range map[string]TrapINITMode{"auto": TrapINITAuto, "on": TrapINITOn, "off": TrapINITOff} {
		o, err := ParseOptions("smp.park apic.trapinit=" + v)
		require.NoError(t, err, v)
		assert.Equal(t, Options{TrapINIT: want}, o, v)
		assert.Equal(t, v, want.String())
	}
	o, err := ParseOptions("log.alive=1s")
	require.NoError(t, err)
	assert.Equal(t, TrapINITAuto, o.TrapINIT, "auto unless set")
	o, err = ParseOptions("apic.trapinit=off apic.trapinit=on")
	require.NoError(t, err)
	assert.Equal(t, TrapINITOn, o.TrapINIT, "the last one counts")
	o, err = ParseOptions("apic.trapinit")
	require.NoError(t, err)
	assert.Equal(t, TrapINITAuto, o.TrapINIT, "a word without a value is not the option")
	for _, bad := range []string{"apic.trapinit=", "apic.trapinit=On", "apic.trapinit=yes", "apic.trapinit=1", "apic.trapinit=auto,off"} {
		_, err := ParseOptions(bad)
		assert.ErrorIs(t, err, ErrOption, bad)
		assert.ErrorContains(t, err, "apic.trapinit", bad)
	}
}

// auto traps on Bochs itself only: its OEM ID with no hypervisor bit.
func TestTrapINITDecide(t *testing.T) {
	for _, c := range []struct {
		name       string
		mode       TrapINITMode
		oemID      string
		hypervisor bool
		want       bool
	}{
		{"Bochs", TrapINITAuto, "BOCHS ", false, true},
		{"QEMU (TCG or KVM) reuses the OEM ID, with the hypervisor bit", TrapINITAuto, "BOCHS ", true, false},
		{"a real machine", TrapINITAuto, "ALASKA", false, false},
		{"a real machine under another hypervisor", TrapINITAuto, "VBOX  ", true, false},
		{"no ACPI tables", TrapINITAuto, "", false, false},
		{"the OEM ID without its padding", TrapINITAuto, "BOCHS", false, false},
		{"on, on a real machine", TrapINITOn, "ALASKA", false, true},
		{"on, under QEMU", TrapINITOn, "BOCHS ", true, true},
		{"off, on Bochs", TrapINITOff, "BOCHS ", false, false},
		{"off, anywhere", TrapINITOff, "", true, false},
	} {
		assert.Equal(t, c.want, c.mode.Decide(c.oemID, c.hypervisor), c.name)
	}
}

// The exits line comes at most once a period, and only when the guest
// exited since the last one.
func TestAliveLine(t *testing.T) {
	now := time.Unix(1000, 0)
	total, calls := uint64(0), 0
	counts := func() (uint64, string) { calls++; return total, "vCPU 0: n" }
	var off aliveLog
	assert.Empty(t, off.line(now, counts), "off: no line")
	assert.Zero(t, calls, "off: not even counted")

	a := aliveLog{every: 5 * time.Second}
	total = 7
	assert.Equal(t, "tamahv: alive: 7 exits (vCPU 0: n)", a.line(now, counts))
	total = 9
	assert.Empty(t, a.line(now.Add(4*time.Second), counts), "within the period")
	assert.Equal(t, "tamahv: alive: 9 exits (vCPU 0: n)", a.line(now.Add(5*time.Second), counts))
	assert.Empty(t, a.line(now.Add(10*time.Second), counts), "no exit since: no line")
	total = 10
	assert.Empty(t, a.line(now.Add(12*time.Second), counts), "the unchanged count restarted the period")
	assert.NotEmpty(t, a.line(now.Add(15*time.Second), counts))
}
