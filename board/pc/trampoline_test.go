package pc

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/arch/x86/x86asm"
)

// disasm decodes b[from:to] in the given mode, one line per instruction,
// each prefixed with its offset in b.
func disasm(t *testing.T, b []byte, from, to, mode int) []string {
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

func TestTrampolineDecodes(t *testing.T) {
	const base, cr3, entry, params = 0x9e000, 0x17fc0000, 0x10123456, 0x10ff0000
	b, err := Trampoline(base, cr3, entry, params)
	require.NoError(t, err)

	assert.Equal(t, []string{
		"cli", "cld", "mov %cs,%ax", "mov %ax,%ds", "lgdtl 0x98",
		"mov %cr0,%eax", "or $0x1,%eax", "mov %eax,%cr0", "ljmp $0x8,$0x9e01e",
	}, disasm(t, b, 0, trPM32, 16))
	assert.Equal(t, []string{
		"mov $0x10,%ax", "mov %eax,%ds", "mov %eax,%es", "mov %eax,%ss",
		"mov %cr4,%eax", "or $0xa0,%eax", "mov %eax,%cr4",
		"mov $0x17fc0000,%eax", "mov %eax,%cr3",
		"mov $0xc0000080,%ecx", "rdmsr", "or $0x100,%eax", "wrmsr",
		"mov %cr0,%eax", "or $0x80000020,%eax", "mov %eax,%cr0", "ljmp $0x18,$0x9e05b",
	}, disasm(t, b, trPM32, trLM64, 32))
	assert.Equal(t, []string{
		"mov $0x10ff0000,%rdi", "mov $0x10123456,%rax", "jmp *%rax",
	}, disasm(t, b, trLM64, trLM64+0x16, 64))

	le := binary.LittleEndian
	assert.Equal(t, uint16(31), le.Uint16(b[trGDTR:]))
	assert.Equal(t, uint32(base+trGDT), le.Uint32(b[trGDTRBase:]))
	gdt := func(sel int) uint64 { return le.Uint64(b[trGDT+sel:]) }
	assert.Zero(t, gdt(0))
	assert.Equal(t, uint64(0x00cf9a000000ffff), gdt(0x08), "32-bit code")
	assert.Equal(t, uint64(0x00cf92000000ffff), gdt(0x10), "data")
	assert.Equal(t, uint64(0x00209a0000000000), gdt(0x18), "64-bit code")
	assert.Zero(t, (trGDT+base)%8, "GDT aligned")
}

func TestTrampolineRefusesBadPlaces(t *testing.T) {
	for _, c := range []struct {
		base uint32
		cr3  uint64
	}{{0x9e001, 0x1000}, {0x100000, 0x1000}, {0x9e000, 1 << 32}} {
		_, err := Trampoline(c.base, c.cr3, 0, 0)
		assert.Error(t, err, "%#x %#x", c.base, c.cr3)
	}
}

func TestTrampolineCopies(t *testing.T) {
	a, err := Trampoline(0x8000, 0x1000, 1, 2)
	require.NoError(t, err)
	b, err := Trampoline(0x9000, 0x2000, 3, 4)
	require.NoError(t, err)
	assert.NotEqual(t, a, b, "each call patches its own copy")
	assert.Equal(t, uint64(1), binary.LittleEndian.Uint64(a[trEntry:]))
}

func TestParkIDT(t *testing.T) {
	var idt [4096]byte
	ParkIDT(&idt, SelectorCode, 0x1122334455667788, 0x10000000)
	gate := func(v int) (uint64, uint16, byte) {
		g := idt[v*16:]
		off := uint64(binary.LittleEndian.Uint16(g[0:])) | uint64(binary.LittleEndian.Uint16(g[6:]))<<16 |
			uint64(binary.LittleEndian.Uint32(g[8:]))<<32
		return off, binary.LittleEndian.Uint16(g[2:]), g[5]
	}
	off, sel, typ := gate(2)
	assert.Equal(t, uint64(0x1122334455667788), off)
	assert.Equal(t, uint16(SelectorCode), sel)
	assert.Equal(t, byte(0x8e), typ)
	for _, v := range []int{0, 8, 13, 18, 255} {
		off, _, typ := gate(v)
		assert.Equal(t, uint64(0x10000000), off, "vector %d", v)
		assert.Equal(t, byte(0x8e), typ)
	}
}

func TestAPParams(t *testing.T) {
	b := APParams(Descriptor(GDT, 39), Descriptor(0x1000, 4095), 0x2000, 0x3000)
	le := binary.LittleEndian
	assert.Equal(t, uint16(39), le.Uint16(b[apGDTR:]))
	assert.Equal(t, uint64(GDT), le.Uint64(b[apGDTR+2:]))
	assert.Equal(t, uint16(4095), le.Uint16(b[apIDTR:]))
	assert.Equal(t, uint64(0x1000), le.Uint64(b[apIDTR+2:]))
	assert.Equal(t, uint64(0x2000), le.Uint64(b[apStack:]))
	assert.Equal(t, uint64(0x3000), le.Uint64(b[apVMXON:]))
	assert.Zero(t, le.Uint32(b[apStatus:]), "APSilent until the AP writes")
}

func TestTrampolinePage(t *testing.T) {
	p, err := TrampolinePage([][2]uint64{{0, 0x9fc00}, {0x100000, 0x40000000}})
	require.NoError(t, err)
	assert.Equal(t, uint32(0x9e000), p)
	p, err = TrampolinePage([][2]uint64{{0x800, 0x3800}})
	require.NoError(t, err)
	assert.Equal(t, uint32(0x2000), p)
	_, err = TrampolinePage([][2]uint64{{0x100000, 0x40000000}, {0x1800, 0x2800}})
	assert.Error(t, err)
}

func TestAPStatus(t *testing.T) {
	assert.True(t, APParked.Held())
	for _, s := range []APStatus{APSilent, APStarted, APNoVMX, APVMXLockedOff, APVMXONFailed, 0x99} {
		assert.False(t, s.Held(), "%v", s)
		assert.NotEmpty(t, s.String())
	}
}

func TestUnheld(t *testing.T) {
	aps := []AP{
		{APICID: 1, Status: APParked}, {APICID: 2, Status: APSilent}, {APICID: 3, Status: APStarted},
		{APICID: 4, Status: APNoVMX}, {APICID: 5, Status: APVMXLockedOff}, {APICID: 6, Status: APVMXONFailed},
	}
	assert.Equal(t, []uint32{3, 4, 5, 6}, Unheld(aps))
	assert.Empty(t, Unheld(aps[:2]))
}

func TestPackageProcessors(t *testing.T) {
	levels := [][4]uint32{
		{1, 2, 0x100, 0}, // SMT: 2 threads
		{4, 8, 0x201, 0}, // core: 8 logical processors in the package
		{0, 0, 0x002, 0}, // invalid: the end
	}
	leaf := func(l [][4]uint32) func(uint32) (uint32, uint32, uint32, uint32) {
		return func(sub uint32) (uint32, uint32, uint32, uint32) {
			if int(sub) >= len(l) {
				return 0, 0, sub, 0
			}
			return l[sub][0], l[sub][1], l[sub][2], l[sub][3]
		}
	}
	assert.Equal(t, 8, PackageProcessors(leaf(levels)))
	assert.Equal(t, 2, PackageProcessors(leaf(levels[:1])))
	assert.Zero(t, PackageProcessors(leaf(nil)))
}
