package pagein

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/hvtest/fakeguest"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// TestReturnTrap: a #PF injected at CPL 3 takes the execute permission of
// the interrupted instruction's page; the guest's return to it exits, the
// page gets its permissions back and the instruction runs again, at CPL 3
// in the process's address space, where the next #PF can go in. Before,
// the next exit in user mode was the VMX-preemption timer's.
func TestReturnTrap(t *testing.T) {
	g := fakeguest.New(t, ept.Options{})
	const code, codePA, rip = 0x400000, 0x600000, 0x400123
	g.MapPage(code, codePA, vmx.PTEUser)
	trap := &ReturnTrap{Phys: g.Phys, Walker: &guestmem.Walker{Mem: g.Phys}}
	fetch := uint64(0x4 | 0x8 | 0x10 | 0x80 | 0x100) // fetch, entry rw-
	var cpu *TrapCPU
	v, m := vcputest.Scripted(t, []vcputest.Step{
		{Reason: vmx.ExitCPUID, Check: func(t *testing.T, v *hv.VCPU) {
			// A #PF goes in at CPL 3 (swapmem's UserFault).
			v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP] = rip
			require.NoError(t, cpu.InjectPF(0x7f0000001000, 4))
			assert.Equal(t, uint64(1), trap.Arms)
			_, perm, _, _, _ := g.EPT.Lookup(codePA)
			assert.Equal(t, ept.Read|ept.Write, perm, "the code page cannot be executed")
		}},
		// The kernel brought the page in and returns to the instruction.
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: codePA | rip&0xfff, vmx.ExitQualification: fetch},
			Check: func(t *testing.T, v *hv.VCPU) {
				assert.Equal(t, uint64(1), trap.Hits)
				assert.Equal(t, uint64(rip), v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP], "the instruction runs again")
				_, perm, _, _, _ := g.EPT.Lookup(codePA)
				assert.Equal(t, ept.RWX, perm)
				assert.Zero(t, g.Phys.Owners())
			}},
	})
	m.Fields[vmx.GuestCR3] = g.CR3
	m.Fields[vmx.GuestSSAccess] |= 3 << 5
	cpu = &TrapCPU{CPU: &SwapCPU{V: v}, Trap: trap, V: v}
	require.NoError(t, trap.Install(v))
	require.NoError(t, v.Run())

	// A fetch violation on the page once the trap sprang is not the
	// trap's: it is passed on (here to the fatal default).
	v, _ = vcputest.Scripted(t, []vcputest.Step{{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: codePA, vmx.ExitQualification: fetch}}})
	require.NoError(t, trap.Install(v))
	assert.ErrorIs(t, v.Run(), hv.ErrFatalExit)
}

// TestReturnTrapOnlyInUserMode: a #PF injected in kernel mode, or at an
// instruction the walk does not show as a user page, arms nothing.
func TestReturnTrapOnlyInUserMode(t *testing.T) {
	g := fakeguest.New(t, ept.Options{})
	g.MapPage(0x400000, 0x600000, vmx.PTEUser)
	g.MapPage(0x401000, 0x601000, 0)
	trap := &ReturnTrap{Phys: g.Phys, Walker: &guestmem.Walker{Mem: g.Phys}}
	v, m := vcputest.Scripted(t, nil)
	m.Fields[vmx.GuestCR3] = g.CR3
	m.Fields[vmx.GuestRIP] = 0x400000
	m.Fields[vmx.EntryInterruptInfo] = 0
	cpu := &TrapCPU{CPU: &SwapCPU{V: v}, Trap: trap, V: v}
	require.NoError(t, cpu.InjectPF(0x1000, 0))
	assert.Zero(t, trap.Arms, "CPL 0")

	m.Fields[vmx.GuestSSAccess] |= 3 << 5
	m.Fields[vmx.EntryInterruptInfo] = 0
	m.Fields[vmx.GuestRIP] = 0x401000
	require.NoError(t, cpu.InjectPF(0x1000, 4))
	assert.Zero(t, trap.Arms, "a supervisor page")
	m.Fields[vmx.EntryInterruptInfo] = 0
	m.Fields[vmx.GuestRIP] = 0x402000
	require.NoError(t, cpu.InjectPF(0x1000, 4))
	assert.Zero(t, trap.Arms, "not mapped")
	assert.Zero(t, g.Phys.Owners())
}

// TestFetchTrapYields: the trap never stands in the way of a watch or the
// breakpoint agent: write-protecting or claiming a trapped page ends the
// trap first, and the trap's own disarm then changes nothing. A page
// tamahv already owns is not trapped.
func TestFetchTrapYields(t *testing.T) {
	g := fakeguest.New(t, ept.Options{})
	const pg = 0x600000
	require.NoError(t, g.Phys.TrapFetch(pg))
	assert.ErrorIs(t, g.Phys.TrapFetch(pg), guestmem.ErrPageInUse)
	require.NoError(t, g.Phys.WriteProtect(pg))
	_, perm, _, _, _ := g.EPT.Lookup(pg)
	assert.Equal(t, ept.Read|ept.Exec, perm, "write-protected, executable again")
	assert.Error(t, g.Phys.UntrapFetch(pg))
	assert.ErrorIs(t, g.Phys.TrapFetch(pg), guestmem.ErrPageInUse)
	require.NoError(t, g.Phys.Unprotect(pg))
	_, perm, _, _, _ = g.EPT.Lookup(pg)
	assert.Equal(t, ept.RWX, perm)

	require.NoError(t, g.Phys.TrapFetch(pg))
	require.NoError(t, g.Phys.Claim(pg))
	_, perm, _, _, _ = g.EPT.Lookup(pg)
	assert.Equal(t, ept.RWX, perm, "claimed as it was")
	require.NoError(t, g.Phys.Release(pg))
	assert.Zero(t, g.Phys.Owners())

	assert.ErrorIs(t, g.Phys.TrapFetch(fakeguest.HoleStart), guestmem.ErrHole)
	assert.ErrorIs(t, g.Phys.TrapFetch(0xfee00000), guestmem.ErrNotRAM)

	// Through the trap: armed on a watched page table, nothing happens.
	gm := guestmem.NewWatcher(g.Phys, g.CR3)
	g.MapPage(0x400000, 0x300000, vmx.PTEUser)
	_, err := gm.Watch(g.CR3, 0x400000, func(swapmem.Translation) {})
	require.NoError(t, err)
	pt := g.Entry(0x400000, 1) &^ 0xfff
	g.MapPage(0x500000, pt, vmx.PTEUser)
	trap := &ReturnTrap{Phys: g.Phys, Walker: &gm.Walker}
	trap.Arm(g.CR3, 0x500000)
	assert.Zero(t, trap.Arms)
	_, perm, _, _, _ = g.EPT.Lookup(pt)
	assert.Equal(t, ept.Read|ept.Exec, perm)
}

// TestReturnTrapSlots: two vCPUs that share the trap arm a slot each: the
// second vCPU's fault does not take the first's trap away, and a fetch
// on either vCPU springs either trap.
func TestReturnTrapSlots(t *testing.T) {
	g := fakeguest.New(t, ept.Options{})
	const codeA, codeB = 0x600000, 0x601000
	g.MapPage(0x400000, codeA, vmx.PTEUser)
	g.MapPage(0x401000, codeB, vmx.PTEUser)
	trap := &ReturnTrap{Phys: g.Phys, Walker: &guestmem.Walker{Mem: g.Phys}}
	trap.Slots(2)
	v0, m0 := vcputest.Scripted(t, nil)
	v1, m1 := vcputest.Scripted(t, nil)
	require.NoError(t, trap.Install(v0))
	require.NoError(t, trap.Install(v1))
	cpus := []*TrapCPU{{CPU: &SwapCPU{V: v0}, Trap: trap, V: v0}, {CPU: &SwapCPU{V: v1}, Trap: trap, V: v1, Slot: 1}}
	for i, m := range []*hvtest.VMCS{m0, m1} {
		m.Fields[vmx.GuestCR3] = g.CR3
		m.Fields[vmx.GuestSSAccess] |= 3 << 5
		m.Fields[vmx.EntryInterruptInfo] = 0
		m.Fields[vmx.GuestRIP] = 0x400000 + uint64(i)*0x1000
		require.NoError(t, cpus[i].InjectPF(0x7f0000001000, 4))
	}
	assert.EqualValues(t, 2, trap.Arms)
	for _, pa := range []uint64{codeA, codeB} {
		_, perm, _, _, _ := g.EPT.Lookup(pa)
		assert.Equal(t, ept.Read|ept.Write, perm, "both pages trapped at once")
	}

	// vCPU 0 runs the process whose fault vCPU 1 injected.
	fetch := uint64(0x4 | 0x8 | 0x10 | 0x80 | 0x100)
	m0.Fields[vmx.GuestPhysAddr] = codeB
	m0.Fields[vmx.ExitQualification] = fetch
	act, err := vcputest.Exit(v0, vmx.ExitEPTViolation)
	require.NoError(t, err)
	assert.Equal(t, hv.Resume, act)
	assert.EqualValues(t, 1, trap.Hits)
	_, perm, _, _, _ := g.EPT.Lookup(codeB)
	assert.Equal(t, ept.RWX, perm)
	_, perm, _, _, _ = g.EPT.Lookup(codeA)
	assert.Equal(t, ept.Read|ept.Write, perm, "vCPU 0's own trap stays")
	trap.Disarm()
	assert.Zero(t, g.Phys.Owners())
}
