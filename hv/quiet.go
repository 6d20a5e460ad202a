package hv

import "github.com/tamahv/tamahv/vmx"

// A processor whose exits are handed over to another (an application
// processor's, whose handlers run on the bootstrap processor) can answer
// some of them itself, without the hand-off, while nothing of tamahv's
// needs to see them: CPUID, from a table this file makes out of the
// vCPU's own policy. Such exits reach no Observe function.

// CPUIDEntry is one CPUID answer a processor may give the guest itself:
// for EAX = Leaf and ECX = Subleaf exactly, the four registers; where
// CR4Mask is not 0, ECX gains ECXIfCR4 while the guest's CR4 has a bit
// of CR4Mask set (leaf 1's OSXSAVE).
type CPUIDEntry struct {
	Leaf, Subleaf uint32
	Regs          [4]uint32
	CR4Mask       uint32
	ECXIfCR4      uint32
}

// Answer returns the entry's answer for a guest whose CR4 is cr4.
func (e CPUIDEntry) Answer(cr4 uint64) [4]uint32 {
	r := e.Regs
	if uint64(e.CR4Mask)&cr4 != 0 {
		r[vmx.ECX] |= e.ECXIfCR4
	}
	return r
}

// subleafLeaves are the leaves whose answer CPUIDTable gives for
// subleaves 0 to 3; every other leaf's, for subleaf 0 only. A CPUID
// with another ECX is handled as any other exit.
func subleafLeaves(leaf uint32) bool {
	switch leaf {
	case 4, vmx.CPUIDLeafTopology, 0x1f:
		return true
	}
	return false
}

// CPUIDTable returns the CPUID answers the vCPU's processor may give the
// guest itself: for each leaf and subleaf whose answer depends on nothing
// that changes while the guest runs but CR4.OSXSAVE, the answer CPUID's
// exit handling would give now. Leaf 0xD (its sizes follow XCR0) and leaf
// 7 (its TSX flags follow MSRs the guest writes without an exit,
// IA32_TSX_CTRL and TSX_FORCE_ABORT) are not among them, nor is any leaf
// where CPUID's exit has an interceptor: the table is empty then. Leaf 1 depends on IA32_APIC_BASE's enable bit
// too: a caller makes the table again after the guest writes that MSR.
func (v *VCPU) CPUIDTable() []CPUIDEntry {
	if v.intercepted[vmx.ExitCPUID] || v.CPUID == nil {
		return nil
	}
	var out []CPUIDEntry
	add := func(leaf, sub uint32) {
		r := v.guestCPUID(leaf, sub)
		e := CPUIDEntry{Leaf: leaf, Subleaf: sub, Regs: r}
		if mask, bit, ok := cr4Flag(leaf, sub); ok {
			e.Regs[vmx.ECX] &^= bit
			e.CR4Mask, e.ECXIfCR4 = mask, bit
		}
		out = append(out, e)
	}
	basic, _, _, _ := v.CPUID(0, 0)
	for leaf := uint32(0); leaf <= min(basic, 0x1f); leaf++ {
		if leaf == 0xd || leaf == 7 {
			continue
		}
		add(leaf, 0)
		if subleafLeaves(leaf) {
			for sub := uint32(1); sub < 4; sub++ {
				add(leaf, sub)
			}
		}
	}
	add(CPUIDHypervisorBase, 0)
	add(CPUIDHypervisorBase+1, 0)
	ext, _, _, _ := v.CPUID(0x80000000, 0)
	for leaf := uint32(0x80000000); ext >= 0x80000000 && leaf <= min(ext, 0x80000008); leaf++ {
		add(leaf, 0)
	}
	return out
}

// Quiet reports whether the vCPU's next exit may pass without tamahv's
// exit handling: no event is placed for the coming entry, queued, or
// waited for with an event window; the vCPU does not wait for a start-up
// IPI; and no NeedExit function asks for the exit.
func (v *VCPU) Quiet() bool {
	if v.sipiWait || v.events.n != 0 || v.windows != 0 || v.Placed() {
		return false
	}
	for _, f := range v.needExit {
		if f(v) {
			return false
		}
	}
	return true
}

// NeedExit adds f to the functions Quiet asks: f reports whether its
// extension must see the vCPU's next exit (a page left open for the
// vCPU's write, an event whose delivery it waits to confirm, an
// instruction it steps over).
func (v *VCPU) NeedExit(f func(v *VCPU) bool) {
	if f != nil {
		v.needExit = append(v.needExit, f)
	}
}

// quietCPUID is the table QuietCPUID gave, indexed by leaf and subleaf
// (basic leaves 0 to 0x1F with subleaves 0 to 3, tamahv's two, the
// extended 0x80000000 to 0x80000008), and the caller's check of its own
// periodic work.
type quietCPUID struct {
	basic [0x20][4]quietAnswer
	hyp   [2]quietAnswer
	ext   [9]quietAnswer
	due   func() bool
	// answered counts the CPUID exits answered from the table.
	answered uint64
}

// quietAnswer is one answer of quietCPUID, where ok.
type quietAnswer struct {
	e  CPUIDEntry
	ok bool
}

// slot returns the place of leaf and subleaf's answer, nil where the
// table has none.
func (q *quietCPUID) slot(leaf, sub uint32) *quietAnswer {
	switch {
	case leaf < 0x20 && sub < 4:
		return &q.basic[leaf][sub]
	case leaf-CPUIDHypervisorBase < 2 && sub == 0:
		return &q.hyp[leaf-CPUIDHypervisorBase]
	case leaf-0x80000000 < 9 && sub == 0:
		return &q.ext[leaf-0x80000000]
	}
	return nil
}

// QuietCPUID has Run answer the guest's CPUID from t (CPUIDTable) at the
// exits that follow an entry where the vCPU was quiet, and enter the
// guest again at once: the same answer, RIP past the instruction, the
// exit counted, but no observer, no entry function and no exit handling,
// which a quiet vCPU's CPUID does not need. due reports whether the
// caller's periodic work (its OnEntry functions) is due; then the exit is
// handled as any other. A nil t ends it.
func (v *VCPU) QuietCPUID(t []CPUIDEntry, due func() bool) {
	if t == nil || due == nil {
		v.quiet = nil
		return
	}
	q := &quietCPUID{due: due}
	if v.quiet != nil {
		q.answered = v.quiet.answered
	}
	for _, e := range t {
		if a := q.slot(e.Leaf, e.Subleaf); a != nil {
			*a = quietAnswer{e, true}
		}
	}
	v.quiet = q
}

// QuietlyAnswered returns the CPUID exits answered from QuietCPUID's
// table.
func (v *VCPU) QuietlyAnswered() uint64 {
	if v.quiet == nil {
		return 0
	}
	return v.quiet.answered
}

// answerQuietly answers the exit the VMCS holds where it is a CPUID whose
// answer the table has, and the caller's work is not due.
func (v *VCPU) answerQuietly() bool {
	q := v.quiet
	reason, rip := v.read2(vmx.ExitReasonField, vmx.GuestRIP)
	if vmx.ExitReason(reason) != vmx.ExitCPUID || q.due() {
		return false
	}
	a := q.slot(uint32(v.Regs.RAX), uint32(v.Regs.RCX))
	if a == nil || !a.ok {
		return false
	}
	e := &a.e
	var cr4 uint64
	if e.CR4Mask != 0 {
		cr4 = v.read(vmx.GuestCR4)
	}
	r := e.Answer(cr4)
	v.Regs.RAX, v.Regs.RBX, v.Regs.RCX, v.Regs.RDX = uint64(r[0]), uint64(r[1]), uint64(r[2]), uint64(r[3])
	v.skipInstruction(rip)
	v.counts[vmx.ExitCPUID]++
	q.answered++
	v.entered++
	return true
}
