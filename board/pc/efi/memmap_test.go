package efi

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func desc(t MemoryType, start, pages uint64) MemoryDescriptor {
	return MemoryDescriptor{Type: t, PhysicalStart: start, NumberOfPages: pages, Attribute: 0xf}
}

func TestMemoryMapRoundTrip(t *testing.T) {
	m := &MemoryMap{DescriptorSize: 48, DescriptorVersion: DescriptorVersion, Descriptors: []MemoryDescriptor{
		desc(BootServicesCode, 0, 1),
		{Type: RuntimeServicesData, PhysicalStart: 0x3f5ed000, VirtualStart: 0xfffffffeffc00000, NumberOfPages: 0x100, Attribute: MemoryRuntime | 0xf},
		desc(MemoryMappedIO, 0xffe00000, 0x200),
	}}
	b := m.Bytes()
	require.Len(t, b, 3*48)
	assert.Equal(t, uint32(RuntimeServicesData), binary.LittleEndian.Uint32(b[48:]))
	assert.Equal(t, uint64(0x3f5ed000), binary.LittleEndian.Uint64(b[48+8:]))
	got, err := ParseMemoryMap(b, 48, DescriptorVersion)
	require.NoError(t, err)
	assert.Equal(t, m, got)
	assert.Equal(t, uint64(0x3f6ed000), got.Descriptors[1].End())
}

func TestParseMemoryMapRejects(t *testing.T) {
	good := (&MemoryMap{DescriptorSize: 48, Descriptors: []MemoryDescriptor{desc(ConventionalMemory, 0x100000, 16)}}).Bytes()
	for name, c := range map[string]struct {
		b    []byte
		size uint32
	}{
		"size below 40":      {good, 32},
		"size not 8-aligned": {good[:44], 44},
		"size huge":          {good, 1 << 20},
		"partial":            {good[:47], 48},
		"unaligned start": {func() []byte {
			b := append([]byte(nil), good...)
			binary.LittleEndian.PutUint64(b[8:], 0x100800)
			return b
		}(), 48},
		"end past 2^64": {func() []byte {
			b := append([]byte(nil), good...)
			binary.LittleEndian.PutUint64(b[24:], 1<<52)
			return b
		}(), 48},
	} {
		_, err := ParseMemoryMap(c.b, c.size, DescriptorVersion)
		assert.ErrorIs(t, err, ErrBadMemoryMap, name)
	}
	m, err := ParseMemoryMap(nil, 48, DescriptorVersion)
	require.NoError(t, err, "an empty map")
	assert.Empty(t, m.Descriptors)
}

func TestReserve(t *testing.T) {
	m := &MemoryMap{DescriptorSize: 48, DescriptorVersion: 1, Descriptors: []MemoryDescriptor{
		desc(ConventionalMemory, 0x900000, 0xf700), // 0x900000-0x10000000
		desc(LoaderData, 0x10000000, 0x8000),       // 0x10000000-0x18000000
		desc(ConventionalMemory, 0x18000000, 0x1000),
		desc(ACPIMemoryNVS, 0x19000000, 0x10),
	}}
	got := m.Reserve(0x0ffff800, 0x18000001) // rounded out to 0x0ffff000-0x18001000
	assert.Equal(t, []MemoryDescriptor{
		desc(ConventionalMemory, 0x900000, 0xf6ff),
		desc(ReservedMemoryType, 0x0ffff000, 1),
		desc(ReservedMemoryType, 0x10000000, 0x8000),
		desc(ReservedMemoryType, 0x18000000, 1),
		desc(ConventionalMemory, 0x18001000, 0xfff),
		desc(ACPIMemoryNVS, 0x19000000, 0x10),
	}, got.Descriptors)
	assert.Len(t, m.Descriptors, 4, "the original is left alone")
	assert.Equal(t, m.DescriptorSize, got.DescriptorSize)

	// A range inside one descriptor splits it in three; a virtual
	// address moves with its part.
	m = &MemoryMap{DescriptorSize: 40, Descriptors: []MemoryDescriptor{
		{Type: RuntimeServicesCode, PhysicalStart: 0x1000, VirtualStart: 0x80001000, NumberOfPages: 4, Attribute: MemoryRuntime},
	}}
	got = m.Reserve(0x2000, 0x3000)
	assert.Equal(t, []MemoryDescriptor{
		{Type: RuntimeServicesCode, PhysicalStart: 0x1000, VirtualStart: 0x80001000, NumberOfPages: 1, Attribute: MemoryRuntime},
		{Type: ReservedMemoryType, PhysicalStart: 0x2000, VirtualStart: 0x80002000, NumberOfPages: 1, Attribute: MemoryRuntime},
		{Type: RuntimeServicesCode, PhysicalStart: 0x3000, VirtualStart: 0x80003000, NumberOfPages: 2, Attribute: MemoryRuntime},
	}, got.Descriptors)

	// Nothing covered, nothing changed; a range up to 2^64 does not wrap.
	assert.Equal(t, m.Descriptors, m.Reserve(0x100000, 0x200000).Descriptors)
	got = m.Reserve(0x4000, ^uint64(0))
	assert.Equal(t, uint64(1), got.Descriptors[1].NumberOfPages)
	assert.Equal(t, ReservedMemoryType, got.Descriptors[1].Type)
}

func TestCovers(t *testing.T) {
	m := &MemoryMap{Descriptors: []MemoryDescriptor{
		desc(LoaderData, 0x10000000, 0x10),
		desc(LoaderData, 0x10010000, 0x7ff0), // listed out of order in firmware maps too
		desc(ConventionalMemory, 0x18000000, 1),
	}}
	assert.NoError(t, m.Covers(0x10000000, 0x18000000, LoaderData))
	assert.ErrorIs(t, m.Covers(0x10000000, 0x18001000, LoaderData), ErrNotCovered, "conventional at the end")
	assert.ErrorIs(t, m.Covers(0x0ffff000, 0x10001000, LoaderData), ErrNotCovered, "a hole")
	assert.ErrorContains(t, m.Covers(0x17fff000, 0x18001000, LoaderData), "conventional")
}

func TestMemoryTypeNames(t *testing.T) {
	assert.Equal(t, "loader data", LoaderData.String())
	assert.Equal(t, "unaccepted", UnacceptedMemory.String())
	assert.Equal(t, "type 20", MemoryType(20).String())
}
