package guestmem

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/vmx"
)

// TestWalkerReportsBackedEntries: only a non-zero not-present PTE or PDE
// that is not Linux's PROT_NONE is backed (a swap or migration entry).
func TestWalkerReportsBackedEntries(t *testing.T) {
	mem := make(physBytes, 0x10000)
	put := func(pa, v uint64) { binary.LittleEndian.PutUint64(mem[pa:], v) }
	// PML4 at 0x1000 → PDPT at 0x2000 → PD at 0x3000 → PT at 0x4000.
	put(0x1000, 0x2000|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
	put(0x2000, 0x3000|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
	put(0x3000, 0x4000|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
	put(0x3000+8, 0x0000_0000_1234_5000)    // PDE: a THP migration entry
	put(0x4000, 0x0000_0000_00ab_c000)      // PTE: a swap entry
	put(0x4000+8, 0)                        // PTE: never mapped
	put(0x4000+16, 0x5000|pteLinuxProtNone) // PTE: PROT_NONE
	put(0x2000+8, 0x0000_0000_0777_7000)    // PDPTE: not present, non-zero
	w := &Walker{Mem: mem}
	for _, c := range []struct {
		va     uint64
		backed bool
	}{
		{0x0000, true},
		{0x1000, false},
		{0x2000, false},
		{0x200000, true},
		{0x40000000, false},
		{0x80000000, false}, // zero PDPTE
	} {
		tr, err := w.Translate(0x1000, c.va)
		require.NoError(t, err, "%#x", c.va)
		assert.False(t, tr.Present, "%#x", c.va)
		assert.Equal(t, c.backed, tr.Backed, "%#x", c.va)
	}
}
