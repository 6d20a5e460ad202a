package pc

import (
	"fmt"
	"unsafe"
)

// PageArena owns the host memory tamahv hands to the processor: 4 KiB
// pages (EPT tables, VMCS, bitmaps, the shadow page) and larger aligned
// blocks (the EPT sink), all with known physical addresses and all kept
// alive by the arena. Memory given to hardware must not be a Go value
// that only the hardware still refers to: the collector would free it
// and hand it to new objects while the processor reads and writes it.
// Keep the arena for as long as the processor uses any of its memory
// (the EPT that allocates its tables from the arena refers to it).
//
// Pages and blocks are carved from Go allocations: the board maps memory
// one to one, and the Go heap does not move objects. It implements
// ept.Tables.
type PageArena struct {
	mem    []byte
	base   uint64
	next   int
	free   []uint64
	blocks [][]byte // Block's allocations, kept for the arena's life
}

// PhysAddr returns the physical address of a Go object: the board maps
// memory one to one, and the Go heap does not move objects.
func PhysAddr(p unsafe.Pointer) uint64 { return uint64(uintptr(p)) }

// NewPageArena reserves n pages.
func NewPageArena(n int) *PageArena {
	mem := make([]byte, (n+1)*4096)
	pa := PhysAddr(unsafe.Pointer(&mem[0]))
	off := int((4096 - pa%4096) % 4096)
	return &PageArena{mem: mem[off : off+n*4096], base: pa + uint64(off)}
}

// Alloc returns the physical address of a zeroed page.
func (a *PageArena) Alloc() (uint64, error) {
	if n := len(a.free); n > 0 {
		pa := a.free[n-1]
		a.free = a.free[:n-1]
		clear(a.mem[pa-a.base : pa-a.base+4096])
		return pa, nil
	}
	if a.next+4096 > len(a.mem) {
		return 0, fmt.Errorf("pc: page arena of %d pages is full", len(a.mem)/4096)
	}
	pa := a.base + uint64(a.next)
	a.next += 4096
	return pa, nil
}

// Free returns a page.
func (a *PageArena) Free(pa uint64) { a.free = append(a.free, pa) }

// Pages returns the number of pages handed out and not freed.
func (a *PageArena) Pages() int { return a.next/4096 - len(a.free) }

// Bytes returns the page at pa as bytes.
func (a *PageArena) Bytes(pa uint64) (*[4096]byte, error) {
	if pa < a.base || pa >= a.base+uint64(len(a.mem)) || pa%4096 != 0 {
		return nil, fmt.Errorf("pc: %#x is not an arena page", pa)
	}
	return (*[4096]byte)(a.mem[pa-a.base : pa-a.base+4096]), nil
}

// Table returns the page at pa as 512 entries.
func (a *PageArena) Table(pa uint64) (*[512]uint64, error) {
	b, err := a.Bytes(pa)
	if err != nil {
		return nil, err
	}
	return (*[512]uint64)(unsafe.Pointer(b)), nil
}

// Block returns size bytes of zeroed memory aligned to align (a power of
// two of at least 4 KiB; size a multiple of 4 KiB), owned by the arena
// for as long as it lives: its physical address and its bytes.
func (a *PageArena) Block(size, align uint64) (uint64, []byte, error) {
	if align < 4096 || align&(align-1) != 0 || size == 0 || size%4096 != 0 || size+align < size {
		return 0, nil, fmt.Errorf("pc: block of %#x bytes aligned to %#x", size, align)
	}
	mem := make([]byte, size+align)
	pa := PhysAddr(unsafe.Pointer(&mem[0]))
	off := (align - pa%align) % align
	a.blocks = append(a.blocks, mem)
	return pa + off, mem[off : off+size], nil
}
