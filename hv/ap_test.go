package hv

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/vmx"
)

func TestMakeAPWaitsForSIPI(t *testing.T) {
	v, _ := scripted(t, nil)
	require.NoError(t, v.MakeAP())
	f := fv(v).Fields
	assert.Equal(t, uint64(vmx.ActivityWaitForSIPI), f[vmx.GuestActivityState])
	assert.Equal(t, uint64(0xf000), f[vmx.GuestCS], "the INIT state")
	assert.Zero(t, f[vmx.GuestCR0]&vmx.CR0PE)
	assert.Zero(t, f[vmx.EntryInterruptInfo], "nothing to inject into a waiting AP")
}

func TestMakeAPNeedsWaitForSIPI(t *testing.T) {
	v, _ := scripted(t, nil)
	caps := *v.Caps
	caps.Misc &^= 1 << 8
	v.Caps = &caps
	assert.ErrorIs(t, v.MakeAP(), ErrNoWaitForSIPI)
	assert.NotEqual(t, uint64(vmx.ActivityWaitForSIPI), fv(v).Fields[vmx.GuestActivityState])
}

// TestAPINITSIPISIPI plays what Linux does to bring an AP up, twice (CPU
// offline then online): INIT, SIPI, SIPI; the second SIPI of each pair
// finds the vCPU running and is ignored, and the INIT of the second round
// puts the running vCPU back in wait-for-SIPI rather than stopping the
// guest.
func TestAPINITSIPISIPI(t *testing.T) {
	sipi := func(vec uint64, check func(t *testing.T, v *VCPU)) exitStep {
		return exitStep{reason: vmx.ExitSIPI, fields: map[vmx.Field]uint64{vmx.ExitQualification: vec}, check: check}
	}
	running := func(vec uint64) func(t *testing.T, v *VCPU) {
		return func(t *testing.T, v *VCPU) {
			f := fv(v).Fields
			assert.Equal(t, uint64(vmx.ActivityActive), f[vmx.GuestActivityState])
			assert.Equal(t, vec<<8, f[vmx.GuestCS])
			assert.Equal(t, vec<<12, f[vmx.GuestCSBase])
			assert.Zero(t, f[vmx.GuestRIP])
		}
	}
	waiting := func(t *testing.T, v *VCPU) {
		assert.Equal(t, uint64(vmx.ActivityWaitForSIPI), fv(v).Fields[vmx.GuestActivityState])
		assert.Equal(t, uint64(0xfff0), fv(v).Fields[vmx.GuestRIP])
	}
	v, _ := scripted(t, []exitStep{
		sipi(0x9a, running(0x9a)),
		sipi(0x55, running(0x9a)), // ignored: the vCPU runs
		{reason: vmx.ExitINIT, check: waiting},
		{reason: vmx.ExitINIT, check: waiting}, // INIT while waiting: waits still
		sipi(0x9b, running(0x9b)),
		sipi(0x9b, running(0x9b)),
	})
	require.NoError(t, v.MakeAP())
	require.NoError(t, v.Run(), "the guest ends itself by hypercall, not by INIT")
	assert.Equal(t, uint64(2), v.counts[vmx.ExitINIT])
	assert.Equal(t, uint64(4), v.counts[vmx.ExitSIPI])
}

// TestAPSIPIWhereTheExitSavedActive: an implementation may save the
// activity state of a SIPI exit as active (Bochs does); the vCPU tamahv
// put in wait-for-SIPI starts at the vector all the same, and a second
// SIPI, with the vCPU running, is still ignored.
func TestAPSIPIWhereTheExitSavedActive(t *testing.T) {
	sipi := func(vec uint64, check func(t *testing.T, v *VCPU)) exitStep {
		return exitStep{reason: vmx.ExitSIPI, fields: map[vmx.Field]uint64{
			vmx.ExitQualification: vec, vmx.GuestActivityState: vmx.ActivityActive}, check: check}
	}
	running := func(vec uint64) func(t *testing.T, v *VCPU) {
		return func(t *testing.T, v *VCPU) {
			assert.False(t, v.WaitsForSIPI())
			assert.Equal(t, vec<<12, fv(v).Fields[vmx.GuestCSBase])
			assert.Zero(t, fv(v).Fields[vmx.GuestRIP])
		}
	}
	v, _ := scripted(t, []exitStep{sipi(0x9a, running(0x9a)), sipi(0x55, running(0x9a))})
	require.NoError(t, v.MakeAP())
	assert.True(t, v.WaitsForSIPI())
	require.NoError(t, v.Run())
}

// TestAPEventsNotPlacedWhileWaiting: an INIT puts a running AP back in
// wait-for-SIPI; an NMI that reached it meanwhile is not placed in the
// VM-entry fields (VM entry fails with an event in wait-for-SIPI).
func TestAPEventsNotPlacedWhileWaiting(t *testing.T) {
	nmi := false
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitSIPI, fields: map[vmx.Field]uint64{vmx.ExitQualification: 0x9a}},
		{reason: vmx.ExitCPUID, fields: map[vmx.Field]uint64{vmx.GuestRIP: 0x10}},
		{reason: vmx.ExitINIT, fields: map[vmx.Field]uint64{vmx.GuestRIP: 0x20}, regs: func(*vmx.GuestRegs) { nmi = true },
			check: func(t *testing.T, v *VCPU) {
				f := fv(v).Fields
				assert.True(t, v.WaitsForSIPI())
				assert.Equal(t, uint64(vmx.ActivityWaitForSIPI), f[vmx.GuestActivityState])
				assert.Zero(t, f[vmx.EntryInterruptInfo], "an event placed in wait-for-SIPI")
			}},
	})
	v.TakeNMI = func() bool { n := nmi; nmi = false; return n }
	require.NoError(t, v.MakeAP())
	require.NoError(t, v.Run())
}
