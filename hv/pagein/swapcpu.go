// Package pagein is swapmem's hands in the guest: it injects the page
// faults that bring a swapped-out page back (SwapCPU, in user mode, or
// through the BreakpointAgent's int3 detour in the guest kernel), follows
// each to the guest (PFDelivery), and traps the return from a user fault
// (ReturnTrap). It extends a vCPU through hv's exported API only.
package pagein

import (
	"errors"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// ErrNoBreakpointAgent is InjectBPFault's error without an agent.
var ErrNoBreakpointAgent = errors.New("pagein: no breakpoint agent in this guest")

var _ swapmem.CPU = (*SwapCPU)(nil)

// SwapCPU is the exiting vCPU as swapmem sees it (swapmem.CPU).
type SwapCPU struct {
	V *hv.VCPU
	// Agent raises BPFault faults (nil: none in this guest).
	Agent *BreakpointAgent
	// Spaces names the guest's address spaces (nil: page-table bases
	// compared exactly).
	Spaces *guestmem.AddressSpaces
	// Delivery follows each injected #PF to the guest (nil: the engine's
	// timeout is the only news of a lost one).
	Delivery *PFDelivery
}

// CR3 is the guest's address space (AddressSpaces.Of): without PCID bits,
// and the kernel PGD of a user/kernel pair.
func (c *SwapCPU) CR3() uint64 { return c.Spaces.Of(c.V.VMCS.Read(vmx.GuestCR3)) }

// Ring is the guest's CPL.
func (c *SwapCPU) Ring() int { return c.V.CPL() }

// EventPending reports an event queued or placed for the next VM entry.
func (c *SwapCPU) EventPending() bool {
	return c.V.EventPending() || c.V.Placed()
}

// InjectPF places a #PF for va with errorCode in the VM-entry fields (the
// scheduler runs after pending events were placed) and sets the guest's
// CR2.
func (c *SwapCPU) InjectPF(va uint64, errorCode uint32) error {
	if c.V.EventPending() {
		return hv.ErrEventTaken
	}
	if err := c.V.Place(vmx.Exception(vmx.VectorPF, errorCode, 0)); err != nil {
		return err
	}
	c.V.Regs.CR2 = va
	c.Delivery.placed(va)
	return nil
}

// InjectBPFault arms the breakpoint agent to raise a #PF on va in the
// current address space.
func (c *SwapCPU) InjectBPFault(va uint64) error {
	if c.Agent == nil {
		return ErrNoBreakpointAgent
	}
	return c.Agent.Arm(c.V, c.CR3(), va)
}

// PFReports hears what became of an injected #PF (swapmem.Engine).
type PFReports interface {
	// PFDelivered: the guest took the #PF for va.
	PFDelivered(va uint64)
	// CancelPendingPF: the #PF for va never reached the guest.
	CancelPendingPF(va uint64)
}

// PFDelivery follows swapmem's #PF on one vCPU, from its injection to the
// guest, and tells Reports (the engine) how it went, so that a lost fault
// is scheduled again at once rather than after the engine's timeout.
//
// The #PF is placed in the VM-entry fields (SwapCPU.InjectPF), or queued
// by the breakpoint agent and placed by the run loop. At the exit after
// the entry that placed it, the IDT-vectoring information tells (SDM Vol.
// 3C, 27.2.4, "Information for VM Exits During Event Delivery"):
//
//   - valid, a hardware exception with vector 14, and CR2 still the
//     fault's address: the exit interrupted its delivery. The run loop
//     puts it back at the front of the event queue, to be placed again at
//     the next entry, and PFDelivery follows it there.
//   - anything else: the delivery completed (the guest's handler was
//     entered; an exit during a later event of the guest's own, or one
//     that turned ours into #DF, shows that event instead): PFDelivered.
//
// At an entry while the #PF is queued, it is either placed (a #PF with
// CR2 the fault's address in the VM-entry fields), still queued behind
// another event, or gone (the queue was reset or overflowed, another
// event took its place): CancelPendingPF. An OnEntry function installed
// after Install must not replace an event placed in the VM-entry fields.
type PFDelivery struct {
	Reports PFReports

	state uint8
	va    uint64

	// Counters: confirmed deliveries, interrupted deliveries put back,
	// faults lost and cancelled.
	Delivered, Requeued, Lost uint64
}

const (
	pfIdle   = iota
	pfPlaced // in the VM-entry fields of the coming entry
	pfQueued // in the vCPU's event queue
)

// Install follows the faults of v: its exits (before the run loop
// re-queues an interrupted event) and its entries (after the run loop
// placed the first queued event). Install it before the engine's
// InjectPendingPF runs at entry, so that a cancelled fault can be injected
// again at the same entry.
func (d *PFDelivery) Install(v *hv.VCPU) {
	v.Observe(d.exit)
	v.OnEntry(d.entry)
	// The next exit confirms or puts back a #PF placed or queued.
	v.NeedExit(func(*hv.VCPU) bool { return d.state != pfIdle })
}

// placed records our #PF for va written in the VM-entry fields.
func (d *PFDelivery) placed(va uint64) {
	if d != nil {
		d.state, d.va = pfPlaced, va
	}
}

// queued records our #PF for va put in the vCPU's event queue.
func (d *PFDelivery) queued(va uint64) {
	if d != nil {
		d.state, d.va = pfQueued, va
	}
}

// isPF reports whether e is a #PF.
func isPF(e vmx.Event) bool {
	return e.Type == vmx.EventHardwareException && e.Vector == vmx.VectorPF
}

func (d *PFDelivery) exit(v *hv.VCPU, e *vmx.Exit) {
	if d.state != pfPlaced {
		return
	}
	if ev, ok := vmx.DecodeEvent(e.IDTVectoring, 0); ok && isPF(ev) && v.Regs.CR2 == d.va {
		d.state = pfQueued
		d.Requeued++
		return
	}
	d.state = pfIdle
	d.Delivered++
	if d.Reports != nil {
		d.Reports.PFDelivered(d.va)
	}
}

func (d *PFDelivery) entry(v *hv.VCPU) {
	if d.state != pfQueued {
		return
	}
	if ev, ok := vmx.DecodeEvent(uint32(v.VMCS.Read(vmx.EntryInterruptInfo)), 0); ok && isPF(ev) && v.Regs.CR2 == d.va {
		d.state = pfPlaced
		return
	}
	if v.Queued(isPF) {
		return // behind another event
	}
	d.state = pfIdle
	d.Lost++
	if d.Reports != nil {
		d.Reports.CancelPendingPF(d.va)
	}
}
