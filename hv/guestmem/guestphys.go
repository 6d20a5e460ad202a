package guestmem

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
)

// GuestPhys is the guest's physical memory as tamahv may touch it, and the
// one owner of the guest's EPT entries once MapGuest has built them.
//
// Every guest-physical address tamahv reads, writes or maps on the
// guest's behalf (paging-structure entries, hypercall arguments, the
// breakpoint agent's detour) goes through Check: it must be guest RAM,
// that is mapped by the EPT write-back and one to one, and lie outside
// Hole, tamahv's own memory. That refuses tamahv's region and the sink
// (the sink is tamahv memory, shown at the hole's guest-physical
// addresses), MMIO and firmware (uncached) and anything unmapped.
//
// EPT permission changes go through it too, so that their users compose:
// write protections are counted per page and the page's own permissions
// come back when the last is released; a page claimed by the breakpoint
// agent cannot be write-protected and the agent cannot claim a protected
// page. When a page is back to what it was, the tables split for it are
// merged back and freed, so protections can come and go without end.
//
// A GuestPhys is not safe for concurrent use: the vCPU that handles an
// exit, and swapmem under its lock, use it one at a time.
type GuestPhys struct {
	// Mem is host-physical memory (the board's one-to-one map).
	Mem hv.Memory
	// EPT is the guest's EPT, mapped by MapGuest.
	EPT *ept.EPT
	// Hole is tamahv's own memory, [start, end).
	Hole [2]uint64
	// Invalidate flushes EPT-derived translations (INVEPT) on every
	// processor that runs the guest; Flush calls it after permission
	// changes.
	Invalidate func()
	// Invalidated reports whether every Invalidate so far has reached
	// each processor that runs the guest (nil: each has). EPT tables
	// merged away wait until one has: a processor the invalidation
	// missed may still walk them.
	Invalidated func() bool

	pages map[uint64]*ownedPage
	spare []*ownedPage
	dirty bool

	// Freed counts EPT tables merged back and given back to the page
	// arena after the invalidation.
	Freed uint64
}

// ownedPage is a guest page whose EPT entry tamahv changed.
type ownedPage struct {
	base    ept.Perm // the permissions before tamahv changed them
	protect int      // write protections held
	claimed bool     // the breakpoint agent's
	target  uint64   // claimed: the host page shown (0: the page itself)
	noexec  bool     // a fetch trap (TrapFetch): execute permission taken
}

// Errors of guest-physical accesses.
var (
	// ErrHole is returned for addresses in tamahv's memory.
	ErrHole = errors.New("hv: address in tamahv's memory")
	// ErrNotRAM is returned for addresses that are not guest RAM mapped
	// one to one (MMIO, firmware, unmapped, beyond the address space).
	ErrNotRAM = errors.New("hv: guest-physical address is not guest RAM")
	// ErrPageInUse is returned when a page's EPT entry already serves
	// another user (a watched page table and the agent's detour).
	ErrPageInUse = errors.New("hv: the page's EPT entry already has another use")
)

// Check reports whether the n bytes at gpa are guest RAM that tamahv may
// read, write or map for the guest.
func (g *GuestPhys) Check(gpa, n uint64) error {
	if n == 0 {
		return nil
	}
	end := gpa + n
	if end < gpa {
		return fmt.Errorf("%w: %#x+%#x wraps", ErrNotRAM, gpa, n)
	}
	if overlaps(gpa, n, g.Hole[0], g.Hole[1]-g.Hole[0]) {
		return fmt.Errorf("%w: %#x+%#x", ErrHole, gpa, n)
	}
	for cur := gpa &^ 0xfff; cur < end; {
		hpa, _, mt, size, ok := g.EPT.Lookup(cur)
		if !ok {
			return fmt.Errorf("%w: %#x is not mapped", ErrNotRAM, cur)
		}
		if p := g.pages[cur]; p != nil && p.target != 0 && size == ept.Size4K {
			hpa = cur // the agent shows another page there; the guest's own is home
		}
		if mt != ept.WriteBack || hpa != cur {
			return fmt.Errorf("%w: %#x maps host %#x, type %d", ErrNotRAM, cur, hpa, mt)
		}
		cur = cur&^(size-1) + size
	}
	return nil
}

// ReadPhys reads guest RAM at pa.
func (g *GuestPhys) ReadPhys(pa uint64, p []byte) error {
	if err := g.Check(pa, uint64(len(p))); err != nil {
		return err
	}
	return g.Mem.ReadPhys(pa, p)
}

// WritePhys writes guest RAM at pa.
func (g *GuestPhys) WritePhys(pa uint64, p []byte) error {
	if err := g.Check(pa, uint64(len(p))); err != nil {
		return err
	}
	return g.Mem.WritePhys(pa, p)
}

// CopyPhys copies n bytes of guest RAM from src to dst.
func (g *GuestPhys) CopyPhys(dst, src, n uint64) error {
	if err := g.Check(dst, n); err != nil {
		return err
	}
	if err := g.Check(src, n); err != nil {
		return err
	}
	return g.Mem.CopyPhys(dst, src, n)
}

// page returns the owned page at pg, making it with the entry's current
// permissions.
func (g *GuestPhys) page(pg uint64) *ownedPage {
	if p := g.pages[pg]; p != nil {
		return p
	}
	if g.pages == nil {
		g.pages = map[uint64]*ownedPage{}
	}
	var p *ownedPage
	if n := len(g.spare); n > 0 {
		p, g.spare = g.spare[n-1], g.spare[:n-1]
	} else {
		p = new(ownedPage)
	}
	_, perm, _, _, _ := g.EPT.Lookup(pg)
	*p = ownedPage{base: perm}
	g.pages[pg] = p
	return p
}

// restore puts pg's entry back as it was, forgets the page and frees the
// tables split for it.
func (g *GuestPhys) restore(pg uint64, p *ownedPage) error {
	delete(g.pages, pg)
	g.spare = append(g.spare, p)
	g.dirty = true
	if err := g.EPT.Retarget(pg, pg, p.base); err != nil {
		return err
	}
	_, err := g.EPT.Merge(pg)
	return err
}

// WriteProtect takes one write protection of the page at pg (4 KiB
// aligned): guest writes to it exit. The page must be guest RAM and not
// the agent's.
func (g *GuestPhys) WriteProtect(pg uint64) error {
	if err := g.Check(pg, ept.Size4K); err != nil {
		return err
	}
	if err := g.dropTrap(pg); err != nil {
		return err
	}
	if p := g.pages[pg]; p != nil {
		if p.claimed {
			return fmt.Errorf("%w: %#x holds the breakpoint agent's detour", ErrPageInUse, pg)
		}
		p.protect++
		return nil
	}
	p := g.page(pg)
	if _, err := g.EPT.Protect(pg, p.base&^ept.Write); err != nil {
		delete(g.pages, pg)
		g.spare = append(g.spare, p)
		return err
	}
	p.protect = 1
	g.dirty = true
	return nil
}

// Unprotect releases one write protection of pg; the last restores the
// page's permissions.
func (g *GuestPhys) Unprotect(pg uint64) error {
	p := g.pages[pg]
	if p == nil || p.protect == 0 {
		return fmt.Errorf("hv: %#x is not write-protected", pg)
	}
	if p.protect--; p.protect > 0 {
		return nil
	}
	return g.restore(pg, p)
}

// SetWritable lets guest writes to a write-protected page through (open)
// or makes them exit again.
func (g *GuestPhys) SetWritable(pg uint64, open bool) error {
	p := g.pages[pg]
	if p == nil || p.protect == 0 {
		return fmt.Errorf("hv: %#x is not write-protected", pg)
	}
	perm := p.base &^ ept.Write
	if open {
		perm = p.base
	}
	g.dirty = true
	_, err := g.EPT.Protect(pg, perm)
	return err
}

// Claim gives the page at pg to the breakpoint agent: it may show other
// host memory there (View) and write the guest's page. The page must be
// guest RAM that nothing else changed.
func (g *GuestPhys) Claim(pg uint64) error {
	if err := g.Check(pg, ept.Size4K); err != nil {
		return err
	}
	if err := g.dropTrap(pg); err != nil {
		return err
	}
	if g.pages[pg] != nil {
		return fmt.Errorf("%w: %#x is a watched page table", ErrPageInUse, pg)
	}
	g.page(pg).claimed = true
	return nil
}

// View maps the claimed page pg to host page hpa (pg itself: the guest's
// own memory) with permissions p.
func (g *GuestPhys) View(pg, hpa uint64, perm ept.Perm) error {
	p := g.pages[pg]
	if p == nil || !p.claimed {
		return fmt.Errorf("hv: %#x is not claimed", pg)
	}
	if err := g.EPT.Retarget(pg, hpa, perm); err != nil {
		return err
	}
	p.target = 0
	if hpa != pg {
		p.target = hpa
	}
	g.dirty = true
	return nil
}

// Release gives a claimed page back as it was.
func (g *GuestPhys) Release(pg uint64) error {
	p := g.pages[pg]
	if p == nil || !p.claimed {
		return fmt.Errorf("hv: %#x is not claimed", pg)
	}
	return g.restore(pg, p)
}

// TrapFetch takes the execute permission from the EPT entry of the guest
// RAM page at pg, so that the guest's next instruction fetch from it
// exits (ReturnTrap). Only a page nothing else of tamahv's changed can be
// trapped, and the trap yields to every later use: WriteProtect and Claim
// give the page its permissions back first.
func (g *GuestPhys) TrapFetch(pg uint64) error {
	if err := g.Check(pg, ept.Size4K); err != nil {
		return err
	}
	if g.pages[pg] != nil {
		return fmt.Errorf("%w: %#x", ErrPageInUse, pg)
	}
	p := g.page(pg)
	if _, err := g.EPT.Protect(pg, p.base&^ept.Exec); err != nil {
		delete(g.pages, pg)
		g.spare = append(g.spare, p)
		return err
	}
	p.noexec = true
	g.dirty = true
	return nil
}

// UntrapFetch gives a trapped page its permissions back.
func (g *GuestPhys) UntrapFetch(pg uint64) error {
	p := g.pages[pg]
	if p == nil || !p.noexec {
		return fmt.Errorf("hv: %#x has no fetch trap", pg)
	}
	return g.restore(pg, p)
}

// dropTrap ends a fetch trap on pg, if there is one.
func (g *GuestPhys) dropTrap(pg uint64) error {
	if p := g.pages[pg]; p != nil && p.noexec {
		return g.restore(pg, p)
	}
	return nil
}

// reopen makes a guest RAM page that tamahv does not own read, write and
// execute again (a protection that outlived its owner) and flushes; it
// reports whether it did.
func (g *GuestPhys) reopen(pg uint64) (bool, error) {
	if g.pages[pg] != nil || g.Check(pg, ept.Size4K) != nil {
		return false, nil
	}
	if _, err := g.EPT.Protect(pg, ept.RWX); err != nil {
		return false, err
	}
	g.dirty = true
	g.Flush()
	return true, nil
}

// Owned reports whether tamahv changed the EPT entry of pg.
func (g *GuestPhys) Owned(pg uint64) bool { return g.pages[pg] != nil }

// Owners returns the number of pages whose EPT entry tamahv changed.
func (g *GuestPhys) Owners() int { return len(g.pages) }

// Flush invalidates EPT-derived translations if permissions changed
// since the last Flush. Once the invalidation has reached every
// processor, the EPT tables merged away before it go back to the page
// arena; until then a processor may still walk them, and a table handed
// out again would be walked as the table it was.
func (g *GuestPhys) Flush() {
	if !g.dirty {
		return
	}
	g.dirty = false
	retired := 0
	if g.EPT != nil {
		retired = g.EPT.Retired()
	}
	if g.Invalidate != nil {
		g.Invalidate()
		if g.Invalidated != nil && !g.Invalidated() {
			return
		}
	}
	if retired > 0 {
		g.Freed += uint64(g.EPT.Reclaim(retired))
	}
}
