package guestmem

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// pteLinuxProtNone is Linux's _PAGE_PROTNONE (the G bit) in a not-present
// entry: a mapping without access, where a #PF is a SIGSEGV or an oops.
const pteLinuxProtNone = 1 << 8

// Walk errors.
var (
	ErrNonCanonical = errors.New("hv: non-canonical address")
	ErrReservedBit  = errors.New("hv: reserved bit set in a paging entry")
	ErrWalkLoop     = errors.New("hv: paging structures point at themselves")
)

// Walker translates guest-virtual addresses by reading the guest's paging
// structures (IA-32e paging with 4 or 5 levels). It reads each entry
// through Mem, which decides what guest-physical memory a walk may read
// (Watcher gives it GuestPhys: guest RAM only). A Walker is not safe
// for concurrent use: it reads entries into a buffer of its own, so that
// a walk allocates nothing.
type Walker struct {
	Mem hv.PhysReader
	// LA57 selects 5-level paging (CR4.LA57).
	LA57 bool
	// NoNXE says IA32_EFER.NXE is clear: bit 63 of an entry is then
	// reserved, not execute-disable.
	NoNXE bool
	// MaxPhys is the physical-address width (default 46 bits); entries
	// pointing above it are reserved-bit violations.
	MaxPhys uint
	// Limit is the end of guest-physical memory; a walk leaving it stops
	// with an error (0: no limit).
	Limit uint64
	// TopEntry makes every translation carry the top-level entry it went
	// through (swapmem.Translation.Top): a watch then hears when that
	// entry changes, as when the guest tears the address space down.
	TopEntry bool

	buf [8]byte
}

// Step is one entry read during a walk.
type Step struct {
	Level int    // 4 (PML4) ... 1 (PT); 5 for the PML5
	PA    uint64 // guest-physical address of the entry
	Entry uint64
}

// Walk translates va in the address space cr3 and returns the entries it
// read, top first (the last is the one that stopped the walk: the leaf or
// a not-present entry). A not-present translation is not an error.
func (w *Walker) Walk(cr3, va uint64, steps *[5]Step) (swapmem.Translation, int, error) {
	var tr swapmem.Translation
	levels := 4
	if w.LA57 {
		levels = 5
	}
	bits := uint(12 + 9*levels)
	if top := int64(va) >> (bits - 1); top != 0 && top != -1 {
		return tr, 0, fmt.Errorf("%w: %#x", ErrNonCanonical, va)
	}
	maxPhys := w.MaxPhys
	if maxPhys == 0 {
		maxPhys = 46
	}
	rsvd := ^uint64(0) << maxPhys & (vmx.PTEAddress | 0x000f_0000_0000_0000)
	table := cr3 & vmx.PTEAddress
	rw, us, xd := true, true, false
	b := &w.buf
	n := 0
	for level := levels; level >= 1; level-- {
		pa := table + 8*(va>>(12+9*uint(level-1))&511)
		if w.Limit != 0 && pa+8 > w.Limit {
			return tr, n, fmt.Errorf("hv: walk of %#x leaves guest memory at %#x", va, pa)
		}
		for i := 0; i < n; i++ {
			if steps[i].PA&^0xfff == pa&^0xfff && steps[i].Level != level {
				return tr, n, fmt.Errorf("%w: %#x", ErrWalkLoop, pa)
			}
		}
		if err := w.Mem.ReadPhys(pa, b[:]); err != nil {
			return tr, n, fmt.Errorf("hv: walk of %#x: %w", va, err)
		}
		e := binary.LittleEndian.Uint64(b[:])
		steps[n] = Step{Level: level, PA: pa, Entry: e}
		n++
		if level == levels && w.TopEntry {
			tr.Top = e & (vmx.PTEAddress | vmx.PTEPresent) // zero when not present
		}
		if e&vmx.PTEPresent == 0 {
			// Backed: a non-zero not-present PTE or PDE that is not Linux's
			// PROT_NONE: a swap or migration entry, which a #PF brings back
			// (arch/x86/include/asm/pgtable_64.h).
			tr.Backed = e != 0 && level <= 2 && e&pteLinuxProtNone == 0
			return tr, n, nil
		}
		if e&rsvd != 0 || (e&vmx.PTEPageSize != 0 && level >= 4) || (w.NoNXE && e&vmx.PTEExecuteDisable != 0) {
			return tr, n, fmt.Errorf("%w: %#x at level %d", ErrReservedBit, e, level)
		}
		if large := e&vmx.PTEPageSize != 0 && level > 1; large && e&(uint64(1)<<(12+9*uint(level-1))-1)&^vmx.PTELargePAT&^0xfff != 0 {
			// A 2 MiB or 1 GiB page's address bits below its size, but
			// for PAT (bit 12), are reserved.
			return tr, n, fmt.Errorf("%w: %#x at level %d", ErrReservedBit, e, level)
		}
		rw = rw && e&vmx.PTEWritable != 0
		us = us && e&vmx.PTEUser != 0
		xd = xd || e&vmx.PTEExecuteDisable != 0
		if level == 1 || e&vmx.PTEPageSize != 0 {
			size := uint64(1) << (12 + 9*uint(level-1))
			base := e & vmx.PTEAddress &^ (size - 1)
			return swapmem.Translation{PA: base | va&(size-1), PageSize: size, Present: true, Writable: rw, User: us, NX: xd, Top: tr.Top}, n, nil
		}
		table = e & vmx.PTEAddress
	}
	return tr, n, nil
}

// Translate is Walk without the steps.
func (w *Walker) Translate(cr3, va uint64) (swapmem.Translation, error) {
	var s [5]Step
	tr, _, err := w.Walk(cr3, va, &s)
	return tr, err
}

// sameEntry reports whether two values of one paging-structure entry walk
// and translate alike: they differ at most in the accessed and dirty
// flags of a present entry, which the processor sets as it walks.
func sameEntry(a, b uint64) bool {
	d := a ^ b
	if a&vmx.PTEPresent != 0 {
		d &^= vmx.PTEAccessed | vmx.PTEDirty
	}
	return d == 0
}
