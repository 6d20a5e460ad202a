package hv

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/vmx"
)

// The local APIC's numbers (vmx/apic.go), short names.
const (
	apicICRLow        = vmx.APICICRLow
	apicICRHigh       = vmx.APICICRHigh
	icrDeliveryMode   = vmx.ICRDeliveryMode
	icrDeliveryINIT   = vmx.ICRDeliveryINIT
	icrLevelAssert    = vmx.ICRLevelAssert
	icrLevelTriggered = vmx.ICRLevelTriggered
	icrLogical        = vmx.ICRLogical
	icrShorthand      = vmx.ICRShorthand
	icrSelf           = vmx.ICRSelf
	icrAllIncSelf     = vmx.ICRAllIncSelf
	icrAllExclSelf    = vmx.ICRAllExclSelf
)

// APICWrites emulates the guest's writes to its local APIC's registers
// (xAPIC, memory-mapped at Base, which the EPT maps without write access
// where this is installed) so that tamahv sees the INIT IPIs the guest
// sends: an INIT to an application processor's vCPU is virtualized
// (INIT, below) instead of reaching the processor, which Bochs 2.7, for
// one, keeps pending forever once it reached a processor in VMX non-root
// operation. Every other write is made to the exiting vCPU's own local
// APIC, as the guest made it. Only MOV of 32 bits from a register or an
// immediate is emulated (what Linux writes APIC registers with); any other
// write stops the guest with an error that says so.
type APICWrites struct {
	Mem *GuestMemory
	// Base is the local APIC's physical address (4 KiB aligned).
	Base uint64
	// Write writes register off of the local APIC of the processor that
	// runs v; Read reads one.
	Write func(v *VCPU, off, val uint32)
	Read  func(v *VCPU, off uint32) uint32
	// INIT handles an INIT IPI v sends, with the ICR's low and high words:
	// it returns false where the IPI is to go out as written.
	INIT func(v *VCPU, low, high uint32) bool
	// Emulated counts the writes emulated; INITs those INIT took.
	Emulated, INITs uint64
}

// ErrAPICWrite is the error of a write to the local APIC's page that
// tamahv cannot emulate.
var ErrAPICWrite = errors.New("hv: a write to the local APIC tamahv does not emulate")

// Install puts the emulator in front of v's EPT violations.
func (a *APICWrites) Install(v *VCPU) error {
	if a.Base&0xfff != 0 || a.Write == nil || a.Read == nil || a.Mem == nil {
		return errors.New("hv: APICWrites needs a page-aligned Base, Mem, Read and Write")
	}
	return v.Intercept(vmx.ExitEPTViolation, a.onViolation)
}

func (a *APICWrites) onViolation(v *VCPU, e *vmx.Exit, next Handler) (Action, error) {
	if e.GuestPA&^0xfff != a.Base || !ept.DecodeViolation(e.Qualification).Write {
		return next(v, e)
	}
	off := uint32(e.GuestPA & 0xfff)
	val, n, err := a.decode(v, e)
	if err != nil {
		return Stop, fmt.Errorf("%w: at RIP %#x, offset %#x: %v", ErrAPICWrite, e.RIP, off, err)
	}
	a.Emulated++
	if off&^0xf == apicICRLow && val&icrDeliveryMode == icrDeliveryINIT && a.INIT != nil &&
		a.INIT(v, val, a.Read(v, apicICRHigh)) {
		a.INITs++
	} else {
		a.Write(v, off, val)
	}
	v.VMCS.Write(vmx.GuestRIP, e.RIP+uint64(n))
	if s := v.VMCS.Read(vmx.GuestInterruptibility); s&(blockingSTI|blockingMovSS) != 0 {
		v.VMCS.Write(vmx.GuestInterruptibility, s&^(blockingSTI|blockingMovSS))
	}
	return Resume, nil
}

// decode reads the instruction at e.RIP and returns the 32 bits it
// writes and its length.
func (a *APICWrites) decode(v *VCPU, e *vmx.Exit) (uint32, int, error) {
	if _, ok := vmx.DecodeEvent(e.IDTVectoring, 0); ok {
		return 0, 0, errors.New("during event delivery")
	}
	m := v.VMCS
	if m.Read(vmx.EntryControls)&vmx.EntryIA32eMode == 0 || m.Read(vmx.GuestCSAccess)&vmx.SegmentL == 0 || v.CPL() != 0 {
		return 0, 0, errors.New("not from 64-bit code at CPL 0")
	}
	cr3, cr4 := m.Read(vmx.GuestCR3)&CR3Mask, m.Read(vmx.GuestCR4)
	g := a.Mem
	n, ok := g.fetch(cr3, e.RIP, cr4)
	if !ok {
		return 0, 0, errors.New("instruction not readable")
	}
	var in ptInsn
	if !decodeWrite(g.emu.insn[:n], &in) || in.op != opMOV || in.size != 4 {
		return 0, 0, errors.New("not a 32-bit MOV")
	}
	if !g.operand(v, e.RIP, &in) || m.Read(vmx.GuestLinearAddr) != in.la {
		return 0, 0, errors.New("operand not the exiting address")
	}
	val := uint32(in.imm)
	if in.reg.size != 0 {
		val = uint32(regValue(v, in.reg))
	}
	return val, in.len, nil
}

// INITTargets returns the vCPUs an INIT IPI reaches, as a bit mask over
// apicIDs (vCPU i has APIC ID apicIDs[i]; at most 64): from the ICR's shorthand, or
// its physical destination; a logical destination reaches every vCPU but
// the sender (tamahv does not follow the guest's logical IDs). self is
// the sender's index. A level de-assert (the old INIT de-assert) reaches
// none.
func INITTargets(low, high uint32, self int, apicIDs []uint32) uint64 {
	if low&icrLevelTriggered != 0 && low&icrLevelAssert == 0 {
		return 0
	}
	all := uint64(1)<<len(apicIDs) - 1
	switch low & icrShorthand {
	case icrSelf:
		return 1 << self
	case icrAllIncSelf:
		return all
	case icrAllExclSelf:
		return all &^ (1 << self)
	}
	if low&icrLogical != 0 {
		return all &^ (1 << self)
	}
	dest := high >> 24
	var m uint64
	for i, id := range apicIDs {
		if id == dest {
			m |= 1 << i
		}
	}
	return m
}
