package pagein

import (
	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
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
// One page is trapped at a time per slot: vCPUs that share the trap (and
// the EPT) arm their own slot each (ArmSlot, TrapCPU.Slot), so that two
// vCPUs' faults do not take each other's trap; Arm is slot 0's. A fetch
// from a trapped page by anything (the process's return, on whichever
// vCPU it runs, another process sharing the page) springs the trap: the
// page gets its permissions back and the instruction runs again. Install
// the trap on every vCPU. The trap yields to every other use of the page
// (GuestPhys.TrapFetch); a page trapped by one slot is not trapped again
// by another (the first trap serves both).
type ReturnTrap struct {
	// Phys owns the EPT permissions; Walker translates the guest's RIP.
	Phys   *guestmem.GuestPhys
	Walker *guestmem.Walker

	traps []fetchTrap // by slot

	// Arms counts traps set; Hits those the guest sprang.
	Arms, Hits uint64
}

// fetchTrap is one slot's trapped page.
type fetchTrap struct {
	page uint64 // guest-physical page trapped
	on   bool
}

// Slots makes room for n slots, so that arming allocates nothing.
func (r *ReturnTrap) Slots(n int) {
	for len(r.traps) < n {
		r.traps = append(r.traps, fetchTrap{})
	}
}

// Install intercepts v's EPT violations for fetches from the trapped page.
func (r *ReturnTrap) Install(v *hv.VCPU) error {
	return v.Intercept(vmx.ExitEPTViolation, r.onViolation)
}

// Arm traps the next fetch from the page of the user instruction at rip
// in the address space cr3, disarming slot 0's earlier trap.
func (r *ReturnTrap) Arm(cr3, rip uint64) { r.ArmSlot(0, cr3, rip) }

// ArmSlot is Arm for slot i (a vCPU's own): only slot i's earlier trap is
// disarmed.
func (r *ReturnTrap) ArmSlot(i int, cr3, rip uint64) {
	if i < 0 {
		return
	}
	r.Slots(i + 1)
	r.disarm(i)
	tr, err := r.Walker.Translate(cr3, rip)
	if err != nil || !tr.Present || !tr.User {
		return
	}
	pg := tr.PA &^ 0xfff
	if r.Phys.TrapFetch(pg) != nil {
		return
	}
	r.Phys.Flush()
	r.traps[i] = fetchTrap{page: pg, on: true}
	r.Arms++
}

// Disarm gives every trapped page its permissions back.
func (r *ReturnTrap) Disarm() {
	for i := range r.traps {
		r.disarm(i)
	}
}

// disarm gives slot i's trapped page its permissions back.
func (r *ReturnTrap) disarm(i int) {
	t := &r.traps[i]
	if !t.on {
		return
	}
	t.on = false
	_ = r.Phys.UntrapFetch(t.page)
	r.Phys.Flush()
}

func (r *ReturnTrap) onViolation(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
	if len(r.traps) != 0 && ept.DecodeViolation(e.Qualification).Fetch {
		pg := e.GuestPA &^ 0xfff
		for i := range r.traps {
			if t := &r.traps[i]; t.on && t.page == pg {
				r.disarm(i)
				r.Hits++
				return hv.Resume, nil
			}
		}
	}
	return next(v, e)
}

// TrapCPU is a swapmem.CPU that arms a ReturnTrap at every #PF it injects
// in user mode, so that the guest's return from the fault exits.
type TrapCPU struct {
	swapmem.CPU
	Trap *ReturnTrap
	V    *hv.VCPU
	// Slot is the trap's slot this vCPU arms (its number among the
	// vCPUs that share Trap).
	Slot int
}

// InjectPF injects the #PF and, at CPL 3, traps the return to the
// interrupted instruction.
func (c *TrapCPU) InjectPF(va uint64, errorCode uint32) error {
	if err := c.CPU.InjectPF(va, errorCode); err != nil {
		return err
	}
	if c.CPU.Ring() == 3 {
		c.Trap.ArmSlot(c.Slot, c.CPU.CR3(), c.V.VMCS.Read(vmx.GuestRIP))
	}
	return nil
}
