package hv

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// GuestMemory is the running guest's memory as swapmem sees it: page walks
// through the guest's own tables, reads of guest RAM, and page-table-entry
// watches built on EPT write protection.
//
// A watch write-protects every paging-structure page on its address's
// walk. A guest write to such a page exits (EPT violation); the page is
// opened and the guest goes on. At the next VM exit of any kind (the
// VMX-preemption timer bounds the wait) the open pages are closed again
// and every watch on them walked anew: its hooks follow the new walk, and
// its function hears of a changed translation. This needs no monitor trap
// flag, which not every processor has. Pages opened only for the
// processor's own accessed and dirty flag updates are closed without a
// walk.
type GuestMemory struct {
	Walker Walker
	Mem    PhysReader
	EPT    *ept.EPT
	// Invalidate flushes EPT-derived translations after a permission
	// change (INVEPT).
	Invalidate func()
	// Hole is tamahv's own memory: reads of it fail.
	Hole [2]uint64
	// SystemCR3 is the address space of requests with CR3 0.
	System uint64
	// OnGone hears of an address space whose watched mapping was torn
	// down (an entry on the walk rewritten to zero, as when a process
	// exits); it runs after the watches were walked.
	OnGone func(cr3 uint64)

	pages   map[uint64]*hookedPage
	open    []uint64 // pages let open for a guest write
	scratch []*pteWatch
	gone    []uint64
	gen     uint64 // marks watches walked in this settle
	next    Handler

	// Counters. Stale counts writes refused by a protection no watch
	// holds any more (the page is opened and the translations flushed).
	Writes, ADWrites, Changes, Stale uint64
}

type hookedPage struct {
	watches []*pteWatch
	perm    ept.Perm // the permissions to restore
	open    bool     // let open for a write
	written bool     // a write other than an accessed/dirty update
}

type pteWatch struct {
	cr3, va uint64
	fn      func(swapmem.Translation)
	pages   [5]uint64
	n       int
	seen    swapmem.Translation // the translation fn last heard of
	dead    bool
	gen     uint64
}

// ErrHole is returned for reads of tamahv's memory.
var ErrHole = errors.New("hv: address in tamahv's memory")

// Translate implements swapmem.Guest.
func (g *GuestMemory) Translate(cr3, va uint64) (swapmem.Translation, error) {
	return g.Walker.Translate(cr3, va)
}

// ReadPhys implements swapmem.Guest; tamahv's own memory is refused.
func (g *GuestMemory) ReadPhys(pa uint64, p []byte) error {
	if overlaps(pa, uint64(len(p)), g.Hole[0], g.Hole[1]-g.Hole[0]) {
		return fmt.Errorf("%w: %#x+%#x", ErrHole, pa, len(p))
	}
	return g.Mem.ReadPhys(pa, p)
}

// SystemCR3 implements swapmem.Guest.
func (g *GuestMemory) SystemCR3() uint64 { return g.System }

// Watch implements swapmem.Guest.
func (g *GuestMemory) Watch(cr3, va uint64, changed func(swapmem.Translation)) (func(), error) {
	w := &pteWatch{cr3: cr3, va: va, fn: changed}
	tr, _, err := g.hook(w)
	if err != nil {
		return nil, err
	}
	w.seen = tr
	return func() { g.unwatch(w) }, nil
}

// Watches returns the number of paging-structure pages under protection.
func (g *GuestMemory) Watches() int { return len(g.pages) }

// hook walks w's address and protects every paging-structure page on the
// walk; it returns the translation and the entry that ended the walk.
func (g *GuestMemory) hook(w *pteWatch) (swapmem.Translation, uint64, error) {
	var steps [5]Step
	tr, n, err := g.Walker.Walk(w.cr3, w.va, &steps)
	if err != nil {
		return tr, 0, err
	}
	if g.pages == nil {
		g.pages = map[uint64]*hookedPage{}
	}
	w.n = 0
	changed := false
	for _, s := range steps[:n] {
		pg := s.PA &^ 0xfff
		hp := g.pages[pg]
		if hp == nil {
			old, err := g.EPT.Protect(pg, ept.Read|ept.Exec)
			if err != nil {
				g.unhook(w)
				return tr, 0, fmt.Errorf("hv: protecting page table %#x: %w", pg, err)
			}
			hp = &hookedPage{perm: old}
			g.pages[pg] = hp
			changed = true
		}
		hp.watches = append(hp.watches, w)
		w.pages[w.n] = pg
		w.n++
	}
	if changed && g.Invalidate != nil {
		g.Invalidate()
	}
	last := uint64(0)
	if n > 0 {
		last = steps[n-1].Entry
	}
	return tr, last, nil
}

// unhook drops w from its pages, opening the pages no watch needs.
func (g *GuestMemory) unhook(w *pteWatch) {
	changed := false
	for _, pg := range w.pages[:w.n] {
		hp := g.pages[pg]
		if hp == nil {
			continue
		}
		for i, x := range hp.watches {
			if x == w {
				hp.watches = append(hp.watches[:i], hp.watches[i+1:]...)
				break
			}
		}
		if len(hp.watches) == 0 && !hp.open {
			_, _ = g.EPT.Protect(pg, hp.perm)
			delete(g.pages, pg)
			changed = true
		}
	}
	w.n = 0
	if changed && g.Invalidate != nil {
		g.Invalidate()
	}
}

func (g *GuestMemory) unwatch(w *pteWatch) {
	if w.dead {
		return
	}
	w.dead = true
	g.unhook(w)
}

// Install takes over v's EPT-violation exits, passing on the ones that are
// not about watched pages, and settles open pages at every exit.
func (g *GuestMemory) Install(v *VCPU) {
	g.next = v.handlers[vmx.ExitEPTViolation]
	v.handlers[vmx.ExitEPTViolation] = g.onViolation
	v.OnExit = g.settle
}

func (g *GuestMemory) onViolation(v *VCPU, e vmx.Exit) (Action, error) {
	gpa := v.VMCS.Read(vmx.GuestPhysAddr)
	q := ept.DecodeViolation(v.VMCS.Read(vmx.ExitQualification))
	pg := gpa &^ 0xfff
	hp := g.pages[pg]
	if hp == nil && q.Write && !overlaps(pg, 0x1000, g.Hole[0], g.Hole[1]-g.Hole[0]) {
		// No watch protects this page (any more): a write fault here
		// comes from a protection or a cached translation that outlived
		// its watch. Open the page and flush.
		if _, _, _, _, ok := g.EPT.Lookup(pg); ok {
			if _, err := g.EPT.Protect(pg, ept.RWX); err != nil {
				return Stop, err
			}
			if g.Invalidate != nil {
				g.Invalidate()
			}
			g.Stale++
			return Resume, nil
		}
	}
	if hp == nil || !q.Write {
		return g.next(v, e)
	}
	if !hp.open {
		if _, err := g.EPT.Protect(pg, hp.perm|ept.Read|ept.Write); err != nil {
			return Stop, err
		}
		if g.Invalidate != nil {
			g.Invalidate()
		}
		hp.open = true
		g.open = append(g.open, pg)
	}
	// The processor's own accessed/dirty updates are walk accesses.
	if !(q.LinearValid && !q.Translation) {
		hp.written = true
	}
	return Resume, nil
}

// settle closes the open pages and walks again the watches on pages the
// guest wrote. It runs at the start of every VM exit, before the exit is
// handled, while the guest is stopped.
func (g *GuestMemory) settle(v *VCPU, _ vmx.Exit) {
	if len(g.open) == 0 {
		return
	}
	g.scratch = g.scratch[:0]
	for _, pg := range g.open {
		hp := g.pages[pg]
		if hp == nil {
			continue
		}
		hp.open = false
		if len(hp.watches) == 0 {
			_, _ = g.EPT.Protect(pg, hp.perm)
			delete(g.pages, pg)
			continue
		}
		_, _ = g.EPT.Protect(pg, ept.Read|ept.Exec)
		if hp.written {
			g.Writes++
			g.scratch = append(g.scratch, hp.watches...)
		} else {
			g.ADWrites++
		}
		hp.written = false
	}
	g.open = g.open[:0]
	if g.Invalidate != nil {
		g.Invalidate()
	}
	// Walk every watch on a written page again: the hooks follow the new
	// walk. A watch's function may add or remove watches; the list is a
	// copy, and removed watches are marked dead.
	g.gen++
	for _, w := range g.scratch {
		if w.dead || w.gen == g.gen {
			continue
		}
		w.gen = g.gen
		g.unhook(w)
		tr, last, err := g.hook(w)
		if err != nil {
			tr = swapmem.Translation{}
		}
		if !tr.Present && last == 0 && !containsU64(g.gone, w.cr3) {
			g.gone = append(g.gone, w.cr3)
		}
		if tr != w.seen {
			w.seen = tr
			g.Changes++
			w.fn(tr)
		}
	}
	for _, cr3 := range g.gone {
		if g.OnGone != nil {
			g.OnGone(cr3)
		}
	}
	g.gone = g.gone[:0]
}

func containsU64(s []uint64, v uint64) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

var (
	_ swapmem.Guest = (*GuestMemory)(nil)
	_ swapmem.CPU   = (*SwapCPU)(nil)
)
