package smp

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/arch/x86/x86asm"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/board/pc/acpi"
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
	ParkIDT(&idt, pc.SelectorCode, 0x1122334455667788, 0x10000000)
	gate := func(v int) (uint64, uint16, byte) {
		g := idt[v*16:]
		off := uint64(binary.LittleEndian.Uint16(g[0:])) | uint64(binary.LittleEndian.Uint16(g[6:]))<<16 |
			uint64(binary.LittleEndian.Uint32(g[8:]))<<32
		return off, binary.LittleEndian.Uint16(g[2:]), g[5]
	}
	off, sel, typ := gate(2)
	assert.Equal(t, uint64(0x1122334455667788), off)
	assert.Equal(t, uint16(pc.SelectorCode), sel)
	assert.Equal(t, byte(0x8e), typ)
	for _, v := range []int{0, 8, 13, 18, 255} {
		off, _, typ := gate(v)
		assert.Equal(t, uint64(0x10000000), off, "vector %d", v)
		assert.Equal(t, byte(0x8e), typ)
	}
}

func TestAPParams(t *testing.T) {
	b := APParams(Descriptor(pc.GDT, 39), Descriptor(0x1000, 4095), 0x2000, 0x3000)
	le := binary.LittleEndian
	assert.Equal(t, uint16(39), le.Uint16(b[apGDTR:]))
	assert.Equal(t, uint64(pc.GDT), le.Uint64(b[apGDTR+2:]))
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

// cpuidFunc is CPUID as a table: leaf<<8|subleaf to the four registers;
// anything else reads as zeros.
type cpuidFunc map[uint32][4]uint32

func (c cpuidFunc) call(leaf, sub uint32) (uint32, uint32, uint32, uint32) {
	r := c[leaf<<8|sub]
	return r[0], r[1], r[2], r[3]
}

// bochsCPUID is the topology Bochs 2.7 reports with "cpu: count=P:C:T"
// (P packages of C cores of T threads) on its corei7_skylake_x model: leaf
// 1 counts C×T logical processor IDs with HTT set; leaf 0BH gives a level
// of type 1 (SMT) or 2 (core) where there are several, and, where there
// is no such level, answers its subleaf with type 0 and P in EBX.
func bochsCPUID(p, c, th uint32) cpuidFunc {
	bits := func(n uint32) uint32 {
		s := uint32(0)
		for (n-1)>>s != 0 {
			s++
		}
		return s
	}
	f := cpuidFunc{0: {0x16}, 1 << 8: {0x50654, (c * th) << 16, 0, 1 << 28}}
	var levels [][4]uint32
	if th > 1 {
		levels = append(levels, [4]uint32{bits(th), th, 1 << 8})
	}
	if c > 1 {
		levels = append(levels, [4]uint32{bits(c), c, 2 << 8})
	}
	if p > 1 {
		levels = append(levels, [4]uint32{bits(p), p, 0})
	} else if len(levels) == 0 {
		levels = append(levels, [4]uint32{1, 1, 0})
	}
	for i, l := range levels {
		l[2] |= uint32(i)
		f[0xb<<8|uint32(i)] = l
	}
	return f
}

func TestPackageTopology(t *testing.T) {
	cases := []struct {
		name  string
		cpuid cpuidFunc
		want  Topology
	}{
		{"leaf 0BH: 2 threads, 8 logical processors", cpuidFunc{0: {0x16}, 0xb00: {1, 2, 0x100}, 0xb01: {4, 8, 0x201}},
			Topology{8, 4, "leaf 0BH"}},
		{"leaf 0BH: SMT only", cpuidFunc{0: {0x16}, 0xb00: {1, 2, 0x100}}, Topology{2, 1, "leaf 0BH"}},
		{"Bochs, 1 processor", bochsCPUID(1, 1, 1), Topology{1, 0, "leaf 1"}},
		{"Bochs, 2 processors: 2 packages of one", bochsCPUID(2, 1, 1), Topology{1, 0, "leaf 1"}},
		{"Bochs, 4 processors", bochsCPUID(4, 1, 1), Topology{1, 0, "leaf 1"}},
		{"Bochs, 1 package of 2 cores", bochsCPUID(1, 2, 1), Topology{2, 1, "leaf 0BH"}},
		{"Bochs, 2 packages of 2 cores", bochsCPUID(2, 2, 1), Topology{2, 1, "leaf 0BH"}},
		{"Bochs, 2 packages of 2 cores of 2 threads", bochsCPUID(2, 2, 2), Topology{2, 1, "leaf 0BH"}},
		{"no leaf 0BH, HTT: leaf 1's count", cpuidFunc{0: {0xa}, 0x100: {0, 6 << 16, 0, 1 << 28}}, Topology{6, 3, "leaf 1"}},
		{"no HTT: one", cpuidFunc{0: {0xa}, 0x100: {0, 6 << 16, 0, 0}}, Topology{1, 0, "leaf 1, no HTT"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			assert.Equal(t, c.want, PackageTopology(c.cpuid.call))
		})
	}
}

// TestProcessorCensus: the guest starts only where tamahv holds every
// processor it can know of; otherwise the error says which and why.
func TestProcessorCensus(t *testing.T) {
	on := func(ids ...uint32) []acpi.Processor {
		var l []acpi.Processor
		for _, id := range ids {
			l = append(l, acpi.Processor{APICID: id, Enabled: true, Source: acpi.SourceMADT})
		}
		return l
	}
	parked := func(ids ...uint32) []AP {
		var l []AP
		for _, id := range ids {
			l = append(l, AP{APICID: id, Status: APParked})
		}
		return l
	}
	one := Topology{1, 0, "leaf 1"}
	bochs2 := PackageTopology(bochsCPUID(2, 1, 1).call)
	cases := []struct {
		name string
		c    Census
		want string // "" where the guest may start
	}{
		{name: "Bochs, 1 processor", c: Census{Tables: true, Listed: on(0), Topology: PackageTopology(bochsCPUID(1, 1, 1).call)}},
		{name: "Bochs, 2 processors", c: Census{Tables: true, Listed: on(0, 1), APs: parked(1), Topology: bochs2}},
		{name: "Bochs, 4 processors", c: Census{Tables: true, Listed: on(0, 1, 2, 3), APs: parked(1, 2, 3),
			Topology: PackageTopology(bochsCPUID(4, 1, 1).call)}},
		{name: "the MADT and the MP table list the same", c: Census{Tables: true,
			Listed: append(on(0, 1), acpi.Processor{APICID: 1, Enabled: true, Source: acpi.SourceMP}), APs: parked(1), Topology: bochs2}},
		{name: "the BSP is not APIC ID 0", c: Census{Tables: true, Listed: on(0, 1), BSP: 1, APs: parked(0), Topology: bochs2}},
		{name: "two packages of two, all held", c: Census{Tables: true, Listed: on(0, 1, 2, 3), APs: parked(1, 2, 3),
			Topology: Topology{2, 1, "leaf 0BH"}}},
		{name: "an unusable entry outside the package", c: Census{Tables: true, Listed: append(on(0, 1), acpi.Processor{APICID: 2}),
			APs: parked(1), Topology: Topology{2, 1, "leaf 0BH"}}},
		{name: "no tables, one logical processor", c: Census{Topology: one}},

		{name: "no tables, CPUID counts two", c: Census{Topology: Topology{2, 1, "leaf 0BH"}},
			want: "no ACPI MADT or MP table, and CPUID (leaf 0BH) counts 2 logical processors in the bootstrap processor's package"},
		{name: "a listed AP that stayed silent", c: Census{Tables: true, Listed: on(0, 1, 2),
			APs: []AP{{APICID: 1, Status: APParked}, {APICID: 2, Status: APSilent}}, Topology: bochs2},
			want: "APIC IDs [2]: listed enabled, did not start"},
		{name: "APs without VMX", c: Census{Tables: true, Listed: on(0, 1, 2),
			APs: []AP{{APICID: 1, Status: APNoVMX}, {APICID: 2, Status: APNoVMX}}, Topology: bochs2},
			want: "APIC IDs [1 2]: listed enabled, no VMX"},
		{name: "an online-capable processor not started", c: Census{Tables: true,
			Listed: append(on(0), acpi.Processor{APICID: 8, OnlineCapable: true}), Topology: one},
			want: "APIC IDs [8]: listed online capable, not started"},
		{name: "an online-capable processor that did not answer", c: Census{Tables: true,
			Listed: append(on(0), acpi.Processor{APICID: 8, OnlineCapable: true}), APs: []AP{{APICID: 8}}, Topology: one},
			want: "APIC IDs [8]: listed online capable, did not start"},
		{name: "one only the MP table lists", c: Census{Tables: true,
			Listed: append(on(0, 1), acpi.Processor{APICID: 5, Enabled: true, Source: acpi.SourceMP}), APs: parked(1), Topology: bochs2},
			want: "APIC IDs [5]: listed enabled, not started"},
		{name: "CPUID counts more in the package than the tables list", c: Census{Tables: true, Listed: on(0, 1), APs: parked(1),
			Topology: Topology{4, 2, "leaf 0BH"}},
			want: "CPUID (leaf 0BH) counts 4 logical processors in the bootstrap processor's package, tamahv holds 2 there (APIC IDs [0 1])"},
		{name: "an unusable entry in the package", c: Census{Tables: true, Listed: append(on(0), acpi.Processor{APICID: 1}),
			Topology: Topology{2, 1, "leaf 0BH"}},
			want: "CPUID (leaf 0BH) counts 2 logical processors in the bootstrap processor's package, tamahv holds 1 there (APIC IDs [0])"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.c.Check()
			if c.want == "" {
				assert.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, ErrUnaccounted)
			assert.Contains(t, err.Error(), c.want)
		})
	}
}
