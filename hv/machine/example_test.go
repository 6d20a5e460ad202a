package machine_test

import (
	"fmt"
	"os"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// A firmware author's own policy on tamahv's machine: a hypercall of its
// own that also places an event for the guest, an intercept of CPUID, an
// exit observer, and a swapmem read that tamahv starts itself. Only
// exported names of hv, hv/machine and swapmem are used.
// The board here is a scripted fake; in an image it is the PC's (see
// cmd/tamahv).
func Example() {
	b := newBoard(nil)
	b.vmcs = newVMCS()
	kernel := bzImage()
	_ = b.WritePhys(0x100_0000, kernel)
	cfg := exampleConfig(uint64(len(kernel)))
	cfg.Log = nil // tamahv's own lines are not part of the example's output
	m, err := machine.New(b, cfg)
	if err != nil {
		fmt.Println(err)
		return
	}

	// A hypercall of the firmware's own, for the guest kernel only; it
	// also hands the guest an NMI at the coming entry.
	const hcDouble = 0x100
	_ = m.Monitor.Add(hcDouble, false, func(v *hv.VCPU, a1, _, _ uint64) (uint64, bool) {
		if err := v.Place(vmx.Event{Type: vmx.EventNMI, Vector: vmx.VectorNMI}); err != nil {
			fmt.Println(err)
		}
		return 2 * a1, false
	})

	// A CPUID leaf of the firmware's own, answered in front of tamahv's
	// CPUID policy; every other leaf is passed on.
	const leaf = 0x4000_0100
	_ = m.VCPU.Intercept(vmx.ExitCPUID, func(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
		if uint32(v.Regs.RAX) != leaf {
			return next(v, e)
		}
		v.Regs.RAX, v.Regs.RBX, v.Regs.RCX, v.Regs.RDX = 0, 0x21776d66, 0, 0 // "fmw!"
		return hv.Next, nil
	})

	// An observer of every exit: count the guest's CPUIDs.
	cpuids := 0
	m.VCPU.Observe(func(_ *hv.VCPU, e *vmx.Exit) {
		if e.Reason == vmx.ExitCPUID {
			cpuids++
		}
	})

	// A read of the guest's memory that tamahv starts itself, the first
	// time the guest process runs a CPUID: its data page is swapped out,
	// so the engine has the guest fault it in.
	started := false
	m.VCPU.Observe(func(v *hv.VCPU, e *vmx.Exit) {
		if e.Reason != vmx.ExitCPUID || v.CPL() != 3 || started {
			return
		}
		started = true
		_, err := m.Engine.ReadData(swapmem.Request{
			CR3: m.Spaces.Of(v.VMCS.Read(vmx.GuestCR3)), VA: dataVA, Len: 8, Options: swapmem.UserFault,
			Done: func(r swapmem.Read) { fmt.Printf("tamahv read %q from the process\n", r.Data) },
		})
		if err != nil {
			fmt.Println(err)
		}
	})

	b.mapProcess([]byte("swapped!"))
	b.script = []step{
		{exit: func(b *board, r *vmx.GuestRegs) { b.run(0); r.RAX = leaf; b.exitWith(vmx.ExitCPUID) }},
		{check: func(b *board, r *vmx.GuestRegs) {
			fmt.Printf("the firmware's leaf: %q\n", string([]byte{byte(r.RBX), byte(r.RBX >> 8), byte(r.RBX >> 16), byte(r.RBX >> 24)}))
		},
			exit: func(b *board, r *vmx.GuestRegs) { b.run(3); r.RAX = 0; b.exitWith(vmx.ExitCPUID) }},
		{exit: func(b *board, r *vmx.GuestRegs) { b.pagerWrite() }},
		{check: func(b *board, r *vmx.GuestRegs) { b.pagerDone() },
			exit: func(b *board, r *vmx.GuestRegs) { b.run(0); r.RAX, r.RDI = hcDouble, 21; b.exitWith(vmx.ExitVMCALL) }},
		{check: func(b *board, r *vmx.GuestRegs) {
			ev, _ := vmx.DecodeEvent(uint32(b.vmcs.Fields[vmx.EntryInterruptInfo]), 0)
			fmt.Printf("the guest kernel got %d, and an NMI: %v\n", r.RAX, ev.Type == vmx.EventNMI)
		},
			exit: func(b *board, r *vmx.GuestRegs) { r.RAX, r.RDI = hcall.Exit, 0; b.exitWith(vmx.ExitVMCALL) }},
	}
	if err := m.Run(); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	fmt.Printf("%d CPUID exits\n", cpuids)
	// Output:
	// the firmware's leaf: "fmw!"
	// tamahv read "swapped!" from the process
	// the guest kernel got 42, and an NMI: true
	// 2 CPUID exits
}
