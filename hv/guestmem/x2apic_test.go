package guestmem

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/vmx"
)

// fakeX2APIC is the MSR side of the processor that runs the vCPU: its
// IA32_APIC_BASE and x2APIC ID, and the interrupt commands written.
type fakeX2APIC struct {
	base uint64
	id   uint32
	icr  []uint64
}

func (x *fakeX2APIC) attach(v *hv.VCPU) {
	v.ReadMSR = func(msr uint32) uint64 {
		switch msr {
		case vmx.MSRAPICBase:
			return x.base
		case vmx.MSRX2APICID:
			return uint64(x.id)
		}
		panic("an MSR the test does not have")
	}
	v.WriteMSR = func(msr uint32, val uint64) {
		if msr != vmx.MSRX2APICICR {
			panic("an MSR the test does not have")
		}
		x.icr = append(x.icr, val)
	}
}

const x2APICOn = apicBase | vmx.APICBaseEnable | vmx.APICBaseX2APIC

// wrmsrICR is the guest's WRMSR of val to IA32_X2APIC_ICR.
func wrmsrICR(val uint64, check func(*testing.T, *hv.VCPU)) vcputest.Step {
	return vcputest.Step{Reason: vmx.ExitWRMSR, Regs: func(r *vmx.GuestRegs) {
		r.RCX, r.RAX, r.RDX = vmx.MSRX2APICICR, val&0xffffffff, val>>32
	}, Check: check}
}

// TestX2APICICRWritesExit: the guest's writes of the x2APIC's interrupt
// command register exit (its reads do not), so that tamahv sees every
// IPI the guest sends in x2APIC mode.
func TestX2APICICRWritesExit(t *testing.T) {
	var b [4096]byte
	hv.GuestMSRBitmap(&b)
	const m = vmx.MSRX2APICICR
	assert.NotZero(t, b[2048+m/8]&(1<<(m%8)), "WRMSR exits")
	assert.Zero(t, b[m/8]&(1<<(m%8)), "RDMSR passes")
}

// TestX2APICStartUpAndINITReachVCPUsOnly: the INIT and start-up IPIs a
// vCPU sends with WRMSR to its x2APIC reach vCPUs (x2APIC IDs 0, 1 and 4)
// and no other processor: physical, logical (the x2APIC's derived logical
// IDs), shorthands; an INIT to application processors' vCPUs is applied
// by INIT. A WRMSR the processor would refuse raises #GP(0) and sends
// nothing.
func TestX2APICStartUpAndINITReachVCPUsOnly(t *testing.T) {
	const sipi, init = 0x0699, 0x4500
	cases := []struct {
		name  string
		base  uint64
		val   uint64
		take  bool
		icr   []uint64
		inits []uint64
		gp    bool
	}{
		{name: "SIPI to a vCPU: as written", val: 4<<32 | sipi, icr: []uint64{4<<32 | sipi}},
		{name: "SIPI with the delivery status bit: ignored", val: 4<<32 | sipi | vmx.ICRPending, icr: []uint64{4<<32 | sipi}},
		{name: "SIPI to another processor: dropped", val: 2<<32 | sipi},
		{name: "SIPI to all excluding self: to each other vCPU", val: sipi | vmx.ICRAllExclSelf,
			icr: []uint64{1<<32 | sipi, 4<<32 | sipi}},
		{name: "SIPI to logical IDs 1, 2 and 4 of cluster 0: to vCPUs 1 and 4", val: 0x16<<32 | sipi | vmx.ICRLogical,
			icr: []uint64{1<<32 | sipi, 4<<32 | sipi}},
		{name: "SIPI broadcast: to each vCPU", val: 0xffffffff<<32 | sipi,
			icr: []uint64{sipi, 1<<32 | sipi, 4<<32 | sipi}},
		{name: "INIT to an AP's vCPU: applied", val: 1<<32 | init, take: true, inits: []uint64{0b010}},
		{name: "INIT to another processor: dropped", val: 2<<32 | init},
		{name: "a fixed IPI to all excluding self: as written", val: 0xc00fd, icr: []uint64{0xc00fd}},
		{name: "a reserved bit: #GP", val: 4<<32 | sipi | 1<<13, gp: true},
		{name: "the local APIC in xAPIC mode: #GP", base: apicBase | vmx.APICBaseEnable, val: 4<<32 | sipi, gp: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := apicFixture(t)
			lapic := newFakeAPIC()
			lapic.take = c.take
			a := lapic.emulator(f.gm)
			x := &fakeX2APIC{base: x2APICOn}
			if c.base != 0 {
				x.base = c.base
			}
			v := f.vcpu(t, []vcputest.Step{wrmsrICR(c.val, func(t *testing.T, v *hv.VCPU) {
				assert.Equal(t, c.icr, x.icr)
				assert.Equal(t, c.inits, lapic.inits)
				assert.Empty(t, lapic.writes, "nothing through the xAPIC's page")
				if c.gp {
					assert.Equal(t, uint64(0x80000b0d), v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo], "#GP(0)")
					assert.Equal(t, uint64(ptRIP), v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP])
				} else {
					assert.Zero(t, v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo])
					assert.Equal(t, uint64(ptRIP+3), v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP], "past the WRMSR")
				}
			})})
			x.attach(v)
			require.NoError(t, a.Install(v))
			require.NoError(t, v.Run())
		})
	}
}

// TestX2APICICROfTheOnlyVCPU: without application processors' vCPUs (no
// APICWrites), the guest's INIT and start-up IPIs in x2APIC mode reach its
// one vCPU's processor only.
func TestX2APICICROfTheOnlyVCPU(t *testing.T) {
	const sipi = 0x0699
	cases := []struct {
		name string
		val  uint64
		icr  []uint64
		gp   bool
	}{
		{name: "SIPI to itself: as written", val: 5<<32 | sipi, icr: []uint64{5<<32 | sipi}},
		{name: "SIPI to another processor: dropped", val: 6<<32 | sipi},
		{name: "SIPI to all excluding self: dropped", val: sipi | vmx.ICRAllExclSelf},
		{name: "SIPI broadcast: to itself", val: 0xffffffff<<32 | sipi, icr: []uint64{5<<32 | sipi}},
		{name: "INIT to another cluster: dropped", val: 0x1ffff<<32 | 0x4d00},
		{name: "INIT to logical IDs with its own: to itself", val: 0xffff<<32 | 0x4d00, icr: []uint64{5<<32 | 0x4500}},
		{name: "a fixed IPI: as written", val: 6<<32 | 0xfd, icr: []uint64{6<<32 | 0xfd}},
		{name: "a reserved bit: #GP", val: 5<<32 | sipi | 1<<16, gp: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			x := &fakeX2APIC{base: x2APICOn, id: 5}
			v, m := vcputest.Scripted(t, []vcputest.Step{wrmsrICR(c.val, func(t *testing.T, v *hv.VCPU) {
				assert.Equal(t, c.icr, x.icr)
				if c.gp {
					assert.Equal(t, uint64(0x80000b0d), v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo], "#GP(0)")
				} else {
					assert.Zero(t, v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo])
				}
			})})
			_ = m
			x.attach(v)
			require.NoError(t, v.Run())
		})
	}
}
