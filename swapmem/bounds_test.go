package swapmem_test

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
)

// Every accepted read ends: these tests cover the ways a read could
// otherwise wait forever, the pages a #PF must not be injected for, and
// the delivery reports of the hypervisor.

// TestNoFaultReadEndsAtDeadline: a NoFault read whose page the guest never
// touches ends with ErrDeadline at the default deadline (review finding 8).
func TestNoFaultReadEndsAtDeadline(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 1)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 16, Options: swapmem.NoFault, Done: rec.done})
	require.NoError(t, err)
	for i := 0; i < 29; i++ {
		w.clk.advance(time.Second)
		w.e.ReinjectFailedPF()
	}
	assert.Empty(t, rec.reads, "before the deadline")
	w.clk.advance(time.Second)
	w.e.ReinjectFailedPF()
	require.Len(t, rec.reads, 1)
	r := rec.reads[0]
	assert.ErrorIs(t, r.Err, swapmem.ErrDeadline)
	assert.Nil(t, rec.data[0])
	assert.Equal(t, swapmem.Async, r.Flags&swapmem.Async)
	st := w.e.Stats()
	assert.Zero(t, st.Live)
	assert.Zero(t, st.Spaces)
	assert.EqualValues(t, 1, st.Expired)
	assert.EqualValues(t, 1, st.Failed)
	assert.Zero(t, w.m.Watches())
	assert.Equal(t, 30*time.Second, time.Duration(swapmem.DefaultDeadline))
}

// TestRequestDeadlineOverridesConfig: Request.Deadline wins over
// Config.Deadline, each read ends at its own deadline, and a negative one
// is refused.
func TestRequestDeadlineOverridesConfig(t *testing.T) {
	m := swapmemtest.NewMachine()
	p := m.NewSpace()
	require.NoError(t, p.MapRange(userBase, 3*4096, swapmemtest.UserRW))
	for i := uint64(0); i < 3; i++ {
		require.NoError(t, p.SwapOut(userBase+i*4096))
	}
	clk := &clock{}
	e := swapmem.New(m, swapmem.Config{Now: clk.now, Deadline: 10 * time.Second})
	defer e.Close()
	var ended []string
	read := func(name string, va uint64, d time.Duration) {
		_, err := e.ReadData(swapmem.Request{CR3: p.CR3, VA: va, Len: 1, Options: swapmem.NoFault, Deadline: d,
			Done: func(r swapmem.Read) {
				assert.ErrorIs(t, r.Err, swapmem.ErrDeadline, name)
				ended = append(ended, fmt.Sprintf("%s@%v", name, clk.t))
			}})
		require.NoError(t, err)
	}
	read("long", userBase, 20*time.Second)
	read("config", userBase+4096, 0)
	read("short", userBase+2*4096, 2*time.Second)
	_, err := e.ReadData(swapmem.Request{CR3: p.CR3, VA: userBase, Len: 1, Options: swapmem.NoFault, Deadline: -1})
	assert.ErrorIs(t, err, swapmem.ErrBadRequest)
	for i := 0; i < 25; i++ {
		clk.advance(time.Second)
		e.ReinjectFailedPF()
	}
	assert.Equal(t, []string{"short@2s", "config@10s", "long@20s"}, ended)
	assert.Zero(t, m.Watches())
}

// TestVanishedSpaceReadsEnd: after a process exits, its reads end without
// anyone removing them: a faulting read with ErrNotBacked (its page is gone,
// nothing is injected), a NoFault read at its deadline.
func TestVanishedSpaceReadsEnd(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 2)
	var fault, wait recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 8, Options: swapmem.UserFault, Done: fault.done})
	require.NoError(t, err)
	_, err = w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + 4096, Len: 8, Options: swapmem.NoFault, Done: wait.done})
	require.NoError(t, err)
	require.NoError(t, w.proc.Exit())
	// A vCPU still running on the dead root in user mode gets no #PF.
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Empty(t, w.m.Queued())
	w.clk.advance(time.Second)
	w.e.ReinjectFailedPF()
	require.Len(t, fault.reads, 1)
	assert.ErrorIs(t, fault.reads[0].Err, swapmem.ErrNotBacked)
	assert.Empty(t, wait.reads)
	w.clk.advance(swapmem.DefaultDeadline)
	w.e.ReinjectFailedPF()
	require.Len(t, wait.reads, 1)
	assert.ErrorIs(t, wait.reads[0].Err, swapmem.ErrDeadline)
	assert.Zero(t, w.e.Stats().Live)
	assert.Zero(t, w.m.Watches())
	assert.Empty(t, w.m.Delivered())
}

// setClock moves a test clock to an absolute time, backwards included.
func (c *clock) set(d time.Duration) { c.t = d }

// TestBackwardsClockStillTimesOut: a clock set back (a guest that writes
// the TSC) neither stalls the re-arm of a lost #PF nor a deadline; the step
// back counts as no time passing (review finding 13).
func TestBackwardsClockStillTimesOut(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 2)
	w.clk.set(1000 * time.Second)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 1, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)
	_, err = w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + 4096, Len: 1, Options: swapmem.NoFault, Deadline: 5 * time.Second, Done: rec.done})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	require.Len(t, w.m.Drop(), 1, "injected, then lost")

	w.clk.set(100 * time.Second) // 900 s back
	w.e.ReinjectFailedPF()
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Empty(t, w.m.Queued(), "the step back is no time passing")
	assert.Empty(t, rec.reads)

	w.clk.advance(time.Second)
	w.e.ReinjectFailedPF()
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	assert.Len(t, w.m.Drop(), 1, "re-armed one timeout after the step")

	w.clk.advance(4 * time.Second)
	w.e.ReinjectFailedPF()
	require.Len(t, rec.reads, 1, "the 5 s deadline")
	assert.ErrorIs(t, rec.reads[0].Err, swapmem.ErrDeadline)
	assert.Equal(t, uint64(userBase+4096), rec.reads[0].VA)
}

// refusingCPU is a vCPU whose breakpoint agent can never be armed (a
// detour that cannot be located, PTI hiding the kernel text, a full EPT
// arena).
type refusingCPU struct {
	*swapmemtest.VCPU
	tries int
}

var errNoAgent = errors.New("breakpoint agent: detour not located")

func (c *refusingCPU) InjectBPFault(va uint64) error {
	c.tries++
	return errNoAgent
}

// TestBPFaultThatCannotArmFails: a refused arm is retried once per timer
// tick, not at every entry; once arms have been refused for MaxAttempts ×
// Timeout the read fails with ErrNotServiced (review finding 14). The
// bound is in time, not in ticks: the timer may tick at any rate.
func TestBPFaultThatCannotArmFails(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.m.System(), kernelBase, 1)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{VA: kernelBase, Len: 8, Options: swapmem.BPFault, Done: rec.done})
	require.NoError(t, err)
	cpu := &refusingCPU{VCPU: w.cpu}
	const tick = 10 * time.Millisecond // tamahv's preemption timer
	limit := int(swapmem.DefaultMaxAttempts * swapmem.DefaultTimeout / tick)
	for i := 0; i < 2*limit && len(rec.reads) == 0; i++ {
		for exit := 0; exit < 100; exit++ {
			err := w.e.InjectPendingPF(cpu)
			if exit == 0 {
				assert.ErrorIs(t, err, errNoAgent)
			} else {
				assert.NoError(t, err)
			}
		}
		require.Equal(t, i+1, cpu.tries, "one try per tick")
		w.clk.advance(tick)
		w.e.ReinjectFailedPF()
	}
	require.Len(t, rec.reads, 1)
	assert.ErrorIs(t, rec.reads[0].Err, swapmem.ErrNotServiced)
	assert.ErrorIs(t, rec.reads[0].Err, errNoAgent)
	assert.Equal(t, limit+1, cpu.tries, "tries at 0, 10 ms, ... 8 s")
	st := w.e.Stats()
	assert.Zero(t, st.Live)
	assert.EqualValues(t, limit+1, st.Refused)
	assert.Zero(t, st.Injected)
	assert.Zero(t, w.m.Watches())
}

// splitGuest has every page missing but backed; Watch fails on odd pages
// (a walk that hits a reserved bit, an EPT arena that is full).
type splitGuest struct{ watches int }

func (g *splitGuest) Translate(cr3, va uint64) (swapmem.Translation, error) {
	return swapmem.Translation{Backed: true}, nil
}
func (g *splitGuest) ReadPhys(pa uint64, p []byte) error { return nil }
func (g *splitGuest) Watch(cr3, va uint64, changed func(swapmem.Translation)) (func(), error) {
	if va&0x1000 != 0 {
		return nil, errors.New("reserved bit")
	}
	g.watches++
	return func() { g.watches-- }, nil
}
func (g *splitGuest) SystemCR3() uint64 { return 0x1000 }

// TestFailedAttachLeaksNothing: requests whose second page cannot be
// watched, each from a new root, leave no address space behind (review
// finding 15).
func TestFailedAttachLeaksNothing(t *testing.T) {
	g := &splitGuest{}
	e := swapmem.New(g, swapmem.Config{})
	defer e.Close()
	for i := 0; i < 10000; i++ {
		_, err := e.ReadData(swapmem.Request{CR3: uint64(i+2) << 12, VA: userBase, Len: 8192, Options: swapmem.UserFault})
		require.ErrorContains(t, err, "reserved bit")
	}
	st := e.Stats()
	assert.Zero(t, st.Spaces)
	assert.Zero(t, st.Live)
	assert.Zero(t, st.Pages)
	assert.Zero(t, st.Watches)
	assert.Zero(t, g.watches)
}

// TestPageArrivingBeforeTheWatchLeaksNoSpace: a read completed by the
// translation made once the watch is in place leaves no space behind.
func TestPageArrivingBeforeTheWatchLeaksNoSpace(t *testing.T) {
	g := &fakeGuest{tr: swapmem.Translation{PA: 0x5000, PageSize: 4096, Backed: true}, presentAfterWatch: true}
	e := swapmem.New(g, swapmem.Config{})
	defer e.Close()
	for i := 0; i < 100; i++ {
		g.tr.Present = false
		done := false
		tx, err := e.ReadData(swapmem.Request{CR3: uint64(i+2) << 12, VA: 0x1010, Len: 8, Done: func(swapmem.Read) { done = true }})
		require.NoError(t, err)
		require.Nil(t, tx)
		require.True(t, done)
	}
	assert.Zero(t, e.Stats().Spaces)
}

// TestNotBackedPagesAreNeverFaulted: a #PF is injected only for a backed
// page. A faulting read of a page with a zero leaf or a missing upper level
// fails at once; a NoFault read of one waits for it.
func TestNotBackedPagesAreNeverFaulted(t *testing.T) {
	w := newWorld(t, 2)
	require.NoError(t, w.proc.Unmap(userBase+4096)) // zero PTE
	const noTable = userBase + 0x4000_0000          // no page directory at all
	for _, va := range []uint64{userBase + 4096, noTable} {
		for _, o := range []swapmem.Options{swapmem.UserFault, swapmem.KernelFault, 0, swapmem.BPFault, swapmem.WriteFault} {
			called := false
			tx, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: va - 8, Len: 16, Options: o, Done: func(swapmem.Read) { called = true }})
			assert.ErrorIs(t, err, swapmem.ErrNotBacked, "%#x %v", va, o)
			assert.Nil(t, tx)
			assert.False(t, called)
		}
	}
	st := w.e.Stats()
	assert.Zero(t, st.Live)
	assert.Zero(t, st.Spaces)
	assert.Zero(t, w.m.Watches())

	// NoFault waits until the guest maps the page.
	var rec recorder
	tx, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + 4096, Len: 16, Options: swapmem.NoFault, Done: rec.done})
	require.NoError(t, err)
	require.NotNil(t, tx)
	_, err = w.proc.Map(userBase+4096, 4096, swapmemtest.UserRW)
	require.NoError(t, err)
	require.Len(t, rec.reads, 1)
	assert.NoError(t, rec.reads[0].Err)
	assert.Equal(t, make([]byte, 16), rec.data[0])
}

// TestPageThatStopsBeingBackedIsNotFaulted: a waited-for page whose entry is
// cleared (munmap in a live process) is not faulted; unless it is backed
// again within Config.Timeout, the read fails with ErrNotBacked.
func TestPageThatStopsBeingBackedIsNotFaulted(t *testing.T) {
	w := newWorld(t, 2)
	w.swapOut(w.proc, userBase, 2)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 8192, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)
	require.NoError(t, w.proc.Unmap(userBase+4096))
	require.NoError(t, w.proc.Unmap(userBase))
	w.cpu.Switch(w.proc.CR3, 3)
	for i := 0; i < 3; i++ {
		require.NoError(t, w.e.InjectPendingPF(w.cpu))
	}
	assert.Empty(t, w.m.Queued())

	// Backed again (a new page, swapped out): faulted again.
	require.NoError(t, w.proc.MapSwapped(userBase, swapmemtest.UserRW, nil))
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	q := w.m.Queued()
	require.Len(t, q, 1)
	assert.Equal(t, uint64(userBase), q[0].VA)
	w.m.Deliver()
	assert.Empty(t, rec.reads, "the second page is still not backed")

	w.clk.advance(999 * time.Millisecond)
	w.e.ReinjectFailedPF()
	assert.Empty(t, rec.reads)
	w.clk.advance(time.Millisecond)
	w.e.ReinjectFailedPF()
	require.Len(t, rec.reads, 1)
	assert.ErrorIs(t, rec.reads[0].Err, swapmem.ErrNotBacked)
	assert.Len(t, w.m.Delivered(), 1)
	assert.Zero(t, w.m.Watches())
	assert.Empty(t, w.m.Violations)
}

// TestRemovingDeliveredPendingFreesSlotAtOnce: once the hypervisor has
// confirmed our #PF delivered, removing its transaction frees the
// guest-wide pending slot at once; a #PF not yet confirmed holds it only
// until the report (delivered or cancelled) comes, not until the timeout.
func TestRemovingDeliveredPendingFreesSlotAtOnce(t *testing.T) {
	w := newWorld(t, 4)
	w.swapOut(w.proc, userBase, 4)
	w.cpu.Switch(w.proc.CR3, 3)
	read := func(page uint64) *swapmem.Transaction {
		tx, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase + page*4096, Len: 1, Options: swapmem.UserFault})
		require.NoError(t, err)
		return tx
	}
	a := read(0)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	require.Len(t, w.m.Drop(), 1) // in the guest's handler, not serviced yet
	w.e.PFDelivered(userBase)
	require.NoError(t, w.e.RemoveTransaction(a))
	read(1)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	require.Len(t, w.m.Queued(), 1, "the slot was free at once")
	assert.Equal(t, uint64(userBase+4096), w.m.Drop()[0].VA)
	w.e.PFDelivered(userBase + 4096)

	// Not confirmed when removed: held until the report, which frees it.
	w.e.CancelPendingPF(userBase + 4096) // ignored: already delivered
	for _, report := range []func(uint64){w.e.PFDelivered, w.e.CancelPendingPF} {
		w.clk.advance(time.Second)
		w.e.ReinjectFailedPF() // re-arms the delivered #PF that timed out
		require.NoError(t, w.e.InjectPendingPF(w.cpu))
		f := w.m.Drop()
		require.Len(t, f, 1)
		require.NoError(t, w.e.RemoveTransactionsForVaSpace(w.proc.CR3))
		read(2)
		require.NoError(t, w.e.InjectPendingPF(w.cpu))
		assert.Empty(t, w.m.Queued(), "the removed #PF may still be on its way")
		report(f[0].VA)
		require.NoError(t, w.e.InjectPendingPF(w.cpu))
		q := w.m.Drop()
		require.Len(t, q, 1, "freed by the report")
		assert.Equal(t, uint64(userBase+2*4096), q[0].VA)
		w.e.PFDelivered(userBase + 2*4096)
		read(3)
	}
	st := w.e.Stats()
	assert.EqualValues(t, 5, st.Delivered)
	assert.Empty(t, w.m.Violations)
}

// TestCancelReinjectsAtOnce: a #PF that did not reach the guest is
// injected again at the next entry, ahead of the pages queued after it.
func TestCancelReinjectsAtOnce(t *testing.T) {
	w := newWorld(t, 3)
	w.swapOut(w.proc, userBase, 3)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: w.proc.CR3, VA: userBase, Len: 3 * 4096, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)
	w.cpu.Switch(w.proc.CR3, 3)
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	f := w.m.Drop()
	require.Len(t, f, 1)
	assert.Equal(t, uint64(userBase), f[0].VA)
	w.e.CancelPendingPF(f[0].VA) // seen in the IDT-vectoring information
	require.NoError(t, w.e.InjectPendingPF(w.cpu))
	q := w.m.Queued()
	require.Len(t, q, 1)
	assert.Equal(t, uint64(userBase), q[0].VA, "its turn is kept")
	w.pump(3)
	require.Len(t, rec.reads, 1)
	assert.NoError(t, rec.reads[0].Err)
}

// TestTimerPathAllocatesNothingWhenIdle: with many live transactions and
// nothing due, the timer costs no allocation (and, see
// BenchmarkReinjectFailedPF, no time growing with their number).
func TestTimerPathAllocatesNothingWhenIdle(t *testing.T) {
	e := swapmem.New(newBenchGuest(), swapmem.Config{})
	for i := 0; i < 1000; i++ {
		_, err := e.ReadData(swapmem.Request{CR3: spaceCR3(i), VA: userBase + uint64(i/benchSpaces)*4096, Len: 64, Options: swapmem.NoFault})
		require.NoError(t, err)
	}
	assert.Zero(t, testing.AllocsPerRun(100, e.ReinjectFailedPF))
}
