package vmx

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestValidXCR0(t *testing.T) {
	const all = 0x602ff // x87 through Hi16_ZMM, PKRU, AMX
	for _, c := range []struct {
		v    uint64
		ok   bool
		what string
	}{
		{0x1, true, "x87 only"},
		{0x3, true, "x87, SSE"},
		{0x7, true, "x87, SSE, AVX"},
		{0xe7, true, "AVX-512"},
		{0x1f, true, "MPX"},
		{0x60003, true, "AMX"},
		{all, true, "everything"},
		{0x2, false, "x87 clear"},
		{0x5, false, "AVX without SSE"},
		{0x27, false, "opmask without ZMM_Hi256 and Hi16_ZMM"},
		{0x67, false, "XCR0[7:5] = 011b"},
		{0xe3, false, "AVX-512 without AVX"},
		{0xf, false, "BNDREGS without BNDCSR"},
		{0x17, false, "BNDCSR without BNDREGS"},
		{0x20003, false, "XTILECFG without XTILEDATA"},
		{0x40003, false, "XTILEDATA without XTILECFG"},
		{0x100003, false, "unsupported bit"},
	} {
		assert.Equal(t, c.ok, ValidXCR0(c.v, all), "%s (%#x)", c.what, c.v)
	}
	assert.False(t, ValidXCR0(0x7, 0x3), "AVX unsupported")
}
