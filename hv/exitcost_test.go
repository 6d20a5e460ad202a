package hv

import (
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/vmx"
)

type arrayVMCS = hvtest.ArrayVMCS

// cpuidGuest is a vCPU wired as hv/machine wires its own parts (NMIs
// taken from VMX root, the preemption timer; package pagein's test adds
// the page-table watcher and swapmem's hands),
// whose guest executes CPUID (leaf 0) in a loop: Enter returns a CPUID exit
// n times, then a triple fault that ends Run.
func cpuidGuest(tb testing.TB, n *int) (*VCPU, *arrayVMCS) {
	m := &arrayVMCS{}
	v := NewVCPU(m, skylake())
	require.NoError(tb, v.Init(Setup{EPTP: 0x1e, VPID: 1, Preemption: true, ExceptionBM: 1 << vmx.VectorBP},
		&Start{CodeSel: 0x10, DataSel: 0x18}))
	var nmis atomic.Uint32
	v.TakeNMI = func() bool { return nmis.Swap(0) != 0 }
	v.PreemptionTicks = 100000
	v.CPUID = func(leaf, _ uint32) (uint32, uint32, uint32, uint32) {
		if leaf == 0 {
			return 0x16, 0x756e6547, 0x6c65746e, 0x49656e69 // GenuineIntel
		}
		return 0, 0, 0, 0
	}
	v.Enter = func(v *VCPU, _ bool) error {
		r := vmx.ExitCPUID
		if *n--; *n < 0 {
			r = vmx.ExitTripleFault
		}
		m.Fields[vmx.ExitReasonField] = uint64(r)
		m.Fields[vmx.ExitInstructionLen] = 2
		v.Regs.RAX, v.Regs.RCX = 0, 0
		return nil
	}
	return v, m
}

// BenchmarkCPUIDExit is the exit path of CPUID: Run's loop from one VM
// exit to the next entry, with the VMCS accesses counted per exit.
func BenchmarkCPUIDExit(b *testing.B) {
	n := b.N
	v, m := cpuidGuest(b, &n)
	b.ResetTimer()
	err := v.Run()
	b.StopTimer()
	require.ErrorIs(b, err, ErrGuestTripleFault)
	b.ReportMetric(float64(m.Reads)/float64(b.N), "vmreads/exit")
	b.ReportMetric(float64(m.Writes)/float64(b.N), "vmwrites/exit")
}

// TestCPUIDExitIsCheap checks what a CPUID exit costs in VMCS accesses:
// the exit reason and RIP (snapshot), the instruction length, RIP and the
// interruptibility state (skipInstruction), and nothing else; the timer
// is armed once. Its answer is the host's.
func TestCPUIDExitIsCheap(t *testing.T) {
	n := 100
	v, m := cpuidGuest(t, &n)
	m.Reset()
	require.ErrorIs(t, v.Run(), ErrGuestTripleFault)
	assert.Equal(t, uint64(100), v.Counts()[vmx.ExitCPUID])
	assert.Equal(t, uint64(0x756e6547), v.Regs.RBX)
	// The triple fault that ends the run reads four fields.
	assert.Equal(t, uint32(101), m.FieldReads[vmx.ExitReasonField])
	assert.Equal(t, uint32(101), m.FieldReads[vmx.GuestRIP])
	assert.Equal(t, uint32(1), m.FieldReads[vmx.ExitQualification], "CPUID records no qualification")
	assert.Equal(t, uint32(1), m.FieldReads[vmx.IDTVectoringInfo], "CPUID is not taken in event delivery")
	assert.Equal(t, uint32(100), m.FieldReads[vmx.ExitInstructionLen])
	assert.Equal(t, uint32(100), m.FieldReads[vmx.GuestInterruptibility])
	assert.Equal(t, uint32(100), m.FieldWrites[vmx.GuestRIP])
	assert.Equal(t, uint32(1), m.FieldWrites[vmx.PreemptionTimerValue], "the timer is armed at the first entry only")
	assert.Equal(t, uint32(1), m.FieldReads[vmx.ExitControls], "whether the exit saves the timer, asked once")
	assert.Zero(t, m.FieldReads[vmx.ProcControls]+m.FieldWrites[vmx.ProcControls], "no event, no window")
	assert.Equal(t, uint64(4*100+4+1), m.Reads, "VMREADs")
	assert.Equal(t, uint64(100+1), m.Writes, "VMWRITEs")
}

// TestSnapshotReadsWhatTheReasonRecords: exits that record a
// qualification or may interrupt event delivery have them read; the
// plain instruction exits do not.
func TestSnapshotReadsWhatTheReasonRecords(t *testing.T) {
	m := &arrayVMCS{}
	v := NewVCPU(m, skylake())
	m.Fields[vmx.ExitQualification] = 0x1234
	m.Fields[vmx.IDTVectoringInfo] = 0x80000b0e
	for r := vmx.ExitReason(0); r < vmx.NumExitReasons; r++ {
		if !r.Valid() {
			continue
		}
		m.Fields[vmx.ExitReasonField] = uint64(r)
		e := v.snapshot()
		if r.Plain() {
			assert.Zero(t, e.Qualification, "%v", r)
			assert.Zero(t, e.IDTVectoring, "%v", r)
		} else {
			assert.Equal(t, uint64(0x1234), e.Qualification, "%v", r)
			assert.Equal(t, uint32(0x80000b0e), e.IDTVectoring, "%v", r)
		}
	}
	// Exits with a qualification or taken during event delivery.
	for _, r := range []vmx.ExitReason{vmx.ExitExceptionOrNMI, vmx.ExitEPTViolation, vmx.ExitEPTMisconfig, vmx.ExitCRAccess,
		vmx.ExitIO, vmx.ExitTaskSwitch, vmx.ExitMovDR, vmx.ExitINVLPG, vmx.ExitVMREAD, vmx.ExitPreemptionTimer,
		vmx.ExitInterruptWindow, vmx.ExitNMIWindow, vmx.ExitExternalInterrupt, vmx.ExitTripleFault, vmx.ExitAPICAccess} {
		assert.False(t, r.Plain(), "%v", r)
	}
	// A failed entry is read in full, whatever its reason.
	m.Fields[vmx.ExitReasonField] = uint64(vmx.ExitCPUID) | 1<<31
	assert.Equal(t, uint64(0x1234), v.snapshot().Qualification)
}

// TestTimerArmedWhenItChanges: the preemption-timer field is written at
// the first entry and when PreemptionTicks changes; with "save
// VMX-preemption timer value" on, the exit overwrites it, so every entry
// writes it.
func TestTimerArmedWhenItChanges(t *testing.T) {
	n := 10
	v, m := cpuidGuest(t, &n)
	m.Reset()
	v.PreemptionTicks = 500
	for i := 0; i < 3; i++ {
		require.NoError(t, v.prepareEntry())
		v.launched = true
	}
	assert.Equal(t, uint32(1), m.FieldWrites[vmx.PreemptionTimerValue])
	assert.Equal(t, uint64(500), m.Fields[vmx.PreemptionTimerValue])
	v.PreemptionTicks = 700
	require.NoError(t, v.prepareEntry())
	require.NoError(t, v.prepareEntry())
	assert.Equal(t, uint32(2), m.FieldWrites[vmx.PreemptionTimerValue])
	assert.Equal(t, uint64(700), m.Fields[vmx.PreemptionTimerValue])

	m.Fields[vmx.ExitControls] |= vmx.ExitSavePreemptionTime
	v.launched = false // a VMCS entered for the first time
	m.Reset()
	for i := 0; i < 3; i++ {
		require.NoError(t, v.prepareEntry())
		v.launched = true
		m.Fields[vmx.PreemptionTimerValue] = 3 // what the exit saved
	}
	assert.Equal(t, uint32(3), m.FieldWrites[vmx.PreemptionTimerValue])
}

// TestIdleEntryLeavesControlsAlone: with no event queued and no window
// asked for, an entry neither reads nor writes the processor-based
// controls; an event that must wait opens a window, and its delivery
// closes it.
func TestIdleEntryLeavesControlsAlone(t *testing.T) {
	n := 10
	v, m := cpuidGuest(t, &n)
	m.Reset()
	require.NoError(t, v.prepareEntry())
	assert.Zero(t, m.FieldReads[vmx.ProcControls]+m.FieldWrites[vmx.ProcControls])

	m.Fields[vmx.GuestRFLAGS] = 0 // IF clear
	require.NoError(t, v.Inject(vmx.Event{Vector: 0x30, Type: vmx.EventExternal}))
	require.NoError(t, v.prepareEntry())
	assert.NotZero(t, m.Fields[vmx.ProcControls]&vmx.ProcInterruptWindow)
	m.Fields[vmx.GuestRFLAGS] = vmx.RFLAGSIF
	require.NoError(t, v.prepareEntry())
	assert.Zero(t, m.Fields[vmx.ProcControls]&vmx.ProcInterruptWindow, "window closed")
	assert.Equal(t, uint64(vmx.Event{Vector: 0x30, Type: vmx.EventExternal}.Info()), m.Fields[vmx.EntryInterruptInfo])
	m.Reset()
	require.NoError(t, v.prepareEntry())
	assert.Zero(t, m.FieldReads[vmx.ProcControls]+m.FieldWrites[vmx.ProcControls])
}

// TestFlagLeavesCoverEveryFilteredFlag keeps flagLeaf, which lets the
// other leaves skip the scans, in step with the lists it guards.
func TestFlagLeavesCoverEveryFilteredFlag(t *testing.T) {
	for _, f := range cpuidHidden() {
		assert.True(t, flagLeaf(f.Leaf), "%s (leaf %#x)", f.Name, f.Leaf)
	}
	for _, g := range vmx.Proc2Gates() {
		assert.True(t, flagLeaf(g.Feature.Leaf), "%s (leaf %#x)", g.Feature.Name, g.Feature.Leaf)
	}
	assert.False(t, flagLeaf(0))
}

// TestUnfilteredLeavesPassThrough: a leaf filteredLeaf leaves out is one
// filterCPUID would not change, so the handler may skip the call.
func TestUnfilteredLeavesPassThrough(t *testing.T) {
	m := &arrayVMCS{}
	v := NewVCPU(m, skylake())
	for _, base := range []uint32{0, 0x40000000, 0x80000000} {
		for leaf := base; leaf < base+0x40; leaf++ {
			if filteredLeaf(leaf) {
				continue
			}
			for sub := uint32(0); sub < 4; sub++ {
				r := [4]uint32{^uint32(0), ^uint32(0), ^uint32(0), ^uint32(0)}
				v.filterCPUID(leaf, sub, &r)
				assert.Equal(t, [4]uint32{^uint32(0), ^uint32(0), ^uint32(0), ^uint32(0)}, r, "leaf %#x.%d", leaf, sub)
			}
		}
	}
	assert.True(t, filteredLeaf(1))
	assert.False(t, filteredLeaf(0))
}
