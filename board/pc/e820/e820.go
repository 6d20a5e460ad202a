// Package e820 builds the BIOS-style memory map a Linux guest gets in its
// boot_params: from the EFI memory map with the rules of Linux's x86 EFI
// stub (drivers/firmware/efi/libstub/x86-stub.c, setup_e820), or from a
// boot loader's own map, and with ranges the guest must not use marked
// reserved.
package e820

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/tamahv/tamahv/board/pc/efi"
)

// Type is an e820 range type, as Linux numbers them (arch/x86/include/
// uapi/asm/setup_data.h and asm/e820/types.h).
type Type uint32

// Types.
const (
	RAM      Type = 1
	Reserved Type = 2
	ACPI     Type = 3 // ACPI tables, reclaimable once read
	NVS      Type = 4 // ACPI non-volatile storage
	Unusable Type = 5
	PMEM     Type = 7  // persistent memory (ACPI 6)
	PRAM     Type = 12 // legacy persistent memory
	// SoftReserved is specific-purpose memory (EFI_MEMORY_SP) kept out
	// of general-purpose RAM.
	SoftReserved Type = 0xefffffff
)

// Boot-protocol limits (Documentation/arch/x86/zero-page.rst,
// boot.rst).
const (
	// ZeroPageEntries is how many entries fit in boot_params.e820_table.
	ZeroPageEntries = 128
	// EntryLength is the size of one encoded entry (boot_e820_entry).
	EntryLength = 20
	// SetupE820Ext is the setup_data type that carries the entries past
	// the first ZeroPageEntries.
	SetupE820Ext = 1
)

// Entry is one range of the map.
type Entry struct {
	Addr, Size uint64
	Type       Type
}

// End is the first address after e, saturating at 2^64-1.
func (e Entry) End() uint64 {
	if end := e.Addr + e.Size; end >= e.Addr {
		return end
	}
	return ^uint64(0)
}

// efiType maps an EFI memory type to its e820 type as the EFI stub does,
// except that types the stub leaves out of the map (unknown ones, and
// unaccepted memory, which tamahv does not accept) are reserved here.
func efiType(d efi.MemoryDescriptor) Type {
	switch d.Type {
	case efi.LoaderCode, efi.LoaderData, efi.BootServicesCode, efi.BootServicesData, efi.ConventionalMemory:
		if d.Attribute&efi.MemorySP != 0 {
			return SoftReserved
		}
		return RAM
	case efi.ACPIReclaimMemory:
		return ACPI
	case efi.ACPIMemoryNVS:
		return NVS
	case efi.UnusableMemory:
		return Unusable
	case efi.PersistentMemory:
		return PMEM
	}
	// ReservedMemoryType, RuntimeServicesCode and Data, MemoryMappedIO,
	// MemoryMappedIOPortSpace, PalCode, UnacceptedMemory and unknown
	// types.
	return Reserved
}

// FromEFI converts an EFI memory map to an e820 map with the EFI stub's
// rules: loader, boot-services and conventional memory are RAM (soft
// reserved with the specific-purpose attribute, as Linux does by
// default), ACPI reclaim memory ACPI, ACPI NVS memory NVS, unusable
// memory unusable, persistent memory PMEM (type 7), and everything else
// reserved: runtime services code and data, MMIO, PAL code, reserved and
// unaccepted memory, and every type the UEFI specification does not
// define (the stub leaves those out; tamahv keeps the guest off them).
// The entries are sorted by address and adjacent entries of one type
// merged.
//
// The result may have more than ZeroPageEntries entries: the first 128
// go into boot_params.e820_table, the rest into a SETUP_E820_EXT
// setup_data (Encode gives the bytes of either).
func FromEFI(m *efi.MemoryMap) []Entry {
	out := make([]Entry, 0, len(m.Descriptors))
	for _, d := range m.Descriptors {
		if d.NumberOfPages == 0 {
			continue
		}
		out = append(out, Entry{Addr: d.PhysicalStart, Size: d.NumberOfPages * efi.PageSize, Type: efiType(d)})
	}
	return merge(out)
}

// FromLoader sanitizes a boot loader's own map (Multiboot's): types other
// than RAM, Reserved, ACPI, NVS, Unusable, PMEM and PRAM (GRUB's type 20
// for EFI runtime code, for instance) become reserved, empty entries are
// dropped, and the entries are sorted and merged.
func FromLoader(in []Entry) []Entry {
	out := make([]Entry, 0, len(in))
	for _, e := range in {
		if e.Size == 0 {
			continue
		}
		switch e.Type {
		case RAM, Reserved, ACPI, NVS, Unusable, PMEM, PRAM:
		default:
			e.Type = Reserved
		}
		out = append(out, e)
	}
	return merge(out)
}

// merge sorts es by address (stable, so that overlapping entries keep
// their order) and merges entries of one type that touch.
func merge(es []Entry) []Entry {
	slices.SortStableFunc(es, func(a, b Entry) int { return cmp.Compare(a.Addr, b.Addr) })
	out := es[:0]
	for _, e := range es {
		if n := len(out); n > 0 && out[n-1].Type == e.Type && out[n-1].End() == e.Addr {
			out[n-1].Size = e.End() - out[n-1].Addr
			continue
		}
		out = append(out, e)
	}
	return out
}

// Reserve returns es with [base, end) cut out of every entry and added as
// one reserved entry, sorted and merged: the range the guest must not
// touch (tamahv's own region) whatever the firmware said it was.
func Reserve(es []Entry, base, end uint64) []Entry {
	if base >= end {
		return merge(slices.Clone(es))
	}
	out := make([]Entry, 0, len(es)+2)
	for _, e := range es {
		if e.End() <= base || e.Addr >= end {
			out = append(out, e)
			continue
		}
		if e.Addr < base {
			out = append(out, Entry{Addr: e.Addr, Size: base - e.Addr, Type: e.Type})
		}
		if e.End() > end {
			out = append(out, Entry{Addr: end, Size: e.End() - end, Type: e.Type})
		}
	}
	out = append(out, Entry{Addr: base, Size: end - base, Type: Reserved})
	return merge(out)
}

// FromEFIReserving builds the guest's two maps from the firmware's EFI
// memory map with [base, end) kept from the guest: the e820 map (FromEFI,
// then Reserve) and a copy of the EFI map with that range
// EfiReservedMemoryType (efi.MemoryMap.Reserve). Linux must see the
// range as non-RAM in both: its decompressor picks KASLR targets from
// the EFI map, and it frees boot-services ranges only where e820 says
// RAM.
func FromEFIReserving(m *efi.MemoryMap, base, end uint64) ([]Entry, *efi.MemoryMap) {
	return Reserve(FromEFI(m), base, end), m.Reserve(base, end)
}

// Encode returns es as boot_e820_entry structures, 20 bytes each: the
// layout of boot_params.e820_table and of a SETUP_E820_EXT payload.
func Encode(es []Entry) []byte {
	b := make([]byte, EntryLength*len(es))
	for i, e := range es {
		binary.LittleEndian.PutUint64(b[i*EntryLength:], e.Addr)
		binary.LittleEndian.PutUint64(b[i*EntryLength+8:], e.Size)
		binary.LittleEndian.PutUint32(b[i*EntryLength+16:], uint32(e.Type))
	}
	return b
}

// String names the type as Linux prints it ("usable", "reserved", "ACPI
// data", "ACPI NVS", "unusable", "persistent (type 7)", ...).
func (t Type) String() string {
	switch t {
	case RAM:
		return "usable"
	case Reserved:
		return "reserved"
	case ACPI:
		return "ACPI data"
	case NVS:
		return "ACPI NVS"
	case Unusable:
		return "unusable"
	case PMEM:
		return "persistent (type 7)"
	case PRAM:
		return "persistent (type 12)"
	case SoftReserved:
		return "soft reserved"
	case 0:
		return "not in the map"
	}
	return fmt.Sprintf("type %d", uint32(t))
}

// NotRAM returns the parts of [base, end) that es does not give as RAM:
// each entry of another type that overlaps it (cut to it), and each gap
// no entry covers (Type 0), in address order. Where entries overlap, one
// that is not RAM counts.
func NotRAM(es []Entry, base, end uint64) []Entry {
	var out []Entry
	for _, e := range es {
		if e.Type == RAM || e.End() <= base || e.Addr >= end {
			continue
		}
		a, b := max(e.Addr, base), min(e.End(), end)
		out = append(out, Entry{Addr: a, Size: b - a, Type: e.Type})
	}
	// The gaps: walk the entries in order.
	all := slices.Clone(es)
	slices.SortStableFunc(all, func(x, y Entry) int { return cmp.Compare(x.Addr, y.Addr) })
	at := base
	for _, e := range all {
		if e.End() <= at || e.Addr >= end {
			continue
		}
		if e.Addr > at {
			out = append(out, Entry{Addr: at, Size: e.Addr - at})
		}
		at = max(at, e.End())
	}
	if at < end {
		out = append(out, Entry{Addr: at, Size: end - at})
	}
	slices.SortStableFunc(out, func(x, y Entry) int { return cmp.Compare(x.Addr, y.Addr) })
	return out
}
