// Package multiboot2 writes and checks the Multiboot2 header of tamahv's
// ELF image, and parses the Multiboot2 boot information a boot loader
// hands over.
//
// The header sits next to the Multiboot 1 one (package multiboot), so
// that one image boots through GRUB's multiboot and multiboot2 commands,
// on BIOS and on UEFI. Like the Multiboot 1 header it carries the address
// fields, so that the boot loader treats the whole of tamahv's RAM
// region, up to bss_end_addr, as taken. It asks for the memory maps, the
// EFI system table, the ACPI RSDP copies and a framebuffer, never for
// SMBIOS (GRUB 2.06 refuses that request), and carries no EFI boot
// services tag: GRUB then terminates the boot services itself and enters
// tamahv at its 32-bit entry, as on BIOS. Layout: Multiboot2
// Specification 2.0, "3.1 OS image format".
package multiboot2

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
)

// Header constants (Multiboot2 Specification 2.0, "3.1.1 The layout of
// Multiboot2 header" and "3.1.2 Machine state").
const (
	HeaderMagic = 0xE85250D6
	// BootMagic is what the boot loader leaves in EAX.
	BootMagic = 0x36d76289
	// ArchI386 is the architecture field for i386 (32-bit protected
	// mode entry), the only one tamahv's entry handles.
	ArchI386 = 0

	// HeaderAlign is the alignment of the header and of each of its tags.
	HeaderAlign = 8
	// SearchSize is how far into the file a boot loader looks for the
	// header.
	SearchSize = 32768
)

// Header tag types (Multiboot2 Specification 2.0, 3.1.3-3.1.13).
const (
	HeaderTagEnd          = 0
	HeaderTagInfoRequest  = 1
	HeaderTagAddress      = 2
	HeaderTagEntry        = 3
	HeaderTagConsoleFlags = 4
	HeaderTagFramebuffer  = 5
	HeaderTagModuleAlign  = 6
	HeaderTagEFIBS        = 7
	HeaderTagEntryEFI32   = 8
	HeaderTagEntryEFI64   = 9
	HeaderTagRelocatable  = 10
)

// Header tag flags and console flags.
const (
	// TagOptional lets a boot loader that does not know a tag ignore it.
	TagOptional = 1 << 0

	// ConsoleRequired asks for a console the image can use.
	ConsoleRequired = 1 << 0
	// ConsoleEGAText says the image can use an EGA text console.
	ConsoleEGAText = 1 << 1
)

// Header and tag sizes, and what Find accepts.
const (
	headerFixedSize = 16
	tagHeaderSize   = 8
	addressTagSize  = 24
	entryTagSize    = 12
	consoleTagSize  = 12
	fbTagSize       = 20
	maxInfoRequests = 64
)

// Requests returns the information tags tamahv's header asks for: the
// memory map, the command line, the modules, the EFI64 system table, both
// ACPI RSDP copies, the EFI memory map, the framebuffer and the load base.
// It never asks for SMBIOS (tag 13): GRUB 2.06 refuses the image then.
func Requests() []uint32 {
	return []uint32{
		TagMmap, TagCmdline, TagModule, TagEFI64, TagACPIOld,
		TagACPINew, TagEFIMmap, TagFramebuffer, TagLoadBaseAddr,
	}
}

// Address holds the address tag's fields: where the file's header lies in
// memory, where loading starts and ends in the file, and the end of the
// memory the boot loader must leave to the image.
type Address struct {
	HeaderAddr, LoadAddr, LoadEndAddr, BSSEndAddr uint32
}

// FramebufferPreference is the framebuffer tag: the preferred mode, 0 for
// no preference.
type FramebufferPreference struct {
	Width, Height, Depth uint32
}

// Header is a Multiboot2 header made of the tags tamahv uses. Tags other
// boot images carry are listed in Other when Find decodes a header.
type Header struct {
	// Requests is the (required) information request tag; nil: none.
	Requests []uint32
	// Address is the address tag; nil: none.
	Address *Address
	// Entry is the entry address tag (the 32-bit entry); 0: none.
	Entry uint32
	// ConsoleFlags is the optional console flags tag; 0: none.
	ConsoleFlags uint32
	// Framebuffer is the optional framebuffer tag; nil: none.
	Framebuffer *FramebufferPreference
	// ModuleAlign is the module alignment tag (page-aligned modules).
	ModuleAlign bool
	// Other lists the types of the other tags Find met, in order.
	Other []uint16
}

// Tamahv returns the header tamahv's image carries, for an image with the
// given address fields and 32-bit entry. It has no framebuffer tag: GRUB
// would then leave the display in a graphics mode on BIOS, and the guest,
// which is not told of a framebuffer (screen_info), would write to a VGA
// text console no one sees. The framebuffer GRUB left is still reported
// (the TagFramebuffer request), on UEFI where there is no text mode.
func Tamahv(addr Address, entry uint32) Header {
	return Header{
		Requests:     Requests(),
		Address:      &addr,
		Entry:        entry,
		ConsoleFlags: ConsoleEGAText,
		ModuleAlign:  true,
	}
}

// Offset is where in the file a header was found or written.
type Offset = int

func align8(n int) int { return (n + HeaderAlign - 1) &^ (HeaderAlign - 1) }

// Bytes encodes h, each tag padded to 8 bytes, with the end tag. Other is
// not encoded.
func (h *Header) Bytes() []byte {
	le := binary.LittleEndian
	b := make([]byte, headerFixedSize)
	tag := func(typ, flags uint16, body ...uint32) {
		t := make([]byte, tagHeaderSize+4*len(body))
		le.PutUint16(t[0:], typ)
		le.PutUint16(t[2:], flags)
		le.PutUint32(t[4:], uint32(len(t)))
		for i, v := range body {
			le.PutUint32(t[tagHeaderSize+4*i:], v)
		}
		b = append(b, t...)
		b = append(b, make([]byte, align8(len(t))-len(t))...)
	}
	if h.Requests != nil {
		tag(HeaderTagInfoRequest, 0, h.Requests...)
	}
	if a := h.Address; a != nil {
		tag(HeaderTagAddress, 0, a.HeaderAddr, a.LoadAddr, a.LoadEndAddr, a.BSSEndAddr)
	}
	if h.Entry != 0 {
		tag(HeaderTagEntry, 0, h.Entry)
	}
	if h.ConsoleFlags != 0 {
		tag(HeaderTagConsoleFlags, TagOptional, h.ConsoleFlags)
	}
	if f := h.Framebuffer; f != nil {
		tag(HeaderTagFramebuffer, TagOptional, f.Width, f.Height, f.Depth)
	}
	if h.ModuleAlign {
		tag(HeaderTagModuleAlign, 0)
	}
	tag(HeaderTagEnd, 0)
	le.PutUint32(b[0:], HeaderMagic)
	le.PutUint32(b[4:], ArchI386)
	le.PutUint32(b[8:], uint32(len(b)))
	le.PutUint32(b[12:], -(HeaderMagic + ArchI386 + uint32(len(b))))
	return b
}

// Errors from Patch and Find.
var (
	ErrNoRoom   = errors.New("multiboot2: no free, aligned room for the header in the first 32 KiB")
	ErrNoHeader = errors.New("multiboot2: no valid header in the first 32 KiB")
	ErrLayout   = errors.New("multiboot2: image layout unusable")
	ErrHeader   = errors.New("multiboot2: malformed header")
)

// Find returns the one Multiboot2 header in the first 32 KiB of img: an
// 8-aligned magic whose checksum holds. It decodes and checks every tag
// up to the end tag: sizes, the header length, the address fields
// against the header's offset, and the entry inside the loaded image.
func Find(img []byte) (Header, Offset, error) {
	le := binary.LittleEndian
	var found []int
	for off := 0; off+headerFixedSize <= len(img) && off+headerFixedSize <= SearchSize; off += HeaderAlign {
		m, arch, n, ck := le.Uint32(img[off:]), le.Uint32(img[off+4:]), le.Uint32(img[off+8:]), le.Uint32(img[off+12:])
		if m == HeaderMagic && m+arch+n+ck == 0 {
			found = append(found, off)
		}
	}
	switch {
	case len(found) == 0:
		return Header{}, 0, ErrNoHeader
	case len(found) > 1:
		return Header{}, 0, fmt.Errorf("multiboot2: %d headers at %v", len(found), found)
	}
	off := found[0]
	h, err := decode(img[off:], off)
	if err != nil {
		return Header{}, 0, err
	}
	return h, off, nil
}

// decode decodes the header at the start of b, which lies at file offset
// off.
func decode(b []byte, off int) (Header, error) {
	le := binary.LittleEndian
	if arch := le.Uint32(b[4:]); arch != ArchI386 {
		return Header{}, fmt.Errorf("%w: architecture %d, want %d", ErrHeader, arch, ArchI386)
	}
	length := int(le.Uint32(b[8:]))
	if length < headerFixedSize+tagHeaderSize || length > len(b) || length > SearchSize {
		return Header{}, fmt.Errorf("%w: header length %d", ErrHeader, length)
	}
	var h Header
	seen := map[uint16]bool{}
	for t := headerFixedSize; ; {
		if t+tagHeaderSize > length {
			return Header{}, fmt.Errorf("%w: no end tag within %d bytes", ErrHeader, length)
		}
		typ, flags, size := le.Uint16(b[t:]), le.Uint16(b[t+2:]), int(le.Uint32(b[t+4:]))
		if size < tagHeaderSize || t+size > length {
			return Header{}, fmt.Errorf("%w: tag %d at %d has size %d", ErrHeader, typ, t, size)
		}
		if typ == HeaderTagEnd {
			if size != tagHeaderSize || t+size != length {
				return Header{}, fmt.Errorf("%w: end tag at %d of size %d, header length %d", ErrHeader, t, size, length)
			}
			break
		}
		if seen[typ] {
			return Header{}, fmt.Errorf("%w: tag %d twice", ErrHeader, typ)
		}
		seen[typ] = true
		body := b[t+tagHeaderSize : t+size]
		u32 := func(i int) uint32 { return le.Uint32(body[4*i:]) }
		if w, ok := headerTagSize(typ); ok && size != w {
			return Header{}, fmt.Errorf("%w: tag %d has size %d, want %d", ErrHeader, typ, size, w)
		}
		switch typ {
		case HeaderTagInfoRequest:
			if len(body)%4 != 0 || len(body)/4 > maxInfoRequests {
				return Header{}, fmt.Errorf("%w: information request of %d bytes", ErrHeader, len(body))
			}
			if flags&TagOptional != 0 {
				return Header{}, fmt.Errorf("%w: optional information request (GRUB ignores it)", ErrHeader)
			}
			h.Requests = make([]uint32, len(body)/4)
			for i := range h.Requests {
				h.Requests[i] = u32(i)
			}
		case HeaderTagAddress:
			h.Address = &Address{u32(0), u32(1), u32(2), u32(3)}
		case HeaderTagEntry:
			h.Entry = u32(0)
			if h.Entry == 0 {
				return Header{}, fmt.Errorf("%w: entry address 0", ErrHeader)
			}
		case HeaderTagConsoleFlags:
			h.ConsoleFlags = u32(0)
		case HeaderTagFramebuffer:
			h.Framebuffer = &FramebufferPreference{u32(0), u32(1), u32(2)}
		case HeaderTagModuleAlign:
			h.ModuleAlign = true
		default:
			h.Other = append(h.Other, typ)
		}
		t += align8(size)
	}
	if a := h.Address; a != nil {
		if h.Entry == 0 {
			return Header{}, fmt.Errorf("%w: address tag without entry tag", ErrLayout)
		}
		if a.LoadAddr > a.HeaderAddr || uint64(a.HeaderAddr-a.LoadAddr) != uint64(off) ||
			(a.LoadEndAddr != 0 && a.LoadEndAddr <= a.HeaderAddr) ||
			(a.BSSEndAddr != 0 && a.BSSEndAddr < a.LoadEndAddr) {
			return Header{}, fmt.Errorf("%w: address fields %+v inconsistent with offset %#x", ErrLayout, *a, off)
		}
		if h.Entry < a.LoadAddr || (a.LoadEndAddr != 0 && h.Entry >= a.LoadEndAddr) {
			return Header{}, fmt.Errorf("%w: entry %#x outside the loaded image", ErrLayout, h.Entry)
		}
	}
	return h, nil
}

// headerTagSize is the size of a fixed-size header tag.
func headerTagSize(typ uint16) (int, bool) {
	switch typ {
	case HeaderTagAddress:
		return addressTagSize, true
	case HeaderTagEntry:
		return entryTagSize, true
	case HeaderTagConsoleFlags:
		return consoleTagSize, true
	case HeaderTagFramebuffer:
		return fbTagSize, true
	case HeaderTagModuleAlign:
		return tagHeaderSize, true
	}
	return 0, false
}

type segment struct{ off, addr, filesz, memsz uint64 }

// layout checks that the ELF loads linearly, as the address fields need:
// every PT_LOAD segment lies in the file at the same distance from the
// first as in memory, below 4 GiB, the first one at file offset 0.
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

// freeRoom finds the first 8-aligned offset below limit where n zero
// bytes overlap nothing in used. A Multiboot 1 header already written is
// not zero, so it is passed over.
func freeRoom(img []byte, used [][2]uint64, limit, n uint64) (uint64, bool) {
next:
	for off := uint64(64); off+n <= limit && off+n <= uint64(len(img)); off += HeaderAlign {
		for _, u := range used {
			if off < u[1] && u[0] < off+n {
				continue next
			}
		}
		for _, b := range img[off : off+n] {
			if b != 0 {
				continue next
			}
		}
		return off, true
	}
	return 0, false
}

// Patch writes tamahv's Multiboot2 header (Tamahv) into img, an ELF
// image, in the first free, zero-filled, 8-byte aligned room of its first
// 32 KiB, and returns where. bssEnd is the end of the memory the boot
// loader must leave to the image (tamahv's RAM region end); it is raised
// to the image's own end if lower. The result is checked with Find. A
// Multiboot 1 header in the image is left as it is.
func Patch(img []byte, bssEnd uint64) (Offset, error) {
	f, err := elf.NewFile(bytes.NewReader(img))
	if err != nil {
		return 0, fmt.Errorf("multiboot2: %w", err)
	}
	segs, err := layout(f)
	if err != nil {
		return 0, err
	}
	if _, _, err := Find(img); !errors.Is(err, ErrNoHeader) {
		return 0, errors.New("multiboot2: image already has a header")
	}
	first, last := segs[0], segs[len(segs)-1]
	limit := min(uint64(SearchSize), first.filesz)
	end := max(bssEnd, last.addr+last.memsz)
	if end > 1<<32 {
		return 0, fmt.Errorf("%w: reserved end %#x above 4 GiB", ErrLayout, end)
	}
	sized := Tamahv(Address{}, 1)
	off, ok := freeRoom(img, used(f, img), limit, uint64(len(sized.Bytes())))
	if !ok {
		return 0, ErrNoRoom
	}
	h := Tamahv(Address{
		HeaderAddr:  uint32(first.addr + off),
		LoadAddr:    uint32(first.addr),
		LoadEndAddr: uint32(last.addr + last.filesz),
		BSSEndAddr:  uint32(end),
	}, uint32(f.Entry))
	copy(img[off:], h.Bytes())
	got, at, err := Find(img)
	if err != nil || at != int(off) || !got.equal(&h) {
		return 0, fmt.Errorf("multiboot2: header did not verify: %v", err)
	}
	return int(off), nil
}

func (h *Header) equal(o *Header) bool {
	return bytes.Equal(h.Bytes(), o.Bytes()) && len(h.Other) == len(o.Other)
}
