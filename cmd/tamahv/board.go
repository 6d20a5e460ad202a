//go:build tamago

package main

import (
	"fmt"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/board/pc/smp"
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
}

func newBoard(pages int) *board { return &board{PageArena: pc.NewPageArena(pages)} }

// Sink implements machine.Board: a block of the arena's.
func (b *board) Sink() (uint64, error) {
	pa, _, err := b.Block(ept.Size2M, ept.Size2M)
	return pa, err
}

// Reach implements machine.Board: the one-to-one map is extended to top.
func (b *board) Reach(top uint64) uint64 {
	if err := pc.MapRAM(top); err != nil {
		fmt.Printf("tamahv: RAM above %#x out of tamahv's reach: %v\n", pc.PhysTop(), err)
	}
	return pc.PhysTop()
}

func (b *board) PortIO(port uint16, size int, in bool, val uint32) uint32 {
	return pc.PortIO(port, size, in, val)
}

func (b *board) TakeNMI() uint32 { return vmx.TakeNMI() }

func (b *board) XSETBV(xcr uint32, v uint64) { pc.XSETBV(xcr, v) }

func (b *board) Host() hv.HostState { return hostState(pc.Host()) }

// hostState is a processor's host state as hv writes it.
func hostState(h pc.HostRegisters) hv.HostState {
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

// TSC implements machine.TSCReader.
func (b *board) TSC() uint64 { return pc.TSC() }

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

// QuietEnter implements machine.QuietEnterer.
func (b *board) QuietEnter(r *vmx.GuestRegs, fx *vmx.FXArea, launched bool, q *vmx.QuietCPUID) error {
	return vmx.RunQuiet(r, fx, launched, q)
}

// LAPICRead implements machine.LAPIC: the bootstrap processor's.
func (b *board) LAPICRead(off uint32) uint32 { return smp.LAPICRead(off) }

// LAPICWrite implements machine.LAPIC.
func (b *board) LAPICWrite(off, val uint32) { smp.LAPICWrite(off, val) }

// UnblockNMIs implements machine.NMIUnblocker.
func (b *board) UnblockNMIs() { vmx.UnblockNMIs() }
