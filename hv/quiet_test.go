package hv

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/vmx"
)

// tableVCPU is a vCPU whose processor answers every leaf with bits set
// everywhere (so that every filter shows), leaf 0 and 0x80000000 with
// their highest leaves.
func tableVCPU(t *testing.T) (*VCPU, *arrayVMCS) {
	m := &arrayVMCS{}
	v := NewVCPU(m, skylake())
	require.NoError(t, v.Init(Setup{EPTP: 0x1e, VPID: 1, Preemption: true}, &Start{CodeSel: 0x10, DataSel: 0x18}))
	v.CPUID = func(leaf, sub uint32) (uint32, uint32, uint32, uint32) {
		switch leaf {
		case 0:
			return 0x1f, 0x756e6547, 0x6c65746e, 0x49656e69
		case 0x80000000:
			return 0x80000008, 0, 0, 0
		}
		return ^uint32(0) - sub, ^uint32(0), ^uint32(0), ^leaf
	}
	return v, m
}

// TestCPUIDTableAgreesWithTheHandler: every answer of the table a
// processor gives the guest itself is, for a guest with CR4.OSXSAVE set
// and clear, what CPUID's exit handling answers: the table is the Go
// policy's, made by it, and hides what it hides.
func TestCPUIDTableAgreesWithTheHandler(t *testing.T) {
	v, m := tableVCPU(t)
	table := v.CPUIDTable()
	require.NotEmpty(t, table)
	keys := map[[2]uint32]bool{}
	for _, e := range table {
		keys[[2]uint32{e.Leaf, e.Subleaf}] = true
		for _, cr4 := range []uint64{0x2020, 0x2020 | vmx.CR4OSXSAV} {
			m.Fields[vmx.GuestCR4] = cr4
			v.Regs.RAX, v.Regs.RCX = uint64(e.Leaf), uint64(e.Subleaf)
			act, err := handleCPUID(v, nil)
			require.NoError(t, err)
			assert.Equal(t, Next, act)
			got := e.Answer(cr4)
			assert.Equal(t, [4]uint64{uint64(got[0]), uint64(got[1]), uint64(got[2]), uint64(got[3])},
				[4]uint64{v.Regs.RAX, v.Regs.RBX, v.Regs.RCX, v.Regs.RDX}, "leaf %#x.%d, CR4 %#x", e.Leaf, e.Subleaf, cr4)
		}
	}
	for _, k := range [][2]uint32{{0, 0}, {1, 0}, {7, 0}, {7, 1}, {4, 3}, {0xb, 1}, {0x40000000, 0}, {0x80000001, 0}, {0x80000008, 0}} {
		assert.True(t, keys[k], "leaf %#x.%d is in the table", k[0], k[1])
	}
	for _, k := range [][2]uint32{{0xd, 0}, {0xd, 1}, {0, 1}, {1, 1}, {7, 4}, {0x20, 0}, {0x80000009, 0}} {
		assert.False(t, keys[k], "leaf %#x.%d is not", k[0], k[1])
	}
	for _, e := range table {
		if e.Leaf == 1 {
			assert.Zero(t, e.Regs[vmx.ECX]&vmx.CPUIDVMX, "no VMX")
			assert.EqualValues(t, vmx.CR4OSXSAV, e.CR4Mask)
		}
	}

	require.NoError(t, v.Intercept(vmx.ExitCPUID, func(v *VCPU, e *vmx.Exit, next Handler) (Action, error) { return next(v, e) }))
	assert.Empty(t, v.CPUIDTable(), "an interceptor sees every CPUID")
}

// TestQuiet: a vCPU is quiet with nothing of its own for the next exit,
// and not with an event queued or placed, while it waits for SIPI, or
// while an extension needs the exit.
func TestQuiet(t *testing.T) {
	v, m := tableVCPU(t)
	assert.True(t, v.Quiet())
	need := false
	v.NeedExit(func(*VCPU) bool { return need })
	assert.True(t, v.Quiet())
	need = true
	assert.False(t, v.Quiet(), "an extension needs the exit")
	need = false

	require.NoError(t, v.InjectException(vmx.VectorUD, 0))
	assert.False(t, v.Quiet(), "an event queued")
	v.DropEvents()
	m.Fields[vmx.EntryInterruptInfo] = vmx.EventValid | 6
	assert.False(t, v.Quiet(), "an event placed")
	m.Fields[vmx.EntryInterruptInfo] = 0
	assert.True(t, v.Quiet())
	v.waitForSIPI()
	assert.False(t, v.Quiet(), "waits for SIPI")
}
