package vmx

import "fmt"

// RFLAGS bits that report a VMX instruction's outcome.
const (
	rflagsCF = 1 << 0
	rflagsZF = 1 << 6
)

// InsnError is a failed VMX instruction: VMfailInvalid (no current VMCS)
// or VMfailValid, whose number comes from the VM-instruction error field
// (SDM Vol. 3C, "VM Instruction Error Numbers").
type InsnError struct {
	Insn   string
	Valid  bool   // VMfailValid: Number holds the VM-instruction error
	Number uint64 // valid only with Valid
}

func (e *InsnError) Error() string {
	if !e.Valid {
		return fmt.Sprintf("vmx: %s: VMfailInvalid", e.Insn)
	}
	return fmt.Sprintf("vmx: %s: VMfailValid, error %d (%s)", e.Insn, e.Number, InsnErrorName(e.Number))
}

// check turns the RFLAGS after a VMX instruction into an error.
// readError reads the VM-instruction error field for VMfailValid.
func check(insn string, rflags uint64, readError func() uint64) error {
	switch {
	case rflags&rflagsCF != 0:
		return &InsnError{Insn: insn}
	case rflags&rflagsZF != 0:
		n := uint64(0)
		if readError != nil {
			n = readError()
		}
		return &InsnError{Insn: insn, Valid: true, Number: n}
	}
	return nil
}

var insnErrorNames = [...]string{
	1:  "VMCALL in VMX root operation",
	2:  "VMCLEAR with invalid physical address",
	3:  "VMCLEAR with VMXON pointer",
	4:  "VMLAUNCH with non-clear VMCS",
	5:  "VMRESUME with non-launched VMCS",
	6:  "VMRESUME after VMXOFF",
	7:  "VM entry with invalid control fields",
	8:  "VM entry with invalid host-state fields",
	9:  "VMPTRLD with invalid physical address",
	10: "VMPTRLD with VMXON pointer",
	11: "VMPTRLD with incorrect VMCS revision identifier",
	12: "VMREAD/VMWRITE from/to unsupported VMCS component",
	13: "VMWRITE to read-only VMCS component",
	15: "VMXON executed in VMX root operation",
	16: "VM entry with invalid executive-VMCS pointer",
	17: "VM entry with non-launched executive VMCS",
	18: "VM entry with executive-VMCS pointer not VMXON pointer",
	19: "VMCALL with non-clear VMCS",
	20: "VMCALL with invalid VM-exit control fields",
	22: "VMCALL with incorrect MSEG revision identifier",
	23: "VMXOFF under dual-monitor treatment of SMIs and SMM",
	24: "VMCALL with invalid SMM-monitor features",
	25: "VM entry with invalid VM-execution control fields in executive VMCS",
	26: "VM entry with events blocked by MOV SS",
	28: "Invalid operand to INVEPT/INVVPID",
}

// InsnErrorName names a VM-instruction error number (SDM Vol. 3C, "VM
// Instruction Error Numbers").
func InsnErrorName(n uint64) string {
	if n < uint64(len(insnErrorNames)) && insnErrorNames[n] != "" {
		return insnErrorNames[n]
	}
	return "unknown"
}

// Implemented in insn_amd64.s. They execute VMX instructions and so run
// only in ring 0 on a processor in the right VMX state.
func vmxon(pa *uint64) (rflags uint64)
func vmclear(pa *uint64) (rflags uint64)
func vmptrld(pa *uint64) (rflags uint64)
func vmread(field uint64) (value, rflags uint64)
func vmwrite(field, value uint64) (rflags uint64)
func vmxoff() (rflags uint64)
func vmcall(nr, a1, a2 uint64) (ret uint64)
func invept(typ uint64, desc *[2]uint64) (rflags uint64)
func invvpid(typ uint64, desc *[2]uint64) (rflags uint64)

// VMCSInstructionError is the encoding of the read-only VM-instruction error
// field (SDM Vol. 3C, "Appendix B.3.3 32-Bit Read-Only Data Fields").
const VMCSInstructionError = 0x4400

func readInsnError() uint64 {
	v, _ := vmread(VMCSInstructionError)
	return v
}

// VMXON enters VMX root operation with the VMXON region at physical
// address pa (prepared by Prepare).
func VMXON(pa uint64) error { return check("VMXON", vmxon(&pa), nil) }

// VMXOFF leaves VMX operation.
func VMXOFF() error { return check("VMXOFF", vmxoff(), readInsnError) }

// VMCLEAR initialises the VMCS at pa and makes it not current.
func VMCLEAR(pa uint64) error { return check("VMCLEAR", vmclear(&pa), readInsnError) }

// VMPTRLD makes the VMCS at pa current.
func VMPTRLD(pa uint64) error { return check("VMPTRLD", vmptrld(&pa), readInsnError) }

// VMREAD reads a field of the current VMCS.
func VMREAD(field uint32) (uint64, error) {
	v, fl := vmread(uint64(field))
	return v, check("VMREAD", fl, readInsnError)
}

// VMWRITE writes a field of the current VMCS.
func VMWRITE(field uint32, v uint64) error {
	return check("VMWRITE", vmwrite(uint64(field), v), readInsnError)
}

// Read executes VMREAD of field f of the current VMCS and reports whether
// it succeeded; Failure says why it did not. It is the exit path's read:
// the instruction and a flag, with no error value built.
func Read(f Field) (v uint64, ok bool)

// Read2 executes VMREAD of fields f1 and f2 in one call and reports
// whether both succeeded.
func Read2(f1, f2 Field) (v1, v2 uint64, ok bool)

// Write executes VMWRITE of v to field f of the current VMCS and reports
// whether it succeeded; Failure says why it did not.
func Write(f Field, v uint64) (ok bool)

// Failure is the error of the VMX instruction insn, executed last by Read
// or Write, which failed: VMfailValid with the VM-instruction error field
// while a VMCS is current, else VMfailInvalid.
func Failure(insn string) error {
	n, ok := Read(VMCSInstructionError)
	if !ok {
		return &InsnError{Insn: insn}
	}
	return &InsnError{Insn: insn, Valid: true, Number: n}
}

// VMCALL calls the hypervisor from a guest.
func VMCALL(nr, a1, a2 uint64) uint64 { return vmcall(nr, a1, a2) }

// INVEPT invalidation types (SDM Vol. 3C, "INVEPT").
const (
	InveptSingle = 1
	InveptAll    = 2
)

// INVEPT invalidates EPT-derived mappings: of the EPT pointer eptp
// (single-context) or all of them.
func INVEPT(typ uint64, eptp uint64) error {
	d := [2]uint64{eptp, 0}
	return check("INVEPT", invept(typ, &d), readInsnError)
}

// INVVPID invalidation types (SDM Vol. 3C, "INVVPID").
const (
	InvvpidAddress = 0
	InvvpidSingle  = 1
	InvvpidAll     = 2
)

// INVVPID invalidates mappings tagged with vpid (for one linear address
// with InvvpidAddress).
func INVVPID(typ uint64, vpid uint16, addr uint64) error {
	d := [2]uint64{uint64(vpid), addr}
	return check("INVVPID", invvpid(typ, &d), readInsnError)
}
