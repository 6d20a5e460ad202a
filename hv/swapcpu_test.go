package hv

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/vmx"
)

// pfLog records what PFDelivery reports.
type pfLog struct{ delivered, cancelled []uint64 }

func (l *pfLog) PFDelivered(va uint64)     { l.delivered = append(l.delivered, va) }
func (l *pfLog) CancelPendingPF(va uint64) { l.cancelled = append(l.cancelled, va) }

const pfVA = 0x7f00_1234_5000

// injectOnce makes the vCPU's first entry inject swapmem's #PF through
// SwapCPU.InjectPF, as the engine's entry hook does.
func injectOnce(t *testing.T, v *VCPU, d *PFDelivery) {
	cpu := &SwapCPU{V: v, Delivery: d}
	done := false
	v.OnEntry(func(v *VCPU) {
		if !done {
			done = true
			require.NoError(t, cpu.InjectPF(pfVA, 4))
		}
	})
}

func TestPFDeliveryConfirmedAtTheNextExit(t *testing.T) {
	l := &pfLog{}
	d := &PFDelivery{Reports: l}
	v, _ := scripted(t, []exitStep{{
		reason: vmx.ExitCPUID,
		check: func(t *testing.T, v *VCPU) {
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
	v, _ := scripted(t, []exitStep{{
		// The #PF's delivery wrote the guest's stack, a page under EPT
		// write protection: the exit interrupted the delivery.
		reason: vmx.ExitEPTViolation,
		fields: map[vmx.Field]uint64{vmx.IDTVectoringInfo: uint64(pf.Info()), vmx.IDTVectoringError: 4, vmx.GuestPhysAddr: 0x5000, vmx.ExitQualification: 2},
		check: func(t *testing.T, v *VCPU) {
			assert.Empty(t, l.delivered, "not delivered yet")
			assert.Empty(t, l.cancelled)
			assert.Equal(t, uint64(pf.Info()), fv(v).Fields[vmx.EntryInterruptInfo], "placed again")
			assert.Equal(t, uint64(pfVA), v.Regs.CR2)
		},
	}, {
		reason: vmx.ExitCPUID,
		check: func(t *testing.T, v *VCPU) {
			assert.Equal(t, []uint64{pfVA}, l.delivered)
		},
	}})
	require.NoError(t, v.Intercept(vmx.ExitEPTViolation, func(v *VCPU, e *vmx.Exit, next Handler) (Action, error) {
		return Resume, nil // the page opened for the write
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
	v, m := scripted(t, []exitStep{{
		reason: vmx.ExitCPUID,
		check: func(t *testing.T, v *VCPU) {
			assert.Empty(t, l.delivered, "still queued behind the blocked NMI")
			assert.Empty(t, l.cancelled)
		},
	}, {
		// An exit whose handling drops the vCPU's queued events and
		// injects its own: the #PF is gone.
		reason: vmx.ExitEPTViolation,
		fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: 0x5000, vmx.ExitQualification: 2},
		check: func(t *testing.T, v *VCPU) {
			assert.Equal(t, []uint64{pfVA}, l.cancelled, "cancelled at the entry that lost it")
			assert.Empty(t, l.delivered)
		},
	}})
	require.NoError(t, v.Intercept(vmx.ExitEPTViolation, func(v *VCPU, e *vmx.Exit, next Handler) (Action, error) {
		v.events = eventQueue{}
		return Resume, v.InjectException(vmx.VectorGP, 0)
	}))
	d.Install(v)
	// The breakpoint agent queued the #PF behind an NMI that the guest
	// blocks.
	m.Fields[vmx.GuestInterruptibility] = blockingNMI
	v.queueNMI()
	require.NoError(t, v.Inject(vmx.Exception(vmx.VectorPF, 4, 0)))
	v.Regs.CR2 = pfVA
	d.queued(pfVA)
	require.NoError(t, v.Run())
	assert.Equal(t, uint64(1), d.Lost)
	assert.Zero(t, d.Delivered)
}

func TestBreakpointAgentUnderPageTableIsolation(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	k, u := ptiProcess(t, g)
	c, lstar, detour := entryCode()
	g.loadKernel(c, nil)
	at := g.mem.at(detour - kernelOff)
	v, m := scripted(t, nil)
	const va = 0x400000

	// Before: the request's user CR3 compared exactly. The user PGD maps
	// only the entry trampoline: the detour cannot even be found.
	a0 := g.agent(lstar, false)
	m.Fields[vmx.GuestCR3] = u | 0x801
	cpu0 := &SwapCPU{V: v, Agent: a0}
	assert.ErrorIs(t, cpu0.InjectBPFault(va), ErrNoDetour)

	s := &AddressSpaces{Mem: g.phys}
	s.Observe(u|0x801, 3, true)
	require.Equal(t, PTIOn, s.PTI())
	l := &pfLog{}
	d := &PFDelivery{Reports: l}
	d.Install(v)
	a := g.agent(lstar, false)
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
	act, err := v.dispatch(exitOf(v, vmx.ExitExceptionOrNMI))
	require.NoError(t, err)
	assert.Equal(t, Resume, act)
	assert.Equal(t, uint64(1), a.Raised)
	assert.Zero(t, a.Passed)
	e, _ := v.events.peek()
	assert.Equal(t, vmx.Exception(vmx.VectorPF, 4, 0), e)
	assert.Equal(t, uint64(va), v.Regs.CR2)

	// The raised #PF is followed: placed at the entry, delivered at the
	// exit after it.
	require.NoError(t, v.prepareEntry())
	assert.Equal(t, uint64(e.Info()), m.Fields[vmx.EntryInterruptInfo])
	assert.Empty(t, l.delivered)
	m.Fields[vmx.IDTVectoringInfo] = 0
	v.observe(exitOf(v, vmx.ExitCPUID))
	assert.Equal(t, []uint64{va}, l.delivered)
}

func TestBreakpointAgentKeepsAdjacentProcessesApart(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	pa, pb := twoProcesses(t, g)
	c, lstar, detour := entryCode()
	g.loadKernel(c, nil)
	v, m := scripted(t, nil)
	s := &AddressSpaces{Mem: g.phys}
	s.Observe(pa, 3, true)
	require.Equal(t, PTIOff, s.PTI())
	a := g.agent(lstar, false)
	a.Spaces = s
	require.NoError(t, a.Install(v))
	require.NoError(t, a.Arm(v, pa, 0x400000))
	m.Fields[vmx.GuestRIP] = detour
	m.Fields[vmx.ExitInterruptInfo] = uint64(vmx.Exception(vmx.VectorBP, 0, 1).Info())
	m.Fields[vmx.GuestCR3] = pb
	_, err := v.dispatch(exitOf(v, vmx.ExitExceptionOrNMI))
	require.NoError(t, err)
	assert.Equal(t, uint64(1), a.Passed, "b is another process")
	assert.Zero(t, a.Raised)
	assert.False(t, v.EventPending())
}
