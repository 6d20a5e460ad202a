package hv

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
)

// Memory is guest-physical memory as the monitor sees it. Guest RAM is
// mapped one to one, so these are host-physical addresses as well.
type Memory interface {
	ReadPhys(pa uint64, p []byte) error
	WritePhys(pa uint64, p []byte) error
	// CopyPhys copies n bytes from src to dst; the ranges may overlap
	// (memmove).
	CopyPhys(dst, src, n uint64) error
}

// E820 memory types (ACPI "Address Range Types").
const (
	E820RAM      = 1
	E820Reserved = 2
	E820ACPI     = 3
	E820NVS      = 4
	E820Unusable = 5
)

// E820Entry is one range of the guest's memory map.
type E820Entry struct {
	Addr, Size uint64
	Type       uint32
}

// Where the loader puts things in guest memory (all below 1 MiB, clear of
// the real-mode IVT, BDA and EBDA).
const (
	LinuxGDT       = 0x6000
	LinuxBootParam = 0x7000
	LinuxCmdline   = 0x9000
	LinuxKernel    = 0x100000 // the protected-mode kernel
	bootCS         = 0x10     // __BOOT_CS
	bootDS         = 0x18     // __BOOT_DS
	maxE820        = 128
)

// Linux describes a Linux kernel to boot with the 32-bit boot protocol
// (Documentation/arch/x86/boot.rst, "32-bit Boot Protocol").
type Linux struct {
	// Kernel and Initrd are the bzImage and initramfs where the boot loader
	// left them (Multiboot modules).
	KernelPA, KernelLen uint64
	InitrdPA, InitrdLen uint64
	Cmdline             string
	// Map is the machine's memory map; Reserved ranges (tamahv's own
	// memory) become E820Reserved in the guest's map.
	Map      []E820Entry
	Reserved [][2]uint64
	// RSDP is the ACPI RSDP's physical address, written to
	// boot_params.acpi_rsdp_addr (boot protocol 2.14 and later); 0: none.
	RSDP uint64
	// InitrdEnd is where the initrd must end (it is placed just below);
	// default: the start of the first Reserved range.
	InitrdEnd uint64
}

// Start is the guest state the 32-bit boot protocol wants: protected mode,
// paging off, flat __BOOT_CS and __BOOT_DS from a GDT at GDTBase, ESI
// pointing at the boot parameters, EIP at the kernel's 32-bit entry.
type Start struct {
	RIP, RSI         uint64
	GDTBase          uint64
	GDTLimit         uint16
	CodeSel, DataSel uint16
	InitrdPA         uint64
	BootParams       uint64
	ProtocolVersion  uint16
	E820             []E820Entry
}

// Errors of the Linux loader.
var (
	ErrNotBzImage = errors.New("hv: not a Linux bzImage (no HdrS header)")
	ErrProtocol   = errors.New("hv: boot protocol too old (need 2.10 or later)")
	ErrLayout     = errors.New("hv: guest memory layout")
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
	hdrInitSize     = 0x260
	bpACPIRSDPAddr  = 0x070
	bpE820Entries   = 0x1e8
	bpE820Table     = 0x2d0
)

// Load copies the kernel and initrd into place, writes the boot
// parameters, command line and GDT, and returns the entry state.
func (l *Linux) Load(m Memory) (*Start, error) {
	if l.KernelLen < 0x264 || l.KernelLen > 256<<20 {
		return nil, fmt.Errorf("%w: kernel of %d bytes", ErrNotBzImage, l.KernelLen)
	}
	hdr := make([]byte, 0x264)
	if err := m.ReadPhys(l.KernelPA, hdr); err != nil {
		return nil, fmt.Errorf("hv: reading the kernel header: %w", err)
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
	if l.RSDP != 0 && version < 0x020e {
		return nil, fmt.Errorf("%w: %d.%d cannot be told where the ACPI RSDP is (2.14 can)", ErrProtocol, version>>8, version&0xff)
	}
	protLen := l.KernelLen - protOff
	cmdMax := uint64(le.Uint32(hdr[hdrCmdlineSize:]))
	if uint64(len(l.Cmdline)) > cmdMax {
		return nil, fmt.Errorf("%w: command line of %d bytes, the kernel takes %d", ErrLayout, len(l.Cmdline), cmdMax)
	}
	initSize := uint64(le.Uint32(hdr[hdrInitSize:]))

	// Where things go, and what must not overlap.
	initrdEnd := l.InitrdEnd
	if initrdEnd == 0 && len(l.Reserved) > 0 {
		initrdEnd = l.Reserved[0][0]
	}
	if max := uint64(le.Uint32(hdr[hdrInitrdMax:])) + 1; initrdEnd == 0 || initrdEnd > max {
		initrdEnd = max
	}
	initrdPA := (initrdEnd - l.InitrdLen) &^ 0xfff
	if l.InitrdLen > initrdEnd {
		return nil, fmt.Errorf("%w: initrd of %d bytes does not fit below %#x", ErrLayout, l.InitrdLen, initrdEnd)
	}
	kernelEnd := uint64(LinuxKernel) + max(protLen, initSize)
	if l.InitrdLen > 0 && initrdPA < kernelEnd {
		return nil, fmt.Errorf("%w: initrd at %#x overlaps the kernel's decompression area up to %#x", ErrLayout, initrdPA, kernelEnd)
	}
	// The initrd is copied first, then the kernel (GRUB often leaves the
	// kernel module right where the kernel goes: the copy moves it down
	// over itself). So the initrd's destination must spare the kernel
	// module.
	if l.InitrdLen > 0 && overlaps(initrdPA, l.InitrdLen, l.KernelPA, l.KernelLen) {
		return nil, fmt.Errorf("%w: initrd destination %#x+%#x overlaps the kernel module at %#x+%#x", ErrLayout, initrdPA, l.InitrdLen, l.KernelPA, l.KernelLen)
	}
	for _, d := range [][2]uint64{{LinuxKernel, max(protLen, initSize)}, {initrdPA, l.InitrdLen}} {
		for _, r := range l.Reserved {
			if overlaps(d[0], d[1], r[0], r[1]-r[0]) {
				return nil, fmt.Errorf("%w: destination %#x+%#x overlaps tamahv's memory", ErrLayout, d[0], d[1])
			}
		}
	}
	e820 := GuestE820(l.Map, l.Reserved)
	if len(e820) > maxE820 {
		return nil, fmt.Errorf("%w: %d memory map entries", ErrLayout, len(e820))
	}
	if l.InitrdLen > 0 {
		if err := m.CopyPhys(initrdPA, l.InitrdPA, l.InitrdLen); err != nil {
			return nil, err
		}
	}
	if err := m.CopyPhys(LinuxKernel, l.KernelPA+protOff, protLen); err != nil {
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
	le.PutUint32(bp[hdrCmdLinePtr:], LinuxCmdline)
	if l.InitrdLen > 0 {
		le.PutUint32(bp[hdrRamdiskImage:], uint32(initrdPA))
		le.PutUint32(bp[hdrRamdiskSize:], uint32(l.InitrdLen))
	}
	le.PutUint64(bp[bpACPIRSDPAddr:], l.RSDP)
	bp[bpE820Entries] = byte(len(e820))
	for i, e := range e820 {
		o := bpE820Table + 20*i
		le.PutUint64(bp[o:], e.Addr)
		le.PutUint64(bp[o+8:], e.Size)
		le.PutUint32(bp[o+16:], e.Type)
	}
	if err := m.WritePhys(LinuxBootParam, bp); err != nil {
		return nil, err
	}
	if err := m.WritePhys(LinuxCmdline, append([]byte(l.Cmdline), 0)); err != nil {
		return nil, err
	}
	// GDT: null, null, __BOOT_CS (flat 32-bit code), __BOOT_DS (flat data).
	gdt := make([]byte, 32)
	le.PutUint64(gdt[bootCS:], 0x00cf9b000000ffff)
	le.PutUint64(gdt[bootDS:], 0x00cf93000000ffff)
	if err := m.WritePhys(LinuxGDT, gdt); err != nil {
		return nil, err
	}
	return &Start{
		RIP: uint64(le.Uint32(hdr[hdrCode32Start:])), RSI: LinuxBootParam,
		GDTBase: LinuxGDT, GDTLimit: uint16(len(gdt) - 1), CodeSel: bootCS, DataSel: bootDS,
		InitrdPA: initrdPA, BootParams: LinuxBootParam, ProtocolVersion: version, E820: e820,
	}, nil
}

func overlaps(a, an, b, bn uint64) bool { return an > 0 && bn > 0 && a < b+bn && b < a+an }

// GuestE820 turns the machine's memory map into the guest's: every reserved
// range is cut out of the usable ones and listed as reserved. The result is
// sorted and has no overlaps.
func GuestE820(machine []E820Entry, reserved [][2]uint64) []E820Entry {
	var out []E820Entry
	for _, e := range machine {
		if e.Size == 0 {
			continue
		}
		pieces := []E820Entry{e}
		for _, r := range reserved {
			var next []E820Entry
			for _, p := range pieces {
				end := p.Addr + p.Size
				if r[1] <= p.Addr || r[0] >= end {
					next = append(next, p)
					continue
				}
				if p.Addr < r[0] {
					next = append(next, E820Entry{p.Addr, r[0] - p.Addr, p.Type})
				}
				if r[1] < end {
					next = append(next, E820Entry{r[1], end - r[1], p.Type})
				}
			}
			pieces = next
		}
		out = append(out, pieces...)
	}
	for _, r := range reserved {
		out = append(out, E820Entry{r[0], r[1] - r[0], E820Reserved})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Addr < out[j].Addr })
	return out
}
