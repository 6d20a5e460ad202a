package vmx

//go:generate stringer -type=ExitReason -trimprefix=Exit

// ExitReason is the basic exit reason, bits 15:0 of the exit-reason field
// (SDM Vol. 3C, "Appendix C VMX Basic Exit Reasons").
type ExitReason uint16

// Basic exit reasons.
const (
	ExitExceptionOrNMI    ExitReason = 0
	ExitExternalInterrupt ExitReason = 1
	ExitTripleFault       ExitReason = 2
	ExitINIT              ExitReason = 3
	ExitSIPI              ExitReason = 4
	ExitIOSMI             ExitReason = 5
	ExitOtherSMI          ExitReason = 6
	ExitInterruptWindow   ExitReason = 7
	ExitNMIWindow         ExitReason = 8
	ExitTaskSwitch        ExitReason = 9
	ExitCPUID             ExitReason = 10
	ExitGETSEC            ExitReason = 11
	ExitHLT               ExitReason = 12
	ExitINVD              ExitReason = 13
	ExitINVLPG            ExitReason = 14
	ExitRDPMC             ExitReason = 15
	ExitRDTSC             ExitReason = 16
	ExitRSM               ExitReason = 17
	ExitVMCALL            ExitReason = 18
	ExitVMCLEAR           ExitReason = 19
	ExitVMLAUNCH          ExitReason = 20
	ExitVMPTRLD           ExitReason = 21
	ExitVMPTRST           ExitReason = 22
	ExitVMREAD            ExitReason = 23
	ExitVMRESUME          ExitReason = 24
	ExitVMWRITE           ExitReason = 25
	ExitVMXOFF            ExitReason = 26
	ExitVMXON             ExitReason = 27
	ExitCRAccess          ExitReason = 28
	ExitMovDR             ExitReason = 29
	ExitIO                ExitReason = 30
	ExitRDMSR             ExitReason = 31
	ExitWRMSR             ExitReason = 32
	ExitInvalidGuestState ExitReason = 33
	ExitMSRLoading        ExitReason = 34
	ExitMWAIT             ExitReason = 36
	ExitMonitorTrapFlag   ExitReason = 37
	ExitMONITOR           ExitReason = 39
	ExitPAUSE             ExitReason = 40
	ExitMachineCheck      ExitReason = 41
	ExitTPRBelowThreshold ExitReason = 43
	ExitAPICAccess        ExitReason = 44
	ExitVirtualizedEOI    ExitReason = 45
	ExitGDTRIDTRAccess    ExitReason = 46
	ExitLDTRTRAccess      ExitReason = 47
	ExitEPTViolation      ExitReason = 48
	ExitEPTMisconfig      ExitReason = 49
	ExitINVEPT            ExitReason = 50
	ExitRDTSCP            ExitReason = 51
	ExitPreemptionTimer   ExitReason = 52
	ExitINVVPID           ExitReason = 53
	ExitWBINVD            ExitReason = 54
	ExitXSETBV            ExitReason = 55
	ExitAPICWrite         ExitReason = 56
	ExitRDRAND            ExitReason = 57
	ExitINVPCID           ExitReason = 58
	ExitVMFUNC            ExitReason = 59
	ExitENCLS             ExitReason = 60
	ExitRDSEED            ExitReason = 61
	ExitPMLFull           ExitReason = 62
	ExitXSAVES            ExitReason = 63
	ExitXRSTORS           ExitReason = 64
	ExitSPP               ExitReason = 66
	ExitUMWAIT            ExitReason = 67
	ExitTPAUSE            ExitReason = 68
	ExitLOADIWKEY         ExitReason = 69
	// NumExitReasons bounds the basic exit reasons this package names.
	NumExitReasons = 70
)

// Exit is the exit-reason field decoded.
type Exit struct {
	Reason     ExitReason
	EntryFail  bool // bit 31: VM entry failed
	FromRoot   bool // bit 29: exit from VMX root operation
	Enclave    bool // bit 27
	PendingMTF bool // bit 28

	// The exit's state, read from the VMCS once, when the exit is taken,
	// for every handler to share (SDM Vol. 3C, 28.2, "Recording VM-Exit
	// Information"). Fields an exit reason does not record are zero.
	RIP           uint64 // guest RIP: the exiting instruction
	Qualification uint64 // exit qualification
	GuestPA       uint64 // guest-physical address (EPT violation, misconfiguration)
	// IDTVectoring is the IDT-vectoring information: an event whose
	// delivery the exit interrupted.
	IDTVectoring uint32
	// Interruption and InterruptionError describe the exception or NMI
	// that caused the exit (reason ExitExceptionOrNMI).
	Interruption, InterruptionError uint32
}

// DecodeExit splits the 32-bit exit-reason field.
func DecodeExit(v uint32) Exit {
	return Exit{
		Reason:     ExitReason(v),
		EntryFail:  v&(1<<31) != 0,
		FromRoot:   v&(1<<29) != 0,
		Enclave:    v&(1<<27) != 0,
		PendingMTF: v&(1<<28) != 0,
	}
}

// Plain reports whether r is the exit of an instruction that records no
// exit qualification and is never taken during event delivery: for it the
// processor clears the exit-qualification field and the valid bit of the
// IDT-vectoring information (SDM Vol. 3C, 28.2.1 "Basic VM-Exit
// Information": for the exits its table does not list, "the field is
// cleared"; "Information for VM Exits During Event Delivery"). The run
// loop does not read those fields for these exits.
func (r ExitReason) Plain() bool {
	switch r {
	case ExitCPUID, ExitVMCALL, ExitRDMSR, ExitWRMSR, ExitXSETBV, ExitINVD, ExitWBINVD,
		ExitHLT, ExitRDTSC, ExitRDTSCP, ExitRDPMC:
		return true
	}
	return false
}

// Valid reports whether r is one of the reasons named here; a handler table
// indexed by reason must check it first.
func (r ExitReason) Valid() bool {
	switch r {
	case 35, 38, 42, 65: // unused numbers
		return false
	}
	return r < NumExitReasons
}
