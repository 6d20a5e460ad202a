package hv

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/vmx"
)

// CPUID leaves tamahv answers itself.
const (
	CPUIDHypervisorBase = vmx.CPUIDLeafHypervisor
)

// Signature is what CPUID leaf 0x40000000 returns in EBX, ECX, EDX.
const Signature = "tamahvtamahv"

// ErrGuestTripleFault is Run's result when the guest triple-faults.
var ErrGuestTripleFault = errors.New("hv: guest triple fault")

// defaultHandlers returns tamahv's handler for every exit reason it
// answers; interceptors go in front of them (VCPU.Intercept).
func defaultHandlers() (h [vmx.NumExitReasons]Handler) {
	h[vmx.ExitCPUID] = handleCPUID
	h[vmx.ExitVMCALL] = handleVMCALL
	for _, r := range []vmx.ExitReason{vmx.ExitVMCLEAR, vmx.ExitVMLAUNCH, vmx.ExitVMPTRLD, vmx.ExitVMPTRST,
		vmx.ExitVMREAD, vmx.ExitVMRESUME, vmx.ExitVMWRITE, vmx.ExitVMXOFF, vmx.ExitVMXON, vmx.ExitINVEPT,
		vmx.ExitINVVPID, vmx.ExitVMFUNC, vmx.ExitGETSEC, vmx.ExitENCLS} {
		h[r] = handleUD
	}
	h[vmx.ExitINVD] = func(*VCPU, *vmx.Exit) (Action, error) { return Next, nil }
	h[vmx.ExitXSETBV] = handleXSETBV
	h[vmx.ExitRDMSR] = handleRDMSR
	h[vmx.ExitWRMSR] = handleWRMSR
	h[vmx.ExitCRAccess] = handleCR
	h[vmx.ExitIO] = handleIO
	h[vmx.ExitEPTViolation] = handleEPTViolation
	h[vmx.ExitEPTMisconfig] = handleEPTMisconfig
	h[vmx.ExitTripleFault] = func(v *VCPU, e *vmx.Exit) (Action, error) {
		return v.Stopped(fmt.Errorf("%w at RIP %#x", ErrGuestTripleFault, e.RIP))
	}
	h[vmx.ExitPreemptionTimer] = func(v *VCPU, _ *vmx.Exit) (Action, error) {
		v.tick()
		return Resume, nil
	}
	h[vmx.ExitInterruptWindow] = resume
	h[vmx.ExitNMIWindow] = resume
	h[vmx.ExitExceptionOrNMI] = handleException
	h[vmx.ExitINIT] = handleINIT
	h[vmx.ExitSIPI] = handleSIPI
	h[vmx.ExitTaskSwitch] = handleTaskSwitch
	h[vmx.ExitMonitorTrapFlag] = func(v *VCPU, _ *vmx.Exit) (Action, error) {
		v.VMCS.Write(vmx.ProcControls, v.VMCS.Read(vmx.ProcControls)&^vmx.ProcMonitorTrapFlag)
		return Resume, nil
	}
	return h
}

func resume(*VCPU, *vmx.Exit) (Action, error) { return Resume, nil }

// handleUD answers instructions the guest may not use (VMX, SMX, SGX) with
// #UD, as a processor without them would.
func handleUD(v *VCPU, _ *vmx.Exit) (Action, error) {
	return Resume, v.InjectException(vmx.VectorUD, 0)
}

func handleCPUID(v *VCPU, _ *vmx.Exit) (Action, error) {
	r := v.guestCPUID(uint32(v.Regs.RAX), uint32(v.Regs.RCX))
	v.Regs.RAX, v.Regs.RBX, v.Regs.RCX, v.Regs.RDX = uint64(r[0]), uint64(r[1]), uint64(r[2]), uint64(r[3])
	return Next, nil
}

// guestCPUID is the guest's answer to CPUID leaf/sub: tamahv's own
// leaves, or the processor's answer as filterCPUID leaves it.
func (v *VCPU) guestCPUID(leaf, sub uint32) [4]uint32 {
	var r [4]uint32
	switch {
	case leaf == CPUIDHypervisorBase:
		r = [4]uint32{CPUIDHypervisorBase + 1, le32(Signature[0:4]), le32(Signature[4:8]), le32(Signature[8:12])}
	case leaf == CPUIDHypervisorBase+1:
	default:
		if v.CPUID != nil {
			r[0], r[1], r[2], r[3] = v.CPUID(leaf, sub)
		}
		if filteredLeaf(leaf) {
			v.filterCPUID(leaf, sub, &r)
		}
	}
	return r
}

func le32(s string) uint32 {
	return uint32(s[0]) | uint32(s[1])<<8 | uint32(s[2])<<16 | uint32(s[3])<<24
}

func handleVMCALL(v *VCPU, e *vmx.Exit) (Action, error) {
	if v.Hypercalls == nil {
		v.Regs.RAX = hcall.Unknown
		return Next, nil
	}
	ret, stop := v.Hypercalls.Call(v, v.Regs.RAX, v.Regs.RDI, v.Regs.RSI, v.Regs.RDX)
	v.Regs.RAX = ret
	if stop {
		v.skipInstruction(e.RIP)
		return v.Stopped(nil)
	}
	return Next, nil
}

// handleXSETBV loads XCR0 with a value the processor accepts and answers
// every other one as the SDM's XSETBV does: #UD with CR4.OSXSAVE clear,
// #GP(0) at CPL>0, for an XCR other than 0, and for a value
// vmx.ValidXCR0 refuses. The processor checks the CPL and CR4.OSXSAVE
// before the VM exit; the handler checks them again anyway.
func handleXSETBV(v *VCPU, _ *vmx.Exit) (Action, error) {
	if v.VMCS.Read(vmx.GuestCR4)&vmx.CR4OSXSAV == 0 {
		return Resume, v.InjectException(vmx.VectorUD, 0)
	}
	xcr := uint32(v.Regs.RCX)
	val := v.Regs.RDX<<32 | v.Regs.RAX&0xffffffff
	var supported uint64
	if v.CPUID != nil {
		a, _, _, d := v.CPUID(0xd, 0)
		supported = uint64(d)<<32 | uint64(a)
	}
	if v.CPL() != 0 || xcr != 0 || !vmx.ValidXCR0(val, supported) || v.XSETBV == nil {
		return Resume, v.InjectException(vmx.VectorGP, 0)
	}
	v.XSETBV(xcr, val)
	return Next, nil
}

// FeatureControlGuest is what the guest reads from IA32_FEATURE_CONTROL:
// locked, VMX off.
const FeatureControlGuest = vmx.FeatureControlLock

func handleRDMSR(v *VCPU, _ *vmx.Exit) (Action, error) {
	val, ok := v.rdmsr(uint32(v.Regs.RCX))
	if !ok {
		return Resume, v.InjectException(vmx.VectorGP, 0)
	}
	v.Regs.RAX, v.Regs.RDX = val&0xffffffff, val>>32
	return Next, nil
}

func handleWRMSR(v *VCPU, _ *vmx.Exit) (Action, error) {
	// The policy is in msr.go.
	if !v.wrmsr(uint32(v.Regs.RCX), v.Regs.RDX<<32|v.Regs.RAX&0xffffffff) {
		return Resume, v.InjectException(vmx.VectorGP, 0)
	}
	return Next, nil
}

// cr0PDPTEBits and cr4PDPTEBits are the bits whose change makes a MOV to
// CR0 or CR4 load the PDPTEs in PAE paging (KVM's X86_CR0_PDPTR_BITS and
// X86_CR4_PDPTR_BITS; SDM Vol. 3A, "Loading and Storing the PDPTEs").
const (
	cr0PDPTEBits = vmx.CR0PG | vmx.CR0CD | vmx.CR0NW
	cr4PDPTEBits = vmx.CR4PGE | vmx.CR4PSE | vmx.CR4PAE | vmx.CR4SMEP
)

func handleCR(v *VCPU, e *vmx.Exit) (Action, error) {
	q := vmx.DecodeCRAccess(e.Qualification)
	switch {
	case q.CR == 0 && q.Type == vmx.CRCLTS:
		return v.writeCR0(v.guestCR0() &^ vmx.CR0TS)
	case q.CR == 0 && q.Type == vmx.CRLMSW:
		// LMSW loads CR0[3:0] and can set PE but not clear it.
		old := v.guestCR0()
		return v.writeCR0(old&^0xe | uint64(q.LMSW)&0xf | old&vmx.CR0PE)
	case q.Type != vmx.CRMovTo:
		return Stop, fmt.Errorf("%w: CR%d access type %d not expected", ErrFatalExit, q.CR, q.Type)
	}
	val := v.Regs.GPR(q.GPR)
	if q.GPR == 4 {
		val = v.VMCS.Read(vmx.GuestRSP)
	}
	if !v.mode64() {
		val &= 0xffffffff // the operand is 32 bits outside 64-bit mode
	}
	switch q.CR {
	case 0:
		return v.writeCR0(val)
	case 4:
		return v.writeCR4(val)
	}
	return Stop, fmt.Errorf("%w: MOV to CR%d not expected", ErrFatalExit, q.CR)
}

// mode64 reports whether the guest runs 64-bit code: IA-32e mode and
// CS.L.
func (v *VCPU) mode64() bool {
	return v.VMCS.Read(vmx.GuestEFER)&vmx.EFERLMA != 0 && v.VMCS.Read(vmx.GuestCSAccess)&vmx.SegmentL != 0
}

// guestCR0 and guestCR4 are the values the guest sees: its own bits from
// the guest-state field, the bits tamahv owns from the read shadow.
func (v *VCPU) guestCR0() uint64 {
	m := v.VMCS.Read(vmx.CR0GuestHostMask)
	return v.VMCS.Read(vmx.GuestCR0)&^m | v.VMCS.Read(vmx.CR0ReadShadow)&m
}

func (v *VCPU) guestCR4() uint64 {
	m := v.VMCS.Read(vmx.CR4GuestHostMask)
	return v.VMCS.Read(vmx.GuestCR4)&^m | v.VMCS.Read(vmx.CR4ReadShadow)&m
}

// gp injects #GP(0) and re-enters at the faulting instruction.
func (v *VCPU) gp() (Action, error) { return Resume, v.InjectException(vmx.VectorGP, 0) }

// writeCR0 emulates MOV to CR0 with the processor's checks (SDM Vol. 2B,
// "MOV—Move to/from Control Registers"; KVM's kvm_set_cr0 lists them):
// #GP for bits 63:32, NW without CD, PG without PE, clearing WP with
// CR4.CET, enabling paging with EFER.LME but without CR4.PAE or with CS.L,
// clearing PG in 64-bit mode or with CR4.PCIDE, and PAE paging whose
// PDPTEs have reserved bits set. It enters and leaves IA-32e mode and
// loads the PDPTEs as the write would have had it not exited, so the
// next VM entry's checks (SDM Vol. 3C, "Checks on Guest Control
// Registers, Debug Registers, and MSRs") hold.
func (v *VCPU) writeCR0(val uint64) (Action, error) {
	old := v.guestCR0()
	cr4 := v.guestCR4()
	efer := v.VMCS.Read(vmx.GuestEFER)
	switch {
	case val>>32 != 0,
		val&vmx.CR0NW != 0 && val&vmx.CR0CD == 0,
		val&vmx.CR0PG != 0 && val&vmx.CR0PE == 0,
		val&vmx.CR0WP == 0 && cr4&vmx.CR4CET != 0:
		return v.gp()
	}
	val = val&vmx.CR0Defined | vmx.CR0ET // reserved bits are ignored, ET is fixed
	pagingOn := old&vmx.CR0PG == 0 && val&vmx.CR0PG != 0
	pagingOff := old&vmx.CR0PG != 0 && val&vmx.CR0PG == 0
	if pagingOn && efer&vmx.EFERLME != 0 && (cr4&vmx.CR4PAE == 0 || v.VMCS.Read(vmx.GuestCSAccess)&vmx.SegmentL != 0) {
		return v.gp()
	}
	if pagingOff && (v.mode64() || cr4&vmx.CR4PCIDE != 0) {
		return v.gp()
	}
	if val&vmx.CR0PG != 0 && efer&vmx.EFERLME == 0 && cr4&vmx.CR4PAE != 0 && (val^old)&cr0PDPTEBits != 0 {
		if !v.loadPDPTEs() {
			return v.gp()
		}
	}
	v.VMCS.Write(vmx.CR0ReadShadow, val)
	v.VMCS.Write(vmx.GuestCR0, v.Caps.FixCR0(val, true))
	// Paging turned on or off with EFER.LME: enter or leave IA-32e mode,
	// as the processor would have had the write not exited.
	entry := v.VMCS.Read(vmx.EntryControls)
	switch {
	case pagingOn && efer&vmx.EFERLME != 0:
		v.VMCS.Write(vmx.GuestEFER, efer|vmx.EFERLMA)
		v.VMCS.Write(vmx.EntryControls, entry|vmx.EntryIA32eMode)
		// VM entry in IA-32e mode needs a busy 64-bit TSS in TR; the
		// processor uses TR's type only at the next task access, so
		// fix it up as KVM's enter_lmode does.
		if tr := v.VMCS.Read(vmx.GuestTRAccess); tr&vmx.SegmentTypeMask != vmx.TSSBusy64 {
			v.VMCS.Write(vmx.GuestTRAccess, tr&^vmx.SegmentTypeMask|vmx.TSSBusy64)
		}
	case pagingOff:
		v.VMCS.Write(vmx.GuestEFER, efer&^vmx.EFERLMA)
		v.VMCS.Write(vmx.EntryControls, entry&^vmx.EntryIA32eMode)
	}
	return Next, nil
}

// writeCR4 emulates MOV to CR4 with the processor's checks (KVM's
// kvm_set_cr4): #GP for bits the processor lacks or the guest may not set
// (VMXE), for bits 63:32, for clearing PAE or changing LA57 in IA-32e
// mode, for setting PCIDE outside IA-32e mode or with CR3[11:0] not zero,
// for CET without CR0.WP, and in PAE paging for PDPTEs with reserved bits
// set. Today only writes that set VMXE or a missing bit exit (the CR4
// guest/host mask holds just those); the checks keep the VMCS valid for
// any mask.
func (v *VCPU) writeCR4(val uint64) (Action, error) {
	allowed := v.Caps.CR4Fixed1 &^ vmx.CR4VMXE
	old := v.guestCR4()
	cr0 := v.guestCR0()
	lma := v.VMCS.Read(vmx.GuestEFER)&vmx.EFERLMA != 0
	switch {
	case val&^allowed != 0 || val>>32 != 0,
		lma && (val&vmx.CR4PAE == 0 || (val^old)&vmx.CR4LA57 != 0),
		val&vmx.CR4PCIDE != 0 && old&vmx.CR4PCIDE == 0 && (!lma || v.VMCS.Read(vmx.GuestCR3)&0xfff != 0),
		val&vmx.CR4CET != 0 && cr0&vmx.CR0WP == 0:
		return v.gp()
	}
	if !lma && cr0&vmx.CR0PG != 0 && val&vmx.CR4PAE != 0 && (val^old)&cr4PDPTEBits != 0 {
		if !v.loadPDPTEs() {
			return v.gp()
		}
	}
	v.VMCS.Write(vmx.CR4ReadShadow, val)
	v.VMCS.Write(vmx.GuestCR4, v.Caps.FixCR4(val))
	return Next, nil
}

// loadPDPTEs reads the four PAE PDPTEs at CR3[31:5] through v.Mem into
// the VMCS, where VM entry loads them from with EPT (SDM Vol. 3C,
// "Loading Guest PDPTEs"). It fails, and the write that needed them must
// #GP, when a present entry has a reserved bit set, as the processor
// would, and when the memory cannot be read (no reader, or tamahv's own
// memory: the guest gets #GP where the processor would have read the
// sink).
func (v *VCPU) loadPDPTEs() bool {
	if v.Mem == nil {
		return false
	}
	b := &v.pdptes
	if err := v.Mem.ReadPhys(v.VMCS.Read(vmx.GuestCR3)&0xffffffe0, b[:]); err != nil {
		return false
	}
	rsvd := vmx.PDPTEReserved(v.maxPhys())
	var pdpte [4]uint64
	for i := range pdpte {
		for j := 7; j >= 0; j-- {
			pdpte[i] = pdpte[i]<<8 | uint64(b[8*i+j])
		}
		if pdpte[i]&1 != 0 && pdpte[i]&rsvd != 0 {
			return false
		}
	}
	for i, e := range pdpte {
		v.VMCS.Write(vmx.GuestPDPTE(i), e)
	}
	return true
}

// maxPhys is the processor's physical-address width, CPUID
// 0x80000008:EAX[7:0] (36 when unknown).
func (v *VCPU) maxPhys() uint {
	if v.CPUID != nil {
		if top, _, _, _ := v.CPUID(0x80000000, 0); top >= 0x80000008 {
			if a, _, _, _ := v.CPUID(0x80000008, 0); a&0xff != 0 {
				return uint(a & 0xff)
			}
		}
	}
	return 36
}

// OwnPorts makes the guest's accesses to ports [first, last] exit: reads
// see all ones, writes vanish. The I/O bitmaps must select them (IOBitmaps
// does).
func (v *VCPU) OwnPorts(first, last uint16) { v.ioPorts = append(v.ioPorts, [2]uint16{first, last}) }

// PortGuard checks the guest's writes to a range of I/O ports before they
// reach the device: Refuse reports whether a write (OUT) of size bytes of
// val at port, which reaches into [First, Last], is dropped, as if the
// device ignored it. Reads pass through. A string instruction (INS, OUTS)
// that reaches a guarded port transfers nothing (see stringIO). Refuse
// may be called from several vCPUs at once.
type PortGuard struct {
	First, Last uint16
	Refuse      func(port uint16, size int, val uint32) bool
}

// GuardPorts makes the guest's accesses to g's ports exit and checks its
// writes with g.Refuse. The I/O bitmaps must select them (IOBitmaps does).
func (v *VCPU) GuardPorts(g PortGuard) { v.portGuards = append(v.portGuards, g) }

// refused reports whether a guard drops a write of size bytes at port. A
// write that wraps from port 0xffff to 0 and reaches a guarded port is
// dropped without asking: it has no honest user.
func (v *VCPU) refused(port uint16, size int, val uint32) bool {
	end := uint32(port) + uint32(size) // exclusive; above 0x10000 where it wraps
	for _, g := range v.portGuards {
		if end > 0x10000 && uint32(g.First) < end-0x10000 {
			return true
		}
		if uint32(port) <= uint32(g.Last) && end > uint32(g.First) && g.Refuse(port, size, val) {
			return true
		}
	}
	return false
}

func (v *VCPU) ownsPort(p uint16) bool {
	for _, r := range v.ioPorts {
		if p >= r[0] && p <= r[1] {
			return true
		}
	}
	return false
}

// handleIO emulates an I/O instruction byte by byte of the port space: the
// bytes of owned ports read 0xff and drop writes; a write a PortGuard
// refuses is dropped whole; the other bytes are
// real port I/O through PortIO, one access per run of consecutive ports
// (see portIn). An access exits when any of its ports is owned (SDM Vol.
// 3C, "I/O-Bitmap Addresses"): one that starts below an owned range and
// reaches into it, or a multi-byte access that wraps from port 0xffff to
// 0, exits as a whole.
func handleIO(v *VCPU, e *vmx.Exit) (Action, error) {
	io := vmx.DecodeIO(e.Qualification)
	if io.Size != 1 && io.Size != 2 && io.Size != 4 {
		return Stop, fmt.Errorf("%w: I/O exit with size %d at port %#x", ErrFatalExit, io.Size, io.Port)
	}
	if io.String {
		return v.stringIO(io)
	}
	if io.In {
		val := uint64(v.portIn(io.Port, io.Size))
		if io.Size == 4 {
			// A 32-bit destination zero-extends into RAX (SDM Vol. 1,
			// "General-Purpose Registers in 64-Bit Mode"); 8 and 16-bit
			// ones leave the rest of RAX.
			v.Regs.RAX = val
		} else {
			mask := uint64(1)<<(8*io.Size) - 1
			v.Regs.RAX = v.Regs.RAX&^mask | val
		}
		return Next, nil
	}
	if !v.refused(io.Port, io.Size, uint32(v.Regs.RAX)) {
		v.portOut(io.Port, io.Size, uint32(v.Regs.RAX))
	}
	return Next, nil
}

// portIn reads size bytes starting at port: owned bytes read 0xff; each
// run of unowned ports is read with as few accesses as its length allows
// (2+1 for three bytes), never across an owned port or the wrap from
// 0xffff to 0. Splitting a guest's access this way is what a device sees
// on the bus from hardware that splits it too (a 32-bit access to an
// 8-bit device); an access that straddles tamahv's console has no honest
// user.
func (v *VCPU) portIn(port uint16, size int) uint32 {
	var val uint32
	for i := 0; i < size; {
		p := port + uint16(i)
		n := v.unownedRun(p, size-i)
		if n == 0 {
			val |= 0xff << (8 * i)
			i++
			continue
		}
		val |= v.rawIn(p, n) << (8 * i)
		i += n
	}
	return val
}

// portOut writes the size low bytes of val starting at port, as portIn
// reads them: writes to owned bytes vanish.
func (v *VCPU) portOut(port uint16, size int, val uint32) {
	for i := 0; i < size; {
		p := port + uint16(i)
		n := v.unownedRun(p, size-i)
		if n == 0 {
			i++
			continue
		}
		v.rawOut(p, n, val>>(8*i))
		i += n
	}
}

// unownedRun returns the length of the access to make at p: 0 when p is
// owned, else the largest of 4, 2 and 1 that fits in max bytes of
// consecutive unowned ports that do not wrap past 0xffff.
func (v *VCPU) unownedRun(p uint16, max int) int {
	n := 0
	for n < max && uint32(p)+uint32(n) <= 0xffff && !v.ownsPort(p+uint16(n)) {
		n++
	}
	switch {
	case n >= 4:
		return 4
	case n >= 2:
		return 2
	}
	return n
}

// rawIn does a real n-byte IN at p (all ones without PortIO: no device).
func (v *VCPU) rawIn(p uint16, n int) uint32 {
	mask := uint32(1)<<(8*n) - 1
	if n == 4 {
		mask = ^uint32(0)
	}
	if v.PortIO == nil {
		return mask
	}
	return v.PortIO(p, n, true, 0) & mask
}

// rawOut does a real n-byte OUT of val's low bytes at p.
func (v *VCPU) rawOut(p uint16, n int, val uint32) {
	if v.PortIO != nil {
		if n < 4 {
			val &= uint32(1)<<(8*n) - 1
		}
		v.PortIO(p, n, false, val)
	}
}

// stringIO completes INS and OUTS that touch an owned port without
// transferring anything: no port is accessed and guest memory is left
// as it is; RDI (INS) or RSI (OUTS) moves past every element, backwards
// with RFLAGS.DF, in the address size's register (SI, ESI or RSI), and a
// REP prefix ends with its count register at zero, as the instruction
// would leave them. Emulating the
// transfer needs guest-linear memory access with the guest's paging,
// segment and permission checks in every paging mode; a string access
// that reaches tamahv's console has no honest user, so it gets this
// simpler answer.
func (v *VCPU) stringIO(io vmx.IOAccess) (Action, error) {
	mask := v.addressMask()
	count := uint64(1)
	if io.Rep {
		count = v.Regs.RCX & mask
	}
	step := count * uint64(io.Size)
	if v.VMCS.Read(vmx.GuestRFLAGS)&vmx.RFLAGSDF != 0 {
		step = -step
	}
	reg := &v.Regs.RSI
	if io.In {
		reg = &v.Regs.RDI
	}
	*reg = merge(*reg, *reg+step, mask)
	if io.Rep {
		v.Regs.RCX = merge(v.Regs.RCX, 0, mask)
	}
	return Next, nil
}

// merge writes val into the part of reg that mask selects, as an
// instruction of that address size writes SI, ESI or RSI: a 16-bit write
// keeps the upper bits, a 32-bit write zero-extends.
func merge(reg, val, mask uint64) uint64 {
	if mask == 0xffff {
		return reg&^mask | val&mask
	}
	return val & mask
}

// addressMask is the mask of the exiting string instruction's address
// size, from the VM-exit instruction information (SDM Vol. 3C,
// "VM-Exit Instruction Information", INS and OUTS) where the processor
// reports it (IA32_VMX_BASIC[54]), else from the guest's mode: 64 bits in
// 64-bit mode, 32 with CS.D, else 16.
func (v *VCPU) addressMask() uint64 {
	size := 0
	switch {
	case v.Caps != nil && v.Caps.Basic&(1<<54) != 0:
		size = int(v.VMCS.Read(vmx.ExitInstructionInfo) >> 7 & 7)
	case v.mode64():
		size = 2
	case v.VMCS.Read(vmx.GuestCSAccess)&(1<<14) != 0:
		size = 1
	}
	switch size {
	case 0:
		return 0xffff
	case 1:
		return 0xffffffff
	}
	return ^uint64(0)
}

func handleEPTViolation(v *VCPU, e *vmx.Exit) (Action, error) {
	gpa := e.GuestPA
	q := ept.DecodeViolation(e.Qualification)
	gva := "n/a"
	if q.LinearValid {
		gva = fmt.Sprintf("%#x", v.VMCS.Read(vmx.GuestLinearAddr))
	}
	return Stop, fmt.Errorf("%w: EPT violation at GPA %#x (GVA %s, RIP %#x): %v", ErrFatalExit, gpa, gva, e.RIP, q)
}

func handleEPTMisconfig(_ *VCPU, e *vmx.Exit) (Action, error) {
	return Stop, fmt.Errorf("%w: EPT misconfiguration at GPA %#x", ErrFatalExit, e.GuestPA)
}

// handleException reflects an intercepted exception or NMI back to the
// guest.
func handleException(v *VCPU, x *vmx.Exit) (Action, error) {
	e, ok := vmx.DecodeEvent(x.Interruption, x.InterruptionError)
	if !ok {
		return Resume, nil
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
