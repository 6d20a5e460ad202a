package multiboot2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/board/pc/efi"
)

// Memory reads physical memory; the board reads it directly, tests from
// a byte slice.
type Memory interface {
	ReadPhys(pa uint64, p []byte) error
}

// Boot information tag types (Multiboot2 Specification 2.0, "3.6 Boot
// information format").
const (
	TagEnd           = 0
	TagCmdline       = 1
	TagLoaderName    = 2
	TagModule        = 3
	TagBasicMeminfo  = 4
	TagBootDev       = 5
	TagMmap          = 6
	TagVBE           = 7
	TagFramebuffer   = 8
	TagELFSections   = 9
	TagAPM           = 10
	TagEFI32         = 11
	TagEFI64         = 12
	TagSMBIOS        = 13
	TagACPIOld       = 14
	TagACPINew       = 15
	TagNetwork       = 16
	TagEFIMmap       = 17
	TagEFIBS         = 18 // EFI boot services not terminated
	TagEFI32IH       = 19
	TagEFI64IH       = 20
	TagLoadBaseAddr  = 21
	infoHeaderLength = 8
)

// Framebuffer types (tag 8).
const (
	FramebufferIndexed = 0
	FramebufferRGB     = 1
	FramebufferEGAText = 2
)

// Limits of what Parse accepts.
const (
	// MaxInfoSize bounds total_size: GRUB's structure on a machine with a
	// few hundred EFI memory descriptors is tens of KiB.
	MaxInfoSize = 256 << 10
	// MaxModules bounds the number of module tags.
	MaxModules = 64
	// mmapEntryLength is the size of a Multiboot2 memory map entry.
	mmapEntryLength = 24
)

// Module is a file the boot loader loaded with the image (tag 3).
type Module struct {
	Start, End uint32 // physical, End exclusive
	Cmdline    string
}

// MmapEntry is one entry of the boot loader's memory map (tag 6). Type 1
// is available RAM, 3 ACPI, 4 NVS, 5 bad; everything else is reserved
// (GRUB on UEFI also uses 20 for EFI runtime services code).
type MmapEntry struct {
	Base, Length uint64
	Type         uint32
}

// Color is one palette entry of an indexed framebuffer.
type Color struct{ Red, Green, Blue uint8 }

// ColorField is where a colour component lies in an RGB pixel.
type ColorField struct{ Position, Size uint8 }

// Framebuffer is the video mode the boot loader left (tag 8).
type Framebuffer struct {
	Addr                 uint64
	Pitch, Width, Height uint32 // Width and Height in characters for EGA text
	BPP                  uint8
	Type                 uint8 // FramebufferIndexed, FramebufferRGB or FramebufferEGAText
	// Red, Green and Blue are set for FramebufferRGB.
	Red, Green, Blue ColorField
	// Palette is set for FramebufferIndexed.
	Palette []Color
}

// Info is the parsed Multiboot2 boot information. Everything is copied
// out of the structure, which may then be overwritten.
type Info struct {
	// Tags lists the type of every tag but the end tag, in order.
	Tags []uint32

	Cmdline    string // tag 1
	LoaderName string // tag 2
	Modules    []Module
	// MemLower and MemUpper are the basic memory information (tag 4), in
	// KiB.
	MemLower, MemUpper uint32
	MemoryMap          []MmapEntry // tag 6
	Framebuffer        *Framebuffer
	// EFI32SystemTable and EFI64SystemTable are the EFI system table's
	// address (tags 11 and 12).
	EFI32SystemTable uint32
	EFI64SystemTable uint64
	// ACPIOld and ACPINew are the boot loader's copies of the ACPI 1.0
	// and ACPI 2.0 RSDP (tags 14 and 15), not checked here (see
	// acpi.MatchCopy).
	ACPIOld, ACPINew []byte
	// EFIMemoryMap is the EFI memory map as boot services ended (tag 17).
	EFIMemoryMap *efi.MemoryMap
	// EFIBootServices is set when the boot loader left the EFI boot
	// services running (tag 18).
	EFIBootServices bool
	// LoadBase is the physical address the image was loaded at (tag 21).
	LoadBase uint32
}

// Has says whether the information holds a tag of type t.
func (in *Info) Has(t uint32) bool {
	for _, x := range in.Tags {
		if x == t {
			return true
		}
	}
	return false
}

// ErrBadInfo is wrapped by every Parse error.
var ErrBadInfo = errors.New("multiboot2: bad boot information")

// Parse reads the boot information at pa, after checking the magic the
// boot loader left in EAX, and parses it with ParseBytes.
func Parse(m Memory, magic uint32, pa uint64) (*Info, error) {
	if magic != BootMagic {
		return nil, fmt.Errorf("%w: boot magic %#x, want %#x", ErrBadInfo, magic, uint32(BootMagic))
	}
	if pa%HeaderAlign != 0 {
		return nil, fmt.Errorf("%w: at %#x, not 8-aligned", ErrBadInfo, pa)
	}
	var head [infoHeaderLength]byte
	if err := m.ReadPhys(pa, head[:]); err != nil {
		return nil, fmt.Errorf("%w: at %#x: %v", ErrBadInfo, pa, err)
	}
	n := binary.LittleEndian.Uint32(head[:])
	if n < 2*infoHeaderLength || n > MaxInfoSize {
		return nil, fmt.Errorf("%w: total size %d", ErrBadInfo, n)
	}
	b := make([]byte, n)
	if err := m.ReadPhys(pa, b); err != nil {
		return nil, fmt.Errorf("%w: %d bytes at %#x: %v", ErrBadInfo, n, pa, err)
	}
	return ParseBytes(b)
}

// ParseBytes parses a boot information structure: total_size (which must
// be len(b) at most), then 8-aligned tags up to the end tag. Every tag's
// size is checked against the structure and against its type's layout;
// strings must end inside their tag. Tags of unknown types are skipped,
// as the specification asks; a second tag of a type that may appear once
// is an error.
func ParseBytes(b []byte) (*Info, error) {
	le := binary.LittleEndian
	if len(b) < 2*infoHeaderLength {
		return nil, fmt.Errorf("%w: %d bytes", ErrBadInfo, len(b))
	}
	total := le.Uint32(b)
	if total < 2*infoHeaderLength || uint64(total) > uint64(len(b)) || total > MaxInfoSize {
		return nil, fmt.Errorf("%w: total size %d in %d bytes", ErrBadInfo, total, len(b))
	}
	b = b[:total]
	in := &Info{}
	var seen [TagLoadBaseAddr + 1]bool
	for off := infoHeaderLength; ; {
		if off+infoHeaderLength > len(b) {
			return nil, fmt.Errorf("%w: no end tag in %d bytes", ErrBadInfo, len(b))
		}
		typ, size := le.Uint32(b[off:]), le.Uint32(b[off+4:])
		if size < infoHeaderLength || uint64(size) > uint64(len(b)-off) {
			return nil, fmt.Errorf("%w: tag %d at %d has size %d", ErrBadInfo, typ, off, size)
		}
		if typ == TagEnd {
			if size != infoHeaderLength {
				return nil, fmt.Errorf("%w: end tag of size %d", ErrBadInfo, size)
			}
			return in, nil
		}
		if typ < uint32(len(seen)) && typ != TagModule {
			if seen[typ] {
				return nil, fmt.Errorf("%w: tag %d twice", ErrBadInfo, typ)
			}
			seen[typ] = true
		}
		in.Tags = append(in.Tags, typ)
		if err := in.tag(typ, b[off+infoHeaderLength:off+int(size)]); err != nil {
			return nil, fmt.Errorf("%w: tag %d at %d: %v", ErrBadInfo, typ, off, err)
		}
		off += align8(int(size))
	}
}

// tag decodes the body of one tag (what follows type and size).
func (in *Info) tag(typ uint32, body []byte) error {
	le := binary.LittleEndian
	need := func(n int) error {
		if len(body) < n {
			return fmt.Errorf("%d bytes, want at least %d", len(body), n)
		}
		return nil
	}
	switch typ {
	case TagCmdline, TagLoaderName:
		s, err := cstring(body)
		if err != nil {
			return err
		}
		if typ == TagCmdline {
			in.Cmdline = s
		} else {
			in.LoaderName = s
		}
	case TagModule:
		if err := need(9); err != nil {
			return err
		}
		if len(in.Modules) == MaxModules {
			return fmt.Errorf("more than %d modules", MaxModules)
		}
		mod := Module{Start: le.Uint32(body), End: le.Uint32(body[4:])}
		if mod.End < mod.Start {
			return fmt.Errorf("module ends at %#x before its start %#x", mod.End, mod.Start)
		}
		var err error
		if mod.Cmdline, err = cstring(body[8:]); err != nil {
			return err
		}
		in.Modules = append(in.Modules, mod)
	case TagBasicMeminfo:
		if err := need(8); err != nil {
			return err
		}
		in.MemLower, in.MemUpper = le.Uint32(body), le.Uint32(body[4:])
	case TagMmap:
		return in.mmap(body)
	case TagFramebuffer:
		return in.framebuffer(body)
	case TagEFI32:
		if err := need(4); err != nil {
			return err
		}
		in.EFI32SystemTable = le.Uint32(body)
	case TagEFI64:
		if err := need(8); err != nil {
			return err
		}
		in.EFI64SystemTable = le.Uint64(body)
	case TagACPIOld:
		in.ACPIOld = bytes.Clone(body)
	case TagACPINew:
		in.ACPINew = bytes.Clone(body)
	case TagEFIMmap:
		if err := need(8); err != nil {
			return err
		}
		m, err := efi.ParseMemoryMap(body[8:], le.Uint32(body), le.Uint32(body[4:]))
		if err != nil {
			return err
		}
		in.EFIMemoryMap = m
	case TagEFIBS:
		in.EFIBootServices = true
	case TagLoadBaseAddr:
		if err := need(4); err != nil {
			return err
		}
		in.LoadBase = le.Uint32(body)
	}
	return nil
}

// cstring returns the NUL-terminated string at the start of b.
func cstring(b []byte) (string, error) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return "", errors.New("string not terminated inside its tag")
	}
	return string(b[:i]), nil
}

func (in *Info) mmap(body []byte) error {
	le := binary.LittleEndian
	if len(body) < 8 {
		return fmt.Errorf("memory map tag of %d bytes", len(body))
	}
	size := int(le.Uint32(body))
	if size < mmapEntryLength || size%8 != 0 || size > MaxInfoSize {
		return fmt.Errorf("memory map entry size %d", size)
	}
	entries := body[8:]
	if len(entries)%size != 0 {
		return fmt.Errorf("memory map of %d bytes in %d-byte entries", len(entries), size)
	}
	in.MemoryMap = make([]MmapEntry, 0, len(entries)/size)
	for off := 0; off < len(entries); off += size {
		e := entries[off:]
		in.MemoryMap = append(in.MemoryMap, MmapEntry{Base: le.Uint64(e), Length: le.Uint64(e[8:]), Type: le.Uint32(e[16:])})
	}
	return nil
}

// framebufferCommon is the size of tag 8's fields common to all types,
// after type and size.
const framebufferCommon = 24

func (in *Info) framebuffer(body []byte) error {
	le := binary.LittleEndian
	if len(body) < framebufferCommon {
		return fmt.Errorf("framebuffer tag of %d bytes", len(body))
	}
	fb := &Framebuffer{
		Addr: le.Uint64(body), Pitch: le.Uint32(body[8:]), Width: le.Uint32(body[12:]), Height: le.Uint32(body[16:]),
		BPP: body[20], Type: body[21],
	}
	extra := body[framebufferCommon:]
	switch fb.Type {
	case FramebufferIndexed:
		if len(extra) < 2 {
			return errors.New("indexed framebuffer without a palette size")
		}
		n := int(le.Uint16(extra))
		if 2+3*n > len(extra) {
			return fmt.Errorf("palette of %d colours in %d bytes", n, len(extra)-2)
		}
		fb.Palette = make([]Color, n)
		for i := range fb.Palette {
			c := extra[2+3*i:]
			fb.Palette[i] = Color{c[0], c[1], c[2]}
		}
	case FramebufferRGB:
		if len(extra) < 6 {
			return fmt.Errorf("RGB framebuffer with %d bytes of colour information", len(extra))
		}
		fb.Red, fb.Green, fb.Blue = ColorField{extra[0], extra[1]}, ColorField{extra[2], extra[3]}, ColorField{extra[4], extra[5]}
	case FramebufferEGAText:
	default:
		return fmt.Errorf("framebuffer type %d", fb.Type)
	}
	in.Framebuffer = fb
	return nil
}
