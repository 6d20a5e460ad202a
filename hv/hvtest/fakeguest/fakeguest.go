// Package fakeguest is a guest for tests of packages built on hv, without
// a processor: host memory in frames, a guest with its own 4-level page
// tables there, an EPT over the whole machine with guestmem.GuestPhys on top,
// and a vCPU whose VM exits a test scripts.
package fakeguest

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/vmx"
)

// Frames is host-physical memory in 4 KiB frames made on first touch: the
// whole machine, tamahv's region included.
type Frames map[uint64]*[4096]byte

// At returns the byte at pa.
func (m Frames) At(pa uint64) *byte {
	f := m[pa&^0xfff]
	if f == nil {
		f = new([4096]byte)
		m[pa&^0xfff] = f
	}
	return &f[pa&0xfff]
}

// ReadPhys implements hv.Memory.
func (m Frames) ReadPhys(pa uint64, p []byte) error {
	for i := range p {
		p[i] = *m.At(pa + uint64(i))
	}
	return nil
}

// WritePhys implements hv.Memory.
func (m Frames) WritePhys(pa uint64, p []byte) error {
	for i, b := range p {
		*m.At(pa + uint64(i)) = b
	}
	return nil
}

// CopyPhys implements hv.Memory.
func (m Frames) CopyPhys(dst, src, n uint64) error {
	b := make([]byte, n)
	_ = m.ReadPhys(src, b)
	return m.WritePhys(dst, b)
}

// Get64 reads the 8 bytes at pa.
func (m Frames) Get64(pa uint64) uint64 {
	var b [8]byte
	_ = m.ReadPhys(pa, b[:])
	return binary.LittleEndian.Uint64(b[:])
}

// Put64 writes v at pa.
func (m Frames) Put64(pa, v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_ = m.WritePhys(pa, b[:])
}

// Tables is an EPT table arena in a map (ept.Tables).
type Tables struct {
	Pages map[uint64]*[512]uint64
	Next  uint64
	Limit int // the most tables at a time (0: no limit)
}

// Alloc implements ept.Tables.
func (m *Tables) Alloc() (uint64, error) {
	if m.Limit > 0 && len(m.Pages) >= m.Limit {
		return 0, fmt.Errorf("table arena of %d pages is full", m.Limit)
	}
	m.Next += 4096
	m.Pages[m.Next] = new([512]uint64)
	return m.Next, nil
}

// Free implements ept.Tables.
func (m *Tables) Free(pa uint64) { delete(m.Pages, pa) }

// Table implements ept.Tables.
func (m *Tables) Table(pa uint64) (*[512]uint64, error) {
	if t := m.Pages[pa]; t != nil {
		return t, nil
	}
	return nil, fmt.Errorf("no table %#x", pa)
}

// The test machine: Map's RAM, tamahv at 256-384 MiB with its sink in the
// middle, as tamahv's image wires it; guest kernel addresses are KernelOff
// above their physical ones.
const (
	HoleStart = 0x10000000
	HoleEnd   = 0x18000000
	SinkPA    = 0x12000000
	KernelOff = 0xffffffff80000000
)

// Map is the test machine's memory map: 1 GiB of RAM below 4 GiB, less
// the legacy holes, and 1 GiB above.
var Map = []hv.E820Entry{
	{Addr: 0, Size: 0x9fc00, Type: hv.E820RAM},
	{Addr: 0x9fc00, Size: 0x400, Type: hv.E820Reserved},
	{Addr: 0xf0000, Size: 0x10000, Type: hv.E820Reserved},
	{Addr: 0x100000, Size: 0x3fef0000, Type: hv.E820RAM},
	{Addr: 0x3fff0000, Size: 0x10000, Type: hv.E820ACPI},
	{Addr: 0x100000000, Size: 0x40000000, Type: hv.E820RAM},
}

// Guest is a guest with its own 4-level page tables in Mem, an EPT built
// by guestmem.MapGuest over Map, and Phys over both. Flushes counts Phys's
// invalidations.
type Guest struct {
	Mem     Frames
	EPT     *ept.EPT
	Tables  *Tables
	Phys    *guestmem.GuestPhys
	CR3     uint64
	Next    uint64 // the next frame for paging structures
	Flushes int
}

// New returns a Guest whose EPT has options o.
func New(t testing.TB, o ept.Options) *Guest {
	g := &Guest{Mem: Frames{}, Tables: &Tables{Pages: map[uint64]*[512]uint64{}, Next: 0x80_0000_0000}, Next: 0x200000}
	e, err := ept.New(g.Tables, o)
	require.NoError(t, err)
	require.NoError(t, guestmem.MapGuest(e, Map, [2]uint64{HoleStart, HoleEnd}, SinkPA, nil))
	g.EPT = e
	g.Phys = &guestmem.GuestPhys{Mem: g.Mem, EPT: e, Hole: [2]uint64{HoleStart, HoleEnd}, Invalidate: func() { g.Flushes++ }}
	g.CR3 = g.Frame()
	return g
}

// Frame returns the next free frame for paging structures.
func (g *Guest) Frame() uint64 {
	pa := g.Next
	g.Next += 0x1000
	return pa
}

// Entry returns the guest-physical address of va's entry at level (1: the
// page table), making the tables above it.
func (g *Guest) Entry(va uint64, level int) uint64 {
	table := g.CR3
	for l := 4; l > level; l-- {
		ea := table + 8*(va>>(12+9*uint(l-1))&511)
		e := g.Mem.Get64(ea)
		if e&vmx.PTEPresent == 0 {
			e = g.Frame() | vmx.PTEPresent | vmx.PTEWritable | vmx.PTEUser
			g.Mem.Put64(ea, e)
		}
		table = e & vmx.PTEAddress
	}
	return table + 8*(va>>(12+9*uint(level-1))&511)
}

// MapPage maps the 4 KiB page at va to pa, present, with flags.
func (g *Guest) MapPage(va, pa, flags uint64) {
	g.Mem.Put64(g.Entry(va, 1), pa|flags|vmx.PTEPresent)
}

// LoadKernel maps the code's pages at VA-KernelOff (or where at says)
// and writes the code there.
func (g *Guest) LoadKernel(c map[uint64]byte, at map[uint64]uint64) {
	for va, b := range c {
		page := va &^ 0xfff
		pa, ok := at[page]
		if !ok {
			pa = page - KernelOff
		}
		g.MapPage(page, pa, vmx.PTEWritable)
		*g.Mem.At(pa + va&0xfff) = b
	}
}
