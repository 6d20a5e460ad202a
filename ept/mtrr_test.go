package ept

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeMSRs is a processor's MTRR MSRs.
type fakeMSRs map[uint32]uint64

func (f fakeMSRs) read(msr uint32) uint64 { return f[msr] }

// pcMTRRs are MTRRs as PC firmware sets them: WB by default, the legacy
// VGA window UC and the BIOS ROM WP in the fixed ranges, the PCI hole
// from 3 GiB UC, a framebuffer WC at 0xe0000000 (16 MiB) inside it.
func pcMTRRs() fakeMSRs {
	return fakeMSRs{
		msrMTRRCap:           0x508, // 8 variable ranges, fixed ranges, WC
		msrMTRRDefType:       0xc06, // E, FE, WB
		msrMTRRFix64K:        0x0606060606060606,
		msrMTRRFix16K:        0x0606060606060606,
		msrMTRRFix16K + 1:    0x0000000000000000,          // 0xa0000-0xbffff UC
		msrMTRRFix4K + 0:     0x0505050505050505,          // 0xc0000-0xc7fff WP
		msrMTRRFix4K + 7:     0x0505050505050505,          // 0xf8000-0xfffff WP
		msrMTRRPhysBase0:     0xc0000000 | 0,              // UC
		msrMTRRPhysBase0 + 1: 0xfc0000000 | mtrrMaskValid, // 1 GiB, 36 bits
		msrMTRRPhysBase0 + 2: 0xe0000000 | 1,              // WC
		msrMTRRPhysBase0 + 3: 0xfff000000 | mtrrMaskValid, // 16 MiB
		msrMTRRPhysBase0 + 4: 0x100000000 | 6,
		msrMTRRPhysBase0 + 5: 0xf00000000 | 0, // not valid: ignored
	}
}

func TestReadMTRRs(t *testing.T) {
	m := ReadMTRRs(pcMTRRs().read, 36)
	assert.True(t, m.Enabled)
	assert.True(t, m.FixedOn)
	assert.Equal(t, WriteBack, m.Default)
	assert.Equal(t, []VariableMTRR{
		{Base: 0xc0000000, Mask: 0xffff_ffff_c000_0000, Type: Uncacheable},
		{Base: 0xe0000000, Mask: 0xffff_ffff_ff00_0000, Type: WriteCombine},
	}, m.Variable, "masks widened above the physical width; invalid ranges left out")
	assert.Equal(t, Uncacheable, m.Fixed[16])
	assert.Equal(t, WriteProtect, m.Fixed[24])
	assert.Equal(t, Uncacheable, m.Fixed[32], "0xc8000: 0 is UC")
}

func TestMTRRTypeOf(t *testing.T) {
	m := ReadMTRRs(pcMTRRs().read, 36)
	for pa, want := range map[uint64]MemType{
		0:           WriteBack,
		0x9f000:     WriteBack,
		0xa0000:     Uncacheable,
		0xb8000:     Uncacheable,
		0xc0000:     WriteProtect,
		0xf8000:     WriteProtect,
		0xfffff:     WriteProtect,
		0x100000:    WriteBack,
		0xbfffffff:  WriteBack,
		0xc0000000:  Uncacheable,
		0xe0000000:  Uncacheable, // UC and WC overlap: UC
		0xfee00000:  Uncacheable,
		0x100000000: WriteBack,
	} {
		assert.Equal(t, want, m.TypeOf(pa), "%#x", pa)
	}
	off := m
	off.Enabled = false
	assert.Equal(t, Uncacheable, off.TypeOf(0x100000), "MTRRs off: all UC")
	nofixed := m
	nofixed.FixedOn = false
	assert.Equal(t, WriteBack, nofixed.TypeOf(0xa0000), "fixed ranges off: the default")

	// WT over WB is WT; WC over WB is undefined: UC.
	o := MTRRs{Enabled: true, Default: Uncacheable, Variable: []VariableMTRR{
		{Base: 0, Mask: ^uint64(1<<30 - 1), Type: WriteBack},
		{Base: 0, Mask: ^uint64(1<<20 - 1), Type: WriteThrough},
		{Base: 1 << 20, Mask: ^uint64(1<<20 - 1), Type: WriteCombine},
	}}
	assert.Equal(t, WriteThrough, o.TypeOf(0x1000))
	assert.Equal(t, Uncacheable, o.TypeOf(1<<20+0x1000))
	assert.Equal(t, WriteBack, o.TypeOf(2<<20))
	assert.Equal(t, Uncacheable, o.TypeOf(1<<30), "the default")
}

func TestMTRRReservedTypesAreUC(t *testing.T) {
	f := pcMTRRs()
	f[msrMTRRDefType] = 0x802 // E, type 2 (reserved)
	f[msrMTRRPhysBase0] = 0xc0000000 | 7
	m := ReadMTRRs(f.read, 36)
	assert.Equal(t, Uncacheable, m.Default)
	assert.Equal(t, Uncacheable, m.Variable[0].Type)
	assert.False(t, m.FixedOn, "FE clear")
}

func TestMTRRSpans(t *testing.T) {
	m := ReadMTRRs(pcMTRRs().read, 36)
	s, err := m.Spans(0x9f000, 0x100000)
	require.NoError(t, err)
	assert.Equal(t, []Span{
		{0x9f000, 0xa0000, WriteBack},
		{0xa0000, 0xc0000, Uncacheable},
		{0xc0000, 0xc8000, WriteProtect},
		{0xc8000, 0xf8000, Uncacheable},
		{0xf8000, 0x100000, WriteProtect},
	}, s)
	s, err = m.Spans(0xa0000000, 0x1_0000_0000)
	require.NoError(t, err)
	assert.Equal(t, []Span{{0xa0000000, 0xc0000000, WriteBack}, {0xc0000000, 0x1_0000_0000, Uncacheable}}, s)
	s, err = m.Spans(0x1000, 0x1000)
	assert.NoError(t, err)
	assert.Empty(t, s)
	_, err = m.Spans(0x1001, 0x2000)
	assert.Error(t, err)

	odd := MTRRs{Enabled: true, Variable: []VariableMTRR{{Base: 0, Mask: ^uint64(0x10000) &^ 0xfff, Type: WriteBack}}}
	_, err = odd.Spans(0, 1<<20)
	assert.ErrorIs(t, err, ErrMTRRMask)
}

func TestMTRRString(t *testing.T) {
	m := ReadMTRRs(pcMTRRs().read, 36)
	assert.Equal(t, "default WB, fixed ranges on, UC 0xc0000000+1 GiB, WC 0xe0000000+16 MiB", m.String())
	assert.Equal(t, "off (every address UC)", (&MTRRs{}).String())
	assert.Equal(t, "MemType(3)", MemType(3).String())
}
