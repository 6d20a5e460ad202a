package vmx

// XCR0 state-component bits (SDM Vol. 1, "Enabling the XSAVE Feature Set
// and XSAVE-Enabled Features").
const (
	XCR0X87      = 1 << 0
	XCR0SSE      = 1 << 1
	XCR0AVX      = 1 << 2
	XCR0BNDREGS  = 1 << 3
	XCR0BNDCSR   = 1 << 4
	XCR0Opmask   = 1 << 5
	XCR0ZMMHi256 = 1 << 6
	XCR0Hi16ZMM  = 1 << 7
	XCR0PKRU     = 1 << 9
	XCR0TileCfg  = 1 << 17
	XCR0TileData = 1 << 18

	xcr0AVX512 = XCR0Opmask | XCR0ZMMHi256 | XCR0Hi16ZMM
	xcr0MPX    = XCR0BNDREGS | XCR0BNDCSR
	xcr0AMX    = XCR0TileCfg | XCR0TileData
)

// ValidXCR0 reports whether XSETBV accepts v for XCR0 on a processor whose
// user state components are supported (CPUID.(EAX=0DH,ECX=0):EDX:EAX).
// These are the SDM's #GP(0) conditions for XSETBV (Vol. 2D, "XSETBV"):
// x87 clear, a bit the processor does not support, AVX without SSE,
// AVX-512 state without AVX or not all three of XCR0[7:5], BNDREGS without
// BNDCSR or the reverse, and XTILECFG without XTILEDATA or the reverse.
func ValidXCR0(v, supported uint64) bool {
	switch {
	case v&XCR0X87 == 0,
		v&^(supported|XCR0X87) != 0,
		v&XCR0AVX != 0 && v&XCR0SSE == 0,
		v&xcr0AVX512 != 0 && (v&xcr0AVX512 != xcr0AVX512 || v&(XCR0SSE|XCR0AVX) != XCR0SSE|XCR0AVX),
		v&xcr0MPX != 0 && v&xcr0MPX != xcr0MPX,
		v&xcr0AMX != 0 && v&xcr0AMX != xcr0AMX:
		return false
	}
	return true
}
