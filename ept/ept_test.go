package ept

import (
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// memTables hands out pages from a map, like host memory would.
type memTables struct {
	pages map[uint64]*[512]uint64
	next  uint64
	limit int
}

func newMem() *memTables { return &memTables{pages: map[uint64]*[512]uint64{}, next: 0x100000} }

func (m *memTables) Alloc() (uint64, error) {
	if m.limit > 0 && len(m.pages) >= m.limit {
		return 0, errors.New("out of pages")
	}
	pa := m.next
	m.next += Size4K
	m.pages[pa] = new([512]uint64)
	return pa, nil
}
func (m *memTables) Free(pa uint64) { delete(m.pages, pa) }
func (m *memTables) Table(pa uint64) (*[512]uint64, error) {
	t := m.pages[pa]
	if t == nil {
		return nil, fmt.Errorf("no table at %#x", pa)
	}
	return t, nil
}

func TestMapUsesLargePages(t *testing.T) {
	m := newMem()
	e, err := New(m, Options{Pages1G: true})
	require.NoError(t, err)
	// Guest RAM 0-4 GiB except a 128 MiB hole at 256 MiB, identity.
	require.NoError(t, e.Map(0, 0, 0x10000000, RWX, WriteBack))
	require.NoError(t, e.Map(0x18000000, 0x18000000, 0x100000000-0x18000000, RWX, WriteBack))
	hpa, p, mt, size, ok := e.Lookup(0x92345678)
	require.True(t, ok)
	assert.Equal(t, uint64(0x92345678), hpa)
	assert.Equal(t, RWX, p)
	assert.Equal(t, WriteBack, mt)
	assert.EqualValues(t, Size1G, size)
	_, _, _, size, ok = e.Lookup(0x0ff00000)
	require.True(t, ok)
	assert.EqualValues(t, Size2M, size, "below the hole: 2 MiB pages")
	_, _, _, _, ok = e.Lookup(0x10000000)
	assert.False(t, ok, "the hole is not mapped")
	_, _, _, _, ok = e.Lookup(0x17ffffff)
	assert.False(t, ok)
	// PML4, one PDPT, PDs for the first GiB only.
	assert.Equal(t, 3, len(m.pages))
	assert.Equal(t, e.Root()|6|3<<3, e.Pointer(false))
	assert.Equal(t, e.Root()|6|3<<3|1<<6, e.Pointer(true))

	err = e.Map(0x17000000, 0x17000000, 0x2000000, RWX, WriteBack)
	assert.ErrorIs(t, err, ErrMapped)
}

func TestMapWithout1GPages(t *testing.T) {
	e, err := New(newMem(), Options{})
	require.NoError(t, err)
	require.NoError(t, e.Map(0x40000000, 0x80000000, Size1G, RWX, Uncacheable))
	_, _, mt, size, ok := e.Lookup(0x40000000)
	require.True(t, ok)
	assert.EqualValues(t, Size2M, size)
	assert.Equal(t, Uncacheable, mt)
}

func TestProtectSplits(t *testing.T) {
	m := newMem()
	e, err := New(m, Options{Pages1G: true, ExecuteOnly: true})
	require.NoError(t, err)
	require.NoError(t, e.Map(0, 0x100000000, Size1G, RWX, WriteBack))
	old, err := e.Protect(0x1234000, Read|Exec)
	require.NoError(t, err)
	assert.Equal(t, RWX, old)
	hpa, p, mt, size, ok := e.Lookup(0x1234567)
	require.True(t, ok)
	assert.Equal(t, uint64(0x101234567), hpa)
	assert.Equal(t, Read|Exec, p)
	assert.Equal(t, WriteBack, mt)
	assert.EqualValues(t, Size4K, size)
	// Neighbours keep everything, at the sizes the split left.
	_, p, _, size, _ = e.Lookup(0x1235000)
	assert.Equal(t, RWX, p)
	assert.EqualValues(t, Size4K, size)
	hpa, p, _, size, _ = e.Lookup(0x3fe00000)
	assert.Equal(t, RWX, p)
	assert.EqualValues(t, Size2M, size)
	assert.Equal(t, uint64(0x13fe00000), hpa)
	// Execute-only is allowed with the capability, write-only never.
	_, err = e.Protect(0x1234000, Exec)
	assert.NoError(t, err)
	_, err = e.Protect(0x1234000, Write)
	assert.ErrorIs(t, err, ErrPerm)
	_, err = e.Protect(0x1234001, Read)
	assert.ErrorIs(t, err, ErrAlign)
	_, err = e.Protect(0x80000000, Read)
	assert.ErrorIs(t, err, ErrNotFound)

	noXO, err := New(newMem(), Options{})
	require.NoError(t, err)
	require.NoError(t, noXO.Map(0, 0, Size4K, RWX, WriteBack))
	_, err = noXO.Protect(0, Exec)
	assert.ErrorIs(t, err, ErrExecOnly)
}

func TestUnmapSplitsAtTheEdges(t *testing.T) {
	e, err := New(newMem(), Options{Pages1G: true})
	require.NoError(t, err)
	require.NoError(t, e.Map(0, 0, 2*Size1G, RWX, WriteBack))
	require.NoError(t, e.Unmap(0x10000000, 0x08000000))
	for _, gpa := range []uint64{0x10000000, 0x12345000, 0x17fff000} {
		_, _, _, _, ok := e.Lookup(gpa)
		assert.False(t, ok, "%#x", gpa)
	}
	for _, gpa := range []uint64{0x0fffffff, 0x18000000, 0x7fffffff} {
		hpa, _, _, _, ok := e.Lookup(gpa)
		assert.True(t, ok, "%#x", gpa)
		assert.Equal(t, gpa, hpa)
	}
	// The range can be mapped again, elsewhere.
	require.NoError(t, e.Map(0x10000000, 0x90000000, 0x08000000, Read, WriteBack))
	hpa, p, _, _, ok := e.Lookup(0x10001000)
	assert.True(t, ok)
	assert.Equal(t, uint64(0x90001000), hpa)
	assert.Equal(t, Read, p)
}

func TestBadArguments(t *testing.T) {
	e, err := New(newMem(), Options{})
	require.NoError(t, err)
	assert.ErrorIs(t, e.Map(0x1001, 0, Size4K, RWX, WriteBack), ErrAlign)
	assert.ErrorIs(t, e.Map(0, 0, 100, RWX, WriteBack), ErrAlign)
	assert.ErrorIs(t, e.Map(maxGPA-Size4K, 0, 2*Size4K, RWX, WriteBack), ErrRange)
	assert.ErrorIs(t, e.Map(0, 0, Size4K, Write, WriteBack), ErrPerm)
	assert.ErrorIs(t, e.Unmap(1, Size4K), ErrAlign)
	_, _, _, _, ok := e.Lookup(maxGPA)
	assert.False(t, ok)
	m := newMem()
	m.limit = 2
	e, err = New(m, Options{})
	require.NoError(t, err)
	assert.Error(t, e.Map(0, 0, Size4K, RWX, WriteBack), "runs out of table pages")
}

func TestViolation(t *testing.T) {
	v := DecodeViolation(0x182 | 0x8)
	assert.Equal(t, Violation{Write: true, Readable: true, LinearValid: true, Translation: true}, v)
	assert.Equal(t, "write, entry allowed r--", v.String())
	assert.Equal(t, "read, entry allowed ---, during a guest page walk", DecodeViolation(0x81).String())
	assert.Equal(t, "fetch, entry allowed rw-", DecodeViolation(0x1c).String())
}

func TestRetarget(t *testing.T) {
	e, err := New(newMem(), Options{ExecuteOnly: true})
	require.NoError(t, err)
	require.NoError(t, e.Map(0, 0, Size2M, RWX, WriteBack))
	require.NoError(t, e.Retarget(0x3000, 0x77000, Exec))
	hpa, p, mt, size, ok := e.Lookup(0x3123)
	require.True(t, ok)
	assert.Equal(t, uint64(0x77123), hpa)
	assert.Equal(t, Exec, p)
	assert.Equal(t, WriteBack, mt)
	assert.EqualValues(t, Size4K, size)
	hpa, _, _, _, _ = e.Lookup(0x4000)
	assert.Equal(t, uint64(0x4000), hpa, "neighbours untouched")
	require.NoError(t, e.Retarget(0x3000, 0x3000, RWX))
	hpa, p, _, _, _ = e.Lookup(0x3000)
	assert.Equal(t, uint64(0x3000), hpa)
	assert.Equal(t, RWX, p)
	assert.ErrorIs(t, e.Retarget(0x3001, 0, RWX), ErrAlign)
	assert.ErrorIs(t, e.Retarget(0x400000, 0, RWX), ErrNotFound)
}

// budgetTables fails the test (by panicking out of a loop that would never
// end) after a number of table reads.
type budgetTables struct {
	*memTables
	left int
}

func (b *budgetTables) Table(pa uint64) (*[512]uint64, error) {
	if b.left--; b.left < 0 {
		panic("ept: table read budget spent: the operation does not end")
	}
	return b.memTables.Table(pa)
}

// TestUnmapAbove48BitsReturns: Unmap and Map beyond the 48-bit space
// refuse at once instead of wrapping round to 0 and climbing forever.
func TestUnmapAbove48BitsReturns(t *testing.T) {
	e, err := New(&budgetTables{memTables: newMem(), left: 10000}, Options{Pages1G: true})
	require.NoError(t, err)
	require.NoError(t, e.Map(0, 0, Size1G, RWX, WriteBack))
	assert.ErrorIs(t, e.Unmap(maxGPA, Size4K), ErrRange)
	assert.ErrorIs(t, e.Unmap(maxGPA-Size4K, 2*Size4K), ErrRange)
	assert.ErrorIs(t, e.Unmap(^uint64(0)&^(Size4K-1), Size4K), ErrRange, "wraps")
	assert.NoError(t, e.Unmap(maxGPA-Size1G, Size1G), "the last GiB, unmapped: nothing to do")
	_, _, _, _, ok := e.Lookup(0x1000)
	assert.True(t, ok, "nothing below was unmapped")
	at, found := e.firstMapped(maxGPA-Size4K, Size4K)
	assert.False(t, found, "%#x", at)
}

// TestMergeFreesSplitTables: protecting a page splits its 1 GiB and 2 MiB
// pages; once the page is as it was, Merge takes both tables out and
// Reclaim gives them back, so a bounded table arena supports any number of
// protect/release cycles over distinct regions (it filled after one region
// before).
func TestMergeFreesSplitTables(t *testing.T) {
	m := newMem()
	e, err := New(m, Options{Pages1G: true, ExecuteOnly: true})
	require.NoError(t, err)
	require.NoError(t, e.Map(0, 0, 4*Size1G, RWX, WriteBack))
	base := len(m.pages)
	m.limit = base + 2 // room for one split at a time
	for r := uint64(0); r < 2048; r++ {
		gpa := r*Size2M + 0x5000
		_, err := e.Protect(gpa, Read|Exec)
		require.NoError(t, err, "region %d", r)
		_, p, _, _, _ := e.Lookup(gpa)
		require.Equal(t, Read|Exec, p)
		_, err = e.Protect(gpa, RWX)
		require.NoError(t, err)
		n, err := e.Merge(gpa)
		require.NoError(t, err)
		require.Equal(t, 2, n, "region %d", r)
		require.Equal(t, 2, e.Reclaim(2))
	}
	assert.Equal(t, base, len(m.pages))
	hpa, p, mt, size, ok := e.Lookup(0x12345678)
	require.True(t, ok)
	assert.Equal(t, uint64(0x12345678), hpa)
	assert.Equal(t, RWX, p)
	assert.Equal(t, WriteBack, mt)
	assert.EqualValues(t, Size1G, size, "the 1 GiB page is back")

	// A region that still differs stays split.
	_, err = e.Protect(0x3000, Read)
	require.NoError(t, err)
	_, err = e.Protect(0x4000, Read)
	require.NoError(t, err)
	_, err = e.Protect(0x3000, RWX)
	require.NoError(t, err)
	n, err := e.Merge(0x3000)
	require.NoError(t, err)
	assert.Zero(t, n)
	_, p, _, _, _ = e.Lookup(0x4000)
	assert.Equal(t, Read, p)
	// A retargeted page merges once it points home again.
	_, err = e.Protect(0x4000, RWX)
	require.NoError(t, err)
	require.NoError(t, e.Retarget(0x4000, 0x77000, Exec))
	n, err = e.Merge(0x4000)
	require.NoError(t, err)
	assert.Zero(t, n)
	require.NoError(t, e.Retarget(0x4000, 0x4000, RWX))
	n, err = e.Merge(0x4000)
	require.NoError(t, err)
	assert.Equal(t, 2, n)
	assert.Equal(t, 2, e.Reclaim(2))
	assert.Equal(t, base, len(m.pages))

	// Without 1 GiB pages only the 2 MiB level merges; memory types and
	// emptied tables count too.
	m2 := newMem()
	e2, err := New(m2, Options{})
	require.NoError(t, err)
	require.NoError(t, e2.Map(0x1000, 0x1000, Size2M-Size4K, RWX, Uncacheable))
	before := len(m2.pages)
	require.NoError(t, e2.Unmap(0x1000, Size2M-Size4K))
	n, err = e2.Merge(0x1000)
	require.NoError(t, err)
	assert.Equal(t, 1, n, "the emptied page table")
	assert.Equal(t, 1, e2.Reclaim(1))
	assert.Equal(t, before-1, len(m2.pages))
	_, _, _, _, ok = e2.Lookup(0x1000)
	assert.False(t, ok)
	require.NoError(t, e2.Map(0, 0, Size2M, RWX, Uncacheable))
	_, err = e2.Protect(0x1000, Read)
	require.NoError(t, err)
	_, err = e2.Protect(0x1000, RWX)
	require.NoError(t, err)
	n, err = e2.Merge(0x1000)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	_, _, mt, size, _ = e2.Lookup(0x1000)
	assert.Equal(t, Uncacheable, mt)
	assert.EqualValues(t, Size2M, size)
	_, err = e2.Merge(maxGPA)
	assert.ErrorIs(t, err, ErrRange)
}
