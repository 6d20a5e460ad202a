package hv

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// TestReturnTrap: a #PF injected at CPL 3 takes the execute permission of
// the interrupted instruction's page; the guest's return to it exits, the
// page gets its permissions back and the instruction runs again, at CPL 3
// in the process's address space, where the next #PF can go in. Before,
// the next exit in user mode was the VMX-preemption timer's.
func TestReturnTrap(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	const code, codePA, rip = 0x400000, 0x600000, 0x400123
	g.mapPage(code, codePA, pteUS)
	trap := &ReturnTrap{Phys: g.phys, Walker: &Walker{Mem: g.phys}}
	fetch := uint64(0x4 | 0x8 | 0x10 | 0x80 | 0x100) // fetch, entry rw-
	var cpu *TrapCPU
	v, m := scripted(t, []exitStep{
		{reason: vmx.ExitCPUID, check: func(t *testing.T, v *VCPU) {
			// A #PF goes in at CPL 3 (swapmem's UserFault).
			fv(v).Fields[vmx.GuestRIP] = rip
			require.NoError(t, cpu.InjectPF(0x7f0000001000, 4))
			assert.Equal(t, uint64(1), trap.Arms)
			_, perm, _, _, _ := g.ept.Lookup(codePA)
			assert.Equal(t, ept.Read|ept.Write, perm, "the code page cannot be executed")
		}},
		// The kernel brought the page in and returns to the instruction.
		{reason: vmx.ExitEPTViolation, fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: codePA | rip&0xfff, vmx.ExitQualification: fetch},
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(1), trap.Hits)
				assert.Equal(t, uint64(rip), fv(v).Fields[vmx.GuestRIP], "the instruction runs again")
				_, perm, _, _, _ := g.ept.Lookup(codePA)
				assert.Equal(t, ept.RWX, perm)
				assert.Zero(t, g.phys.Owners())
			}},
	})
	m.Fields[vmx.GuestCR3] = g.cr3
	m.Fields[vmx.GuestSSAccess] |= 3 << 5
	cpu = &TrapCPU{CPU: &SwapCPU{V: v}, Trap: trap, V: v}
	require.NoError(t, trap.Install(v))
	require.NoError(t, v.Run())

	// A fetch violation on the page once the trap sprang is not the
	// trap's: it is passed on (here to the fatal default).
	v, _ = scripted(t, []exitStep{{reason: vmx.ExitEPTViolation, fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: codePA, vmx.ExitQualification: fetch}}})
	require.NoError(t, trap.Install(v))
	assert.ErrorIs(t, v.Run(), ErrFatalExit)
}

// TestReturnTrapOnlyInUserMode: a #PF injected in kernel mode, or at an
// instruction the walk does not show as a user page, arms nothing.
func TestReturnTrapOnlyInUserMode(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	g.mapPage(0x400000, 0x600000, pteUS)
	g.mapPage(0x401000, 0x601000, 0)
	trap := &ReturnTrap{Phys: g.phys, Walker: &Walker{Mem: g.phys}}
	v, m := scripted(t, nil)
	m.Fields[vmx.GuestCR3] = g.cr3
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
	assert.Zero(t, g.phys.Owners())
}

// TestFetchTrapYields: the trap never stands in the way of a watch or the
// breakpoint agent: write-protecting or claiming a trapped page ends the
// trap first, and the trap's own disarm then changes nothing. A page
// tamahv already owns is not trapped.
func TestFetchTrapYields(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	const pg = 0x600000
	require.NoError(t, g.phys.TrapFetch(pg))
	assert.ErrorIs(t, g.phys.TrapFetch(pg), ErrPageInUse)
	require.NoError(t, g.phys.WriteProtect(pg))
	_, perm, _, _, _ := g.ept.Lookup(pg)
	assert.Equal(t, ept.Read|ept.Exec, perm, "write-protected, executable again")
	assert.Error(t, g.phys.UntrapFetch(pg))
	assert.ErrorIs(t, g.phys.TrapFetch(pg), ErrPageInUse)
	require.NoError(t, g.phys.Unprotect(pg))
	_, perm, _, _, _ = g.ept.Lookup(pg)
	assert.Equal(t, ept.RWX, perm)

	require.NoError(t, g.phys.TrapFetch(pg))
	require.NoError(t, g.phys.Claim(pg))
	_, perm, _, _, _ = g.ept.Lookup(pg)
	assert.Equal(t, ept.RWX, perm, "claimed as it was")
	require.NoError(t, g.phys.Release(pg))
	assert.Zero(t, g.phys.Owners())

	assert.ErrorIs(t, g.phys.TrapFetch(holeStart), ErrHole)
	assert.ErrorIs(t, g.phys.TrapFetch(0xfee00000), ErrNotRAM)

	// Through the trap: armed on a watched page table, nothing happens.
	gm := NewGuestMemory(g.phys, g.cr3)
	g.mapPage(0x400000, 0x300000, pteUS)
	_, err := gm.Watch(g.cr3, 0x400000, func(swapmem.Translation) {})
	require.NoError(t, err)
	pt := g.entry(0x400000, 1) &^ 0xfff
	g.mapPage(0x500000, pt, pteUS)
	trap := &ReturnTrap{Phys: g.phys, Walker: &gm.Walker}
	trap.Arm(g.cr3, 0x500000)
	assert.Zero(t, trap.Arms)
	_, perm, _, _, _ = g.ept.Lookup(pt)
	assert.Equal(t, ept.Read|ept.Exec, perm)
}

// TestReturnTrapSlots: two vCPUs that share the trap arm a slot each: the
// second vCPU's fault does not take the first's trap away, and a fetch
// on either vCPU springs either trap.
func TestReturnTrapSlots(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	const codeA, codeB = 0x600000, 0x601000
	g.mapPage(0x400000, codeA, pteUS)
	g.mapPage(0x401000, codeB, pteUS)
	trap := &ReturnTrap{Phys: g.phys, Walker: &Walker{Mem: g.phys}}
	trap.Slots(2)
	v0, m0 := scripted(t, nil)
	v1, m1 := scripted(t, nil)
	require.NoError(t, trap.Install(v0))
	require.NoError(t, trap.Install(v1))
	cpus := []*TrapCPU{{CPU: &SwapCPU{V: v0}, Trap: trap, V: v0}, {CPU: &SwapCPU{V: v1}, Trap: trap, V: v1, Slot: 1}}
	for i, m := range []*fakeVMCS{m0, m1} {
		m.Fields[vmx.GuestCR3] = g.cr3
		m.Fields[vmx.GuestSSAccess] |= 3 << 5
		m.Fields[vmx.EntryInterruptInfo] = 0
		m.Fields[vmx.GuestRIP] = 0x400000 + uint64(i)*0x1000
		require.NoError(t, cpus[i].InjectPF(0x7f0000001000, 4))
	}
	assert.EqualValues(t, 2, trap.Arms)
	for _, pa := range []uint64{codeA, codeB} {
		_, perm, _, _, _ := g.ept.Lookup(pa)
		assert.Equal(t, ept.Read|ept.Write, perm, "both pages trapped at once")
	}

	// vCPU 0 runs the process whose fault vCPU 1 injected.
	fetch := uint64(0x4 | 0x8 | 0x10 | 0x80 | 0x100)
	m0.Fields[vmx.GuestPhysAddr] = codeB
	m0.Fields[vmx.ExitQualification] = fetch
	act, err := v0.dispatch(exitOf(v0, vmx.ExitEPTViolation))
	require.NoError(t, err)
	assert.Equal(t, Resume, act)
	assert.EqualValues(t, 1, trap.Hits)
	_, perm, _, _, _ := g.ept.Lookup(codeB)
	assert.Equal(t, ept.RWX, perm)
	_, perm, _, _, _ = g.ept.Lookup(codeA)
	assert.Equal(t, ept.Read|ept.Write, perm, "vCPU 0's own trap stays")
	trap.Disarm()
	assert.Zero(t, g.phys.Owners())
}
