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
	"github.com/tamahv/tamahv/vmx"
)

// pfLog records what PFDelivery reports.
type pfLog struct{ delivered, cancelled []uint64 }

func (l *pfLog) PFDelivered(va uint64)     { l.delivered = append(l.delivered, va) }
func (l *pfLog) CancelPendingPF(va uint64) { l.cancelled = append(l.cancelled, va) }

const pfVA = 0x7f00_1234_5000

// injectOnce makes the vCPU's first entry inject swapmem's #PF through
// SwapCPU.InjectPF, as the engine's entry hook does.
func injectOnce(t *testing.T, v *hv.VCPU, d *PFDelivery) {
	cpu := &SwapCPU{V: v, Delivery: d}
	done := false
	v.OnEntry(func(v *hv.VCPU) {
		if !done {
			done = true
			require.NoError(t, cpu.InjectPF(pfVA, 4))
		}
	})
}

func TestPFDeliveryConfirmedAtTheNextExit(t *testing.T) {
	l := &pfLog{}
	d := &PFDelivery{Reports: l}
	v, _ := vcputest.Scripted(t, []vcputest.Step{{
		Reason: vmx.ExitCPUID,
		Check: func(t *testing.T, v *hv.VCPU) {
			assert.Equal(t, []uint64{pfVA}, l.delivered, "no delivery in progress at the exit: delivered")
			assert.Empty(t, l.cancelled)
		},
	}})
	d.Install(v)
	injectOnce(t, v, d)
	require.NoError(t, v.Run())
	assert.Equal(t, uint64(1), d.Delivered)
	assert.Len(t, l.delivered, 1, "reported once")
}

func TestPFDeliveryFollowsAnInterruptedDelivery(t *testing.T) {
	l := &pfLog{}
	d := &PFDelivery{Reports: l}
	pf := vmx.Exception(vmx.VectorPF, 4, 0)
	v, _ := vcputest.Scripted(t, []vcputest.Step{{
		// The #PF's delivery wrote the guest's stack, a page under EPT
		// write protection: the exit interrupted the delivery.
		Reason: vmx.ExitEPTViolation,
		Fields: map[vmx.Field]uint64{vmx.IDTVectoringInfo: uint64(pf.Info()), vmx.IDTVectoringError: 4, vmx.GuestPhysAddr: 0x5000, vmx.ExitQualification: 2},
		Check: func(t *testing.T, v *hv.VCPU) {
			assert.Empty(t, l.delivered, "not delivered yet")
			assert.Empty(t, l.cancelled)
			assert.Equal(t, uint64(pf.Info()), v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo], "placed again")
			assert.Equal(t, uint64(pfVA), v.Regs.CR2)
		},
	}, {
		Reason: vmx.ExitCPUID,
		Check: func(t *testing.T, v *hv.VCPU) {
			assert.Equal(t, []uint64{pfVA}, l.delivered)
		},
	}})
	require.NoError(t, v.Intercept(vmx.ExitEPTViolation, func(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
		return hv.Resume, nil // the page opened for the write
	}))
	d.Install(v)
	injectOnce(t, v, d)
	require.NoError(t, v.Run())
	assert.Equal(t, uint64(1), d.Requeued)
	assert.Equal(t, uint64(1), d.Delivered)
	assert.Empty(t, l.cancelled)
}

func TestPFDeliveryCancelsALostFault(t *testing.T) {
	l := &pfLog{}
	d := &PFDelivery{Reports: l}
	v, m := vcputest.Scripted(t, []vcputest.Step{{
		Reason: vmx.ExitCPUID,
		Check: func(t *testing.T, v *hv.VCPU) {
			assert.Empty(t, l.delivered, "still queued behind the blocked NMI")
			assert.Empty(t, l.cancelled)
		},
	}, {
		// An exit whose handling drops the vCPU's queued events and
		// injects its own: the #PF is gone.
		Reason: vmx.ExitEPTViolation,
		Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: 0x5000, vmx.ExitQualification: 2},
		Check: func(t *testing.T, v *hv.VCPU) {
			assert.Equal(t, []uint64{pfVA}, l.cancelled, "cancelled at the entry that lost it")
			assert.Empty(t, l.delivered)
		},
	}})
	require.NoError(t, v.Intercept(vmx.ExitEPTViolation, func(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
		v.DropEvents()
		return hv.Resume, v.InjectException(vmx.VectorGP, 0)
	}))
	d.Install(v)
	// The breakpoint agent queued the #PF behind an NMI that the guest
	// blocks.
	m.Fields[vmx.GuestInterruptibility] = vmx.BlockingNMI
	require.NoError(t, v.Inject(vmx.Event{Vector: vmx.VectorNMI, Type: vmx.EventNMI}))
	require.NoError(t, v.Inject(vmx.Exception(vmx.VectorPF, 4, 0)))
	v.Regs.CR2 = pfVA
	d.queued(pfVA)
	require.NoError(t, v.Run())
	assert.Equal(t, uint64(1), d.Lost)
	assert.Zero(t, d.Delivered)
}

func TestBreakpointAgentUnderPageTableIsolation(t *testing.T) {
	g := fakeguest.New(t, ept.Options{})
	k, u := g.PTIProcess(t)
	c, lstar, detour := entryCode()
	g.LoadKernel(c, nil)
	at := g.Mem.At(detour - fakeguest.KernelOff)
	v, m := vcputest.Scripted(t, nil)
	const va = 0x400000

	// Before: the request's user CR3 compared exactly. The user PGD maps
	// only the entry trampoline: the detour cannot even be found.
	a0 := agent(g, lstar, false)
	m.Fields[vmx.GuestCR3] = u | 0x801
	cpu0 := &SwapCPU{V: v, Agent: a0}
	assert.ErrorIs(t, cpu0.InjectBPFault(va), ErrNoDetour)

	s := &guestmem.AddressSpaces{Mem: g.Phys}
	s.Observe(u|0x801, 3, true)
	require.Equal(t, guestmem.PTIOn, s.PTI())
	l := &pfLog{}
	d := &PFDelivery{Reports: l}
	d.Install(v)
	a := agent(g, lstar, false)
	a.Spaces, a.Delivery = s, d
	require.NoError(t, a.Install(v))
	cpu := &SwapCPU{V: v, Agent: a, Spaces: s, Delivery: d}
	assert.Equal(t, k, cpu.CR3(), "the process in user mode is its kernel PGD")
	require.NoError(t, cpu.InjectBPFault(va), "found through the kernel PGD")
	assert.Equal(t, byte(0xcc), *at)

	// The int3 is hit in kernel mode, on the kernel CR3 with its PCID.
	m.Fields[vmx.GuestRIP] = detour
	m.Fields[vmx.ExitInterruptInfo] = uint64(vmx.Exception(vmx.VectorBP, 0, 1).Info())
	m.Fields[vmx.GuestCR3] = k | 1
	act, err := vcputest.Exit(v, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	assert.Equal(t, hv.Resume, act)
	assert.Equal(t, uint64(1), a.Raised)
	assert.Zero(t, a.Passed)
	e, _ := vcputest.FirstQueued(v)
	assert.Equal(t, vmx.Exception(vmx.VectorPF, 4, 0), e)
	assert.Equal(t, uint64(va), v.Regs.CR2)

	// The raised #PF is followed: placed at the entry, delivered at the
	// exit after it.
	require.NoError(t, v.PrepareEntry())
	assert.Equal(t, uint64(e.Info()), m.Fields[vmx.EntryInterruptInfo])
	assert.Empty(t, l.delivered)
	m.Fields[vmx.IDTVectoringInfo] = 0
	observe(t, v)
	assert.Equal(t, []uint64{va}, l.delivered)
}

func TestBreakpointAgentKeepsAdjacentProcessesApart(t *testing.T) {
	g := fakeguest.New(t, ept.Options{})
	pa, pb := g.TwoProcesses(t)
	c, lstar, detour := entryCode()
	g.LoadKernel(c, nil)
	v, m := vcputest.Scripted(t, nil)
	s := &guestmem.AddressSpaces{Mem: g.Phys}
	s.Observe(pa, 3, true)
	require.Equal(t, guestmem.PTIOff, s.PTI())
	a := agent(g, lstar, false)
	a.Spaces = s
	require.NoError(t, a.Install(v))
	require.NoError(t, a.Arm(v, pa, 0x400000))
	m.Fields[vmx.GuestRIP] = detour
	m.Fields[vmx.ExitInterruptInfo] = uint64(vmx.Exception(vmx.VectorBP, 0, 1).Info())
	m.Fields[vmx.GuestCR3] = pb
	_, err := vcputest.Exit(v, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), a.Passed, "b is another process")
	assert.Zero(t, a.Raised)
	assert.False(t, v.EventPending())
}

func TestSwapCPU(t *testing.T) {
	v, m := vcputest.Scripted(t, nil)
	c := &SwapCPU{V: v}
	m.Fields[vmx.GuestCR3] = 0x1234_5000 | 0x7 // PCID bits
	m.Fields[vmx.GuestSSAccess] = 0xf3         // DPL 3
	assert.Equal(t, uint64(0x1234_5000), c.CR3())
	assert.Equal(t, 3, c.Ring())
	assert.False(t, c.EventPending())
	require.NoError(t, c.InjectPF(0x7000_1000, 6))
	assert.Equal(t, uint64(0x80000b0e), m.Fields[vmx.EntryInterruptInfo])
	assert.Equal(t, uint64(6), m.Fields[vmx.EntryExceptionError])
	assert.Equal(t, uint64(0x7000_1000), v.Regs.CR2)
	assert.True(t, c.EventPending())
	assert.ErrorIs(t, c.InjectPF(0x7000_2000, 6), hv.ErrEventTaken)
	assert.ErrorIs(t, c.InjectBPFault(1), ErrNoBreakpointAgent)
}
