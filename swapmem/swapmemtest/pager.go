package swapmemtest

import (
	"fmt"

	"github.com/tamahv/tamahv/swapmem"
)

// Perm are the permission bits of a leaf mapping: PteRW, PteUS and PteNX.
type Perm uint64

// Common permissions.
const (
	UserRW   = Perm(PteRW | PteUS | PteNX)
	UserRO   = Perm(PteUS | PteNX)
	UserRX   = Perm(PteUS)
	KernelRW = Perm(PteRW | PteNX)
)

const permMask = PteRW | PteUS | PteNX

// leaf finds va's leaf entry: its physical address, value and level (0: 4
// KiB PTE). It creates missing tables when create is set.
func (m *Machine) leaf(cr3, va uint64, want int, create bool) (pa, e uint64, level int, err error) {
	if m.spaces[cr3] == nil {
		return 0, 0, 0, fmt.Errorf("%w: CR3 %#x", ErrNoSpace, cr3)
	}
	if !canonical48(va) {
		return 0, 0, 0, fmt.Errorf("%w: %#x", ErrNonCanon, va)
	}
	table := cr3
	for level = 3; ; level-- {
		pa = table + 8*index(va, level)
		e = m.entry(pa)
		if level == want || (e&PteP != 0 && e&PtePS != 0 && level <= 2) {
			return pa, e, level, nil
		}
		if e&PteP == 0 {
			if !create {
				return pa, e, level, fmt.Errorf("%w: %#x", ErrNotMapped, va)
			}
			e = m.alloc(pageSize) | PteP | PteRW | PteUS
			m.setEntry(pa, e)
		}
		table = e & pteAddr
	}
}

func levelOf(size uint64) (int, error) {
	switch size {
	case swapmem.PageSize4K:
		return 0, nil
	case swapmem.PageSize2M:
		return 1, nil
	case swapmem.PageSize1G:
		return 2, nil
	}
	return 0, fmt.Errorf("swapmemtest: page size %#x", size)
}

// Map maps one page of the given size (4 KiB, 2 MiB or 1 GiB) at va, backed
// by fresh zeroed memory, and returns its physical address.
func (s *Space) Map(va, size uint64, p Perm) (uint64, error) {
	var pa uint64
	err := s.m.mutate(func() error {
		level, err := levelOf(size)
		if err != nil {
			return err
		}
		if va&(size-1) != 0 {
			return fmt.Errorf("swapmemtest: %#x not aligned to %#x", va, size)
		}
		epa, e, l, err := s.m.leaf(s.CR3, va, level, true)
		if err != nil {
			return err
		}
		if l != level || e != 0 {
			return fmt.Errorf("%w: %#x", ErrMapConflict, va)
		}
		pa = s.m.alloc(size)
		v := pa | PteP | uint64(p)&permMask
		if level > 0 {
			v |= PtePS
		}
		s.m.setEntry(epa, v)
		return nil
	})
	return pa, err
}

// MapRange maps n bytes at va (4 KiB aligned) with 4 KiB pages.
func (s *Space) MapRange(va, n uint64, p Perm) error {
	for off := uint64(0); off < n; off += pageSize {
		if _, err := s.Map(va+off, pageSize, p); err != nil {
			return err
		}
	}
	return nil
}

// Write stores data at va through the page tables, as the guest would. Every
// page touched must be present.
func (s *Space) Write(va uint64, data []byte) error {
	return s.m.mutate(func() error {
		for len(data) > 0 {
			tr, _, _, err := s.m.walk(s.CR3, va)
			if err != nil {
				return err
			}
			if !tr.Present {
				return fmt.Errorf("%w: %#x not present", ErrNotMapped, va)
			}
			f := s.m.frame(tr.PA)
			n := copy(f[tr.PA&(pageSize-1):], data)
			data, va = data[n:], va+uint64(n)
		}
		return nil
	})
}

// SwapOut pushes the 4 KiB page at va to swap: its PTE becomes not present
// (holding the swap slot) and its frame is freed and scribbled over.
func (s *Space) SwapOut(va uint64) error {
	return s.m.mutate(func() error {
		pa, e, level, err := s.m.leaf(s.CR3, va, 0, false)
		if err != nil {
			return err
		}
		if level != 0 || e&PteP == 0 {
			return fmt.Errorf("swapmemtest: %#x is not a present 4 KiB page", va)
		}
		frame := e & pteAddr
		s.m.swapID++
		s.m.swap[s.m.swapID] = append([]byte(nil), s.m.frame(frame)[:]...)
		s.m.setEntry(pa, s.m.swapID<<12|e&permMask)
		s.m.release(frame)
		return nil
	})
}

// MapSwapped maps a 4 KiB page at va directly in swap, holding data (zeros
// beyond it): the PTE goes from zero to a swap entry in one write.
func (s *Space) MapSwapped(va uint64, p Perm, data []byte) error {
	return s.m.mutate(func() error {
		pa, e, level, err := s.m.leaf(s.CR3, va, 0, true)
		if err != nil {
			return err
		}
		if level != 0 || e != 0 {
			return fmt.Errorf("%w: %#x", ErrMapConflict, va)
		}
		s.m.swapID++
		page := make([]byte, pageSize)
		copy(page, data)
		s.m.swap[s.m.swapID] = page
		s.m.setEntry(pa, s.m.swapID<<12|uint64(p)&permMask)
		return nil
	})
}

// SwapIn brings a swapped-out page at va back into a new frame; the guest
// does this on a #PF, or by itself.
func (s *Space) SwapIn(va uint64) error {
	return s.m.mutate(func() error { return s.m.swapIn(s.CR3, va) })
}

func (m *Machine) swapIn(cr3, va uint64) error {
	pa, e, level, err := m.leaf(cr3, va, 0, false)
	if err != nil {
		return err
	}
	id := e >> 12 & (pteAddr >> 12)
	if level != 0 || e&PteP != 0 || m.swap[id] == nil {
		return fmt.Errorf("swapmemtest: %#x is not swapped out", va)
	}
	frame := m.alloc(pageSize)
	copy(m.frame(frame)[:], m.swap[id])
	delete(m.swap, id)
	m.setEntry(pa, frame|PteP|e&permMask)
	return nil
}

// Swapped reports whether the 4 KiB page at va is swapped out.
func (s *Space) Swapped(va uint64) bool {
	s.m.mu.Lock()
	defer s.m.mu.Unlock()
	_, e, level, err := s.m.leaf(s.CR3, va, 0, false)
	return err == nil && level == 0 && e&PteP == 0 && s.m.swap[e>>12&(pteAddr>>12)] != nil
}

// MakeCoW write-protects the 4 KiB page at va, as fork does: a write #PF
// then gives it a private writable copy.
func (s *Space) MakeCoW(va uint64) error {
	return s.m.mutate(func() error {
		pa, e, level, err := s.m.leaf(s.CR3, va, 0, false)
		if err != nil {
			return err
		}
		if level != 0 || e&PteP == 0 {
			return fmt.Errorf("swapmemtest: %#x is not a present 4 KiB page", va)
		}
		s.m.setEntry(pa, e&^PteRW)
		return nil
	})
}

func (m *Machine) breakCoW(cr3, va uint64) error {
	pa, e, level, err := m.leaf(cr3, va, 0, false)
	if err != nil {
		return err
	}
	if level != 0 || e&PteP == 0 || e&PteRW != 0 {
		return fmt.Errorf("swapmemtest: %#x is not copy-on-write", va)
	}
	frame := m.alloc(pageSize)
	*m.frame(frame) = *m.frame(e & pteAddr)
	m.setEntry(pa, frame|e&(PteP|permMask)|PteRW)
	return nil
}

// MoveTable gives the page table that maps va a new home: a copy in a new
// frame, installed by rewriting the directory entry above it. The
// translation does not change; watches must follow the new table.
func (s *Space) MoveTable(va uint64) error {
	return s.m.mutate(func() error {
		pdpa, pde, level, err := s.m.leaf(s.CR3, va, 1, false)
		if err != nil {
			return err
		}
		if level != 1 || pde&PteP == 0 || pde&PtePS != 0 {
			return fmt.Errorf("swapmemtest: %#x has no page table", va)
		}
		old := pde & pteAddr
		nt := s.m.alloc(pageSize)
		*s.m.frame(nt) = *s.m.frame(old)
		s.m.setEntry(pdpa, nt|pde&^pteAddr)
		s.m.release(old)
		return nil
	})
}

// Unmap clears the 4 KiB mapping at va and frees its frame.
func (s *Space) Unmap(va uint64) error {
	return s.m.mutate(func() error {
		pa, e, level, err := s.m.leaf(s.CR3, va, 0, false)
		if err != nil {
			return err
		}
		if level != 0 {
			return fmt.Errorf("swapmemtest: %#x is not a 4 KiB mapping", va)
		}
		s.m.dropLeaf(pa, e)
		return nil
	})
}

func (m *Machine) dropLeaf(pa, e uint64) {
	if e&PteP != 0 {
		m.release(e & pteAddr)
	} else if e != 0 {
		delete(m.swap, e>>12&(pteAddr>>12))
	}
	m.setEntry(pa, 0)
}

// Exit tears the process down: every user mapping is cleared (watches see
// the pages go) and the address space ceases to exist.
func (s *Space) Exit() error {
	if s == s.m.system {
		return fmt.Errorf("swapmemtest: the system space cannot exit")
	}
	return s.m.mutate(func() error {
		if s.exited {
			return fmt.Errorf("%w: CR3 %#x exited", ErrNoSpace, s.CR3)
		}
		s.m.clearTable(s.CR3, 3, 256)
		s.exited = true
		delete(s.m.spaces, s.CR3)
		return nil
	})
}

// Reuse returns a new process address space on the top-level table of s,
// which exited: as when the kernel gives a freed PGD page to its next
// process. The table is written anew (its user half cleared, its kernel
// half the system space's), and watches on its entries see the writes.
func (s *Space) Reuse() (*Space, error) {
	m := s.m
	var n *Space
	err := m.mutate(func() error {
		if !s.exited || m.spaces[s.CR3] != nil {
			return fmt.Errorf("swapmemtest: CR3 %#x is in use", s.CR3)
		}
		for i := uint64(0); i < 512; i++ {
			e := uint64(0)
			if i >= 256 {
				e = m.entry(m.system.CR3 + 8*i)
			}
			m.setEntry(s.CR3+8*i, e)
		}
		n = &Space{m: m, CR3: s.CR3}
		m.spaces[s.CR3] = n
		return nil
	})
	return n, err
}

// clearTable clears the first n entries of a table at the given level and
// everything below them.
func (m *Machine) clearTable(table uint64, level, n int) {
	for i := 0; i < n; i++ {
		pa := table + 8*uint64(i)
		e := m.entry(pa)
		if e == 0 {
			continue
		}
		if level == 0 || (e&PtePS != 0 && e&PteP != 0) {
			if level == 0 {
				m.dropLeaf(pa, e)
			} else {
				m.setEntry(pa, 0)
			}
			continue
		}
		m.clearTable(e&pteAddr, level-1, 512)
		m.setEntry(pa, 0)
	}
}

// Touch is the guest accessing va by itself: a swapped-out page comes in,
// and a write to a copy-on-write page gets its private copy. A page that is
// already accessible is left alone.
func (s *Space) Touch(va uint64, write bool) error {
	return s.m.mutate(func() error {
		_, e, level, err := s.m.leaf(s.CR3, va, 0, false)
		switch {
		case err != nil:
			return err
		case level > 0:
			return nil // a large page: never swapped here
		case e == 0:
			return fmt.Errorf("%w: %#x", ErrNotMapped, va)
		case e&PteP == 0:
			if err := s.m.swapIn(s.CR3, va); err != nil {
				return err
			}
			_, e, _, _ = s.m.leaf(s.CR3, va, 0, false)
		}
		if write && e&PteRW == 0 {
			return s.m.breakCoW(s.CR3, va)
		}
		return nil
	})
}
