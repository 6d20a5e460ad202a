package vmx

// The local APIC (SDM Vol. 3A, "Advanced Programmable Interrupt Controller
// (APIC)"; IA32_APIC_BASE and its bits are in msr.go): the register
// offsets tamahv uses in xAPIC mode, the x2APIC's MSRs, and the interrupt
// command register's fields ("Interrupt Command Register (ICR)").
const (
	MSRX2APICID  = 0x802 // the x2APIC ID register (read-only)
	MSRX2APICICR = 0x830 // the interrupt command register in x2APIC mode

	APICICRLow  = 0x300
	APICICRHigh = 0x310

	// APICRegisterAlign is the alignment of every xAPIC register: each
	// is the first 32 bits of a 16-byte slot, whose other 12 bytes are
	// reserved ("Local APIC Register Address Map").
	APICRegisterAlign = 16

	ICRDeliveryMode   = 7 << 8
	ICRDeliveryNMI    = 4 << 8
	ICRDeliveryINIT   = 5 << 8
	ICRDeliveryStart  = 6 << 8 // start-up IPI
	ICRLogical        = 1 << 11
	ICRPending        = 1 << 12 // delivery status: send pending
	ICRLevelAssert    = 1 << 14
	ICRLevelTriggered = 1 << 15
	ICRShorthand      = 3 << 18
	ICRSelf           = 1 << 18
	ICRAllIncSelf     = 2 << 18
	ICRAllExclSelf    = 3 << 18

	// ICRDestShift is the xAPIC destination field's place in ICR high
	// (bits 63:56 of the ICR).
	ICRDestShift = 24
	// APICBroadcast is the xAPIC destination that reaches every
	// processor, physical or logical; X2APICBroadcast the x2APIC's.
	APICBroadcast   = 0xff
	X2APICBroadcast = 0xffff_ffff

	// X2APICICRReserved are the bits of the x2APIC ICR's low half that
	// WRMSR must leave 0 (13, 17:16, 31:20: "ICR Operation in x2APIC
	// Mode"); a write that sets one raises #GP. Bit 12 (delivery status)
	// is ignored on writes.
	X2APICICRReserved = 0xfff3_2000
)

// X2APICLogicalID is the logical ID an x2APIC derives from its x2APIC ID
// ("Logical Destination Mode in x2APIC Mode"): the cluster (ID bits 19:4)
// in bits 31:16 and one bit for the processor (ID bits 3:0) in bits 15:0.
// A logical destination reaches a processor when their clusters are the
// same and they share a bit.
func X2APICLogicalID(x2apicID uint32) uint32 {
	return x2apicID>>4<<16 | 1<<(x2apicID&0xf)
}

// Processor topology (SDM Vol. 2A, CPUID, "Extended Topology Enumeration
// Leaf"; Vol. 3A, "Hierarchical Mapping of Shared Resources").
const (
	// CPUIDLeafTopology is the extended topology leaf (0BH): for each
	// subleaf, EAX[4:0] the APIC ID bits below the next level, EBX[15:0]
	// the logical processors at this level, ECX[15:8] the level's type (0:
	// no more levels), EDX the x2APIC ID.
	CPUIDLeafTopology = 0xb
	// CPUIDLeaf1LogicalShift and CPUIDLeaf1LogicalMask give CPUID.1:EBX
	// bits 23:16, the largest number of logical processor IDs in the
	// package, valid where HTT (CPUIDHTT) is set.
	CPUIDLeaf1LogicalShift = 16
	CPUIDLeaf1LogicalMask  = 0xff
)

// CPUIDHTT is CPUID.1:EDX bit 28: CPUID.1:EBX[23:16] counts the package's
// logical processor IDs (clear: the package has one logical processor).
var CPUIDHTT = CPUIDBit{1, 0, EDX, 28, "HTT"}
