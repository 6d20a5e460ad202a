package pc

// Local APIC (SDM Vol. 3A, "Advanced Programmable Interrupt Controller
// (APIC)"): IA32_APIC_BASE, the interrupt command register in xAPIC and
// x2APIC mode, and the INIT and start-up delivery modes.
const (
	msrAPICBase    = 0x1b
	apicBaseX2APIC = 1 << 10
	apicBaseAddr   = 0xf_ffff_f000
	msrX2APICICR   = 0x830
	lapicICRLow    = 0x300
	lapicICRHigh   = 0x310
	icrINIT        = 5 << 8
	icrStartUp     = 6 << 8
	icrNMI         = 4 << 8
	apicBaseEnable = 1 << 11
	icrAssert      = 1 << 14
	icrPending     = 1 << 12
	cpuidX2APIC    = 1 << 21 // CPUID.1:ECX
)
