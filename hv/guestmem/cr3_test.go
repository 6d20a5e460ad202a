package guestmem

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

func TestAddressSpaceNormalisation(t *testing.T) {
	for _, c := range []struct {
		cr3  uint64
		pti  bool
		want uint64
	}{
		{0x1234_5000, false, 0x1234_5000},
		{0x1234_5018, false, 0x1234_5000},                // PWT, PCD
		{0x1234_5fff, false, 0x1234_5000},                // PCID
		{1<<63 | 0x1234_5001, false, 0x1234_5000},        // no-flush bit
		{3<<61 | 0x1234_5000, false, 0x1234_5000},        // LAM bits
		{0x1234_6000 | PTIUserBit, false, 0x1234_7000},   // without isolation bit 12 is an address bit
		{0x1234_6000, true, 0x1234_6000},                 // kernel PGD
		{0x1234_7000, true, 0x1234_6000},                 // user PGD: its kernel PGD
		{1<<63 | 0x1234_7000 | 0x801, true, 0x1234_6000}, // user PCID 1|bit 11, no flush
		{0x1234_6001, true, 0x1234_6000},                 // kernel PCID 1
	} {
		got := AddressSpace(c.cr3, c.pti)
		assert.Equal(t, fmt.Sprintf("%#x", c.want), fmt.Sprintf("%#x", got), "%#x pti=%t", c.cr3, c.pti)
		assert.Equal(t, got, AddressSpace(got, c.pti), "idempotent")
	}
	var s *AddressSpaces
	assert.Equal(t, uint64(0x1234_7000), s.Of(0x1234_7801), "nil: exact")
}

// ptiProcess lays out an isolated Linux process in g: the kernel PGD at
// g.cr3 (8 KiB aligned) and the user PGD in the next page, whose user
// half is the kernel PGD's (the kernel copy carries NX and its own
// accessed bits) and whose kernel half maps only a trampoline entry.
func ptiProcess(t *testing.T, g *testGuest) (k, u uint64) {
	k = g.cr3
	require.Zero(t, k&(2*4096-1), "kernel PGD 8 KiB aligned")
	u = g.frame()
	require.Equal(t, k|PTIUserBit, u)
	g.mapPage(0x400000, 0x300000, vmx.PTEWritable|vmx.PTEUser)         // user code
	g.mapPage(0x7fff_ffff_e000, 0x301000, vmx.PTEWritable|vmx.PTEUser) // user stack
	g.mapPage(0xffff_8880_0000_0000, 0, vmx.PTEWritable)               // direct map
	g.mapPage(0xffff_ffff_8100_0000, 0x1000000, 0)                     // kernel text
	for i := uint64(0); i < 256; i++ {
		e := g.mem.get64(k + 8*i)
		g.mem.put64(u+8*i, e)
		if e&vmx.PTEPresent != 0 {
			g.mem.put64(k+8*i, e|vmx.PTEExecuteDisable|1<<5) // NX and accessed in the kernel copy
		}
	}
	g.mem.put64(u+8*508, g.frame()|vmx.PTEPresent|vmx.PTEWritable) // cpu_entry_area
	return k, u
}

// twoProcesses lays out two processes without isolation whose PGDs are
// adjacent pages: a (bit 12 clear) and b = a|bit 12, each with its own user
// tables and the same kernel half.
func twoProcesses(t *testing.T, g *testGuest) (a, b uint64) {
	a = g.cr3
	b = g.frame()
	require.Equal(t, a|PTIUserBit, b)
	g.mapPage(0x400000, 0x300000, vmx.PTEWritable|vmx.PTEUser)
	g.mapPage(0xffff_8880_0000_0000, 0, vmx.PTEWritable)
	g.mapPage(0xffff_ffff_8100_0000, 0x1000000, 0)
	g.cr3 = b
	g.mapPage(0x400000, 0x310000, vmx.PTEWritable|vmx.PTEUser)
	for i := uint64(256); i < 512; i++ {
		g.mem.put64(b+8*i, g.mem.get64(a+8*i))
	}
	g.cr3 = a
	return a, b
}

func TestAddressSpacesLearnIsolationFromThePair(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	k, u := ptiProcess(t, g)
	s := &AddressSpaces{Mem: g.phys}
	assert.Zero(t, s.System(), "no kernel address space seen yet")

	s.Observe(k|1, 0, true)
	assert.Equal(t, PTIUnknown, s.PTI(), "a kernel-mode exit proves nothing")
	assert.Equal(t, k, s.System())
	assert.Equal(t, u, s.Of(u|0x801), "unknown: exact")

	s.Observe(u|0x801, 3, true)
	assert.Equal(t, PTIOn, s.PTI())
	assert.Equal(t, uint64(1), s.Checks)
	for _, cr3 := range []uint64{k, k | 1, u, u | 0x801, 1<<63 | u | 0x801} {
		assert.Equal(t, k, s.Of(cr3), "%#x", cr3)
	}
	assert.Equal(t, k, s.System())
	// A kernel-mode exit in the entry trampoline (user CR3 at CPL 0)
	// still names the kernel PGD.
	s.Observe(u|0x801, 0, true)
	assert.Equal(t, k, s.System())
	assert.Equal(t, PTIOn, s.PTI(), "decided once")
}

func TestAddressSpacesKeepAdjacentProcessesApart(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	a, b := twoProcesses(t, g)
	s := &AddressSpaces{Mem: g.phys}
	s.Observe(b, 3, true)
	assert.Equal(t, PTIUnknown, s.PTI(), "b and a are not a pair")
	assert.Equal(t, uint64(1), s.Checks)
	assert.Equal(t, b, s.Of(b))
	assert.NotEqual(t, s.Of(a), s.Of(b))
	s.Observe(a, 3, true)
	assert.Equal(t, PTIOff, s.PTI(), "user mode with bit 12 clear")
	assert.Equal(t, b, s.Of(b|5))
	assert.Equal(t, a, s.Of(a))
	assert.Equal(t, a, s.System())
	s.Observe(b, 0, true)
	assert.Equal(t, b, s.System(), "every PGD maps the kernel half")

	// Same user tables in both (never so in Linux) are still not a pair:
	// b maps as much of the kernel half as a.
	for i := uint64(0); i < 256; i++ {
		g.mem.put64(b+8*i, g.mem.get64(a+8*i))
	}
	s = &AddressSpaces{Mem: g.phys}
	s.Observe(b, 3, true)
	assert.Equal(t, PTIUnknown, s.PTI())
}

func TestAddressSpacesWaitThroughATornPair(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	k, u := ptiProcess(t, g)
	saved := g.mem.get64(u)
	g.mem.put64(u, saved^0x5000) // another processor half-way through set_pgd
	s := &AddressSpaces{Mem: g.phys}
	s.Observe(u, 3, true)
	assert.Equal(t, PTIUnknown, s.PTI(), "a mismatch decides nothing")
	assert.Equal(t, u, s.Of(u))
	g.mem.put64(u, saved)
	s.Observe(k, 0, true)
	s.Observe(u, 3, true)
	assert.Equal(t, PTIOn, s.PTI(), "checked again at a later exit")

	// Only 32-bit or real-mode code, or a PGD outside guest RAM: nothing.
	s = &AddressSpaces{Mem: g.phys}
	s.Observe(0x1000, 3, false)
	s.Observe(holeStart|PTIUserBit, 3, true)
	assert.Equal(t, PTIUnknown, s.PTI())
	// An empty user half is no pair either.
	for i := uint64(0); i < 256; i++ {
		g.mem.put64(u+8*i, 0)
		g.mem.put64(k+8*i, 0)
	}
	s.Observe(u, 3, true)
	assert.Equal(t, PTIUnknown, s.PTI())
}

func TestAddressSpacesSystemIsValidated(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	k, _ := ptiProcess(t, g)
	s := &AddressSpaces{Mem: g.phys}
	s.Observe(holeStart, 0, true)
	assert.Zero(t, s.System(), "not guest RAM")
	empty := g.frame()
	s.Observe(empty&^PTIUserBit, 0, true)
	if empty&PTIUserBit == 0 {
		assert.Zero(t, s.System(), "maps nothing of the kernel")
	}
	s.Observe(k, 0, true)
	assert.Equal(t, k, s.System())
}

func TestAddressSpacesObserveExits(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	k, u := ptiProcess(t, g)
	m := hvtest.NewVMCS()
	v := hv.NewVCPU(m, hvtest.Skylake())
	s := &AddressSpaces{Mem: g.phys}
	s.Install(v)
	m.Fields[vmx.GuestRIP], m.Fields[vmx.ExitQualification], m.Fields[vmx.IDTVectoringInfo] = 0x1000, 0, 0
	m.Fields[vmx.EntryControls] = vmx.EntryIA32eMode
	m.Fields[vmx.GuestCR0] = vmx.CR0PG
	m.Fields[vmx.GuestCR3] = k | 1
	m.Fields[vmx.GuestSSAccess] = 0x93
	observe(t, v)
	assert.Equal(t, PTIUnknown, s.PTI())
	m.Fields[vmx.GuestCR3] = u | 0x801
	m.Fields[vmx.GuestSSAccess] = 0xf3 // DPL 3
	observe(t, v)
	observe(t, v)
	assert.Equal(t, PTIOn, s.PTI())
	assert.Equal(t, uint64(1), s.Checks, "one check for one CR3")
	assert.Equal(t, k, s.System())
	require.NoError(t, m.Err())
}

// Several vCPUs may learn and ask at once (run with -race).
func TestAddressSpacesConcurrentUse(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	k, u := ptiProcess(t, g)
	s := &AddressSpaces{Mem: g.phys}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 100; i++ {
			s.Observe(k, 0, true)
			s.Observe(u, 3, true)
		}
	}()
	for i := 0; i < 100; i++ {
		if cr3 := s.Of(u); cr3 != u {
			assert.Equal(t, k, cr3)
		}
		_ = s.System()
	}
	<-done
	assert.Equal(t, PTIOn, s.PTI())
	assert.Equal(t, k, s.Of(u))
}

// TestAddressSpacesKeepTheWalkersPagingMode: the tracker sets the walker's
// paging mode from the vCPU whenever CR3 changes (5-level paging,
// IA32_EFER.NXE), so that a walk needs no mode of its own, and reads it
// at no other exit.
func TestAddressSpacesKeepTheWalkersPagingMode(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	m := hvtest.NewVMCS()
	v := hv.NewVCPU(m, hvtest.Skylake())
	w := &Walker{Mem: g.phys}
	s := &AddressSpaces{Mem: g.phys, Walker: w}
	s.Install(v)
	m.Fields[vmx.GuestRIP], m.Fields[vmx.ExitQualification], m.Fields[vmx.IDTVectoringInfo] = 0x1000, 0, 0
	m.Fields[vmx.EntryControls] = vmx.EntryIA32eMode
	m.Fields[vmx.GuestCR0] = vmx.CR0PG
	m.Fields[vmx.GuestSSAccess] = 0x93
	m.Fields[vmx.GuestCR3] = g.cr3
	m.Fields[vmx.GuestCR4] = vmx.CR4LA57
	m.Fields[vmx.GuestEFER] = 0
	observe(t, v)
	assert.True(t, w.LA57)
	assert.True(t, w.NoNXE)
	m.Fields[vmx.GuestCR4], m.Fields[vmx.GuestEFER] = 0, vmx.EFERNXE
	observe(t, v)
	assert.True(t, w.LA57, "CR3 did not change: the mode is not read again")
	m.Fields[vmx.GuestCR3] = g.cr3 + 0x2000
	observe(t, v)
	assert.False(t, w.LA57)
	assert.False(t, w.NoNXE)
	require.NoError(t, m.Err())
}

// TestINITStateLeavesTheWalkersPagingMode: a vCPU in its INIT state (CR3,
// EFER and CR0 clear: an AP the guest brings online) exits while a watch
// whose leaf is execute-disable is walked again: the walker keeps the
// 64-bit kernel's mode (XD bits valid), and the watch neither fails nor
// hears of a change. The system address space stays the kernel's.
func TestINITStateLeavesTheWalkersPagingMode(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	const va = 0x7f0000400000
	g.mapPage(va, 0x3000000, vmx.PTEWritable|vmx.PTEUser|vmx.PTEExecuteDisable)
	pte := g.entry(va, 1)
	gm := NewWatcher(g.phys, g.cr3)
	var failed []error
	gm.OnWatchError = func(cr3, va uint64, err error) { failed = append(failed, err) }
	var heard []swapmem.Translation
	cancel, err := gm.Watch(g.cr3, va, func(tr swapmem.Translation) { heard = append(heard, tr) })
	require.NoError(t, err)
	defer cancel()
	a, ma := vcputest.Scripted(t, nil)
	b, mb := vcputest.Scripted(t, nil)
	s := &AddressSpaces{Mem: g.phys, Walker: &gm.Walker}
	s.decide(PTIOff, g.cr3)
	for _, v := range []*hv.VCPU{a, b} {
		s.Install(v)
		require.NoError(t, gm.Install(v))
	}
	// a: the 64-bit kernel, NXE on.
	ma.Fields[vmx.EntryControls] = vmx.EntryIA32eMode
	ma.Fields[vmx.GuestCR0] = vmx.CR0PG
	ma.Fields[vmx.GuestCR3] = g.cr3
	ma.Fields[vmx.GuestEFER] = vmx.EFERNXE
	ma.Fields[vmx.GuestSSAccess] = 0x93
	// b: the INIT state.
	mb.Fields[vmx.EntryControls], mb.Fields[vmx.GuestCR0], mb.Fields[vmx.GuestCR3] = 0, 0, 0
	mb.Fields[vmx.GuestEFER], mb.Fields[vmx.GuestCR4] = 0, 0
	mb.Fields[vmx.GuestSSAccess] = 0x93
	b.VMCS.Write(vmx.ExitQualification, 0)
	exit := func(v *hv.VCPU, r vmx.ExitReason) {
		v.VMCS.Write(vmx.ExitReasonField, uint64(r))
		v.VMCS.Write(vmx.IDTVectoringInfo, 0)
		v.VMCS.Write(vmx.ExitInstructionLen, 3)
		_, err := v.HandleExit()
		require.NoError(t, err)
	}
	// a opens the page table for the processor's flag updates; b's exit
	// closes it and walks the watch again.
	ma.Fields[vmx.GuestPhysAddr] = pte
	ma.Fields[vmx.ExitQualification] = qualFlags
	exit(a, vmx.ExitEPTViolation)
	require.False(t, gm.Walker.NoNXE)
	require.NoError(t, a.PrepareEntry())
	exit(b, vmx.ExitPreemptionTimer)
	assert.False(t, gm.Walker.NoNXE, "the INIT state's EFER is not the kernel's")
	assert.Empty(t, failed)
	assert.Empty(t, heard, "the translation did not change")
	assert.Equal(t, g.cr3, s.system.Load(), "the system address space stays the kernel's")
}
