package pc

import "fmt"

// Entry bits of the host's own paging structures (Intel SDM Vol. 3A,
// "4-Level Paging and 5-Level Paging", the PML4E/PDPTE/PDE formats).
const (
	pteP    = 1 << 0
	pteRW   = 1 << 1
	ptePS   = 1 << 7
	pteAddr = 0x000f_ffff_ffff_f000
)

// CPUID.80000001H:EDX.Page1GB[bit 26]: 1 GiB pages (SDM Vol. 2A, CPUID).
const cpuidPage1GB = 1 << 26

// pageTables reaches the host's paging structures by physical address,
// one entry at a time, and allocates zeroed tables.
type pageTables struct {
	read  func(pa uint64) uint64
	write func(pa, v uint64)
	alloc func() (uint64, error)
}

// identityMap maps [low, top) one to one, writable, write-back, under
// the PML4 at pml4: with 1 GiB pages where pages1G, else 2 MiB pages.
// Entries already present are kept; low must be 1 GiB aligned. It returns
// the end of what is mapped (top rounded up to the page size), which is
// less than top only with an error.
func identityMap(t pageTables, pml4, low, top uint64, pages1G bool) (uint64, error) {
	const size2M, size1G, maxVA = 1 << 21, 1 << 30, 1 << 47
	if low%size1G != 0 {
		return low, fmt.Errorf("pc: identity map from %#x: not 1 GiB aligned", low)
	}
	if top > maxVA {
		return low, fmt.Errorf("pc: identity map to %#x: beyond the lower half of 4-level paging", top)
	}
	// next returns the table an entry points at, making it if needed.
	next := func(ea uint64) (uint64, error) {
		e := t.read(ea)
		if e&pteP != 0 {
			return e & pteAddr, nil
		}
		pa, err := t.alloc()
		if err != nil {
			return 0, err
		}
		t.write(ea, pa|pteP|pteRW)
		return pa, nil
	}
	pa := low
	for pa < top {
		pdpt, err := next(pml4 + 8*(pa>>39&511))
		if err != nil {
			return pa, fmt.Errorf("pc: identity map at %#x: %w", pa, err)
		}
		pdpte := pdpt + 8*(pa>>30&511)
		e := t.read(pdpte)
		switch {
		case pages1G && e&pteP == 0:
			t.write(pdpte, pa|pteP|pteRW|ptePS)
			pa += size1G
			continue
		case e&pteP != 0 && e&ptePS != 0:
			pa += size1G // already a 1 GiB page
			continue
		}
		pd, err := next(pdpte)
		if err != nil {
			return pa, fmt.Errorf("pc: identity map at %#x: %w", pa, err)
		}
		for end := pa + size1G; pa < end && pa < top; pa += size2M {
			if pde := pd + 8*(pa>>21&511); t.read(pde)&pteP == 0 {
				t.write(pde, pa|pteP|pteRW|ptePS)
			}
		}
	}
	return pa, nil
}
