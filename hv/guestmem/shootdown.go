package guestmem

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

// Shootdown makes a change to the shared EPT reach every processor that
// runs the guest before the changer relies on it. The EPT's paging
// structures live in memory all vCPUs share, but each processor caches
// translations (SDM Vol. 3C, "Caching Translation Information"), and
// INVEPT invalidates only the executing processor's caches
// ("Invalidating Cached Translation Information"). tamahv uses a
// generation check before each VM entry plus a kick:
//
//   - A changer edits the EPT entries, then calls Changed: the
//     generation goes up, the changer's own processor invalidates, and
//     every other vCPU that is in the guest and has not seen the new
//     generation is kicked (an NMI to its processor: NMI exiting makes it
//     exit). Changed returns once each other vCPU is out of the guest or
//     has seen the generation.
//   - Each vCPU, before every VM entry (Enter), marks itself in the guest
//     and then compares the generation with the one it last invalidated
//     for: if it moved, it invalidates first. At each VM exit (Exit) it
//     marks itself out.
//
// The order of the two stores and loads (the vCPU: mark, then read the
// generation; the changer: bump, then read the marks) is the
// store-then-load pattern that sequentially consistent atomics make safe:
// either the vCPU sees the new generation before it enters, or the
// changer sees the vCPU in the guest and waits for it. A vCPU out of the
// guest caches translations that nothing uses until its next entry, which
// invalidates. Without Kick, Changed waits for the vCPUs' next exit
// anyway: the VMX-preemption timer bounds that by one period.
//
// When Changed returns without giving up on a vCPU, no processor holds a
// translation from before the change: memory the change took out of the
// EPT (a table merged away, GuestPhys.Flush) may be reused from then on,
// and not before.
//
// No lock is held across VM entry; Changed spins, never sleeps, and runs
// in VMX root operation on the changer's processor, which is itself out
// of the guest, so two changers cannot wait for each other.
type Shootdown struct {
	gen  atomic.Uint64
	cpus []ShootdownCPU
	// Invalidate invalidates the EPT's cached translations on the
	// calling processor, which runs vCPU i (INVEPT single-context).
	Invalidate func(i int)
	// Kick makes vCPU i exit soon (nil: wait for its preemption timer).
	Kick func(i int)
	// Spin is called while Changed waits (nil: busy loop). A test uses
	// it to step the other vCPUs.
	Spin func()
	// Limit bounds Changed's wait for one vCPU (0: none), measured with
	// Now (nanoseconds; nil: time.Now). A vCPU that neither leaves the
	// guest nor sees the change by then (a guest that disabled the
	// kicks' local APIC and waits in a deep C-state, where the preemption
	// timer stops) is recorded (Stuck) and Changed returns: the change
	// does not hold for that vCPU, and the machine must stop the guest.
	Limit time.Duration
	Now   func() int64
	stuck atomic.Int32 // 1 + the first vCPU Changed gave up on; 0: none
}

// Stuck reports the first vCPU a change gave up waiting for (Limit).
func (s *Shootdown) Stuck() (int, bool) {
	n := s.stuck.Load()
	return int(n) - 1, n != 0
}

func (s *Shootdown) now() int64 {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now().UnixNano()
}

// ShootdownCPU is one vCPU's part of a Shootdown.
type ShootdownCPU struct {
	inGuest atomic.Uint32 // 1 in the guest, 0 out
	seen    atomic.Uint64
	kicks   atomic.Uint64
}

// ShootdownWords are the words of one vCPU's part of a Shootdown, for a
// processor that keeps them in assembly (an application processor's exit
// loop, which runs no Go): before each VM entry it stores 1 in InGuest,
// then loads Generation and, where it differs from Seen, invalidates its
// EPT translations and stores it in Seen; at each VM exit it stores 0 in
// InGuest. The stores must be sequentially consistent (XCHG, or MOV then
// MFENCE), as Enter and Exit are.
type ShootdownWords struct {
	Generation *atomic.Uint64
	Seen       *atomic.Uint64
	InGuest    *atomic.Uint32
}

// Words returns vCPU i's words, for a processor that keeps its part of
// the protocol itself instead of calling Enter and Exit.
func (s *Shootdown) Words(i int) (ShootdownWords, error) {
	c, err := s.CPU(i)
	if err != nil {
		return ShootdownWords{}, err
	}
	return ShootdownWords{Generation: &s.gen, Seen: &c.seen, InGuest: &c.inGuest}, nil
}

// InGuest reports whether vCPU i is marked in the guest.
func (c *ShootdownCPU) InGuest() bool { return c.inGuest.Load() != 0 }

// ErrNoCPU is returned for a vCPU index a Shootdown does not have.
var ErrNoCPU = errors.New("hv: no such vCPU")

// NewShootdown returns a Shootdown for n vCPUs.
func NewShootdown(n int, invalidate func(i int)) *Shootdown {
	return &Shootdown{cpus: make([]ShootdownCPU, n), Invalidate: invalidate}
}

// CPU returns vCPU i's state.
func (s *Shootdown) CPU(i int) (*ShootdownCPU, error) {
	if i < 0 || i >= len(s.cpus) {
		return nil, fmt.Errorf("%w: %d of %d", ErrNoCPU, i, len(s.cpus))
	}
	return &s.cpus[i], nil
}

// Generation returns the number of changes so far.
func (s *Shootdown) Generation() uint64 { return s.gen.Load() }

// Enter runs on vCPU i's processor just before VM entry: it marks the
// vCPU in the guest, then invalidates if the EPT changed since it last
// did. It allocates nothing.
func (s *Shootdown) Enter(i int) {
	c := &s.cpus[i]
	c.inGuest.Store(1)
	if g := s.gen.Load(); c.seen.Load() != g {
		if s.Invalidate != nil {
			s.Invalidate(i)
		}
		c.seen.Store(g)
	}
}

// Exit runs on vCPU i's processor at every VM exit.
func (s *Shootdown) Exit(i int) { s.cpus[i].inGuest.Store(0) }

// Changed runs on vCPU self's processor (out of the guest) after it
// changed the EPT: see Shootdown. It returns the number of vCPUs it
// kicked.
func (s *Shootdown) Changed(self int) int {
	g := s.gen.Add(1)
	if s.Invalidate != nil {
		s.Invalidate(self)
	}
	if self >= 0 && self < len(s.cpus) {
		s.cpus[self].seen.Store(g)
	}
	kicked := 0
	for i := range s.cpus {
		c := &s.cpus[i]
		if i == self || c.inGuest.Load() == 0 || c.seen.Load() >= g {
			continue
		}
		if s.Kick != nil {
			c.kicks.Add(1)
			s.Kick(i)
			kicked++
		}
	}
	var start int64
	for i := range s.cpus {
		c := &s.cpus[i]
		for n := 0; i != self && c.inGuest.Load() != 0 && c.seen.Load() < g; n++ {
			if s.Spin != nil {
				s.Spin()
			}
			if s.Limit == 0 || n%256 != 0 {
				continue
			}
			if start == 0 {
				start = s.now()
			} else if s.now()-start > int64(s.Limit) {
				s.stuck.CompareAndSwap(0, int32(i+1))
				break
			}
		}
	}
	return kicked
}

// Kicks returns how often vCPU i was kicked.
func (c *ShootdownCPU) Kicks() uint64 { return c.kicks.Load() }
