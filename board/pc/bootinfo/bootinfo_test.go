package bootinfo

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/board/pc/acpi"
	"github.com/tamahv/tamahv/board/pc/e820"
	"github.com/tamahv/tamahv/board/pc/efi"
	"github.com/tamahv/tamahv/board/pc/multiboot"
	"github.com/tamahv/tamahv/board/pc/multiboot2"
)

// What GRUB handed the Multiboot2 probe (package multiboot2's testdata).
const (
	goldenBIOS   = "../multiboot2/testdata/grub-bios.mbi"
	goldenEFI    = "../multiboot2/testdata/grub-efi.mbi"
	goldenEFIMem = "../multiboot2/testdata/grub-efi-mem.txt"

	regionStart, regionEnd = 0x10000000, 0x18000000
)

func parse(t *testing.T, path string) *Info {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	mb, err := multiboot2.ParseBytes(b)
	require.NoError(t, err)
	in, err := FromMultiboot2(mb)
	require.NoError(t, err)
	return in
}

// physMem is sparse physical memory.
type physMem map[uint64][]byte

func (m physMem) ReadPhys(pa uint64, p []byte) error {
	for base, b := range m {
		if pa >= base && pa-base <= uint64(len(b)) && uint64(len(p)) <= uint64(len(b))-(pa-base) {
			copy(p, b[pa-base:])
			return nil
		}
	}
	return fmt.Errorf("no memory at %#x+%d", pa, len(p))
}

// firmwareMemory loads the memory the probe dumped on OVMF: the system
// table, its configuration table and the RSDPs.
func firmwareMemory(t *testing.T) physMem {
	f, err := os.Open(goldenEFIMem)
	require.NoError(t, err)
	defer f.Close()
	m := physMem{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		addr, data, ok := strings.Cut(s.Text(), " ")
		require.True(t, ok, s.Text())
		pa, err := strconv.ParseUint(addr, 16, 64)
		require.NoError(t, err)
		b, err := hex.DecodeString(data)
		require.NoError(t, err)
		m[pa] = b
	}
	require.NoError(t, s.Err())
	return m
}

func TestFromMultiboot2BIOS(t *testing.T) {
	in := parse(t, goldenBIOS)
	assert.Equal(t, Multiboot2, in.Protocol)
	assert.Equal(t, BIOS, in.Firmware())
	assert.Nil(t, in.EFI)
	assert.Equal(t, "hc.ring3=secret console=com1", in.Cmdline)
	assert.Equal(t, "GRUB 2.06-13+deb12u2", in.LoaderName)
	assert.Equal(t, uint64(0x1000f000), in.LoadBase)
	assert.True(t, in.HasBasicMemory)
	require.Len(t, in.Modules, 3)
	assert.Equal(t, Module{0x100000, 0x100000 + 300000, "vmlinuz root=UUID=0a1b2c3d-1234-5678-9abc-def012345678 ro quiet"}, in.Modules[0])
	assert.Equal(t, e820.Entry{Addr: 0x100000, Size: 0x3fedf000, Type: e820.RAM}, in.MemoryMap[3])
	require.NotNil(t, in.Framebuffer)
	assert.Equal(t, uint64(0xfd000000), in.Framebuffer.Addr)

	// The guest's map: the loader's, with tamahv's region reserved.
	es, efiMap := in.GuestMemoryMaps(regionStart, regionEnd)
	assert.Nil(t, efiMap)
	assert.Contains(t, es, e820.Entry{Addr: 0x100000, Size: regionStart - 0x100000, Type: e820.RAM})
	assert.Contains(t, es, e820.Entry{Addr: regionStart, Size: regionEnd - regionStart, Type: e820.Reserved})
	assert.Contains(t, es, e820.Entry{Addr: regionEnd, Size: 0x3ffdf000 - regionEnd, Type: e820.RAM})

	// Only the ACPI 1.0 copy on SeaBIOS.
	r, err := acpi.Parse(in.ACPIOld)
	require.NoError(t, err)
	assert.NoError(t, in.CheckRSDP(r))
	r.RSDT++
	assert.ErrorIs(t, in.CheckRSDP(r), acpi.ErrCopyDiffers)
	r.Revision = 2
	assert.NoError(t, in.CheckRSDP(r), "no ACPI 2.0 copy to compare")
}

func TestFromMultiboot2EFI(t *testing.T) {
	in := parse(t, goldenEFI)
	assert.Equal(t, UEFI, in.Firmware())
	require.NotNil(t, in.EFI)
	assert.Equal(t, uint64(0x3f5ec018), in.EFI.SystemTable)
	require.NotNil(t, in.EFI.MemoryMap)
	assert.Len(t, in.EFI.MemoryMap.Descriptors, 124)

	// The RSDP through the EFI system table OVMF really left, checked
	// against GRUB's copy.
	loc, err := efi.FindRSDP(firmwareMemory(t), in.EFI.SystemTable)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x3f77e014), loc.Addr)
	assert.Equal(t, efi.ACPI20TableGUID, loc.GUID)
	assert.Equal(t, uint64(0x3f77d0e8), loc.RSDP.Root())
	assert.NoError(t, in.CheckRSDP(loc.RSDP))
	v1, err := acpi.Read(firmwareMemory(t), 0x3f77e000)
	require.NoError(t, err)
	assert.NoError(t, in.CheckRSDP(v1), "the ACPI 1.0 RSDP matches tag 14")

	// The guest's maps come from the EFI memory map: no GRUB type 20,
	// tamahv's region reserved in both.
	es, efiMap := in.GuestMemoryMaps(regionStart, regionEnd)
	for _, e := range es {
		assert.Contains(t, []e820.Type{e820.RAM, e820.Reserved, e820.ACPI, e820.NVS}, e.Type, "%+v", e)
	}
	assert.Equal(t, []e820.Entry{
		{Addr: 0x900000, Size: regionStart - 0x900000, Type: e820.RAM},
		{Addr: regionStart, Size: regionEnd - regionStart, Type: e820.Reserved},
		{Addr: regionEnd, Size: 0x3eaba000 - regionEnd, Type: e820.RAM},
	}, es[7:10])
	assert.Len(t, es, 20)
	require.NotNil(t, efiMap)
	assert.Error(t, efiMap.Covers(regionStart, regionEnd, efi.LoaderData))
	assert.NoError(t, efiMap.Covers(0x1000f000, regionEnd, efi.ReservedMemoryType))
	assert.NoError(t, in.EFI.MemoryMap.Covers(0x1000f000, regionEnd, efi.LoaderData), "the firmware's map is left alone")
}

func TestFromMultiboot2RefusesLiveBootServices(t *testing.T) {
	_, err := FromMultiboot2(&multiboot2.Info{Tags: []uint32{multiboot2.TagEFIBS}, EFIBootServices: true})
	assert.ErrorIs(t, err, ErrBootServices)
}

func TestFromMultiboot(t *testing.T) {
	mb := &multiboot.Info{
		Flags:      multiboot.InfoMem | multiboot.InfoCmdline | multiboot.InfoMods | multiboot.InfoMmap | multiboot.InfoLoaderName,
		MemLower:   639,
		MemUpper:   1047552,
		Cmdline:    "/boot/tamahv.elf console=com1",
		LoaderName: "GRUB 2.06",
		Modules:    []multiboot.Module{{Start: 0x20000000, End: 0x20800000, Cmdline: "vmlinuz quiet"}, {Start: 0x21000000, End: 0x21001000}},
		MemoryMap: []multiboot.Region{
			{Base: 0, Length: 0x9fc00, Type: multiboot.MemAvailable},
			{Base: 0x3f5ed000, Length: 0x100000, Type: 20},
		},
	}
	in := FromMultiboot(mb)
	assert.Equal(t, &Info{
		Protocol:       Multiboot1,
		Cmdline:        "/boot/tamahv.elf console=com1",
		LoaderName:     "GRUB 2.06",
		Modules:        []Module{{0x20000000, 0x20800000, "vmlinuz quiet"}, {0x21000000, 0x21001000, ""}},
		HasBasicMemory: true,
		MemLower:       639,
		MemUpper:       1047552,
		MemoryMap:      []e820.Entry{{Addr: 0, Size: 0x9fc00, Type: e820.RAM}, {Addr: 0x3f5ed000, Size: 0x100000, Type: 20}},
	}, in)
	assert.Equal(t, BIOS, in.Firmware(), "Multiboot 1 tells nothing of UEFI")
	assert.Equal(t, "Multiboot", in.Protocol.String())

	// The guest's map: type 20 reserved.
	es, _ := in.GuestMemoryMaps(regionStart, regionEnd)
	assert.Contains(t, es, e820.Entry{Addr: 0x3f5ed000, Size: 0x100000, Type: e820.Reserved})

	mb.Flags = multiboot.InfoCmdline
	assert.False(t, FromMultiboot(mb).HasBasicMemory)
	assert.NoError(t, FromMultiboot(mb).CheckRSDP(acpi.RSDP{}), "no copy to compare")
}

func TestNames(t *testing.T) {
	assert.Equal(t, "Multiboot2", Multiboot2.String())
	assert.Equal(t, "UEFI", UEFI.String())
	assert.Equal(t, "BIOS", BIOS.String())
	assert.Equal(t, "firmware 9", Firmware(9).String())
}
