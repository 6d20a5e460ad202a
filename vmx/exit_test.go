package vmx

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestExitReasons(t *testing.T) {
	assert.Equal(t, "EPTViolation", ExitEPTViolation.String())
	assert.Equal(t, "CPUID", ExitCPUID.String())
	assert.True(t, ExitXSETBV.Valid())
	assert.False(t, ExitReason(35).Valid())
	assert.False(t, ExitReason(1000).Valid())
	assert.Equal(t, "ExitReason(1000)", ExitReason(1000).String(), "out of range names itself, no panic")
	e := DecodeExit(0x80000021)
	assert.True(t, e.EntryFail)
	assert.Equal(t, ExitInvalidGuestState, e.Reason)
}

func TestFields(t *testing.T) {
	assert.Equal(t, Width16, GuestCS.Width())
	assert.Equal(t, Width64, EPTPointer.Width())
	assert.Equal(t, Width32, ExitReasonField.Width())
	assert.Equal(t, WidthNatural, GuestRIP.Width())
	assert.True(t, ExitQualification.ReadOnly())
	assert.True(t, InstructionError.ReadOnly())
	assert.False(t, GuestRIP.ReadOnly())
	assert.Equal(t, Field(VMCSInstructionError), InstructionError)
}

func TestEvents(t *testing.T) {
	gp := Exception(VectorGP, 0x10, 0)
	assert.Equal(t, uint32(0x80000b0d), gp.Info(), "#GP: hardware exception with error code")
	assert.Equal(t, uint32(0x80000306), Exception(VectorUD, 99, 0).Info(), "#UD has no error code")
	bp := Exception(VectorBP, 0, 1)
	assert.Equal(t, uint32(0x80000603), bp.Info())
	assert.True(t, bp.NeedsInstrLen())
	assert.False(t, gp.NeedsInstrLen())
	pf := Exception(VectorPF, 6, 0)
	got, ok := DecodeEvent(pf.Info(), 6)
	assert.True(t, ok)
	assert.Equal(t, pf, got)
	_, ok = DecodeEvent(0x0b0d, 0)
	assert.False(t, ok)
}

func TestQualifications(t *testing.T) {
	// MOV CR4, RCX
	assert.Equal(t, CRAccess{CR: 4, Type: CRMovTo, GPR: 1}, DecodeCRAccess(0x104))
	// LMSW from AX with source 0x11
	assert.Equal(t, CRAccess{CR: 0, Type: CRLMSW, LMSW: 0x11}, DecodeCRAccess(0x110030))
	// OUT DX, AL to 0x3f8
	assert.Equal(t, IOAccess{Size: 1, Port: 0x3f8}, DecodeIO(0x3f80000))
	// IN AX, 0x60 (immediate)
	assert.Equal(t, IOAccess{Size: 2, In: true, Immediate: true, Port: 0x60}, DecodeIO(0x600049))
}

func TestDecodeTaskSwitch(t *testing.T) {
	ts := DecodeTaskSwitch(0xc000_0028)
	assert.Equal(t, TaskSwitch{Selector: 0x28, Source: TaskSwitchGate}, ts)
	assert.Equal(t, "task gate in the IDT", ts.Source.String())
	assert.Equal(t, "JMP", DecodeTaskSwitch(0x8000_0030).Source.String())
}
