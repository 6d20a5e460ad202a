// Package swapmemtest simulates a guest for the swapmem engine: x86-64
// 4-level paging structures laid out in a sparse simulated physical memory,
// several address spaces sharing a kernel half, vCPUs that switch CR3 and
// ring, a pager that swaps 4 KiB pages out and in (by itself or when a #PF
// is delivered), lost #PFs, copy-on-write pages, processes that exit, and
// page-table-entry watches that fire when a walk's entries are rewritten.
//
// A Machine implements swapmem.Guest and a VCPU implements swapmem.CPU.
// Mutating operations (Map, SwapOut, Deliver, Exit, ...) are serialised with
// one another and call the watch functions after the change, outside the
// machine's data lock, the way a hypervisor calls them from the VM-exit
// handler of the vCPU that wrote the entry.
package swapmemtest

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/tamahv/tamahv/swapmem"
)

// Page-table entry bits (Intel SDM Vol. 3A, "4-Level Paging and 5-Level
// Paging").
const (
	PteP    = 1 << 0
	PteRW   = 1 << 1
	PteUS   = 1 << 2
	PtePS   = 1 << 7
	PteNX   = 1 << 63
	pteAddr = 0x000F_FFFF_FFFF_F000
)

const pageSize = 4096

// Errors of the simulated machine.
var (
	ErrNoSpace     = errors.New("swapmemtest: no such address space")
	ErrNonCanon    = errors.New("swapmemtest: non-canonical address")
	ErrBadPhys     = errors.New("swapmemtest: physical address outside memory")
	ErrNotMapped   = errors.New("swapmemtest: address not mapped")
	ErrMapConflict = errors.New("swapmemtest: mapping conflicts with an existing one")
)

type hook struct {
	cr3, va   uint64
	fn        func(swapmem.Translation)
	entries   [4]uint64
	n         int
	last      swapmem.Translation
	cancelled atomic.Bool
}

type call struct {
	fn func(swapmem.Translation)
	h  *hook
	tr swapmem.Translation
}

// Machine is a simulated guest: physical memory, address spaces, a pager
// and a queue of injected #PFs.
type Machine struct {
	opMu sync.Mutex // serialises mutating operations, callbacks included
	mu   sync.Mutex // guards the data below

	frames map[uint64]*[pageSize]byte
	limit  uint64 // physical memory ends here
	free   []uint64
	spaces map[uint64]*Space
	// roots are the top-level tables of every space made: that of an
	// exited space can still be walked (its user half is clear), as the
	// processor can walk a freed PGD page.
	roots   map[uint64]bool
	system  *Space
	hooks   map[uint64][]*hook // by physical address of a watched entry
	nhooks  int
	touched []*hook
	swap    map[uint64][]byte
	swapID  uint64

	faults    []Fault
	delivered []Fault
	// LoseEvery makes every n-th delivered #PF vanish (0: none is lost).
	LoseEvery int
	nfaults   int
	// Violations lists broken rules seen by the vCPUs (an injection while
	// an event was pending, or while another swapmem #PF was undelivered).
	Violations []string
	// TopEntries makes translations carry the top-level entry their walk
	// went through (swapmem.Translation.Top). Set it before any watch.
	TopEntries bool
}

// Fault is a #PF injected by the engine.
type Fault struct {
	CPU   int
	CR3   uint64
	Ring  int
	VA    uint64
	Code  uint32
	BP    bool // raised through the breakpoint agent
	Lost  bool // the guest never saw it
	Segv  bool // the guest had nothing mapped there
	PagIn bool // the guest brought a page in (or made it writable)
}

// Space is one address space.
type Space struct {
	m      *Machine
	CR3    uint64
	exited bool
}

// NewMachine returns a machine with a kernel address space (its SystemCR3).
func NewMachine() *Machine {
	m := &Machine{
		frames: make(map[uint64]*[pageSize]byte),
		limit:  0x100000, // the first MiB is left alone, as on a PC
		spaces: make(map[uint64]*Space),
		roots:  make(map[uint64]bool),
		hooks:  make(map[uint64][]*hook),
		swap:   make(map[uint64][]byte),
	}
	m.mu.Lock()
	m.system = m.newSpaceLocked()
	// Give every kernel-half slot its table now, so that process spaces
	// made later share all kernel mappings.
	for i := uint64(256); i < 512; i++ {
		m.setEntry(m.system.CR3+8*i, m.alloc(pageSize)|PteP|PteRW)
	}
	m.mu.Unlock()
	return m
}

// alloc returns size bytes of fresh, size-aligned physical memory. Freed 4
// KiB frames are reused first.
func (m *Machine) alloc(size uint64) uint64 {
	if size == pageSize && len(m.free) > 0 {
		pa := m.free[len(m.free)-1]
		m.free = m.free[:len(m.free)-1]
		f := m.frame(pa)
		*f = [pageSize]byte{}
		return pa
	}
	pa := (m.limit + size - 1) &^ (size - 1)
	m.limit = pa + size
	return pa
}

// release gives a 4 KiB frame back, scribbled over so that a stale read
// shows.
func (m *Machine) release(pa uint64) {
	f := m.frame(pa)
	for i := range f {
		f[i] = 0xDE
	}
	m.free = append(m.free, pa)
}

func (m *Machine) frame(pa uint64) *[pageSize]byte {
	fn := pa &^ (pageSize - 1)
	f := m.frames[fn]
	if f == nil {
		f = new([pageSize]byte)
		m.frames[fn] = f
	}
	return f
}

func (m *Machine) entry(pa uint64) uint64 {
	f := m.frame(pa)
	o := pa & (pageSize - 1)
	var v uint64
	for i := 7; i >= 0; i-- {
		v = v<<8 | uint64(f[o+uint64(i)])
	}
	return v
}

// setEntry writes a paging-structure entry and notes the watches on it.
func (m *Machine) setEntry(pa, v uint64) {
	f := m.frame(pa)
	o := pa & (pageSize - 1)
	for i := 0; i < 8; i++ {
		f[o+uint64(i)] = byte(v >> (8 * i))
	}
	m.touched = append(m.touched, m.hooks[pa]...)
}

func (m *Machine) newSpaceLocked() *Space {
	root := m.alloc(pageSize)
	s := &Space{m: m, CR3: root}
	if m.system != nil {
		// Share the kernel half, as Linux does.
		for i := uint64(256); i < 512; i++ {
			m.setEntry(root+8*i, m.entry(m.system.CR3+8*i))
		}
	}
	m.spaces[root] = s
	m.roots[root] = true
	return s
}

// NewSpace returns a new process address space that shares the kernel half
// of the system space.
func (m *Machine) NewSpace() *Space {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.newSpaceLocked()
}

// System returns the kernel address space.
func (m *Machine) System() *Space { return m.system }

// SystemCR3 implements swapmem.Guest.
func (m *Machine) SystemCR3() uint64 { return m.system.CR3 }

func canonical48(va uint64) bool {
	top := va >> 47
	return top == 0 || top == 1<<17-1
}

func index(va uint64, level int) uint64 { return va >> (12 + 9*uint(level)) & 511 }

// walk translates va in cr3 and returns the physical addresses of the
// entries it read, top level first.
func (m *Machine) walk(cr3, va uint64) (swapmem.Translation, [4]uint64, int, error) {
	var path [4]uint64
	var tr swapmem.Translation
	if !m.roots[cr3] {
		return tr, path, 0, fmt.Errorf("%w: CR3 %#x", ErrNoSpace, cr3)
	}
	if !canonical48(va) {
		return tr, path, 0, fmt.Errorf("%w: %#x", ErrNonCanon, va)
	}
	table := cr3
	rw, us, nx := true, true, false
	for level := 3; level >= 0; level-- {
		pa := table + 8*index(va, level)
		n := 4 - level
		path[n-1] = pa
		e := m.entry(pa)
		if level == 3 && m.TopEntries {
			tr.Top = e & (pteAddr | PteP)
		}
		if e&PteP == 0 {
			// A non-zero entry of a page table or directory holds a page
			// elsewhere (here: a swap slot).
			tr.Backed = e != 0 && level <= 1
			return tr, path, n, nil
		}
		rw = rw && e&PteRW != 0
		us = us && e&PteUS != 0
		nx = nx || e&PteNX != 0
		size := uint64(1) << (12 + 9*uint(level))
		if level == 0 || (e&PtePS != 0 && level <= 2) {
			base := e & pteAddr &^ (size - 1)
			tr = swapmem.Translation{
				PA: base + va&(size-1), PageSize: size,
				Present: true, Writable: rw, User: us, NX: nx, Top: tr.Top,
			}
			return tr, path, n, nil
		}
		table = e & pteAddr
	}
	panic("unreachable")
}

// Translate implements swapmem.Guest with a real 4-level page walk.
func (m *Machine) Translate(cr3, va uint64) (swapmem.Translation, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	tr, _, _, err := m.walk(cr3, va)
	return tr, err
}

// ReadPhys implements swapmem.Guest.
func (m *Machine) ReadPhys(pa uint64, p []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if pa+uint64(len(p)) > m.limit || pa+uint64(len(p)) < pa {
		return fmt.Errorf("%w: %#x+%#x", ErrBadPhys, pa, len(p))
	}
	for len(p) > 0 {
		f := m.frame(pa)
		n := copy(p, f[pa&(pageSize-1):])
		p, pa = p[n:], pa+uint64(n)
	}
	return nil
}

// Watch implements swapmem.Guest: it hooks every paging-structure entry on
// va's walk and moves the hooks when an upper level changes.
func (m *Machine) Watch(cr3, va uint64, changed func(swapmem.Translation)) (func(), error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	tr, path, n, err := m.walk(cr3, va)
	if err != nil {
		return nil, err
	}
	h := &hook{cr3: cr3, va: va, fn: changed, last: tr}
	m.hookPath(h, path, n)
	m.nhooks++
	var once sync.Once
	return func() {
		once.Do(func() {
			h.cancelled.Store(true)
			m.mu.Lock()
			defer m.mu.Unlock()
			m.unhookPath(h)
			m.nhooks--
		})
	}, nil
}

func (m *Machine) hookPath(h *hook, path [4]uint64, n int) {
	h.entries, h.n = path, n
	for _, pa := range path[:n] {
		m.hooks[pa] = append(m.hooks[pa], h)
	}
}

func (m *Machine) unhookPath(h *hook) {
	for _, pa := range h.entries[:h.n] {
		hs := m.hooks[pa]
		for i, x := range hs {
			if x == h {
				hs = append(hs[:i], hs[i+1:]...)
				break
			}
		}
		if len(hs) == 0 {
			delete(m.hooks, pa)
		} else {
			m.hooks[pa] = hs
		}
	}
}

// Watches returns the number of live watches (for leak checks).
func (m *Machine) Watches() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.nhooks
}

// mutate runs f under the locks, then calls the watches whose translation
// f changed.
func (m *Machine) mutate(f func() error) error {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	m.mu.Lock()
	err := f()
	calls := m.collect()
	m.mu.Unlock()
	for _, c := range calls {
		if !c.h.cancelled.Load() {
			c.fn(c.tr)
		}
	}
	return err
}

// collect re-walks every touched watch, moves its hooks to the new path and
// returns the calls for those whose translation changed.
func (m *Machine) collect() []call {
	var calls []call
	seen := map[*hook]bool{}
	for _, h := range m.touched {
		if seen[h] || h.cancelled.Load() {
			continue
		}
		seen[h] = true
		tr, path, n, err := m.walk(h.cr3, h.va)
		if err != nil {
			tr = swapmem.Translation{}
		}
		m.unhookPath(h)
		m.hookPath(h, path, n)
		if tr != h.last {
			h.last = tr
			calls = append(calls, call{fn: h.fn, h: h, tr: tr})
		}
	}
	m.touched = m.touched[:0]
	return calls
}
