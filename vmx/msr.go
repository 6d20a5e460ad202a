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

// MSRBitmapLowEnd is the last of the low MSRs an MSR bitmap covers (SDM
// Vol. 3C, 24.6.9, "MSR-Bitmap Address"): their reads at byte 0, their
// writes 2048 bytes later.
const MSRBitmapLowEnd = 0x1fff

// Model-specific registers (SDM Vol. 4, "Architectural MSRs").
const (
	MSRTSC               = 0x010 // IA32_TIME_STAMP_COUNTER
	MSRAPICBase          = 0x01b // IA32_APIC_BASE
	MSRFeatureControl    = 0x03a // IA32_FEATURE_CONTROL
	MSRTSCAdjust         = 0x03b // IA32_TSC_ADJUST
	MSRBIOSUpdateTrigger = 0x079 // IA32_BIOS_UPDT_TRIG
	MSRSMMMonitorCtl     = 0x09b // IA32_SMM_MONITOR_CTL
	MSRSMBase            = 0x09e // IA32_SMBASE
	MSRMTRRCap           = 0x0fe // IA32_MTRRCAP
	MSRMiscEnable        = 0x1a0 // IA32_MISC_ENABLE
	MSRSMRRPhysBase      = 0x1f2 // IA32_SMRR_PHYSBASE
	MSRSMRRPhysMask      = 0x1f3 // IA32_SMRR_PHYSMASK
	MSRMTRRPhysBase0     = 0x200 // IA32_MTRR_PHYSBASE0; 0x200-0x21f: ten base/mask pairs and more
	MSRMTRRPhysLast      = 0x21f
	MSRMTRRFix64K        = 0x250 // IA32_MTRR_FIX64K_00000
	MSRMTRRFix16K80000   = 0x258 // IA32_MTRR_FIX16K_80000
	MSRMTRRFix16KA0000   = 0x259 // IA32_MTRR_FIX16K_A0000
	MSRMTRRFix4KFirst    = 0x268 // IA32_MTRR_FIX4K_C0000
	MSRMTRRFix4KLast     = 0x26f // IA32_MTRR_FIX4K_F8000
	MSRPAT               = 0x277 // IA32_PAT
	MSRMTRRDefType       = 0x2ff // IA32_MTRR_DEF_TYPE
	MSRPerfCapabilities  = 0x345 // IA32_PERF_CAPABILITIES
	MSRPerfGlobalCtrl    = 0x38f // IA32_PERF_GLOBAL_CTRL
	MSRPEBSEnable        = 0x3f1 // IA32_PEBS_ENABLE
	MSRRTITOutputBase    = 0x560 // IA32_RTIT_OUTPUT_BASE
	MSRRTITOutputMask    = 0x561 // IA32_RTIT_OUTPUT_MASK_PTRS
	MSRRTITCtl           = 0x570 // IA32_RTIT_CTL
	MSRRTITStatus        = 0x571 // IA32_RTIT_STATUS
	MSRRTITCR3Match      = 0x572 // IA32_RTIT_CR3_MATCH
	MSRRTITAddr0A        = 0x580 // IA32_RTIT_ADDR0_A; up to ADDR3_B at 0x587
	MSRRTITAddr3B        = 0x587
	MSRDSArea            = 0x600      // IA32_DS_AREA
	MSRTMEActivate       = 0x982      // IA32_TME_ACTIVATE
	MSREFER              = 0xc0000080 // IA32_EFER
	MSRLSTAR             = 0xc0000082 // IA32_LSTAR: the SYSCALL entry point
	MSRFSBase            = 0xc0000100 // IA32_FS_BASE
	MSRGSBase            = 0xc0000101 // IA32_GS_BASE
	MSRDebugInterface    = 0xc80      // IA32_DEBUG_INTERFACE (silicon debug, DCI)
	MSRVMXBasic          = 0x480      // IA32_VMX_BASIC
	MSRPinbasedCtls      = 0x481      // IA32_VMX_PINBASED_CTLS
	MSRProcbasedCtls     = 0x482      // IA32_VMX_PROCBASED_CTLS
	MSRExitCtls          = 0x483      // IA32_VMX_EXIT_CTLS
	MSREntryCtls         = 0x484      // IA32_VMX_ENTRY_CTLS
	MSRMisc              = 0x485      // IA32_VMX_MISC
	MSRCR0Fixed0         = 0x486      // IA32_VMX_CR0_FIXED0
	MSRCR0Fixed1         = 0x487      // IA32_VMX_CR0_FIXED1
	MSRCR4Fixed0         = 0x488      // IA32_VMX_CR4_FIXED0
	MSRCR4Fixed1         = 0x489      // IA32_VMX_CR4_FIXED1
	MSRVMCSEnum          = 0x48a      // IA32_VMX_VMCS_ENUM
	MSRProcbasedCtls2    = 0x48b      // IA32_VMX_PROCBASED_CTLS2
	MSREPTVPIDCap        = 0x48c      // IA32_VMX_EPT_VPID_CAP
	MSRTruePinbasedCtls  = 0x48d      // IA32_VMX_TRUE_PINBASED_CTLS
	MSRTrueProcbasedCtls = 0x48e      // IA32_VMX_TRUE_PROCBASED_CTLS
	MSRTrueExitCtls      = 0x48f      // IA32_VMX_TRUE_EXIT_CTLS
	MSRTrueEntryCtls     = 0x490      // IA32_VMX_TRUE_ENTRY_CTLS
	MSRVMFunc            = 0x491      // IA32_VMX_VMFUNC
)

// IA32_APIC_BASE bits (SDM Vol. 3A, "Local APIC Status and Location").
const (
	APICBaseBSP    = 1 << 8
	APICBaseX2APIC = 1 << 10
	APICBaseEnable = 1 << 11
	APICBaseAddr   = 0xffff_ffff_f000 // bits MAXPHYADDR-1:12
)

// PerfCapPerfMetrics is IA32_PERF_CAPABILITIES bit 15: IA32_PERF_GLOBAL_CTRL
// bit 48 enables the topdown metrics (SDM Vol. 3B, "Performance Monitoring").
const PerfCapPerfMetrics = 1 << 15

// PerfGlobalMetrics is IA32_PERF_GLOBAL_CTRL's bit for the metrics.
const PerfGlobalMetrics = 1 << 48

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
