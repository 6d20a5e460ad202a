// Package bootinfo is what tamahv knows of its boot, whichever protocol
// started it: Multiboot 1 (BIOS, or UEFI through GRUB's multiboot
// command) or Multiboot2 (BIOS or UEFI). Both parsers' results convert to
// one Info, which the rest of tamahv reads.
package bootinfo

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/board/pc/acpi"
	"github.com/tamahv/tamahv/board/pc/e820"
	"github.com/tamahv/tamahv/board/pc/efi"
	"github.com/tamahv/tamahv/board/pc/multiboot"
	"github.com/tamahv/tamahv/board/pc/multiboot2"
)

// Protocol is the boot protocol that started tamahv.
type Protocol uint8

// Protocols.
const (
	Multiboot1 Protocol = 1
	Multiboot2 Protocol = 2
)

// String names the protocol as boot loaders do.
func (p Protocol) String() string {
	switch p {
	case Multiboot1:
		return "Multiboot"
	case Multiboot2:
		return "Multiboot2"
	}
	return fmt.Sprintf("protocol %d", uint8(p))
}

// Firmware is the kind of firmware the boot loader ran on, as far as its
// boot information tells.
type Firmware uint8

// Firmware kinds.
const (
	BIOS Firmware = 1
	UEFI Firmware = 2
)

// String names the firmware kind.
func (f Firmware) String() string {
	switch f {
	case BIOS:
		return "BIOS"
	case UEFI:
		return "UEFI"
	}
	return fmt.Sprintf("firmware %d", uint8(f))
}

// Module is a file the boot loader loaded with tamahv.
type Module struct {
	Start, End uint64 // physical, End exclusive
	Cmdline    string
}

// EFI is what a boot loader on UEFI passes on, once it ended the boot
// services.
type EFI struct {
	// SystemTable is the 64-bit system table's address; 0: not given.
	SystemTable uint64
	// MemoryMap is the memory map as the boot services ended; nil: not
	// given.
	MemoryMap *efi.MemoryMap
}

// Info is the boot information tamahv uses, copied out of the boot
// loader's structure.
type Info struct {
	Protocol   Protocol
	Cmdline    string
	LoaderName string
	Modules    []Module
	// HasBasicMemory says MemLower and MemUpper (KiB below 1 MiB and
	// above it, up to the first hole) are given.
	HasBasicMemory     bool
	MemLower, MemUpper uint32
	// MemoryMap is the boot loader's memory map with its types as given
	// (GRUB on UEFI uses 20 for EFI runtime services code);
	// e820.FromLoader makes it fit for a guest.
	MemoryMap []e820.Entry
	// Framebuffer is the video mode the boot loader left; nil: none
	// given (always so with Multiboot 1, whose parser does not read it).
	Framebuffer *multiboot2.Framebuffer
	// EFI is set when the boot loader passed an EFI system table or EFI
	// memory map.
	EFI *EFI
	// ACPIOld and ACPINew are the boot loader's copies of the ACPI 1.0
	// and 2.0 RSDP (Multiboot2 only).
	ACPIOld, ACPINew []byte
	// LoadBase is where the boot loader put tamahv's image; 0: not
	// given.
	LoadBase uint64
}

// Firmware says whether tamahv was booted on UEFI (the boot loader
// passed EFI information) or BIOS.
func (in *Info) Firmware() Firmware {
	if in.EFI != nil {
		return UEFI
	}
	return BIOS
}

// FromMultiboot converts Multiboot 1 information.
func FromMultiboot(mb *multiboot.Info) *Info {
	in := &Info{
		Protocol:       Multiboot1,
		Cmdline:        mb.Cmdline,
		LoaderName:     mb.LoaderName,
		HasBasicMemory: mb.Flags&multiboot.InfoMem != 0,
		MemLower:       mb.MemLower,
		MemUpper:       mb.MemUpper,
	}
	for _, m := range mb.Modules {
		in.Modules = append(in.Modules, Module{Start: m.Start, End: m.End, Cmdline: m.Cmdline})
	}
	for _, r := range mb.MemoryMap {
		in.MemoryMap = append(in.MemoryMap, e820.Entry{Addr: r.Base, Size: r.Length, Type: e820.Type(r.Type)})
	}
	return in
}

// ErrBootServices is returned by FromMultiboot2 when the boot loader left
// the EFI boot services running (tag 18): tamahv has no use for them and
// cannot run beside them.
var ErrBootServices = errors.New("bootinfo: the boot loader left the EFI boot services running")

// FromMultiboot2 converts Multiboot2 information. It refuses information
// that says the EFI boot services still run.
func FromMultiboot2(mb *multiboot2.Info) (*Info, error) {
	if mb.EFIBootServices {
		return nil, ErrBootServices
	}
	in := &Info{
		Protocol:       Multiboot2,
		Cmdline:        mb.Cmdline,
		LoaderName:     mb.LoaderName,
		HasBasicMemory: mb.Has(multiboot2.TagBasicMeminfo),
		MemLower:       mb.MemLower,
		MemUpper:       mb.MemUpper,
		Framebuffer:    mb.Framebuffer,
		ACPIOld:        mb.ACPIOld,
		ACPINew:        mb.ACPINew,
		LoadBase:       uint64(mb.LoadBase),
	}
	for _, m := range mb.Modules {
		in.Modules = append(in.Modules, Module{Start: uint64(m.Start), End: uint64(m.End), Cmdline: m.Cmdline})
	}
	for _, e := range mb.MemoryMap {
		in.MemoryMap = append(in.MemoryMap, e820.Entry{Addr: e.Base, Size: e.Length, Type: e820.Type(e.Type)})
	}
	if mb.EFI64SystemTable != 0 || mb.EFIMemoryMap != nil {
		in.EFI = &EFI{SystemTable: mb.EFI64SystemTable, MemoryMap: mb.EFIMemoryMap}
	}
	return in, nil
}

// CheckRSDP compares r, the RSDP tamahv found in memory, with the boot
// loader's copy of the same revision (ACPINew from revision 2 on, else
// ACPIOld). Where the boot loader gave no such copy there is nothing to
// compare, and it returns nil.
func (in *Info) CheckRSDP(r acpi.RSDP) error {
	cp := in.ACPIOld
	if r.Revision >= acpi.ExtendedRevision {
		cp = in.ACPINew
	}
	if cp == nil {
		return nil
	}
	return acpi.MatchCopy(r, cp)
}

// GuestMemoryMaps returns the memory maps a Linux guest gets, with
// [base, end) (tamahv's region) reserved: the e820 map built from the EFI
// memory map where there is one (e820.FromEFI), else from the boot
// loader's map (e820.FromLoader), and the copy of the EFI memory map
// (nil on BIOS) with the region EfiReservedMemoryType.
func (in *Info) GuestMemoryMaps(base, end uint64) ([]e820.Entry, *efi.MemoryMap) {
	if in.EFI != nil && in.EFI.MemoryMap != nil {
		return e820.FromEFIReserving(in.EFI.MemoryMap, base, end)
	}
	return e820.Reserve(e820.FromLoader(in.MemoryMap), base, end), nil
}
