package pc

import (
	"runtime"
	"testing"
	"unsafe"
	"weak"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestArenaKeepsHardwareMemoryAlive: a block handed to the processor (the
// EPT sink) lives as long as its arena, through any number of
// collections, although nothing else refers to it. The sink as runGuest
// made it before (a slice whose address was taken and then dropped) is
// freed by the next collection: guest writes to the sink would then land
// in new tamahv objects.
func TestArenaKeepsHardwareMemoryAlive(t *testing.T) {
	const size2M = 2 << 20
	a := NewPageArena(4)
	pa, b, err := a.Block(size2M, size2M)
	require.NoError(t, err)
	assert.Zero(t, pa%size2M, "2 MiB aligned")
	assert.Len(t, b, size2M)
	assert.Equal(t, pa, PhysAddr(unsafe.Pointer(&b[0])))
	kept := weak.Make(&b[0])
	b = nil

	// The old way: only the address survives.
	sinkMem := make([]byte, 2*size2M)
	sink := (PhysAddr(unsafe.Pointer(&sinkMem[0])) + size2M - 1) &^ (size2M - 1)
	lost := weak.Make(&sinkMem[0])
	sinkMem = nil
	_ = sink

	runtime.GC()
	runtime.GC()
	assert.NotNil(t, kept.Value(), "the arena's block is alive")
	assert.Nil(t, lost.Value(), "a bare slice is garbage once its address is taken")
	runtime.KeepAlive(a)

	_, _, err = a.Block(size2M, 3<<20)
	assert.Error(t, err, "alignment not a power of two")
	_, _, err = a.Block(100, 4096)
	assert.Error(t, err)
	_, _, err = a.Block(4096, 1024)
	assert.Error(t, err)
}

func TestArenaPages(t *testing.T) {
	a := NewPageArena(2)
	p1, err := a.Alloc()
	require.NoError(t, err)
	assert.Zero(t, p1%4096)
	p2, err := a.Alloc()
	require.NoError(t, err)
	_, err = a.Alloc()
	assert.ErrorContains(t, err, "full")
	assert.Equal(t, 2, a.Pages())
	tb, err := a.Table(p1)
	require.NoError(t, err)
	tb[3] = 7
	a.Free(p1)
	assert.Equal(t, 1, a.Pages())
	p3, err := a.Alloc()
	require.NoError(t, err)
	assert.Equal(t, p1, p3)
	tb, _ = a.Table(p3)
	assert.Zero(t, tb[3], "zeroed again")
	_, err = a.Bytes(p2 + 4096)
	assert.Error(t, err)
}
