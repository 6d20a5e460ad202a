// Package efi reads what UEFI firmware leaves behind once its boot
// services are gone: the memory map a boot loader hands over, and the
// system table with its configuration table, through which the ACPI RSDP
// is found. Layouts: UEFI Specification 2.10, "7.2 Memory Allocation
// Services" (EFI_MEMORY_DESCRIPTOR) and "4.3 EFI System Table", "4.6 EFI
// Configuration Table & Properties Table".
package efi

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// MemoryType is an EFI_MEMORY_TYPE.
type MemoryType uint32

// Memory types.
const (
	ReservedMemoryType MemoryType = iota
	LoaderCode
	LoaderData
	BootServicesCode
	BootServicesData
	RuntimeServicesCode
	RuntimeServicesData
	ConventionalMemory
	UnusableMemory
	ACPIReclaimMemory
	ACPIMemoryNVS
	MemoryMappedIO
	MemoryMappedIOPortSpace
	PalCode
	PersistentMemory
	UnacceptedMemory
)

// String names t as the UEFI specification does, in lower case.
func (t MemoryType) String() string {
	names := [...]string{
		"reserved", "loader code", "loader data", "boot services code", "boot services data",
		"runtime services code", "runtime services data", "conventional", "unusable",
		"ACPI reclaim", "ACPI NVS", "MMIO", "MMIO port space", "PAL code", "persistent", "unaccepted",
	}
	if int(t) < len(names) {
		return names[t]
	}
	return fmt.Sprintf("type %d", uint32(t))
}

// Memory attributes (EFI_MEMORY_*).
const (
	// MemorySP marks specific-purpose memory (EFI_MEMORY_SP), which
	// Linux keeps out of its general-purpose RAM.
	MemorySP = 1 << 18
	// MemoryRuntime marks memory the runtime services need mapped after
	// SetVirtualAddressMap (EFI_MEMORY_RUNTIME).
	MemoryRuntime = 1 << 63
)

// Descriptor layout.
const (
	// PageSize is the unit of NumberOfPages.
	PageSize = 4096
	// DescriptorLength is the size of the descriptor fields this package
	// knows; firmware may use a larger stride (DescriptorSize).
	DescriptorLength = 40
	// MaxDescriptorSize bounds the stride ParseMemoryMap accepts.
	MaxDescriptorSize = 4096
	// DescriptorVersion is the descriptor version of every UEFI
	// specification so far, the only one Linux accepts.
	DescriptorVersion = 1

	maxPages = ^uint64(0) / PageSize
)

// MemoryDescriptor is one EFI_MEMORY_DESCRIPTOR.
type MemoryDescriptor struct {
	Type          MemoryType
	PhysicalStart uint64
	VirtualStart  uint64
	NumberOfPages uint64
	Attribute     uint64
}

// End is the first address after d. ParseMemoryMap only accepts
// descriptors whose end fits in 64 bits.
func (d MemoryDescriptor) End() uint64 { return d.PhysicalStart + d.NumberOfPages*PageSize }

// MemoryMap is an EFI memory map as GetMemoryMap returns it.
type MemoryMap struct {
	// DescriptorSize is the stride between descriptors, at least
	// DescriptorLength.
	DescriptorSize uint32
	// DescriptorVersion is the firmware's descriptor version.
	DescriptorVersion uint32
	Descriptors       []MemoryDescriptor
}

// ErrBadMemoryMap is wrapped by every ParseMemoryMap error.
var ErrBadMemoryMap = errors.New("efi: bad memory map")

// ParseMemoryMap decodes b, descriptors of descSize bytes each. The size
// must be at least DescriptorLength, at most MaxDescriptorSize and a
// multiple of 8, and b a whole number of descriptors; each descriptor
// must start on a page and end below 2^64.
func ParseMemoryMap(b []byte, descSize, version uint32) (*MemoryMap, error) {
	if descSize < DescriptorLength || descSize > MaxDescriptorSize || descSize%8 != 0 {
		return nil, fmt.Errorf("%w: descriptor size %d", ErrBadMemoryMap, descSize)
	}
	if len(b)%int(descSize) != 0 {
		return nil, fmt.Errorf("%w: %d bytes is not a whole number of %d-byte descriptors", ErrBadMemoryMap, len(b), descSize)
	}
	le := binary.LittleEndian
	m := &MemoryMap{DescriptorSize: descSize, DescriptorVersion: version}
	m.Descriptors = make([]MemoryDescriptor, 0, len(b)/int(descSize))
	for off := 0; off < len(b); off += int(descSize) {
		e := b[off:]
		d := MemoryDescriptor{
			Type:          MemoryType(le.Uint32(e[0:])),
			PhysicalStart: le.Uint64(e[8:]),
			VirtualStart:  le.Uint64(e[16:]),
			NumberOfPages: le.Uint64(e[24:]),
			Attribute:     le.Uint64(e[32:]),
		}
		if d.PhysicalStart%PageSize != 0 || d.NumberOfPages > maxPages || d.NumberOfPages*PageSize > ^uint64(0)-d.PhysicalStart {
			return nil, fmt.Errorf("%w: descriptor %d: %#x + %#x pages", ErrBadMemoryMap, len(m.Descriptors), d.PhysicalStart, d.NumberOfPages)
		}
		m.Descriptors = append(m.Descriptors, d)
	}
	return m, nil
}

// Bytes encodes m with its descriptor size; the bytes of each descriptor
// past the known fields are zero.
func (m *MemoryMap) Bytes() []byte {
	le := binary.LittleEndian
	size := max(int(m.DescriptorSize), DescriptorLength)
	b := make([]byte, size*len(m.Descriptors))
	for i, d := range m.Descriptors {
		e := b[i*size:]
		le.PutUint32(e[0:], uint32(d.Type))
		le.PutUint64(e[8:], d.PhysicalStart)
		le.PutUint64(e[16:], d.VirtualStart)
		le.PutUint64(e[24:], d.NumberOfPages)
		le.PutUint64(e[32:], d.Attribute)
	}
	return b
}

// Reserve returns a copy of m in which every page of [base, end) that a
// descriptor covers is EfiReservedMemoryType: descriptors that straddle a
// bound are split, keeping their attributes (the copy a guest gets, with
// the hypervisor's own region out of its reach). base is rounded down and
// end up to whole pages. Pages no descriptor covers stay uncovered.
func (m *MemoryMap) Reserve(base, end uint64) *MemoryMap {
	base &^= PageSize - 1
	if end > ^uint64(0)-(PageSize-1) {
		end = ^uint64(0) &^ (PageSize - 1)
	} else {
		end = (end + PageSize - 1) &^ (PageSize - 1)
	}
	out := &MemoryMap{DescriptorSize: m.DescriptorSize, DescriptorVersion: m.DescriptorVersion}
	out.Descriptors = make([]MemoryDescriptor, 0, len(m.Descriptors)+2)
	for _, d := range m.Descriptors {
		lo, hi := max(d.PhysicalStart, base), min(d.End(), end)
		if lo >= hi || d.Type == ReservedMemoryType {
			out.Descriptors = append(out.Descriptors, d)
			continue
		}
		part := func(start, stop uint64, t MemoryType) {
			if start >= stop {
				return
			}
			p := d
			p.Type = t
			p.PhysicalStart = start
			if d.VirtualStart != 0 {
				p.VirtualStart = d.VirtualStart + (start - d.PhysicalStart)
			}
			p.NumberOfPages = (stop - start) / PageSize
			out.Descriptors = append(out.Descriptors, p)
		}
		part(d.PhysicalStart, lo, d.Type)
		part(lo, hi, ReservedMemoryType)
		part(hi, d.End(), d.Type)
	}
	return out
}

// ErrNotCovered is returned by Covers when part of a range is missing
// from the map or has another type.
var ErrNotCovered = errors.New("efi: range not covered by the memory map")

// Covers checks that descriptors of type t cover every page of
// [base, end), for instance that the firmware gave a boot loader's image
// the whole of the region it asked for (EfiLoaderData).
func (m *MemoryMap) Covers(base, end uint64, t MemoryType) error {
	for at := base; at < end; {
		found := false
		for _, d := range m.Descriptors {
			if at >= d.PhysicalStart && at < d.End() {
				if d.Type != t {
					return fmt.Errorf("%w: %#x is %v, not %v", ErrNotCovered, at, d.Type, t)
				}
				at, found = d.End(), true
				break
			}
		}
		if !found {
			return fmt.Errorf("%w: %#x is in no descriptor", ErrNotCovered, at)
		}
	}
	return nil
}
