package vmx

// Bits of IA-32e paging-structure entries (SDM Vol. 3A, 4.5, "4-Level
// Paging and 5-Level Paging", Tables 4-15 to 4-20).
const (
	PTEPresent  = 1 << 0
	PTEWritable = 1 << 1
	PTEUser     = 1 << 2
	// PTEPageSize in a PDPTE or PDE maps a 1 GiB or 2 MiB page.
	PTEPageSize = 1 << 7
	// PTELargePAT is the PAT bit of a 1 GiB or 2 MiB page (bit 7 in a
	// 4 KiB PTE).
	PTELargePAT = 1 << 12
	// PTEExecuteDisable is XD: reserved when IA32_EFER.NXE is clear.
	PTEExecuteDisable = 1 << 63
	// PTEAddress is the physical-address field of an entry.
	PTEAddress = 0x000f_ffff_ffff_f000
)

// UserTop is the end of the lower canonical half of linear addresses,
// where user space lives: bit 47 (4-level paging) or bit 56 (5-level,
// la57) and above are the upper, kernel half (SDM Vol. 3A, 3.3.7.1,
// "Canonical Addressing").
func UserTop(la57 bool) uint64 {
	if la57 {
		return 1 << 56
	}
	return 1 << 47
}
