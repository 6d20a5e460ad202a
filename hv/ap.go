package hv

import (
	"errors"

	"github.com/tamahv/tamahv/vmx"
)

// ErrNoWaitForSIPI is returned by MakeAP where VM entry cannot leave a
// guest in the wait-for-SIPI activity state.
var ErrNoWaitForSIPI = errors.New("hv: the processor has no wait-for-SIPI activity state for its guests (IA32_VMX_MISC bit 8)")

// MakeAP makes v an application processor of the guest, as firmware
// leaves one after its own INIT: v's next entry puts it in its INIT state
// in the wait-for-SIPI activity state (SDM Vol. 3C, "Guest Non-Register
// State"), where it runs nothing until the guest sends it a start-up IPI
// through its local APIC. The start-up IPI then exits (handleSIPI starts
// v in real mode at vector×4096), and an INIT that reaches v later exits
// too and puts it back in wait-for-SIPI instead of stopping the guest, as
// INIT does to an application processor (SDM Vol. 3A, "MP Initialization
// Protocol"). The VMX-preemption timer counts in the wait-for-SIPI state,
// so a waiting AP still exits once a period.
func (v *VCPU) MakeAP() error {
	if v.Caps == nil || !v.Caps.WaitForSIPI() {
		return ErrNoWaitForSIPI
	}
	if err := v.Intercept(vmx.ExitINIT, apINIT); err != nil {
		return err
	}
	v.waitForSIPI()
	return v.VMCS.Err()
}

// apINIT is an application processor's answer to INIT: back to its INIT
// state, waiting for a start-up IPI. An INIT that exits before the vCPU
// ran anything after its start-up IPI (the next exit, at the vector's
// first instruction) is the INIT the guest sent before that IPI, held
// while the vCPU waited (Bochs holds INIT in wait-for-SIPI): it would
// undo the start, and the guest's second start-up IPI may have come while
// the exit was being handled, in VMX root operation, where it is lost.
// It is dropped, as it is on a processor that waits for SIPI; so are the
// INITs right after it (Bochs delivers the de-assert as another INIT).
func apINIT(v *VCPU, e *vmx.Exit, _ Handler) (Action, error) {
	if v.nrecent == v.sipiAt+1 && e.RIP == 0 {
		// The start again: the state this exit saved need not be
		// valid for an entry (Bochs saves the waiting processor's).
		v.startAt(v.sipiVector)
		v.sipiAt = v.nrecent // and an INIT after it (its de-assert)
		return Resume, nil
	}
	v.waitForSIPI()
	return Resume, nil
}

// waitForSIPI writes the INIT state and the wait-for-SIPI activity state.
func (v *VCPU) waitForSIPI() {
	v.initState()
	v.VMCS.Write(vmx.GuestActivityState, vmx.ActivityWaitForSIPI)
	v.sipiWait = true
}

// WaitsForSIPI reports whether the vCPU waits for a start-up IPI: put in
// the wait-for-SIPI state (MakeAP, INIT) and not started since.
func (v *VCPU) WaitsForSIPI() bool { return v.sipiWait }

// ReceiveINIT puts an application processor's vCPU in its INIT state,
// waiting for a start-up IPI, as an INIT does (tamahv virtualizes the
// guest's INIT IPIs: hv/machine). Call it before an entry.
func (v *VCPU) ReceiveINIT() { v.waitForSIPI() }
