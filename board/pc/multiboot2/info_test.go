package multiboot2

import (
	"encoding/binary"
	"fmt"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/board/pc/acpi"
	"github.com/tamahv/tamahv/board/pc/efi"
)

// The golden files are what GRUB 2.06 (Debian 2.06-13+deb12u2) handed the
// probe in QEMU q35 with 1 GiB, from the ISO capture.sh builds: SeaBIOS
// and OVMF.
const (
	goldenBIOS = "testdata/grub-bios.mbi"
	goldenEFI  = "testdata/grub-efi.mbi"
	// goldenEFIAt is where GRUB EFI put the structure (EBX).
	goldenEFIAt = 0x55000
)

func golden(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return b
}

// wantModules are the modules of capture.sh's menu entry, with their
// sizes.
func checkModules(t *testing.T, mods []Module) {
	t.Helper()
	require.Len(t, mods, 3)
	assert.Equal(t, "vmlinuz root=UUID=0a1b2c3d-1234-5678-9abc-def012345678 ro quiet", mods[0].Cmdline)
	assert.Equal(t, "ucode", mods[1].Cmdline)
	assert.Equal(t, "initrd", mods[2].Cmdline)
	for i, size := range []uint32{300000, 40000, 1000000} {
		assert.Equal(t, size, mods[i].End-mods[i].Start, "module %d", i)
		assert.Zero(t, mods[i].Start%4096, "module %d page-aligned", i)
	}
}

func TestGoldenBIOS(t *testing.T) {
	in, err := ParseBytes(golden(t, goldenBIOS))
	require.NoError(t, err)
	assert.Equal(t, []uint32{
		TagLoadBaseAddr, TagCmdline, TagLoaderName, TagAPM, TagModule, TagModule, TagModule,
		TagMmap, TagELFSections, TagBasicMeminfo, TagBootDev, TagVBE, TagFramebuffer, TagACPIOld,
	}, in.Tags)
	assert.Equal(t, "hc.ring3=secret console=com1", in.Cmdline)
	assert.Equal(t, "GRUB 2.06-13+deb12u2", in.LoaderName)
	assert.Equal(t, uint32(0x1000f000), in.LoadBase)
	checkModules(t, in.Modules)
	assert.Equal(t, uint32(0x100000), in.Modules[0].Start, "the kernel at 1 MiB")
	assert.Equal(t, [2]uint32{639, 1047420}, [2]uint32{in.MemLower, in.MemUpper})
	assert.Equal(t, []MmapEntry{
		{0, 0x9fc00, 1}, {0x9fc00, 0x400, 2}, {0xf0000, 0x10000, 2}, {0x100000, 0x3fedf000, 1},
		{0x3ffdf000, 0x21000, 2}, {0xb0000000, 0x10000000, 2}, {0xfed1c000, 0x4000, 2},
		{0xfffc0000, 0x40000, 2}, {0xfd00000000, 0x300000000, 2},
	}, in.MemoryMap)
	assert.Equal(t, &Framebuffer{
		Addr: 0xfd000000, Pitch: 2400, Width: 800, Height: 600, BPP: 24, Type: FramebufferRGB,
		Red: ColorField{16, 8}, Green: ColorField{8, 8}, Blue: ColorField{0, 8},
	}, in.Framebuffer)
	r, err := acpi.Parse(in.ACPIOld)
	require.NoError(t, err)
	assert.Equal(t, uint8(0), r.Revision)
	assert.Equal(t, uint32(0x3ffe22e1), r.RSDT)
	assert.Nil(t, in.ACPINew)
	assert.Nil(t, in.EFIMemoryMap)
	assert.Zero(t, in.EFI64SystemTable)
	assert.False(t, in.EFIBootServices)
}

func TestGoldenEFI(t *testing.T) {
	in, err := ParseBytes(golden(t, goldenEFI))
	require.NoError(t, err)
	assert.Equal(t, []uint32{
		TagLoadBaseAddr, TagCmdline, TagLoaderName, TagModule, TagModule, TagModule, TagMmap,
		TagELFSections, TagBasicMeminfo, TagFramebuffer, TagEFI64, TagACPIOld, TagACPINew, TagEFIMmap,
	}, in.Tags)
	assert.Equal(t, "hc.ring3=secret console=com1", in.Cmdline)
	assert.Equal(t, uint32(0x1000f000), in.LoadBase)
	checkModules(t, in.Modules)
	assert.Less(t, in.Modules[0].Start, uint32(0x100000), "GRUB EFI puts modules in low memory")
	assert.Equal(t, uint64(0x3f5ec018), in.EFI64SystemTable)
	assert.False(t, in.EFIBootServices, "GRUB ended the boot services")
	assert.Equal(t, &Framebuffer{
		Addr: 0xc0000000, Pitch: 2400, Width: 800, Height: 600, BPP: 24, Type: FramebufferRGB,
		Red: ColorField{16, 8}, Green: ColorField{8, 8}, Blue: ColorField{0, 8},
	}, in.Framebuffer)

	// GRUB's own map calls EFI runtime services code type 20.
	assert.Contains(t, in.MemoryMap, MmapEntry{0x3f5ed000, 0x100000, 20})

	m := in.EFIMemoryMap
	require.NotNil(t, m)
	assert.Equal(t, uint32(48), m.DescriptorSize)
	assert.Equal(t, uint32(efi.DescriptorVersion), m.DescriptorVersion)
	assert.Len(t, m.Descriptors, 124)
	assert.Contains(t, m.Descriptors, efi.MemoryDescriptor{Type: efi.LoaderData, PhysicalStart: 0x1000f000, NumberOfPages: 0x7ff1, Attribute: 0xf},
		"the image's whole region, up to the address tag's bss_end_addr")
	assert.NoError(t, m.Covers(0x1000f000, 0x18000000, efi.LoaderData))

	old, err := acpi.Parse(in.ACPIOld)
	require.NoError(t, err)
	assert.Equal(t, acpi.RSDP{OEMID: [6]byte{'B', 'O', 'C', 'H', 'S', ' '}, RSDT: 0x3f77d000, Length: acpi.V1Length}, old)
	cur, err := acpi.Parse(in.ACPINew)
	require.NoError(t, err)
	assert.Equal(t, acpi.RSDP{OEMID: [6]byte{'B', 'O', 'C', 'H', 'S', ' '}, Revision: 2, RSDT: 0x3f77d074, Length: acpi.V2Length, XSDT: 0x3f77d0e8}, cur)
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

func TestParseFromMemory(t *testing.T) {
	b := golden(t, goldenEFI)
	mem := physMem{goldenEFIAt: b}
	in, err := Parse(mem, BootMagic, goldenEFIAt)
	require.NoError(t, err)
	assert.Len(t, in.Tags, 14)

	_, err = Parse(mem, 0x2badb002, goldenEFIAt)
	assert.ErrorIs(t, err, ErrBadInfo, "Multiboot 1 magic")
	_, err = Parse(mem, BootMagic, goldenEFIAt+4)
	assert.ErrorIs(t, err, ErrBadInfo, "not 8-aligned")
	_, err = Parse(mem, BootMagic, 0x9000)
	assert.ErrorIs(t, err, ErrBadInfo, "nothing there")

	// A total size beyond MaxInfoSize is refused before anything is
	// allocated for it; one past the memory is refused by the read.
	huge := append([]byte(nil), b...)
	binary.LittleEndian.PutUint32(huge, 0xfffffff8)
	_, err = Parse(physMem{goldenEFIAt: huge}, BootMagic, goldenEFIAt)
	assert.ErrorIs(t, err, ErrBadInfo)
	binary.LittleEndian.PutUint32(huge, uint32(len(b)+8))
	_, err = Parse(physMem{goldenEFIAt: huge}, BootMagic, goldenEFIAt)
	assert.ErrorIs(t, err, ErrBadInfo)
}

// info builds a boot information structure from tags, each given as its
// type and body; the end tag is added.
func info(tags ...any) []byte {
	le := binary.LittleEndian
	b := make([]byte, 8)
	for i := 0; i < len(tags); i += 2 {
		body := tags[i+1].([]byte)
		t := make([]byte, 8, 8+len(body))
		le.PutUint32(t, tags[i].(uint32))
		le.PutUint32(t[4:], uint32(8+len(body)))
		t = append(t, body...)
		b = append(b, t...)
		b = append(b, make([]byte, align8(len(b))-len(b))...)
	}
	b = append(b, 0, 0, 0, 0, 8, 0, 0, 0)
	le.PutUint32(b, uint32(len(b)))
	return b
}

func u32s(vs ...uint32) []byte {
	b := make([]byte, 4*len(vs))
	for i, v := range vs {
		binary.LittleEndian.PutUint32(b[4*i:], v)
	}
	return b
}

func TestParseSyntheticTags(t *testing.T) {
	indexed := make([]byte, 24)
	binary.LittleEndian.PutUint64(indexed, 0xa0000)
	copy(indexed[8:], u32s(320, 320, 200)) // pitch, width, height
	indexed[20], indexed[21] = 8, FramebufferIndexed
	indexed = append(indexed, 2, 0, 1, 2, 3, 0xfc, 0xfd, 0xfe) // 2 colours
	b := info(
		uint32(TagEFI32), u32s(0x7f000000),
		uint32(99), []byte("an unknown tag is skipped"),
		uint32(TagFramebuffer), indexed,
		uint32(TagEFIBS), []byte{},
		uint32(TagLoaderName), []byte("loader\x00"),
	)
	in, err := ParseBytes(b)
	require.NoError(t, err)
	assert.Equal(t, []uint32{TagEFI32, 99, TagFramebuffer, TagEFIBS, TagLoaderName}, in.Tags)
	assert.Equal(t, uint32(0x7f000000), in.EFI32SystemTable)
	assert.True(t, in.EFIBootServices, "tag 18: the boot services still run")
	assert.True(t, in.Has(TagEFIBS))
	assert.False(t, in.Has(TagEFI64))
	assert.Equal(t, "loader", in.LoaderName)
	require.NotNil(t, in.Framebuffer)
	assert.Equal(t, []Color{{1, 2, 3}, {0xfc, 0xfd, 0xfe}}, in.Framebuffer.Palette)
	assert.Equal(t, uint32(320), in.Framebuffer.Width)

	ega := make([]byte, 24)
	binary.LittleEndian.PutUint64(ega, 0xb8000)
	ega[20], ega[21] = 16, FramebufferEGAText
	in, err = ParseBytes(info(uint32(TagFramebuffer), ega))
	require.NoError(t, err)
	assert.Equal(t, uint64(0xb8000), in.Framebuffer.Addr)
	assert.Equal(t, uint8(FramebufferEGAText), in.Framebuffer.Type)
}

func TestParseRejectsMalformed(t *testing.T) {
	le := binary.LittleEndian
	// Offsets in the EFI golden: the first tag (21) at 8, the command
	// line (tag 1) at 24, the memory map (tag 6) and the EFI memory map
	// (tag 17) found by walking.
	b := golden(t, goldenEFI)
	find := func(typ uint32) int {
		for off := 8; off < len(b); off += align8(int(le.Uint32(b[off+4:]))) {
			if le.Uint32(b[off:]) == typ {
				return off
			}
		}
		t.Fatalf("no tag %d", typ)
		return 0
	}
	cmdline, mmap, efiMmap, module, fb := find(TagCmdline), find(TagMmap), find(TagEFIMmap), find(TagModule), find(TagFramebuffer)
	end := len(b) - 8
	for name, mutate := range map[string]func(b []byte) []byte{
		"total size below 16":      func(b []byte) []byte { le.PutUint32(b, 8); return b },
		"total size past the data": func(b []byte) []byte { le.PutUint32(b, uint32(len(b)+8)); return b },
		"truncated":                func(b []byte) []byte { return b[:12] },
		"no end tag": func(b []byte) []byte {
			le.PutUint32(b, uint32(end))
			return b[:end]
		},
		"end tag size":           func(b []byte) []byte { le.PutUint32(b[end+4:], 16); return b },
		"tag size below 8":       func(b []byte) []byte { le.PutUint32(b[cmdline+4:], 4); return b },
		"tag past the end":       func(b []byte) []byte { le.PutUint32(b[cmdline+4:], uint32(len(b))); return b },
		"tag size near 2^32":     func(b []byte) []byte { le.PutUint32(b[cmdline+4:], 0xfffffff9); return b },
		"command line not ended": func(b []byte) []byte { b[cmdline+8+len("hc.ring3=secret console=com1")] = 'x'; return b },
		"second command line":    func(b []byte) []byte { le.PutUint32(b[8:], TagCmdline); return b },
		"mmap entry size 20":     func(b []byte) []byte { le.PutUint32(b[mmap+8:], 20); return b },
		"mmap entry size huge":   func(b []byte) []byte { le.PutUint32(b[mmap+8:], 0x80000000); return b },
		"mmap partial entry":     func(b []byte) []byte { le.PutUint32(b[mmap+4:], le.Uint32(b[mmap+4:])-8); return b },
		"EFI descriptor size 0":  func(b []byte) []byte { le.PutUint32(b[efiMmap+8:], 0); return b },
		"EFI descriptor size 41": func(b []byte) []byte { le.PutUint32(b[efiMmap+8:], 41); return b },
		"EFI descriptor past 2^64": func(b []byte) []byte {
			le.PutUint64(b[efiMmap+16+8:], 0xfffffffffffff000) // first descriptor's start
			return b
		},
		"module ends first": func(b []byte) []byte { le.PutUint32(b[module+12:], 0); return b },
		"framebuffer type":  func(b []byte) []byte { b[fb+8+21] = 7; return b },
		"RGB without colours": func(b []byte) []byte {
			le.PutUint32(b[fb+4:], 8+24)
			return b
		},
	} {
		_, err := ParseBytes(mutate(append([]byte(nil), b...)))
		assert.ErrorIs(t, err, ErrBadInfo, name)
	}

	var many []any
	for range MaxModules + 1 {
		many = append(many, uint32(TagModule), append(u32s(0x100000, 0x200000), 0))
	}
	_, err := ParseBytes(info(many...))
	assert.ErrorIs(t, err, ErrBadInfo, "too many modules")
	palette := make([]byte, 24+2)
	palette[21] = FramebufferIndexed
	le.PutUint16(palette[24:], 1000)
	_, err = ParseBytes(info(uint32(TagFramebuffer), palette))
	assert.ErrorIs(t, err, ErrBadInfo, "palette past its tag")
}
