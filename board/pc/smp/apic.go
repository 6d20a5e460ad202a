package smp

import "github.com/tamahv/tamahv/vmx"

// The local APIC's numbers (vmx/apic.go), short names for the board.
const (
	msrAPICBase    = vmx.MSRAPICBase
	apicBaseX2APIC = vmx.APICBaseX2APIC
	apicBaseEnable = vmx.APICBaseEnable
	apicBaseAddr   = vmx.APICBaseAddr
	msrX2APICICR   = vmx.MSRX2APICICR
	lapicICRLow    = vmx.APICICRLow
	lapicICRHigh   = vmx.APICICRHigh
	icrINIT        = vmx.ICRDeliveryINIT
	icrStartUp     = vmx.ICRDeliveryStart
	icrNMI         = vmx.ICRDeliveryNMI
	icrAssert      = vmx.ICRLevelAssert
	icrPending     = vmx.ICRPending
	cpuidX2APIC    = 1 << 21 // CPUID.1:ECX
)
