package guestmem

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/vmx"
)

// unmappedGuest is a vCPU over MapGuest's EPT (RAM up to 0x140201000
// above 4 GiB, tamahv's hole at 0x10000000) with Unmapped installed,
// playing the steps.
func unmappedGuest(t *testing.T, steps []vcputest.Step) (*hv.VCPU, *ept.EPT, *Unmapped) {
	e, err := ept.New(&mapTables{pages: map[uint64]*[512]uint64{}, next: 0x1000000}, ept.Options{Pages1G: true})
	require.NoError(t, err)
	hole := [2]uint64{0x10000000, 0x18000000}
	mm := append(machineMap, hv.E820Entry{Addr: 0x100000000, Size: 0x40201000, Type: hv.E820RAM})
	require.NoError(t, MapGuest(e, mm, hole, 0x12000000, nil))
	v, _ := vcputest.Scripted(t, steps)
	u := &Unmapped{EPT: e, Hole: hole}
	require.NoError(t, u.Install(v))
	return v, e, u
}

func violation(gpa, qual uint64, check func(t *testing.T, v *hv.VCPU)) vcputest.Step {
	return vcputest.Step{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: gpa, vmx.ExitQualification: qual}, Check: check}
}

// EPT-violation qualifications: the access, then what the entry allowed
// (bits 5:3), with a valid linear address of a translation.
const (
	qRead       = 0x1 | 0x180
	qWrite      = 0x2 | 0x180
	qFetchSink  = 0x4 | 0x8 | 0x10 | 0x180
	qWriteRonly = 0x2 | 0x8 | 0x180
)

func TestUnbackedGuestPhysicalIsAnsweredAsHardwareWould(t *testing.T) {
	var e *ept.EPT
	var rip uint64
	mapped := func(gpa, size uint64) func(t *testing.T, v *hv.VCPU) {
		return func(t *testing.T, v *hv.VCPU) {
			hpa, p, mt, s, ok := e.Lookup(gpa)
			require.True(t, ok, "%#x mapped", gpa)
			assert.Equal(t, gpa, hpa, "one to one")
			assert.Equal(t, ept.RWX, p)
			assert.Equal(t, ept.Uncacheable, mt)
			assert.Equal(t, size, s, "page size")
			assert.Equal(t, rip, v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP], "the access runs again")
			assert.Zero(t, v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo], "nothing injected")
		}
	}
	steps := []vcputest.Step{
		// A 64-bit BAR at 32 GiB: read, then write.
		violation(0x8_0000_1008, qRead, func(t *testing.T, v *hv.VCPU) { mapped(0x8_0000_1008, ept.Size1G)(t, v) }),
		violation(0x8_4000_0000, qWrite, func(t *testing.T, v *hv.VCPU) { mapped(0x8_4000_0000, ept.Size1G)(t, v) }),
		// Just above RAM's end: the 4 KiB page after it, then a 2 MiB one.
		violation(0x1_4020_1000, qRead, func(t *testing.T, v *hv.VCPU) { mapped(0x1_4020_1000, ept.Size4K)(t, v) }),
		violation(0x1_4040_0000, qWrite, func(t *testing.T, v *hv.VCPU) { mapped(0x1_4040_0000, ept.Size2M)(t, v) }),
		// A fetch from tamahv's region: #UD, as executing all ones.
		violation(0x1000_1000, qFetchSink, func(t *testing.T, v *hv.VCPU) {
			assert.Equal(t, uint64(udInfo), v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo])
			assert.Equal(t, rip, v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP])
			hpa, p, _, _, _ := e.Lookup(0x1000_1000)
			assert.Equal(t, uint64(0x12001000), hpa, "still the sink")
			assert.Equal(t, ept.Read|ept.Write, p, "still not executable")
		}),
		// A stale translation: RAM allows the read now; it runs again.
		violation(0x2000, qRead, func(t *testing.T, v *hv.VCPU) {
			assert.Zero(t, v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo])
		}),
	}
	v, ee, u := unmappedGuest(t, steps)
	e = ee
	rip = v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP]
	flushes := 0
	u.Invalidate = func() { flushes++ }
	require.NoError(t, v.Run(), "no access ends tamahv")
	assert.Equal(t, uint64(4), u.Mapped)
	assert.Equal(t, uint64(1), u.Fetches)
	assert.Equal(t, 5, flushes)
}

func TestUnmappedLeavesTamahvBugsFatal(t *testing.T) {
	// A protection of tamahv's that nobody answers for.
	v, e, _ := unmappedGuest(t, []vcputest.Step{violation(0x5000, qWriteRonly, nil)})
	_, err := e.Protect(0x5000, ept.Read)
	require.NoError(t, err)
	assert.ErrorIs(t, v.Run(), hv.ErrFatalExit)

	// Beyond what a 4-level EPT maps.
	v, _, _ = unmappedGuest(t, []vcputest.Step{violation(1<<48, qRead, nil)})
	assert.ErrorIs(t, v.Run(), hv.ErrFatalExit)
}

func TestUnmappedAnswersWhatTheWatcherPassesOn(t *testing.T) {
	var e *ept.EPT
	v, ee, u := unmappedGuest(t, []vcputest.Step{
		violation(0x8_0000_0000, qWrite, func(t *testing.T, v *hv.VCPU) {
			hpa, _, mt, _, ok := e.Lookup(0x8_0000_0000)
			require.True(t, ok)
			assert.Equal(t, uint64(0x8_0000_0000), hpa)
			assert.Equal(t, ept.Uncacheable, mt)
		}),
		violation(0x1000_2000, qFetchSink, func(t *testing.T, v *hv.VCPU) {
			assert.Equal(t, uint64(udInfo), v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo])
		}),
	})
	e = ee
	g := NewWatcher(&GuestPhys{EPT: e, Hole: u.Hole}, 0)
	require.NoError(t, g.Install(v)) // after Unmapped, as runGuest does
	require.NoError(t, v.Run())
	assert.Zero(t, g.Stale, "not taken for a stale protection")
	assert.Equal(t, uint64(1), u.Mapped)
}

// With the host's MTRRs, a region mapped on first touch takes their
// types: a 1 GiB region holding a WC range and WB around it is mapped in
// spans of each.
func TestUnmappedTakesTheMTRRsTypes(t *testing.T) {
	var e *ept.EPT
	typed := func(gpa uint64, want ept.MemType) func(t *testing.T, v *hv.VCPU) {
		return func(t *testing.T, v *hv.VCPU) {
			_, _, mt, _, ok := e.Lookup(gpa)
			require.True(t, ok, "%#x mapped", gpa)
			assert.Equal(t, want, mt, "%#x", gpa)
		}
	}
	steps := []vcputest.Step{
		violation(0x8_0000_1008, qRead, typed(0x8_0000_1008, ept.WriteCombine)),
		violation(0x8_0020_0000, qRead, typed(0x8_0020_0000, ept.WriteBack)), // mapped with the first
		violation(0x9_0000_0000, qWrite, typed(0x9_0000_0000, ept.WriteBack)),
	}
	v, ee, u := unmappedGuest(t, steps)
	e = ee
	u.Types = &ept.MTRRs{Enabled: true, Default: ept.WriteBack, Variable: []ept.VariableMTRR{
		{Base: 0x8_0000_0000, Mask: ^uint64(1<<21 - 1), Type: ept.WriteCombine},
	}}
	require.NoError(t, v.Run())
	assert.Equal(t, uint64(2), u.Mapped, "two regions mapped on first touch")
}
