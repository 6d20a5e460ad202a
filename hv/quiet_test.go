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
	for _, k := range [][2]uint32{{0, 0}, {1, 0}, {4, 3}, {0xb, 1}, {0x1f, 3}, {0x40000000, 0}, {0x80000001, 0}, {0x80000008, 0}} {
		assert.True(t, keys[k], "leaf %#x.%d is in the table", k[0], k[1])
	}
	for _, k := range [][2]uint32{{0xd, 0}, {0xd, 1}, {7, 0}, {7, 1}, {0, 1}, {1, 1}, {0x20, 0}, {0x80000009, 0}} {
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

// TestQuietCPUIDAnswersWithoutHandling: after a quiet entry, Run answers
// CPUID from the table and enters again at once: the handler's answer,
// RIP past the instruction, the exit counted, no observer and no entry
// function. The exit is handled as any other where the leaf is not in
// the table, while the caller's work is due, and after an entry that was
// not quiet.
func TestQuietCPUIDAnswersWithoutHandling(t *testing.T) {
	n := 10
	v, m := cpuidGuest(t, &n)
	observed, entries := 0, 0
	v.Observe(func(*VCPU, *vmx.Exit) { observed++ })
	v.OnEntry(func(*VCPU) { entries++ })
	due := false
	need := false
	v.NeedExit(func(*VCPU) bool { return need })
	v.QuietCPUID(v.CPUIDTable(), func() bool { return due })
	m.Fields[vmx.GuestRIP] = 0x1000
	require.ErrorIs(t, v.Run(), ErrGuestTripleFault)
	assert.EqualValues(t, 10, v.Counts()[vmx.ExitCPUID])
	assert.EqualValues(t, 10, v.QuietlyAnswered())
	assert.Equal(t, 1, observed, "the triple fault only")
	assert.Equal(t, 1, entries, "the first entry only")
	assert.EqualValues(t, 0x1000+2*10, m.Fields[vmx.GuestRIP])
	assert.Equal(t, uint64(0x756e6547), v.Regs.RBX, "the handler's answer")
	assert.EqualValues(t, 11, v.Entries())

	// Due work, an extension that needs the exit: handled.
	for _, c := range []struct {
		name      string
		due, need bool
	}{{"due", true, false}, {"needed", false, true}} {
		n, observed, entries = 3, 0, 0
		due, need = c.due, c.need
		require.ErrorIs(t, v.Run(), ErrGuestTripleFault, c.name)
		assert.Equal(t, 4, observed, c.name)
		assert.Equal(t, 4, entries, c.name)
		assert.EqualValues(t, 10, v.QuietlyAnswered(), c.name)
	}

	// A leaf the table does not answer (0xd): handled.
	due, need = false, false
	n, observed = 3, 0
	v.Enter = func(v *VCPU, _ bool) error {
		r := vmx.ExitCPUID
		if n--; n < 0 {
			r = vmx.ExitTripleFault
		}
		m.Fields[vmx.ExitReasonField] = uint64(r)
		m.Fields[vmx.ExitInstructionLen] = 2
		v.Regs.RAX, v.Regs.RCX = 0xd, 0
		return nil
	}
	require.ErrorIs(t, v.Run(), ErrGuestTripleFault)
	assert.Equal(t, 4, observed)
	v.QuietCPUID(nil, nil)
	assert.Zero(t, v.QuietlyAnswered())
}

// BenchmarkQuietCPUIDExit is BenchmarkCPUIDExit's guest answered from
// the table after a quiet entry.
func BenchmarkQuietCPUIDExit(b *testing.B) {
	n := b.N
	v, m := cpuidGuest(b, &n)
	v.QuietCPUID(v.CPUIDTable(), func() bool { return false })
	b.ResetTimer()
	err := v.Run()
	b.StopTimer()
	require.ErrorIs(b, err, ErrGuestTripleFault)
	b.ReportMetric(float64(m.Reads)/float64(b.N), "vmreads/exit")
	b.ReportMetric(float64(m.Writes)/float64(b.N), "vmwrites/exit")
}

// TestOSPKEFollowsTheGuestsCR4: leaf 7's OSPKE is the guest's CR4.PKE,
// not tamahv's (CPUID runs in VMX root, on tamahv's CR4), as leaf 1's
// OSXSAVE is the guest's CR4.OSXSAVE.
func TestOSPKEFollowsTheGuestsCR4(t *testing.T) {
	v, m := tableVCPU(t)
	for _, c := range []struct {
		leaf, bit uint32
		cr4       uint64
	}{{7, vmx.CPUIDOSPKEBit, vmx.CR4PKE}, {1, vmx.CPUIDOSXSAVEBit, vmx.CR4OSXSAV}} {
		for _, on := range []bool{false, true} {
			m.Fields[vmx.GuestCR4] = 0x2020
			if on {
				m.Fields[vmx.GuestCR4] |= c.cr4
			}
			v.Regs.RAX, v.Regs.RCX = uint64(c.leaf), 0
			_, err := handleCPUID(v, nil)
			require.NoError(t, err)
			assert.Equal(t, on, v.Regs.RCX&uint64(c.bit) != 0, "leaf %d with CR4 %#x", c.leaf, m.Fields[vmx.GuestCR4])
		}
	}
}
