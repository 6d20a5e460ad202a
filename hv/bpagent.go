package hv

import (
	"errors"
	"fmt"

	"golang.org/x/arch/x86/x86asm"

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
// same and the int3 rewritten at a later exit. The int3 is in guest memory
// only while armed.
type BreakpointAgent struct {
	Mem    Memory
	Walker *Walker
	// LSTAR reads the guest's IA32_LSTAR (the MSR is not switched on VM
	// exit, so the host reads the guest's value).
	LSTAR func() uint64

	addr, pa  uint64 // the detour (0: not found yet)
	orig      byte
	installed bool
	want      bool
	cr3, va   uint64

	// Counters.
	Hits, Raised, Passed uint64
}

// Detour limits: how far the decoder follows the code.
const (
	maxDecode = 128
	endbr64   = 0xfa1e0ff3 // F3 0F 1E FA, little endian
)

// ErrNoDetour is returned when the kernel's code does not have the
// expected shape.
var ErrNoDetour = errors.New("hv: no detour point found in the guest kernel")

// FindDetour decodes the kernel from lstar and returns the address of the
// instruction after do_syscall_64's first direct call. read reads guest
// kernel memory by virtual address.
func FindDetour(read func(va uint64, p []byte) error, lstar uint64) (uint64, error) {
	call, _, err := firstCall(read, lstar)
	if err != nil {
		return 0, fmt.Errorf("%w: in the SYSCALL entry at %#x: %v", ErrNoDetour, lstar, err)
	}
	_, after, err := firstCall(read, call)
	if err != nil {
		return 0, fmt.Errorf("%w: in the dispatcher at %#x: %v", ErrNoDetour, call, err)
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

// locate finds the detour through the current address space.
func (a *BreakpointAgent) locate(cr3 uint64) error {
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
			if err := a.Mem.ReadPhys(tr.PA, p[:n]); err != nil {
				return err
			}
			p, va = p[n:], va+n
		}
		return nil
	}
	addr, err := FindDetour(read, a.LSTAR())
	if err != nil {
		return err
	}
	tr, err := a.Walker.Translate(cr3, addr)
	if err != nil || !tr.Present {
		return fmt.Errorf("%w: detour %#x not mapped", ErrNoDetour, addr)
	}
	a.addr, a.pa = addr, tr.PA
	return nil
}

// Arm makes the next time the guest passes the detour in address space cr3
// raise a #PF for va.
func (a *BreakpointAgent) Arm(cr3, va uint64) error {
	if a.addr == 0 {
		if err := a.locate(cr3); err != nil {
			return err
		}
	}
	a.want, a.cr3, a.va = true, cr3, va
	return a.install()
}

func (a *BreakpointAgent) install() error {
	if a.installed {
		return nil
	}
	var b [1]byte
	if err := a.Mem.ReadPhys(a.pa, b[:]); err != nil {
		return err
	}
	if err := a.Mem.WritePhys(a.pa, []byte{0xcc}); err != nil {
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
	return a.Mem.WritePhys(a.pa, []byte{a.orig})
}

// Disarm takes the int3 out of the guest.
func (a *BreakpointAgent) Disarm() error {
	a.want = false
	return a.remove()
}

// Install makes a handle v's #BP exits (the exception bitmap must have
// #BP) and re-arm at later exits. Other exceptions go to the handler that
// was there.
func (a *BreakpointAgent) Install(v *VCPU) {
	next := v.handlers[vmx.ExitExceptionOrNMI]
	v.handlers[vmx.ExitExceptionOrNMI] = func(v *VCPU, e vmx.Exit) (Action, error) {
		info := uint32(v.VMCS.Read(vmx.ExitInterruptInfo))
		ev, ok := vmx.DecodeEvent(info, 0)
		if !ok || ev.Vector != vmx.VectorBP || !a.installed || v.VMCS.Read(vmx.GuestRIP) != a.addr {
			return next(v, e)
		}
		a.Hits++
		if err := a.remove(); err != nil {
			return Stop, err
		}
		if v.VMCS.Read(vmx.GuestCR3)&CR3Mask != a.cr3 {
			a.Passed++ // another address space: rewritten at a later exit
			return Resume, nil
		}
		a.want = false
		a.Raised++
		code := uint32(0)
		if a.va < 1<<47 {
			code = 4 // a user address: the fault is taken as a user access
		}
		v.Regs.CR2 = a.va
		return Resume, v.Inject(vmx.Exception(vmx.VectorPF, code, 0))
	}
	prev := v.OnExit
	v.OnExit = func(v *VCPU) {
		if prev != nil {
			prev(v)
		}
		if a.want && !a.installed && v.VMCS.Read(vmx.GuestRIP) != a.addr {
			_ = a.install()
		}
	}
}
