package swapmem_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
)

// Two colluding processes whose faults are taken and never served cannot
// pass the guest-wide #PF slot to each other at every Config.Timeout while
// a third address space's page waits: when the slot becomes free it is
// owed, for a while, to the space whose page has waited longest. The hogs
// run CPUID in a loop, so one of them exits right after each timeout; the
// victim exits in between, as any process does.
func TestTwoSpacesCannotKeepTheFaultSlot(t *testing.T) { faultSlotHogs(t, 2) }

// One hog alone gives way, and the victim's page is faulted in.
func TestOneHogGivesTheFaultSlotWay(t *testing.T) { faultSlotHogs(t, 1) }

func faultSlotHogs(t *testing.T, hogs int) {
	w := newWorld(t, 1)
	a, b, victim := w.m.NewSpace(), w.m.NewSpace(), w.m.NewSpace()
	for _, s := range []*swapmemtest.Space{a, b} {
		for i := uint64(0); i < 4; i++ {
			require.NoError(t, s.MapSwapped(userBase+i*4096, swapmemtest.UserRW, []byte("hog!")))
		}
	}
	require.NoError(t, victim.MapSwapped(userBase, swapmemtest.UserRW, []byte("mine")))
	ac, bc, vc := w.m.NewVCPU(0), w.m.NewVCPU(1), w.m.NewVCPU(2)
	ac.Switch(a.CR3, 3)
	bc.Switch(b.CR3, 3)
	vc.Switch(victim.CR3, 3)
	var rec recorder
	_, err := w.e.ReadData(swapmem.Request{CR3: victim.CR3, VA: userBase, Len: 4, Options: swapmem.UserFault, Done: rec.done})
	require.NoError(t, err)

	victimFaults := 0
	inject := func(c *swapmemtest.VCPU) {
		require.NoError(t, w.e.InjectPendingPF(c))
		for _, f := range w.m.Drop() {
			w.e.PFDelivered(f.VA) // taken (the hogs catch SIGSEGV), never served
			if f.CR3 == victim.CR3 {
				victimFaults++
			}
		}
	}
	for sec := 0; sec < 20; sec++ {
		// The hogs keep reads pending (asking again when theirs failed).
		for _, s := range []*swapmemtest.Space{a, b} {
			_, _ = w.e.ReadData(swapmem.Request{CR3: s.CR3, VA: userBase, Len: 4 * 4096, Options: swapmem.UserFault})
		}
		for i := 0; i < 10; i++ {
			w.e.ReinjectFailedPF()
			inject(ac)
			if hogs == 2 {
				inject(bc)
			}
			inject(vc)
			w.clk.advance(100 * time.Millisecond)
		}
	}
	assert.NotZero(t, victimFaults, "the victim's page waited 20 s; yielded %d times", w.e.Stats().Yielded)
}

// A page the free slot is owed to that stops waiting (its read removed)
// holds nobody back.
func TestRemovedReadOwesNothing(t *testing.T) {
	w := newWorld(t, 1)
	a, other := w.m.NewSpace(), w.m.NewSpace()
	require.NoError(t, a.MapSwapped(userBase, swapmemtest.UserRW, []byte("aaaa")))
	require.NoError(t, a.MapSwapped(userBase+4096, swapmemtest.UserRW, []byte("aaaa")))
	require.NoError(t, other.MapSwapped(userBase, swapmemtest.UserRW, []byte("bbbb")))
	ac, oc := w.m.NewVCPU(0), w.m.NewVCPU(1)
	ac.Switch(a.CR3, 3)
	oc.Switch(other.CR3, 3)
	// a's first page takes the slot; its second waits, the oldest.
	_, err := w.e.ReadData(swapmem.Request{CR3: a.CR3, VA: userBase, Len: 4, Options: swapmem.UserFault})
	require.NoError(t, err)
	tx, err := w.e.ReadData(swapmem.Request{CR3: a.CR3, VA: userBase + 4096, Len: 4, Options: swapmem.UserFault})
	require.NoError(t, err)
	_, err = w.e.ReadData(swapmem.Request{CR3: other.CR3, VA: userBase, Len: 4, Options: swapmem.UserFault})
	require.NoError(t, err)
	require.NoError(t, w.e.InjectPendingPF(ac))
	require.Len(t, w.m.Drop(), 1)
	// The page comes in: the slot is free and owed to a's second page,
	// whose read is then removed.
	require.NoError(t, a.Touch(userBase, false))
	require.NoError(t, w.e.RemoveTransaction(tx))
	require.NoError(t, w.e.InjectPendingPF(oc))
	q := w.m.Drop()
	require.Len(t, q, 1, "the slot stayed owed to a page nobody waits for")
	assert.Equal(t, other.CR3, q[0].CR3)
}
