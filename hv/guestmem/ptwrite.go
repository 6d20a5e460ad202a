package guestmem

import (
	"math/bits"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/x86emu"
	"github.com/tamahv/tamahv/vmx"
)

// Page-table writes.
//
// A guest write to a watched paging-structure page exits (EPT violation).
// Watcher settles it within that exit: it reads the writing
// instruction at the guest's RIP through the guest's own page tables,
// decodes it, and, when it is one of the forms Linux writes its entries
// with, does what the processor would have done: the instruction's one
// access to the entry, the registers and flags it sets, RIP past it.
// The access is exact and atomic, as the guest's other processors and
// their page walkers, which read entries without locks, rely on: a store
// is one store of the instruction's width, a read-modify-write one locked
// instruction on guest memory (GuestPhys's x86emu.AtomicMemory), never a copy
// and never a read, a computation and a write.
// The watches that read the entries it wrote are then walked at once (the
// other watches on the page are not: their entries did not change), so a
// watch's function hears of the new translation in the exit the write
// caused, and no read's progress waits for the next exit (the
// VMX-preemption timer when the guest runs on).
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
// The instructions are decoded by x86emu.Decode, which knows
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

// ptEmulator is the emulator's scratch space, kept with the Watcher so
// that an emulation allocates nothing of its own.
type ptEmulator struct {
	insn  [vmx.MaxInstructionLen]byte
	steps [5]Step
}

// emulateWrite settles the write of the instruction at e.RIP to a
// watched page within this exit. It returns false, and why, when it
// left the instruction alone.
func (g *Watcher) emulateWrite(v *hv.VCPU, e *vmx.Exit) (PTFallback, bool) {
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
	var in x86emu.Insn
	if !x86emu.Decode(g.emu.insn[:n], &in) {
		return FallbackDecode, false
	}
	if !g.operand(v, e.RIP, &in) {
		return FallbackOperand, false
	}
	if in.LA&0xfff+uint64(in.Size) > 0x1000 || in.Locked() && in.LA%uint64(in.Size) != 0 ||
		m.Read(vmx.GuestLinearAddr) != in.LA {
		return FallbackOperand, false
	}
	if !g.writable(cr3, in.LA, e.GuestPA, cr0, cr4, rflags) {
		return FallbackAccess, false
	}
	// The one access to guest memory: the instruction's own store or
	// locked read-modify-write, through GuestPhys. x86emu.Registers change only
	// once it is done; should guest RAM refuse it, nothing changed and
	// the processor runs the instruction itself.
	flags, write, err := x86emu.Execute(g.Phys, e.GuestPA, vcpuRegs{v}, &in, rflags)
	if err != nil {
		return FallbackMemory, false
	}
	if flags != rflags {
		m.Write(vmx.GuestRFLAGS, flags)
	}
	// The instruction completed: RIP moves past it and blocking by STI
	// or MOV SS ends. The VM-exit instruction length is undefined for EPT
	// violations (SDM Vol. 3C, 28.2.5); the decoded length is exact.
	v.Complete(e.RIP, in.Len)
	if write {
		// The watches that read the entries written are walked again;
		// the others on the page read entries the write left alone.
		g.Writes++
		g.scratch = g.scratch[:0]
		g.readers(e.GuestPA, int(in.Size))
		g.rewalk()
	}
	return 0, true
}

// fetch reads up to 15 bytes of the instruction at rip, executed at CPL 0,
// into g.emu.insn: through the guest's tables and GuestPhys, across a page
// where the next one is there. It returns how many it read.
func (g *Watcher) fetch(cr3, rip, cr4 uint64) (int, bool) {
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
func (g *Watcher) fetchable(cr3, va, cr4 uint64, p []byte) bool {
	tr, _, err := g.Walker.Walk(cr3, va, &g.emu.steps)
	if err != nil || !tr.Present || tr.NX || tr.User && cr4&vmx.CR4SMEP != 0 {
		return false
	}
	return g.Phys.ReadPhys(tr.PA, p) == nil
}

// writable reports whether the guest's tables translate la to gpa, with a
// write from CPL 0 allowed and nothing left for the processor to set: the
// walk the processor did before the access exited.
func (g *Watcher) writable(cr3, la, gpa, cr0, cr4, rflags uint64) bool {
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
func (g *Watcher) operand(v *hv.VCPU, rip uint64, in *x86emu.Insn) bool {
	mem := &in.Mem
	var la uint64
	switch mem.Base {
	case x86emu.MemNone:
	case x86emu.MemRIP:
		la = rip + uint64(in.Len)
	default:
		la = vcpuRegs{v}.GPR(int(mem.Base))
	}
	if mem.Index != x86emu.MemNone {
		la += vcpuRegs{v}.GPR(int(mem.Index)) * uint64(mem.Scale)
	}
	la += uint64(mem.Disp)
	switch mem.Seg {
	case x86emu.SegFS:
		la += v.VMCS.Read(vmx.GuestFSBase)
	case x86emu.SegGS:
		la += v.VMCS.Read(vmx.GuestGSBase)
	}
	if in.Op == x86emu.OpBTS || in.Op == x86emu.OpBTR {
		width := uint(in.Size * 8)
		if in.HasImm {
			in.Bit = uint(in.Imm) & (width - 1)
		} else {
			// A register bit offset is signed and may leave the
			// operand: the access is the operand-sized word that holds
			// the bit (SDM Vol. 2A, "BT—Bit Test", Bit(BitBase,
			// BitOffset)).
			off := x86emu.SignExtend(x86emu.RegValue(vcpuRegs{v}, in.Reg), in.Size)
			in.Bit = uint(off) & (width - 1)
			la += uint64(off>>bits.TrailingZeros(width)) * uint64(in.Size)
		}
	}
	in.LA = la
	return true
}

// vcpuRegs are a vCPU's general-purpose registers as the emulator sees
// them: RSP lives in the VMCS.
type vcpuRegs struct{ v *hv.VCPU }

func (r vcpuRegs) GPR(n int) uint64 {
	if n == 4 {
		return r.v.VMCS.Read(vmx.GuestRSP)
	}
	return r.v.Regs.GPR(n)
}

func (r vcpuRegs) SetGPR(n int, val uint64) {
	if n == 4 {
		r.v.VMCS.Write(vmx.GuestRSP, val)
		return
	}
	r.v.Regs.SetGPR(n, val)
}
