package guestmem

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

// machineMem is a simulated guest's memory as host memory, read-only.
type machineMem struct{ *swapmemtest.Machine }

func (machineMem) WritePhys(uint64, []byte) error        { return errors.New("read-only") }
func (machineMem) CopyPhys(uint64, uint64, uint64) error { return errors.New("read-only") }

// frameMem is host-physical memory in 4 KiB frames made on first touch:
// the whole machine, tamahv's region included.
type frameMem map[uint64]*[4096]byte

func (m frameMem) at(pa uint64) *byte {
	f := m[pa&^0xfff]
	if f == nil {
		f = new([4096]byte)
		m[pa&^0xfff] = f
	}
	return &f[pa&0xfff]
}

// frame returns the bytes of pa's frame from pa on.
func (m frameMem) frame(pa uint64) []byte {
	m.at(pa)
	return m[pa&^0xfff][pa&0xfff:]
}

func (m frameMem) ReadPhys(pa uint64, p []byte) error {
	for len(p) > 0 {
		n := copy(p, m.frame(pa))
		p, pa = p[n:], pa+uint64(n)
	}
	return nil
}

func (m frameMem) WritePhys(pa uint64, p []byte) error {
	for len(p) > 0 {
		n := copy(m.frame(pa), p)
		p, pa = p[n:], pa+uint64(n)
	}
	return nil
}

func (m frameMem) CopyPhys(dst, src, n uint64) error {
	b := make([]byte, n)
	_ = m.ReadPhys(src, b)
	return m.WritePhys(dst, b)
}

func (m frameMem) get64(pa uint64) uint64 {
	var b [8]byte
	_ = m.ReadPhys(pa, b[:])
	return binary.LittleEndian.Uint64(b[:])
}

func (m frameMem) put64(pa, v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_ = m.WritePhys(pa, b[:])
}

// The test machine: machineMap's RAM plus 1 GiB above 4 GiB, tamahv at
// 256-384 MiB with its sink in the middle, as runGuest wires it.
const (
	holeStart = 0x10000000
	holeEnd   = 0x18000000
	sinkPA    = 0x12000000
	kernelOff = 0xffffffff80000000 // kernel VA - PA
)

// testGuest is a guest with its own 4-level page tables in host memory,
// an EPT built by MapGuest and GuestPhys over both.
type testGuest struct {
	mem     frameMem
	ept     *ept.EPT
	tables  *mapTables
	phys    *GuestPhys
	cr3     uint64
	next    uint64 // the next frame for paging structures
	flushes int
}

func newTestGuest(t testing.TB, o ept.Options) *testGuest {
	g := &testGuest{mem: frameMem{}, tables: &mapTables{pages: map[uint64]*[512]uint64{}, next: 0x80_0000_0000}, next: 0x200000}
	e, err := ept.New(g.tables, o)
	require.NoError(t, err)
	mm := append(append([]hv.E820Entry{}, machineMap...), hv.E820Entry{Addr: 0x100000000, Size: 0x40000000, Type: hv.E820RAM})
	require.NoError(t, MapGuest(e, mm, [2]uint64{holeStart, holeEnd}, sinkPA, nil))
	g.ept = e
	g.phys = &GuestPhys{Mem: g.mem, EPT: e, Hole: [2]uint64{holeStart, holeEnd}, Invalidate: func() { g.flushes++ }}
	g.cr3 = g.frame()
	return g
}

func (g *testGuest) frame() uint64 {
	pa := g.next
	g.next += 0x1000
	return pa
}

// entry returns the guest-physical address of va's entry at level,
// making the tables above it.
func (g *testGuest) entry(va uint64, level int) uint64 {
	table := g.cr3
	for l := 4; l > level; l-- {
		ea := table + 8*(va>>(12+9*uint(l-1))&511)
		e := g.mem.get64(ea)
		if e&vmx.PTEPresent == 0 {
			e = g.frame() | vmx.PTEPresent | vmx.PTEWritable | vmx.PTEUser
			g.mem.put64(ea, e)
		}
		table = e & vmx.PTEAddress
	}
	return table + 8*(va>>(12+9*uint(level-1))&511)
}

// mapPage maps the 4 KiB page at va to pa.
func (g *testGuest) mapPage(va, pa, flags uint64) {
	g.mem.put64(g.entry(va, 1), pa|flags|vmx.PTEPresent)
}

// loadKernel maps the code's pages at VA-kernelOff (or where at says)
// and writes the code there.
func (g *testGuest) loadKernel(c map[uint64]byte, at map[uint64]uint64) {
	for va, b := range c {
		page := va &^ 0xfff
		pa, ok := at[page]
		if !ok {
			pa = page - kernelOff
		}
		g.mapPage(page, pa, vmx.PTEWritable)
		*g.mem.at(pa + va&0xfff) = b
	}
}

func TestGuestPhysRefusesAllButGuestRAM(t *testing.T) {
	g := newTestGuest(t, ept.Options{Pages1G: true})
	p := g.phys
	for _, ok := range []struct{ gpa, n uint64 }{
		{0, 8}, {0x9e000, 0x1000}, {0x100000, 0x200000}, {0x0ffff000, 0x1000}, {0x18000000, 8},
		{0x3ffef000, 0x1000}, {0x100000000, 0x40000000}, {0x5000, 0},
	} {
		assert.NoError(t, p.Check(ok.gpa, ok.n), "%#x+%#x", ok.gpa, ok.n)
	}
	for _, bad := range []struct {
		gpa, n uint64
		err    error
	}{
		{holeStart, 8, ErrHole},
		{holeStart + 0x7000, 8, ErrHole},
		{sinkPA, 0x1000, ErrHole},         // the sink's host page
		{0x0ffff000, 0x2000, ErrHole},     // straddles into tamahv
		{holeEnd - 8, 16, ErrHole},        // straddles out of it
		{0x9f000, 8, ErrNotRAM},           // RAM ends in the page: uncached
		{0xb8000, 8, ErrNotRAM},           // VGA
		{0xfee00000, 4, ErrNotRAM},        // local APIC
		{0x3fff0000, 8, ErrNotRAM},        // ACPI tables
		{0x140000000, 8, ErrNotRAM},       // beyond RAM
		{1 << 48, 8, ErrNotRAM},           // beyond the guest-physical space
		{^uint64(0) - 3, 8, ErrNotRAM},    // wraps
		{0x3ffef000, 0x2000, ErrNotRAM},   // runs past RAM's end
		{0x0fffe000, 0x10003000, ErrHole}, // across all of tamahv
	} {
		err := p.Check(bad.gpa, bad.n)
		assert.ErrorIs(t, err, bad.err, "%#x+%#x", bad.gpa, bad.n)
		if bad.n <= 0x2000 {
			assert.ErrorIs(t, p.ReadPhys(bad.gpa, make([]byte, bad.n)), bad.err, "%#x", bad.gpa)
			assert.ErrorIs(t, p.WritePhys(bad.gpa, make([]byte, bad.n)), bad.err, "%#x", bad.gpa)
		}
	}
	// A page the EPT shows elsewhere is not the guest's RAM.
	require.NoError(t, g.ept.Retarget(0x5000, 0x6000, ept.RWX))
	assert.ErrorIs(t, p.Check(0x5123, 1), ErrNotRAM)
	assert.ErrorIs(t, p.CopyPhys(0x7000, 0x5000, 0x10), ErrNotRAM)
	assert.ErrorIs(t, p.CopyPhys(0x5000, 0x7000, 0x10), ErrNotRAM)
	assert.NoError(t, p.CopyPhys(0x8000, 0x7000, 0x10))
}

// TestWalkerRefusesTamahvAndMMIOAsPageTables: a guest kernel points a
// paging-structure entry at tamahv's region, at the sink's host address,
// at MMIO or beyond RAM, or sets CR3 there; the walk fails and no
// paging structure of tamahv's is read, protected or mapped. Before,
// tamahv's own qwords were read as entries (a qword 0x300005 made the
// translation 0x300000 and the read returned that page's bytes).
func TestWalkerRefusesTamahvAndMMIOAsPageTables(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	gm := NewWatcher(g.phys, g.cr3)
	const va = 0x7f0000200000
	// tamahv's qword at 0x10007000 looks like a PTE for 0x300000; so
	// does the local APIC's first qword.
	g.mem.put64(0x10007000, 0x300005)
	g.mem.put64(sinkPA+0x7000, 0x300005)
	g.mem.put64(0xfee00000, 0x300005)
	g.mem.put64(0x140000000, 0x300005)
	require.NoError(t, g.mem.WritePhys(0x300000, bytes.Repeat([]byte{0xab}, 4096)))
	pde := g.entry(va, 2)
	for _, c := range []struct {
		table uint64
		err   error
	}{{0x10007000, ErrHole}, {sinkPA + 0x7000, ErrHole}, {0xfee00000, ErrNotRAM}, {0x140000000, ErrNotRAM}} {
		g.mem.put64(pde, c.table|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
		tr, err := gm.Translate(g.cr3, va)
		assert.ErrorIs(t, err, c.err, "table at %#x", c.table)
		assert.False(t, tr.Present)
		cancel, err := gm.Watch(g.cr3, va, func(swapmem.Translation) {})
		assert.ErrorIs(t, err, c.err)
		assert.Nil(t, cancel)
		assert.Zero(t, gm.Watches())
		assert.Zero(t, g.phys.Owners(), "nothing protected")
		_, perm, _, _, _ := g.ept.Lookup(holeStart + 0x7000)
		assert.Equal(t, ept.Read|ept.Write, perm, "the sink stays read/write, not executable")
	}
	// CR3 in tamahv's region.
	_, err := gm.Translate(holeStart+0x1000, va)
	assert.ErrorIs(t, err, ErrHole)
	// The same entry naming guest RAM walks.
	g.mem.put64(pde, 0x400000|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
	g.mem.put64(0x400000, 0x300005)
	tr, err := gm.Translate(g.cr3, va)
	require.NoError(t, err)
	assert.Equal(t, swapmem.Translation{PA: 0x300000, PageSize: 4096, Present: true, User: true}, tr)
	var b [4]byte
	require.NoError(t, gm.ReadPhys(tr.PA, b[:]))
	assert.Equal(t, [4]byte{0xab, 0xab, 0xab, 0xab}, b)
}

// TestWatchThatCannotFollowFails: the guest rewrites a watched entry so
// that the walk fails (a reserved bit; a table in tamahv's region). The
// watch fails for good and says so: its function hears the translation is
// gone, OnWatchError gets the reason, and no protection is left behind.
// Before, the error was dropped and the watch lived on with no page
// hooked, deaf to every later write.
func TestWatchThatCannotFollowFails(t *testing.T) {
	for _, c := range []struct {
		pde uint64
		err error
	}{{0x400000 | 1<<50, ErrReservedBit}, {holeStart + 0x3000, ErrHole}} {
		g := newTestGuest(t, ept.Options{})
		gm := NewWatcher(g.phys, g.cr3)
		const va = 0x7f0000200000
		g.mapPage(va, 0x300000, vmx.PTEWritable|vmx.PTEUser)
		var heard []swapmem.Translation
		cancel, err := gm.Watch(g.cr3, va, func(tr swapmem.Translation) { heard = append(heard, tr) })
		require.NoError(t, err)
		var failed []error
		gm.OnWatchError = func(cr3, wva uint64, err error) {
			assert.Equal(t, g.cr3, cr3)
			assert.Equal(t, uint64(va), wva)
			failed = append(failed, err)
		}
		pde := g.entry(va, 2)
		write := uint64(0x2 | 0x80 | 0x100 | 0x8 | 0x20)
		v, _ := vcputest.Scripted(t, []vcputest.Step{
			{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: pde, vmx.ExitQualification: write},
				Regs: func(*vmx.GuestRegs) {}},
			{Reason: vmx.ExitCPUID, Regs: func(*vmx.GuestRegs) { g.mem.put64(pde, c.pde|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser) }},
		})
		require.NoError(t, gm.Install(v))
		require.NoError(t, v.Run())
		require.Len(t, failed, 1)
		assert.ErrorIs(t, failed[0], c.err)
		assert.Equal(t, uint64(1), gm.Failed)
		assert.Equal(t, []swapmem.Translation{{}}, heard, "the owner heard the page is gone")
		assert.Zero(t, gm.Watches(), "nothing left protected")
		assert.Zero(t, g.phys.Owners())
		for _, pg := range []uint64{g.cr3, pde &^ 0xfff} {
			_, perm, _, _, _ := g.ept.Lookup(pg)
			assert.Equal(t, ept.RWX, perm, "%#x", pg)
		}
		cancel()
		cancel()
	}
}

// TestSplitTablesAreFreed: watches on page tables in 400 distinct 2 MiB
// regions, one after the other, with room for 4 split tables. Before, each
// region's split table stayed after its watch ended and the arena filled
// after a few regions (the image's 1024-page arena after ~1020 regions,
// 2 GiB of guest RAM).
func TestSplitTablesAreFreed(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	gm := NewWatcher(g.phys, g.cr3)
	// The upper tables live in the first region; watch it once for good.
	g.mapPage(0x7f0000000000, 0x300000, vmx.PTEWritable|vmx.PTEUser)
	keep, err := gm.Watch(g.cr3, 0x7f0000000000, func(swapmem.Translation) {})
	require.NoError(t, err)
	defer keep()
	g.tables.limit = len(g.tables.pages) + 4
	var regions []uint64
	for r := uint64(0x400000); r < 0x40000000 && len(regions) < 400; r += ept.Size2M {
		if r+ept.Size2M <= holeStart || r >= holeEnd && r+ept.Size2M <= 0x3fe00000 {
			regions = append(regions, r)
		}
	}
	require.Len(t, regions, 400)
	for i, r := range regions {
		va := 0x7f0000000000 + uint64(i+1)<<21 // a new PT each
		g.next = r + 0x1000
		g.mapPage(va, 0x300000, vmx.PTEWritable|vmx.PTEUser)
		cancel, err := gm.Watch(g.cr3, va, func(swapmem.Translation) {})
		require.NoError(t, err, "region %d at %#x", i, r)
		cancel()
		gm.Sync()
	}
	assert.Equal(t, uint64(400), g.phys.Freed)
	assert.Equal(t, 4, gm.Watches())
}
