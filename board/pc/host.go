//go:build tamago

package pc

import (
	"encoding/binary"
	"fmt"
	"unsafe"
)

// Implemented in cpu_amd64.s.
func readCR3() uint64
func sidt(p *[10]byte)
func xsetbv(xcr uint32, v uint64)
func movePhys(dst, src, n uint64)

// MSRs the host state needs.
const (
	msrEFER   = 0xc0000080
	msrPAT    = 0x277
	msrFSBase = 0xc0000100
	msrGSBase = 0xc0000101
)

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
		FSBase: readMSR(msrFSBase), GSBase: readMSR(msrGSBase),
		GDTRBase: GDT, IDTRBase: binary.LittleEndian.Uint64(idtr[2:]), TRBase: TSS,
		EFER: readMSR(msrEFER), PAT: readMSR(msrPAT),
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

// PageArena hands out 4 KiB pages of host memory with known physical
// addresses, carved from one Go allocation (the heap is mapped one to one
// and does not move). It implements ept.Tables.
type PageArena struct {
	mem  []byte
	base uint64
	next int
	free []uint64
}

// NewPageArena reserves n pages.
func NewPageArena(n int) *PageArena {
	mem := make([]byte, (n+1)*4096)
	pa := PhysAddr(unsafe.Pointer(&mem[0]))
	off := int((4096 - pa%4096) % 4096)
	return &PageArena{mem: mem[off : off+n*4096], base: pa + uint64(off)}
}

// Alloc returns the physical address of a zeroed page.
func (a *PageArena) Alloc() (uint64, error) {
	if n := len(a.free); n > 0 {
		pa := a.free[n-1]
		a.free = a.free[:n-1]
		clear(a.mem[pa-a.base : pa-a.base+4096])
		return pa, nil
	}
	if a.next+4096 > len(a.mem) {
		return 0, fmt.Errorf("pc: page arena of %d pages is full", len(a.mem)/4096)
	}
	pa := a.base + uint64(a.next)
	a.next += 4096
	return pa, nil
}

// Free returns a page.
func (a *PageArena) Free(pa uint64) { a.free = append(a.free, pa) }

// Bytes returns the page at pa as bytes.
func (a *PageArena) Bytes(pa uint64) (*[4096]byte, error) {
	if pa < a.base || pa >= a.base+uint64(len(a.mem)) || pa%4096 != 0 {
		return nil, fmt.Errorf("pc: %#x is not an arena page", pa)
	}
	return (*[4096]byte)(a.mem[pa-a.base : pa-a.base+4096]), nil
}

// Table returns the page at pa as 512 entries.
func (a *PageArena) Table(pa uint64) (*[512]uint64, error) {
	b, err := a.Bytes(pa)
	if err != nil {
		return nil, err
	}
	return (*[512]uint64)(unsafe.Pointer(b)), nil
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
