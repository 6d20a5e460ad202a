// Package vmx holds the VT-x architecture: capability MSRs and the
// allowed-0/allowed-1 arithmetic on VMX controls, CR0/CR4 fixed bits, and
// the VMX instructions (VMXON, VMCLEAR, VMPTRLD, VMREAD, VMWRITE, VMLAUNCH,
// VMRESUME, VMXOFF, VMCALL, INVEPT, INVVPID) encoded as bytes in assembly.
//
// Numbers come from the Intel 64 and IA-32 Architectures Software
// Developer's Manual (SDM), Vol. 3C "Appendix A VMX Capability Reporting
// Facility" and Vol. 4 "Model-Specific Registers", revision 084 (June
// 2024). Everything here except the instructions is pure Go and runs on any
// host.
package vmx

// Model-specific registers (SDM Vol. 4, "Architectural MSRs").
const (
	MSRFeatureControl    = 0x03a // IA32_FEATURE_CONTROL
	MSRVMXBasic          = 0x480 // IA32_VMX_BASIC
	MSRPinbasedCtls      = 0x481 // IA32_VMX_PINBASED_CTLS
	MSRProcbasedCtls     = 0x482 // IA32_VMX_PROCBASED_CTLS
	MSRExitCtls          = 0x483 // IA32_VMX_EXIT_CTLS
	MSREntryCtls         = 0x484 // IA32_VMX_ENTRY_CTLS
	MSRMisc              = 0x485 // IA32_VMX_MISC
	MSRCR0Fixed0         = 0x486 // IA32_VMX_CR0_FIXED0
	MSRCR0Fixed1         = 0x487 // IA32_VMX_CR0_FIXED1
	MSRCR4Fixed0         = 0x488 // IA32_VMX_CR4_FIXED0
	MSRCR4Fixed1         = 0x489 // IA32_VMX_CR4_FIXED1
	MSRVMCSEnum          = 0x48a // IA32_VMX_VMCS_ENUM
	MSRProcbasedCtls2    = 0x48b // IA32_VMX_PROCBASED_CTLS2
	MSREPTVPIDCap        = 0x48c // IA32_VMX_EPT_VPID_CAP
	MSRTruePinbasedCtls  = 0x48d // IA32_VMX_TRUE_PINBASED_CTLS
	MSRTrueProcbasedCtls = 0x48e // IA32_VMX_TRUE_PROCBASED_CTLS
	MSRTrueExitCtls      = 0x48f // IA32_VMX_TRUE_EXIT_CTLS
	MSRTrueEntryCtls     = 0x490 // IA32_VMX_TRUE_ENTRY_CTLS
	MSRVMFunc            = 0x491 // IA32_VMX_VMFUNC
)

// IA32_FEATURE_CONTROL bits (SDM Vol. 3C, "Enabling and Entering VMX
// Operation").
const (
	FeatureControlLock        = 1 << 0
	FeatureControlVMXInSMX    = 1 << 1
	FeatureControlVMXOutsideS = 1 << 2
)

// Control-register bits that VMX operation cares about (SDM Vol. 3A,
// "Control Registers").
const (
	CR0PE   = 1 << 0
	CR0NE   = 1 << 5
	CR0PG   = 1 << 31
	CR4VMXE = 1 << 13
)

// CPUIDVMX is CPUID.1:ECX bit 5, "VMX".
const CPUIDVMX = 1 << 5
