package hv

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/vmx"
)

// CPUID leaves tamahv answers itself.
const (
	CPUIDHypervisorBase = 0x40000000
	cpuidHypervisorBit  = 1 << 31
	cpuidOSXSAVE        = 1 << 27 // leaf 1 ECX
)

// Signature is what CPUID leaf 0x40000000 returns in EBX, ECX, EDX.
const Signature = "tamahvtamahv"

// ErrGuestTripleFault is Run's result when the guest triple-faults.
var ErrGuestTripleFault = errors.New("hv: guest triple fault")

func (v *VCPU) setDefaultHandlers() {
	v.handlers[vmx.ExitCPUID] = handleCPUID
	v.handlers[vmx.ExitVMCALL] = handleVMCALL
	for _, r := range []vmx.ExitReason{vmx.ExitVMCLEAR, vmx.ExitVMLAUNCH, vmx.ExitVMPTRLD, vmx.ExitVMPTRST,
		vmx.ExitVMREAD, vmx.ExitVMRESUME, vmx.ExitVMWRITE, vmx.ExitVMXOFF, vmx.ExitVMXON, vmx.ExitINVEPT,
		vmx.ExitINVVPID, vmx.ExitVMFUNC, vmx.ExitGETSEC, vmx.ExitENCLS} {
		v.handlers[r] = handleUD
	}
	v.handlers[vmx.ExitINVD] = func(*VCPU, vmx.Exit) (Action, error) { return Next, nil }
	v.handlers[vmx.ExitXSETBV] = handleXSETBV
	v.handlers[vmx.ExitRDMSR] = handleRDMSR
	v.handlers[vmx.ExitWRMSR] = handleWRMSR
	v.handlers[vmx.ExitCRAccess] = handleCR
	v.handlers[vmx.ExitIO] = handleIO
	v.handlers[vmx.ExitEPTViolation] = handleEPTViolation
	v.handlers[vmx.ExitEPTMisconfig] = handleEPTMisconfig
	v.handlers[vmx.ExitTripleFault] = func(v *VCPU, _ vmx.Exit) (Action, error) {
		return v.Stopped(fmt.Errorf("%w at RIP %#x", ErrGuestTripleFault, v.VMCS.Read(vmx.GuestRIP)))
	}
	v.handlers[vmx.ExitPreemptionTimer] = func(v *VCPU, _ vmx.Exit) (Action, error) {
		if v.OnTimer != nil {
			v.OnTimer(v)
		}
		return Resume, nil
	}
	v.handlers[vmx.ExitInterruptWindow] = resume
	v.handlers[vmx.ExitNMIWindow] = resume
	v.handlers[vmx.ExitExceptionOrNMI] = handleException
	v.handlers[vmx.ExitMonitorTrapFlag] = func(v *VCPU, _ vmx.Exit) (Action, error) {
		v.VMCS.Write(vmx.ProcControls, v.VMCS.Read(vmx.ProcControls)&^vmx.ProcMonitorTrapFlag)
		return Resume, nil
	}
}

func resume(*VCPU, vmx.Exit) (Action, error) { return Resume, nil }

// handleUD answers instructions the guest may not use (VMX, SMX, SGX) with
// #UD, as a processor without them would.
func handleUD(v *VCPU, _ vmx.Exit) (Action, error) {
	return Resume, v.InjectException(vmx.VectorUD, 0)
}

func handleCPUID(v *VCPU, _ vmx.Exit) (Action, error) {
	leaf, sub := uint32(v.Regs.RAX), uint32(v.Regs.RCX)
	var a, b, c, d uint32
	switch {
	case leaf == CPUIDHypervisorBase:
		a = CPUIDHypervisorBase + 1
		b, c, d = le32(Signature[0:4]), le32(Signature[4:8]), le32(Signature[8:12])
	case leaf == CPUIDHypervisorBase+1:
	default:
		var r [4]uint32
		if v.CPUID != nil {
			r[0], r[1], r[2], r[3] = v.CPUID(leaf, sub)
		}
		v.filterCPUID(leaf, sub, &r)
		a, b, c, d = r[0], r[1], r[2], r[3]
	}
	v.Regs.RAX, v.Regs.RBX, v.Regs.RCX, v.Regs.RDX = uint64(a), uint64(b), uint64(c), uint64(d)
	return Next, nil
}

func le32(s string) uint32 {
	return uint32(s[0]) | uint32(s[1])<<8 | uint32(s[2])<<16 | uint32(s[3])<<24
}

func handleVMCALL(v *VCPU, _ vmx.Exit) (Action, error) {
	if v.Hypercalls == nil {
		v.Regs.RAX = HypercallUnknown
		return Next, nil
	}
	ret, stop := v.Hypercalls.Call(v, v.Regs.RAX, v.Regs.RDI, v.Regs.RSI, v.Regs.RDX)
	v.Regs.RAX = ret
	if stop {
		v.skipInstruction()
		return v.Stopped(nil)
	}
	return Next, nil
}

// XCR0 bits.
const (
	xcr0X87 = 1 << 0
	xcr0SSE = 1 << 1
	xcr0AVX = 1 << 2
)

func handleXSETBV(v *VCPU, _ vmx.Exit) (Action, error) {
	xcr := uint32(v.Regs.RCX)
	val := v.Regs.RDX<<32 | v.Regs.RAX&0xffffffff
	var supported uint64
	if v.CPUID != nil {
		a, _, _, d := v.CPUID(0xd, 0)
		supported = uint64(d)<<32 | uint64(a)
	}
	if xcr != 0 || val&xcr0X87 == 0 || val&^supported != 0 || (val&xcr0AVX != 0 && val&xcr0SSE == 0) ||
		v.VMCS.Read(vmx.GuestCR4)&(1<<18) == 0 || v.XSETBV == nil {
		return Resume, v.InjectException(vmx.VectorGP, 0)
	}
	v.XSETBV(xcr, val)
	return Next, nil
}

// FeatureControlGuest is what the guest reads from IA32_FEATURE_CONTROL:
// locked, VMX off.
const FeatureControlGuest = vmx.FeatureControlLock

func handleRDMSR(v *VCPU, _ vmx.Exit) (Action, error) {
	val, ok := v.rdmsr(uint32(v.Regs.RCX))
	if !ok {
		return Resume, v.InjectException(vmx.VectorGP, 0)
	}
	v.Regs.RAX, v.Regs.RDX = val&0xffffffff, val>>32
	return Next, nil
}

func handleWRMSR(v *VCPU, _ vmx.Exit) (Action, error) {
	// The policy is in msr.go.
	if !v.wrmsr(uint32(v.Regs.RCX), v.Regs.RDX<<32|v.Regs.RAX&0xffffffff) {
		return Resume, v.InjectException(vmx.VectorGP, 0)
	}
	return Next, nil
}

// CR0 and CR4 bits the handlers look at.
const (
	cr0PG     = 1 << 31
	cr4VMXE   = 1 << 13
	eferLME   = 1 << 8
	eferLMA   = 1 << 10
	guestCR4X = 1 << 18 // OSXSAVE
)

func handleCR(v *VCPU, e vmx.Exit) (Action, error) {
	q := vmx.DecodeCRAccess(v.VMCS.Read(vmx.ExitQualification))
	if q.Type != vmx.CRMovTo {
		return Stop, fmt.Errorf("%w: CR%d access type %d not expected", ErrFatalExit, q.CR, q.Type)
	}
	val := v.Regs.GPR(q.GPR)
	if q.GPR == 4 {
		val = v.VMCS.Read(vmx.GuestRSP)
	}
	switch q.CR {
	case 0:
		return v.writeCR0(val)
	case 4:
		return v.writeCR4(val)
	}
	return Stop, fmt.Errorf("%w: MOV to CR%d not expected", ErrFatalExit, q.CR)
}

func (v *VCPU) writeCR0(val uint64) (Action, error) {
	if val>>32 != 0 || (val&cr0PG != 0 && val&vmx.CR0PE == 0) {
		return Resume, v.InjectException(vmx.VectorGP, 0)
	}
	old := v.VMCS.Read(vmx.GuestCR0)
	v.VMCS.Write(vmx.CR0ReadShadow, val)
	v.VMCS.Write(vmx.GuestCR0, v.Caps.FixCR0(val, true))
	// Paging turned on or off with EFER.LME: enter or leave IA-32e mode,
	// as the processor would have had the write not exited.
	if (old^val)&cr0PG != 0 {
		efer := v.VMCS.Read(vmx.GuestEFER)
		entry := v.VMCS.Read(vmx.EntryControls)
		if val&cr0PG != 0 && efer&eferLME != 0 {
			efer |= eferLMA
			entry |= vmx.EntryIA32eMode
		} else if val&cr0PG == 0 {
			efer &^= eferLMA
			entry &^= vmx.EntryIA32eMode
		}
		v.VMCS.Write(vmx.GuestEFER, efer)
		v.VMCS.Write(vmx.EntryControls, entry)
	}
	return Next, nil
}

func (v *VCPU) writeCR4(val uint64) (Action, error) {
	allowed := v.Caps.CR4Fixed1 &^ cr4VMXE
	if val&^allowed != 0 {
		return Resume, v.InjectException(vmx.VectorGP, 0)
	}
	v.VMCS.Write(vmx.CR4ReadShadow, val)
	v.VMCS.Write(vmx.GuestCR4, v.Caps.FixCR4(val))
	return Next, nil
}

// OwnPorts makes the guest's accesses to ports [first, last] exit: reads
// see all ones, writes vanish. The I/O bitmaps must select them (IOBitmaps
// does).
func (v *VCPU) OwnPorts(first, last uint16) { v.ioPorts = append(v.ioPorts, [2]uint16{first, last}) }

func (v *VCPU) ownsPort(p uint16) bool {
	for _, r := range v.ioPorts {
		if p >= r[0] && p <= r[1] {
			return true
		}
	}
	return false
}

func handleIO(v *VCPU, _ vmx.Exit) (Action, error) {
	io := vmx.DecodeIO(v.VMCS.Read(vmx.ExitQualification))
	if !v.ownsPort(io.Port) {
		return Stop, fmt.Errorf("%w: I/O to port %#x that tamahv does not own", ErrFatalExit, io.Port)
	}
	if io.String {
		// INS/OUTS on a console port: nothing is transferred; a REP
		// prefix completes at once.
		if io.Rep {
			v.Regs.RCX = 0
		}
		return Next, nil
	}
	if io.In {
		mask := uint64(1)<<(8*io.Size) - 1
		v.Regs.RAX = v.Regs.RAX&^mask | mask
	}
	return Next, nil
}

func handleEPTViolation(v *VCPU, _ vmx.Exit) (Action, error) {
	gpa := v.VMCS.Read(vmx.GuestPhysAddr)
	q := ept.DecodeViolation(v.VMCS.Read(vmx.ExitQualification))
	gva := "n/a"
	if q.LinearValid {
		gva = fmt.Sprintf("%#x", v.VMCS.Read(vmx.GuestLinearAddr))
	}
	return Stop, fmt.Errorf("%w: EPT violation at GPA %#x (GVA %s, RIP %#x): %v", ErrFatalExit, gpa, gva, v.VMCS.Read(vmx.GuestRIP), q)
}

func handleEPTMisconfig(v *VCPU, _ vmx.Exit) (Action, error) {
	return Stop, fmt.Errorf("%w: EPT misconfiguration at GPA %#x", ErrFatalExit, v.VMCS.Read(vmx.GuestPhysAddr))
}

// handleException reflects an intercepted exception or NMI back to the
// guest.
func handleException(v *VCPU, _ vmx.Exit) (Action, error) {
	e, ok := vmx.DecodeEvent(uint32(v.VMCS.Read(vmx.ExitInterruptInfo)), 0)
	if !ok {
		return Resume, nil
	}
	if e.HasError {
		e.ErrorCode = uint32(v.VMCS.Read(vmx.ExitInterruptError))
	}
	if e.NeedsInstrLen() {
		e.InstrLen = uint32(v.VMCS.Read(vmx.ExitInstructionLen))
	}
	if e.Type == vmx.EventNMI {
		// NMI exiting: the NMI was the guest's (its LAPIC, its
		// counters); it goes back to the guest.
		v.queueNMI()
		return Resume, nil
	}
	return Resume, v.Inject(e)
}
