package guestmem

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/x86emu"
	"github.com/tamahv/tamahv/vmx"
)

// icrIdlePolls bounds the wait for the delivery status to go idle between
// the IPIs a broadcast is split into (each poll reads the ICR).
const icrIdlePolls = 100

// APICWrites emulates the guest's writes to its local APIC's registers
// (xAPIC, memory-mapped at Base, which the EPT maps read-only where this
// is installed) and its writes to the x2APIC's interrupt command register
// (WRMSR to IA32_X2APIC_ICR), so that every INIT and start-up IPI the
// guest sends is seen and reaches vCPUs only. Its rules:
//
//   - An INIT or a start-up IPI goes to the vCPUs among its destinations
//     and to no other processor: one that reaches only vCPUs as written
//     (a physical destination that is a vCPU's APIC ID) is sent as
//     written; a broadcast, a shorthand other than self or a logical
//     destination is sent to each vCPU it reaches with the vCPU's APIC ID
//     as physical destination; one that reaches no vCPU, and an INIT
//     level de-assert, is dropped. IPITargets says which vCPUs are
//     reached. An INIT to application processors' vCPUs is applied by
//     INIT instead of sent. Other IPIs (fixed, NMI, SMI) go out as
//     written.
//   - A write to the local APIC's page is emulated when it is an
//     instruction x86emu.Decode knows (MOV, MOVNTI, XCHG, CMPXCHG,
//     CMPXCHG8B, OR, AND, XOR, BTS, BTR; 1 to 8 bytes) in 64-bit mode, at any privilege level (the guest's
//     paging allowed it before the EPT violation), whose memory operand
//     is the access that exited. Its bytes that fall in a register (the
//     first 32 bits of each 16-byte slot) are merged into that register,
//     which is then written on the writer's own local APIC; bytes in the
//     reserved rest of a slot are dropped and read as zeros.
//   - The interrupt command register's low half (the slot at 0x300, whose
//     write sends the IPI) takes only a 32-bit store at its offset: any
//     other form raises #GP(0), as does every write that is not emulated
//     (another instruction, outside 64-bit mode, a write made by a page
//     walk, an operand that is not the access that exited). An IPI is
//     never sent unchecked.
//   - A fetch from the page raises #UD.
//
// The SDM leaves accesses to the local APIC other than aligned 32-bit
// loads and stores undefined ("Local APIC Register Address Map"); these
// are tamahv's answers. An exception raised for an access made while an
// event was being delivered (its stack in the page) combines with that
// event as the processor combines them: #DF after a contributory
// exception or a page fault, a triple fault (the guest stops) after #DF.
type APICWrites struct {
	// Mem reads the writing instruction through the guest's tables.
	Mem *Watcher
	// Base is the local APIC's physical address (4 KiB aligned).
	Base uint64
	// IDs are the vCPUs' local APIC IDs (vCPU i's is IDs[i]; 1 to 64 of
	// them), Index a vCPU's number.
	IDs   []uint32
	Index func(v *hv.VCPU) int
	// Write writes register off of the local APIC of the processor that
	// runs v; Read reads one.
	Write func(v *hv.VCPU, off, val uint32)
	Read  func(v *hv.VCPU, off uint32) uint32
	// INIT applies an INIT IPI v sends to the vCPUs in targets (a mask
	// over IDs): it returns false where the IPI is to be sent to them
	// instead.
	INIT func(v *hv.VCPU, targets uint64) bool
	// Emulated counts the writes emulated; INITs the INIT IPIs INIT took;
	// Dropped the INIT and start-up IPIs that reached no vCPU; Refused the
	// accesses answered with an exception.
	Emulated, INITs, Dropped, Refused uint64
}

// Install puts the emulator in front of v's EPT violations and WRMSRs.
func (a *APICWrites) Install(v *hv.VCPU) error {
	if a.Base&0xfff != 0 || a.Write == nil || a.Read == nil || a.Mem == nil || a.Index == nil {
		return errors.New("hv: APICWrites needs a page-aligned Base, Mem, Read, Write and Index")
	}
	if len(a.IDs) == 0 || len(a.IDs) > 64 {
		return fmt.Errorf("hv: APICWrites for %d vCPUs (1 to 64)", len(a.IDs))
	}
	if err := v.Intercept(vmx.ExitWRMSR, a.onWRMSR); err != nil {
		return err
	}
	return v.Intercept(vmx.ExitEPTViolation, a.onViolation)
}

func (a *APICWrites) onViolation(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
	if e.GuestPA&^0xfff != a.Base {
		return next(v, e)
	}
	q := ept.DecodeViolation(e.Qualification)
	switch {
	case q.Fetch:
		// The page holds registers, not instructions.
		a.Refused++
		return v.Raise(e, vmx.VectorUD)
	case !q.Write:
		return next(v, e)
	}
	if !a.emulate(v, e) {
		a.Refused++
		return v.Raise(e, vmx.VectorGP)
	}
	a.Emulated++
	return hv.Resume, nil
}

// onWRMSR sends the x2APIC interrupt commands through the same checks.
func (a *APICWrites) onWRMSR(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
	if uint32(v.Regs.RCX) != vmx.MSRX2APICICR {
		return next(v, e)
	}
	val := v.Regs.RDX<<32 | v.Regs.RAX&0xffffffff
	if !v.X2APICICRWritable(val) {
		return hv.Resume, v.InjectException(vmx.VectorGP, 0)
	}
	a.send(v, uint32(val)&^vmx.ICRPending, uint32(val>>32), true)
	return hv.Next, nil
}

// emulate carries out the write of the instruction at e.RIP to the local
// APIC's page, or returns false where it is not one emulate takes.
func (a *APICWrites) emulate(v *hv.VCPU, e *vmx.Exit) bool {
	q := ept.DecodeViolation(e.Qualification)
	if !q.Translation {
		return false // a page walk's write, or no linear address
	}
	if _, ok := vmx.DecodeEvent(e.IDTVectoring, 0); ok {
		return false
	}
	m := v.VMCS
	if m.Read(vmx.EntryControls)&vmx.EntryIA32eMode == 0 || m.Read(vmx.GuestCSAccess)&vmx.SegmentL == 0 {
		return false
	}
	g := a.Mem
	cr3, cr4 := m.Read(vmx.GuestCR3)&CR3Mask, m.Read(vmx.GuestCR4)
	if (cr4&vmx.CR4LA57 != 0) != g.Walker.LA57 {
		return false
	}
	n, ok := a.fetch(cr3, e.RIP, cr4, v.CPL() == 3)
	if !ok {
		return false
	}
	var in x86emu.Insn
	if !x86emu.Decode(g.emu.insn[:n], &in) || in.Size > 8 || !g.operand(v, e.RIP, &in) {
		return false
	}
	off := uint32(e.GuestPA & 0xfff)
	if in.LA != m.Read(vmx.GuestLinearAddr) || in.LA&0xfff != uint64(off) || uint64(off)+uint64(in.Size) > 0x1000 {
		return false
	}
	end := off + uint32(in.Size)
	icr := off < vmx.APICICRLow+vmx.APICRegisterAlign && end > vmx.APICICRLow
	if icr && (off != vmx.APICICRLow || in.Size != 4) {
		return false // the command register: whole, or not at all
	}
	rflags := m.Read(vmx.GuestRFLAGS)
	flags, _, err := x86emu.Execute(apicOperand{a, v}, uint64(off), vcpuRegs{v}, &in, rflags)
	if err != nil {
		return false
	}
	if flags != rflags {
		m.Write(vmx.GuestRFLAGS, flags)
	}
	// The VM-exit instruction length is undefined for EPT violations;
	// the decoded length is exact.
	v.Complete(e.RIP, in.Len)
	return true
}

// apicOperand is the local APIC's page as the memory operand of the
// instruction v runs (x86emu.AtomicMemory, at offsets into the page): the bytes
// of its registers are the registers' (read and written on v's processor
// through a.Read and a.Write, a write to the ICR's low half sent through
// a.sendXAPIC), the reserved bytes after each register read as zeros and
// drop writes. A register the operand covers in part is merged. The
// operand lies within the page, 1 to 8 bytes; the local APIC's registers
// belong to v's processor alone, so reading, computing and writing them
// is the one access.
type apicOperand struct {
	a *APICWrites
	v *hv.VCPU
}

// load reads the operand's bytes.
func (o apicOperand) load(off uint64, size int) (uint64, error) {
	if size < 1 || size > 8 || off+uint64(size) > 0x1000 {
		return 0, x86emu.ErrOperand
	}
	var val uint64
	for d := off &^ 3; d < off+uint64(size); d += 4 {
		if d%vmx.APICRegisterAlign != 0 {
			continue
		}
		reg := uint64(o.a.Read(o.v, uint32(d)))
		if d >= off {
			val |= reg << (8 * (d - off))
		} else {
			val |= reg >> (8 * (off - d))
		}
	}
	return val & x86emu.SizeMask(size), nil
}

// put writes the operand's bytes: each register it covers, whole or
// merged with what the register holds.
func (o apicOperand) put(off uint64, size int, val uint64) error {
	if size < 1 || size > 8 || off+uint64(size) > 0x1000 {
		return x86emu.ErrOperand
	}
	end := off + uint64(size)
	for d := off &^ 3; d < end; d += 4 {
		if d%vmx.APICRegisterAlign != 0 {
			continue // reserved: dropped
		}
		var reg uint32
		if d < off || d+4 > end {
			reg = o.a.Read(o.v, uint32(d))
		}
		for i := range uint64(4) {
			if p := d + i; p >= off && p < end {
				reg = reg&^(0xff<<(8*i)) | uint32(byte(val>>(8*(p-off))))<<(8*i)
			}
		}
		if d == vmx.APICICRLow {
			o.a.sendXAPIC(o.v, reg)
		} else {
			o.a.Write(o.v, uint32(d), reg)
		}
	}
	return nil
}

// Store implements x86emu.AtomicMemory.
func (o apicOperand) Store(off uint64, size int, val uint64) error { return o.put(off, size, val) }

// Exchange implements x86emu.AtomicMemory.
func (o apicOperand) Exchange(off uint64, size int, val uint64) (uint64, error) {
	old, err := o.load(off, size)
	if err != nil {
		return 0, err
	}
	return old, o.put(off, size, val)
}

// CompareExchange implements x86emu.AtomicMemory.
func (o apicOperand) CompareExchange(off uint64, size int, old, val uint64) (uint64, bool, error) {
	prev, err := o.load(off, size)
	if err != nil || prev != old&x86emu.SizeMask(size) {
		return prev, false, err
	}
	return prev, true, o.put(off, size, val)
}

// CompareExchange16 implements AtomicMemory: no 16-byte operand is
// emulated on the local APIC's page.
func (o apicOperand) CompareExchange16(uint64, [2]uint64, [2]uint64) ([2]uint64, bool, error) {
	return [2]uint64{}, false, x86emu.ErrOperand
}

// Or implements x86emu.AtomicMemory.
func (o apicOperand) Or(off uint64, size int, val uint64) (uint64, error) {
	return o.logic(off, size, func(x uint64) uint64 { return x | val })
}

// And implements x86emu.AtomicMemory.
func (o apicOperand) And(off uint64, size int, val uint64) (uint64, error) {
	return o.logic(off, size, func(x uint64) uint64 { return x & val })
}

// Xor implements x86emu.AtomicMemory.
func (o apicOperand) Xor(off uint64, size int, val uint64) (uint64, error) {
	return o.logic(off, size, func(x uint64) uint64 { return x ^ val })
}

// logic writes op of the operand and returns the flags its result sets.
func (o apicOperand) logic(off uint64, size int, op func(uint64) uint64) (uint64, error) {
	old, err := o.load(off, size)
	if err != nil {
		return 0, err
	}
	res := op(old) & x86emu.SizeMask(size)
	return x86emu.ResultFlags(res, size), o.put(off, size, res)
}

// BitTestAndSet implements x86emu.AtomicMemory.
func (o apicOperand) BitTestAndSet(off uint64, size int, bit uint) (bool, error) {
	return o.bit(off, size, bit, true)
}

// BitTestAndReset implements x86emu.AtomicMemory.
func (o apicOperand) BitTestAndReset(off uint64, size int, bit uint) (bool, error) {
	return o.bit(off, size, bit, false)
}

// bit sets or clears one bit of the operand and returns its old value.
func (o apicOperand) bit(off uint64, size int, bit uint, set bool) (bool, error) {
	if bit >= uint(8*size) {
		return false, x86emu.ErrOperand
	}
	old, err := o.load(off, size)
	if err != nil {
		return false, err
	}
	res := old &^ (1 << bit)
	if set {
		res |= 1 << bit
	}
	return old>>bit&1 != 0, o.put(off, size, res)
}

// fetch reads up to 15 bytes of the instruction at rip into the
// emulator's buffer, through the guest's tables: code the processor could
// have executed at the exiting privilege level (user pages from CPL 3,
// supervisor pages or, without SMEP, user pages from CPL 0-2). It returns
// how many it read.
func (a *APICWrites) fetch(cr3, rip, cr4 uint64, user bool) (int, bool) {
	b := &a.Mem.emu.insn
	n := min(len(b), 0x1000-int(rip&0xfff))
	if !a.code(cr3, rip, cr4, user, b[:n]) {
		return 0, false
	}
	if n < len(b) && a.code(cr3, rip+uint64(n), cr4, user, b[n:]) {
		n = len(b)
	}
	return n, true
}

// code reads p from executable code at va.
func (a *APICWrites) code(cr3, va, cr4 uint64, user bool, p []byte) bool {
	g := a.Mem
	tr, _, err := g.Walker.Walk(cr3, va, &g.emu.steps)
	if err != nil || !tr.Present || tr.NX {
		return false
	}
	if user && !tr.User || !user && tr.User && cr4&vmx.CR4SMEP != 0 {
		return false
	}
	return g.Phys.ReadPhys(tr.PA, p) == nil
}

// sendXAPIC sends the interrupt command v wrote to the xAPIC's ICR low
// half; its destination is in the ICR's high half, read only for INIT and
// start-up IPIs.
func (a *APICWrites) sendXAPIC(v *hv.VCPU, low uint32) {
	if m := low & vmx.ICRDeliveryMode; m != vmx.ICRDeliveryINIT && m != vmx.ICRDeliveryStart {
		a.Write(v, vmx.APICICRLow, low)
		return
	}
	a.send(v, low, a.Read(v, vmx.APICICRHigh)>>vmx.ICRDestShift, false)
}

// send sends the interrupt command low (the ICR's low half) with
// destination dest from v's local APIC, xAPIC or x2APIC: INIT and
// start-up IPIs to vCPUs only (see APICWrites).
func (a *APICWrites) send(v *hv.VCPU, low, dest uint32, x2APIC bool) {
	mode := low & vmx.ICRDeliveryMode
	if mode != vmx.ICRDeliveryINIT && mode != vmx.ICRDeliveryStart {
		a.raw(v, low, dest, x2APIC)
		return
	}
	if mode == vmx.ICRDeliveryINIT && low&vmx.ICRLevelTriggered != 0 && low&vmx.ICRLevelAssert == 0 {
		// INIT level de-assert: it only synchronizes arbitration IDs
		// (none on processors since the Pentium 4).
		a.Dropped++
		return
	}
	targets, exact := hv.IPITargets(low, dest, x2APIC, a.Index(v), a.IDs)
	if mode == vmx.ICRDeliveryINIT && targets != 0 && a.INIT != nil && a.INIT(v, targets) {
		a.INITs++
		return
	}
	if targets == 0 {
		a.Dropped++
		return
	}
	if exact {
		a.raw(v, low, dest, x2APIC)
		return
	}
	a.each(v, low, targets, x2APIC)
}

// raw sends the command as written.
func (a *APICWrites) raw(v *hv.VCPU, low, dest uint32, x2APIC bool) {
	if x2APIC {
		v.WriteMSR(vmx.MSRX2APICICR, uint64(dest)<<32|uint64(low))
		return
	}
	a.Write(v, vmx.APICICRLow, low)
}

// each sends the command once to each vCPU in targets, with its APIC ID
// as physical destination; in xAPIC mode the ICR's high half is put back
// afterwards.
func (a *APICWrites) each(v *hv.VCPU, low uint32, targets uint64, x2APIC bool) {
	low &^= vmx.ICRShorthand | vmx.ICRLogical
	var high uint32
	if !x2APIC {
		high = a.Read(v, vmx.APICICRHigh)
	}
	for i, id := range a.IDs {
		if targets&(1<<i) == 0 {
			continue
		}
		if x2APIC {
			v.WriteMSR(vmx.MSRX2APICICR, uint64(id)<<32|uint64(low))
			continue
		}
		if id >= vmx.APICBroadcast {
			continue // only the x2APIC reaches it
		}
		a.Write(v, vmx.APICICRHigh, id<<vmx.ICRDestShift)
		a.Write(v, vmx.APICICRLow, low)
		for range icrIdlePolls {
			if a.Read(v, vmx.APICICRLow)&vmx.ICRPending == 0 {
				break
			}
		}
	}
	if !x2APIC {
		a.Write(v, vmx.APICICRHigh, high)
	}
}
