package guestmem

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeTLBs is the EPT's version and each processor's cached copy of it,
// as INVEPT on that processor last loaded it.
type fakeTLBs struct {
	ept   atomic.Uint64
	cache []atomic.Uint64
}

func newFakeTLBs(n int) *fakeTLBs { return &fakeTLBs{cache: make([]atomic.Uint64, n)} }

func (f *fakeTLBs) invalidate(i int) { f.cache[i].Store(f.ept.Load()) }

func TestShootdownWaitsForTheKickedVCPU(t *testing.T) {
	tlb := newFakeTLBs(2)
	s := NewShootdown(2, tlb.invalidate)
	s.Enter(1) // vCPU 1 runs the guest with version 0 cached
	var order []string
	s.Kick = func(i int) {
		order = append(order, "kick")
		assert.Equal(t, 1, i)
	}
	spins := 0
	s.Spin = func() {
		spins++
		if spins == 3 { // the NMI arrives: vCPU 1 exits
			order = append(order, "exit")
			s.Exit(1)
		}
	}
	tlb.ept.Add(1)
	assert.Equal(t, 1, s.Changed(0))
	order = append(order, "returned")
	assert.Equal(t, []string{"kick", "exit", "returned"}, order, "Changed waits for the exit")
	assert.Equal(t, uint64(1), tlb.cache[0].Load(), "the changer invalidated its own")
	assert.Equal(t, uint64(0), tlb.cache[1].Load(), "vCPU 1 is out of the guest: stale but unused")
	s.Enter(1)
	assert.Equal(t, uint64(1), tlb.cache[1].Load(), "and invalidates before it enters again")
	c, err := s.CPU(1)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), c.Kicks())
}

func TestShootdownWithoutKickWaitsForTheTimer(t *testing.T) {
	tlb := newFakeTLBs(2)
	s := NewShootdown(2, tlb.invalidate)
	s.Enter(1)
	exited := false
	s.Spin = func() { // the preemption timer fires
		exited = true
		s.Exit(1)
	}
	tlb.ept.Add(1)
	assert.Zero(t, s.Changed(0))
	assert.True(t, exited)
}

func TestShootdownSkipsVCPUsOutOfTheGuestOrUpToDate(t *testing.T) {
	tlb := newFakeTLBs(3)
	s := NewShootdown(3, tlb.invalidate)
	s.Kick = func(i int) { t.Errorf("vCPU %d kicked", i) }
	s.Spin = func() { t.Fatal("Changed waited") }
	s.Enter(1)
	s.Exit(1) // out of the guest
	tlb.ept.Add(1)
	s.Changed(0)
	s.Enter(2) // entered after the change: saw it
	assert.Equal(t, uint64(1), tlb.cache[2].Load())
	tlb.ept.Add(1)
	s.Exit(2)
	s.Changed(0)
	s.Enter(1)
	assert.Equal(t, uint64(2), tlb.cache[1].Load())
	assert.Equal(t, uint64(2), s.Generation())
}

func TestShootdownEnterWithoutChangeDoesNotInvalidate(t *testing.T) {
	n := 0
	s := NewShootdown(1, func(int) { n++ })
	for range 5 {
		s.Enter(0)
		s.Exit(0)
	}
	assert.Zero(t, n)
	_, err := s.CPU(1)
	assert.ErrorIs(t, err, ErrNoCPU)
}

// TestShootdownConcurrent runs vCPUs that enter and exit while two of
// them change the EPT: no vCPU is ever in the guest with a cached version
// older than a change whose Changed has returned.
func TestShootdownConcurrent(t *testing.T) {
	const vcpus, rounds, changes = 4, 2000, 200
	tlb := newFakeTLBs(vcpus)
	s := NewShootdown(vcpus, tlb.invalidate)
	var done atomic.Uint64 // the newest version whose Changed returned
	var kick [vcpus]atomic.Bool
	s.Kick = func(i int) { kick[i].Store(true) }
	var changeMu sync.Mutex // changes of the EPT itself are serialised, as the EPT's owner does
	var wg sync.WaitGroup
	for i := range vcpus {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				s.Enter(i)
				// In the guest: what it may rely on.
				if d := done.Load(); tlb.cache[i].Load() < d {
					t.Errorf("vCPU %d in the guest with version %d after %d was shot down", i, tlb.cache[i].Load(), d)
				}
				kick[i].Store(false)
				s.Exit(i)
				if i < 2 && r%(rounds/changes) == 0 {
					changeMu.Lock()
					v := tlb.ept.Add(1)
					s.Changed(i)
					if done.Load() < v {
						done.Store(v)
					}
					changeMu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	assert.Equal(t, uint64(2*changes), s.Generation())
}

// TestShootdownGivesUpOnAStuckVCPU: a vCPU that never leaves the guest
// (no kick reaches it, its timer stopped) holds Changed only up to Limit;
// the change is then recorded as not holding for it.
func TestShootdownGivesUpOnAStuckVCPU(t *testing.T) {
	tlb := newFakeTLBs(3)
	s := NewShootdown(3, tlb.invalidate)
	s.Enter(2)
	var clock int64
	s.Now = func() int64 { return clock }
	s.Spin = func() { clock += int64(time.Millisecond) }
	s.Limit = time.Second
	_, stuck := s.Stuck()
	require.False(t, stuck)
	tlb.ept.Add(1)
	s.Changed(0)
	i, stuck := s.Stuck()
	assert.True(t, stuck)
	assert.Equal(t, 2, i)
	assert.Less(t, clock, int64(2*time.Second), "gave up at the limit")
}
