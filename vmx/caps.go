package vmx

import (
	"errors"
	"fmt"
	"io"
)

// Hardware is what capability discovery reads: CPUID and MSRs. The board
// implements it with the real instructions; tests replay values captured
// from CPU models.
type Hardware interface {
	CPUID(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)
	ReadMSR(msr uint32) uint64
}

// Allowed are the allowed settings of one VMX control field, as a capability
// MSR reports them (SDM Vol. 3C, "Appendix A.3 VM-Execution Controls"): a 1
// in Zero means the control must be 1 (allowed-0 setting is 1); a 0 in One
// means the control must be 0 (allowed-1 setting is 0).
type Allowed struct {
	Zero, One uint32
}

// AllowedFromMSR splits a capability MSR into its allowed settings.
func AllowedFromMSR(v uint64) Allowed {
	return Allowed{Zero: uint32(v), One: uint32(v >> 32)}
}

// Adjust returns want with every must-be-1 control set. It fails, naming
// the bits, when want asks for a control the CPU does not allow to be 1.
func (a Allowed) Adjust(want uint32) (uint32, error) {
	if bad := want &^ a.One; bad != 0 {
		return 0, fmt.Errorf("vmx: controls %#x not supported (allowed-1 %#x)", bad, a.One)
	}
	return want | a.Zero, nil
}

// Can reports whether every bit of mask may be set to 1.
func (a Allowed) Can(mask uint32) bool { return a.One&mask == mask }

// Control bits named by the capability checks (SDM Vol. 3C, "Appendix A").
const (
	ProcActivateSecondary = 1 << 31 // primary processor-based
	Proc2EnableEPT        = 1 << 1  // secondary processor-based
	Proc2EnableVPID       = 1 << 5
	Proc2Unrestricted     = 1 << 7
)

// EPTVPID are the bits of IA32_VMX_EPT_VPID_CAP (SDM Vol. 3C, "Appendix A.10
// VPID and EPT Capabilities").
type EPTVPID uint64

// EPT and VPID capability bits.
const (
	EPTExecuteOnly       EPTVPID = 1 << 0
	EPTWalk4             EPTVPID = 1 << 6
	EPTWalk5             EPTVPID = 1 << 7
	EPTUncacheable       EPTVPID = 1 << 8
	EPTWriteBack         EPTVPID = 1 << 14
	EPT2MPages           EPTVPID = 1 << 16
	EPT1GPages           EPTVPID = 1 << 17
	EPTInvept            EPTVPID = 1 << 20
	EPTAccessedDirty     EPTVPID = 1 << 21
	EPTInveptSingle      EPTVPID = 1 << 25
	EPTInveptAll         EPTVPID = 1 << 26
	VPIDInvvpid          EPTVPID = 1 << 32
	VPIDInvvpidAddress   EPTVPID = 1 << 40
	VPIDInvvpidSingle    EPTVPID = 1 << 41
	VPIDInvvpidAll       EPTVPID = 1 << 42
	VPIDInvvpidRetaining EPTVPID = 1 << 43
)

// Has reports whether every bit of c is set.
func (e EPTVPID) Has(c EPTVPID) bool { return e&c == c }

// Caps is what the processor says about VMX.
type Caps struct {
	FeatureControl uint64
	Basic          uint64
	Misc           uint64
	// Controls, from the TRUE_ MSRs where the CPU has them.
	Pin, Proc, Proc2, Exit, Entry Allowed
	CR0Fixed0, CR0Fixed1          uint64
	CR4Fixed0, CR4Fixed1          uint64
	EPTVPID                       EPTVPID
}

// Errors of Discover: VMX cannot be used.
var (
	ErrNoVMX     = errors.New("no VMX in CPUID")
	ErrLockedOff = errors.New("locked off by firmware")
)

// Discover reads the VMX capabilities, touching only MSRs that the SDM says
// exist given what was read before (so it raises no #GP). It fails with
// ErrNoVMX when CPUID.1:ECX.VMX is clear and with ErrLockedOff when
// IA32_FEATURE_CONTROL is locked with VMX outside SMX disabled.
func Discover(h Hardware) (*Caps, error) {
	_, _, ecx, _ := h.CPUID(1, 0)
	if ecx&CPUIDVMX == 0 {
		return nil, ErrNoVMX
	}
	c := &Caps{FeatureControl: h.ReadMSR(MSRFeatureControl)}
	if c.FeatureControl&FeatureControlLock != 0 && c.FeatureControl&FeatureControlVMXOutsideS == 0 {
		return nil, fmt.Errorf("%w (IA32_FEATURE_CONTROL=%#x)", ErrLockedOff, c.FeatureControl)
	}
	c.Basic = h.ReadMSR(MSRVMXBasic)
	c.Misc = h.ReadMSR(MSRMisc)
	pin, proc, exit, entry := uint32(MSRPinbasedCtls), uint32(MSRProcbasedCtls), uint32(MSRExitCtls), uint32(MSREntryCtls)
	if c.TrueControls() {
		pin, proc, exit, entry = MSRTruePinbasedCtls, MSRTrueProcbasedCtls, MSRTrueExitCtls, MSRTrueEntryCtls
	}
	c.Pin = AllowedFromMSR(h.ReadMSR(pin))
	c.Proc = AllowedFromMSR(h.ReadMSR(proc))
	c.Exit = AllowedFromMSR(h.ReadMSR(exit))
	c.Entry = AllowedFromMSR(h.ReadMSR(entry))
	c.CR0Fixed0 = h.ReadMSR(MSRCR0Fixed0)
	c.CR0Fixed1 = h.ReadMSR(MSRCR0Fixed1)
	c.CR4Fixed0 = h.ReadMSR(MSRCR4Fixed0)
	c.CR4Fixed1 = h.ReadMSR(MSRCR4Fixed1)
	if c.Proc.Can(ProcActivateSecondary) {
		c.Proc2 = AllowedFromMSR(h.ReadMSR(MSRProcbasedCtls2))
		if c.Proc2.One&(Proc2EnableEPT|Proc2EnableVPID) != 0 {
			c.EPTVPID = EPTVPID(h.ReadMSR(MSREPTVPIDCap))
		}
	}
	return c, nil
}

// Revision is the VMCS revision identifier (IA32_VMX_BASIC bits 30:0).
func (c *Caps) Revision() uint32 { return uint32(c.Basic & 0x7fff_ffff) }

// RegionSize is the size of the VMXON region and of a VMCS (bits 44:32).
func (c *Caps) RegionSize() int { return int(c.Basic >> 32 & 0x1fff) }

// TrueControls reports whether the TRUE_ control MSRs exist (bit 55).
func (c *Caps) TrueControls() bool { return c.Basic&(1<<55) != 0 }

// WriteBackVMCS reports whether the VMCS may be write-back memory (bits
// 53:50 = 6).
func (c *Caps) WriteBackVMCS() bool { return c.Basic>>50&0xf == 6 }

// PreemptionTimerShift is how many TSC bits the VMX-preemption timer drops
// (IA32_VMX_MISC bits 4:0).
func (c *Caps) PreemptionTimerShift() uint { return uint(c.Misc & 0x1f) }

// WaitForSIPI reports whether a VM entry may put the guest in the
// wait-for-SIPI activity state (IA32_VMX_MISC bit 8; SDM Vol. 3D,
// "Miscellaneous Data").
func (c *Caps) WaitForSIPI() bool { return c.Misc&(1<<8) != 0 }

// EPT reports whether EPT with 4-level walks and write-back paging
// structures can be used.
func (c *Caps) EPT() bool {
	return c.Proc2.Can(Proc2EnableEPT) && c.EPTVPID.Has(EPTWalk4|EPTWriteBack)
}

// VPID reports whether VPIDs can be enabled.
func (c *Caps) VPID() bool { return c.Proc2.Can(Proc2EnableVPID) }

// UnrestrictedGuest reports whether a guest may run unpaged or in real mode.
func (c *Caps) UnrestrictedGuest() bool { return c.Proc2.Can(Proc2Unrestricted) }

// FixCR0 returns v with the bits IA32_VMX_CR0_FIXED0/1 force set and
// cleared. With unrestrictedGuest, PE and PG may be 0 (SDM Vol. 3C,
// "Appendix A.7 VMX-Fixed Bits in CR0").
func (c *Caps) FixCR0(v uint64, unrestrictedGuest bool) uint64 {
	f0 := c.CR0Fixed0
	if unrestrictedGuest {
		f0 &^= CR0PE | CR0PG
	}
	return (v | f0) & c.CR0Fixed1
}

// FixCR4 returns v with the bits IA32_VMX_CR4_FIXED0/1 force set and
// cleared.
func (c *Caps) FixCR4(v uint64) uint64 { return (v | c.CR4Fixed0) & c.CR4Fixed1 }

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// Summary is the one-line feature summary printed after "tamahv: VMX on".
func (c *Caps) Summary() string {
	return fmt.Sprintf("revision %#x, EPT %s, VPID %s, unrestricted guest %s",
		c.Revision(), yesNo(c.EPT()), yesNo(c.VPID()), yesNo(c.UnrestrictedGuest()))
}

// Report writes the capability report, one fact per line.
func (c *Caps) Report(w io.Writer) {
	fmt.Fprintf(w, "vmx: IA32_FEATURE_CONTROL %#x (locked %s, VMX outside SMX %s)\n", c.FeatureControl,
		yesNo(c.FeatureControl&FeatureControlLock != 0), yesNo(c.FeatureControl&FeatureControlVMXOutsideS != 0))
	fmt.Fprintf(w, "vmx: IA32_VMX_BASIC %#x: revision %#x, region %d bytes, true controls %s, write-back VMCS %s\n",
		c.Basic, c.Revision(), c.RegionSize(), yesNo(c.TrueControls()), yesNo(c.WriteBackVMCS()))
	fmt.Fprintf(w, "vmx: pin %#08x/%#08x proc %#08x/%#08x proc2 %#08x/%#08x exit %#08x/%#08x entry %#08x/%#08x\n",
		c.Pin.Zero, c.Pin.One, c.Proc.Zero, c.Proc.One, c.Proc2.Zero, c.Proc2.One, c.Exit.Zero, c.Exit.One, c.Entry.Zero, c.Entry.One)
	fmt.Fprintf(w, "vmx: CR0 fixed %#x/%#x CR4 fixed %#x/%#x misc %#x\n", c.CR0Fixed0, c.CR0Fixed1, c.CR4Fixed0, c.CR4Fixed1, c.Misc)
	fmt.Fprintf(w, "vmx: EPT/VPID %#x: EPT %s (execute-only %s, 2M %s, 1G %s, A/D %s), VPID %s, unrestricted guest %s\n",
		uint64(c.EPTVPID), yesNo(c.EPT()), yesNo(c.EPTVPID.Has(EPTExecuteOnly)), yesNo(c.EPTVPID.Has(EPT2MPages)),
		yesNo(c.EPTVPID.Has(EPT1GPages)), yesNo(c.EPTVPID.Has(EPTAccessedDirty)), yesNo(c.VPID()), yesNo(c.UnrestrictedGuest()))
}
