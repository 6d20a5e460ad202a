package ept

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// stackTables hands out the page freed last first, as the board's arena
// does, and logs what it hands out and gets back.
type stackTables struct {
	memTables
	free []uint64
	log  []string
}

func (s *stackTables) Alloc() (uint64, error) {
	if n := len(s.free); n > 0 {
		pa := s.free[n-1]
		s.free = s.free[:n-1]
		s.pages[pa] = new([512]uint64)
		s.log = append(s.log, fmt.Sprintf("alloc %#x", pa))
		return pa, nil
	}
	pa, err := s.memTables.Alloc()
	s.log = append(s.log, fmt.Sprintf("alloc %#x", pa))
	return pa, err
}

func (s *stackTables) Free(pa uint64) {
	s.memTables.Free(pa)
	s.free = append(s.free, pa)
	s.log = append(s.log, fmt.Sprintf("free %#x", pa))
}

// TestMergedTablesWaitForReclaim: a table Merge takes out stays out of
// the allocator, with the entries it had, until Reclaim: a split made in
// between gets another page, never the one a processor may still walk.
// Before, Merge gave the table back at once and the next split got it.
func TestMergedTablesWaitForReclaim(t *testing.T) {
	s := &stackTables{memTables: *newMem()}
	e, err := New(s, Options{})
	require.NoError(t, err)
	require.NoError(t, e.Map(0, 0, Size1G, RWX, WriteBack))

	_, err = e.Protect(0x5000, Read)
	require.NoError(t, err)
	pd, _, err := e.walk(0, 1, false, false)
	require.NoError(t, err)
	pt := pd[0] & entryAddr
	_, err = e.Protect(0x5000, RWX)
	require.NoError(t, err)
	s.log = nil

	n, err := e.Merge(0x5000)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	assert.Equal(t, 1, e.Retired())
	_, _, _, size, ok := e.Lookup(0x5000)
	require.True(t, ok)
	assert.EqualValues(t, Size2M, size, "the 2 MiB page is back in the tree")
	old := s.pages[pt]
	require.NotNil(t, old, "the table is still the EPT's")
	assert.Equal(t, uint64(0x5000)|uint64(RWX)|uint64(WriteBack)<<3, old[5], "with the entries a stale walk finds")

	// Another region is split before the processors invalidated.
	_, err = e.Protect(3*Size2M+0x1000, Read)
	require.NoError(t, err)
	pd, _, err = e.walk(3*Size2M, 1, false, false)
	require.NoError(t, err)
	assert.NotEqual(t, pt, pd[3]&entryAddr, "the retired table is not handed out again")

	// The second region merges too: two retired, given back oldest first
	// and only as many as asked for.
	pt3 := pd[3] & entryAddr
	_, err = e.Protect(3*Size2M+0x1000, RWX)
	require.NoError(t, err)
	n, err = e.Merge(3*Size2M + 0x1000)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	assert.Equal(t, 2, e.Retired())
	assert.Zero(t, e.Reclaim(-1))
	assert.Equal(t, 1, e.Reclaim(1))
	assert.Equal(t, 1, e.Retired())
	// Freed only now; the allocator may hand it out from here on.
	assert.Equal(t, []string{fmt.Sprintf("alloc %#x", pt3), fmt.Sprintf("free %#x", pt)}, s.log)
	assert.Equal(t, 1, e.Reclaim(5))
	assert.Zero(t, e.Retired())
	assert.Zero(t, e.Reclaim(5), "given back once")
	assert.Equal(t, fmt.Sprintf("free %#x", pt3), s.log[len(s.log)-1])
	pa, err := s.Alloc()
	require.NoError(t, err)
	assert.Equal(t, pt3, pa, "freed last, handed out first")
}
