package multiboot

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Memory reads guest-physical memory; the board reads it directly, tests
// from a byte slice.
type Memory interface {
	ReadPhys(pa uint64, p []byte) error
}

// Information-structure flags (Multiboot Specification 0.6.96, "3.3 Boot
// information format").
const (
	InfoMem        = 1 << 0
	InfoBootDevice = 1 << 1
	InfoCmdline    = 1 << 2
	InfoMods       = 1 << 3
	InfoMmap       = 1 << 6
	InfoLoaderName = 1 << 9
)

// Memory-map entry types.
const (
	MemAvailable = 1
	MemReserved  = 2
	MemACPI      = 3
	MemNVS       = 4
	MemBad       = 5
)

// Limits of what Parse accepts.
const (
	MaxModules    = 16
	MaxMmapLength = 64 << 10
	MaxString     = 4096
)

// Module is a file the boot loader loaded with the image.
type Module struct {
	Start, End uint64 // physical, End exclusive
	Cmdline    string
}

// Region is one entry of the boot loader's memory map.
type Region struct {
	Base, Length uint64
	Type         uint32
}

// End is the first address after r (saturating at 2^64-1).
func (r Region) End() uint64 {
	if e := r.Base + r.Length; e >= r.Base {
		return e
	}
	return ^uint64(0)
}

// Info is the parsed Multiboot information structure.
type Info struct {
	Flags              uint32
	MemLower, MemUpper uint32 // KiB, with InfoMem
	Cmdline            string
	LoaderName         string
	Modules            []Module
	MemoryMap          []Region
}

// ErrBadInfo is wrapped by every Parse error.
var ErrBadInfo = errors.New("multiboot: bad information structure")

// Parse reads the information structure at pa. Every pointer and length is
// checked: the structure comes from outside and may be malformed.
func Parse(m Memory, magic uint32, pa uint64) (*Info, error) {
	if magic != BootMagic {
		return nil, fmt.Errorf("%w: boot magic %#x, want %#x", ErrBadInfo, magic, uint32(BootMagic))
	}
	var raw [88]byte
	if err := m.ReadPhys(pa, raw[:]); err != nil {
		return nil, fmt.Errorf("%w: at %#x: %v", ErrBadInfo, pa, err)
	}
	u32 := func(o int) uint32 { return binary.LittleEndian.Uint32(raw[o:]) }
	in := &Info{Flags: u32(0)}
	if in.Flags&InfoMem != 0 {
		in.MemLower, in.MemUpper = u32(4), u32(8)
	}
	var err error
	if in.Flags&InfoCmdline != 0 {
		if in.Cmdline, err = cstring(m, uint64(u32(16))); err != nil {
			return nil, fmt.Errorf("%w: command line: %v", ErrBadInfo, err)
		}
	}
	if in.Flags&InfoLoaderName != 0 {
		if in.LoaderName, err = cstring(m, uint64(u32(64))); err != nil {
			return nil, fmt.Errorf("%w: boot loader name: %v", ErrBadInfo, err)
		}
	}
	if in.Flags&InfoMods != 0 {
		if in.Modules, err = modules(m, u32(20), uint64(u32(24))); err != nil {
			return nil, err
		}
	}
	if in.Flags&InfoMmap != 0 {
		if in.MemoryMap, err = memoryMap(m, u32(44), uint64(u32(48))); err != nil {
			return nil, err
		}
	}
	return in, nil
}

func cstring(m Memory, pa uint64) (string, error) {
	var b []byte
	var chunk [64]byte
	for len(b) < MaxString {
		if err := m.ReadPhys(pa+uint64(len(b)), chunk[:]); err != nil {
			return "", err
		}
		for _, c := range chunk {
			if c == 0 {
				return string(b), nil
			}
			b = append(b, c)
		}
	}
	return "", fmt.Errorf("string at %#x longer than %d bytes", pa, MaxString)
}

func modules(m Memory, count uint32, pa uint64) ([]Module, error) {
	if count > MaxModules {
		return nil, fmt.Errorf("%w: %d modules (at most %d)", ErrBadInfo, count, MaxModules)
	}
	var mods []Module
	for i := uint32(0); i < count; i++ {
		var e [16]byte
		if err := m.ReadPhys(pa+16*uint64(i), e[:]); err != nil {
			return nil, fmt.Errorf("%w: module %d: %v", ErrBadInfo, i, err)
		}
		mod := Module{Start: uint64(binary.LittleEndian.Uint32(e[0:])), End: uint64(binary.LittleEndian.Uint32(e[4:]))}
		if mod.End < mod.Start {
			return nil, fmt.Errorf("%w: module %d ends at %#x before its start %#x", ErrBadInfo, i, mod.End, mod.Start)
		}
		if s := binary.LittleEndian.Uint32(e[8:]); s != 0 {
			var err error
			if mod.Cmdline, err = cstring(m, uint64(s)); err != nil {
				return nil, fmt.Errorf("%w: module %d string: %v", ErrBadInfo, i, err)
			}
		}
		mods = append(mods, mod)
	}
	return mods, nil
}

func memoryMap(m Memory, length uint32, pa uint64) ([]Region, error) {
	if length > MaxMmapLength {
		return nil, fmt.Errorf("%w: memory map of %d bytes", ErrBadInfo, length)
	}
	buf := make([]byte, length)
	if err := m.ReadPhys(pa, buf); err != nil {
		return nil, fmt.Errorf("%w: memory map: %v", ErrBadInfo, err)
	}
	var out []Region
	for off := 0; off < len(buf); {
		if off+4 > len(buf) {
			return nil, fmt.Errorf("%w: memory map entry at %d truncated", ErrBadInfo, off)
		}
		size := int(binary.LittleEndian.Uint32(buf[off:]))
		if size < 20 || off+4+size > len(buf) {
			return nil, fmt.Errorf("%w: memory map entry at %d has size %d", ErrBadInfo, off, size)
		}
		e := buf[off+4:]
		out = append(out, Region{
			Base:   binary.LittleEndian.Uint64(e[0:]),
			Length: binary.LittleEndian.Uint64(e[8:]),
			Type:   binary.LittleEndian.Uint32(e[16:]),
		})
		off += 4 + size
	}
	return out, nil
}
