package pc

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/arch/x86/x86asm"
)

// decode decodes b[from:to] in the given mode, one line per instruction.
func decode(t *testing.T, b []byte, from, to, mode int) []string {
	t.Helper()
	var out []string
	for off := from; off < to; {
		inst, err := x86asm.Decode(b[off:to], mode)
		require.NoError(t, err, "offset %#x", off)
		out = append(out, strings.ToLower(x86asm.GNUSyntax(inst, 0, nil)))
		off += inst.Len
	}
	return out
}

func TestLongModeExitDecodes(t *testing.T) {
	const base = 0x10234560
	e := Entry32{EIP: 0x1000000, ESI: 0x7000, GDTBase: 0x6000, GDTLimit: 31, CodeSel: 0x10, DataSel: 0x18}
	b, err := LongModeExit(base, e)
	require.NoError(t, err)
	require.Len(t, b, lmxGDTR+10)

	assert.Equal(t, []string{
		"cli", "lgdtl 0x4b(%rip)", "pushq $0x10", "pushq $0x10234574", "rex.w lretq",
	}, decode(t, b, 0, lmxPM32, 64))
	// The far return pops a 64-bit RIP and CS, as the pushes left them.
	ret, err := x86asm.Decode(b[lmxPM32-2:lmxPM32], 64)
	require.NoError(t, err)
	assert.Equal(t, x86asm.LRET, ret.Op)
	assert.Equal(t, 64, ret.DataSize)
	assert.Equal(t, []string{
		"mov %cr0,%eax", "and $0x7fffffff,%eax", "mov %eax,%cr0",
		"mov $0xc0000080,%ecx", "rdmsr", "and $0xfffffeff,%eax", "wrmsr",
		"xor %eax,%eax", "mov %eax,%cr4",
		"mov $0x18,%eax", "mov %eax,%ds", "mov %eax,%es", "mov %eax,%ss", "mov %eax,%fs", "mov %eax,%gs",
		"mov $0x7000,%esi", "mov $0x1000000,%eax",
		"xor %ebx,%ebx", "xor %edi,%edi", "xor %ebp,%ebp", "jmp *%eax",
	}, decode(t, b, lmxPM32, lmxGDTR, 32))
	// lgdt's operand is the GDTR at the end: relative to the end of lgdt.
	le := binary.LittleEndian
	assert.Equal(t, uint32(lmxGDTR-8), le.Uint32(b[lmxGDTRRel:]))
	assert.Equal(t, uint16(31), le.Uint16(b[lmxGDTR:]))
	assert.Equal(t, uint64(0x6000), le.Uint64(b[lmxGDTR+2:]))
}

func TestLongModeExitRefuses(t *testing.T) {
	good := Entry32{EIP: 0x1000000, ESI: 0x7000, GDTBase: 0x6000, GDTLimit: 31, CodeSel: 0x10, DataSel: 0x18}
	for name, c := range map[string]struct {
		base uint64
		e    func(Entry32) Entry32
	}{
		"code above 2 GiB":        {1<<31 - 0x20, func(e Entry32) Entry32 { return e }},
		"code selector past GDT":  {0x1000, func(e Entry32) Entry32 { e.CodeSel = 0x20; return e }},
		"data selector null":      {0x1000, func(e Entry32) Entry32 { e.DataSel = 0; return e }},
		"selector with RPL or TI": {0x1000, func(e Entry32) Entry32 { e.CodeSel = 0x13; return e }},
	} {
		_, err := LongModeExit(c.base, c.e(good))
		assert.ErrorIs(t, err, ErrLongModeExit, name)
	}
}

func TestLongModeExitCopies(t *testing.T) {
	a, err := LongModeExit(0x1000, Entry32{EIP: 1, GDTLimit: 31, CodeSel: 0x10, DataSel: 0x18})
	require.NoError(t, err)
	b, err := LongModeExit(0x2000, Entry32{EIP: 2, GDTLimit: 31, CodeSel: 0x10, DataSel: 0x18})
	require.NoError(t, err)
	assert.Equal(t, uint32(1), binary.LittleEndian.Uint32(a[lmxEntry:]), "each call patches its own copy")
	assert.Equal(t, uint32(2), binary.LittleEndian.Uint32(b[lmxEntry:]))
}
