package guestmem

import (
	"encoding/binary"
	"sync"
	"sync/atomic"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/vmx"
)

// CR3Mask keeps the page-table base of a CR3 value (no PCID, no flags).
const CR3Mask = vmx.PTEAddress

// CR3 names the top-level paging structure (PML4 or PML5) in bits 51:12;
// with CR4.PCIDE its bits 11:0 are the PCID, else bits 3 and 4 are PWT and
// PCD (SDM Vol. 3A, 4.5, "4-Level Paging and 5-Level Paging", Tables 4-12
// and 4-13). Bit 63 of a MOV to CR3 (no flush, 4.10.4.1) and the LAM bits
// 62:61 are not part of the address either.

// PTIUserBit is the CR3 bit that Linux's page-table isolation sets to
// switch from a process's kernel page tables to its user ones
// (PTI_USER_PGTABLE_BIT, arch/x86/include/asm/pgtable_types.h): the kernel
// PGD is an 8 KiB-aligned pair of pages and the user PGD the second one.
// With PCID the user PCID is the kernel one with bit 11 set
// (X86_CR3_PTI_PCID_USER_BIT); that bit is a PCID bit, not an address bit.
const PTIUserBit = 1 << 12

// AddressSpace returns the guest address space a CR3 value stands for: its
// page-table base, without PCID and flag bits, and, when the guest
// isolates its page tables (pti), the kernel PGD of the user/kernel pair,
// whose tables map the user half as the user PGD does and the kernel half
// besides. Every CR3 comparison in tamahv goes through it, so that a
// process is one address space whether it is seen in user mode (user CR3),
// in kernel mode (kernel CR3) or with any PCID. AddressSpace of its own
// result returns it unchanged.
//
// Without page-table isolation the PGDs of two processes may lie in
// adjacent pages, their CR3s differing in bit 12 only: pti must then be
// false. AddressSpaces learns which it is.
func AddressSpace(cr3 uint64, pti bool) uint64 {
	base := cr3 & CR3Mask
	if pti {
		base &^= PTIUserBit
	}
	return base
}

// PTIMode is what AddressSpaces knows of the guest's page-table isolation.
type PTIMode uint8

// PTI modes.
const (
	// PTIUnknown: not learnt yet. CR3 values are compared exactly (as
	// without isolation), which is never wrong, only blind to pairs.
	PTIUnknown PTIMode = iota
	// PTIOn: the guest isolates page tables; a CR3 and the same CR3 with
	// PTIUserBit are one address space.
	PTIOn
	// PTIOff: the guest does not; every page-table base is its own
	// address space.
	PTIOff
)

var ptiNames = [...]string{"unknown", "on", "off"}

// String names the mode.
func (m PTIMode) String() string {
	if int(m) < len(ptiNames) {
		return ptiNames[m]
	}
	return "invalid"
}

// AddressSpaces learns whether the guest isolates its page tables and
// normalises CR3 values accordingly (Of), and keeps the guest's kernel
// address space for requests that name none (System).
//
// The guest decides page-table isolation at boot, once. AddressSpaces
// watches VM exits (Install) and decides at the first exit that proves
// either way, from what the processor and the guest's own tables show:
//
//   - PTIOff: an exit at CPL 3, in IA-32e mode, with CR3 bit 12 clear. With
//     isolation user mode always runs on the user PGD, the odd page of the
//     pair (Linux switches CR3 on every return to user mode).
//   - PTIOn: an exit at CPL 3 with CR3 bit 12 set whose page-table page U
//     and the page below it, K = U - 4 KiB, are a user/kernel pair: the
//     user halves of their top-level tables (entries 0-255) are the same
//     entries (address, present, writable, user; Linux sets NX on the
//     kernel copy of user entries, and the processor sets accessed bits in
//     each copy separately), at least one of them present, and K maps more
//     of the kernel half (entries 256-511) than U, which maps only the
//     entry trampoline. Without isolation two processes never share
//     lower-level user tables, so their user halves cannot agree; and every
//     PGD carries the same kernel half, so K never maps more of it.
//
// Until then CR3s are compared exactly: a transient mismatch (another
// processor writing the tables during the check) only delays the decision
// to a later exit. A pair is checked only when an exit's CR3 or CPL
// differs from the previous exit's: at most two 4 KiB reads, no allocation.
// The guest kernel could feign either answer, but it decides its own
// processes' isolation anyway; user mode controls neither CR3 nor the
// tables' kernel-chosen addresses.
//
// Its methods may be called from several vCPUs at once: Of and PTI read
// atomically; an exit that finds another vCPU learning skips its turn.
type AddressSpaces struct {
	// Mem reads the guest's top-level tables: guest RAM only (GuestPhys).
	Mem hv.PhysReader
	// Walker, where set, walks with the paging mode of the address space
	// last seen: 5-level paging (CR4.LA57) and whether XD bits are valid
	// (IA32_EFER.NXE), read from the vCPU whenever its CR3 changes. A walk
	// that a request starts (the monitor's, an embedder's) then needs no
	// mode of its own.
	Walker *Walker

	pti    atomic.Uint32 // a PTIMode
	system atomic.Uint64 // the latest kernel address space seen (0: none)

	mu           sync.Mutex // the rest
	lastCR3      uint64
	lastCPL      int
	seen         bool
	user, kernel [4096]byte
	// Counters (under mu): pair checks made, exits looked at.
	Checks, Observed uint64
}

// PTI returns what is known of the guest's page-table isolation.
func (s *AddressSpaces) PTI() PTIMode {
	if s == nil {
		return PTIUnknown
	}
	return PTIMode(s.pti.Load())
}

func (s *AddressSpaces) decide(m PTIMode, system uint64) {
	s.pti.Store(uint32(m))
	s.system.Store(system)
}

// Of returns the address space of cr3 (AddressSpace with what is known of
// isolation). A nil AddressSpaces compares page-table bases exactly.
func (s *AddressSpaces) Of(cr3 uint64) uint64 {
	return AddressSpace(cr3, s.PTI() == PTIOn)
}

// Install makes s learn from every VM exit of v, before the exit is
// handled: a handler sees the answer its own exit gave.
func (s *AddressSpaces) Install(v *hv.VCPU) {
	v.Observe(func(v *hv.VCPU, _ *vmx.Exit) { s.ObserveVCPU(v) })
}

// ObserveVCPU learns from v's state at a VM exit. Once isolation is known
// it reads one VMCS field; until then two more, and it checks a pair of
// tables only when CR3 or CPL changed; when CR3 changed, and v runs in
// IA-32e mode with paging, it reads the paging mode for the Walker (four
// more). A vCPU in its INIT state or start-up code changes neither the
// system address space nor the walker's mode.
func (s *AddressSpaces) ObserveVCPU(v *hv.VCPU) {
	if !s.mu.TryLock() {
		return // another vCPU is learning: a later exit will do
	}
	defer s.mu.Unlock()
	s.Observed++
	cr3 := v.VMCS.Read(vmx.GuestCR3)
	if s.PTI() != PTIUnknown {
		if !s.seen || cr3 != s.lastCR3 {
			s.seen, s.lastCR3 = true, cr3
			// A vCPU outside IA-32e paging (its INIT state, real-mode
			// start-up code) has no address space to learn from.
			if long(v) {
				s.system.Store(s.Of(cr3))
				s.paging(v)
			}
		}
		return
	}
	cpl := v.CPL()
	if s.seen && cr3 == s.lastCR3 && cpl == s.lastCPL {
		return
	}
	changed := !s.seen || cr3 != s.lastCR3
	s.seen, s.lastCR3, s.lastCPL = true, cr3, cpl
	lm := long(v)
	if changed && lm {
		s.paging(v)
	}
	s.observe(cr3, cpl, lm)
}

// long reports whether v runs in IA-32e mode with paging on.
func long(v *hv.VCPU) bool {
	return v.VMCS.Read(vmx.EntryControls)&vmx.EntryIA32eMode != 0 && v.VMCS.Read(vmx.GuestCR0)&vmx.CR0PG != 0
}

// paging sets the walker's paging mode from v's, which runs in IA-32e
// mode with paging: every vCPU of the guest's kernel runs with the same.
func (s *AddressSpaces) paging(v *hv.VCPU) {
	if w := s.Walker; w != nil {
		w.LA57 = v.VMCS.Read(vmx.GuestCR4)&vmx.CR4LA57 != 0
		w.NoNXE = v.VMCS.Read(vmx.GuestEFER)&vmx.EFERNXE == 0
	}
}

// Observe learns from one exit's CR3 and CPL; long says the guest runs in
// IA-32e mode with paging.
func (s *AddressSpaces) Observe(cr3 uint64, cpl int, long bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.observe(cr3, cpl, long)
}

func (s *AddressSpaces) observe(cr3 uint64, cpl int, long bool) {
	base := cr3 & CR3Mask
	if s.PTI() != PTIUnknown {
		s.system.Store(s.Of(cr3))
		return
	}
	if !long || base == 0 {
		return
	}
	switch cpl {
	case 3:
		if base&PTIUserBit == 0 {
			s.decide(PTIOff, base)
			return
		}
		if s.pair(base&^PTIUserBit, base) {
			s.decide(PTIOn, base&^PTIUserBit)
		}
	case 0:
		// Bit 12 clear at CPL 0 is a kernel PGD with isolation, and any
		// PGD (all map the kernel half) without.
		if base&PTIUserBit == 0 {
			s.system.Store(base)
		}
	}
}

// pairEntry keeps the bits a PGD entry's two copies share.
const pairEntry = vmx.PTEAddress | vmx.PTEPresent | vmx.PTEWritable | vmx.PTEUser

// pair reports whether k and u (guest-physical page-table pages) are the
// kernel and user PGDs of one isolated address space.
func (s *AddressSpaces) pair(k, u uint64) bool {
	s.Checks++
	if s.Mem == nil || s.Mem.ReadPhys(u, s.user[:]) != nil || s.Mem.ReadPhys(k, s.kernel[:]) != nil {
		return false
	}
	users := 0
	for i := 0; i < 256; i++ {
		eu, ek := binary.LittleEndian.Uint64(s.user[8*i:]), binary.LittleEndian.Uint64(s.kernel[8*i:])
		if eu&pairEntry != ek&pairEntry {
			return false
		}
		if eu&vmx.PTEPresent != 0 {
			users++
		}
	}
	return users > 0 && presentEntries(s.kernel[2048:]) > presentEntries(s.user[2048:])
}

// presentEntries counts the present entries of a table (half).
func presentEntries(b []byte) int {
	n := 0
	for i := 0; i+8 <= len(b); i += 8 {
		if b[i]&vmx.PTEPresent != 0 {
			n++
		}
	}
	return n
}

// System returns the guest's kernel address space for requests that name
// none (swapmem's SystemCR3): the address space of the latest exit that
// shows one, if its top-level table is still guest RAM and maps some of
// the kernel half; 0 when none is known. Every address space of the guest
// maps the kernel half alike; the latest one seen is live, or was
// moments ago.
func (s *AddressSpaces) System() uint64 {
	if s == nil || s.Mem == nil {
		return 0
	}
	sys := s.system.Load()
	if sys == 0 {
		return 0
	}
	var half [2048]byte
	if s.Mem.ReadPhys(sys+2048, half[:]) != nil || presentEntries(half[:]) == 0 {
		return 0
	}
	return sys
}
