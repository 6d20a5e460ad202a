// Package linux loads a Linux kernel as a guest with the 32-bit boot
// protocol (Documentation/arch/x86/boot.rst): it tells the kernel by its
// header, places the kernel, its initramfs and the boot parameters in
// guest memory, writes what the kernel needs to know of the machine
// (memory map, ACPI, EFI, framebuffer) and returns the guest state the
// protocol starts from (hv.Start).
package linux

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"

	"github.com/tamahv/tamahv/hv"
)

// Where the loader puts things in guest memory (all below 1 MiB, clear of
// the real-mode IVT, BDA and EBDA).
const (
	GDTAddr        = 0x6000
	BootParamsAddr = 0x7000
	CmdlineAddr    = 0x9000
	EFIMapAddr     = 0xa000 // the EFI memory map's copy, up to EFIMapEnd
	EFIMapEnd      = 0x90000
	// SetupDataAddr holds the memory map's entries beyond the zero
	// page's 128 (a SETUP_E820_EXT setup_data), up to SetupDataEnd.
	SetupDataAddr = 0x98000
	SetupDataEnd  = 0x9f000
	KernelAddr    = 0x100000 // the protected-mode kernel
	bootCS        = 0x10     // __BOOT_CS
	bootDS        = 0x18     // __BOOT_DS
	maxE820       = 128
)

// Boot describes a Linux kernel to boot with the 32-bit boot protocol
// (Documentation/arch/x86/boot.rst, "32-bit Boot Protocol").
type Boot struct {
	// Kernel is the bzImage where the boot loader left it (a module).
	KernelPA, KernelLen uint64
	// Initrds are the parts of the initramfs where the boot loader left
	// them (modules, address and length), in order: the guest gets them
	// one after the other, each starting 4-byte aligned, as one initrd
	// (the kernel unpacks archives laid end to end, each compressed or
	// not).
	Initrds [][2]uint64
	Cmdline string
	// Map is the machine's memory map; Reserved ranges (tamahv's own
	// memory) become E820Reserved in the guest's map.
	Map      []hv.E820Entry
	Reserved [][2]uint64
	// RSDP is the ACPI RSDP's physical address, written to
	// boot_params.acpi_rsdp_addr (boot protocol 2.14 and later); 0: none.
	RSDP uint64
	// EFI, on UEFI firmware, is what the kernel is told of it
	// (boot_params.efi_info); nil: nothing (BIOS).
	EFI *EFI
	// Framebuffer is the linear framebuffer the boot loader left
	// (boot_params.screen_info); nil: none (a VGA text console).
	Framebuffer *Framebuffer
}

// Framebuffer is a linear framebuffer of direct colour, as a kernel's
// efifb or vesafb driver takes it over.
type Framebuffer struct {
	Base                 uint64
	Pitch, Width, Height uint32
	BPP                  uint8
	// The colours' bit positions and sizes in a pixel.
	RedPos, RedSize, GreenPos, GreenSize, BluePos, BlueSize, ReservedPos, ReservedSize uint8
	// EFI says the firmware's GOP set it up (VIDEO_TYPE_EFI), else a VESA
	// mode (VIDEO_TYPE_VLFB).
	EFI bool
}

// screen_info's video types and capabilities (include/uapi/linux/screen_info.h).
const (
	videoTypeVLFB         = 0x23
	videoTypeEFI          = 0x70
	videoCapability64Base = 1 << 1
)

// putScreenInfo writes fb as boot_params.screen_info at the start of bp.
func putScreenInfo(bp []byte, fb *Framebuffer) {
	le := binary.LittleEndian
	bp[0x0f] = videoTypeVLFB
	if fb.EFI {
		bp[0x0f] = videoTypeEFI
	}
	le.PutUint16(bp[0x12:], uint16(fb.Width))
	le.PutUint16(bp[0x14:], uint16(fb.Height))
	le.PutUint16(bp[0x16:], uint16(fb.BPP))
	le.PutUint32(bp[0x18:], uint32(fb.Base))
	le.PutUint32(bp[0x1c:], fb.Pitch*fb.Height)
	le.PutUint16(bp[0x24:], uint16(fb.Pitch))
	copy(bp[0x26:0x2e], []byte{fb.RedSize, fb.RedPos, fb.GreenSize, fb.GreenPos, fb.BlueSize, fb.BluePos, fb.ReservedSize, fb.ReservedPos})
	if hi := uint32(fb.Base >> 32); hi != 0 {
		le.PutUint32(bp[0x36:], videoCapability64Base)
		le.PutUint32(bp[0x3a:], hi)
	}
}

// EFI is what a kernel booted on UEFI firmware, after the boot
// services ended, needs to use the runtime services: the system table
// and the memory map, whose copy the loader writes at EFIMapAddr.
type EFI struct {
	SystemTable uint64
	// MemoryMap is the memory map's descriptors as the firmware lays
	// them out, DescriptorSize bytes each.
	MemoryMap                         []byte
	DescriptorSize, DescriptorVersion uint32
}

// Errors of the Linux loader.
var (
	ErrNotBzImage = errors.New("linux: not a Linux bzImage (no HdrS header)")
	ErrProtocol   = errors.New("linux: boot protocol too old (need 2.10 or later)")
	ErrLayout     = errors.New("linux: guest memory layout")
)

// setup header offsets in the bzImage and in boot_params.
const (
	hdrSetupSects   = 0x1f1
	hdrBootFlag     = 0x1fe
	hdrJumpEnd      = 0x201
	hdrMagic        = 0x202
	hdrVersion      = 0x206
	hdrTypeOfLoader = 0x210
	hdrLoadFlags    = 0x211
	hdrCode32Start  = 0x214
	hdrRamdiskImage = 0x218
	hdrRamdiskSize  = 0x21c
	hdrHeapEndPtr   = 0x224
	hdrCmdLinePtr   = 0x228
	hdrInitrdMax    = 0x22c
	hdrCmdlineSize  = 0x238
	hdrKernelAlign  = 0x230
	hdrPrefAddress  = 0x258
	hdrInitSize     = 0x260
	bpACPIRSDPAddr  = 0x070
	bpEFIInfo       = 0x1c0 // struct efi_info
	efiLoader64     = "EL64"
	bpE820Entries   = 0x1e8
	hdrSetupData    = 0x250 // u64: the first setup_data (boot protocol 2.09)
	setupE820Ext    = 1
	bpE820Table     = 0x2d0
)

// IsBzImage reports whether the n bytes at pa are a Linux bzImage: the
// boot sector's 0xaa55 and the setup header's "HdrS" (boot protocol 2.00
// or later). Boot loaders hand files over by position and name; tamahv
// tells the kernel by its header.
func IsBzImage(m hv.PhysReader, pa, n uint64) bool {
	if n < hdrMagic+4 {
		return false
	}
	var b [hdrMagic + 4]byte
	if m.ReadPhys(pa, b[:]) != nil {
		return false
	}
	return binary.LittleEndian.Uint16(b[hdrBootFlag:]) == 0xaa55 && string(b[hdrMagic:]) == "HdrS"
}

// Load copies the kernel and initrd into place, writes the boot
// parameters, command line and GDT, and returns the entry state.
func (l *Boot) Load(m hv.Memory) (*hv.Start, error) {
	if l.KernelLen < 0x264 || l.KernelLen > 256<<20 {
		return nil, fmt.Errorf("%w: kernel of %d bytes", ErrNotBzImage, l.KernelLen)
	}
	hdr := make([]byte, 0x264)
	if err := m.ReadPhys(l.KernelPA, hdr); err != nil {
		return nil, fmt.Errorf("linux: reading the kernel header: %w", err)
	}
	le := binary.LittleEndian
	if string(hdr[hdrMagic:hdrMagic+4]) != "HdrS" || le.Uint16(hdr[hdrBootFlag:]) != 0xaa55 {
		return nil, ErrNotBzImage
	}
	version := le.Uint16(hdr[hdrVersion:])
	if version < 0x020a {
		return nil, fmt.Errorf("%w: %d.%d", ErrProtocol, version>>8, version&0xff)
	}
	setupSects := uint64(hdr[hdrSetupSects])
	if setupSects == 0 {
		setupSects = 4
	}
	protOff := (setupSects + 1) * 512
	if protOff >= l.KernelLen {
		return nil, fmt.Errorf("%w: setup of %d sectors in a %d-byte file", ErrNotBzImage, setupSects, l.KernelLen)
	}
	if e := l.EFI; e != nil && (e.DescriptorSize < 40 || uint64(len(e.MemoryMap))%uint64(e.DescriptorSize) != 0 ||
		uint64(len(e.MemoryMap)) > EFIMapEnd-EFIMapAddr || e.SystemTable == 0) {
		return nil, fmt.Errorf("%w: an EFI memory map of %d bytes in %d-byte descriptors, system table %#x", ErrLayout, len(e.MemoryMap), e.DescriptorSize, e.SystemTable)
	}
	if fb := l.Framebuffer; fb != nil && (fb.Width == 0 || fb.Width > 0xffff || fb.Height == 0 || fb.Height > 0xffff || fb.Pitch > 0xffff ||
		fb.BPP == 0 || uint64(fb.Pitch)*uint64(fb.Height) > 1<<32) {
		return nil, fmt.Errorf("%w: a framebuffer of %dx%d, %d bits, pitch %d", ErrLayout, fb.Width, fb.Height, fb.BPP, fb.Pitch)
	}
	if l.RSDP != 0 && version < 0x020e {
		return nil, fmt.Errorf("%w: %d.%d cannot be told where the ACPI RSDP is (2.14 can)", ErrProtocol, version>>8, version&0xff)
	}
	protLen := l.KernelLen - protOff
	cmdMax := uint64(le.Uint32(hdr[hdrCmdlineSize:]))
	if uint64(len(l.Cmdline)) > cmdMax {
		return nil, fmt.Errorf("%w: command line of %d bytes, the kernel takes %d", ErrLayout, len(l.Cmdline), cmdMax)
	}
	initSize := uint64(le.Uint32(hdr[hdrInitSize:]))

	// Where things go, and what must not overlap. The kernel goes to its
	// preferred address, where it decompresses itself into init_size
	// bytes (a kernel loaded lower moves itself there); the initrd to the
	// highest RAM below initrd_addr_max that spares the kernel's area,
	// tamahv's memory, the first MiB and every module not yet copied.
	kernelPA := le.Uint64(hdr[hdrPrefAddress:])
	if kernelPA < KernelAddr {
		kernelPA = KernelAddr
	}
	if a := uint64(le.Uint32(hdr[hdrKernelAlign:])); a > 1 && a&(a-1) == 0 {
		kernelPA = (kernelPA + a - 1) &^ (a - 1)
	}
	kernelSpan := max(protLen, initSize)
	if kernelPA+kernelSpan < kernelPA || kernelPA+kernelSpan > 1<<32 {
		return nil, fmt.Errorf("%w: kernel of %#x bytes at %#x", ErrLayout, kernelSpan, kernelPA)
	}
	for _, r := range l.Reserved {
		if overlaps(kernelPA, kernelSpan, r[0], r[1]-r[0]) {
			return nil, fmt.Errorf("%w: the kernel's area %#x+%#x overlaps tamahv's memory", ErrLayout, kernelPA, kernelSpan)
		}
	}
	if !inRAM(l.Map, kernelPA, kernelSpan) {
		return nil, fmt.Errorf("%w: the kernel's area %#x+%#x is not all RAM", ErrLayout, kernelPA, kernelSpan)
	}
	var initrdLen uint64
	for _, r := range l.Initrds {
		if r[1] > 1<<32 || initrdLen+r[1] > 1<<32 {
			return nil, fmt.Errorf("%w: initrd of more than 4 GiB", ErrLayout)
		}
		initrdLen = (initrdLen+3)&^3 + r[1]
	}
	var initrdPA uint64
	if initrdLen > 0 {
		avoid := append([][2]uint64{{0, KernelAddr}, {kernelPA, kernelPA + kernelSpan}, {l.KernelPA, l.KernelPA + l.KernelLen}}, l.Reserved...)
		for _, r := range l.Initrds {
			avoid = append(avoid, [2]uint64{r[0], r[0] + r[1]})
		}
		limit := uint64(le.Uint32(hdr[hdrInitrdMax:])) + 1
		var ok bool
		if initrdPA, ok = highestFit(l.Map, avoid, initrdLen, limit); !ok {
			return nil, fmt.Errorf("%w: no room for an initrd of %d bytes below %#x", ErrLayout, initrdLen, limit)
		}
	}
	e820 := GuestE820(l.Map, l.Reserved)
	if n := len(e820) - maxE820; n > 0 && 16+20*uint64(n) > SetupDataEnd-SetupDataAddr {
		return nil, fmt.Errorf("%w: %d memory map entries", ErrLayout, len(e820))
	}
	// The initrd first: its destination spares every module, and the
	// kernel's copy may then run over the initrd modules.
	dst := initrdPA
	for _, r := range l.Initrds {
		dst = (dst + 3) &^ 3
		if err := m.CopyPhys(dst, r[0], r[1]); err != nil {
			return nil, err
		}
		dst += r[1]
	}
	if err := m.CopyPhys(kernelPA, l.KernelPA+protOff, protLen); err != nil {
		return nil, err
	}

	// boot_params: the zero page, with the setup header copied in.
	bp := make([]byte, 4096)
	hdrEnd := hdrMagic + int(hdr[hdrJumpEnd])
	if hdrEnd > len(hdr) {
		hdrEnd = len(hdr)
	}
	copy(bp[hdrSetupSects:hdrEnd], hdr[hdrSetupSects:hdrEnd])
	bp[hdrTypeOfLoader] = 0xff
	bp[hdrLoadFlags] |= 0x80 // CAN_USE_HEAP
	le.PutUint16(bp[hdrHeapEndPtr:], 0xfe00)
	le.PutUint32(bp[hdrCmdLinePtr:], CmdlineAddr)
	le.PutUint32(bp[hdrCode32Start:], uint32(kernelPA))
	if initrdLen > 0 {
		le.PutUint32(bp[hdrRamdiskImage:], uint32(initrdPA))
		le.PutUint32(bp[hdrRamdiskSize:], uint32(initrdLen))
	}
	le.PutUint64(bp[bpACPIRSDPAddr:], l.RSDP)
	if fb := l.Framebuffer; fb != nil {
		putScreenInfo(bp, fb)
	}
	if e := l.EFI; e != nil {
		if err := m.WritePhys(EFIMapAddr, e.MemoryMap); err != nil {
			return nil, err
		}
		fi := bp[bpEFIInfo:]
		copy(fi, efiLoader64)
		le.PutUint32(fi[4:], uint32(e.SystemTable))
		le.PutUint32(fi[8:], e.DescriptorSize)
		le.PutUint32(fi[12:], e.DescriptorVersion)
		le.PutUint32(fi[16:], EFIMapAddr)
		le.PutUint32(fi[20:], uint32(len(e.MemoryMap)))
		le.PutUint32(fi[24:], uint32(e.SystemTable>>32))
	}
	bp[bpE820Entries] = byte(min(len(e820), maxE820))
	for i, e := range e820[:min(len(e820), maxE820)] {
		o := bpE820Table + 20*i
		le.PutUint64(bp[o:], e.Addr)
		le.PutUint64(bp[o+8:], e.Size)
		le.PutUint32(bp[o+16:], e.Type)
	}
	if rest := e820[min(len(e820), maxE820):]; len(rest) > 0 {
		// The entries beyond 128 in a SETUP_E820_EXT setup_data (as the
		// EFI stub passes them), the only one in the list.
		sd := make([]byte, 16+20*len(rest))
		le.PutUint32(sd[8:], setupE820Ext)
		le.PutUint32(sd[12:], uint32(20*len(rest)))
		for i, e := range rest {
			o := 16 + 20*i
			le.PutUint64(sd[o:], e.Addr)
			le.PutUint64(sd[o+8:], e.Size)
			le.PutUint32(sd[o+16:], e.Type)
		}
		if err := m.WritePhys(SetupDataAddr, sd); err != nil {
			return nil, err
		}
		le.PutUint64(bp[hdrSetupData:], SetupDataAddr)
	}
	if err := m.WritePhys(BootParamsAddr, bp); err != nil {
		return nil, err
	}
	if err := m.WritePhys(CmdlineAddr, append([]byte(l.Cmdline), 0)); err != nil {
		return nil, err
	}
	// GDT: null, null, __BOOT_CS (flat 32-bit code), __BOOT_DS (flat data).
	gdt := make([]byte, 32)
	le.PutUint64(gdt[bootCS:], 0x00cf9b000000ffff)
	le.PutUint64(gdt[bootDS:], 0x00cf93000000ffff)
	if err := m.WritePhys(GDTAddr, gdt); err != nil {
		return nil, err
	}
	return &hv.Start{
		RIP: kernelPA, RSI: BootParamsAddr,
		GDTBase: GDTAddr, GDTLimit: uint16(len(gdt) - 1), CodeSel: bootCS, DataSel: bootDS,
		InitrdPA: initrdPA, InitrdLen: initrdLen, KernelPA: kernelPA,
		BootParams: BootParamsAddr, ProtocolVersion: version, E820: e820,
	}, nil
}

// inRAM reports whether [pa, pa+n) lies in the RAM entries of m.
func inRAM(m []hv.E820Entry, pa, n uint64) bool {
	for _, r := range freeRAM(m, nil, 1<<63) {
		if pa >= r[0] && pa+n <= r[1] {
			return true
		}
	}
	return false
}

// freeRAM returns the RAM of m below limit, adjacent entries joined, less
// the ranges in avoid, sorted.
func freeRAM(m []hv.E820Entry, avoid [][2]uint64, limit uint64) [][2]uint64 {
	var ram [][2]uint64
	for _, e := range m {
		if e.Type == hv.E820RAM && e.Size > 0 && e.Addr < limit {
			ram = append(ram, [2]uint64{e.Addr, min(e.Addr+e.Size, limit)})
		}
	}
	sort.Slice(ram, func(i, j int) bool { return ram[i][0] < ram[j][0] })
	var joined [][2]uint64
	for _, r := range ram {
		if n := len(joined); n > 0 && r[0] <= joined[n-1][1] {
			joined[n-1][1] = max(joined[n-1][1], r[1])
			continue
		}
		joined = append(joined, r)
	}
	for _, a := range avoid {
		var next [][2]uint64
		for _, r := range joined {
			if a[1] <= r[0] || a[0] >= r[1] {
				next = append(next, r)
				continue
			}
			if r[0] < a[0] {
				next = append(next, [2]uint64{r[0], a[0]})
			}
			if a[1] < r[1] {
				next = append(next, [2]uint64{a[1], r[1]})
			}
		}
		joined = next
	}
	return joined
}

// highestFit returns the highest page-aligned address at which n bytes
// fit in the RAM of m below limit, sparing avoid.
func highestFit(m []hv.E820Entry, avoid [][2]uint64, n, limit uint64) (uint64, bool) {
	free := freeRAM(m, avoid, limit)
	for i := len(free) - 1; i >= 0; i-- {
		r := free[i]
		if r[1]-r[0] < n {
			continue
		}
		if pa := (r[1] - n) &^ 0xfff; pa >= r[0] {
			return pa, true
		}
	}
	return 0, false
}

func overlaps(a, an, b, bn uint64) bool { return an > 0 && bn > 0 && a < b+bn && b < a+an }

// GuestE820 turns the machine's memory map into the guest's: every reserved
// range is cut out of the usable ones and listed as reserved. The result is
// sorted and has no overlaps.
func GuestE820(machine []hv.E820Entry, reserved [][2]uint64) []hv.E820Entry {
	var out []hv.E820Entry
	for _, e := range machine {
		if e.Size == 0 {
			continue
		}
		pieces := []hv.E820Entry{e}
		for _, r := range reserved {
			var next []hv.E820Entry
			for _, p := range pieces {
				end := p.Addr + p.Size
				if r[1] <= p.Addr || r[0] >= end {
					next = append(next, p)
					continue
				}
				if p.Addr < r[0] {
					next = append(next, hv.E820Entry{Addr: p.Addr, Size: r[0] - p.Addr, Type: p.Type})
				}
				if r[1] < end {
					next = append(next, hv.E820Entry{Addr: r[1], Size: end - r[1], Type: p.Type})
				}
			}
			pieces = next
		}
		out = append(out, pieces...)
	}
	for _, r := range reserved {
		out = append(out, hv.E820Entry{Addr: r[0], Size: r[1] - r[0], Type: hv.E820Reserved})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Addr < out[j].Addr })
	return out
}
