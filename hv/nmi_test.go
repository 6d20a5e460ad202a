package hv

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/vmx"
)

const (
	nmiInfo = 0x80000202 // valid, NMI, vector 2
	pfInfo  = 0x80000b0e // valid, hardware exception with error code, #PF
)

func TestNMIExitingAndVirtualNMIs(t *testing.T) {
	v, _ := policyVCPU(t, skylake())
	pin := fv(v).Fields[vmx.PinControls]
	assert.NotZero(t, pin&vmx.PinNMIExiting, "guest NMIs exit instead of reaching tamahv")
	assert.NotZero(t, pin&vmx.PinVirtualNMIs)
}

// An NMI that arrives while the guest runs exits and goes back to the
// guest; NMIs that arrive while the guest handles one are one more NMI,
// as on the processor.
func TestGuestNMIIsReinjected(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitExceptionOrNMI, fields: map[vmx.Field]uint64{vmx.ExitInterruptInfo: nmiInfo},
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(nmiInfo), fv(v).Fields[vmx.EntryInterruptInfo])
				fv(v).Fields[vmx.GuestInterruptibility] = vmx.BlockingNMI // in the guest's handler
			}},
		{reason: vmx.ExitExceptionOrNMI, fields: map[vmx.Field]uint64{vmx.ExitInterruptInfo: nmiInfo},
			check: func(t *testing.T, v *VCPU) {
				assert.Zero(t, fv(v).Fields[vmx.EntryInterruptInfo], "blocked")
				assert.NotZero(t, fv(v).Fields[vmx.ProcControls]&vmx.ProcNMIWindow)
			}},
		{reason: vmx.ExitExceptionOrNMI, fields: map[vmx.Field]uint64{vmx.ExitInterruptInfo: nmiInfo}},
		{reason: vmx.ExitNMIWindow, fields: map[vmx.Field]uint64{vmx.GuestInterruptibility: 0},
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(nmiInfo), fv(v).Fields[vmx.EntryInterruptInfo])
				assert.False(t, v.EventPending(), "the third NMI merged with the second")
			}},
	})
	require.NoError(t, v.Run())
}

// Finding 11: an exit during an NMI's delivery leaves blocking by NMI set;
// the NMI is injected again at once, not after an NMI window the guest
// would never open.
func TestVectoredNMIIsReinjectedAtOnce(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitInterruptWindow, fields: map[vmx.Field]uint64{vmx.IDTVectoringInfo: nmiInfo, vmx.GuestInterruptibility: vmx.BlockingNMI},
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(nmiInfo), fv(v).Fields[vmx.EntryInterruptInfo], "NMI injected")
				assert.Zero(t, fv(v).Fields[vmx.GuestInterruptibility]&vmx.BlockingNMI, "blocking by NMI cleared (SDM 26.3.1.5)")
				assert.Zero(t, fv(v).Fields[vmx.ProcControls]&vmx.ProcNMIWindow)
			}},
	})
	require.NoError(t, v.Run())
}

// NMI-window exiting is asked for only with virtual NMIs (SDM 26.2.1.1).
func TestNMIWindowNeedsVirtualNMIs(t *testing.T) {
	for _, virtual := range []bool{true, false} {
		caps := skylake()
		if !virtual {
			caps.Pin.One &^= vmx.PinVirtualNMIs
		}
		v, _ := policyVCPU(t, caps)
		f := fv(v).Fields
		assert.Equal(t, virtual, f[vmx.PinControls]&vmx.PinVirtualNMIs != 0)
		assert.Equal(t, virtual, f[vmx.PinControls]&vmx.PinNMIExiting != 0, "NMI exiting comes with virtual NMIs")
		f[vmx.GuestInterruptibility] = vmx.BlockingNMI
		v.queueNMI()
		v.deliverEvent()
		assert.Equal(t, virtual, f[vmx.ProcControls]&vmx.ProcNMIWindow != 0, "virtual NMIs %v", virtual)
		assert.Zero(t, f[vmx.EntryInterruptInfo], "not injected while blocked")
		assert.True(t, v.EventPending(), "still queued")
	}
}

// An exit that interrupted an IRET which had unblocked NMIs sets blocking
// again (the IRET runs again), except for #DF.
func TestIRETUnblockingIsUndone(t *testing.T) {
	for _, c := range []struct {
		info  uint64
		block bool
	}{{pfInfo | vmx.NMIUnblockedByIRET, true}, {pfInfo, false}, {0x80000b08 | vmx.NMIUnblockedByIRET, false}} {
		v, _ := scripted(t, []exitStep{
			{reason: vmx.ExitExceptionOrNMI, fields: map[vmx.Field]uint64{vmx.ExitInterruptInfo: c.info, vmx.ExitInterruptError: 2},
				check: func(t *testing.T, v *VCPU) {
					assert.Equal(t, c.block, fv(v).Fields[vmx.GuestInterruptibility]&vmx.BlockingNMI != 0, "info %#x", c.info)
				}},
		})
		require.NoError(t, v.Run())
	}
}

// An NMI that hit tamahv in VMX root is the guest's: it is injected at the
// next entry.
func TestNMIInRootIsInjected(t *testing.T) {
	v, _ := policyVCPU(t, skylake())
	f := fv(v).Fields
	pending := true
	v.TakeNMI = func() bool {
		p := pending
		pending = false
		return p
	}
	require.NoError(t, v.prepareEntry())
	assert.Equal(t, uint64(nmiInfo), f[vmx.EntryInterruptInfo])
	assert.False(t, v.EventPending())

	f[vmx.EntryInterruptInfo] = 0
	require.NoError(t, v.prepareEntry())
	assert.Zero(t, f[vmx.EntryInterruptInfo], "nothing more")
}

// TestPlaceAndQueued: the API an extension places and looks at events
// through. Place writes one event for the coming entry and refuses a
// second; Queued looks at the queue, not at the fields.
func TestPlaceAndQueued(t *testing.T) {
	v, m := scripted(t, nil)
	isNMI := func(e vmx.Event) bool { return e.Type == vmx.EventNMI }
	assert.False(t, v.Placed())
	require.NoError(t, v.Place(vmx.Exception(vmx.VectorPF, 2, 0)))
	assert.True(t, v.Placed())
	assert.Equal(t, uint64(vmx.Exception(vmx.VectorPF, 2, 0).Info()), m.Fields[vmx.EntryInterruptInfo])
	assert.EqualValues(t, 2, m.Fields[vmx.EntryExceptionError])
	assert.ErrorIs(t, v.Place(vmx.Exception(vmx.VectorGP, 0, 0)), ErrEventTaken, "one event an entry")
	assert.False(t, v.Queued(isNMI))
	v.queueNMI()
	assert.True(t, v.Queued(isNMI))
	assert.False(t, v.Queued(func(e vmx.Event) bool { return e.Vector == vmx.VectorPF }), "the placed #PF is not queued")
}
