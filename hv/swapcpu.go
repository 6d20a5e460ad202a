package hv

import (
	"errors"

	"github.com/tamahv/tamahv/vmx"
)

// CR3Mask keeps the page-table base of a CR3 value (no PCID, no flags).
const CR3Mask = pteAddr

// ErrNoBreakpointAgent is InjectBPFault's error without an agent.
var ErrNoBreakpointAgent = errors.New("hv: no breakpoint agent in this guest")

// ErrEventTaken is InjectPF's error when an event is already placed for the
// next VM entry.
var ErrEventTaken = errors.New("hv: an event is already placed for VM entry")

// SwapCPU is the exiting vCPU as swapmem sees it (swapmem.CPU).
type SwapCPU struct {
	V *VCPU
	// Agent raises BPFault faults (nil: none in this guest).
	Agent *BreakpointAgent
}

// CR3 is the guest's address space, without PCID bits.
func (c *SwapCPU) CR3() uint64 { return c.V.VMCS.Read(vmx.GuestCR3) & CR3Mask }

// Ring is the guest's CPL.
func (c *SwapCPU) Ring() int { return c.V.CPL() }

// EventPending reports an event queued or placed for the next VM entry.
func (c *SwapCPU) EventPending() bool {
	return c.V.EventPending() || c.V.VMCS.Read(vmx.EntryInterruptInfo)&(1<<31) != 0
}

// InjectPF places a #PF for va with errorCode in the VM-entry fields (the
// scheduler runs after pending events were placed) and sets the guest's
// CR2.
func (c *SwapCPU) InjectPF(va uint64, errorCode uint32) error {
	if c.EventPending() {
		return ErrEventTaken
	}
	c.V.placeEvent(vmx.Exception(vmx.VectorPF, errorCode, 0))
	c.V.Regs.CR2 = va
	return c.V.VMCS.Err()
}

// InjectBPFault arms the breakpoint agent to raise a #PF on va in the
// current address space.
func (c *SwapCPU) InjectBPFault(va uint64) error {
	if c.Agent == nil {
		return ErrNoBreakpointAgent
	}
	return c.Agent.Arm(c.CR3(), va)
}
