package vmx

// The local APIC (SDM Vol. 3A, "Advanced Programmable Interrupt Controller
// (APIC)"; IA32_APIC_BASE and its bits are in msr.go): the register
// offsets tamahv uses in xAPIC mode, the x2APIC's interrupt command
// register MSR, and the interrupt command register's fields ("Interrupt
// Command Register (ICR)").
const (
	MSRX2APICICR = 0x830

	APICICRLow  = 0x300
	APICICRHigh = 0x310

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
)
