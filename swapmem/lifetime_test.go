package swapmem_test

import (
	"bytes"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
)

const textVA = 0x0000_0000_0040_1000 // a non-PIE binary's text

// A process asks for a write fault on its own read-only text, takes the
// fault without serving it (it catches SIGSEGV) and exits. The kernel
// gives its top-level table to the next process, which maps the same
// binary's text at the same address: the dead process's read must end
// with its address space, and nothing of it may be injected into the
// newcomer.
func TestReadEndsWithItsAddressSpace(t *testing.T) {
	m := swapmemtest.NewMachine()
	m.TopEntries = true
	clk := &clock{}
	e := swapmem.New(m, swapmem.Config{Now: clk.now, Timeout: time.Second})
	a := m.NewSpace()
	_, err := a.Map(textVA, 4096, swapmemtest.UserRX)
	require.NoError(t, err)
	require.NoError(t, a.Write(textVA, []byte("text")))
	// A read of the system space translated in a (CR3 0 falls back to
	// it) also belongs to a's address space.
	sys := &sysGuest{Machine: m, cr3: a.CR3}
	es := swapmem.New(sys, swapmem.Config{Now: clk.now, Timeout: time.Second})
	require.NoError(t, a.MapSwapped(userBase, swapmemtest.UserRW, []byte("data")))

	var rec, sysRec recorder
	tx, err := e.ReadData(swapmem.Request{CR3: a.CR3, VA: textVA, Len: 4, Options: swapmem.UserFault | swapmem.WriteFault, Done: rec.done})
	require.NoError(t, err)
	require.NotNil(t, tx)
	stx, err := es.ReadData(swapmem.Request{VA: userBase, Len: 4, Options: swapmem.NoFault, Done: sysRec.done})
	require.NoError(t, err)
	require.NotNil(t, stx)

	cpu := m.NewVCPU(0)
	cpu.Switch(a.CR3, 3)
	require.NoError(t, e.InjectPendingPF(cpu))
	q := m.Drop() // the process takes the fault and does not serve it
	require.Len(t, q, 1)
	assert.Equal(t, uint32(swapmem.PFErrPresent|swapmem.PFErrWrite|swapmem.PFErrUser), q[0].Code)
	e.PFDelivered(textVA)

	require.NoError(t, a.Exit())
	require.Len(t, rec.reads, 1, "the read ends with its address space")
	assert.ErrorIs(t, rec.reads[0].Err, swapmem.ErrSpaceGone)
	require.Len(t, sysRec.reads, 1, "so does a read translated in it")
	assert.ErrorIs(t, sysRec.reads[0].Err, swapmem.ErrSpaceGone)
	assert.EqualValues(t, 1, e.Stats().SpaceGone)
	assert.Zero(t, e.Stats().Live)

	// The next process on the same top-level table, with the same text.
	b, err := a.Reuse()
	require.NoError(t, err)
	require.Equal(t, a.CR3, b.CR3)
	_, err = b.Map(textVA, 4096, swapmemtest.UserRX)
	require.NoError(t, err)
	for i := 0; i < 20; i++ {
		clk.advance(500 * time.Millisecond)
		e.ReinjectFailedPF()
		cpu.Switch(b.CR3, 3)
		require.NoError(t, e.InjectPendingPF(cpu))
		require.Empty(t, m.Drop(), "a #PF of the dead process's read injected into the next one")
	}
	assert.Len(t, rec.reads, 1)
	assert.Zero(t, m.Watches())
}

// sysGuest is a Machine whose system address space (CR3 0) is cr3.
type sysGuest struct {
	*swapmemtest.Machine
	cr3 uint64
}

func (g *sysGuest) SystemCR3() uint64 { return g.cr3 }

// A live process's page table entries come and go (the kernel clears an
// entry while it changes it); only its top-level entry going away ends
// its reads.
func TestReadSurvivesItsPagesComingAndGoing(t *testing.T) {
	w := newWorld(t, 2)
	w.m.TopEntries = true
	w.swapOut(w.proc, userBase, 2)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 8192, Options: swapmem.NoFault, Done: rec.done})
	require.NoError(t, err)
	require.NoError(t, w.proc.Unmap(userBase))
	require.NoError(t, w.proc.MapSwapped(userBase, swapmemtest.UserRW, patternRange(1, userBase, 4096)))
	require.NoError(t, w.proc.Touch(userBase, false))
	require.NoError(t, w.proc.Touch(userBase+4096, false))
	require.Len(t, rec.reads, 1)
	require.NoError(t, rec.reads[0].Err)
	assert.Equal(t, patternRange(1, userBase, 8192), rec.data[0])
}

// A read keeps no buffer of its whole range: a 16 MiB read of pages the
// guest never brings in holds no bytes, whether it streams them or not.
func TestPendingReadsHoldOnlyWhatArrived(t *testing.T) {
	m := swapmemtest.NewMachine()
	e := swapmem.New(m, swapmem.Config{})
	t.Cleanup(func() { _ = e.Close() })
	const reads = 8
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := 0; i < reads; i++ {
		p := m.NewSpace()
		// Mapped, never touched: a NoFault read waits for every page.
		r := swapmem.Request{CR3: p.CR3, VA: userBase, Len: swapmem.MaxLen, Options: swapmem.NoFault}
		if i%2 == 0 {
			r.Stream = func([]byte) {}
		}
		tx, err := e.ReadData(r)
		require.NoError(t, err)
		require.NotNil(t, tx)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	assert.Equal(t, reads, e.Stats().Live)
	assert.Zero(t, e.Stats().Held)
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	// What is left is the watches of the 32,768 pages waited for.
	assert.Less(t, grown, int64(reads*swapmem.MaxLen/4), "8 pending reads of 16 MiB hold %d bytes of heap", grown)
}

// A streaming read passes its bytes on in address order, each once; it
// keeps only the pages read ahead of a missing one.
func TestStreamPassesBytesInOrder(t *testing.T) {
	w := newWorld(t, 4)
	w.swapOut(w.proc, userBase, 1)
	w.swapOut(w.proc, userBase+2*4096, 1)
	var got bytes.Buffer
	var rec recorder
	const off = 100
	n := 4*4096 - off - 7
	tx, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + off, Len: n, Options: swapmem.NoFault,
		Stream: func(p []byte) { got.Write(p) }, Done: rec.done})
	require.NoError(t, err)
	require.NotNil(t, tx)
	assert.Zero(t, got.Len(), "the first page is missing: nothing passed on")
	assert.Equal(t, 4096+4096-7, w.e.Stats().Held, "pages 1 and 3 are kept")

	require.NoError(t, w.proc.Touch(userBase+2*4096, false))
	assert.Zero(t, got.Len())
	assert.Equal(t, 4096+4096+4096-7, w.e.Stats().Held)

	require.NoError(t, w.proc.Touch(userBase, false))
	require.Len(t, rec.reads, 1)
	require.NoError(t, rec.reads[0].Err)
	assert.Nil(t, rec.data[0], "no Data for a streaming read")
	assert.Equal(t, patternRange(1, userBase+off, uint64(n)), got.Bytes())
	assert.Zero(t, w.e.Stats().Held)
}

// A process whose #PFs are never served cannot keep the guest-wide #PF
// slot: once its faults have held it for Config.Timeout, another address
// space with a page waiting goes first. Alone, it is not kept waiting.
func TestOneAddressSpaceCannotKeepTheFaultSlot(t *testing.T) {
	w := newWorld(t, 2)
	hog, other := w.proc, w.m.NewSpace()
	require.NoError(t, other.MapSwapped(userBase, swapmemtest.UserRW, []byte("mine")))
	w.swapOut(hog, userBase, 2)
	_, err := w.e.ReadData(swapmem.Request{CR3: hog.CR3, VA: userBase, Len: 8192, Options: swapmem.UserFault})
	require.NoError(t, err)

	hc, oc := w.m.NewVCPU(0), w.m.NewVCPU(1)
	hc.Switch(hog.CR3, 3)
	oc.Switch(other.CR3, 3)
	inject := func(c *swapmemtest.VCPU) []swapmemtest.Fault {
		require.NoError(t, w.e.InjectPendingPF(c))
		q := w.m.Drop()
		for _, f := range q {
			w.e.PFDelivered(f.VA) // taken, never served
		}
		return q
	}
	// Alone, the hog's faults follow one another.
	for i := 0; i < 3; i++ {
		require.Len(t, inject(hc), 1, "round %d", i)
		w.clk.advance(time.Second)
		w.e.ReinjectFailedPF()
	}
	// Someone else waits now: the hog gives way.
	var rec recorder
	_, err = w.e.ReadData(swapmem.Request{CR3: other.CR3, VA: userBase, Len: 4, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)
	assert.Empty(t, inject(hc), "the hog takes the slot again while another address space waits")
	q := inject(oc)
	require.Len(t, q, 1)
	assert.Equal(t, other.CR3, q[0].CR3)
	assert.EqualValues(t, 1, w.e.Stats().Yielded)

	// The other space's run is short; then the hog goes on.
	require.NoError(t, other.Touch(userBase, false))
	require.Len(t, rec.reads, 1)
	assert.Len(t, inject(hc), 1)

	// A space that yields does so for Timeout at most, even when the
	// others never come to take the slot.
	for i := 0; i < 2; i++ {
		w.clk.advance(time.Second)
		w.e.ReinjectFailedPF()
		require.Len(t, inject(hc), 1)
	}
	third := w.m.NewSpace()
	require.NoError(t, third.MapSwapped(userBase, swapmemtest.UserRW, []byte("late")))
	_, err = w.e.ReadData(swapmem.Request{CR3: third.CR3, VA: userBase, Len: 4, Options: swapmem.UserFault})
	require.NoError(t, err)
	w.clk.advance(time.Second)
	w.e.ReinjectFailedPF()
	assert.Empty(t, inject(hc))
	w.clk.advance(time.Second)
	assert.Len(t, inject(hc), 1, "the others had Timeout to take the slot")
}

// withdrawGuest records the breakpoint-agent armings the engine takes back.
type withdrawGuest struct {
	*swapmemtest.Machine
	withdrawn []uint64
}

func (g *withdrawGuest) WithdrawBPFault(va uint64) { g.withdrawn = append(g.withdrawn, va) }

// An arming of the breakpoint agent that no read wants any more is taken
// back: it must not raise its fault later, in whatever process then runs.
func TestUnwantedBPFaultIsWithdrawn(t *testing.T) {
	m := swapmemtest.NewMachine()
	g := &withdrawGuest{Machine: m}
	clk := &clock{}
	e := swapmem.New(g, swapmem.Config{Now: clk.now, Timeout: time.Second})
	p := m.NewSpace()
	require.NoError(t, p.MapSwapped(userBase, swapmemtest.UserRW, []byte("data")))
	tx, err := e.ReadData(swapmem.Request{CR3: p.CR3, VA: userBase, Len: 4, Options: swapmem.BPFault})
	require.NoError(t, err)
	cpu := m.NewVCPU(0)
	cpu.Switch(p.CR3, 0)
	require.NoError(t, e.InjectPendingPF(cpu))
	require.Len(t, m.Drop(), 1, "armed")
	require.NoError(t, e.RemoveTransaction(tx))
	assert.Equal(t, []uint64{userBase}, g.withdrawn)

	// An arming whose page comes in by itself, or that times out, goes
	// too; one the agent raised and the guest took stays.
	_, err = e.ReadData(swapmem.Request{CR3: p.CR3, VA: userBase, Len: 4, Options: swapmem.BPFault})
	require.NoError(t, err)
	clk.advance(time.Second)
	e.ReinjectFailedPF() // the orphan of the removed one times out
	require.NoError(t, e.InjectPendingPF(cpu))
	require.Len(t, m.Drop(), 1)
	clk.advance(time.Second)
	e.ReinjectFailedPF()
	assert.Len(t, g.withdrawn, 2, "timed out")
	require.NoError(t, e.InjectPendingPF(cpu))
	require.Len(t, m.Drop(), 1)
	require.NoError(t, p.Touch(userBase, false))
	assert.Len(t, g.withdrawn, 3, "came in by itself")
	assert.EqualValues(t, 3, e.Stats().Withdrawn)
}
