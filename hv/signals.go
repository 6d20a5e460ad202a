package hv

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/vmx"
)

// Run's results when the guest ends itself in a way tamahv does not carry
// on from.
var (
	// ErrGuestINIT: the guest sent itself an INIT (through its local
	// APIC). The vCPU is in its INIT state; the bootstrap processor would
	// go on at the reset vector, in firmware the guest does not have.
	ErrGuestINIT = errors.New("hv: guest INIT: the vCPU was reset; the guest has no firmware to restart it, so it is stopped")
	// ErrGuestTaskSwitch: the guest switched tasks (CALL, JMP or IRET to
	// a TSS, or a task gate, in 32-bit protected mode), which tamahv does
	// not emulate; the guest is shut down as on a triple fault.
	ErrGuestTaskSwitch = errors.New("hv: guest task switch, not emulated: the guest is shut down")
)

// handleINIT puts the vCPU in the state an INIT leaves the processor in
// (SDM Vol. 3A, "Processor State After Reset", the INIT column) and ends
// the run. An INIT exits unconditionally in VMX non-root operation (SDM
// Vol. 3C, "Other Causes of VM Exits"). The bootstrap processor then
// starts at the reset vector, 0xfffffff0 (an application processor would
// wait for a SIPI); with one vCPU, this is the bootstrap processor and the
// guest has no firmware there: tamahv reports the guest reset and stops
// it, as a machine whose firmware is gone would stop.
func handleINIT(v *VCPU, e *vmx.Exit) (Action, error) {
	rip := e.RIP
	v.initState()
	v.logf("tamahv: guest INIT at RIP %#x: vCPU reset, guest stopped\n", rip)
	return v.Stopped(ErrGuestINIT)
}

// initState writes the INIT state: real-address mode at F000:FFF0 with
// CS base 0xffff0000, caches as they were, paging, IA-32e mode and events
// off. x87, SSE and the MSRs other than EFER keep their values, as INIT
// keeps them.
func (v *VCPU) initState() {
	w := v.VMCS.Write
	v.writeGuestState(guestState{
		cr0: v.guestCR0()&(vmx.CR0CD|vmx.CR0NW) | vmx.CR0ET, rip: 0xfff0,
		cs:   segment{sel: 0xf000, base: 0xffff0000, limit: 0xffff, access: vmx.AccessCode16},
		data: segment{limit: 0xffff, access: vmx.AccessData16},
		ldtr: segment{limit: 0xffff, access: vmx.AccessLDT},
		tr:   segment{limit: 0xffff, access: vmx.AccessTSSBusy32},
		gdt:  [2]uint64{0, 0xffff},
		idt:  [2]uint64{0, 0xffff},
	})
	w(vmx.GuestEFER, 0)
	w(vmx.EntryControls, v.VMCS.Read(vmx.EntryControls)&^vmx.EntryIA32eMode)
	w(vmx.EntryInterruptInfo, 0)
	var edx uint64
	if v.CPUID != nil {
		a, _, _, _ := v.CPUID(1, 0)
		edx = uint64(a) // the processor's signature
	}
	v.Regs = vmx.GuestRegs{RDX: edx}
	v.DropEvents()
}

// handleSIPI starts a vCPU that waits for a SIPI at the vector's page in
// real-address mode (SDM Vol. 3C, "Activity State"); a SIPI exits only in
// the wait-for-SIPI state, which this single bootstrap vCPU never enters,
// so in practice it is ignored, as the processor ignores a SIPI outside
// that state.
func handleSIPI(v *VCPU, e *vmx.Exit) (Action, error) {
	// The vCPU waits where tamahv put it in wait-for-SIPI (MakeAP, INIT)
	// and has not been started since; the activity state the exit saved
	// is not relied on (some implementations save it as active).
	if !v.sipiWait && v.VMCS.Read(vmx.GuestActivityState) != vmx.ActivityWaitForSIPI {
		return Resume, nil
	}
	v.sipiWait = false
	v.startAt(e.Qualification & 0xff)
	return Resume, nil
}

// startAt starts the vCPU in real-address mode at vector×4096 with every
// other register in its INIT state, whatever the last exit saved of the
// waiting processor's state: what a start-up IPI does.
func (v *VCPU) startAt(vec uint64) {
	v.initState()
	v.VMCS.Write(vmx.GuestCS, vec<<8)
	v.VMCS.Write(vmx.GuestCSBase, vec<<12)
	v.VMCS.Write(vmx.GuestRIP, 0)
	v.VMCS.Write(vmx.GuestActivityState, vmx.ActivityActive)
}

// handleTaskSwitch shuts the guest down. A task switch exits
// unconditionally (SDM Vol. 3C, "Instructions That Cause VM Exits
// Unconditionally"); it happens only in 32-bit protected mode (in IA-32e
// mode the processor raises #GP itself), which the 64-bit Linux tamahv
// runs never uses once booted. Emulating it means the whole TSS save and
// load of SDM Vol. 3A "Task Switching"; tamahv stops the guest instead,
// with a line that says why, as the processor stops on a shutdown.
func handleTaskSwitch(v *VCPU, e *vmx.Exit) (Action, error) {
	ts := vmx.DecodeTaskSwitch(e.Qualification)
	rip := e.RIP
	v.logf("tamahv: guest task switch to TSS %#x by %v at RIP %#x: not emulated, guest shut down\n", ts.Selector, ts.Source, rip)
	return v.Stopped(fmt.Errorf("%w (TSS %#x by %v at RIP %#x)", ErrGuestTaskSwitch, ts.Selector, ts.Source, rip))
}
