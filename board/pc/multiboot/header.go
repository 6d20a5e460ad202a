// Package multiboot writes and checks the Multiboot 1 header of tamahv's
// ELF image, and parses the Multiboot information a boot loader hands over.
//
// The header uses the address fields (flag 16, the "a.out kludge") so that
// the boot loader treats the whole of tamahv's RAM region, up to
// bss_end_addr, as taken: it places the modules and the information
// structure elsewhere, where tamahv's heap and stacks cannot overwrite
// them. Layout: Multiboot Specification version 0.6.96, "3.1 OS image
// format".
package multiboot

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
)

// Header constants (Multiboot Specification 0.6.96, "3.1.1 The layout of
// Multiboot header").
const (
	HeaderMagic = 0x1BADB002
	// BootMagic is what the boot loader leaves in EAX.
	BootMagic = 0x2BADB002

	FlagPageAlign = 1 << 0  // modules on 4 KiB boundaries
	FlagMemInfo   = 1 << 1  // mem_* and mmap_* must be filled
	FlagAddresses = 1 << 16 // the address fields below are valid

	HeaderSize = 32 // with the address fields
	searchSize = 8192
)

// Header is a Multiboot 1 header with address fields.
type Header struct {
	Magic, Flags, Checksum                                   uint32
	HeaderAddr, LoadAddr, LoadEndAddr, BSSEndAddr, EntryAddr uint32
}

// Offset is where in the file a header was found or written.
type Offset = int

func (h *Header) bytes() []byte {
	var b bytes.Buffer
	_ = binary.Write(&b, binary.LittleEndian, h)
	return b.Bytes()
}

// Errors from Patch and Find.
var (
	ErrNoRoom   = errors.New("multiboot: no free, aligned room for the header in the first 8 KiB")
	ErrNoHeader = errors.New("multiboot: no valid header in the first 8 KiB")
	ErrLayout   = errors.New("multiboot: image layout unusable")
)

type segment struct{ off, addr, filesz, memsz uint64 }

// layout checks that the ELF loads linearly: every PT_LOAD segment sits in
// the file at the same distance from the first as in memory, below 4 GiB,
// with the first one starting at file offset 0. That is what the address
// fields let a boot loader load.
func layout(f *elf.File) ([]segment, error) {
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		return nil, fmt.Errorf("%w: want an x86-64 ELF64 executable, have %v %v %v", ErrLayout, f.Class, f.Machine, f.Type)
	}
	var segs []segment
	for _, p := range f.Progs {
		if p.Type != elf.PT_LOAD {
			continue
		}
		if p.Paddr != p.Vaddr {
			return nil, fmt.Errorf("%w: segment at %#x has physical address %#x", ErrLayout, p.Vaddr, p.Paddr)
		}
		segs = append(segs, segment{p.Off, p.Paddr, p.Filesz, p.Memsz})
	}
	if len(segs) == 0 {
		return nil, fmt.Errorf("%w: no loadable segment", ErrLayout)
	}
	first := segs[0]
	if first.off != 0 {
		return nil, fmt.Errorf("%w: first segment at file offset %#x, not 0", ErrLayout, first.off)
	}
	for i, s := range segs {
		if s.addr < first.addr || s.off != s.addr-first.addr {
			return nil, fmt.Errorf("%w: segment %d at %#x is at file offset %#x, not %#x", ErrLayout, i, s.addr, s.off, s.addr-first.addr)
		}
		if i > 0 && s.addr < segs[i-1].addr+segs[i-1].memsz {
			return nil, fmt.Errorf("%w: segment %d overlaps the one before", ErrLayout, i)
		}
		if s.addr+s.memsz > 1<<32 {
			return nil, fmt.Errorf("%w: segment %d ends above 4 GiB", ErrLayout, i)
		}
	}
	for _, s := range segs {
		if f.Entry >= s.addr && f.Entry < s.addr+s.filesz {
			return segs, nil
		}
	}
	return nil, fmt.Errorf("%w: entry %#x outside the image", ErrLayout, f.Entry)
}

// used returns the file ranges the header must not overlap: the ELF
// header, the program and section header tables and every section's
// contents.
func used(f *elf.File, img []byte) [][2]uint64 {
	le := binary.LittleEndian
	phoff, shoff := le.Uint64(img[0x20:]), le.Uint64(img[0x28:])
	phentsize, phnum := uint64(le.Uint16(img[0x36:])), uint64(le.Uint16(img[0x38:]))
	shentsize, shnum := uint64(le.Uint16(img[0x3a:])), uint64(le.Uint16(img[0x3c:]))
	r := [][2]uint64{{0, 64}, {phoff, phoff + phentsize*phnum}, {shoff, shoff + shentsize*shnum}}
	for _, s := range f.Sections {
		if s.Type == elf.SHT_NOBITS || s.Size == 0 {
			continue
		}
		r = append(r, [2]uint64{s.Offset, s.Offset + s.Size})
	}
	return r
}

// Patch writes a Multiboot header with address fields into img, an ELF
// image, in the first free, zero-filled, 4-byte aligned room of its first 8
// KiB, and returns where. bssEnd is the end of the memory the boot loader
// must leave to the image (tamahv's RAM region end); it is raised to the
// image's own end if lower. The result is checked with Find.
func Patch(img []byte, bssEnd uint64) (Offset, error) {
	f, err := elf.NewFile(bytes.NewReader(img))
	if err != nil {
		return 0, fmt.Errorf("multiboot: %w", err)
	}
	segs, err := layout(f)
	if err != nil {
		return 0, err
	}
	if _, _, err := Find(img); err == nil {
		return 0, errors.New("multiboot: image already has a header")
	}
	first, last := segs[0], segs[len(segs)-1]
	limit := uint64(searchSize)
	if first.filesz < limit {
		limit = first.filesz
	}
	off, ok := freeRoom(img, used(f, img), limit)
	if !ok {
		return 0, ErrNoRoom
	}
	end := last.addr + last.memsz
	if bssEnd < end {
		bssEnd = end
	}
	if bssEnd > 1<<32 {
		return 0, fmt.Errorf("%w: reserved end %#x above 4 GiB", ErrLayout, bssEnd)
	}
	h := Header{
		Magic:       HeaderMagic,
		Flags:       FlagPageAlign | FlagMemInfo | FlagAddresses,
		HeaderAddr:  uint32(first.addr + off),
		LoadAddr:    uint32(first.addr),
		LoadEndAddr: uint32(last.addr + last.filesz),
		BSSEndAddr:  uint32(bssEnd),
		EntryAddr:   uint32(f.Entry),
	}
	h.Checksum = -(h.Magic + h.Flags)
	copy(img[off:], h.bytes())
	got, at, err := Find(img)
	if err != nil || at != int(off) || got != h {
		return 0, fmt.Errorf("multiboot: header did not verify: %v", err)
	}
	return int(off), nil
}

// freeRoom finds the first 4-aligned offset below limit where HeaderSize
// zero bytes overlap nothing in used.
func freeRoom(img []byte, used [][2]uint64, limit uint64) (uint64, bool) {
next:
	for off := uint64(64); off+HeaderSize <= limit && off+HeaderSize <= uint64(len(img)); off += 4 {
		for _, u := range used {
			if off < u[1] && u[0] < off+HeaderSize {
				continue next
			}
		}
		for _, b := range img[off : off+HeaderSize] {
			if b != 0 {
				continue next
			}
		}
		return off, true
	}
	return 0, false
}

// Find returns the one valid Multiboot header in the first 8 KiB of img.
// It fails if there is none or more than one.
func Find(img []byte) (Header, Offset, error) {
	var found []int
	for off := 0; off+12 <= len(img) && off+12 <= searchSize; off += 4 {
		m := binary.LittleEndian.Uint32(img[off:])
		fl := binary.LittleEndian.Uint32(img[off+4:])
		ck := binary.LittleEndian.Uint32(img[off+8:])
		if m == HeaderMagic && m+fl+ck == 0 {
			found = append(found, off)
		}
	}
	switch {
	case len(found) == 0:
		return Header{}, 0, ErrNoHeader
	case len(found) > 1:
		return Header{}, 0, fmt.Errorf("multiboot: %d headers at %v", len(found), found)
	}
	off := found[0]
	var h Header
	if off+HeaderSize > len(img) {
		return Header{}, 0, fmt.Errorf("multiboot: header at %#x truncated", off)
	}
	_ = binary.Read(bytes.NewReader(img[off:off+HeaderSize]), binary.LittleEndian, &h)
	if h.Flags&FlagAddresses != 0 {
		if h.LoadAddr > h.HeaderAddr || h.LoadEndAddr < h.HeaderAddr || h.BSSEndAddr < h.LoadEndAddr ||
			uint64(h.HeaderAddr-h.LoadAddr) != uint64(off) {
			return Header{}, 0, fmt.Errorf("%w: address fields %+v inconsistent with offset %#x", ErrLayout, h, off)
		}
		if h.EntryAddr < h.LoadAddr || h.EntryAddr >= h.LoadEndAddr {
			return Header{}, 0, fmt.Errorf("%w: entry %#x outside the loaded image", ErrLayout, h.EntryAddr)
		}
	}
	return h, off, nil
}
