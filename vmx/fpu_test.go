package vmx

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Floating-point controls (SDM Vol. 1, "MXCSR Control and Status Register"
// and "x87 FPU Control Word").
const (
	mxcsrDefault = 0x1f80 // every SIMD exception masked, round to nearest
	mxcsrPM      = 1 << 12
	fcwDefault   = 0x037f // FNINIT's control word
	fcwPM        = 1 << 5
)

// hostileMXCSR unmasks the precision exception, as LDMXCSR in any guest
// process can: the next inexact SSE operation raises #XM.
const hostileMXCSR = mxcsrDefault&^mxcsrPM | 0x6000 // and round toward zero

//go:noinline
func inexact(tsc uint64, mult float64) int64 { return int64(float64(tsc) * mult) }

// TestExitLoadsTamahvFPControls runs vmexit's switch with a hostile guest
// MXCSR and x87 control word: tamahv's controls are in force afterwards,
// and the expression of TamaGo's clock (amd64 GetTime) does not trap.
func TestExitLoadsTamahvFPControls(t *testing.T) {
	mx, cw := fpSwitch(hostileMXCSR, fcwDefault&^fcwPM)
	assert.Equal(t, uint32(mxcsrDefault), mx&^0x3f, "MXCSR after the switch") // flags 5:0 are status
	assert.Equal(t, uint16(fcwDefault), cw, "x87 control word after the switch")
	assert.NotPanics(t, func() { inexact(0x1234567, 0.4166666666666667) })
}

// TestExitSwitchesFPBeforeGo checks that both ways back to Go from vmrun
// (VM exit and failed VM entry) load tamahv's controls right after the
// guest's state is final, and that entry saves them first.
func TestExitSwitchesFPBeforeGo(t *testing.T) {
	b, err := os.ReadFile("run_amd64.s")
	require.NoError(t, err)
	src := string(b)
	body := func(name string) string {
		i := strings.Index(src, "TEXT ·"+name)
		require.GreaterOrEqual(t, i, 0, name)
		rest := src[i+1:]
		if j := strings.Index(rest, "\nTEXT "); j >= 0 {
			rest = rest[:j]
		}
		return rest
	}
	run, exit := body("vmrun"), body("vmexit")
	order := func(text string, re ...string) {
		pos := 0
		for _, r := range re {
			loc := regexp.MustCompile(r).FindStringIndex(text[pos:])
			require.NotNil(t, loc, "%q after offset %d", r, pos)
			pos += loc[1]
		}
	}
	order(run, `PUSHQ\t\$0\n\tHOST_FP_SAVE\(0\)`, `FXRSTOR64`, `VMLAUNCH`, `failed:`, `POPQ\tDI\n\tHOST_FP_LOAD\(0\)\n`, `RET`)
	order(exit, `FXSAVE64\t\(DI\)\n\tHOST_FP_LOAD\(16\)\n`, `RET`)
	assert.NotContains(t, exit[:strings.Index(exit, "HOST_FP_LOAD")], "CALL", "no Go before the switch")
}

// BenchmarkFPSwitch measures what the switch adds to an exit and an entry
// (HOST_FP_SAVE, a guest's LDMXCSR/FLDCW, HOST_FP_LOAD).
func BenchmarkFPSwitch(b *testing.B) {
	for b.Loop() {
		fpSwitch(mxcsrDefault, fcwDefault)
	}
}
