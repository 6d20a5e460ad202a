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
// Protocol"). The VMX-preemption timer causes no exit in the
// wait-for-SIPI state: a waiting AP exits only for its start-up IPI.
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
// state, waiting for a start-up IPI.
func apINIT(v *VCPU, _ *vmx.Exit, _ Handler) (Action, error) {
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
