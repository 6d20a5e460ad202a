package vmx

// More control-register, EFER and segment bits (SDM Vol. 3A, "Control
// Registers", "IA32_EFER"; Vol. 3C, "Guest Register State").
const (
	CR0MP = 1 << 1
	CR0EM = 1 << 2
	CR0TS = 1 << 3
	CR0ET = 1 << 4
	CR0WP = 1 << 16
	CR0AM = 1 << 18
	CR0NW = 1 << 29
	CR0CD = 1 << 30
	// CR0Defined are the CR0 bits that exist; writes to the others in
	// bits 31:0 are ignored, in bits 63:32 they #GP.
	CR0Defined = CR0PE | CR0MP | CR0EM | CR0TS | CR0ET | CR0NE | CR0WP | CR0AM | CR0NW | CR0CD | CR0PG

	CR4PSE    = 1 << 4
	CR4PAE    = 1 << 5
	CR4PGE    = 1 << 7
	CR4LA57   = 1 << 12
	CR4PCIDE  = 1 << 17
	CR4OSXSAV = 1 << 18
	CR4SMEP   = 1 << 20
	CR4CET    = 1 << 23

	EFERLME = 1 << 8
	EFERLMA = 1 << 10

	// Segment access rights as the VMCS holds them (SDM Vol. 3C, 24.4.1,
	// "Guest Register State"): flat 32-bit code (P, S, execute/read
	// accessed, D, G) and data (P, S, read/write accessed, D/B, G), a busy
	// 32-bit TSS, and an unusable segment.
	AccessCode32    = 0xc09b
	AccessData32    = 0xc093
	AccessTSSBusy32 = 0x008b
	AccessUnusable  = 0x10000
	// AccessCode16, AccessData16 and AccessLDT are the rights after INIT
	// (SDM Vol. 3A, Table 10-1, "IA-32 and Intel 64 Processor States
	// Following Power-up, Reset, or INIT"): present, accessed, 16-bit;
	// TR is then AccessTSSBusy32's type.
	AccessCode16 = 0x9b
	AccessData16 = 0x93
	AccessLDT    = 0x82

	// SegmentL is the L (64-bit code) bit of a segment's access rights.
	SegmentL = 1 << 13
	// SegmentTypeMask is the type field of a segment's access rights.
	SegmentTypeMask = 0xf
	// TSSBusy64 is the type of a busy 64-bit TSS.
	TSSBusy64 = 11
)

// PDPTEReserved returns the bits of a PAE page-directory-pointer-table
// entry that must be zero when it is present (SDM Vol. 3A, "PAE Paging",
// "Use of CR3 with PAE Paging"): bits 2:1, 8:5 and maxPhys to 63.
func PDPTEReserved(maxPhys uint) uint64 {
	if maxPhys == 0 || maxPhys > 52 {
		maxPhys = 52
	}
	return 0x1e6 | ^uint64(0)<<maxPhys
}

// GuestPDPTE returns the VMCS field of PDPTE i (0-3); the four are
// consecutive 64-bit fields from GuestPDPTE0.
func GuestPDPTE(i int) Field { return GuestPDPTE0 + Field(2*i) }
