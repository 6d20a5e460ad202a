package guestmem

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

// TestProcessExitLeavesNoProtection runs the swapmem engine on
// Watcher: a process with a read pending exits; its read ends with an
// error once its pages have stayed unbacked for the engine's timeout (a
// zero entry alone is no proof of teardown: a live process may unmap a
// page), and every page-table page is writable again.
func TestProcessExitLeavesNoProtection(t *testing.T) {
	m := swapmemtest.NewMachine()
	p := m.NewSpace()
	const va = 0x400000
	require.NoError(t, p.MapRange(va, 8*4096, swapmemtest.UserRW))
	for i := uint64(0); i < 8; i++ {
		require.NoError(t, p.SwapOut(va+i*4096))
	}
	e, err := ept.New(&mapTables{pages: map[uint64]*[512]uint64{}, next: 0x40000000}, ept.Options{})
	require.NoError(t, err)
	require.NoError(t, e.Map(0, 0, 0x10000000, ept.RWX, ept.WriteBack))
	g := NewWatcher(&GuestPhys{Mem: machineMem{m}, EPT: e, Hole: [2]uint64{0x10000000, 0x18000000}}, 0)
	now := time.Duration(0)
	eng := swapmem.New(g, swapmem.Config{Now: func() time.Duration { return now }})
	var done []swapmem.Read
	_, err = eng.ReadData(swapmem.Request{CR3: p.CR3, VA: va + 100, Len: 8*4096 - 200, Options: swapmem.UserFault,
		Done: func(r swapmem.Read) { done = append(done, r) }})
	require.NoError(t, err)
	var steps [5]Step
	_, _, err = g.Walker.Walk(p.CR3, va, &steps)
	require.NoError(t, err)
	pt := steps[3].PA
	v, _ := vcputest.Scripted(t, []vcputest.Step{
		{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: pt, vmx.ExitQualification: 0x1aa}},
		{Reason: vmx.ExitCPUID, Regs: func(*vmx.GuestRegs) { require.NoError(t, p.Exit()) }},
		{Reason: vmx.ExitCPUID},
	})
	require.NoError(t, g.Install(v))
	require.NoError(t, v.Run())
	assert.Empty(t, done, "not taken for torn down at the first zero entry")
	for i := 0; i < 100 && len(done) == 0; i++ {
		now += 100 * time.Millisecond
		eng.ReinjectFailedPF()
	}
	require.Len(t, done, 1)
	assert.ErrorIs(t, done[0].Err, swapmem.ErrNotBacked)
	assert.Zero(t, eng.Stats().Live)
	assert.Zero(t, g.Watches())
	for pa := uint64(0); pa < 0x800000; pa += 4096 {
		_, perm, _, _, ok := e.Lookup(pa)
		require.True(t, ok)
		require.Equal(t, ept.RWX, perm, "page %#x left protected", pa)
	}
}
