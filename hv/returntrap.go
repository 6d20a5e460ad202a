package hv

import (
	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// ReturnTrap gives tamahv a VM exit when the guest comes back to a user
// instruction. A #PF that swapmem injects at CPL 3 (UserFault) interrupts
// the user instruction at RIP; the guest kernel brings the page in and
// returns to that instruction, all without a VM exit but for the
// page-table write. The next #PF can only be injected at an exit in user
// mode, which the guest may not make for a long while (the
// VMX-preemption timer bounds it). Arm takes the execute permission
// from the EPT entry of the instruction's page, so the guest's return to
// it exits at CPL 3 in its address space: the next #PF goes in at that
// exit, and a read's progress does not wait for the timer.
//
// One page is trapped at a time. A fetch from the page by anything (the
// process's return, another process sharing the page) springs the trap:
// the page gets its permissions back and the instruction runs again. The
// trap yields to every other use of the page (GuestPhys.TrapFetch).
type ReturnTrap struct {
	// Phys owns the EPT permissions; Walker translates the guest's RIP.
	Phys   *GuestPhys
	Walker *Walker

	page uint64 // guest-physical page trapped
	on   bool

	// Arms counts traps set; Hits those the guest sprang.
	Arms, Hits uint64
}

// Install intercepts v's EPT violations for fetches from the trapped page.
func (r *ReturnTrap) Install(v *VCPU) error {
	return v.Intercept(vmx.ExitEPTViolation, r.onViolation)
}

// Arm traps the next fetch from the page of the user instruction at rip
// in the address space cr3, disarming any earlier trap.
func (r *ReturnTrap) Arm(cr3, rip uint64) {
	r.Disarm()
	tr, err := r.Walker.Translate(cr3, rip)
	if err != nil || !tr.Present || !tr.User {
		return
	}
	pg := tr.PA &^ 0xfff
	if r.Phys.TrapFetch(pg) != nil {
		return
	}
	r.Phys.Flush()
	r.page, r.on = pg, true
	r.Arms++
}

// Disarm gives the trapped page its permissions back.
func (r *ReturnTrap) Disarm() {
	if !r.on {
		return
	}
	r.on = false
	_ = r.Phys.UntrapFetch(r.page)
	r.Phys.Flush()
}

func (r *ReturnTrap) onViolation(v *VCPU, e *vmx.Exit, next Handler) (Action, error) {
	if r.on && e.GuestPA&^0xfff == r.page && ept.DecodeViolation(e.Qualification).Fetch {
		r.Disarm()
		r.Hits++
		return Resume, nil
	}
	return next(v, e)
}

// TrapCPU is a swapmem.CPU that arms a ReturnTrap at every #PF it injects
// in user mode, so that the guest's return from the fault exits.
type TrapCPU struct {
	swapmem.CPU
	Trap *ReturnTrap
	V    *VCPU
}

// InjectPF injects the #PF and, at CPL 3, traps the return to the
// interrupted instruction.
func (c *TrapCPU) InjectPF(va uint64, errorCode uint32) error {
	if err := c.CPU.InjectPF(va, errorCode); err != nil {
		return err
	}
	if c.CPU.Ring() == 3 {
		c.Trap.Arm(c.CPU.CR3(), c.V.VMCS.Read(vmx.GuestRIP))
	}
	return nil
}
