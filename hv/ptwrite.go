package hv

import (
	"math/bits"

	"github.com/tamahv/tamahv/vmx"
)

// Page-table writes.
//
// A guest write to a watched paging-structure page exits (EPT violation).
// GuestMemory settles it within that exit: it reads the writing
// instruction at the guest's RIP through the guest's own page tables,
// decodes it, and, when it is one of the forms Linux writes its entries
// with, does what the processor would have done: the instruction's one
// access to the entry, the registers and flags it sets, RIP past it.
// The access is exact and atomic, as the guest's other processors and
// their page walkers, which read entries without locks, rely on: a store
// is one store of the instruction's width, a read-modify-write one locked
// instruction on guest memory (GuestPhys's AtomicMemory), never a copy
// and never a read, a computation and a write.
// The watches on the page are then walked at once, so a watch's function
// hears of the new translation in the exit the write caused, and no
// read's progress waits for the next exit (the VMX-preemption timer when
// the guest runs on).
//
// The forms (Intel SDM Vol. 2, each instruction's page), with a memory
// destination of 1, 2, 4 or 8 bytes:
//
//   - MOV and MOVNTI from a register or an immediate (set_pte,
//     native_set_pmd, pte_clear, ...);
//   - XCHG with a register, locked or not (ptep_get_and_clear);
//   - CMPXCHG, locked or not, CMPXCHG8B and CMPXCHG16B (try_cmpxchg on an
//     entry, pmdp_establish);
//   - OR, AND and XOR from a register or an immediate, locked or not
//     (set_bit and clear_bit with a constant bit: ptep_set_wrprotect is
//     LOCK ANDB);
//   - BTS and BTR from a register or an immediate, locked or not
//     (test_and_clear_bit: ptep_test_and_clear_young is LOCK BTR).
//
// The write must be exactly the access that exited: the instruction runs
// in 64-bit mode at CPL 0, with no event being delivered, no single-step
// and no enabled hardware breakpoint; its memory operand's linear address
// (base, index, displacement, RIP-relative, the FS or GS base) is the
// guest-linear address the processor reported, it does not cross a page,
// a read-modify-write's is naturally aligned (a locked access that splits
// a cache line may fault in tamahv where split-lock detection is on),
// and the guest's tables translate it, writable from CPL 0 (CR0.WP,
// SMAP, no protection keys in force), accessed and dirty, to the
// guest-physical address that exited.
// Anything else (another instruction, a prefix the forms do not take,
// bytes that do not decode, an instruction that cannot be read) is left
// to the processor: the page is opened and settled at the next exit, as
// for writes the processor's page walks make. Each such fallback is
// counted by its reason.
//
// The instructions are decoded by decodeWrite (ptdecode.go), which knows
// these forms only and allocates nothing: the exit path allocates nothing.

// PTFallback is why a guest instruction's write to a watched page table
// was not emulated, and the page was opened instead.
type PTFallback uint8

// Fallback reasons.
const (
	// FallbackEvent: the write was part of an event's delivery (the
	// IDT-vectoring information is valid), not of the instruction at RIP.
	FallbackEvent PTFallback = iota
	// FallbackMode: the guest is not in 64-bit mode at CPL 0 with paging,
	// or its paging mode is not the walker's.
	FallbackMode
	// FallbackDebug: RFLAGS.TF or a DR7 breakpoint would need a #DB.
	FallbackDebug
	// FallbackFetch: the instruction's bytes could not be read through
	// the guest's tables (RIP unmapped, not guest RAM, not executable).
	FallbackFetch
	// FallbackDecode: the bytes are not one of the forms emulated here.
	FallbackDecode
	// FallbackOperand: the instruction's memory operand is not the access
	// that exited (another address, a page crossed), or it is a
	// read-modify-write's and not naturally aligned.
	FallbackOperand
	// FallbackAccess: the guest's tables do not translate the operand to
	// the exiting guest-physical address with the write allowed, accessed
	// and dirty.
	FallbackAccess
	// FallbackMemory: guest RAM refused the access, or the memory cannot
	// make it with one instruction.
	FallbackMemory
	// NumPTFallbacks is the number of reasons.
	NumPTFallbacks
)

var fallbackNames = [NumPTFallbacks]string{"event", "mode", "debug", "fetch", "decode", "operand", "access", "memory"}

func (f PTFallback) String() string {
	if f < NumPTFallbacks {
		return fallbackNames[f]
	}
	return "unknown"
}

// ptEmulator is the emulator's scratch space, kept with the GuestMemory so
// that an emulation allocates nothing of its own.
type ptEmulator struct {
	insn  [vmx.MaxInstructionLen]byte
	steps [5]Step
}

// ptInsn is a decoded write to emulate.
type ptInsn struct {
	op     ptOp
	size   int    // bytes written
	mem    ptMem  // the memory operand
	la     uint64 // its linear address
	reg    ptReg  // the register operand (size 0: none)
	imm    uint64 // the immediate, zero-extended from size (BTS, BTR: from 8 bits)
	hasImm bool
	bit    uint // BTS, BTR: the bit in the operand
	len    int  // instruction length
}

// emulateWrite settles the write of the instruction at e.RIP to the
// watched page hp within this exit. It returns false, and why, when it
// left the instruction alone.
func (g *GuestMemory) emulateWrite(v *VCPU, e *vmx.Exit, hp *hookedPage) (PTFallback, bool) {
	if _, ok := vmx.DecodeEvent(e.IDTVectoring, 0); ok {
		return FallbackEvent, false
	}
	m := v.VMCS
	if m.Read(vmx.EntryControls)&vmx.EntryIA32eMode == 0 || m.Read(vmx.GuestCSAccess)&vmx.SegmentL == 0 || v.CPL() != 0 {
		return FallbackMode, false
	}
	cr0, cr4 := m.Read(vmx.GuestCR0), m.Read(vmx.GuestCR4)
	if cr0&vmx.CR0PG == 0 || (cr4&vmx.CR4LA57 != 0) != g.Walker.LA57 {
		return FallbackMode, false
	}
	rflags := m.Read(vmx.GuestRFLAGS)
	if rflags&vmx.RFLAGSTF != 0 || m.Read(vmx.GuestDR7)&vmx.DR7Enable != 0 {
		return FallbackDebug, false
	}
	cr3 := m.Read(vmx.GuestCR3) & CR3Mask
	n, ok := g.fetch(cr3, e.RIP, cr4)
	if !ok {
		return FallbackFetch, false
	}
	var in ptInsn
	if !decodeWrite(g.emu.insn[:n], &in) {
		return FallbackDecode, false
	}
	if !g.operand(v, e.RIP, &in) {
		return FallbackOperand, false
	}
	if in.la&0xfff+uint64(in.size) > 0x1000 || in.locked() && in.la%uint64(in.size) != 0 ||
		m.Read(vmx.GuestLinearAddr) != in.la {
		return FallbackOperand, false
	}
	if !g.writable(cr3, in.la, e.GuestPA, cr0, cr4, rflags) {
		return FallbackAccess, false
	}
	// The one access to guest memory: the instruction's own store or
	// locked read-modify-write, through GuestPhys. Registers change only
	// once it is done; should guest RAM refuse it, nothing changed and
	// the processor runs the instruction itself.
	flags, write, err := execute(g.Phys, e.GuestPA, v, &in, rflags)
	if err != nil {
		return FallbackMemory, false
	}
	if flags != rflags {
		m.Write(vmx.GuestRFLAGS, flags)
	}
	// The instruction completed: RIP moves past it and blocking by STI
	// or MOV SS ends. The VM-exit instruction length is undefined for EPT
	// violations (SDM Vol. 3C, 28.2.5); the decoded length is exact.
	m.Write(vmx.GuestRIP, e.RIP+uint64(in.len))
	if s := m.Read(vmx.GuestInterruptibility); s&(blockingSTI|blockingMovSS) != 0 {
		m.Write(vmx.GuestInterruptibility, s&^(blockingSTI|blockingMovSS))
	}
	if write {
		g.Writes++
		g.scratch = g.scratch[:0]
		for l := hp.head; l != nil; l = l.next {
			g.scratch = append(g.scratch, l.w)
		}
		g.rewalk()
	}
	return 0, true
}

// fetch reads up to 15 bytes of the instruction at rip, executed at CPL 0,
// into g.emu.insn: through the guest's tables and GuestPhys, across a page
// where the next one is there. It returns how many it read.
func (g *GuestMemory) fetch(cr3, rip, cr4 uint64) (int, bool) {
	b := &g.emu.insn
	n := min(len(b), 0x1000-int(rip&0xfff))
	if !g.fetchable(cr3, rip, cr4, b[:n]) {
		return 0, false
	}
	if n < len(b) && g.fetchable(cr3, rip+uint64(n), cr4, b[n:]) {
		n = len(b)
	}
	return n, true
}

// fetchable reads p from the code at va, which CPL 0 may execute.
func (g *GuestMemory) fetchable(cr3, va, cr4 uint64, p []byte) bool {
	tr, _, err := g.Walker.Walk(cr3, va, &g.emu.steps)
	if err != nil || !tr.Present || tr.NX || tr.User && cr4&vmx.CR4SMEP != 0 {
		return false
	}
	return g.Phys.ReadPhys(tr.PA, p) == nil
}

// writable reports whether the guest's tables translate la to gpa, with a
// write from CPL 0 allowed and nothing left for the processor to set: the
// walk the processor did before the access exited.
func (g *GuestMemory) writable(cr3, la, gpa, cr0, cr4, rflags uint64) bool {
	tr, n, err := g.Walker.Walk(cr3, la, &g.emu.steps)
	if err != nil || !tr.Present || tr.PA != gpa {
		return false
	}
	if !tr.Writable && cr0&vmx.CR0WP != 0 {
		return false
	}
	if tr.User && cr4&vmx.CR4SMAP != 0 && rflags&vmx.RFLAGSAC == 0 {
		return false
	}
	// A protection key may forbid the write: PKRU for user pages, the
	// PKRS MSR for supervisor pages. Neither is read here.
	if tr.User && cr4&vmx.CR4PKE != 0 || !tr.User && cr4&vmx.CR4PKS != 0 {
		return false
	}
	for _, s := range g.emu.steps[:n] {
		if s.Entry&vmx.PTEAccessed == 0 {
			return false
		}
	}
	return g.emu.steps[n-1].Entry&vmx.PTEDirty != 0
}

// operand computes the linear address the instruction writes (and, for
// BTS and BTR, the bit): base + index×scale + displacement, RIP-relative
// from the next instruction, plus the FS or GS base; ES, CS, SS and DS
// have base 0 in 64-bit mode (SDM Vol. 3A, 3.4.4, "Segment Loading
// Instructions in IA-32e Mode").
func (g *GuestMemory) operand(v *VCPU, rip uint64, in *ptInsn) bool {
	mem := &in.mem
	var la uint64
	switch mem.base {
	case memNone:
	case memRIP:
		la = rip + uint64(in.len)
	default:
		la = readGPR(v, int(mem.base))
	}
	if mem.index != memNone {
		la += readGPR(v, int(mem.index)) * uint64(mem.scale)
	}
	la += uint64(mem.disp)
	switch mem.seg {
	case segFS:
		la += v.VMCS.Read(vmx.GuestFSBase)
	case segGS:
		la += v.VMCS.Read(vmx.GuestGSBase)
	}
	if in.op == opBTS || in.op == opBTR {
		width := uint(in.size * 8)
		if in.hasImm {
			in.bit = uint(in.imm) & (width - 1)
		} else {
			// A register bit offset is signed and may leave the
			// operand: the access is the operand-sized word that holds
			// the bit (SDM Vol. 2A, "BT—Bit Test", Bit(BitBase,
			// BitOffset)).
			off := signExtend(regValue(v, in.reg), in.size)
			in.bit = uint(off) & (width - 1)
			la += uint64(off>>bits.TrailingZeros(width)) * uint64(in.size)
		}
	}
	in.la = la
	return true
}

// locked reports whether the instruction reads and writes its memory
// operand: it is emulated with one locked instruction, which must be
// naturally aligned (AtomicMemory). A form the guest did not lock is
// locked too: every outcome of the locked instruction is one the
// unlocked instruction allows.
func (in *ptInsn) locked() bool { return in.op != opMOV && in.op != opMOVNTI }

// execute does the instruction's work: its one access to the memory
// operand at pa, through m, and the registers it sets. It returns the new
// RFLAGS and whether the operand was written; on an error nothing
// changed.
func execute(m AtomicMemory, pa uint64, v *VCPU, in *ptInsn, rflags uint64) (uint64, bool, error) {
	src := in.imm
	if !in.hasImm && in.reg.size != 0 {
		src = regValue(v, in.reg)
	}
	switch in.op {
	case opMOV, opMOVNTI:
		return rflags, true, m.Store(pa, in.size, src)
	case opXCHG:
		old, err := m.Exchange(pa, in.size, src)
		if err != nil {
			return rflags, false, err
		}
		setReg(v, in.reg, old)
		return rflags, true, nil
	case opCMPXCHG:
		acc := v.Regs.RAX & sizeMask(in.size)
		old, swapped, err := m.CompareExchange(pa, in.size, acc, src)
		if err != nil {
			return rflags, false, err
		}
		rflags = subFlags(rflags, acc, old, in.size)
		if !swapped {
			// The accumulator is loaded with the operand (the processor
			// writes the operand back unchanged).
			setGPR(v, 0, in.size, old)
		}
		return rflags, swapped, nil
	case opCMPXCHG8B:
		cmp := v.Regs.RDX<<32 | v.Regs.RAX&0xffffffff
		val := v.Regs.RCX<<32 | v.Regs.RBX&0xffffffff
		old, swapped, err := m.CompareExchange(pa, 8, cmp, val)
		if err != nil {
			return rflags, false, err
		}
		if !swapped {
			v.Regs.RAX, v.Regs.RDX = old&0xffffffff, old>>32
			return rflags &^ vmx.RFLAGSZF, false, nil
		}
		return rflags | vmx.RFLAGSZF, true, nil
	case opCMPXCHG16B:
		old, swapped, err := m.CompareExchange16(pa, [2]uint64{v.Regs.RAX, v.Regs.RDX}, [2]uint64{v.Regs.RBX, v.Regs.RCX})
		if err != nil {
			return rflags, false, err
		}
		if !swapped {
			v.Regs.RAX, v.Regs.RDX = old[0], old[1]
			return rflags &^ vmx.RFLAGSZF, false, nil
		}
		return rflags | vmx.RFLAGSZF, true, nil
	case opOR, opAND, opXOR:
		var f uint64
		var err error
		switch in.op {
		case opOR:
			f, err = m.Or(pa, in.size, src)
		case opAND:
			f, err = m.And(pa, in.size, src)
		default:
			f, err = m.Xor(pa, in.size, src)
		}
		if err != nil {
			return rflags, false, err
		}
		// CF and OF clear, SF, ZF and PF from the result, AF
		// (undefined) clear.
		return rflags&^vmx.RFLAGSArith | f&(vmx.RFLAGSSF|vmx.RFLAGSZF|vmx.RFLAGSPF), true, nil
	case opBTS, opBTR:
		var was bool
		var err error
		if in.op == opBTS {
			was, err = m.BitTestAndSet(pa, in.size, in.bit)
		} else {
			was, err = m.BitTestAndReset(pa, in.size, in.bit)
		}
		if err != nil {
			return rflags, false, err
		}
		// CF is the bit; OF, SF, AF and PF are undefined and left alone;
		// ZF is unaffected.
		rflags &^= vmx.RFLAGSCF
		if was {
			rflags |= vmx.RFLAGSCF
		}
		return rflags, true, nil
	}
	return rflags, false, ErrOperand
}

// subFlags are the flags of CMP a, b (a - b), as CMPXCHG sets them.
func subFlags(rflags, a, b uint64, size int) uint64 {
	mask := sizeMask(size)
	res := (a - b) & mask
	sign := uint64(1) << (8*size - 1)
	rflags &^= vmx.RFLAGSArith
	rflags |= resultFlags(res, size)
	if a < b {
		rflags |= vmx.RFLAGSCF
	}
	if (a^b)&(a^res)&sign != 0 {
		rflags |= vmx.RFLAGSOF
	}
	if (a^b^res)&0x10 != 0 {
		rflags |= vmx.RFLAGSAF
	}
	return rflags
}

// resultFlags are SF, ZF and PF of a result of size bytes.
func resultFlags(res uint64, size int) uint64 {
	var f uint64
	if res&sizeMask(size) == 0 {
		f |= vmx.RFLAGSZF
	}
	if res>>(8*size-1)&1 != 0 {
		f |= vmx.RFLAGSSF
	}
	if bits.OnesCount8(uint8(res))%2 == 0 {
		f |= vmx.RFLAGSPF
	}
	return f
}

func sizeMask(size int) uint64 {
	if size >= 8 {
		return ^uint64(0)
	}
	return 1<<(8*size) - 1
}

func signExtend(v uint64, size int) int64 {
	s := 64 - 8*uint(size)
	return int64(v<<s) >> s
}

// readGPR reads register n; RSP lives in the VMCS.
func readGPR(v *VCPU, n int) uint64 {
	if n == 4 {
		return v.VMCS.Read(vmx.GuestRSP)
	}
	return v.Regs.GPR(n)
}

func writeGPR(v *VCPU, n int, val uint64) {
	if n == 4 {
		v.VMCS.Write(vmx.GuestRSP, val)
		return
	}
	v.Regs.SetGPR(n, val)
}

// regValue reads a register operand, zero-extended.
func regValue(v *VCPU, r ptReg) uint64 {
	full := readGPR(v, int(r.num))
	if r.high {
		return full >> 8 & 0xff
	}
	return full & sizeMask(int(r.size))
}

// setReg writes a register operand as the processor does: 8 and 16 bits
// merge into the register, 32 bits zero the upper half.
func setReg(v *VCPU, r ptReg, val uint64) {
	n := int(r.num)
	if r.high {
		full := readGPR(v, n)
		writeGPR(v, n, full&^0xff00|(val&0xff)<<8)
		return
	}
	setGPR(v, n, int(r.size), val)
}

func setGPR(v *VCPU, n, size int, val uint64) {
	switch size {
	case 1, 2:
		m := sizeMask(size)
		writeGPR(v, n, readGPR(v, n)&^m|val&m)
	case 4:
		writeGPR(v, n, val&0xffffffff)
	default:
		writeGPR(v, n, val)
	}
}
