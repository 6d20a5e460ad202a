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
// opened, the writing instruction single-stepped with the monitor trap
// flag, the page closed again, and every watch on it walked anew: its
// hooks follow the new walk, and its function hears of a changed
// translation. Writes the processor makes itself to set accessed and dirty
// flags are let through without a walk.
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

	pages    map[uint64]*hookedPage
	stepping uint64 // the page opened for a single-stepped write (0: none)
	adOnly   bool
	scratch  []*pteWatch
	next     Fallback

	// Counters.
	Writes, ADWrites, Changes uint64
}

// Fallback handles the EPT violations and MTF exits that are not a
// watch's.
type Fallback struct{ EPT, MTF Handler }

type hookedPage struct {
	watches []*pteWatch
	perm    ept.Perm // the permissions to restore
}

type pteWatch struct {
	cr3, va uint64
	fn      func(swapmem.Translation)
	pages   [5]uint64
	n       int
	seen    swapmem.Translation // the translation fn last heard of
	dead    bool
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
	tr, err := g.hook(w)
	if err != nil {
		return nil, err
	}
	w.seen = tr
	return func() { g.unwatch(w) }, nil
}

// Watches returns the number of paging-structure pages under protection.
func (g *GuestMemory) Watches() int { return len(g.pages) }

// hook walks w's address and protects every paging-structure page on the
// walk; it returns the translation.
func (g *GuestMemory) hook(w *pteWatch) (swapmem.Translation, error) {
	var steps [5]Step
	tr, n, err := g.Walker.Walk(w.cr3, w.va, &steps)
	if err != nil {
		return tr, err
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
				return tr, fmt.Errorf("hv: protecting page table %#x: %w", pg, err)
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
	return tr, nil
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
		if len(hp.watches) == 0 && pg != g.stepping {
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

// Install takes over v's EPT-violation and MTF exits, passing on the ones
// that are not about watched pages.
func (g *GuestMemory) Install(v *VCPU) {
	g.next = Fallback{EPT: v.handlers[vmx.ExitEPTViolation], MTF: v.handlers[vmx.ExitMonitorTrapFlag]}
	v.handlers[vmx.ExitEPTViolation] = g.onViolation
	v.handlers[vmx.ExitMonitorTrapFlag] = g.onStep
}

func (g *GuestMemory) onViolation(v *VCPU, e vmx.Exit) (Action, error) {
	gpa := v.VMCS.Read(vmx.GuestPhysAddr)
	q := ept.DecodeViolation(v.VMCS.Read(vmx.ExitQualification))
	hp := g.pages[gpa&^0xfff]
	if hp == nil || !q.Write || g.stepping != 0 {
		return g.next.EPT(v, e)
	}
	if _, err := g.EPT.Protect(gpa&^0xfff, hp.perm|ept.Read|ept.Write); err != nil {
		return Stop, err
	}
	if g.Invalidate != nil {
		g.Invalidate()
	}
	g.stepping = gpa &^ 0xfff
	g.adOnly = q.LinearValid && !q.Translation
	v.VMCS.Write(vmx.ProcControls, v.VMCS.Read(vmx.ProcControls)|vmx.ProcMonitorTrapFlag)
	return Resume, nil
}

func (g *GuestMemory) onStep(v *VCPU, e vmx.Exit) (Action, error) {
	if g.stepping == 0 {
		return g.next.MTF(v, e)
	}
	v.VMCS.Write(vmx.ProcControls, v.VMCS.Read(vmx.ProcControls)&^vmx.ProcMonitorTrapFlag)
	pg := g.stepping
	g.stepping = 0
	hp := g.pages[pg]
	if hp == nil || len(hp.watches) == 0 {
		// Every watch left while the write was in flight.
		if hp != nil {
			_, _ = g.EPT.Protect(pg, hp.perm)
			delete(g.pages, pg)
		}
	} else if _, err := g.EPT.Protect(pg, ept.Read|ept.Exec); err != nil {
		return Stop, err
	}
	if g.Invalidate != nil {
		g.Invalidate()
	}
	if g.adOnly || hp == nil {
		g.ADWrites++
		return Resume, nil
	}
	g.Writes++
	// Walk every watch on the page again: the hooks follow the new walk.
	// Calling a watch's function may add or remove watches, so work from
	// a copy.
	g.scratch = append(g.scratch[:0], hp.watches...)
	for _, w := range g.scratch {
		if w.dead {
			continue
		}
		g.unhook(w)
		tr, err := g.hook(w)
		if err != nil {
			tr = swapmem.Translation{}
		}
		if tr != w.seen {
			w.seen = tr
			g.Changes++
			w.fn(tr)
		}
	}
	return Resume, nil
}

var (
	_ swapmem.Guest = (*GuestMemory)(nil)
	_ swapmem.CPU   = (*SwapCPU)(nil)
)
