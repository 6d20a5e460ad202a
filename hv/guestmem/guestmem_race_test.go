package guestmem

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// Exit qualifications of EPT violations on a write-protected (r-x) page.
const (
	// qualWrite is an instruction's write that is not emulated (no
	// guest-linear address): the page opens and its watches are walked
	// at the next exit.
	qualWrite = 0x2 | 0x8 | 0x20
	// qualFlags is the processor's accessed/dirty update during a walk.
	qualFlags = 0x2 | 0x80 | 0x8
)

// stackArena hands out the page freed last first, as the board's page
// arena does, and logs what it hands out and gets back.
type stackArena struct {
	mapTables
	free []uint64
	log  *[]string
}

func (a *stackArena) Alloc() (uint64, error) {
	pa := uint64(0)
	if n := len(a.free); n > 0 {
		pa, a.free = a.free[n-1], a.free[:n-1]
		a.pages[pa] = new([512]uint64)
	} else {
		var err error
		if pa, err = a.mapTables.Alloc(); err != nil {
			return 0, err
		}
	}
	*a.log = append(*a.log, fmt.Sprintf("alloc %#x", pa))
	return pa, nil
}

func (a *stackArena) Free(pa uint64) {
	a.mapTables.Free(pa)
	a.free = append(a.free, pa)
	*a.log = append(*a.log, fmt.Sprintf("free %#x", pa))
}

// newArenaGuest is newTestGuest over a stackArena, whose events and the
// flushes go to log.
func newArenaGuest(t *testing.T, log *[]string) (*testGuest, *stackArena) {
	a := &stackArena{mapTables: mapTables{pages: map[uint64]*[512]uint64{}, next: 0x80_0000_0000}, log: log}
	e, err := ept.New(a, ept.Options{})
	require.NoError(t, err)
	mm := append(append([]hv.E820Entry{}, machineMap...), hv.E820Entry{Addr: 0x100000000, Size: 0x40000000, Type: hv.E820RAM})
	require.NoError(t, MapGuest(e, mm, [2]uint64{holeStart, holeEnd}, sinkPA, nil))
	g := &testGuest{mem: frameMem{}, ept: e, next: 0x200000}
	g.phys = &GuestPhys{Mem: g.mem, EPT: e, Hole: [2]uint64{holeStart, holeEnd}, Invalidate: func() {
		g.flushes++
		*log = append(*log, "flush")
	}}
	g.cr3 = g.frame()
	return g, a
}

// splitTable returns the EPT page table that maps the 2 MiB region at
// gpa (0: the region is one large page).
func splitTable(t *testing.T, e *ept.EPT, a *stackArena, gpa uint64) uint64 {
	pml4, err := a.Table(e.Root())
	require.NoError(t, err)
	pdpt, err := a.Table(pml4[gpa>>39&511] & vmx.PTEAddress)
	require.NoError(t, err)
	pd, err := a.Table(pdpt[gpa>>30&511] & vmx.PTEAddress)
	require.NoError(t, err)
	if v := pd[gpa>>21&511]; v&vmx.PTEPageSize == 0 {
		return v & vmx.PTEAddress
	}
	return 0
}

// TestMergedTableIsNotReusedBeforeTheFlush: one guest write moves two
// page tables at once. In the rewalk that follows, the first watch leaves
// the only protected page of a 2 MiB region, whose EPT table is merged
// away, and the second reaches a page in a region that was one large
// page, which is split. Until the flush that ends the rewalk, the other
// processors may still walk the merged table as the table of its region:
// it must not be handed out before. Before, it went back to the arena at
// once and the split got it (free F, alloc F, flush).
func TestMergedTableIsNotReusedBeforeTheFlush(t *testing.T) {
	var log []string
	g, arena := newArenaGuest(t, &log)
	const vaA, vaB = 0x7f0000000000, 0x7f0000200000 // one page directory
	const dataA, dataB = 0x3000000, 0x3001000
	pdeA, pdeB := g.entry(vaA, 2), g.entry(vaB, 2)
	// A's page table alone in the region at 6 MiB, B's with the upper
	// tables at 2 MiB; the tables they move to: A's at 2 MiB, B's in the
	// region at 8 MiB, which nothing protects yet.
	const ptA, ptA2, ptB2 = 0x600000, 0x211000, 0x800000
	ptB := uint64(0x210000)
	g.mem.put64(pdeA, ptA|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
	g.mem.put64(pdeB, ptB|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
	g.mapPage(vaA, dataA, vmx.PTEWritable|vmx.PTEUser)
	g.mapPage(vaB, dataB, vmx.PTEWritable|vmx.PTEUser)
	g.mem.put64(ptA2+8*(vaA>>12&511), dataA+0x10000|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
	g.mem.put64(ptB2+8*(vaB>>12&511), dataB+0x10000|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)

	gm := NewWatcher(g.phys, g.cr3)
	var heard []swapmem.Translation
	fn := func(tr swapmem.Translation) { heard = append(heard, tr) }
	// Hooked in this order, the page directory's list walks A first.
	cancelB, err := gm.Watch(g.cr3, vaB, fn)
	require.NoError(t, err)
	cancelA, err := gm.Watch(g.cr3, vaA, fn)
	require.NoError(t, err)
	defer cancelA()
	defer cancelB()
	f := splitTable(t, g.ept, arena, ptA)
	require.NotZero(t, f, "A's page table split its region")
	require.Zero(t, splitTable(t, g.ept, arena, ptB2), "the region B moves to is one large page")

	v, _ := vcputest.Scripted(t, []vcputest.Step{
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: pdeA, vmx.ExitQualification: qualWrite}},
		{Reason: vmx.ExitCPUID, Regs: func(*vmx.GuestRegs) {
			g.mem.put64(pdeA, ptA2|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
			g.mem.put64(pdeB, ptB2|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
			log = nil
		}},
	})
	require.NoError(t, gm.Install(v))
	require.NoError(t, v.Run())

	g2 := splitTable(t, g.ept, arena, ptB2)
	require.NotZero(t, g2, "B's new page table split its region")
	assert.Zero(t, splitTable(t, g.ept, arena, ptA), "A's old region merged")
	assert.NotEqual(t, f, g2, "the merged table was handed out again before the flush")
	// The directory closed (a flush), B's new table split its region,
	// the flush that ends the rewalk, and only then the merged table.
	assert.Equal(t, []string{"flush", fmt.Sprintf("alloc %#x", g2), "flush", fmt.Sprintf("free %#x", f)}, log,
		"the merged table goes back only after the flush")
	assert.Equal(t, uint64(1), g.phys.Freed)
	assert.Zero(t, g.ept.Retired())
	require.Len(t, heard, 2)
	assert.Equal(t, uint64(dataA+0x10000), heard[0].PA)
	assert.Equal(t, uint64(dataB+0x10000), heard[1].PA)
}

// TestMergedTablesWaitWhileAProcessorMissedTheFlush: when an invalidation
// did not reach every processor (Invalidated false: a vCPU stayed in the
// guest past the shootdown's limit), merged tables are not given back at
// all; the next split gets a new page. Once an invalidation reaches every
// processor, they go back.
func TestMergedTablesWaitWhileAProcessorMissedTheFlush(t *testing.T) {
	var log []string
	g, arena := newArenaGuest(t, &log)
	reached := false
	g.phys.Invalidated = func() bool { return reached }
	gm := NewWatcher(g.phys, g.cr3)
	const va = 0x7f0000000000
	g.next = 0x600000
	g.mapPage(va, 0x3000000, vmx.PTEWritable|vmx.PTEUser)
	cancel, err := gm.Watch(g.cr3, va, func(swapmem.Translation) {})
	require.NoError(t, err)
	f := splitTable(t, g.ept, arena, 0x600000)
	require.NotZero(t, f)
	cancel()
	gm.Sync() // the entry after the exit that ended the watch
	assert.Zero(t, splitTable(t, g.ept, arena, 0x600000), "merged")
	assert.Equal(t, 2, g.ept.Retired(), "the 6 MiB region's table and the upper tables' one, retired")
	assert.Zero(t, g.phys.Freed)
	assert.NotContains(t, log, fmt.Sprintf("free %#x", f))

	// Another watch splits the region again: a new page.
	cancel, err = gm.Watch(g.cr3, va, func(swapmem.Translation) {})
	require.NoError(t, err)
	assert.NotEqual(t, f, splitTable(t, g.ept, arena, 0x600000))
	reached = true
	cancel()
	gm.Sync()
	assert.Zero(t, g.ept.Retired())
	assert.Equal(t, uint64(4), g.phys.Freed)
	assert.Contains(t, log, fmt.Sprintf("free %#x", f))
}

// raceMem is guest memory in which another processor's store lands right
// after tamahv's load of one entry: when the entry at at is read, the
// read sees its old value and then val is stored there.
type raceMem struct {
	frameMem
	at, val uint64
	armed   bool
}

func (m *raceMem) ReadPhys(pa uint64, p []byte) error {
	err := m.frameMem.ReadPhys(pa, p)
	if m.armed && pa <= m.at && m.at < pa+uint64(len(p)) {
		m.armed = false
		m.put64(m.at, m.val)
	}
	return err
}

// TestReadHearsAStoreBetweenTheWalkAndTheProtection: a NoFault read
// waits for a page of a 2 MiB range that has no page table yet. One
// thread of the process populates the page directory entry (a write to a
// watched page: the watch is walked again and protects the new page
// table); another thread, on another processor, stores the page's entry
// in the new table right after tamahv's walk read it, before the
// protection holds: no exit tells of it. The watch walks again once the
// protection holds, hears of the page, and the read completes. Before,
// the read waited for its deadline although the page was present.
func TestReadHearsAStoreBetweenTheWalkAndTheProtection(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	mem := &raceMem{frameMem: g.mem}
	g.phys.Mem = mem
	const va, data = 0x7f0000400000, 0x3000000
	pde := g.entry(va, 2)
	pt := g.frame()
	want := bytes.Repeat([]byte{0x5a}, 64)
	require.NoError(t, g.mem.WritePhys(data, want))

	gm := NewWatcher(g.phys, g.cr3)
	now := time.Duration(0)
	eng := swapmem.New(gm, swapmem.Config{Now: func() time.Duration { return now }})
	var done []swapmem.Read
	_, err := eng.ReadData(swapmem.Request{CR3: g.cr3, VA: va, Len: len(want), Options: swapmem.NoFault,
		Done: func(r swapmem.Read) {
			if r.Err == nil {
				r.Data = bytes.Clone(r.Data)
			}
			done = append(done, r)
		}})
	require.NoError(t, err)
	require.Empty(t, done)

	v, _ := vcputest.Scripted(t, []vcputest.Step{
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: pde, vmx.ExitQualification: qualWrite}},
		{Reason: vmx.ExitCPUID, Regs: func(*vmx.GuestRegs) {
			g.mem.put64(pde, pt|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
			mem.at, mem.val, mem.armed = pt+8*(va>>12&511), data|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser, true
		}},
	})
	require.NoError(t, gm.Install(v))
	require.NoError(t, v.Run())
	require.False(t, mem.armed, "the store landed")

	// Past the read's deadline: it ended long before.
	now += time.Hour
	eng.ReinjectFailedPF()
	require.Len(t, done, 1)
	require.NoError(t, done[0].Err)
	assert.Equal(t, want, done[0].Data)
	assert.Equal(t, uint64(data), done[0].PA)
	assert.Zero(t, gm.Watches(), "the read ended, and its watch")
}

// TestNewWatchFollowsATableLinkedBeforeItsProtection: another processor
// links a page table into the page directory right after a new watch's
// walk read the empty entry, before the directory's protection holds.
// The watch walks again once it holds: it starts from the page now
// mapped, and protects the new page table, so that the page's later
// swap-out (a store to that table) is heard of. Before, the new table was
// not protected and the store was never seen.
func TestNewWatchFollowsATableLinkedBeforeItsProtection(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	mem := &raceMem{frameMem: g.mem}
	g.phys.Mem = mem
	const va, data = 0x7f0000400000, 0x3000000
	pde := g.entry(va, 2)
	pt := g.frame()
	pte := pt + 8*(va>>12&511)
	g.mem.put64(pte, data|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
	mem.at, mem.val, mem.armed = pde, pt|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser, true

	gm := NewWatcher(g.phys, g.cr3)
	var heard []swapmem.Translation
	cancel, err := gm.Watch(g.cr3, va, func(tr swapmem.Translation) { heard = append(heard, tr) })
	require.NoError(t, err)
	defer cancel()
	require.False(t, mem.armed, "the store landed")
	assert.Equal(t, 4, gm.Watches(), "the new page table is watched")
	_, perm, _, _, _ := g.ept.Lookup(pt)
	assert.Equal(t, ept.Read|ept.Exec, perm)
	tr, err := gm.Translate(g.cr3, va)
	require.NoError(t, err)

	// The kernel swaps the page out.
	v, _ := vcputest.Scripted(t, []vcputest.Step{
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: pte, vmx.ExitQualification: qualWrite}},
		{Reason: vmx.ExitCPUID, Regs: func(*vmx.GuestRegs) { g.mem.put64(pte, 0x1234<<12) }},
	})
	require.NoError(t, gm.Install(v))
	require.NoError(t, v.Run())
	assert.True(t, tr.Present)
	require.Len(t, heard, 1, "the swap-out is heard of")
	assert.False(t, heard[0].Present)
	assert.True(t, heard[0].Backed)
	assert.Zero(t, gm.Stale)
}

// TestStoreWhileOpenForFlagUpdatesIsHeard: a watched page table is opened
// for the processor's accessed-flag update; before the next exit closes
// it, another processor stores an entry a watch reads (the page's
// swap-out), which no exit tells of. Closing the page compares the
// watches' entries and walks the one that changed. A flag update alone
// walks nothing. Before, a page opened for flag updates was closed
// without a look and the store was never heard of.
func TestStoreWhileOpenForFlagUpdatesIsHeard(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	const va, data = 0x7f0000400000, 0x3000000
	g.mapPage(va, data, vmx.PTEWritable|vmx.PTEUser)
	g.mapPage(va+0x1000, data+0x1000, vmx.PTEWritable|vmx.PTEUser)
	pte := g.entry(va, 1)
	gm := NewWatcher(g.phys, g.cr3)
	var heard []swapmem.Translation
	cancel, err := gm.Watch(g.cr3, va, func(tr swapmem.Translation) { heard = append(heard, tr) })
	require.NoError(t, err)
	defer cancel()
	var other []swapmem.Translation
	cancel2, err := gm.Watch(g.cr3, va+0x1000, func(tr swapmem.Translation) { other = append(other, tr) })
	require.NoError(t, err)
	defer cancel2()

	v, _ := vcputest.Scripted(t, []vcputest.Step{
		// Accessed and dirty flags only: nothing to walk.
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: pte, vmx.ExitQualification: qualFlags}},
		{Reason: vmx.ExitCPUID, Regs: func(*vmx.GuestRegs) { g.mem.put64(pte, g.mem.get64(pte)|vmx.PTEAccessed|vmx.PTEDirty) },
			Check: func(t *testing.T, _ *hv.VCPU) {
				assert.Empty(t, heard)
				assert.Zero(t, gm.Writes)
			}},
		// Flags, and another processor's store to the open page.
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: pte + 8, vmx.ExitQualification: qualFlags}},
		{Reason: vmx.ExitCPUID, Regs: func(*vmx.GuestRegs) { g.mem.put64(pte, 0x1234<<12) }},
	})
	require.NoError(t, gm.Install(v))
	require.NoError(t, v.Run())
	assert.Equal(t, uint64(2), gm.ADWrites)
	require.Len(t, heard, 1, "the store is heard of")
	assert.False(t, heard[0].Present)
	assert.True(t, heard[0].Backed)
	assert.Empty(t, other, "the watch whose entry did not change is not told")
	_, perm, _, _, _ := g.ept.Lookup(pte &^ 0xfff)
	assert.Equal(t, ept.Read|ept.Exec, perm, "closed again")
}

// TestEndedWatchesAreOneFlush: watches that end give their protections
// back without a flush each; the next Sync (before the VM entry) makes all
// of them hold in one, and only then do the tables merged away go back.
func TestEndedWatchesAreOneFlush(t *testing.T) {
	var log []string
	g, _ := newArenaGuest(t, &log)
	gm := NewWatcher(g.phys, g.cr3)
	var cancels []func()
	for i := range uint64(8) {
		va := 0x7f0000000000 + i<<21 // a page table each, in its own region
		g.next = 0x600000 + i<<21
		g.mapPage(va, 0x3000000, vmx.PTEWritable|vmx.PTEUser)
		cancel, err := gm.Watch(g.cr3, va, func(swapmem.Translation) {})
		require.NoError(t, err)
		cancels = append(cancels, cancel)
	}
	before, retired := g.flushes, g.ept.Retired()
	for _, c := range cancels {
		c()
	}
	assert.Equal(t, before, g.flushes, "no flush while the watches end")
	assert.Greater(t, g.ept.Retired(), retired, "their regions merged, the tables wait")
	gm.Sync()
	assert.Equal(t, before+1, g.flushes, "one flush for all")
	assert.Zero(t, g.ept.Retired(), "the merged tables went back after it")
	gm.Sync()
	assert.Equal(t, before+1, g.flushes, "nothing left to flush")
}

// TestOpenPageWaitsForItsWriter: a page let open for vCPU A's write stays
// open through vCPU B's exits until A entered the guest again (and with
// it made its write); B's exits after that close it. Closed at B's first
// exit, A's write would fault again at every entry while B exits often
// enough, and never be made.
func TestOpenPageWaitsForItsWriter(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	const va = 0x7f0000400000
	g.mapPage(va, 0x3000000, vmx.PTEWritable|vmx.PTEUser)
	pte := g.entry(va, 1)
	gm := NewWatcher(g.phys, g.cr3)
	cancel, err := gm.Watch(g.cr3, va, func(swapmem.Translation) {})
	require.NoError(t, err)
	defer cancel()
	a, ma := vcputest.Scripted(t, nil)
	b, _ := vcputest.Scripted(t, nil)
	require.NoError(t, gm.Install(a))
	require.NoError(t, gm.Install(b))
	writable := func() bool {
		_, perm, _, _, _ := g.ept.Lookup(pte &^ 0xfff)
		return perm&ept.Write != 0
	}
	b.VMCS.Write(vmx.ExitQualification, 0)
	exit := func(v *hv.VCPU, r vmx.ExitReason) {
		v.VMCS.Write(vmx.ExitReasonField, uint64(r))
		v.VMCS.Write(vmx.IDTVectoringInfo, 0)
		v.VMCS.Write(vmx.ExitInstructionLen, 3)
		_, err := v.HandleExit()
		require.NoError(t, err)
	}
	ma.Fields[vmx.GuestPhysAddr] = pte
	ma.Fields[vmx.ExitQualification] = qualFlags
	exit(a, vmx.ExitEPTViolation)
	require.True(t, writable(), "opened for A's write")
	for range 3 {
		exit(b, vmx.ExitPreemptionTimer)
		assert.True(t, writable(), "B's exits leave it open: A has not entered since")
	}
	require.NoError(t, a.PrepareEntry())
	exit(b, vmx.ExitPreemptionTimer)
	assert.False(t, writable(), "closed at B's exit once A entered")
	assert.Equal(t, uint64(1), gm.ADWrites)

	// Opened again: A's entry is cut short (a preemption-timer exit at
	// the writing instruction): still open; A's next exit after the
	// write closes it.
	ma.Fields[vmx.GuestRIP] = 0x1000
	exit(a, vmx.ExitEPTViolation)
	require.True(t, writable())
	exit(a, vmx.ExitPreemptionTimer)
	assert.True(t, writable(), "A's write is still to be made")
	ma.Fields[vmx.GuestRIP] = 0x1003
	exit(a, vmx.ExitPreemptionTimer)
	assert.False(t, writable(), "closed at A's own next exit once its write was made")
}

// TestOpenPageWaitsForTheProcessorsEntry: for a vCPU whose processor
// counts its own entries (an application processor's exit loop,
// EntryCount), a prepared entry is not yet one made: the page opened for
// its write stays open through another vCPU's exits until its processor
// entered the guest.
func TestOpenPageWaitsForTheProcessorsEntry(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	const va = 0x7f0000400000
	g.mapPage(va, 0x3000000, vmx.PTEWritable|vmx.PTEUser)
	pte := g.entry(va, 1)
	gm := NewWatcher(g.phys, g.cr3)
	cancel, err := gm.Watch(g.cr3, va, func(swapmem.Translation) {})
	require.NoError(t, err)
	defer cancel()
	ap, mp := vcputest.Scripted(t, nil)
	bsp, _ := vcputest.Scripted(t, nil)
	var made uint64
	ap.EntryCount = func() uint64 { return made }
	require.NoError(t, gm.Install(ap))
	require.NoError(t, gm.Install(bsp))
	writable := func() bool {
		_, perm, _, _, _ := g.ept.Lookup(pte &^ 0xfff)
		return perm&ept.Write != 0
	}
	bsp.VMCS.Write(vmx.ExitQualification, 0)
	exit := func(v *hv.VCPU, r vmx.ExitReason) {
		v.VMCS.Write(vmx.ExitReasonField, uint64(r))
		v.VMCS.Write(vmx.IDTVectoringInfo, 0)
		v.VMCS.Write(vmx.ExitInstructionLen, 3)
		_, err := v.HandleExit()
		require.NoError(t, err)
	}
	mp.Fields[vmx.GuestPhysAddr] = pte
	mp.Fields[vmx.ExitQualification] = qualFlags
	exit(ap, vmx.ExitEPTViolation)
	require.True(t, writable())
	require.NoError(t, ap.PrepareEntry()) // the entry is posted to the AP
	exit(bsp, vmx.ExitPreemptionTimer)
	assert.True(t, writable(), "the AP's processor has not entered yet")
	made++ // it entered, and made its write
	exit(bsp, vmx.ExitPreemptionTimer)
	assert.False(t, writable(), "closed once the AP's processor entered")
}
