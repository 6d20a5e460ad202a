// Package ept builds and edits the extended page tables that map
// guest-physical to host-physical memory (Intel SDM Vol. 3C, "EPT
// Translation Mechanism", revision 084): 4-level tables, 1 GiB, 2 MiB and 4
// KiB pages, per-page permissions and memory types, splitting large pages
// on demand, and decoding EPT-violation exit qualifications.
//
// Paging-structure pages come from a Tables implementation: the
// hypervisor's hands out host memory; tests use a map. A table taken out
// of the tree goes back to Tables only once the caller says that no
// processor can still walk it (Reclaim).
package ept

import (
	"errors"
	"fmt"
)

// Tables provides zeroed 4 KiB paging-structure pages by host-physical
// address.
type Tables interface {
	// Alloc returns the host-physical address of a new zeroed page.
	Alloc() (uint64, error)
	// Free gives a page back.
	Free(pa uint64)
	// Table returns the page at pa as 512 entries.
	Table(pa uint64) (*[512]uint64, error)
}

// Perm is a set of access permissions.
type Perm uint8

// Permissions.
const (
	Read  Perm = 1 << 0
	Write Perm = 1 << 1
	Exec  Perm = 1 << 2
	RWX        = Read | Write | Exec
)

func (p Perm) String() string {
	b := []byte("---")
	if p&Read != 0 {
		b[0] = 'r'
	}
	if p&Write != 0 {
		b[1] = 'w'
	}
	if p&Exec != 0 {
		b[2] = 'x'
	}
	return string(b)
}

// MemType is an EPT memory type (SDM Vol. 3C, "EPT and Memory Typing").
type MemType uint8

// Memory types.
const (
	Uncacheable  MemType = 0
	WriteCombine MemType = 1
	WriteThrough MemType = 4
	WriteProtect MemType = 5
	WriteBack    MemType = 6
)

// Entry bits.
const (
	entryPerm    = 7
	entryMemType = 7 << 3
	entryLarge   = 1 << 7
	entryAD      = 3 << 8 // accessed and dirty: the processor's, not the mapping's
	entryAddr    = 0x000f_ffff_ffff_f000
)

// Page sizes.
const (
	Size4K = 1 << 12
	Size2M = 1 << 21
	Size1G = 1 << 30
)

// Errors.
var (
	ErrAlign    = errors.New("ept: address or size not 4 KiB aligned")
	ErrMapped   = errors.New("ept: range already mapped")
	ErrNotFound = errors.New("ept: address not mapped")
	ErrPerm     = errors.New("ept: write without read is a misconfiguration")
	ErrExecOnly = errors.New("ept: execute-only pages need the execute-only capability")
	ErrRange    = errors.New("ept: address beyond the 48-bit guest-physical space")
)

// Options are what the processor allows (from IA32_VMX_EPT_VPID_CAP).
type Options struct {
	Pages1G     bool // 1 GiB pages may be used
	ExecuteOnly bool // execute-only permissions are allowed
}

// EPT is one set of extended page tables.
type EPT struct {
	t    Tables
	root uint64
	opt  Options
	// retired are the tables Merge took out of the tree and Reclaim has
	// not given back to t yet.
	retired []uint64
}

const maxGPA = 1 << 48

// New returns empty tables.
func New(t Tables, o Options) (*EPT, error) {
	root, err := t.Alloc()
	if err != nil {
		return nil, fmt.Errorf("ept: allocating the root: %w", err)
	}
	return &EPT{t: t, root: root, opt: o}, nil
}

// Root is the host-physical address of the PML4 table.
func (e *EPT) Root() uint64 { return e.root }

// Pointer is the EPTP value: write-back paging structures, a 4-level walk
// and, with ad, accessed and dirty flags (SDM Vol. 3C, "Extended-Page-Table
// Pointer (EPTP)").
func (e *EPT) Pointer(ad bool) uint64 {
	p := e.root | uint64(WriteBack) | (4-1)<<3
	if ad {
		p |= 1 << 6
	}
	return p
}

func (e *EPT) checkPerm(p Perm) error {
	switch {
	case p&Write != 0 && p&Read == 0:
		return ErrPerm
	case p == Exec && !e.opt.ExecuteOnly:
		return ErrExecOnly
	}
	return nil
}

func levelSize(level int) uint64 { return 1 << (12 + 9*uint(level)) }

func index(gpa uint64, level int) uint64 { return gpa >> (12 + 9*uint(level)) & 511 }

func leafEntry(hpa uint64, p Perm, mt MemType, level int) uint64 {
	v := hpa&entryAddr | uint64(p) | uint64(mt)<<3
	if level > 0 {
		v |= entryLarge
	}
	return v
}

// Map maps size bytes of guest-physical memory at gpa to host-physical hpa
// with the largest pages alignment allows. Every part of the range must be
// unmapped.
func (e *EPT) Map(gpa, hpa, size uint64, p Perm, mt MemType) error {
	if (gpa|hpa|size)&(Size4K-1) != 0 {
		return ErrAlign
	}
	if gpa+size > maxGPA || gpa+size < gpa {
		return ErrRange
	}
	if err := e.checkPerm(p); err != nil {
		return err
	}
	if at, ok := e.firstMapped(gpa, size); ok {
		return fmt.Errorf("%w: %#x (mapping %#x+%#x)", ErrMapped, at, gpa, size)
	}
	for size > 0 {
		level := 0
		for l := 2; l > 0; l-- {
			s := levelSize(l)
			if (l == 2 && !e.opt.Pages1G) || gpa%s != 0 || hpa%s != 0 || size < s {
				continue
			}
			level = l
			break
		}
		if err := e.set(gpa, level, leafEntry(hpa, p, mt, level)); err != nil {
			return err
		}
		s := levelSize(level)
		gpa, hpa, size = gpa+s, hpa+s, size-s
	}
	return nil
}

// firstMapped returns the first mapped address in [gpa, gpa+size), skipping
// whole unmapped regions at a time.
func (e *EPT) firstMapped(gpa, size uint64) (uint64, bool) {
	for cur := gpa; cur < gpa+size; {
		_, _, _, s, ok := e.Lookup(cur)
		if ok {
			return cur, true
		}
		if s == 0 {
			return 0, false // beyond the guest-physical space
		}
		cur = (cur &^ (s - 1)) + s
	}
	return 0, false
}

// walk returns the table holding gpa's entry at level, creating tables on
// the way if create is set. A large page above level is split when split is
// set, else walk stops there and returns its level.
func (e *EPT) walk(gpa uint64, level int, create, split bool) (*[512]uint64, int, error) {
	t, err := e.t.Table(e.root)
	if err != nil {
		return nil, 0, err
	}
	for l := 3; l > level; l-- {
		i := index(gpa, l)
		v := t[i]
		switch {
		case v&entryPerm == 0:
			if !create {
				return t, l, nil
			}
			pa, err := e.t.Alloc()
			if err != nil {
				return nil, 0, err
			}
			t[i] = pa | uint64(RWX)
		case v&entryLarge != 0:
			if !split {
				return t, l, nil
			}
			if err := e.splitEntry(t, i, l); err != nil {
				return nil, 0, err
			}
		}
		if t, err = e.t.Table(t[i] & entryAddr); err != nil {
			return nil, 0, err
		}
	}
	return t, level, nil
}

// splitEntry replaces the large page at t[i] (level l) by a table of 512
// pages of the next size with the same permissions and memory type.
func (e *EPT) splitEntry(t *[512]uint64, i uint64, l int) error {
	pa, err := e.t.Alloc()
	if err != nil {
		return err
	}
	nt, err := e.t.Table(pa)
	if err != nil {
		return err
	}
	v := t[i]
	base := v & entryAddr &^ (levelSize(l) - 1)
	attrs := v &^ entryAddr &^ entryLarge
	child := levelSize(l - 1)
	for j := uint64(0); j < 512; j++ {
		ent := base + j*child | attrs
		if l-1 > 0 {
			ent |= entryLarge
		}
		nt[j] = ent
	}
	t[i] = pa | uint64(RWX)
	return nil
}

func (e *EPT) set(gpa uint64, level int, v uint64) error {
	t, l, err := e.walk(gpa, level, true, true)
	if err != nil {
		return err
	}
	if l != level {
		return fmt.Errorf("ept: internal: walk stopped at level %d", l)
	}
	t[index(gpa, level)] = v
	return nil
}

// Lookup translates gpa. size is the page size of the mapping, or when not
// mapped the size of the unmapped region gpa falls in.
func (e *EPT) Lookup(gpa uint64) (hpa uint64, p Perm, mt MemType, size uint64, ok bool) {
	if gpa >= maxGPA {
		return 0, 0, 0, 0, false
	}
	t, err := e.t.Table(e.root)
	if err != nil {
		return 0, 0, 0, 0, false
	}
	for l := 3; l >= 0; l-- {
		v := t[index(gpa, l)]
		s := levelSize(l)
		if v&entryPerm == 0 {
			return 0, 0, 0, s, false
		}
		if l == 0 || v&entryLarge != 0 {
			return v&entryAddr&^(s-1) + gpa&(s-1), Perm(v & entryPerm), MemType(v & entryMemType >> 3), s, true
		}
		if t, err = e.t.Table(v & entryAddr); err != nil {
			return 0, 0, 0, 0, false
		}
	}
	return 0, 0, 0, 0, false
}

// Protect sets the permissions of the 4 KiB page at gpa, splitting a large
// page that holds it. It returns the permissions it replaced.
func (e *EPT) Protect(gpa uint64, p Perm) (Perm, error) {
	if gpa&(Size4K-1) != 0 {
		return 0, ErrAlign
	}
	if err := e.checkPerm(p); err != nil {
		return 0, err
	}
	if _, _, _, _, ok := e.Lookup(gpa); !ok {
		return 0, fmt.Errorf("%w: %#x", ErrNotFound, gpa)
	}
	t, _, err := e.walk(gpa, 0, false, true)
	if err != nil {
		return 0, err
	}
	i := index(gpa, 0)
	old := Perm(t[i] & entryPerm)
	t[i] = t[i]&^entryPerm | uint64(p)
	return old, nil
}

// Retarget points the mapped 4 KiB page at gpa to host page hpa with
// permissions p, splitting a large page that holds it (a split view: the
// guest sees other memory at the same address). The memory type stays.
func (e *EPT) Retarget(gpa, hpa uint64, p Perm) error {
	if (gpa|hpa)&(Size4K-1) != 0 {
		return ErrAlign
	}
	if err := e.checkPerm(p); err != nil {
		return err
	}
	if _, _, _, _, ok := e.Lookup(gpa); !ok {
		return fmt.Errorf("%w: %#x", ErrNotFound, gpa)
	}
	t, _, err := e.walk(gpa, 0, false, true)
	if err != nil {
		return err
	}
	i := index(gpa, 0)
	t[i] = hpa&entryAddr | t[i]&entryMemType | uint64(p)
	return nil
}

// Unmap removes the mappings of [gpa, gpa+size), splitting large pages that
// straddle its ends. Unmapped parts are skipped.
func (e *EPT) Unmap(gpa, size uint64) error {
	if (gpa|size)&(Size4K-1) != 0 {
		return ErrAlign
	}
	if gpa+size > maxGPA || gpa+size < gpa {
		return ErrRange
	}
	for cur := gpa; cur < gpa+size; {
		_, _, _, s, ok := e.Lookup(cur)
		if !ok {
			if s == 0 {
				return fmt.Errorf("ept: internal: no region size at %#x", cur)
			}
			cur = (cur &^ (s - 1)) + s
			continue
		}
		level := 0
		for l := 2; l > 0; l-- {
			if s == levelSize(l) && cur%s == 0 && cur+s <= gpa+size {
				level = l
				break
			}
		}
		t, _, err := e.walk(cur, level, false, true)
		if err != nil {
			return err
		}
		t[index(cur, level)] = 0
		cur += levelSize(level)
	}
	return nil
}

// Merge collapses the tables under the 2 MiB region holding gpa, then
// (with 1 GiB pages) under its 1 GiB region, back into one large page
// wherever the table's 512 entries map one aligned, contiguous host range
// with the same permissions and memory type, and drops tables whose
// entries are all empty, so that splits made by Protect and Retarget cost
// nothing once the page is as it was. It returns the number of tables it
// took out; when that is not 0 the caller must invalidate EPT-derived
// translations (INVEPT) before the guest runs.
//
// The tables taken out are retired, not given back: a processor's
// paging-structure caches may still hold their addresses, and it walks
// whatever is there until it invalidates. Reclaim gives them back.
func (e *EPT) Merge(gpa uint64) (int, error) {
	if gpa >= maxGPA {
		return 0, ErrRange
	}
	pml4, err := e.t.Table(e.root)
	if err != nil {
		return 0, err
	}
	v := pml4[index(gpa, 3)]
	if v&entryPerm == 0 {
		return 0, nil
	}
	pdpt, err := e.t.Table(v & entryAddr)
	if err != nil {
		return 0, err
	}
	i2 := index(gpa, 2)
	if v := pdpt[i2]; v&entryPerm == 0 || v&entryLarge != 0 {
		return 0, nil
	}
	pd, err := e.t.Table(pdpt[i2] & entryAddr)
	if err != nil {
		return 0, err
	}
	freed := 0
	i1 := index(gpa, 1)
	if v := pd[i1]; v&entryPerm != 0 && v&entryLarge == 0 {
		ok, err := e.collapse(pd, i1, 1)
		if err != nil {
			return freed, err
		}
		if ok {
			freed++
		}
	}
	if e.opt.Pages1G {
		ok, err := e.collapse(pdpt, i2, 2)
		if err != nil {
			return freed, err
		}
		if ok {
			freed++
		}
	}
	return freed, nil
}

// collapse replaces the table that parent[i] (a level-l entry) points at
// by one large page, or by nothing, where its entries allow it.
func (e *EPT) collapse(parent *[512]uint64, i uint64, l int) (bool, error) {
	pa := parent[i] & entryAddr
	t, err := e.t.Table(pa)
	if err != nil {
		return false, err
	}
	var merged uint64
	if first := t[0]; first&entryPerm == 0 {
		for _, v := range t {
			if v != 0 {
				return false, nil
			}
		}
	} else {
		if l-1 > 0 && first&entryLarge == 0 {
			return false, nil // a table below: not one page
		}
		base, child := first&entryAddr, levelSize(l-1)
		if base%levelSize(l) != 0 {
			return false, nil
		}
		attrs := first &^ entryAddr &^ entryAD
		for j, v := range t {
			if v&entryAddr != base+uint64(j)*child || v&^entryAddr&^entryAD != attrs {
				return false, nil
			}
		}
		merged = base | attrs | entryLarge
	}
	parent[i] = merged
	e.retired = append(e.retired, pa)
	return true, nil
}

// Retired returns the number of tables Merge took out that Reclaim has
// not given back yet.
func (e *EPT) Retired() int { return len(e.retired) }

// Reclaim gives the n tables Merge took out longest ago (at most all of
// them) back to Tables and returns how many it gave. Every processor that
// uses these tables caches translations through them (SDM Vol. 3C,
// "Caching Translation Information": the paging-structure caches keep the
// physical address of a table, not its contents), and a table handed out
// again before it invalidates would be walked as the table it was: a page
// table reused as a directory maps its new entries' tables into the
// guest, a directory reused as a page table maps guest memory as a table.
// Give a table back only when every such processor has invalidated
// EPT-derived translations (INVEPT) since it was taken out, or has not run
// the guest with this EPT since: count Retired before the invalidation,
// reclaim that many after it.
func (e *EPT) Reclaim(n int) int {
	n = max(0, min(n, len(e.retired)))
	for _, pa := range e.retired[:n] {
		e.t.Free(pa)
	}
	e.retired = e.retired[:copy(e.retired, e.retired[n:])]
	return n
}

// Violation is an EPT-violation exit qualification (SDM Vol. 3C, "Exit
// Qualification for EPT Violations").
type Violation struct {
	Read, Write, Fetch             bool // the access
	Readable, Writable, Executable bool // what the entry allowed
	LinearValid                    bool // the guest-linear address field is valid
	Translation                    bool // the access was to the final page, not a paging structure
	NMIUnblocking                  bool
}

// DecodeViolation splits an EPT-violation exit qualification.
func DecodeViolation(q uint64) Violation {
	return Violation{
		Read: q&1 != 0, Write: q&2 != 0, Fetch: q&4 != 0,
		Readable: q&8 != 0, Writable: q&16 != 0, Executable: q&32 != 0,
		LinearValid: q&(1<<7) != 0, Translation: q&(1<<7) != 0 && q&(1<<8) != 0,
		NMIUnblocking: q&(1<<12) != 0,
	}
}

func (v Violation) String() string {
	acc := "read"
	switch {
	case v.Write:
		acc = "write"
	case v.Fetch:
		acc = "fetch"
	}
	var allowed Perm
	if v.Readable {
		allowed |= Read
	}
	if v.Writable {
		allowed |= Write
	}
	if v.Executable {
		allowed |= Exec
	}
	s := fmt.Sprintf("%s, entry allowed %v", acc, allowed)
	if v.LinearValid && !v.Translation {
		s += ", during a guest page walk"
	}
	return s
}
