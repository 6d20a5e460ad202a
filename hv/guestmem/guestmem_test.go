package guestmem

import (
	"errors"
	"fmt"
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

func TestWatchFollowsGuestWritesThroughEPT(t *testing.T) {
	m := swapmemtest.NewMachine()
	p := m.NewSpace()
	const va = 0x400000
	require.NoError(t, p.MapRange(va, 2*4096, swapmemtest.UserRW))
	require.NoError(t, p.SwapOut(va))
	e, err := ept.New(&mapTables{pages: map[uint64]*[512]uint64{}, next: 0x40000000}, ept.Options{})
	require.NoError(t, err)
	require.NoError(t, e.Map(0, 0, 0x10000000, ept.RWX, ept.WriteBack))
	flushes := 0
	g := NewWatcher(&GuestPhys{Mem: machineMem{m}, EPT: e, Invalidate: func() { flushes++ }, Hole: [2]uint64{0x10000000, 0x18000000}}, 0)

	var seen []swapmem.Translation
	cancel, err := g.Watch(p.CR3, va, func(tr swapmem.Translation) { seen = append(seen, tr) })
	require.NoError(t, err)
	var steps [5]Step
	_, n, err := g.Walker.Walk(p.CR3, va, &steps)
	require.NoError(t, err)
	require.Equal(t, 4, n)
	ptePage := steps[3].PA &^ 0xfff
	_, perm, _, _, _ := e.Lookup(ptePage)
	assert.Equal(t, ept.Read|ept.Exec, perm, "the page table is write-protected")
	assert.Equal(t, 4, g.Watches())
	assert.Equal(t, 1, flushes)

	write := uint64(0x2 | 0x80 | 0x100 | 0x8 | 0x20) // write, linear valid, translation; entry r-x
	v, _ := vcputest.Scripted(t, []vcputest.Step{
		// The guest's kernel writes the PTE: the page opens.
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: steps[3].PA, vmx.ExitQualification: write},
			Check: func(t *testing.T, v *hv.VCPU) {
				_, perm, _, _, _ := e.Lookup(ptePage)
				assert.Equal(t, ept.RWX, perm)
				assert.Empty(t, seen)
			}},
		// The write completes (the page comes in, RIP moves on); the next
		// exit, whatever it is, closes the page and walks the watch.
		{Reason: vmx.ExitPreemptionTimer, Fields: map[vmx.Field]uint64{vmx.GuestRIP: 0x100004}, Regs: func(*vmx.GuestRegs) { require.NoError(t, p.SwapIn(va)) },
			Check: func(t *testing.T, v *hv.VCPU) {
				_, perm, _, _, _ := e.Lookup(ptePage)
				assert.Equal(t, ept.Read|ept.Exec, perm, "closed again")
				require.Len(t, seen, 1)
				assert.True(t, seen[0].Present)
			}},
		// An accessed-flag update by the processor's walk: no walk.
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: steps[3].PA, vmx.ExitQualification: 0x2 | 0x80 | 0x8}},
		{Reason: vmx.ExitCPUID},
		// A write refused on a page no watch holds: opened, counted.
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: 0x2000000, vmx.ExitQualification: 0x2}},
		// A write into tamahv's memory is fatal, as before.
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: 0x10000000, vmx.ExitQualification: 0x2}},
	})
	require.NoError(t, g.Install(v))
	err = v.Run()
	assert.ErrorIs(t, err, hv.ErrFatalExit)
	assert.Equal(t, uint64(1), g.Writes)
	assert.Equal(t, uint64(1), g.ADWrites)
	assert.Equal(t, uint64(1), g.Stale)
	assert.Len(t, seen, 1)

	// The process exits: its entries become zero and the watch hears the
	// translation is gone.
	v, _ = vcputest.Scripted(t, []vcputest.Step{
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: steps[3].PA, vmx.ExitQualification: write}},
		{Reason: vmx.ExitCPUID, Regs: func(*vmx.GuestRegs) { require.NoError(t, p.Exit()) }},
	})
	require.NoError(t, g.Install(v))
	require.NoError(t, v.Run())
	require.Len(t, seen, 2)
	assert.False(t, seen[1].Present)

	cancel()
	cancel()
	assert.Zero(t, g.Watches())
	_, perm, _, _, _ = e.Lookup(ptePage)
	assert.Equal(t, ept.RWX, perm, "protection dropped when no watch needs it")
	assert.ErrorIs(t, g.ReadPhys(0x10000010, make([]byte, 4)), ErrHole)
}

// observe runs an exit that only the observers see (a preemption-timer
// exit).
func observe(t *testing.T, v *hv.VCPU) {
	t.Helper()
	_, err := vcputest.Exit(v, vmx.ExitPreemptionTimer)
	require.NoError(t, err)
}

// unhandled is the handling below the interceptor a benchmark calls.
func unhandled(v *hv.VCPU, e *vmx.Exit) (hv.Action, error) {
	return hv.Stop, fmt.Errorf("exit %v not handled", e.Reason)
}

// udInfo is a #UD as the VM-entry interruption information.
const udInfo = 0x80000306

// TestDeliverSkipsWatchesCancelledMeanwhile: the functions of a rewalk's
// changed watches hear of their changes one after the other once the
// rewalk is done; a watch that an earlier function cancelled hears
// nothing, as cancel promises, and its failure reaches no owner.
func TestDeliverSkipsWatchesCancelledMeanwhile(t *testing.T) {
	g := &Watcher{}
	var heard []string
	var errs int
	g.OnWatchError = func(uint64, uint64, error) { errs++ }
	b := &pteWatch{fn: func(swapmem.Translation) { heard = append(heard, "b") }}
	a := &pteWatch{fn: func(swapmem.Translation) {
		heard = append(heard, "a")
		g.unwatch(b) // b's owner ends it on hearing of a
	}}
	c := &pteWatch{fn: func(swapmem.Translation) { heard = append(heard, "c") }}
	tr := swapmem.Translation{PA: 0x3000000, Present: true}
	g.tell(a, tr)
	g.fail(b, errors.New("reserved bit"))
	g.tell(c, tr)
	g.tell(a, tr) // told twice: heard once
	g.deliver()
	assert.Equal(t, []string{"a", "c"}, heard)
	assert.Zero(t, errs, "b was cancelled before its failure was told")
	assert.Empty(t, g.told)
}
