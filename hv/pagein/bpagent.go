package pagein

import (
	"errors"
	"fmt"

	"golang.org/x/arch/x86/x86asm"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// The breakpoint agent raises swapmem's page faults from inside the guest
// kernel (swapmem.BPFault), at a point where a fault is safe to take: in
// Linux's C-level system-call dispatcher, right after the call that
// re-enables interrupts on entry from user mode.
//
// It finds that point by decoding the guest kernel from IA32_LSTAR
// (entry_SYSCALL_64) to its first direct call (do_syscall_64), and that
// function to its first direct call (syscall_enter_from_user_mode); the
// detour is the instruction after it, an instruction boundary x86asm
// found. Arming writes int3 over the detour's first byte. When the guest
// reaches it (#BP exit) in the address space the fault is for, the byte is
// put back and the #PF injected in its place: the guest's fault handler
// brings the page in and returns to the detour, which now runs its own
// instruction. Hit in another address space, the byte is put back all the
// same and the int3 rewritten at a later exit.
//
// With a Shadow page and EPT that allows execute-only pages, the int3
// never enters guest memory: the detour's page is shown to instruction
// fetches as an execute-only copy carrying the int3, and to reads and
// writes as the original (read/write, not executable); an EPT violation
// switches between the two. Should one instruction both run from and read
// its own page the views would chase each other; after a streak of
// switches the agent writes the int3 in place instead.
//
// Several vCPUs share one agent, as they share the EPT and guest memory:
// the int3 (or the split view) is there for all of them, and the fault is
// raised on whichever vCPU passes the detour in the address space armed,
// which is where the process runs. Install the agent on each vCPU
// (InstallVCPU, with that vCPU's PFDelivery). What follows one vCPU from
// an exit to its next is its own: the streak of view switches (one
// instruction chasing the views is one vCPU's), and whether it stands at
// the detour to run the original instruction after its int3 passed (the
// int3 is written back only once no vCPU does). An int3 another vCPU ran
// before this one's exit took it out is recognised at the detour and the
// instruction run again.
//
// The guest's page tables say where the detour is, so the agent trusts
// none of it: the code is read and the int3 written through GuestPhys,
// the detour's page must be guest RAM mapped one to one (never tamahv's
// region, the sink or MMIO), and every Arm checks it again. While armed
// the agent owns the page's EPT entry; a watched page table cannot be
// its page, nor its page be watched.
type BreakpointAgent struct {
	// Phys is guest RAM: the agent reads the guest's code, writes the
	// int3 and shows its views only through it, and claims the detour's
	// page there for as long as it is armed.
	Phys   *guestmem.GuestPhys
	Walker *guestmem.Walker
	// LSTAR reads the guest's IA32_LSTAR on vCPU v's processor (the MSR
	// is not switched on VM exit, so the host reads the guest's value).
	// A kernel may give each processor its own SYSCALL entry: the detour
	// is found from the LSTAR of the vCPU that arms the agent.
	LSTAR func(v *hv.VCPU) uint64
	// Shadow (a spare 4 KiB page of tamahv's at host-physical ShadowPA)
	// gives the split view, which needs execute-only EPT pages; with
	// Shadow nil the int3 is written in place.
	Shadow   *[4096]byte
	ShadowPA uint64
	// Spaces names the guest's address spaces: the int3 raises the fault
	// when the address space at the detour (the kernel CR3 of a
	// user/kernel pair) is the one armed (nil: page-table bases compared
	// exactly).
	Spaces *guestmem.AddressSpaces
	// Delivery follows the raised #PF to the guest (nil: not followed).
	Delivery *PFDelivery

	split    bool // the current arming uses the split view
	noSplit  bool // the split view was given up
	view     int  // viewShadow or viewOriginal while split
	stepping int  // vCPUs that must run the detour's own instruction

	addr, pa  uint64 // the detour (0: not found yet)
	lstar     uint64 // the IA32_LSTAR the detour was found from
	orig      byte
	installed bool
	want      bool
	cr3, va   uint64

	// Counters. Late counts int3s run by a vCPU after another vCPU's
	// exit had taken them out (each runs its instruction again).
	Hits, Raised, Passed, Switches, Late uint64
	// Dropped counts arms whose page was no longer backed at the hit (the
	// address space was another process's by then): no fault raised.
	Dropped uint64
}

// agentCPU is one vCPU's part of the agent.
type agentCPU struct {
	streak   int  // EPT violations of the split view in a row
	stepping bool // at the detour, to run its own instruction once
}

// step marks c as having to run the detour's own instruction before the
// int3 may be written back.
func (a *BreakpointAgent) step(c *agentCPU) {
	if !c.stepping {
		c.stepping = true
		a.stepping++
	}
}

const (
	viewShadow   = 1
	viewOriginal = 2
	maxStreak    = 32
)

// Detour limits: how far the decoder follows the code.
const (
	maxDecode = 128
	endbr64   = 0xfa1e0ff3 // F3 0F 1E FA, little endian
)

// int3 is INT3's one-byte opcode, the breakpoint the agent writes (SDM
// Vol. 2A, "INT n/INTO/INT3/INT1").
const int3 = 0xcc

// ErrNoDetour is returned when the kernel's code does not have the
// expected shape.
var ErrNoDetour = errors.New("pagein: no detour point found in the guest kernel")

// FindDetour decodes the kernel from lstar and returns the address of the
// instruction after do_syscall_64's first direct call. read reads guest
// kernel memory by virtual address.
func FindDetour(read func(va uint64, p []byte) error, lstar uint64) (uint64, error) {
	call, _, err := firstCall(read, lstar)
	if err != nil {
		return 0, fmt.Errorf("%w: in the SYSCALL entry at %#x: %w", ErrNoDetour, lstar, err)
	}
	_, after, err := firstCall(read, call)
	if err != nil {
		return 0, fmt.Errorf("%w: in the dispatcher at %#x: %w", ErrNoDetour, call, err)
	}
	return after, nil
}

// firstCall decodes from pc, following unconditional direct jumps, up to
// the first direct CALL; it returns the call's target and the address of
// the instruction after it.
func firstCall(read func(va uint64, p []byte) error, pc uint64) (target, after uint64, err error) {
	var buf [16]byte
	for i := 0; i < maxDecode; i++ {
		if err := read(pc, buf[:]); err != nil {
			return 0, 0, err
		}
		if uint32(buf[0])|uint32(buf[1])<<8|uint32(buf[2])<<16|uint32(buf[3])<<24 == endbr64 {
			pc += 4
			continue
		}
		inst, err := x86asm.Decode(buf[:], 64)
		if err != nil {
			return 0, 0, fmt.Errorf("undecodable instruction at %#x (% x): %v", pc, buf[:8], err)
		}
		next := pc + uint64(inst.Len)
		switch inst.Op {
		case x86asm.CALL:
			if rel, ok := inst.Args[0].(x86asm.Rel); ok {
				return next + uint64(int64(rel)), next, nil
			}
			return 0, 0, fmt.Errorf("indirect call at %#x", pc)
		case x86asm.JMP:
			if rel, ok := inst.Args[0].(x86asm.Rel); ok {
				pc = next + uint64(int64(rel))
				continue
			}
			return 0, 0, fmt.Errorf("indirect jump at %#x", pc)
		case x86asm.RET, x86asm.UD2, x86asm.SYSRET, x86asm.IRETQ:
			return 0, 0, fmt.Errorf("%v at %#x before any call", inst.Op, pc)
		}
		pc = next
	}
	return 0, 0, fmt.Errorf("no call within %d instructions", maxDecode)
}

// Detour is the guest-virtual address of the detour point (0 before the
// first Arm).
func (a *BreakpointAgent) Detour() uint64 { return a.addr }

// locate finds the detour from the SYSCALL entry lstar through the
// current address space. Its page must be guest RAM (GuestPhys.Check): the
// guest's page tables decide where it is, and they may point anywhere.
func (a *BreakpointAgent) locate(cr3, lstar uint64) error {
	read := func(va uint64, p []byte) error {
		for len(p) > 0 {
			tr, err := a.Walker.Translate(cr3, va)
			if err != nil {
				return err
			}
			if !tr.Present {
				return fmt.Errorf("kernel address %#x not present", va)
			}
			n := min(uint64(len(p)), 0x1000-va&0xfff)
			if err := a.Phys.ReadPhys(tr.PA, p[:n]); err != nil {
				return err
			}
			p, va = p[n:], va+n
		}
		return nil
	}
	addr, err := FindDetour(read, lstar)
	if err != nil {
		return err
	}
	pa, err := a.resolve(cr3, addr)
	if err != nil {
		return err
	}
	a.addr, a.pa, a.lstar = addr, pa, lstar
	return nil
}

// resolve translates the detour and checks that its page is guest RAM.
func (a *BreakpointAgent) resolve(cr3, addr uint64) (uint64, error) {
	tr, err := a.Walker.Translate(cr3, addr)
	if err != nil || !tr.Present {
		return 0, fmt.Errorf("%w: detour %#x not mapped", ErrNoDetour, addr)
	}
	if err := a.Phys.Check(tr.PA&^0xfff, 0x1000); err != nil {
		return 0, fmt.Errorf("%w: detour %#x at guest-physical %#x: %w", ErrNoDetour, addr, tr.PA, err)
	}
	return tr.PA, nil
}

// Arm, on vCPU v, makes the next time the guest passes the detour in
// address space cr3 (AddressSpaces.Of: the kernel PGD of a user/kernel
// pair, which maps the kernel text) raise a #PF for va. Each Arm checks
// the detour again: an IA32_LSTAR on v other than the one the detour was
// found from (changed, or another processor's) means finding it anew, and
// its page must still translate to the same guest RAM.
func (a *BreakpointAgent) Arm(v *hv.VCPU, cr3, va uint64) error {
	lstar := a.LSTAR(v)
	if a.addr == 0 || lstar != a.lstar {
		if err := a.remove(); err != nil {
			return err
		}
		a.addr = 0
		if err := a.locate(cr3, lstar); err != nil {
			return err
		}
	} else {
		pa, err := a.resolve(cr3, a.addr)
		if err != nil {
			return err
		}
		if pa != a.pa {
			if err := a.remove(); err != nil {
				return err
			}
			a.pa = pa
		}
	}
	a.want, a.cr3, a.va = true, cr3, va
	return a.install()
}

func (a *BreakpointAgent) install() error {
	if a.installed {
		return nil
	}
	pg := a.pa &^ 0xfff
	if err := a.Phys.Claim(pg); err != nil {
		return err
	}
	if a.Shadow != nil && !a.noSplit {
		if err := a.showShadow(); err != nil {
			_ = a.Phys.Release(pg)
			a.Phys.Flush()
			return err
		}
		a.split, a.installed = true, true
		return nil
	}
	var b [1]byte
	err := a.Phys.ReadPhys(a.pa, b[:])
	if err == nil {
		err = a.Phys.WritePhys(a.pa, []byte{int3})
	}
	if err != nil {
		_ = a.Phys.Release(pg)
		a.Phys.Flush()
		return err
	}
	a.orig, a.installed = b[0], true
	return nil
}

func (a *BreakpointAgent) remove() error {
	if !a.installed {
		return nil
	}
	a.installed = false
	if a.split {
		a.split, a.view = false, 0
	} else {
		// The byte goes back unless the guest rewrote it meanwhile
		// (text_poke, static keys).
		var b [1]byte
		if err := a.Phys.ReadPhys(a.pa, b[:]); err != nil {
			return err
		}
		if b[0] == int3 {
			if err := a.Phys.WritePhys(a.pa, []byte{a.orig}); err != nil {
				return err
			}
		}
	}
	err := a.Phys.Release(a.pa &^ 0xfff)
	a.Phys.Flush()
	return err
}

func (a *BreakpointAgent) retarget(hpa uint64, p ept.Perm) error {
	if err := a.Phys.View(a.pa&^0xfff, hpa, p); err != nil {
		return err
	}
	a.Phys.Flush()
	return nil
}

// showShadow refreshes the shadow from the page (the guest may have
// written it) with the int3 at the detour, and shows it to fetches only.
func (a *BreakpointAgent) showShadow() error {
	if err := a.Phys.ReadPhys(a.pa&^0xfff, a.Shadow[:]); err != nil {
		return err
	}
	a.Shadow[a.pa&0xfff] = int3
	a.view = viewShadow
	return a.retarget(a.ShadowPA, ept.Exec)
}

// onViolation switches the split view: fetches get the shadow, reads and
// writes the original.
func (a *BreakpointAgent) onViolation(c *agentCPU, v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
	gpa := e.GuestPA
	if !a.split || gpa&^0xfff != a.pa&^0xfff {
		return next(v, e)
	}
	a.Switches++
	if c.streak++; c.streak > maxStreak {
		// The views chase each other: write the int3 in place.
		a.noSplit = true
		if err := a.remove(); err != nil {
			return hv.Stop, err
		}
		if a.want {
			return hv.Resume, a.install()
		}
		return hv.Resume, nil
	}
	q := ept.DecodeViolation(e.Qualification)
	if q.Fetch {
		return hv.Resume, a.showShadow()
	}
	a.view = viewOriginal
	return hv.Resume, a.retarget(a.pa&^0xfff, ept.Read|ept.Write)
}

// Disarm takes the int3 out of the guest.
func (a *BreakpointAgent) Disarm() error {
	a.want = false
	return a.remove()
}

// Install makes a intercept v's #BP exits (the exception bitmap must have
// #BP) and the EPT violations of its split view, and re-arm at later exits
// (an observer). Other exits go on to the handling installed before. The
// faults it raises on v are followed by a.Delivery.
func (a *BreakpointAgent) Install(v *hv.VCPU) error { return a.InstallVCPU(v, a.Delivery) }

// InstallVCPU is Install for one of several vCPUs that share the agent:
// the faults it raises on v are followed by d, v's own PFDelivery.
func (a *BreakpointAgent) InstallVCPU(v *hv.VCPU, d *PFDelivery) error {
	c := &agentCPU{}
	err := v.Intercept(vmx.ExitExceptionOrNMI, func(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
		ev, ok := vmx.DecodeEvent(e.Interruption, 0)
		if !ok || ev.Vector != vmx.VectorBP || a.addr == 0 || e.RIP != a.addr {
			return next(v, e)
		}
		if !a.installed {
			// Another vCPU's exit took the int3 out after this vCPU
			// ran it: run the instruction again, unless the guest's
			// own int3 is at the detour.
			var b [1]byte
			if a.Phys.ReadPhys(a.pa, b[:]) != nil || b[0] == int3 {
				return next(v, e)
			}
			a.Late++
			if a.want {
				a.step(c)
			}
			return hv.Resume, nil
		}
		a.Hits++
		if err := a.remove(); err != nil {
			return hv.Stop, err
		}
		if a.Spaces.Of(v.VMCS.Read(vmx.GuestCR3)) != a.cr3 {
			a.Passed++ // another address space: rewritten at a later exit
			a.step(c)
			return hv.Resume, nil
		}
		// The page must still want the fault here: a process that exited
		// with its read armed may have left its page-table root to
		// another, where va is not backed and a #PF from the system-call
		// path would oops the kernel. Such an arm is dropped.
		if tr, err := a.Walker.Translate(v.VMCS.Read(vmx.GuestCR3)&guestmem.CR3Mask, a.va); err == nil && !tr.Present && !tr.Backed {
			a.want = false
			a.Dropped++
			return hv.Resume, nil
		}
		code := uint32(0)
		if a.va < vmx.UserTop(a.Walker.LA57) {
			code = swapmem.PFErrUser // a user address: the fault is taken as a user access
		}
		if v.Inject(vmx.Exception(vmx.VectorPF, code, 0)) != nil {
			a.Passed++ // the event queue is full: rewritten at a later exit
			a.step(c)
			return hv.Resume, nil
		}
		a.want = false
		a.Raised++
		v.Regs.CR2 = a.va
		d.queued(a.va)
		return hv.Resume, nil
	})
	if err != nil {
		return err
	}
	// The next exit ends a step over the detour, or a streak of
	// violations of the split view.
	v.NeedExit(func(*hv.VCPU) bool { return c.stepping || c.streak != 0 })
	v.Observe(func(v *hv.VCPU, e *vmx.Exit) {
		if e.Reason != vmx.ExitEPTViolation {
			c.streak = 0
		}
		if c.stepping && e.RIP != a.addr {
			c.stepping = false
			a.stepping--
		}
		if a.want && !a.installed && a.stepping == 0 && e.RIP != a.addr {
			_ = a.install()
		}
	})
	return v.Intercept(vmx.ExitEPTViolation, func(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
		return a.onViolation(c, v, e, next)
	})
}
