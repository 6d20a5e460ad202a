//go:build tamago

package pc

import (
	"encoding/binary"
	"unsafe"

	"github.com/tamahv/tamahv/vmx"
)

// Implemented in cpu_amd64.s.
func readCR3() uint64
func writeCR3(v uint64)
func sidt(p *[10]byte)
func xsetbv(xcr uint32, v uint64)
func movePhys(dst, src, n uint64)

// HostRegisters is the processor state a VM exit must restore, as the
// board set it up.
type HostRegisters struct {
	CR0, CR3, CR4          uint64
	FSBase, GSBase         uint64
	GDTRBase, IDTRBase     uint64
	TRBase, EFER, PAT      uint64
	CodeSel, DataSel, TSel uint16
}

// Host reads the current host state.
func Host() HostRegisters {
	var idtr [10]byte
	sidt(&idtr)
	return HostRegisters{
		CR0: readCR0(), CR3: readCR3(), CR4: readCR4(),
		FSBase: readMSR(vmx.MSRFSBase), GSBase: readMSR(vmx.MSRGSBase),
		GDTRBase: GDT, IDTRBase: binary.LittleEndian.Uint64(idtr[2:]), TRBase: TSS,
		EFER: readMSR(vmx.MSREFER), PAT: readMSR(vmx.MSRPAT),
		CodeSel: SelectorCode, DataSel: SelectorData, TSel: SelectorTSS,
	}
}

// EnableXSAVE sets CR4.OSXSAVE where the processor has XSAVE, so that the
// host can execute XSETBV for its guest.
func EnableXSAVE() bool {
	if _, _, c, _ := cpuid(1, 0); c&(1<<26) == 0 {
		return false
	}
	writeCR4(readCR4() | 1<<18)
	return true
}

// XSETBV executes XSETBV.
func XSETBV(xcr uint32, v uint64) { xsetbv(xcr, v) }

// WritePhys copies p to physical memory at pa (below 4 GiB).
func (PhysMem) WritePhys(pa uint64, p []byte) error {
	if err := mapped(pa, uint64(len(p))); err != nil || len(p) == 0 {
		return err
	}
	movePhys(pa, PhysAddr(unsafe.Pointer(&p[0])), uint64(len(p)))
	return nil
}

// CopyPhys copies n bytes of physical memory from src to dst (both below 4
// GiB); the ranges may overlap.
func (PhysMem) CopyPhys(dst, src, n uint64) error {
	if err := mapped(dst, n); err != nil {
		return err
	}
	if err := mapped(src, n); err != nil {
		return err
	}
	if n > 0 {
		movePhys(dst, src, n)
	}
	return nil
}

// Store writes the low size bytes (1, 2, 4 or 8) of val at pa with one
// MOV of that width; the operand lies within a page. With the other
// methods below, PhysMem is an x86emu.AtomicMemory: tamahv's stores to guest
// page tables.
func (PhysMem) Store(pa uint64, size int, val uint64) error {
	if err := mapped(pa, uint64(size)); err != nil {
		return err
	}
	return atomicStore(pa, size, val)
}

// Exchange writes the low size bytes of val at pa with one XCHG and
// returns what was there; the operand is naturally aligned.
func (PhysMem) Exchange(pa uint64, size int, val uint64) (uint64, error) {
	if err := mapped(pa, uint64(size)); err != nil {
		return 0, err
	}
	return atomicExchange(pa, size, val)
}

// CompareExchange writes the low size bytes of val at pa where they equal
// old, with one LOCK CMPXCHG, and returns what the instruction read and
// whether it wrote; the operand is naturally aligned.
func (PhysMem) CompareExchange(pa uint64, size int, old, val uint64) (uint64, bool, error) {
	if err := mapped(pa, uint64(size)); err != nil {
		return 0, false, err
	}
	return atomicCompareExchange(pa, size, old, val)
}

// CompareExchange16 is CompareExchange of the 16 bytes at pa, 16-byte
// aligned, with one LOCK CMPXCHG16B; element 0 is the low quadword.
func (PhysMem) CompareExchange16(pa uint64, old, val [2]uint64) ([2]uint64, bool, error) {
	if err := mapped(pa, 16); err != nil {
		return [2]uint64{}, false, err
	}
	return atomicCompareExchange16(pa, old, val)
}

// Or ORs the low size bytes of val into the naturally aligned operand at
// pa with one LOCK OR, and returns RFLAGS as the instruction left it.
func (PhysMem) Or(pa uint64, size int, val uint64) (uint64, error) {
	if err := mapped(pa, uint64(size)); err != nil {
		return 0, err
	}
	return atomicOr(pa, size, val)
}

// And is Or's LOCK AND.
func (PhysMem) And(pa uint64, size int, val uint64) (uint64, error) {
	if err := mapped(pa, uint64(size)); err != nil {
		return 0, err
	}
	return atomicAnd(pa, size, val)
}

// Xor is Or's LOCK XOR.
func (PhysMem) Xor(pa uint64, size int, val uint64) (uint64, error) {
	if err := mapped(pa, uint64(size)); err != nil {
		return 0, err
	}
	return atomicXor(pa, size, val)
}

// BitTestAndSet sets bit bit of the naturally aligned 2, 4 or 8 bytes at
// pa with one LOCK BTS, and reports the bit's old value.
func (PhysMem) BitTestAndSet(pa uint64, size int, bit uint) (bool, error) {
	if err := mapped(pa, uint64(size)); err != nil {
		return false, err
	}
	return atomicBitTestAndSet(pa, size, bit)
}

// BitTestAndReset is BitTestAndSet's LOCK BTR: it clears the bit.
func (PhysMem) BitTestAndReset(pa uint64, size int, bit uint) (bool, error) {
	if err := mapped(pa, uint64(size)); err != nil {
		return false, err
	}
	return atomicBitTestAndReset(pa, size, bit)
}

// SetNMIHandler points IDT vector 2 at handler, keeping the gate's
// selector and type. TamaGo's own NMI handler acknowledges the local APIC
// for its SMP and IRQ wake-ups, which tamahv does not use; tamahv's counts
// the NMI for the guest (vmx.NMIHandler). Call it before the guest runs.
func SetNMIHandler(handler uintptr) error {
	var idtr [10]byte
	sidt(&idtr)
	gatePA := binary.LittleEndian.Uint64(idtr[2:]) + 2*16
	var gate [16]byte
	if err := (PhysMem{}).ReadPhys(gatePA, gate[:]); err != nil {
		return err
	}
	// 64-bit gate: offset 15:0, selector, IST/type, offset 31:16, 63:32.
	binary.LittleEndian.PutUint16(gate[0:], uint16(handler))
	binary.LittleEndian.PutUint16(gate[6:], uint16(handler>>16))
	binary.LittleEndian.PutUint32(gate[8:], uint32(uint64(handler)>>32))
	return PhysMem{}.WritePhys(gatePA, gate[:])
}
