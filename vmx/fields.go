package vmx

// Field is the encoding of a VMCS field (SDM Vol. 3C, "Appendix B Field
// Encoding in VMCS").
type Field uint32

// 16-bit fields.
const (
	VPID      Field = 0x0000
	GuestES   Field = 0x0800
	GuestCS   Field = 0x0802
	GuestSS   Field = 0x0804
	GuestDS   Field = 0x0806
	GuestFS   Field = 0x0808
	GuestGS   Field = 0x080a
	GuestLDTR Field = 0x080c
	GuestTR   Field = 0x080e
	HostES    Field = 0x0c00
	HostCS    Field = 0x0c02
	HostSS    Field = 0x0c04
	HostDS    Field = 0x0c06
	HostFS    Field = 0x0c08
	HostGS    Field = 0x0c0a
	HostTR    Field = 0x0c0c
)

// 64-bit fields.
const (
	IOBitmapA        Field = 0x2000
	IOBitmapB        Field = 0x2002
	MSRBitmap        Field = 0x2004
	ExitMSRStoreAddr Field = 0x2006
	ExitMSRLoadAddr  Field = 0x2008
	EntryMSRLoadAddr Field = 0x200a
	TSCOffset        Field = 0x2010
	EPTPointer       Field = 0x201a
	GuestPhysAddr    Field = 0x2400
	VMCSLinkPointer  Field = 0x2800
	GuestDebugCtl    Field = 0x2802
	GuestPAT         Field = 0x2804
	GuestEFER        Field = 0x2806
	GuestPerfGlobal  Field = 0x2808 // guest IA32_PERF_GLOBAL_CTRL
	GuestPDPTE0      Field = 0x280a
	HostPAT          Field = 0x2c00
	HostEFER         Field = 0x2c02
	HostPerfGlobal   Field = 0x2c04 // host IA32_PERF_GLOBAL_CTRL
)

// 32-bit fields.
const (
	PinControls           Field = 0x4000
	ProcControls          Field = 0x4002
	ExceptionBitmap       Field = 0x4004
	PFErrorCodeMask       Field = 0x4006
	PFErrorCodeMatch      Field = 0x4008
	CR3TargetCount        Field = 0x400a
	ExitControls          Field = 0x400c
	ExitMSRStoreCount     Field = 0x400e
	ExitMSRLoadCount      Field = 0x4010
	EntryControls         Field = 0x4012
	EntryMSRLoadCount     Field = 0x4014
	EntryInterruptInfo    Field = 0x4016
	EntryExceptionError   Field = 0x4018
	EntryInstructionLen   Field = 0x401a
	TPRThreshold          Field = 0x401c
	Proc2Controls         Field = 0x401e
	InstructionError      Field = 0x4400
	ExitReasonField       Field = 0x4402
	ExitInterruptInfo     Field = 0x4404
	ExitInterruptError    Field = 0x4406
	IDTVectoringInfo      Field = 0x4408
	IDTVectoringError     Field = 0x440a
	ExitInstructionLen    Field = 0x440c
	ExitInstructionInfo   Field = 0x440e
	GuestESLimit          Field = 0x4800
	GuestCSLimit          Field = 0x4802
	GuestSSLimit          Field = 0x4804
	GuestDSLimit          Field = 0x4806
	GuestFSLimit          Field = 0x4808
	GuestGSLimit          Field = 0x480a
	GuestLDTRLimit        Field = 0x480c
	GuestTRLimit          Field = 0x480e
	GuestGDTRLimit        Field = 0x4810
	GuestIDTRLimit        Field = 0x4812
	GuestESAccess         Field = 0x4814
	GuestCSAccess         Field = 0x4816
	GuestSSAccess         Field = 0x4818
	GuestDSAccess         Field = 0x481a
	GuestFSAccess         Field = 0x481c
	GuestGSAccess         Field = 0x481e
	GuestLDTRAccess       Field = 0x4820
	GuestTRAccess         Field = 0x4822
	GuestInterruptibility Field = 0x4824
	GuestActivityState    Field = 0x4826
	GuestSysenterCS       Field = 0x482a
	PreemptionTimerValue  Field = 0x482e
	HostSysenterCS        Field = 0x4c00
)

// Natural-width fields.
const (
	CR0GuestHostMask  Field = 0x6000
	CR4GuestHostMask  Field = 0x6002
	CR0ReadShadow     Field = 0x6004
	CR4ReadShadow     Field = 0x6006
	ExitQualification Field = 0x6400
	GuestLinearAddr   Field = 0x640a
	GuestCR0          Field = 0x6800
	GuestCR3          Field = 0x6802
	GuestCR4          Field = 0x6804
	GuestESBase       Field = 0x6806
	GuestCSBase       Field = 0x6808
	GuestSSBase       Field = 0x680a
	GuestDSBase       Field = 0x680c
	GuestFSBase       Field = 0x680e
	GuestGSBase       Field = 0x6810
	GuestLDTRBase     Field = 0x6812
	GuestTRBase       Field = 0x6814
	GuestGDTRBase     Field = 0x6816
	GuestIDTRBase     Field = 0x6818
	GuestDR7          Field = 0x681a
	GuestRSP          Field = 0x681c
	GuestRIP          Field = 0x681e
	GuestRFLAGS       Field = 0x6820
	GuestPendingDebug Field = 0x6822
	GuestSysenterESP  Field = 0x6824
	GuestSysenterEIP  Field = 0x6826
	HostCR0           Field = 0x6c00
	HostCR3           Field = 0x6c02
	HostCR4           Field = 0x6c04
	HostFSBase        Field = 0x6c06
	HostGSBase        Field = 0x6c08
	HostTRBase        Field = 0x6c0a
	HostGDTRBase      Field = 0x6c0c
	HostIDTRBase      Field = 0x6c0e
	HostSysenterESP   Field = 0x6c10
	HostSysenterEIP   Field = 0x6c12
	HostRSP           Field = 0x6c14
	HostRIP           Field = 0x6c16
)

// Width is a field's width, from encoding bits 14:13.
type Width uint8

// Field widths.
const (
	Width16 Width = iota
	Width64
	Width32
	WidthNatural
)

// Width returns f's width.
func (f Field) Width() Width { return Width(f >> 13 & 3) }

// ReadOnly reports whether f is a read-only data field (type bits 11:10 =
// 1).
func (f Field) ReadOnly() bool { return f>>10&3 == 1 }

// Pin-based VM-execution controls (SDM Vol. 3C, "Pin-Based VM-Execution
// Controls").
const (
	PinExternalInterruptExiting = 1 << 0
	PinNMIExiting               = 1 << 3
	PinVirtualNMIs              = 1 << 5
	PinPreemptionTimer          = 1 << 6
)

// Primary processor-based VM-execution controls.
const (
	ProcInterruptWindow = 1 << 2
	ProcTSCOffsetting   = 1 << 3
	ProcHLTExiting      = 1 << 7
	ProcCR3LoadExiting  = 1 << 15
	ProcCR3StoreExiting = 1 << 16
	ProcNMIWindow       = 1 << 22
	ProcMovDRExiting    = 1 << 23
	ProcUseIOBitmaps    = 1 << 25
	ProcMonitorTrapFlag = 1 << 27
	ProcUseMSRBitmaps   = 1 << 28
)

// Secondary processor-based VM-execution controls.
const (
	Proc2RDTSCP       = 1 << 3
	Proc2INVPCID      = 1 << 12
	Proc2ENCLSExiting = 1 << 15
	Proc2XSAVES       = 1 << 20
	Proc2PTGuestPA    = 1 << 24 // Intel PT uses guest physical addresses
	Proc2UserWait     = 1 << 26 // enable user wait and pause (WAITPKG)
	Proc2PCONFIG      = 1 << 27
	Proc2ENCLV        = 1 << 28
)

// VM-exit controls.
const (
	ExitSaveDebug          = 1 << 2
	ExitHostAddrSpaceSize  = 1 << 9
	ExitLoadPerfGlobal     = 1 << 12
	ExitAckInterrupt       = 1 << 15
	ExitSavePAT            = 1 << 18
	ExitLoadPAT            = 1 << 19
	ExitSaveEFER           = 1 << 20
	ExitLoadEFER           = 1 << 21
	ExitSavePreemptionTime = 1 << 22
	ExitClearRTITCtl       = 1 << 25
)

// VM-entry controls.
const (
	EntryLoadDebug = 1 << 2
	EntryIA32eMode = 1 << 9
	EntryLoadPerf  = 1 << 13 // load IA32_PERF_GLOBAL_CTRL
	EntryLoadPAT   = 1 << 14
	EntryLoadEFER  = 1 << 15
)
