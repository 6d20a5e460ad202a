package vmx

// Instruction-encoding numbers an instruction decoder needs.

// Legacy prefixes (SDM Vol. 2A, 2.1.1, "Instruction Prefixes").
const (
	PrefixLock   = 0xf0 // group 1: LOCK
	PrefixOpSize = 0x66 // group 3: operand-size override
	// Group 2: segment overrides; ES, CS, SS and DS have base 0 in 64-bit
	// mode (SDM Vol. 3A, 3.4.4, "Segment Loading Instructions in IA-32e
	// Mode").
	PrefixES = 0x26
	PrefixCS = 0x2e
	PrefixSS = 0x36
	PrefixDS = 0x3e
	PrefixFS = 0x64
	PrefixGS = 0x65
)

// The REX prefix, 0100WRXB (SDM Vol. 2A, 2.2.1, "REX Prefixes", Table
// 2-4).
const (
	REXMask = 0xf0
	REXBase = 0x40
	REXW    = 0x8 // 64-bit operand size
	REXR    = 0x4 // extends ModR/M.reg
	REXX    = 0x2 // extends SIB.index
	REXB    = 0x1 // extends ModR/M.rm or SIB.base
)

// ModR/M and SIB special values (SDM Vol. 2A, 2.1.5, Tables 2-2 and 2-3;
// in 64-bit mode 2.2.1.6, "RIP-Relative Addressing", and Table 2-5,
// "Special Cases of REX Encodings": R12 and R13 as a base take these
// forms too).
const (
	ModRMReg     = 3 // mod: a register, no memory operand
	ModRMSIB     = 4 // rm (mod ≠ 3): a SIB byte follows
	ModRMDisp32  = 5 // rm with mod 0: RIP + disp32 in 64-bit mode
	SIBNoIndex   = 4 // index (REX.X clear): no index
	SIBNoBase    = 5 // base with mod 0: no base, disp32
	OpcodeEscape = 0x0f
)
