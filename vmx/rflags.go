package vmx

// RFLAGS bits (SDM Vol. 1, 3.4.3, "EFLAGS Register"; Vol. 3A, 2.3,
// "System Flags and Fields in the EFLAGS Register"). The guest's RFLAGS
// is the VMCS field GuestRFLAGS.
const (
	RFLAGSCF = 1 << 0  // carry
	RFLAGSPF = 1 << 2  // parity (of the result's low byte)
	RFLAGSAF = 1 << 4  // auxiliary carry (out of bit 3)
	RFLAGSZF = 1 << 6  // zero
	RFLAGSSF = 1 << 7  // sign
	RFLAGSTF = 1 << 8  // trap: single-step
	RFLAGSIF = 1 << 9  // interrupt enable
	RFLAGSDF = 1 << 10 // direction
	RFLAGSOF = 1 << 11 // overflow
	RFLAGSAC = 1 << 18 // alignment check / SMAP override

	// RFLAGSFixed is bit 1, which always reads as 1: RFLAGS's value at
	// reset and INIT.
	RFLAGSFixed = 1 << 1

	// RFLAGSArith are the status flags an arithmetic instruction sets.
	RFLAGSArith = RFLAGSCF | RFLAGSPF | RFLAGSAF | RFLAGSZF | RFLAGSSF | RFLAGSOF
)

// More architecture bits an instruction emulator checks.
const (
	// CR4SMAP is supervisor-mode access prevention (SDM Vol. 3A, 4.6,
	// "Access Rights").
	CR4SMAP = 1 << 21
	// CR4PKE and CR4PKS enable protection keys for user-mode and
	// supervisor-mode pages (SDM Vol. 3A, 4.6.2, "Protection Keys").
	CR4PKE = 1 << 22
	CR4PKS = 1 << 24
	// EFERNXE enables the execute-disable bit of paging entries.
	EFERNXE = 1 << 11
	// DR7Enable are DR7's local and global enables of the four
	// breakpoints, L0 G0 ... L3 G3 (SDM Vol. 3B, 18.2.4, "Debug Control
	// Register (DR7)").
	DR7Enable = 0xff
	// SegmentDPLShift places the DPL in a segment's access rights.
	SegmentDPLShift = 5
)

// Paging-entry flags set by the processor (SDM Vol. 3A, 4.8, "Accessed and
// Dirty Flags"): every entry used by a translation is accessed, and the
// leaf of a write is dirty.
const (
	PTEAccessed = 1 << 5
	PTEDirty    = 1 << 6
)

// MaxInstructionLen is the longest x86 instruction (SDM Vol. 2A, 2.3.11,
// "AVX Instruction Length"): longer ones raise #GP.
const MaxInstructionLen = 15

// Values of registers at reset and INIT (SDM Vol. 3A, Table 10-1).
const (
	// DR7Reset is DR7 with only its reserved bit 10 set.
	DR7Reset = 0x400
	// PATReset is IA32_PAT's power-up value: WB, WT, UC-, UC twice.
	PATReset = 0x0007040600070406
)
