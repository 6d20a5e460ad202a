package machine_test

import (
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/vmx"
)

// newKickMachine is newMachine on a board with n application processors
// that kick (kickAP), none of them started by the guest.
func newKickMachine(t *testing.T, n int) (*board, *machine.Machine, *lockedBuffer, []*kickAP) {
	b := newBoard(t)
	b.vmcs = newVMCS()
	kernel := bzImage()
	require.NoError(t, b.WritePhys(0x100_0000, kernel))
	sb := &smpBoard{board: b}
	var aps []*kickAP
	for i := range n {
		k := &kickAP{fakeAP: newFakeAP(t, b, uint32(i+1))}
		aps = append(aps, k)
		sb.aps = append(sb.aps, k)
	}
	log := &lockedBuffer{}
	c := exampleConfig(uint64(len(kernel)))
	c.Log = log
	m, err := machine.New(sb, c)
	require.NoError(t, err)
	for _, k := range aps {
		require.NotNil(t, k.bspKicks)
	}
	return b, m, log, aps
}

// nmiExit makes the exit in a VMCS's fields an NMI's.
func nmiExit(f map[vmx.Field]uint64) {
	f[vmx.ExitReasonField] = uint64(vmx.ExitExceptionOrNMI)
	f[vmx.ExitInterruptInfo] = 1<<31 | uint64(vmx.EventNMI)<<8 | vmx.VectorNMI
}

// nmiInjected reports whether the entry of a VMCS's fields injects an
// NMI.
func nmiInjected(f map[vmx.Field]uint64) bool {
	info := f[vmx.EntryInterruptInfo]
	return info&(1<<31) != 0 && info>>8&7 == uint64(vmx.EventNMI)
}

// guestExit is vCPU 0's last step: the guest's exit hypercall.
func guestExit(b *board, r *vmx.GuestRegs) {
	b.run(0)
	r.RAX, r.RDI = hcall.Exit, 0
	b.exitWith(vmx.ExitVMCALL)
}

// TestKickInFlightIsNotTheGuestsNMI: while vCPU 0 handles an exit, still
// marked in the guest, two application processors kick it; one NMI
// reaches VMX root, the other is on its way and exits the guest after the
// next entry. Each NMI consumes one kick: neither reaches the guest. The
// next NMI, with no kick outstanding, is the guest's and is injected.
func TestKickInFlightIsNotTheGuestsNMI(t *testing.T) {
	b, m, log, aps := newKickMachine(t, 2)
	b.script = []step{
		{name: "two kicks while vCPU 0 handles an exit, one NMI in VMX root", exit: func(b *board, r *vmx.GuestRegs) {
			b.run(0)
			aps[0].bspKicks.Add(1)
			aps[1].bspKicks.Add(1)
			b.nmis.Add(1)
			b.exitWith(vmx.ExitCPUID)
		}},
		{name: "the second kick's NMI exits the guest", check: func(b *board, r *vmx.GuestRegs) {
			assert.False(t, nmiInjected(b.vmcs.Fields), "the NMI in VMX root was a kick")
		}, exit: func(b *board, r *vmx.GuestRegs) { nmiExit(b.vmcs.Fields) }},
		{name: "the guest's NMI", check: func(b *board, r *vmx.GuestRegs) {
			assert.False(t, nmiInjected(b.vmcs.Fields), "a kick's NMI reached the guest")
		}, exit: func(b *board, r *vmx.GuestRegs) { nmiExit(b.vmcs.Fields) }},
		{name: "exit", check: func(b *board, r *vmx.GuestRegs) {
			assert.True(t, nmiInjected(b.vmcs.Fields), "the guest's NMI was taken for a kick")
		}, exit: guestExit},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
}

// TestKickInFlightIsNotTheGuestsNMIOnAP: the same on an application
// processor, kicked twice by shootdowns: one NMI reaches its exit loop in
// VMX root, the other exits its guest; neither is the guest's.
func TestKickInFlightIsNotTheGuestsNMIOnAP(t *testing.T) {
	b, m, log, aps := newKickMachine(t, 1)
	ap := aps[0]
	ap.script = []apStep{
		{name: "SIPI", exit: sipi},
		{name: "two kicks while the AP's exit is handled, one NMI in VMX root", exit: func(a *fakeAP, r *vmx.GuestRegs) {
			m.Shootdown.Kick(1)
			m.Shootdown.Kick(1)
			a.nmis.Add(1)
			a.exitWith(vmx.ExitCPUID)
		}},
		{name: "the second kick's NMI exits the guest", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Equal(t, 2, ap.kicked)
			assert.False(t, nmiInjected(a.vmcs.Fields), "the NMI in VMX root was a kick")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { nmiExit(a.vmcs.Fields) }},
		{name: "answered", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.False(t, nmiInjected(a.vmcs.Fields), "a kick's NMI reached the guest")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	b.script = []step{waitFor(0, ap.fakeAP)}
	require.NoError(t, m.Run(), "log:\n%s", log)
}

// TestCollapsedKicksCostTheGuestFewNMIs: five kicks of vCPU 0 from its
// one application processor, and one NMI counted in VMX root: the others
// collapsed with it. At most two can still come (one on its way from the
// AP, one latched by the processor), so two NMIs are taken for kicks and
// the third is the guest's, not every NMI for the three kicks that will
// never come.
func TestCollapsedKicksCostTheGuestFewNMIs(t *testing.T) {
	b, m, log, aps := newKickMachine(t, 1)
	b.script = []step{
		{name: "five kicks, one NMI", exit: func(b *board, r *vmx.GuestRegs) {
			b.run(0)
			aps[0].bspKicks.Add(5)
			b.nmis.Add(1)
			b.exitWith(vmx.ExitCPUID)
		}},
		{name: "an NMI that may be a kick", exit: func(b *board, r *vmx.GuestRegs) { nmiExit(b.vmcs.Fields) }},
		{name: "another", check: func(b *board, r *vmx.GuestRegs) {
			assert.False(t, nmiInjected(b.vmcs.Fields))
		}, exit: func(b *board, r *vmx.GuestRegs) { nmiExit(b.vmcs.Fields) }},
		{name: "the guest's", check: func(b *board, r *vmx.GuestRegs) {
			assert.False(t, nmiInjected(b.vmcs.Fields))
		}, exit: func(b *board, r *vmx.GuestRegs) { nmiExit(b.vmcs.Fields) }},
		{name: "exit", check: func(b *board, r *vmx.GuestRegs) {
			assert.True(t, nmiInjected(b.vmcs.Fields), "kicks that will never come took the guest's NMI")
		}, exit: guestExit},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
}

// pendingKickAP is a kickAP whose posted exit the test sets.
type pendingKickAP struct {
	*kickAP
	pending atomic.Bool
}

func (p *pendingKickAP) Pending() bool { return p.pending.Load() }

// TestKickBeforeEntryExitsAtOnce: an application processor's kick that
// lands in VMX root after vCPU 0 marked itself in the guest and before
// its VM entry makes that entry exit at once (VMX-preemption timer 0),
// with the kick matched to its NMI; the entry after it never exits at
// once: where another kick landed meanwhile it runs the guest for a slice
// of the period (a fiftieth), else for the period; unless the guest
// halted, which has nothing to run, and exits at once again. The guest's own NMI that lands there is injected at
// the entry after the one that exits at once; an exit the AP posted
// without a kick (its local APIC off) cuts the entry short too.
func TestKickBeforeEntryExitsAtOnce(t *testing.T) {
	b := newBoard(t)
	b.vmcs = newVMCS()
	kernel := bzImage()
	require.NoError(t, b.WritePhys(0x100_0000, kernel))
	ap := &pendingKickAP{kickAP: &kickAP{fakeAP: newFakeAP(t, b, 1)}}
	log := &lockedBuffer{}
	c := exampleConfig(uint64(len(kernel)))
	c.Log = log
	m, err := machine.New(&smpBoard{board: b, aps: []machine.AP{ap}}, c)
	require.NoError(t, err)
	w0, err := m.Shootdown.Words(0)
	require.NoError(t, err)
	period := uint64(m.VCPU.PreemptionTicks)
	require.NotZero(t, period)

	// What lands at vCPU 0's next entries, after every entry hook of
	// the machine's: the window between the mark and VM entry.
	var late []func()
	m.VCPU.OnEntry(func(*hv.VCPU) {
		if len(late) == 0 {
			return
		}
		require.EqualValues(t, 1, w0.InGuest.Load(), "vCPU 0 is marked in the guest")
		late[0]()
		late = late[1:]
	})
	kick := func() {
		ap.bspKicks.Add(1)
		b.nmis.Add(1)
	}
	timer := func() uint64 { return b.vmcs.Fields[vmx.PreemptionTimerValue] }
	b.script = []step{
		{name: "an exit", exit: func(b *board, r *vmx.GuestRegs) {
			b.run(0)
			late = []func(){kick, kick}
			b.exitWith(vmx.ExitCPUID)
		}},
		{name: "a kick landed before entry", check: func(b *board, r *vmx.GuestRegs) {
			assert.Zero(t, timer(), "the entry does not exit at once")
		}, exit: func(b *board, r *vmx.GuestRegs) { b.exitWith(vmx.ExitPreemptionTimer) }},
		{name: "another kick landed before entry", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, period/50, timer(), "two entries in a row exit at once: the second runs the guest for a slice")
			assert.False(t, nmiInjected(b.vmcs.Fields), "a kick reached the guest")
		}, exit: func(b *board, r *vmx.GuestRegs) { b.exitWith(vmx.ExitCPUID) }},
		{name: "the guest's NMI landed before entry", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, period, timer())
			assert.False(t, nmiInjected(b.vmcs.Fields), "a kick reached the guest")
			late = []func(){func() { b.nmis.Add(1) }}
		}, exit: func(b *board, r *vmx.GuestRegs) { b.exitWith(vmx.ExitCPUID) }},
		{name: "exits at once", check: func(b *board, r *vmx.GuestRegs) {
			assert.Zero(t, timer())
			assert.False(t, nmiInjected(b.vmcs.Fields), "not yet injected")
		}, exit: func(b *board, r *vmx.GuestRegs) { b.exitWith(vmx.ExitPreemptionTimer) }},
		{name: "the guest's NMI is injected", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, period, timer())
			assert.True(t, nmiInjected(b.vmcs.Fields), "the guest's NMI was lost")
			late = []func(){func() { ap.pending.Store(true) }}
		}, exit: func(b *board, r *vmx.GuestRegs) { b.exitWith(vmx.ExitCPUID) }},
		{name: "an exit posted without a kick", check: func(b *board, r *vmx.GuestRegs) {
			assert.Zero(t, timer(), "the posted exit waits for vCPU 0's timer")
			ap.pending.Store(false)
		}, exit: func(b *board, r *vmx.GuestRegs) { b.exitWith(vmx.ExitPreemptionTimer) }},
		{name: "the guest halts", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, period, timer())
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.vmcs.Fields[vmx.GuestActivityState] = vmx.ActivityHLT
			late = []func(){kick, kick}
			b.exitWith(vmx.ExitCPUID)
		}},
		{name: "a kick while halted", check: func(b *board, r *vmx.GuestRegs) {
			assert.Zero(t, timer())
		}, exit: func(b *board, r *vmx.GuestRegs) { b.exitWith(vmx.ExitPreemptionTimer) }},
		{name: "another kick while halted", check: func(b *board, r *vmx.GuestRegs) {
			assert.Zero(t, timer(), "a halted guest has nothing to run: no slice")
			b.vmcs.Fields[vmx.GuestActivityState] = vmx.ActivityActive
		}, exit: func(b *board, r *vmx.GuestRegs) { b.exitWith(vmx.ExitPreemptionTimer) }},
		{name: "exit", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, period, timer())
			assert.False(t, nmiInjected(b.vmcs.Fields))
		}, exit: guestExit},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
	assert.Empty(t, late)
}

// TestKickCheckKicksBeforeEntries: with smp.kickcheck=2, every second
// entry of an application processor's vCPU starts with a kick sent. Its
// NMI reaches the processor before the entry (counted in VMX root; the
// processor's loop cuts the entry short, a preemption-timer exit) or in
// the guest (an NMI exit): either way it is matched with its kick, and
// the guest never receives it.
func TestKickCheckKicksBeforeEntries(t *testing.T) {
	b := newBoard(t)
	b.vmcs = newVMCS()
	kernel := bzImage()
	require.NoError(t, b.WritePhys(0x100_0000, kernel))
	ap := &kickAP{fakeAP: newFakeAP(t, b, 1)}
	log := &lockedBuffer{}
	c := exampleConfig(uint64(len(kernel)))
	c.Log = log
	c.Options = "smp.kickcheck=2"
	m, err := machine.New(&smpBoard{board: b, aps: []machine.AP{ap}}, c)
	require.NoError(t, err)
	notInjected := func(a *fakeAP, r *vmx.GuestRegs) {
		assert.False(t, nmiInjected(a.vmcs.Fields), "a kick's NMI reached the guest")
	}
	ap.script = []apStep{
		{name: "SIPI (its entry waits for it: no kick)", exit: sipi},
		{name: "a kick before the second entry, its NMI in VMX root: the entry is cut", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Equal(t, 1, ap.kicked)
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			a.nmis.Add(1)
			a.exitWith(vmx.ExitPreemptionTimer)
		}},
		{name: "the third entry: no kick", check: func(a *fakeAP, r *vmx.GuestRegs) {
			notInjected(a, r)
			assert.Equal(t, 1, ap.kicked)
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
		{name: "a kick before the fourth, its NMI in the guest", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Equal(t, 2, ap.kicked)
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { nmiExit(a.vmcs.Fields) }},
		{name: "answered", check: notInjected, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	b.script = []step{waitFor(0, ap.fakeAP)}
	require.NoError(t, m.Run(), "log:\n%s", log)
	// Entries 2, 4 and 6 (the one after the script, which ends the AP).
	assert.Equal(t, 3, ap.kicked)
	assert.Contains(t, log.String(), "vCPU 1: 3 kicks sent just before an entry (smp.kickcheck)")
}
