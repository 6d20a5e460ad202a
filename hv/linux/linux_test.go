package linux

import (
	"encoding/binary"
	"fmt"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv"
)

// sparseMem is guest memory for the loader tests.
type sparseMem map[uint64]byte

func (m sparseMem) ReadPhys(pa uint64, p []byte) error {
	for i := range p {
		p[i] = m[pa+uint64(i)]
	}
	return nil
}

func (m sparseMem) WritePhys(pa uint64, p []byte) error {
	for i, b := range p {
		m[pa+uint64(i)] = b
	}
	return nil
}

func (m sparseMem) CopyPhys(dst, src, n uint64) error {
	tmp := make([]byte, n)
	_ = m.ReadPhys(src, tmp)
	return m.WritePhys(dst, tmp)
}

func (m sparseMem) u32(pa uint64) uint32 {
	b := make([]byte, 4)
	_ = m.ReadPhys(pa, b)
	return binary.LittleEndian.Uint32(b)
}

// fakeBzImage is a bzImage with the given setup sectors and a payload
// after them.
func fakeBzImage(version uint16, payload []byte) []byte {
	b := make([]byte, 5*512)
	le := binary.LittleEndian
	b[hdrSetupSects] = 4
	le.PutUint16(b[hdrBootFlag:], 0xaa55)
	b[hdrJumpEnd] = 0x6a
	copy(b[hdrMagic:], "HdrS")
	le.PutUint16(b[hdrVersion:], version)
	le.PutUint32(b[hdrCode32Start:], 0x100000)
	le.PutUint32(b[hdrInitrdMax:], 0x7fffffff)
	le.PutUint32(b[hdrCmdlineSize:], 2047)
	le.PutUint32(b[hdrInitSize:], 0x03000000)
	return append(b, payload...)
}

func TestGuestE820CutsOutTamahv(t *testing.T) {
	got := GuestE820(machineMap, [][2]uint64{{0x10000000, 0x18000000}})
	assert.Equal(t, []hv.E820Entry{
		{Addr: 0, Size: 0x9fc00, Type: hv.E820RAM},
		{Addr: 0x9fc00, Size: 0x400, Type: hv.E820Reserved},
		{Addr: 0xf0000, Size: 0x10000, Type: hv.E820Reserved},
		{Addr: 0x100000, Size: 0x10000000 - 0x100000, Type: hv.E820RAM},
		{Addr: 0x10000000, Size: 0x08000000, Type: hv.E820Reserved},
		{Addr: 0x18000000, Size: 0x3fff0000 - 0x18000000, Type: hv.E820RAM},
		{Addr: 0x3fff0000, Size: 0x10000, Type: hv.E820ACPI},
	}, got)
}

func TestLoadLinux(t *testing.T) {
	m := sparseMem{}
	payload := []byte("protected-mode kernel")
	img := fakeBzImage(0x020f, payload)
	require.NoError(t, m.WritePhys(0x20000000, img))
	initrd := []byte("initramfs")
	require.NoError(t, m.WritePhys(0x21000000, initrd))
	l := &Boot{
		KernelPA: 0x20000000, KernelLen: uint64(len(img)),
		Initrds: [][2]uint64{{0x21000000, uint64(len(initrd))}},
		Cmdline: "console=ttyS1", Map: machineMap, Reserved: [][2]uint64{{0x10000000, 0x18000000}},
	}
	s, err := l.Load(m)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x100000), s.RIP)
	assert.Equal(t, uint64(BootParamsAddr), s.RSI)
	assert.Equal(t, uint64(0x3fff0000-0x1000), s.InitrdPA, "at the top of RAM, page aligned")
	got := make([]byte, len(payload))
	require.NoError(t, m.ReadPhys(KernelAddr, got))
	assert.Equal(t, payload, got)
	require.NoError(t, m.ReadPhys(s.InitrdPA, got[:len(initrd)]))
	assert.Equal(t, initrd, got[:len(initrd)])
	assert.Equal(t, uint32(CmdlineAddr), m.u32(BootParamsAddr+hdrCmdLinePtr))
	assert.Equal(t, uint32(s.InitrdPA), m.u32(BootParamsAddr+hdrRamdiskImage))
	assert.Equal(t, uint32(len(initrd)), m.u32(BootParamsAddr+hdrRamdiskSize))
	assert.Equal(t, byte(0xff), m[BootParamsAddr+hdrTypeOfLoader])
	assert.Equal(t, byte(7), m[BootParamsAddr+bpE820Entries])
	assert.Equal(t, uint32(0x10000000), m.u32(BootParamsAddr+bpE820Table+4*20), "tamahv's region is listed reserved")
	assert.Equal(t, uint32(hv.E820Reserved), m.u32(BootParamsAddr+bpE820Table+4*20+16))
	cmd := make([]byte, 14)
	require.NoError(t, m.ReadPhys(CmdlineAddr, cmd))
	assert.Equal(t, "console=ttyS1\x00", string(cmd))
	assert.Equal(t, uint32(0x0000ffff), m.u32(GDTAddr+bootCS))
	assert.Equal(t, uint32(0x00cf9b00), m.u32(GDTAddr+bootCS+4))
	assert.Zero(t, m.u32(BootParamsAddr+bpACPIRSDPAddr), "no RSDP given: none written")
}

// prefBzImage is a bzImage that prefers to run at pref and decompresses
// into initSize bytes there.
func prefBzImage(pref, initSize uint64, payload []byte) []byte {
	b := fakeBzImage(0x020f, payload)
	binary.LittleEndian.PutUint64(b[hdrPrefAddress:], pref)
	binary.LittleEndian.PutUint32(b[hdrInitSize:], uint32(initSize))
	binary.LittleEndian.PutUint32(b[hdrKernelAlign:], 0x200000)
	return b
}

// TestLoadLinuxAtItsPreferredAddress: Debian's kernel prefers 16 MiB and
// decompresses into about 63 MiB there. The kernel goes there, entered
// there, and the initrd stays clear of all of it, wherever the modules
// lie: here the initrd module itself lies in the kernel's area (it is
// copied away first).
func TestLoadLinuxAtItsPreferredAddress(t *testing.T) {
	m := sparseMem{}
	img := prefBzImage(0x1000000, 0x3f00000, []byte("protected-mode kernel"))
	require.NoError(t, m.WritePhys(0x20000000, img))
	initrd := []byte("initramfs in the kernel's way")
	require.NoError(t, m.WritePhys(0x2000000, initrd))
	l := &Boot{KernelPA: 0x20000000, KernelLen: uint64(len(img)), Initrds: [][2]uint64{{0x2000000, uint64(len(initrd))}},
		Map: machineMap, Reserved: [][2]uint64{{0x10000000, 0x18000000}}}
	s, err := l.Load(m)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x1000000), s.KernelPA)
	assert.Equal(t, uint64(0x1000000), s.RIP)
	assert.Equal(t, uint32(0x1000000), m.u32(BootParamsAddr+hdrCode32Start))
	got := make([]byte, len(initrd))
	require.NoError(t, m.ReadPhys(s.InitrdPA, got))
	assert.Equal(t, initrd, got)
	assert.False(t, overlaps(s.InitrdPA, s.InitrdLen, 0x1000000, 0x3f00000), "the initrd spares the decompression area")
	got = make([]byte, len("protected-mode kernel"))
	require.NoError(t, m.ReadPhys(0x1000000, got))
	assert.Equal(t, "protected-mode kernel", string(got))
}

// TestLoadLinuxLargeAndSeveralInitrds: a 200 MiB initrd goes above
// tamahv's region where the RAM is; two initrd modules become one initrd,
// the second 4-byte aligned after the first.
func TestLoadLinuxLargeAndSeveralInitrds(t *testing.T) {
	img := prefBzImage(0x1000000, 0x3f00000, []byte("k"))
	cm := &copyLog{sparseMem: sparseMem{}}
	require.NoError(t, cm.WritePhys(0x30000000, img))
	big := uint64(200 << 20)
	l := &Boot{KernelPA: 0x30000000, KernelLen: uint64(len(img)), Initrds: [][2]uint64{{0x20000000, big}},
		Map: machineMap, Reserved: [][2]uint64{{0x10000000, 0x18000000}}}
	s, err := l.Load(cm)
	require.NoError(t, err)
	assert.Equal(t, big, s.InitrdLen)
	assert.Contains(t, cm.copies, [3]uint64{s.InitrdPA, 0x20000000, big}, "copied whole")
	assert.GreaterOrEqual(t, s.InitrdPA, uint64(0x18000000), "above tamahv")
	for _, r := range [][2]uint64{{0x20000000, big}, {0x30000000, uint64(len(img))}} {
		assert.False(t, overlaps(s.InitrdPA, big, r[0], r[1]), "spares the module at %#x", r[0])
	}

	m := sparseMem{}
	require.NoError(t, m.WritePhys(0x30000000, img))
	require.NoError(t, m.WritePhys(0x21000000, []byte("early")))
	require.NoError(t, m.WritePhys(0x22000000, []byte("main")))
	l.Initrds = [][2]uint64{{0x21000000, 5}, {0x22000000, 4}}
	s, err = l.Load(m)
	require.NoError(t, err)
	assert.Equal(t, uint64(12), s.InitrdLen, "5 bytes, 3 of padding, 4 bytes")
	got := make([]byte, 12)
	require.NoError(t, m.ReadPhys(s.InitrdPA, got))
	assert.Equal(t, "early\x00\x00\x00main", string(got))
	assert.Equal(t, uint32(12), m.u32(BootParamsAddr+hdrRamdiskSize))
}

// copyLog is sparseMem that records large copies instead of making them.
type copyLog struct {
	sparseMem
	copies [][3]uint64 // dst, src, n
}

func (c *copyLog) CopyPhys(dst, src, n uint64) error {
	c.copies = append(c.copies, [3]uint64{dst, src, n})
	if n > 1<<20 {
		return nil
	}
	return c.sparseMem.CopyPhys(dst, src, n)
}

// TestIsBzImage: the kernel is told by its header, not its name.
func TestIsBzImage(t *testing.T) {
	m := sparseMem{}
	img := fakeBzImage(0x020f, []byte("k"))
	require.NoError(t, m.WritePhys(0x1000, img))
	require.NoError(t, m.WritePhys(0x10000, []byte("070701 a cpio archive")))
	assert.True(t, IsBzImage(m, 0x1000, uint64(len(img))))
	assert.False(t, IsBzImage(m, 0x10000, 4096), "an initramfs")
	assert.False(t, IsBzImage(m, 0x1000, 0x100), "too short to hold the header")
}

// TestLoadLinuxTellsTheRSDP: on UEFI the kernel finds ACPI only where it
// is told (boot_params.acpi_rsdp_addr, boot protocol 2.14); an older
// kernel cannot be told, and is refused.
func TestLoadLinuxTellsTheRSDP(t *testing.T) {
	m := sparseMem{}
	img := fakeBzImage(0x020f, []byte("k"))
	require.NoError(t, m.WritePhys(0x20000000, img))
	l := &Boot{KernelPA: 0x20000000, KernelLen: uint64(len(img)), Map: machineMap,
		Reserved: [][2]uint64{{0x10000000, 0x18000000}}, RSDP: 0x3f77e014}
	_, err := l.Load(m)
	require.NoError(t, err)
	assert.Equal(t, uint32(0x3f77e014), m.u32(BootParamsAddr+bpACPIRSDPAddr))
	assert.Zero(t, m.u32(BootParamsAddr+bpACPIRSDPAddr+4))

	old := fakeBzImage(0x020d, []byte("k"))
	require.NoError(t, m.WritePhys(0x20000000, old))
	_, err = l.Load(m)
	assert.ErrorIs(t, err, ErrProtocol)
}

// TestLoadLinuxKernelModuleInPlace: GRUB left the kernel module at 1 MiB,
// where the protected-mode kernel goes; the copy moves it down over itself.
func TestLoadLinuxKernelModuleInPlace(t *testing.T) {
	m := sparseMem{}
	payload := []byte("protected-mode kernel, long enough to overlap its own copy")
	img := fakeBzImage(0x020f, payload)
	require.NoError(t, m.WritePhys(KernelAddr, img))
	l := &Boot{KernelPA: KernelAddr, KernelLen: uint64(len(img)), Map: machineMap, Reserved: [][2]uint64{{0x10000000, 0x18000000}}}
	_, err := l.Load(m)
	require.NoError(t, err)
	got := make([]byte, len(payload))
	require.NoError(t, m.ReadPhys(KernelAddr, got))
	assert.Equal(t, payload, got)
}

func TestLoadLinuxRefusals(t *testing.T) {
	for name, tc := range map[string]struct {
		img    []byte
		mutate func(l *Boot)
		want   error
	}{
		"not a bzImage":         {img: make([]byte, 4096), want: ErrNotBzImage},
		"old protocol":          {img: fakeBzImage(0x0209, []byte("k")), want: ErrProtocol},
		"long cmdline":          {img: fakeBzImage(0x020f, []byte("k")), mutate: func(l *Boot) { l.Cmdline = string(make([]byte, 3000)) }, want: ErrLayout},
		"initrd too big":        {img: fakeBzImage(0x020f, []byte("k")), mutate: func(l *Boot) { l.Initrds[0][1] = 0x3f000000 }, want: ErrLayout},
		"initrd over 4 GiB":     {img: fakeBzImage(0x020f, []byte("k")), mutate: func(l *Boot) { l.Initrds[0][1] = 1 << 33 }, want: ErrLayout},
		"kernel area in tamahv": {img: prefBzImage(0x0f000000, 0x03000000, []byte("k")), want: ErrLayout},
		"kernel area not RAM":   {img: prefBzImage(0x3f000000, 0x03000000, []byte("k")), want: ErrLayout},
		"tiny":                  {img: []byte("MZ"), want: ErrNotBzImage},
	} {
		l := &Boot{KernelPA: 0x20000000, KernelLen: uint64(len(tc.img)), Initrds: [][2]uint64{{0x21000000, 16}},
			Map: machineMap, Reserved: [][2]uint64{{0x10000000, 0x18000000}}}
		if tc.mutate != nil {
			tc.mutate(l)
		}
		m := sparseMem{}
		require.NoError(t, m.WritePhys(l.KernelPA, tc.img))
		_, err := l.Load(m)
		assert.ErrorIs(t, err, tc.want, name)
	}
}

// TestLoadDebianKernelHeader reads the header of the Debian kernel the
// guest payload uses, when it has been unpacked (make payload).
func TestLoadDebianKernelHeader(t *testing.T) {
	img, err := os.ReadFile("../build/payload/vmlinuz")
	if err != nil {
		t.Skip("no build/payload/vmlinuz (make payload)")
	}
	m := sparseMem{}
	require.NoError(t, m.WritePhys(0x20000000, img[:65536]))
	l := &Boot{KernelPA: 0x20000000, KernelLen: 65536, Map: machineMap, Reserved: [][2]uint64{{0x10000000, 0x18000000}}}
	s, err := l.Load(m)
	require.NoError(t, err)
	assert.GreaterOrEqual(t, s.ProtocolVersion, uint16(0x020f), fmt.Sprintf("%#x", s.ProtocolVersion))
	assert.Equal(t, uint64(0x1000000), s.RIP, "at its preferred address, 16 MiB")
	assert.Equal(t, s.KernelPA, s.RIP)
	assert.True(t, IsBzImage(m, 0x20000000, 65536))
}

// TestLoadLinuxTellsTheEFI: on UEFI the kernel gets the system table and
// the memory map's copy in boot_params.efi_info ("EL64"), the copy
// written at LinuxEFIMap; a map that is not whole descriptors, or too
// large for its place, is refused.
func TestLoadLinuxTellsTheEFI(t *testing.T) {
	m := sparseMem{}
	img := fakeBzImage(0x020f, []byte("k"))
	require.NoError(t, m.WritePhys(0x20000000, img))
	desc := make([]byte, 3*48)
	for i := range desc {
		desc[i] = byte(i)
	}
	l := &Boot{KernelPA: 0x20000000, KernelLen: uint64(len(img)), Map: machineMap, Reserved: [][2]uint64{{0x10000000, 0x18000000}},
		EFI: &EFI{SystemTable: 0x1_3f5e_c018, MemoryMap: desc, DescriptorSize: 48, DescriptorVersion: 1}}
	_, err := l.Load(m)
	require.NoError(t, err)
	got := make([]byte, 4)
	require.NoError(t, m.ReadPhys(BootParamsAddr+bpEFIInfo, got))
	assert.Equal(t, "EL64", string(got))
	assert.Equal(t, uint32(0x3f5ec018), m.u32(BootParamsAddr+bpEFIInfo+4), "system table, low")
	assert.Equal(t, uint32(1), m.u32(BootParamsAddr+bpEFIInfo+24), "system table, high")
	assert.Equal(t, uint32(48), m.u32(BootParamsAddr+bpEFIInfo+8))
	assert.Equal(t, uint32(1), m.u32(BootParamsAddr+bpEFIInfo+12))
	assert.Equal(t, uint32(EFIMapAddr), m.u32(BootParamsAddr+bpEFIInfo+16))
	assert.Equal(t, uint32(len(desc)), m.u32(BootParamsAddr+bpEFIInfo+20))
	copied := make([]byte, len(desc))
	require.NoError(t, m.ReadPhys(EFIMapAddr, copied))
	assert.Equal(t, desc, copied)

	for name, e := range map[string]*EFI{
		"part of a descriptor": {SystemTable: 1, MemoryMap: desc[:100], DescriptorSize: 48},
		"too small a stride":   {SystemTable: 1, MemoryMap: desc, DescriptorSize: 16},
		"too large":            {SystemTable: 1, MemoryMap: make([]byte, 48*20000), DescriptorSize: 48},
		"no system table":      {MemoryMap: desc, DescriptorSize: 48},
	} {
		l.EFI = e
		_, err := l.Load(m)
		assert.ErrorIs(t, err, ErrLayout, name)
	}
}

// TestLoadLinuxTellsTheFramebuffer: the framebuffer the boot loader left
// reaches the kernel as screen_info: an EFI GOP one as VIDEO_TYPE_EFI, its
// base above 4 GiB in ext_lfb_base; a bad mode is refused.
func TestLoadLinuxTellsTheFramebuffer(t *testing.T) {
	m := sparseMem{}
	img := fakeBzImage(0x020f, []byte("k"))
	require.NoError(t, m.WritePhys(0x20000000, img))
	fb := &Framebuffer{Base: 0x4_c000_0000, Pitch: 3200, Width: 800, Height: 600, BPP: 32,
		RedPos: 16, RedSize: 8, GreenPos: 8, GreenSize: 8, BluePos: 0, BlueSize: 8, ReservedPos: 24, ReservedSize: 8, EFI: true}
	l := &Boot{KernelPA: 0x20000000, KernelLen: uint64(len(img)), Map: machineMap, Reserved: [][2]uint64{{0x10000000, 0x18000000}}, Framebuffer: fb}
	_, err := l.Load(m)
	require.NoError(t, err)
	si := make([]byte, 0x40)
	require.NoError(t, m.ReadPhys(BootParamsAddr, si))
	le := binary.LittleEndian
	assert.Equal(t, byte(0x70), si[0x0f], "VIDEO_TYPE_EFI")
	assert.Equal(t, []uint16{800, 600, 32}, []uint16{le.Uint16(si[0x12:]), le.Uint16(si[0x14:]), le.Uint16(si[0x16:])})
	assert.Equal(t, uint32(0xc0000000), le.Uint32(si[0x18:]), "lfb_base")
	assert.Equal(t, uint32(3200*600), le.Uint32(si[0x1c:]), "lfb_size")
	assert.Equal(t, uint16(3200), le.Uint16(si[0x24:]), "lfb_linelength")
	assert.Equal(t, []byte{8, 16, 8, 8, 8, 0, 8, 24}, si[0x26:0x2e], "red, green, blue, reserved: size and position")
	assert.Equal(t, uint32(1<<1), le.Uint32(si[0x36:]), "VIDEO_CAPABILITY_64BIT_BASE")
	assert.Equal(t, uint32(4), le.Uint32(si[0x3a:]), "ext_lfb_base")

	l.Framebuffer = &Framebuffer{Base: 0xfd000000, Pitch: 2400, Width: 800, Height: 0, BPP: 24}
	_, err = l.Load(m)
	assert.ErrorIs(t, err, ErrLayout, "no height")
}

// TestLoadLinuxLongMemoryMap: a memory map of more than 128 entries (a
// firmware's EFI map, converted) reaches the kernel whole: the first 128
// in the zero page, the rest in a SETUP_E820_EXT setup_data.
func TestLoadLinuxLongMemoryMap(t *testing.T) {
	m := sparseMem{}
	img := fakeBzImage(0x020f, []byte("k"))
	require.NoError(t, m.WritePhys(0x20000000, img))
	mm := append([]hv.E820Entry{}, machineMap...)
	for i := range uint64(200) { // RAM above 4 GiB, in pages with holes
		mm = append(mm, hv.E820Entry{Addr: 0x1_0000_0000 + i*0x2000, Size: 0x1000, Type: hv.E820RAM})
	}
	l := &Boot{KernelPA: 0x20000000, KernelLen: uint64(len(img)), Map: mm, Reserved: [][2]uint64{{0x10000000, 0x18000000}}}
	s, err := l.Load(m)
	require.NoError(t, err)
	total := len(s.E820)
	require.Greater(t, total, 128)
	assert.Equal(t, byte(128), m[BootParamsAddr+bpE820Entries])
	le := binary.LittleEndian
	sdPtr := make([]byte, 8)
	require.NoError(t, m.ReadPhys(BootParamsAddr+hdrSetupData, sdPtr))
	require.Equal(t, uint64(SetupDataAddr), le.Uint64(sdPtr))
	hdr := make([]byte, 16)
	require.NoError(t, m.ReadPhys(SetupDataAddr, hdr))
	assert.Zero(t, le.Uint64(hdr), "the only setup_data")
	assert.Equal(t, uint32(1), le.Uint32(hdr[8:]), "SETUP_E820_EXT")
	assert.Equal(t, uint32(20*(total-128)), le.Uint32(hdr[12:]))
	last := make([]byte, 20)
	require.NoError(t, m.ReadPhys(SetupDataAddr+16+20*uint64(total-129), last))
	assert.Equal(t, s.E820[total-1].Addr, le.Uint64(last), "the last entry, in the setup_data")

	for i := range uint64(2000) {
		mm = append(mm, hv.E820Entry{Addr: 0x2_0000_0000 + i*0x2000, Size: 0x1000, Type: hv.E820RAM})
	}
	l.Map = mm
	_, err = l.Load(m)
	assert.ErrorIs(t, err, ErrLayout, "more entries than the setup_data's place holds")
}

// machineMap is the test machine's memory map below 4 GiB.
var machineMap = []hv.E820Entry{
	{Addr: 0, Size: 0x9fc00, Type: hv.E820RAM},
	{Addr: 0x9fc00, Size: 0x400, Type: hv.E820Reserved},
	{Addr: 0xf0000, Size: 0x10000, Type: hv.E820Reserved},
	{Addr: 0x100000, Size: 0x3fef0000, Type: hv.E820RAM},
	{Addr: 0x3fff0000, Size: 0x10000, Type: hv.E820ACPI},
}
