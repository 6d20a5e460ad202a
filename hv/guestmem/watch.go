// Package guestmem is the guest's memory as tamahv reaches it: guest RAM
// through EPT permissions it owns (GuestPhys, Unmapped, MapGuest, the
// Shootdown that makes each change hold on every processor), and guest
// virtual memory through the guest's own page tables (the Walker, the
// AddressSpaces of Linux's page-table isolation, and the Watcher's
// page-table-entry watches, whose stores, and those to the local APIC's
// page, it emulates with package x86emu).
package guestmem

import (
	"encoding/binary"
	"fmt"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// Watcher is the running guest's memory as swapmem sees it: page walks
// through the guest's own tables, reads of guest RAM, and page-table-entry
// watches built on EPT write protection. Every guest-physical access goes
// through Phys, which refuses anything but guest RAM: the walker reads
// paging structures through it too (NewWatcher wires that).
//
// A watch write-protects every paging-structure page on its address's
// walk. A guest write to such a page exits (EPT violation). An
// instruction's write of one of the forms Linux writes its entries with is
// emulated in that exit (ptwrite.go) and the watches on the page walked
// anew at once: their hooks follow the new walk, and their functions hear
// of a changed translation. Any other write opens the page and the guest
// goes on; at the next VM exit of any kind once the writer entered the
// guest again (the VMX-preemption timer bounds the wait) the open pages
// are closed again and the watches whose entries there changed walked
// anew. This needs no monitor trap flag, which not every processor has.
// Pages whose entries changed only in the accessed and dirty flags the
// processor sets as it walks are closed without a walk.
//
// A walk reads a paging-structure page before its protection holds on
// every processor: a store from another processor may land in between,
// and no exit would tell of it. So a watch whose walk read a page whose
// protection did not hold yet is walked again once it holds (after the
// flush that makes it hold): a changed translation is heard of, and a
// walk that now reaches other pages is hooked to them, until the walk
// reads only pages protected before it read them.
//
// Each watched page keeps its watches in an intrusive list, and each
// entry a watch's walk read keeps the watches that read it in another,
// found by the entry's guest-physical address: hooking and unhooking a
// watch cost O(levels) whatever the number of watches sharing its pages,
// and a write costs the walks of the watches that read an entry it
// changed, not of every watch on its page. The watches of one swap read
// share their page tables, 512 to a page table: the write that pages one
// page in walks one watch again, whatever the read's size.
type Watcher struct {
	// Walker walks the guest's paging structures; its Mem is Phys.
	Walker Walker
	// Phys is the guest's RAM and the owner of EPT permissions.
	Phys *GuestPhys
	// SystemCR3 is the address space of requests with CR3 0.
	System uint64
	// OnWatchError hears of a watch that could not follow the guest's new
	// walk (a paging structure outside guest RAM, a reserved bit, no EPT
	// table left): the watch has failed for good, its function heard a
	// not-present translation, and the owner should fail what waits on it.
	OnWatchError func(cr3, va uint64, err error)

	pages map[uint64]*hookedPage
	// entries are the links of the watches by the entry their walk read
	// (its guest-physical address): the first of each entry's list.
	entries map[uint64]*hookLink
	spare   []*hookedPage
	open    []openPage // pages let open for a guest write
	scratch []*pteWatch
	gen     uint64 // marks watches walked in this settle
	// epoch counts flushes: a page protected in the current epoch is not
	// yet protected on every processor.
	epoch uint64
	// confirming are the watches of a rewalk to walk again once their
	// protections hold; checked the pages settle closes, whose watches'
	// entries it compares.
	confirming []*pteWatch
	// told are the watches a rewalk found changed (or failed): their
	// functions hear of it once the rewalk is done.
	told    []*pteWatch
	checked []*hookedPage
	buf     [4096]byte // a page read by settle
	// keep is set while a watch is walked again: pages it leaves wait in
	// emptied, so that the new walk finds them still protected.
	keep    bool
	emptied []*hookedPage
	emu     ptEmulator

	// Counters. Writes counts guest writes to watched pages that were
	// settled (an instruction's, or a page opened for writes);
	// Emulated those an instruction made that were emulated in their
	// exit, Opened those that opened the page instead, and Fallbacks
	// why. Rewalks counts the watches walked again because a write
	// reached an entry their walk read. Stale counts writes refused by a
	// protection no watch holds any more (the page is opened and the
	// translations flushed); Failed counts watches that failed to follow
	// a new walk.
	Writes, ADWrites, Changes, Stale, Failed uint64
	Rewalks                                  uint64
	Emulated, Opened                         uint64
	Fallbacks                                [NumPTFallbacks]uint64
}

// NewWatcher returns the guest memory over p whose walker reads
// paging structures through p; system is the system address space.
func NewWatcher(p *GuestPhys, system uint64) *Watcher {
	return &Watcher{Walker: Walker{Mem: p}, Phys: p, System: system}
}

type hookedPage struct {
	pa      uint64
	head    *hookLink // the watches on this page
	n       int
	open    bool   // let open for a write
	written bool   // a write other than an accessed/dirty update
	epoch   uint64 // the flush epoch its protection was taken in
}

// hookLink is one watch's place on one page's list and on its entry's,
// with the entry its walk read there.
type hookLink struct {
	w            *pteWatch
	pg           *hookedPage
	prev, next   *hookLink // on pg's list
	eprev, enext *hookLink // on the entry's list (Watcher.entries)
	ent          uint64    // the entry's value
	off          uint16    // the entry's offset in the page
}

// at returns the guest-physical address of l's entry.
func (l *hookLink) at() uint64 { return l.pg.pa | uint64(l.off) }

type pteWatch struct {
	cr3, va uint64
	fn      func(swapmem.Translation)
	links   [5]hookLink
	n       int
	seen    swapmem.Translation // the translation fn last heard of
	now     swapmem.Translation // the translation of the watch's latest walk
	told    bool                // in Watcher.told
	ended   bool                // cancelled: its function hears nothing more
	dead    bool
	err     error // why the watch failed; it is deaf from then on
	gen     uint64
}

// Translate implements swapmem.Guest.
func (g *Watcher) Translate(cr3, va uint64) (swapmem.Translation, error) {
	return g.Walker.Translate(cr3, va)
}

// ReadPhys implements swapmem.Guest: guest RAM only.
func (g *Watcher) ReadPhys(pa uint64, p []byte) error { return g.Phys.ReadPhys(pa, p) }

// SystemCR3 implements swapmem.Guest.
func (g *Watcher) SystemCR3() uint64 { return g.System }

// Watch implements swapmem.Guest. The translation a new watch starts from
// is the one its walk finds once its protections hold.
func (g *Watcher) Watch(cr3, va uint64, changed func(swapmem.Translation)) (func(), error) {
	w := &pteWatch{cr3: cr3, va: va, fn: changed}
	tr, fresh, err := g.hook(w)
	for round := 0; err == nil && fresh && round < confirmRounds; round++ {
		g.flush()
		if tr, fresh, err = g.recheck(w); err != nil {
			g.unhook(w)
		}
	}
	g.flush()
	if err != nil {
		return nil, err
	}
	w.seen, w.now = tr, tr
	return func() { g.unwatch(w) }, nil
}

// Watches returns the number of paging-structure pages under protection.
func (g *Watcher) Watches() int { return len(g.pages) }

// hook walks w's address and protects every paging-structure page on the
// walk. It returns the translation, and whether the walk read a page whose
// protection does not hold yet (taken since the last flush): the walk is
// then to be confirmed once it does (recheck). The caller flushes.
func (g *Watcher) hook(w *pteWatch) (swapmem.Translation, bool, error) {
	var steps [5]Step
	tr, n, err := g.Walker.Walk(w.cr3, w.va, &steps)
	if err != nil {
		return tr, false, err
	}
	fresh, err := g.link(w, steps[:n])
	return tr, fresh, err
}

// link hooks w to the pages of its walk's steps, protecting those no
// watch holds yet, and reports whether one of them was protected since
// the last flush.
func (g *Watcher) link(w *pteWatch, steps []Step) (bool, error) {
	if g.pages == nil {
		g.pages = map[uint64]*hookedPage{}
		g.entries = map[uint64]*hookLink{}
	}
	w.n = 0
	fresh := false
	for _, s := range steps {
		pg := s.PA &^ 0xfff
		hp := g.pages[pg]
		if hp == nil {
			if err := g.Phys.WriteProtect(pg); err != nil {
				g.unhook(w)
				return false, fmt.Errorf("hv: protecting page table %#x: %w", pg, err)
			}
			hp = g.newPage(pg)
		}
		fresh = fresh || hp.epoch == g.epoch
		l := &w.links[w.n]
		*l = hookLink{w: w, pg: hp, next: hp.head, ent: s.Entry, off: uint16(s.PA & 0xfff)}
		if hp.head != nil {
			hp.head.prev = l
		}
		hp.head = l
		hp.n++
		if l.enext = g.entries[s.PA]; l.enext != nil {
			l.enext.eprev = l
		}
		g.entries[s.PA] = l
		w.n++
	}
	return fresh, nil
}

func (g *Watcher) newPage(pg uint64) *hookedPage {
	var hp *hookedPage
	if n := len(g.spare); n > 0 {
		hp, g.spare = g.spare[n-1], g.spare[:n-1]
	} else {
		hp = new(hookedPage)
	}
	*hp = hookedPage{pa: pg, epoch: g.epoch}
	g.pages[pg] = hp
	return hp
}

// drop forgets a page no watch needs and gives its protection back.
func (g *Watcher) drop(hp *hookedPage) {
	delete(g.pages, hp.pa)
	_ = g.Phys.Unprotect(hp.pa)
	g.spare = append(g.spare, hp)
}

// unhook takes w off its pages, in O(1) each, dropping the pages no watch
// needs. The caller flushes.
func (g *Watcher) unhook(w *pteWatch) {
	for i := range w.links[:w.n] {
		l := &w.links[i]
		hp := l.pg
		if l.prev != nil {
			l.prev.next = l.next
		} else {
			hp.head = l.next
		}
		if l.next != nil {
			l.next.prev = l.prev
		}
		switch {
		case l.eprev != nil:
			l.eprev.enext = l.enext
		case l.enext != nil:
			g.entries[l.at()] = l.enext
		default:
			delete(g.entries, l.at())
		}
		if l.enext != nil {
			l.enext.eprev = l.eprev
		}
		*l = hookLink{}
		if hp.n--; hp.n == 0 && !hp.open {
			if g.keep {
				g.emptied = append(g.emptied, hp)
			} else {
				g.drop(hp)
			}
		}
	}
	w.n = 0
}

// rehook walks w again, as hook does. A walk over the same pages keeps
// the hooks, with the entries it read (a page paged in or out, the
// common write). Otherwise the pages of its old walk stay protected
// until the new walk is hooked, so a watch alone on its pages does not
// give their protection back only to take it again (an EPT merge, a
// split and an INVEPT for each).
func (g *Watcher) rehook(w *pteWatch) (swapmem.Translation, bool, error) {
	var steps [5]Step
	tr, n, err := g.Walker.Walk(w.cr3, w.va, &steps)
	fresh, err := g.follow(w, steps[:n], err)
	return tr, fresh, err
}

// follow hooks w to the walk that read steps (or failed with err), as
// rehook says, and reports whether that walk is to be confirmed.
func (g *Watcher) follow(w *pteWatch, steps []Step, err error) (bool, error) {
	if err == nil && g.same(w, steps) {
		fresh := false
		for i, s := range steps {
			l := &w.links[i]
			l.ent = s.Entry
			fresh = fresh || l.pg.epoch == g.epoch
		}
		return fresh, nil
	}
	g.keep = true
	g.unhook(w)
	fresh := false
	if err == nil {
		fresh, err = g.link(w, steps)
	}
	g.keep = false
	for _, hp := range g.emptied {
		if hp.n == 0 && !hp.open && g.pages[hp.pa] == hp {
			g.drop(hp)
		}
	}
	clear(g.emptied)
	g.emptied = g.emptied[:0]
	return fresh, err
}

// confirmRounds bounds the walks that confirm a hooked walk. Each round
// reads one more level from pages protected before the walk read them, so
// a 5-level walk is confirmed by the fifth; a walk that still changes
// then runs through a page let open for a write, whose watches settle
// walks again at the next exit.
const confirmRounds = 6

// recheck walks w again once the protections of its hooked walk hold. A
// walk over the same pages keeps the hooks (with the entries it read); one
// that reaches other pages is hooked anew, and recheck reports, as hook
// does, whether that walk is to be confirmed in turn. On an error w may
// still be hooked.
func (g *Watcher) recheck(w *pteWatch) (swapmem.Translation, bool, error) {
	var steps [5]Step
	tr, n, err := g.Walker.Walk(w.cr3, w.va, &steps)
	if err != nil {
		return tr, false, err
	}
	fresh, err := g.follow(w, steps[:n], nil)
	return tr, fresh, err
}

// same reports whether a walk of w read its entries on the pages w is
// hooked to, level by level (the page of each level gives the entry: its
// offset is the address's index at that level).
func (g *Watcher) same(w *pteWatch, steps []Step) bool {
	if len(steps) != w.n {
		return false
	}
	for i, s := range steps {
		if s.PA&^0xfff != w.links[i].pg.pa {
			return false
		}
	}
	return true
}

// readers adds to g.scratch the watches whose walk read an entry that
// the n bytes written at gpa overlap.
func (g *Watcher) readers(gpa uint64, n int) {
	for ea := gpa &^ 7; ea < gpa+uint64(n); ea += 8 {
		for l := g.entries[ea]; l != nil; l = l.enext {
			g.scratch = append(g.scratch, l.w)
		}
	}
}

// flush makes the EPT changes so far hold on every processor: the
// protections taken before it hold from then on.
func (g *Watcher) flush() {
	g.Phys.Flush()
	g.epoch++
}

// tell gives w's function a translation that differs from the last it
// heard.
func (g *Watcher) tell(w *pteWatch, tr swapmem.Translation) {
	w.now = tr
	if !w.told {
		w.told = true
		g.told = append(g.told, w)
	}
}

// deliver gives each watch in g.told its new translation, and the owner
// of each that failed the error, now that the rewalk is done: the
// watches' hooks and pages are settled, and a function may add or end
// watches.
func (g *Watcher) deliver() {
	for i := 0; i < len(g.told); i++ {
		w := g.told[i]
		w.told = false
		if w.ended {
			continue // cancelled by an earlier function of this delivery
		}
		if w.now != w.seen {
			w.seen = w.now
			g.Changes++
			w.fn(w.now)
		}
		if w.err != nil && g.OnWatchError != nil {
			err := w.err
			w.err = nil // heard once
			g.OnWatchError(w.cr3, w.va, fmt.Errorf("hv: watch of %#x in CR3 %#x: %w", w.va, w.cr3, err))
		}
	}
	clear(g.told)
	g.told = g.told[:0]
}

// unwatch ends w. The protections it gives back are relaxations: a
// processor that still caches one takes a write exit that reopens the
// page, so they reach the processors with the next flush, which Sync makes
// at the latest. A read that ends gives back its watches' page tables in
// one shootdown, not one for each.
func (g *Watcher) unwatch(w *pteWatch) {
	w.ended = true
	if w.dead {
		return
	}
	w.dead = true
	g.unhook(w)
}

// Sync makes the EPT changes not flushed yet (watches ended since the last
// flush) hold on every processor. Call it before every VM entry, after
// whatever may end watches in that exit: the exit's changes then cost one
// shootdown.
func (g *Watcher) Sync() { g.flush() }

// Install intercepts v's EPT-violation exits, passing on the ones that are
// not about watched pages, and observes every exit to settle open pages.
func (g *Watcher) Install(v *hv.VCPU) error {
	v.Observe(func(v *hv.VCPU, e *vmx.Exit) {
		if len(g.open) != 0 { // the common exit: one compare
			g.settle(v, e)
		}
	})
	// A page open for v's write closes at v's next exit.
	v.NeedExit(func(v *hv.VCPU) bool {
		for _, o := range g.open {
			if o.by == v {
				return true
			}
		}
		return false
	})
	return v.Intercept(vmx.ExitEPTViolation, g.onViolation)
}

func (g *Watcher) onViolation(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
	gpa := e.GuestPA
	q := ept.DecodeViolation(e.Qualification)
	pg := gpa &^ 0xfff
	hp := g.pages[pg]
	if hp == nil && q.Write {
		// No watch protects this page: on guest RAM that nothing of
		// tamahv's owns, a write fault comes from a cached translation
		// that outlived its protection. Open the page and flush.
		reopened, err := g.Phys.reopen(pg)
		if err != nil {
			return hv.Stop, err
		}
		if reopened {
			g.Stale++
			return hv.Resume, nil
		}
	}
	if hp == nil || !q.Write {
		return next(v, e)
	}
	// An instruction's write (not the processor's accessed/dirty update
	// during a page walk) is emulated where it can be.
	if q.Translation {
		why, ok := g.emulateWrite(v, e)
		if ok {
			g.Emulated++
			return hv.Resume, nil
		}
		g.Opened++
		g.Fallbacks[why]++
	}
	if !hp.open {
		if err := g.Phys.SetWritable(pg, true); err != nil {
			return hv.Stop, err
		}
		g.flush()
		hp.open = true
		g.open = append(g.open, openPage{pg: pg, by: v, at: v.Entries(), rip: e.RIP})
	}
	// The processor's own accessed/dirty updates are walk accesses.
	if !(q.LinearValid && !q.Translation) {
		hp.written = true
	}
	return hv.Resume, nil
}

// settle closes the open pages and walks again the watches whose entries
// the guest changed there. Once a page is closed again, the entries its
// watches read there are compared with what it holds, and the watches
// whose entry changed, but for the accessed and dirty flags the
// processor sets as it walks, are walked: the page's writer, or another
// processor, may have written any of its entries while it was open, and
// a watch whose entries all read as before translates as before. It runs
// at the start of every VM exit, before the exit is handled. A page
// opened for a vCPU stays open until that vCPU entered the guest again
// (and, with it, made its write): closed at its own next exit or at
// another vCPU's after that. Its cost is a read of each page and a
// compare for each watch on it, and a walk for each watch whose entry
// changed.
func (g *Watcher) settle(v *hv.VCPU, e *vmx.Exit) {
	if len(g.open) == 0 {
		return
	}
	g.scratch = g.scratch[:0]
	g.checked = g.checked[:0]
	left := g.open[:0]
	for _, o := range g.open {
		if o.by != v && o.by.Entries() == o.at || o.by == v && interrupted(e, o.rip) {
			// Its vCPU has not entered the guest since the page was
			// opened for it: closing it now would fault the write again,
			// and another vCPU that exits often would keep it from ever
			// being made.
			left = append(left, o)
			continue
		}
		pg := o.pg
		hp := g.pages[pg]
		if hp == nil {
			continue
		}
		hp.open = false
		if hp.n == 0 {
			g.drop(hp)
			continue
		}
		_ = g.Phys.SetWritable(pg, false)
		if hp.written {
			g.Writes++
		} else {
			g.ADWrites++
		}
		g.checked = append(g.checked, hp)
		hp.written = false
	}
	clear(g.open[len(left):])
	g.open = left
	g.flush()
	for _, hp := range g.checked {
		g.moved(hp)
	}
	clear(g.checked)
	g.rewalk()
}

// openPage is a page let open for a guest write of vCPU by, at its entry
// count at, by the instruction at rip.
type openPage struct {
	pg  uint64
	by  *hv.VCPU
	at  uint64
	rip uint64
}

// interrupted reports whether exit e of the vCPU that a page was opened
// for came before the writing instruction at rip completed: a
// preemption-timer exit or an NMI (an entry cut short, a kick) at that
// same instruction. The page stays open for it.
func interrupted(e *vmx.Exit, rip uint64) bool {
	if e == nil || e.RIP != rip {
		return false
	}
	if e.Reason == vmx.ExitPreemptionTimer {
		return true
	}
	ev, ok := vmx.DecodeEvent(e.Interruption, 0)
	return e.Reason == vmx.ExitExceptionOrNMI && ok && ev.Type == vmx.EventNMI
}

// moved adds to g.scratch the watches on hp whose entry there differs
// from the one their walk read, but for accessed and dirty flags; all of
// them when the page cannot be read.
func (g *Watcher) moved(hp *hookedPage) {
	err := g.Phys.ReadPhys(hp.pa, g.buf[:])
	for l := hp.head; l != nil; l = l.next {
		if err != nil || !sameEntry(binary.LittleEndian.Uint64(g.buf[l.off:]), l.ent) {
			g.scratch = append(g.scratch, l.w)
		}
	}
}

// rewalk walks every watch in g.scratch again: the hooks follow the new
// walk, and, once every walk and its confirmation are done, a watch's
// function hears of a changed translation (deliver). The
// watches whose new walk reached a page protected anew are walked once
// more when the protections hold (confirm). A watch's function may add or
// remove watches; the list is a copy, and removed watches are marked dead.
func (g *Watcher) rewalk() {
	g.gen++
	g.confirming = g.confirming[:0]
	for _, w := range g.scratch {
		if w.dead || w.gen == g.gen {
			continue
		}
		w.gen = g.gen
		g.Rewalks++
		tr, fresh, err := g.rehook(w)
		if err != nil {
			g.fail(w, err)
			continue
		}
		if fresh {
			g.confirming = append(g.confirming, w)
		}
		g.tell(w, tr)
	}
	g.confirm()
	g.deliver()
}

// confirm flushes, then walks the watches in g.confirming again now that
// their protections hold: a watch hears of a translation that changed
// between its walk and its protection, and a walk that reaches other
// pages by now is hooked to them and confirmed in the next round.
func (g *Watcher) confirm() {
	ws := g.confirming
	for round := 0; round < confirmRounds && len(ws) > 0; round++ {
		g.flush()
		next := ws[:0]
		for _, w := range ws {
			if w.dead {
				continue
			}
			tr, again, err := g.recheck(w)
			if err != nil {
				g.unhook(w)
				g.fail(w, err)
				continue
			}
			if again {
				next = append(next, w)
			}
			g.tell(w, tr)
		}
		ws = next
	}
	clear(g.confirming)
	g.confirming = g.confirming[:0]
	g.flush()
}

// fail ends a watch that could not follow its walk: it holds no page any
// more, its function hears that the translation is gone, and its owner
// hears why.
func (g *Watcher) fail(w *pteWatch, err error) {
	w.err = err
	w.dead = true
	g.Failed++
	g.tell(w, swapmem.Translation{})
}

var (
	_ swapmem.Guest = (*Watcher)(nil)
)
