package swapmem_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
)

const (
	userBase   = 0x0000_7f00_0000_0000
	kernelBase = 0xffff_8880_0000_0000
)

// clock is a manual monotonic clock.
type clock struct{ t time.Duration }

func (c *clock) now() time.Duration      { return c.t }
func (c *clock) advance(d time.Duration) { c.t += d }
func pattern(seed, va uint64) byte       { return byte((va*2654435761 + seed*40503) >> 7) }
func patternRange(seed, va, n uint64) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = pattern(seed, va+uint64(i))
	}
	return b
}

// world is a small guest: a kernel space and one process, each with a
// region of 4 KiB pages filled with a known pattern.
type world struct {
	t    *testing.T
	m    *swapmemtest.Machine
	proc *swapmemtest.Space
	cpu  *swapmemtest.VCPU
	clk  *clock
	e    *swapmem.Engine
}

func newWorld(t *testing.T, pages int) *world {
	t.Helper()
	m := swapmemtest.NewMachine()
	w := &world{t: t, m: m, proc: m.NewSpace(), clk: &clock{}}
	w.cpu = m.NewVCPU(0)
	require.NoError(t, w.proc.MapRange(userBase, uint64(pages)*4096, swapmemtest.UserRW))
	require.NoError(t, w.proc.Write(userBase, patternRange(1, userBase, uint64(pages)*4096)))
	require.NoError(t, m.System().MapRange(kernelBase, uint64(pages)*4096, swapmemtest.KernelRW))
	require.NoError(t, m.System().Write(kernelBase, patternRange(1, kernelBase, uint64(pages)*4096)))
	w.e = swapmem.New(m, swapmem.Config{Now: w.clk.now, Timeout: time.Second})
	t.Cleanup(func() { _ = w.e.Close() })
	return w
}

func (w *world) swapOut(s *swapmemtest.Space, va uint64, pages int) {
	for i := 0; i < pages; i++ {
		require.NoError(w.t, s.SwapOut(va+uint64(i)*4096))
	}
}

// recorder collects Done calls, copying Data (valid only during the call).
type recorder struct {
	reads []swapmem.Read
	data  [][]byte
}

func (r *recorder) done(rd swapmem.Read) {
	r.data = append(r.data, append([]byte(nil), rd.Data...))
	rd.Data = nil
	r.reads = append(r.reads, rd)
}

// pump runs the guest: inject on the vCPU, then deliver, n times.
func (w *world) pump(n int) {
	for i := 0; i < n; i++ {
		require.NoError(w.t, w.e.InjectPendingPF(w.cpu))
		w.m.Deliver()
	}
}

func TestPresentRangeCompletesSynchronously(t *testing.T) {
	w := newWorld(t, 4)
	var rec recorder
	va := uint64(userBase + 100)
	n := 3*4096 - 50
	tx, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: va, Len: n, Done: rec.done})
	require.NoError(t, err)
	assert.Nil(t, tx)
	require.Len(t, rec.reads, 1)
	r := rec.reads[0]
	assert.Equal(t, swapmem.Flags(swapmem.EntryXD), r.Flags, "no Async; UserRW is NX")
	assert.Equal(t, patternRange(1, va, uint64(n)), rec.data[0])
	tr, err := w.m.Translate(w.proc.CR3, va)
	require.NoError(t, err)
	assert.Equal(t, tr.PA, r.PA)
	assert.Equal(t, w.proc.CR3, r.CR3)
	assert.Equal(t, va, r.VA)
	assert.NoError(t, r.Err)
	assert.Empty(t, w.m.Queued())
	assert.Zero(t, w.m.Watches())
}

func TestLargePagesAndXD(t *testing.T) {
	m := swapmemtest.NewMachine()
	p := m.NewSpace()
	const base = 0x4000_0000 // 1 GiB aligned
	// 4 KiB page just below a 2 MiB page just below a 1 GiB page.
	_, err := p.Map(base-0x20_0000-0x1000, 4096, swapmemtest.UserRX)
	require.NoError(t, err)
	pa2m, err := p.Map(base-0x20_0000, swapmem.PageSize2M, swapmemtest.UserRX)
	require.NoError(t, err)
	pa1g, err := p.Map(base, swapmem.PageSize1G, swapmemtest.UserRX)
	require.NoError(t, err)
	start := uint64(base - 0x20_0000 - 0x800)
	n := uint64(0x800 + 0x20_0000 + 0x3000)
	want := patternRange(7, start, n)
	require.NoError(t, p.Write(start, want))
	e := swapmem.New(m, swapmem.Config{})
	var rec recorder
	tx, err := e.ReadData(swapmem.Request{CR3: p.CR3, VA: start, Len: int(n), Done: rec.done})
	require.NoError(t, err)
	require.Nil(t, tx)
	require.Len(t, rec.reads, 1)
	assert.Equal(t, want, rec.data[0])
	assert.Equal(t, swapmem.Flags(0), rec.reads[0].Flags, "executable pages: no EntryXD")

	tr, err := m.Translate(p.CR3, base+0x12345)
	require.NoError(t, err)
	assert.Equal(t, pa1g+0x12345, tr.PA)
	assert.EqualValues(t, swapmem.PageSize1G, tr.PageSize)
	tr, err = m.Translate(p.CR3, base-0x20_0000+0x777)
	require.NoError(t, err)
	assert.Equal(t, pa2m+0x777, tr.PA)

	// One NX page in the range sets EntryXD.
	_, err = p.Map(0x10000, 4096, swapmemtest.UserRX)
	require.NoError(t, err)
	_, err = p.Map(0x11000, 4096, swapmemtest.UserRW)
	require.NoError(t, err)
	_, err = e.ReadData(swapmem.Request{CR3: p.CR3, VA: 0x10ff0, Len: 0x20, Done: rec.done})
	require.NoError(t, err)
	assert.Equal(t, swapmem.Flags(swapmem.EntryXD), rec.reads[1].Flags)
}

func TestBadRequests(t *testing.T) {
	w := newWorld(t, 1)
	called := false
	done := func(swapmem.Read) { called = true }
	for name, r := range map[string]swapmem.Request{
		"zero length":        {VA: userBase, Len: 0},
		"negative length":    {VA: userBase, Len: -1},
		"too long":           {VA: userBase, Len: swapmem.MaxLen + 1},
		"wraps":              {VA: ^uint64(0) - 10, Len: 20},
		"non-canonical":      {VA: 0x00ff_ffff_ffff_f000, Len: 0x2000},
		"unknown option":     {VA: userBase, Len: 1, Options: 0x100},
		"user and kernel":    {VA: userBase, Len: 1, Options: swapmem.UserFault | swapmem.KernelFault},
		"nofault and user":   {VA: userBase, Len: 1, Options: swapmem.NoFault | swapmem.UserFault},
		"bp and user":        {VA: userBase, Len: 1, Options: swapmem.BPFault | swapmem.UserFault},
		"bp and write":       {VA: userBase, Len: 1, Options: swapmem.BPFault | swapmem.WriteFault},
		"nofault and bp":     {VA: userBase, Len: 1, Options: swapmem.NoFault | swapmem.BPFault},
		"nofault and kernel": {VA: userBase, Len: 1, Options: swapmem.NoFault | swapmem.KernelFault},
	} {
		r.CR3 = w.proc.CR3
		r.Done = done
		tx, err := w.e.ReadData(r)
		assert.ErrorIs(t, err, swapmem.ErrBadRequest, name)
		assert.Nil(t, tx, name)
	}
	assert.False(t, called)
	st := w.e.Stats()
	assert.Zero(t, st.Live)
	assert.Zero(t, w.m.Watches())
	// The last byte of the address space is fine.
	_, err := w.e.ReadData(swapmem.Request{VA: ^uint64(0), Len: 1, Options: swapmem.NoFault})
	assert.NoError(t, err)
}

func TestUserFaultReadsSwappedRange(t *testing.T) {
	w := newWorld(t, 8)
	w.swapOut(w.proc, userBase+4096, 5) // pages 1..5
	var rec recorder
	va, n := uint64(userBase+4096+123), 5*4096-200
	tx, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: va, Len: n, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)
	require.NotNil(t, tx)
	assert.Empty(t, rec.reads)
	assert.Equal(t, 5, w.m.Watches())

	// Kernel mode in the right space: no.
	w.cpu.Switch(w.proc.CR3, 0)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Empty(t, w.m.Queued())
	// User mode in another space: no.
	other := w.m.NewSpace()
	w.cpu.Switch(other.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Empty(t, w.m.Queued())
	// Right space and ring, but an event is pending: no.
	w.cpu.Switch(w.proc.CR3, 3)
	w.cpu.SetEventPending(true)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Empty(t, w.m.Queued())
	w.cpu.SetEventPending(false)

	// Now: one #PF, user, read, not present; and only one.
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	q := w.m.Queued()
	require.Len(t, q, 1)
	assert.Equal(t, uint64(userBase+4096), q[0].VA)
	assert.Equal(t, uint32(swapmem.PFErrUser), q[0].Code)
	assert.False(t, q[0].BP)

	w.pump(10)
	require.Len(t, rec.reads, 1)
	r := rec.reads[0]
	assert.NoError(t, r.Err)
	assert.Equal(t, swapmem.Async|swapmem.EntryXD, r.Flags)
	assert.Equal(t, patternRange(1, va, uint64(n)), rec.data[0])
	tr, _ := w.m.Translate(w.proc.CR3, va)
	assert.Equal(t, tr.PA, r.PA)
	assert.Len(t, w.m.Delivered(), 5, "one #PF per page")
	assert.Zero(t, w.m.Watches())
	assert.Equal(t, swapmem.Stats{Injected: 5, Completed: 1}, w.e.Stats())
	assert.ErrorIs(t, w.e.RemoveTransaction(tx), swapmem.ErrNoTransaction)
	assert.Empty(t, w.m.Violations)
}

func TestKernelFaultAndSystemSpace(t *testing.T) {
	w := newWorld(t, 4)
	w.swapOut(w.m.System(), kernelBase, 2)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{VA: kernelBase, Len: 2 * 4096, Options: swapmem.KernelFault, Done: rec.done})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Empty(t, w.m.Queued(), "user mode")
	// CR3 0: any address space takes the fault, in kernel mode.
	w.cpu.Switch(w.proc.CR3, 0)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	q := w.m.Queued()
	require.Len(t, q, 1)
	assert.Equal(t, uint32(0), q[0].Code)
	assert.Equal(t, w.proc.CR3, q[0].CR3)
	w.pump(4)
	require.Len(t, rec.reads, 1)
	assert.Equal(t, uint64(0), rec.reads[0].CR3)
	assert.Equal(t, patternRange(1, kernelBase, 2*4096), rec.data[0])
}

func TestNoFaultWaitsForTheGuest(t *testing.T) {
	w := newWorld(t, 4)
	w.swapOut(w.proc, userBase, 2)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 8192, Options: swapmem.NoFault, Done: rec.done})
	require.NoError(t, err)
	for _, ring := range []int{0, 3} {
		w.cpu.Switch(w.proc.CR3, ring)
		w.pump(3)
	}
	assert.Empty(t, w.m.Delivered())
	require.NoError(t, w.proc.Touch(userBase+4096, false))
	assert.Empty(t, rec.reads)
	require.NoError(t, w.proc.Touch(userBase, false))
	require.Len(t, rec.reads, 1)
	assert.Equal(t, patternRange(1, userBase, 8192), rec.data[0])
	assert.True(t, rec.reads[0].Flags&swapmem.Async != 0)
}

func TestPageComesInByItselfWhilePending(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 1)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 10, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	w.m.Drop() // the fault is still in flight when the guest touches the page
	require.NoError(t, w.proc.Touch(userBase, false))
	require.Len(t, rec.reads, 1)
	// The pending mark is gone: a new request can be injected at once.
	w.swapOut(w.proc, userBase+4096, 1)
	_, err = w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + 4096, Len: 10, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Len(t, w.m.Queued(), 1)
}

func TestPreInjectVetoMovesOn(t *testing.T) {
	w := newWorld(t, 4)
	w.swapOut(w.proc, userBase, 2)
	var rec recorder
	var asked []uint64
	veto := func(cr3, va uint64) bool {
		assert.Equal(t, w.proc.CR3, cr3)
		asked = append(asked, va)
		return false
	}
	a, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 10, Options: swapmem.UserFault, Done: rec.done, PreInject: veto})
	require.NoError(t, err)
	_, err = w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + 4096, Len: 10, Options: swapmem.UserFault, Done: rec.done,
		PreInject: func(cr3, va uint64) bool { return true }})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	q := w.m.Queued()
	require.Len(t, q, 1)
	assert.Equal(t, uint64(userBase+4096), q[0].VA, "the vetoed page was skipped")
	assert.Equal(t, []uint64{userBase}, asked)
	w.pump(5)
	require.Len(t, rec.reads, 1)
	assert.Equal(t, uint64(userBase+4096), rec.reads[0].VA)
	assert.True(t, w.proc.Swapped(userBase), "never faulted in")
	assert.GreaterOrEqual(t, len(asked), 5)
	require.NoError(t, w.e.RemoveTransaction(a))
	assert.Zero(t, w.m.Watches())
}

func TestManyVetoesCostBoundedCalls(t *testing.T) {
	w := newWorld(t, 32)
	w.swapOut(w.proc, userBase, 32)
	calls := 0
	for i := 0; i < 32; i++ {
		_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + uint64(i)*4096, Len: 1, Options: swapmem.UserFault,
			PreInject: func(uint64, uint64) bool { calls++; return false }})
		require.NoError(t, err)
	}
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Equal(t, swapmem.MaxPreInjectCalls, calls)
	// Over successive exits every page gets asked.
	for i := 0; i < 3; i++ {
		require.NoError(t, w.e.InjectPendingPF(w.cpu))
	}
	assert.Equal(t, 32, calls)
}

func TestBPFaultUsesTheAgent(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.m.System(), kernelBase, 1)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{VA: kernelBase + 8, Len: 16, Options: swapmem.BPFault, Done: rec.done})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	q := w.m.Queued()
	require.Len(t, q, 1)
	assert.True(t, q[0].BP)
	assert.Equal(t, uint64(kernelBase), q[0].VA)
	w.pump(1)
	require.Len(t, rec.reads, 1)
	assert.Equal(t, patternRange(1, kernelBase+8, 16), rec.data[0])
}

func TestWriteFaultBreaksCopyOnWrite(t *testing.T) {
	w := newWorld(t, 2)
	require.NoError(t, w.proc.MakeCoW(userBase))
	before, _ := w.m.Translate(w.proc.CR3, userBase)
	var rec recorder
	// Without WriteFault a read-only page is simply read.
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 100, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)
	require.Len(t, rec.reads, 1)
	tx, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 100, Options: swapmem.UserFault | swapmem.WriteFault, Done: rec.done})
	require.NoError(t, err)
	require.NotNil(t, tx)
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	q := w.m.Queued()
	require.Len(t, q, 1)
	assert.Equal(t, uint32(swapmem.PFErrPresent|swapmem.PFErrWrite|swapmem.PFErrUser), q[0].Code)
	w.pump(1)
	require.Len(t, rec.reads, 2)
	after, _ := w.m.Translate(w.proc.CR3, userBase)
	assert.True(t, after.Writable)
	assert.NotEqual(t, before.PA, after.PA, "a private copy")
	assert.Equal(t, after.PA, rec.reads[1].PA)
	assert.Equal(t, patternRange(1, userBase, 100), rec.data[1])
	// A swapped-out page under WriteFault: W without P.
	w.swapOut(w.proc, userBase+4096, 1)
	_, err = w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + 4096, Len: 1, Options: swapmem.WriteFault})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 0)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	q = w.m.Queued()
	require.Len(t, q, 1)
	assert.Equal(t, uint32(swapmem.PFErrWrite), q[0].Code)
}

func TestCancelAndTimeout(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 1)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 1, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	// Displaced by another event: cancelled, injected again next time.
	require.Len(t, w.m.Drop(), 1)
	w.e.CancelPendingPF(userBase + 0x10)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	require.Len(t, w.m.Drop(), 1, "re-injected after cancel")
	// Lost: nothing happens until the timeout.
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Empty(t, w.m.Queued())
	w.clk.advance(999 * time.Millisecond)
	w.e.ReinjectFailedPF()
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Empty(t, w.m.Queued(), "not timed out yet")
	w.clk.advance(time.Millisecond)
	w.e.ReinjectFailedPF()
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	require.Len(t, w.m.Queued(), 1, "re-armed after the timeout")
	w.m.Deliver()
	require.Len(t, rec.reads, 1)
	st := w.e.Stats()
	assert.EqualValues(t, 3, st.Injected)
	assert.EqualValues(t, 1, st.Cancelled)
	assert.EqualValues(t, 1, st.TimedOut)
}

func TestFailsAfterMaxAttempts(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 2)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 8192, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	w.m.LoseEvery = 1 // the guest never sees our faults
	for i := 0; i < 3*swapmem.DefaultMaxAttempts; i++ {
		w.pump(1)
		w.clk.advance(time.Second)
		w.e.ReinjectFailedPF()
	}
	require.Len(t, rec.reads, 1)
	r := rec.reads[0]
	assert.ErrorIs(t, r.Err, swapmem.ErrNotServiced)
	assert.Nil(t, rec.data[0])
	assert.True(t, r.Flags&swapmem.Async != 0)
	// The two pages take turns; the first to reach the limit fails the
	// transaction, and the other is dropped with it.
	assert.Len(t, w.m.Delivered(), 2*swapmem.DefaultMaxAttempts-1)
	assert.Zero(t, w.m.Watches())
	assert.Zero(t, w.e.Stats().Live)
	assert.Contains(t, r.Err.Error(), "after 8 attempts")
}

func TestRemoveTransaction(t *testing.T) {
	w := newWorld(t, 4)
	w.swapOut(w.proc, userBase, 2)
	called := 0
	tx, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 8192, Options: swapmem.UserFault,
		Done: func(swapmem.Read) { called++ }})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	require.NoError(t, w.e.RemoveTransaction(tx))
	assert.ErrorIs(t, w.e.RemoveTransaction(tx), swapmem.ErrNoTransaction)
	assert.ErrorIs(t, w.e.RemoveTransaction(nil), swapmem.ErrNoTransaction)
	other := swapmem.New(w.m, swapmem.Config{})
	assert.ErrorIs(t, other.RemoveTransaction(tx), swapmem.ErrNoTransaction)
	assert.Zero(t, w.m.Watches())
	w.pump(3)
	assert.Zero(t, called)

	// The removed transaction's #PF was in flight: nothing else is injected
	// until it is cancelled or times out.
	w.swapOut(w.proc, userBase+3*4096, 1)
	_, err = w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + 3*4096, Len: 1, Options: swapmem.UserFault})
	require.NoError(t, err)
	w.m.Drop()
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Empty(t, w.m.Queued())
	w.clk.advance(time.Second)
	w.e.ReinjectFailedPF()
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Len(t, w.m.Queued(), 1)
}

func TestProcessExitRemovesItsTransactions(t *testing.T) {
	w := newWorld(t, 4)
	w.swapOut(w.proc, userBase, 4)
	w.swapOut(w.m.System(), kernelBase, 1)
	called := 0
	done := func(swapmem.Read) { called++ }
	for i := 0; i < 3; i++ {
		_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + uint64(i)*4096, Len: 4096, Options: swapmem.UserFault, Done: done})
		require.NoError(t, err)
	}
	kept, err := w.e.ReadData(swapmem.Request{VA: kernelBase, Len: 1, Options: swapmem.KernelFault, Done: done})
	require.NoError(t, err)
	require.NoError(t, w.proc.Exit())
	assert.Zero(t, called, "pages vanished: nothing to read, nothing called")
	require.NoError(t, w.e.RemoveTransactionsForVaSpace(w.proc.CR3))
	assert.Equal(t, 1, w.e.Stats().Live)
	assert.Equal(t, 1, w.m.Watches())
	assert.NoError(t, w.e.RemoveTransactionsForVaSpace(w.proc.CR3), "nothing left is fine")
	require.NoError(t, w.e.RemoveTransaction(kept))
	assert.Zero(t, w.m.Watches())
}

func TestNoDups(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 1)
	req := swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 64, Options: swapmem.UserFault | swapmem.NoDups}
	a, err := w.e.ReadData(req)
	require.NoError(t, err)
	require.NotNil(t, a)
	b, err := w.e.ReadData(req)
	require.NoError(t, err)
	assert.Nil(t, b)
	assert.Equal(t, 1, w.e.Stats().Live)
	req.Len = 65 // not a duplicate
	c, err := w.e.ReadData(req)
	require.NoError(t, err)
	require.NotNil(t, c)
	require.NoError(t, w.e.RemoveTransaction(a))
	req.Len = 64
	d, err := w.e.ReadData(req)
	require.NoError(t, err)
	assert.NotNil(t, d, "the first one is gone")
}

func TestSharedPageOneWatchOneFault(t *testing.T) {
	w := newWorld(t, 3)
	w.swapOut(w.proc, userBase, 3)
	var rec recorder
	for i := 0; i < 10; i++ {
		_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + uint64(i)*100, Len: 3 * 4096 / 2, Options: swapmem.UserFault, Done: rec.done})
		require.NoError(t, err)
	}
	// A NoFault reader shares the watch but not the fault.
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 1, Options: swapmem.NoFault, Done: rec.done})
	require.NoError(t, err)
	assert.Equal(t, 2, w.m.Watches())
	st := w.e.Stats()
	assert.Equal(t, 3, st.Pages)
	assert.Equal(t, 2, st.Watches)
	w.cpu.Switch(w.proc.CR3, 3)
	w.pump(4)
	assert.Len(t, w.m.Delivered(), 2)
	require.Len(t, rec.reads, 11)
	for i, r := range rec.reads {
		assert.Equal(t, patternRange(1, r.VA, uint64(len(rec.data[i]))), rec.data[i])
	}
	assert.Zero(t, w.m.Watches())
}

func TestPageTableMovesHooksFollow(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 1)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 4, Options: swapmem.NoFault, Done: rec.done})
	require.NoError(t, err)
	require.NoError(t, w.proc.MoveTable(userBase))
	assert.Empty(t, rec.reads)
	require.NoError(t, w.proc.SwapIn(userBase))
	require.Len(t, rec.reads, 1)
	assert.Equal(t, patternRange(1, userBase, 4), rec.data[0])
}

func TestDump(t *testing.T) {
	w := newWorld(t, 3)
	w.swapOut(w.proc, userBase, 2)
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + 10, Len: 2 * 4096, Options: swapmem.UserFault})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	var b bytes.Buffer
	w.e.Dump(&b)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	require.Len(t, lines, 4)
	assert.Contains(t, lines[0], "1 transactions, 2 pages, 2 watches, pending #PF: 0x7f0000000000 (pending, attempt 1)")
	assert.Contains(t, lines[1], "opts=UserFault missing=2")
	assert.Contains(t, lines[2], "page 0x7f0000000000: bytes 0+4086 state=pending attempts=1")
	assert.Contains(t, lines[3], "page 0x7f0000001000: bytes 4086+4096 state=ready")
}

func TestClose(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 1)
	called := false
	tx, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 1, Done: func(swapmem.Read) { called = true }})
	require.NoError(t, err)
	require.NoError(t, w.e.Close())
	assert.Zero(t, w.m.Watches())
	assert.ErrorIs(t, w.e.Close(), swapmem.ErrClosed)
	_, err = w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 1})
	assert.ErrorIs(t, err, swapmem.ErrClosed)
	assert.ErrorIs(t, w.e.RemoveTransaction(tx), swapmem.ErrClosed)
	assert.ErrorIs(t, w.e.RemoveTransactionsForVaSpace(0), swapmem.ErrClosed)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	require.NoError(t, w.proc.SwapIn(userBase))
	assert.False(t, called)
}

func TestReentrantCallbacks(t *testing.T) {
	w := newWorld(t, 4)
	w.swapOut(w.proc, userBase, 2)
	var rec recorder
	var second *swapmem.Transaction
	// Done starts another read; PreInject removes its own transaction.
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 1, Options: swapmem.UserFault,
		Done: func(r swapmem.Read) {
			rec.done(r)
			var err error
			second, err = w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + 4096, Len: 1, Options: swapmem.UserFault, Done: rec.done})
			assert.NoError(t, err)
		}})
	require.NoError(t, err)
	var self *swapmem.Transaction
	self, err = w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + 2*4096 - 1, Len: 2, Options: swapmem.UserFault,
		Done: rec.done,
		PreInject: func(uint64, uint64) bool {
			assert.NoError(t, w.e.RemoveTransaction(self))
			return true
		}})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	w.pump(6)
	require.Len(t, rec.reads, 2)
	assert.NotNil(t, second)
	assert.Equal(t, uint64(userBase+4096), rec.reads[1].VA)
	assert.Zero(t, w.m.Watches())
	assert.Empty(t, w.m.Violations)
}

func TestInjectErrorRequeues(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 1)
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 1, Options: swapmem.UserFault})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	boom := errors.New("entry fields busy")
	w.cpu.Fail = boom
	assert.ErrorIs(t, w.e.InjectPendingPF(w.cpu), boom)
	// Not tried again at every entry: the page backs off until the timer.
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Empty(t, w.m.Queued())
	w.e.ReinjectFailedPF()
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Len(t, w.m.Queued(), 1)
	assert.EqualValues(t, 1, w.e.Stats().Refused)
}

func TestReadPhysErrorChangesNothing(t *testing.T) {
	g := &fakeGuest{tr: swapmem.Translation{Present: true, PA: 0x1000, PageSize: 4096}, readErr: errors.New("MMIO")}
	e := swapmem.New(g, swapmem.Config{})
	called := false
	tx, err := e.ReadData(swapmem.Request{CR3: 1, VA: 0x1000, Len: 8, Done: func(swapmem.Read) { called = true }})
	assert.ErrorContains(t, err, "MMIO")
	assert.Nil(t, tx)
	assert.False(t, called)
	assert.Zero(t, e.Stats().Live)
}

func TestPageArrivingBeforeTheWatchIsSeen(t *testing.T) {
	// The first translation says missing; by the time the watch is in
	// place the page is there. No watch event will ever come for it.
	g := &fakeGuest{tr: swapmem.Translation{PA: 0x5000, PageSize: 4096, Backed: true}, presentAfterWatch: true}
	e := swapmem.New(g, swapmem.Config{})
	var rec recorder
	tx, err := e.ReadData(swapmem.Request{CR3: 1, VA: 0x1010, Len: 8, Done: rec.done})
	require.NoError(t, err)
	assert.Nil(t, tx)
	require.Len(t, rec.reads, 1)
	assert.Equal(t, uint64(0x5010), rec.reads[0].PA)
	assert.Equal(t, 0, g.live)
}

// fakeGuest translates every address to the same page.
type fakeGuest struct {
	tr                swapmem.Translation
	readErr           error
	presentAfterWatch bool
	live              int
	changed           func(swapmem.Translation)
}

func (g *fakeGuest) Translate(cr3, va uint64) (swapmem.Translation, error) {
	tr := g.tr
	tr.PA += va & 0xfff
	return tr, nil
}
func (g *fakeGuest) ReadPhys(pa uint64, p []byte) error { return g.readErr }
func (g *fakeGuest) Watch(cr3, va uint64, changed func(swapmem.Translation)) (func(), error) {
	g.live++
	g.changed = changed
	if g.presentAfterWatch {
		g.tr.Present = true
	}
	return func() { g.live-- }, nil
}
func (g *fakeGuest) SystemCR3() uint64 { return 1 }

// movingGuest swaps a page out just before the engine copies it, as another
// vCPU or the guest's pager might between the engine's walk and its copy.
type movingGuest struct {
	*swapmemtest.Machine
	space *swapmemtest.Space
	va    uint64 // the page to move on the next copy; 0 when disarmed
}

func (g *movingGuest) ReadPhys(pa uint64, p []byte) error {
	if g.va != 0 {
		va := g.va
		g.va = 0
		if err := g.space.SwapOut(va); err != nil {
			return err
		}
	}
	return g.Machine.ReadPhys(pa, p)
}

// TestPageMovedDuringCopy: a page that leaves its frame between the walk and
// the copy is not returned with the frame's new bytes; the read waits for
// the page and then returns the right ones.
func TestPageMovedDuringCopy(t *testing.T) {
	m := swapmemtest.NewMachine()
	proc := m.NewSpace()
	require.NoError(t, proc.MapRange(userBase, 4096, swapmemtest.UserRW))
	want := patternRange(1, userBase, 4096)
	require.NoError(t, proc.Write(userBase, want))
	g := &movingGuest{Machine: m, space: proc, va: userBase}
	e := swapmem.New(g, swapmem.Config{})
	defer e.Close()

	var got []swapmem.Read
	tx, err := e.ReadData(swapmem.Request{CR3: proc.CR3, VA: userBase, Len: 4096,
		Done: func(r swapmem.Read) { got = append(got, r) }})
	require.NoError(t, err)
	require.NotNil(t, tx, "the page moved during the copy: the read must wait for it")
	assert.Empty(t, got)

	require.NoError(t, proc.Touch(userBase, false))
	require.Len(t, got, 1)
	require.NoError(t, got[0].Err)
	assert.True(t, bytes.Equal(want, got[0].Data), "bytes of the page, not of its old frame")
}
