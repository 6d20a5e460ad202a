package vmx

// CPUIDReg is one of the four registers CPUID returns.
type CPUIDReg uint8

// CPUID output registers.
const (
	EAX CPUIDReg = iota
	EBX
	ECX
	EDX
)

// CPUIDBit is one CPUID feature flag (SDM Vol. 2A, "CPUID").
type CPUIDBit struct {
	Leaf, Subleaf uint32
	Reg           CPUIDReg
	Bit           uint8
	Name          string
}

// Mask is the flag's bit in its register.
func (b CPUIDBit) Mask() uint32 { return 1 << b.Bit }

// In reports whether the flag belongs to leaf/subleaf.
func (b CPUIDBit) In(leaf, subleaf uint32) bool { return b.Leaf == leaf && b.Subleaf == subleaf }

// CPUID feature flags tamahv hides or checks.
var (
	CPUIDDTES64  = CPUIDBit{1, 0, ECX, 2, "DTES64"}
	CPUIDDSCPL   = CPUIDBit{1, 0, ECX, 4, "DS-CPL"}
	CPUIDPDCM    = CPUIDBit{1, 0, ECX, 15, "PDCM"}
	CPUIDX2APIC  = CPUIDBit{1, 0, ECX, 21, "x2APIC"}
	CPUIDDS      = CPUIDBit{1, 0, EDX, 21, "DS"}
	CPUIDTSCAdj  = CPUIDBit{7, 0, EBX, 1, "TSC_ADJUST"}
	CPUIDSGX     = CPUIDBit{7, 0, EBX, 2, "SGX"}
	CPUIDINVPCID = CPUIDBit{7, 0, EBX, 10, "INVPCID"}
	CPUIDPT      = CPUIDBit{7, 0, EBX, 25, "Intel PT"}
	CPUIDWAITPKG = CPUIDBit{7, 0, ECX, 5, "WAITPKG"}
	CPUIDRDPID   = CPUIDBit{7, 0, ECX, 22, "RDPID"}
	CPUIDSGXLC   = CPUIDBit{7, 0, ECX, 30, "SGX_LC"}
	CPUIDPCONFIG = CPUIDBit{7, 0, EDX, 18, "PCONFIG"}
	CPUIDXSAVES  = CPUIDBit{0xd, 1, EAX, 3, "XSAVES/XRSTORS"}
	CPUIDRDTSCP  = CPUIDBit{0x80000001, 0, EDX, 27, "RDTSCP"}
)

// Gate is a secondary processor-based control without which the
// instructions of a CPUID feature raise #UD in VMX non-root operation (SDM
// Vol. 3C, "Secondary Processor-Based VM-Execution Controls", and each
// instruction's "VMX non-root" exceptions).
type Gate struct {
	Control uint32
	Feature CPUIDBit
}

// Proc2Gates lists every such pair. A hypervisor that leaves Control 0
// must hide Feature, or the guest's first use of it faults.
func Proc2Gates() [6]Gate {
	return [...]Gate{
		{Proc2RDTSCP, CPUIDRDTSCP},
		{Proc2RDTSCP, CPUIDRDPID}, // RDPID reads IA32_TSC_AUX: #UD without "enable RDTSCP"
		{Proc2INVPCID, CPUIDINVPCID},
		{Proc2XSAVES, CPUIDXSAVES},
		{Proc2UserWait, CPUIDWAITPKG}, // TPAUSE, UMONITOR, UMWAIT
		{Proc2PCONFIG, CPUIDPCONFIG},
	}
}

// CPUID leaves and bits tamahv answers itself (SDM Vol. 2A, "CPUID").
const (
	// CPUIDLeafHypervisor is the first leaf of the range CPUID leaves to
	// hypervisors (0x40000000).
	CPUIDLeafHypervisor = 0x40000000
	// CPUIDLeafPMU is the architectural performance-monitoring leaf.
	CPUIDLeafPMU = 0xa
	// CPUIDLeafTSC is the time-stamp counter and core crystal clock leaf
	// (0x15): TSC = crystal (ECX, Hz; 0: not enumerated) × EBX / EAX.
	CPUIDLeafTSC = 0x15
	// CPUIDLeafFrequency is the processor frequency leaf (0x16): EAX the
	// base frequency in MHz.
	CPUIDLeafFrequency = 0x16
	// CPUIDHypervisorBit is leaf 1 ECX bit 31: running under a hypervisor.
	CPUIDHypervisorBit = 1 << 31
	// CPUIDOSXSAVEBit is leaf 1 ECX bit 27: CR4.OSXSAVE is set.
	CPUIDOSXSAVEBit = 1 << 27
	// CPUIDOSPKEBit is leaf 7 (subleaf 0) ECX bit 4: CR4.PKE is set.
	CPUIDOSPKEBit = 1 << 4
)
