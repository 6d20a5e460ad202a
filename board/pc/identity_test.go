package pc

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakePaging is physical memory holding paging structures.
type fakePaging struct {
	mem   map[uint64]uint64
	next  uint64
	limit int
	n     int
}

func (f *fakePaging) tables() pageTables {
	return pageTables{
		read:  func(pa uint64) uint64 { return f.mem[pa] },
		write: func(pa, v uint64) { f.mem[pa] = v },
		alloc: func() (uint64, error) {
			if f.limit > 0 && f.n >= f.limit {
				return 0, errors.New("no table left")
			}
			f.n++
			f.next += 4096
			return f.next, nil
		},
	}
}

// translate walks the fake tables like the processor.
func (f *fakePaging) translate(pml4, va uint64) (uint64, bool) {
	table := pml4
	for level := 4; level >= 1; level-- {
		e := f.mem[table+8*(va>>(12+9*uint(level-1))&511)]
		if e&pteP == 0 {
			return 0, false
		}
		if level == 1 || e&ptePS != 0 {
			size := uint64(1) << (12 + 9*uint(level-1))
			return e&pteAddr&^(size-1) | va&(size-1), true
		}
		table = e & pteAddr
	}
	return 0, false
}

// TestIdentityMapAbove4GiB: the board's map reaches all RAM, not only the
// first 4 GiB that start-up maps: guest page tables and data above 4 GiB
// become readable.
func TestIdentityMapAbove4GiB(t *testing.T) {
	const pml4, pdpt = 0x1000, 0x2000
	for _, pages1G := range []bool{true, false} {
		f := &fakePaging{mem: map[uint64]uint64{pml4: pdpt | pteP | pteRW}, next: 0x100000}
		// cpuinit's first 4 GiB, in 2 MiB pages under four PDs.
		for g := uint64(0); g < 4; g++ {
			pd := 0x3000 + g*0x1000
			f.mem[pdpt+8*g] = pd | pteP | pteRW
			for i := uint64(0); i < 512; i++ {
				f.mem[pd+8*i] = (g<<30 + i<<21) | pteP | pteRW | ptePS
			}
		}
		_, ok := f.translate(pml4, 0x1_2345_6789)
		require.False(t, ok, "cpuinit maps 4 GiB")
		const top = 0x2_0010_0000 // RAM ends 1 MiB into the ninth GiB
		end, err := identityMap(f.tables(), pml4, 1<<32, top, pages1G)
		require.NoError(t, err)
		for _, va := range []uint64{0x1000, 0xfffff000, 0x1_0000_0000, 0x1_2345_6789, 0x1_ffff_fff8, 0x2_000f_ffff} {
			pa, ok := f.translate(pml4, va)
			require.True(t, ok, "%#x, 1 GiB pages %v", va, pages1G)
			assert.Equal(t, va, pa)
		}
		if pages1G {
			assert.Equal(t, uint64(0x2_4000_0000), end)
			assert.Zero(t, f.n, "no table needed")
		} else {
			assert.Equal(t, uint64(0x2_0020_0000), end)
			assert.Equal(t, 5, f.n, "one page directory per GiB")
			_, ok := f.translate(pml4, 0x2_0020_0000)
			assert.False(t, ok)
		}
		// Again: nothing changes, nothing is allocated.
		n := f.n
		_, err = identityMap(f.tables(), pml4, 1<<32, top, pages1G)
		require.NoError(t, err)
		assert.Equal(t, n, f.n)
	}

	// Beyond 512 GiB a second PDPT; out of tables, an error and a short map.
	f := &fakePaging{mem: map[uint64]uint64{}, next: 0x100000, limit: 1}
	end, err := identityMap(f.tables(), 0x1000, 1<<32, 0x80_4000_0000, true)
	assert.ErrorContains(t, err, "no table left")
	assert.Equal(t, uint64(0x80_0000_0000), end)
	pa, ok := f.translate(0x1000, 0x7f_ffff_f000)
	assert.True(t, ok)
	assert.Equal(t, uint64(0x7f_ffff_f000), pa)
	_, err = identityMap(f.tables(), 0x1000, 1<<32+4096, 1<<33, true)
	assert.Error(t, err)
	_, err = identityMap(f.tables(), 0x1000, 1<<32, 1<<48, true)
	assert.Error(t, err)
}
