package hv

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/vmx"
)

const (
	apicBase = 0xfee00000
	apicVA   = 0xffffffffff5fb000 // Linux's fixmap of the local APIC
)

// fakeAPIC is the local APIC of the processor that runs the vCPU.
type fakeAPIC struct {
	regs   map[uint32]uint32
	writes []uint32 // offsets written, in order
	inits  [][2]uint32
	take   bool // INIT takes the IPI
}

func (f *fakeAPIC) emulator(gm *GuestMemory) *APICWrites {
	return &APICWrites{Mem: gm, Base: apicBase,
		Read: func(_ *VCPU, off uint32) uint32 { return f.regs[off] },
		Write: func(_ *VCPU, off, val uint32) {
			f.regs[off] = val
			f.writes = append(f.writes, off)
		},
		INIT: func(_ *VCPU, low, high uint32) bool {
			f.inits = append(f.inits, [2]uint32{low, high})
			return f.take
		},
	}
}

// apicWrite is the EPT violation of the instruction at ptRIP writing the
// local APIC's register off.
func apicWrite(off uint64, regs func(*vmx.GuestRegs), check func(*testing.T, *VCPU)) exitStep {
	return write(apicVA+off, apicBase+off, regs, check)
}

// TestAPICWritesEmulated: Linux's writes of its local APIC (MOV from a
// register to the fixmap) are made on the writer's local APIC, RIP moves
// past them; an INIT IPI goes to INIT, which keeps it from the local
// APIC where it takes it; a write the emulator does not know stops the
// guest with an error that says so, as does one to another address left
// to the handlers before it.
func TestAPICWritesEmulated(t *testing.T) {
	f := newPTFixture(t, swapPTE)
	f.g.mapPage(apicVA, apicBase, pteRW)
	f.g.setAD(apicVA)
	f.code(0x89, 0x04, 0x25, 0x00, 0xb3, 0x5f, 0xff) // mov %eax, 0xffffffffff5fb300 (ICR low)
	lapic := &fakeAPIC{regs: map[uint32]uint32{apicICRHigh: 1 << 24}, take: true}
	a := lapic.emulator(f.gm)
	eax := func(x uint64) func(*vmx.GuestRegs) { return func(r *vmx.GuestRegs) { r.RAX = x } }
	next := func(t *testing.T, v *VCPU) {
		assert.Equal(t, uint64(ptRIP+7), fv(v).Fields[vmx.GuestRIP], "past the MOV")
	}
	v := f.vcpu(t, []exitStep{
		apicWrite(apicICRLow, eax(0x4500), func(t *testing.T, v *VCPU) { // INIT, assert
			next(t, v)
			assert.Equal(t, [][2]uint32{{0x4500, 1 << 24}}, lapic.inits)
			assert.Empty(t, lapic.writes, "the INIT did not go out")
		}),
		apicWrite(apicICRLow, eax(0x0699), func(t *testing.T, v *VCPU) { // SIPI, vector 0x99
			next(t, v)
			assert.Equal(t, []uint32{apicICRLow}, lapic.writes)
			assert.Equal(t, uint32(0x699), lapic.regs[apicICRLow])
		}),
	})
	require.NoError(t, a.Install(v))
	require.NoError(t, v.Run())
	assert.EqualValues(t, 2, a.Emulated)
	assert.EqualValues(t, 1, a.INITs)

	f.code(0x87, 0x04, 0x25, 0x00, 0xb3, 0x5f, 0xff) // xchg %eax, 0xffffffffff5fb300
	v = f.vcpu(t, []exitStep{apicWrite(apicICRLow, eax(1), nil)})
	require.NoError(t, a.Install(v))
	assert.ErrorIs(t, v.Run(), ErrAPICWrite)
}

func TestINITTargets(t *testing.T) {
	ids := []uint32{0, 1, 4, 6}
	assert.EqualValues(t, 0b0100, INITTargets(0x4500, 4<<24, 0, ids), "physical: APIC ID 4 is vCPU 2")
	assert.EqualValues(t, 0, INITTargets(0x4500, 9<<24, 0, ids), "nobody has APIC ID 9")
	assert.EqualValues(t, 0, INITTargets(0x8500, 4<<24, 0, ids), "a level de-assert reaches none")
	assert.EqualValues(t, 0b1101, INITTargets(0xc4500, 0, 1, ids), "all but self")
	assert.EqualValues(t, 0b1111, INITTargets(0x84500, 0, 1, ids), "all")
	assert.EqualValues(t, 0b0010, INITTargets(0x44500, 0, 1, ids), "self")
	assert.EqualValues(t, 0b1110, INITTargets(0x4d00, 1<<24, 0, ids), "logical: every other vCPU")
}
