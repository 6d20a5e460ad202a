package guestmem

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

// With TopEntry, every translation names the top-level entry its walk went
// through (address and present bit), present page or not: a watch then
// hears the entry go even where the page was already gone.
func TestWalkCarriesTheTopLevelEntry(t *testing.T) {
	m := swapmemtest.NewMachine()
	p := m.NewSpace()
	const va = 0x400000
	require.NoError(t, p.MapRange(va, 2*4096, swapmemtest.UserRW))
	require.NoError(t, p.SwapOut(va))
	w := Walker{Mem: machineMem{m}}
	tr, err := w.Translate(p.CR3, va+4096)
	require.NoError(t, err)
	assert.Zero(t, tr.Top, "not asked for")

	w.TopEntry = true
	var top [8]byte
	require.NoError(t, m.ReadPhys(p.CR3+8*(va>>39&511), top[:]))
	want := binary.LittleEndian.Uint64(top[:]) & (vmx.PTEAddress | vmx.PTEPresent)
	require.NotZero(t, want)
	for _, a := range []uint64{va, va + 4096} {
		tr, err := w.Translate(p.CR3, a)
		require.NoError(t, err)
		assert.Equal(t, want, tr.Top, "%#x", a)
		assert.NotZero(t, tr.Top&swapmem.TopPresent)
	}
	tr, err = w.Translate(p.CR3, 0x7f00_0000_0000)
	require.NoError(t, err)
	assert.Equal(t, swapmem.Translation{}, tr, "an empty top-level slot")

	require.NoError(t, p.Exit())
	tr, err = w.Translate(p.CR3, va)
	require.NoError(t, err)
	assert.Zero(t, tr.Top, "the address space was torn down")
}
