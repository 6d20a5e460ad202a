package e820

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/board/pc/efi"
)

const page = efi.PageSize

func d(t efi.MemoryType, start, pages uint64) efi.MemoryDescriptor {
	return efi.MemoryDescriptor{Type: t, PhysicalStart: start, NumberOfPages: pages, Attribute: 0xf}
}

func TestFromEFITypes(t *testing.T) {
	for typ, want := range map[efi.MemoryType]Type{
		efi.ReservedMemoryType:      Reserved,
		efi.LoaderCode:              RAM,
		efi.LoaderData:              RAM,
		efi.BootServicesCode:        RAM,
		efi.BootServicesData:        RAM,
		efi.RuntimeServicesCode:     Reserved,
		efi.RuntimeServicesData:     Reserved,
		efi.ConventionalMemory:      RAM,
		efi.UnusableMemory:          Unusable,
		efi.ACPIReclaimMemory:       ACPI,
		efi.ACPIMemoryNVS:           NVS,
		efi.MemoryMappedIO:          Reserved,
		efi.MemoryMappedIOPortSpace: Reserved,
		efi.PalCode:                 Reserved,
		efi.PersistentMemory:        PMEM,
		efi.UnacceptedMemory:        Reserved,
		16:                          Reserved,
		0x70000000:                  Reserved, // OEM range
		0x80000000:                  Reserved, // OS loader range
	} {
		got := FromEFI(&efi.MemoryMap{Descriptors: []efi.MemoryDescriptor{d(typ, 0x100000, 16)}})
		assert.Equal(t, []Entry{{0x100000, 16 * page, want}}, got, "EFI type %v", typ)
	}

	sp := d(efi.ConventionalMemory, 0x100000000, 0x100)
	sp.Attribute |= efi.MemorySP
	assert.Equal(t, []Entry{{0x100000000, 0x100 * page, SoftReserved}}, FromEFI(&efi.MemoryMap{Descriptors: []efi.MemoryDescriptor{sp}}))
}

func TestFromEFIMergesAndSorts(t *testing.T) {
	m := &efi.MemoryMap{Descriptors: []efi.MemoryDescriptor{
		d(efi.ConventionalMemory, 0x900000, 0x100), // listed after what follows it
		d(efi.BootServicesCode, 0, 1),
		d(efi.LoaderData, 0x1000, 4),
		d(efi.ConventionalMemory, 0x5000, 0x9b),
		d(efi.BootServicesData, 0x100000, 0x800),   // 1 MiB-9 MiB: RAM, touches the first
		d(efi.RuntimeServicesCode, 0xa00000, 0x10), // a gap before it: not merged with RAM
		d(efi.RuntimeServicesData, 0xa10000, 0x10), // merged with the code: both reserved
		d(efi.ACPIReclaimMemory, 0xa20000, 0),      // empty: dropped
		d(efi.ACPIMemoryNVS, 0xa20000, 1),
	}}
	assert.Equal(t, []Entry{
		{0, 0xa0000, RAM},
		{0x100000, 0x900000, RAM},
		{0xa00000, 0x20000, Reserved},
		{0xa20000, page, NVS},
	}, FromEFI(m))
}

// TestMoreThanZeroPage checks that a map past 128 entries comes back
// whole, for the zero page and the SETUP_E820_EXT setup_data.
func TestMoreThanZeroPage(t *testing.T) {
	m := &efi.MemoryMap{}
	for i := range uint64(300) {
		typ := efi.ConventionalMemory
		if i%2 == 1 {
			typ = efi.ACPIMemoryNVS
		}
		m.Descriptors = append(m.Descriptors, d(typ, i*page, 1))
	}
	es := FromEFI(m)
	require.Len(t, es, 300)
	b := Encode(es)
	require.Len(t, b, 300*EntryLength)
	last := b[299*EntryLength:]
	assert.Equal(t, uint64(299*page), binary.LittleEndian.Uint64(last))
	assert.Equal(t, uint64(page), binary.LittleEndian.Uint64(last[8:]))
	assert.Equal(t, uint32(NVS), binary.LittleEndian.Uint32(last[16:]))
	assert.Len(t, Encode(es[ZeroPageEntries:]), (300-ZeroPageEntries)*EntryLength)
}

func TestReserve(t *testing.T) {
	const base, end = 0x10000000, 0x18000000
	es := []Entry{
		{0, 0x9fc00, RAM},
		{0x100000, 0x3fee0000, RAM}, // 1 MiB-1 GiB: the region in its middle
		{0xb0000000, 0x10000000, Reserved},
	}
	assert.Equal(t, []Entry{
		{0, 0x9fc00, RAM},
		{0x100000, base - 0x100000, RAM},
		{base, end - base, Reserved},
		{end, 0x3ffe0000 - end, RAM},
		{0xb0000000, 0x10000000, Reserved},
	}, Reserve(es, base, end))
	assert.Len(t, es, 3, "the input is left alone")

	// Spanning several entries and a hole; merged with a reserved
	// neighbour.
	es = []Entry{
		{0x0f000000, 0x800000, ACPI},
		{0x0f800000, 0x800000, Reserved},
		{0x10400000, 0x100000, NVS},
		{0x17000000, 0x2000000, RAM},
	}
	assert.Equal(t, []Entry{
		{0x0f000000, 0x800000, ACPI},
		{0x0f800000, end - 0x0f800000, Reserved},
		{end, 0x19000000 - end, RAM},
	}, Reserve(es, base, end))

	// An empty range changes nothing but the order.
	assert.Equal(t, []Entry{{0, 0x1000, RAM}, {0x2000, 0x1000, RAM}},
		Reserve([]Entry{{0x2000, 0x1000, RAM}, {0, 0x1000, RAM}}, end, base))
}

func TestFromLoader(t *testing.T) {
	// GRUB EFI's Multiboot map: type 20 is EFI runtime services code.
	in := []Entry{
		{0x3f4ed000, 0x100000, Reserved},
		{0x3f5ed000, 0x100000, 20},
		{0x3f6ed000, 0x80000, Reserved},
		{0x3f76d000, 0x12000, ACPI},
		{0x40000000, 0, RAM},
		{0x100000000, 0x1000, PRAM},
	}
	assert.Equal(t, []Entry{
		{0x3f4ed000, 0x280000, Reserved},
		{0x3f76d000, 0x12000, ACPI},
		{0x100000000, 0x1000, PRAM},
	}, FromLoader(in))
	assert.Equal(t, Type(20), in[1].Type, "the input is left alone")
}

func TestFromEFIReserving(t *testing.T) {
	m := &efi.MemoryMap{DescriptorSize: 48, DescriptorVersion: 1, Descriptors: []efi.MemoryDescriptor{
		d(efi.ConventionalMemory, 0x1500000, 0xeb0f),
		d(efi.LoaderData, 0x1000f000, 0x7ff1),
		d(efi.ConventionalMemory, 0x18000000, 0x146ca),
	}}
	es, cp := FromEFIReserving(m, 0x10000000, 0x18000000)
	assert.Equal(t, []Entry{
		{0x1500000, 0x10000000 - 0x1500000, RAM},
		{0x10000000, 0x8000000, Reserved},
		{0x18000000, 0x146ca * page, RAM},
	}, es)
	assert.Equal(t, []efi.MemoryDescriptor{
		d(efi.ConventionalMemory, 0x1500000, 0xeb00),
		d(efi.ReservedMemoryType, 0x10000000, 0xf),
		d(efi.ReservedMemoryType, 0x1000f000, 0x7ff1),
		d(efi.ConventionalMemory, 0x18000000, 0x146ca),
	}, cp.Descriptors)
	assert.Equal(t, efi.ConventionalMemory, m.Descriptors[0].Type, "the firmware's map is left alone")
}

func TestEntryEnd(t *testing.T) {
	assert.Equal(t, uint64(0x2000), Entry{0x1000, 0x1000, RAM}.End())
	assert.Equal(t, ^uint64(0), Entry{^uint64(0) - 1, 10, RAM}.End())
}

func TestNotRAM(t *testing.T) {
	const base, end = 0x10000000, 0x18000000
	assert.Empty(t, NotRAM([]Entry{{0x100000, 0x3ff00000, RAM}}, base, end), "all RAM")
	assert.Empty(t, NotRAM([]Entry{{0x100000, 0x10000000, RAM}, {0x10100000, 0x30000000, RAM}}, base, end), "two entries that touch")
	assert.Equal(t, []Entry{{0x17f00000, 0x100000, NVS}}, NotRAM([]Entry{
		{0x100000, 0x17e00000, RAM}, {0x17f00000, 0x100000, NVS}, {0x18000000, 0x8000000, RAM},
	}, base, end), "firmware's memory in the region")
	assert.Equal(t, []Entry{{0x10000000, 0x1000, Reserved}}, NotRAM([]Entry{
		{0x100000, 0x3ff00000, RAM}, {0xff00000, 0x101000, Reserved},
	}, base, end), "a reserved entry over RAM counts")
	assert.Equal(t, []Entry{{0x14000000, 0x4000000, 0}}, NotRAM([]Entry{{0, 0x14000000, RAM}}, base, end), "the map ends inside it")
	assert.Equal(t, []Entry{{0x10000000, 0x8000000, 0}}, NotRAM(nil, base, end), "no map")
	assert.Equal(t, "ACPI NVS", NVS.String())
	assert.Equal(t, "not in the map", Type(0).String())
	assert.Equal(t, "type 20", Type(20).String())
}
