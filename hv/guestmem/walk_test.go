package guestmem

import (
	"encoding/binary"
	"math/rand"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

// TestWalkerAgreesWithTheSimulatedGuest walks page tables built by
// swapmemtest (4 KiB, 2 MiB and 1 GiB pages, swapped-out and CoW pages)
// and compares every translation.
func TestWalkerAgreesWithTheSimulatedGuest(t *testing.T) {
	m := swapmemtest.NewMachine()
	p := m.NewSpace()
	require.NoError(t, p.MapRange(0x400000, 64*4096, swapmemtest.UserRW))
	_, err := p.Map(0x40000000, swapmem.PageSize1G, swapmemtest.UserRX)
	require.NoError(t, err)
	_, err = p.Map(0x800000, swapmem.PageSize2M, swapmemtest.UserRO)
	require.NoError(t, err)
	require.NoError(t, m.System().MapRange(0xffff888000000000, 16*4096, swapmemtest.KernelRW))
	require.NoError(t, p.SwapOut(0x401000))
	require.NoError(t, p.MakeCoW(0x402000))
	w := &Walker{Mem: m}
	rng := rand.New(rand.NewSource(1))
	vas := []uint64{0x400000, 0x401abc, 0x402fff, 0x43ffff, 0x440000, 0x40000000, 0x7fffffff, 0x800123, 0x9fffff,
		0xffff888000000000, 0xffff888000007777, 0xffff888000010000, 0, 0x7fffffffffff}
	for i := 0; i < 200; i++ {
		vas = append(vas, 0x400000+uint64(rng.Intn(0x800000)))
	}
	for _, va := range vas {
		want, werr := m.Translate(p.CR3, va)
		got, gerr := w.Translate(p.CR3, va)
		require.NoError(t, werr)
		require.NoError(t, gerr, "%#x", va)
		assert.Equal(t, want, got, "%#x", va)
	}
	_, err = w.Translate(p.CR3, 0x0000800000000000)
	assert.ErrorIs(t, err, ErrNonCanonical)
	w.LA57 = true
	_, err = w.Translate(p.CR3, 0x0000800000000000)
	assert.NoError(t, err, "canonical with 5 levels")
}

// physBytes is guest memory from a byte slice at address 0.
type physBytes []byte

func (b physBytes) ReadPhys(pa uint64, p []byte) error {
	if pa+uint64(len(p)) > uint64(len(b)) {
		return assert.AnError
	}
	copy(p, b[pa:])
	return nil
}

func TestWalkerRejectsBadTables(t *testing.T) {
	mem := make(physBytes, 0x10000)
	le := binary.LittleEndian
	// PML4 at 0x1000 points at itself: a loop.
	le.PutUint64(mem[0x1000:], 0x1000|vmx.PTEPresent|vmx.PTEWritable)
	w := &Walker{Mem: mem}
	_, err := w.Translate(0x1000, 0x1234)
	assert.ErrorIs(t, err, ErrWalkLoop)
	// Reserved bits above MAXPHYADDR.
	le.PutUint64(mem[0x1000:], 0x2000|vmx.PTEPresent|1<<50)
	_, err = w.Translate(0x1000, 0x1234)
	assert.ErrorIs(t, err, ErrReservedBit)
	// PS in a PML4 entry.
	le.PutUint64(mem[0x1000:], 0x2000|vmx.PTEPresent|vmx.PTEPageSize)
	_, err = w.Translate(0x1000, 0x1234)
	assert.ErrorIs(t, err, ErrReservedBit)
	// A table outside memory.
	le.PutUint64(mem[0x1000:], 0x900000|vmx.PTEPresent)
	w.Limit = uint64(len(mem))
	_, err = w.Translate(0x1000, 0x1234)
	assert.ErrorContains(t, err, "leaves guest memory")
	// Not present is no error, and the steps show where it stopped.
	le.PutUint64(mem[0x1000:], 0x2000|vmx.PTEPresent|vmx.PTEWritable|vmx.PTEUser)
	var s [5]Step
	tr, n, err := w.Walk(0x1000, 0x1234, &s)
	require.NoError(t, err)
	assert.False(t, tr.Present)
	assert.Equal(t, 2, n)
	assert.Equal(t, Step{Level: 3, PA: 0x2000, Entry: 0}, s[1])
}

// TestWalkerLargePageReservedBitsAndXD: a 2 MiB or 1 GiB leaf with an
// address bit below its size set (PAT aside), and XD with EFER.NXE clear,
// are reserved-bit violations, as the processor's walk would fault on
// them (finding 26).
func TestWalkerLargePageReservedBitsAndXD(t *testing.T) {
	mem := make(physBytes, 0x4000)
	put := func(pa, v uint64) { binary.LittleEndian.PutUint64(mem[pa:], v) }
	const va = 0x40_0000 // PML4[0] → PDPT[0] → PD[2]
	put(0x1000, 0x2000|vmx.PTEPresent|vmx.PTEWritable)
	put(0x2000, 0x3000|vmx.PTEPresent|vmx.PTEWritable)
	w := &Walker{Mem: mem}
	for _, c := range []struct {
		name  string
		pdpte uint64 // 0: keep the PD
		pde   uint64
		ok    bool
	}{
		{"2 MiB page", 0, 0x20_0000 | vmx.PTEPageSize | vmx.PTEPresent, true},
		{"2 MiB page with PAT", 0, 0x20_0000 | vmx.PTELargePAT | vmx.PTEPageSize | vmx.PTEPresent, true},
		{"2 MiB page, bit 13 set", 0, 0x20_2000 | vmx.PTEPageSize | vmx.PTEPresent, false},
		{"2 MiB page, bit 20 set", 0, 0x30_0000 | vmx.PTEPageSize | vmx.PTEPresent, false},
		{"1 GiB page", 0x4000_0000 | vmx.PTEPageSize | vmx.PTEPresent, 0, true},
		{"1 GiB page, bit 21 set", 0x4020_0000 | vmx.PTEPageSize | vmx.PTEPresent, 0, false},
		{"XD with NXE", 0, 0x20_0000 | vmx.PTEPageSize | vmx.PTEPresent | vmx.PTEExecuteDisable, true},
	} {
		put(0x2000, 0x3000|vmx.PTEPresent|vmx.PTEWritable)
		if c.pdpte != 0 {
			put(0x2000, c.pdpte)
		}
		put(0x3000+8*(va>>21&511), c.pde)
		tr, err := w.Translate(0x1000, va)
		if c.ok {
			require.NoError(t, err, c.name)
			assert.True(t, tr.Present, c.name)
		} else {
			assert.ErrorIs(t, err, ErrReservedBit, c.name)
		}
	}
	w.NoNXE = true
	_, err := w.Translate(0x1000, va)
	assert.ErrorIs(t, err, ErrReservedBit, "XD is reserved with EFER.NXE clear")
}
