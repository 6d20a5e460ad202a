//go:build tamago

package main

import (
	"unsafe"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/vmx"
)

// board is the PC as machine.Board sees it. It owns every page the
// processor reads (the arena and the sink) for as long as the machine
// holds it.
type board struct {
	*pc.PageArena
	pc.PhysMem
	pc.Hardware
	sink []byte
}

func newBoard(pages int) *board { return &board{PageArena: pc.NewPageArena(pages)} }

// Sink implements machine.Board: 2 MiB, 2 MiB aligned, referenced by the
// board.
func (b *board) Sink() (uint64, error) {
	if b.sink == nil {
		b.sink = make([]byte, 2*ept.Size2M)
	}
	return (pc.PhysAddr(unsafe.Pointer(&b.sink[0])) + ept.Size2M - 1) &^ (ept.Size2M - 1), nil
}

func (b *board) PortIO(port uint16, size int, in bool, val uint32) uint32 {
	return pc.PortIO(port, size, in, val)
}

func (b *board) XSETBV(xcr uint32, v uint64) { pc.XSETBV(xcr, v) }

func (b *board) Host() hv.HostState {
	h := pc.Host()
	return hv.HostState{
		CR0: h.CR0, CR3: h.CR3, CR4: h.CR4, FSBase: h.FSBase, GSBase: h.GSBase,
		TRBase: h.TRBase, GDTRBase: h.GDTRBase, IDTRBase: h.IDTRBase, EFER: h.EFER, PAT: h.PAT,
		CS: h.CodeSel, SS: h.DataSel, DS: h.DataSel, ES: h.DataSel, TR: h.TSel,
	}
}

func (b *board) TSCHz() uint64 {
	hz, _ := pc.TSCHzSource()
	return hz
}

func (b *board) LoadVMCS(pa uint64) (hv.VMCS, error) {
	if err := vmx.VMCLEAR(pa); err != nil {
		return nil, err
	}
	if err := vmx.VMPTRLD(pa); err != nil {
		return nil, err
	}
	return &hv.HardwareVMCS{}, nil
}

func (b *board) InvalidateEPT(eptp uint64) {
	if err := vmx.INVEPT(vmx.InveptSingle, eptp); err != nil {
		_ = vmx.INVEPT(vmx.InveptAll, 0)
	}
}

func (b *board) Enter(r *vmx.GuestRegs, fx *vmx.FXArea, launched bool) error {
	return vmx.Run(r, fx, launched)
}
