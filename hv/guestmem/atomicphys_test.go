package guestmem

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/x86emu"
)

// frameMem's AtomicMemory: each operation on the frames as the processor's
// instruction leaves memory, for tests on one goroutine. It refuses what
// an x86emu.AtomicMemory refuses.

var _ x86emu.AtomicMemory = frameMem{}

func (m frameMem) atomicLoad(pa uint64, size int) uint64 {
	var b [8]byte
	_ = m.ReadPhys(pa, b[:size])
	return binary.LittleEndian.Uint64(b[:])
}

func (m frameMem) atomicPut(pa uint64, size int, v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_ = m.WritePhys(pa, b[:size])
}

func (m frameMem) Store(pa uint64, size int, val uint64) error {
	if err := atomicOperand(pa, size, false); err != nil || size == 16 {
		return errors.Join(err, x86emu.ErrOperand)
	}
	m.atomicPut(pa, size, val)
	return nil
}

func (m frameMem) Exchange(pa uint64, size int, val uint64) (uint64, error) {
	if err := atomicOperand(pa, size, true); err != nil || size == 16 {
		return 0, errors.Join(err, x86emu.ErrOperand)
	}
	old := m.atomicLoad(pa, size)
	m.atomicPut(pa, size, val)
	return old, nil
}

func (m frameMem) CompareExchange(pa uint64, size int, old, val uint64) (uint64, bool, error) {
	if err := atomicOperand(pa, size, true); err != nil || size == 16 {
		return 0, false, errors.Join(err, x86emu.ErrOperand)
	}
	prev := m.atomicLoad(pa, size)
	if prev != old {
		return prev, false, nil
	}
	m.atomicPut(pa, size, val)
	return prev, true, nil
}

func (m frameMem) CompareExchange16(pa uint64, old, val [2]uint64) ([2]uint64, bool, error) {
	if err := atomicOperand(pa, 16, true); err != nil {
		return [2]uint64{}, false, err
	}
	prev := [2]uint64{m.get64(pa), m.get64(pa + 8)}
	if prev != old {
		return prev, false, nil
	}
	m.put64(pa, val[0])
	m.put64(pa+8, val[1])
	return prev, true, nil
}

// atomicLogic applies f to the operand and returns the flags of its result.
func (m frameMem) atomicLogic(pa uint64, size int, f func(uint64) uint64) (uint64, error) {
	if err := atomicOperand(pa, size, true); err != nil || size == 16 {
		return 0, errors.Join(err, x86emu.ErrOperand)
	}
	res := f(m.atomicLoad(pa, size)) & x86emu.SizeMask(size)
	m.atomicPut(pa, size, res)
	return x86emu.ResultFlags(res, size), nil
}

func (m frameMem) Or(pa uint64, size int, val uint64) (uint64, error) {
	return m.atomicLogic(pa, size, func(x uint64) uint64 { return x | val })
}

func (m frameMem) And(pa uint64, size int, val uint64) (uint64, error) {
	return m.atomicLogic(pa, size, func(x uint64) uint64 { return x & val })
}

func (m frameMem) Xor(pa uint64, size int, val uint64) (uint64, error) {
	return m.atomicLogic(pa, size, func(x uint64) uint64 { return x ^ val })
}

// atomicBit sets or clears a bit of the operand and returns its old value.
func (m frameMem) atomicBit(pa uint64, size int, bit uint, set bool) (bool, error) {
	if err := atomicOperand(pa, size, true); err != nil || size < 2 || size > 8 || bit >= uint(8*size) {
		return false, errors.Join(err, x86emu.ErrOperand)
	}
	old := m.atomicLoad(pa, size)
	if set {
		m.atomicPut(pa, size, old|1<<bit)
	} else {
		m.atomicPut(pa, size, old&^(1<<bit))
	}
	return old>>bit&1 != 0, nil
}

func (m frameMem) BitTestAndSet(pa uint64, size int, bit uint) (bool, error) {
	return m.atomicBit(pa, size, bit, true)
}

func (m frameMem) BitTestAndReset(pa uint64, size int, bit uint) (bool, error) {
	return m.atomicBit(pa, size, bit, false)
}

// memChange is one change of memory a recordingMem saw.
type memChange struct {
	op   string // "write" and "copy" (Memory), or the x86emu.AtomicMemory method
	pa   uint64
	size int
}

// recordingMem is frameMem that records every change of memory, made with
// Memory's copies or x86emu.AtomicMemory's single instructions. Before each, it
// runs concurrently (when set): another processor's store that lands
// between anything read before and the change itself.
type recordingMem struct {
	frameMem
	changes      []memChange
	concurrently func()
}

func (r *recordingMem) record(op string, pa uint64, size int) {
	r.changes = append(r.changes, memChange{op, pa, size})
	if r.concurrently != nil {
		r.concurrently()
	}
}

func (r *recordingMem) WritePhys(pa uint64, p []byte) error {
	r.record("write", pa, len(p))
	return r.frameMem.WritePhys(pa, p)
}

func (r *recordingMem) CopyPhys(dst, src, n uint64) error {
	r.record("copy", dst, int(n))
	return r.frameMem.CopyPhys(dst, src, n)
}

func (r *recordingMem) Store(pa uint64, size int, val uint64) error {
	r.record("Store", pa, size)
	return r.frameMem.Store(pa, size, val)
}

func (r *recordingMem) Exchange(pa uint64, size int, val uint64) (uint64, error) {
	r.record("Exchange", pa, size)
	return r.frameMem.Exchange(pa, size, val)
}

func (r *recordingMem) CompareExchange(pa uint64, size int, old, val uint64) (uint64, bool, error) {
	r.record("CompareExchange", pa, size)
	return r.frameMem.CompareExchange(pa, size, old, val)
}

func (r *recordingMem) CompareExchange16(pa uint64, old, val [2]uint64) ([2]uint64, bool, error) {
	r.record("CompareExchange16", pa, 16)
	return r.frameMem.CompareExchange16(pa, old, val)
}

func (r *recordingMem) Or(pa uint64, size int, val uint64) (uint64, error) {
	r.record("Or", pa, size)
	return r.frameMem.Or(pa, size, val)
}

func (r *recordingMem) And(pa uint64, size int, val uint64) (uint64, error) {
	r.record("And", pa, size)
	return r.frameMem.And(pa, size, val)
}

func (r *recordingMem) Xor(pa uint64, size int, val uint64) (uint64, error) {
	r.record("Xor", pa, size)
	return r.frameMem.Xor(pa, size, val)
}

func (r *recordingMem) BitTestAndSet(pa uint64, size int, bit uint) (bool, error) {
	r.record("BitTestAndSet", pa, size)
	return r.frameMem.BitTestAndSet(pa, size, bit)
}

func (r *recordingMem) BitTestAndReset(pa uint64, size int, bit uint) (bool, error) {
	r.record("BitTestAndReset", pa, size)
	return r.frameMem.BitTestAndReset(pa, size, bit)
}

// TestGuestPhysAtomicChecksTheOperand: GuestPhys hands a single-instruction
// change to its memory only for guest RAM (Check), an operand within a
// page of a size the instruction has, naturally aligned where locked; a
// memory that cannot make such changes refuses them all.
func TestGuestPhysAtomicChecksTheOperand(t *testing.T) {
	g := newTestGuest(t, ept.Options{})
	rec := &recordingMem{frameMem: g.mem}
	g.phys.Mem = rec
	const ram = 0x300000

	require.NoError(t, g.phys.Store(ram+3, 8, 0x1122334455667788), "a plain store need not be aligned")
	assert.Equal(t, uint64(0x1122334455667788), rec.atomicLoad(ram+3, 8))
	old, err := g.phys.Exchange(ram+8, 4, 7)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x112233), old)
	prev, swapped, err := g.phys.CompareExchange16(ram+16, [2]uint64{}, [2]uint64{1, 2})
	require.NoError(t, err)
	assert.True(t, swapped)
	assert.Equal(t, [2]uint64{}, prev)
	was, err := g.phys.BitTestAndSet(ram+32, 2, 15)
	require.NoError(t, err)
	assert.False(t, was)
	assert.Equal(t, uint64(0x8000), rec.atomicLoad(ram+32, 2))
	assert.Equal(t, []memChange{{"Store", ram + 3, 8}, {"Exchange", ram + 8, 4}, {"CompareExchange16", ram + 16, 16},
		{"BitTestAndSet", ram + 32, 2}}, rec.changes)
	rec.changes = nil

	refused := []struct {
		name string
		err  error
		do   func() error
	}{
		{"tamahv's region", ErrHole, func() error { return g.phys.Store(holeStart, 8, 0) }},
		{"MMIO", ErrNotRAM, func() error { _, err := g.phys.Or(0xfee00000, 4, 1); return err }},
		{"across a page", x86emu.ErrOperand, func() error { return g.phys.Store(ram+0xffc, 8, 0) }},
		{"a locked operand not aligned", x86emu.ErrOperand, func() error { _, err := g.phys.And(ram+4, 8, 0); return err }},
		{"cmpxchg16b not aligned", x86emu.ErrOperand, func() error {
			_, _, err := g.phys.CompareExchange16(ram+8, [2]uint64{}, [2]uint64{})
			return err
		}},
		{"3 bytes", x86emu.ErrOperand, func() error { return g.phys.Store(ram, 3, 0) }},
		{"a 16-byte store", x86emu.ErrOperand, func() error { return g.phys.Store(ram, 16, 0) }},
		{"a 16-byte exchange", x86emu.ErrOperand, func() error { _, err := g.phys.Exchange(ram, 16, 0); return err }},
		{"a byte bit test", x86emu.ErrOperand, func() error { _, err := g.phys.BitTestAndReset(ram, 1, 0); return err }},
		{"a bit beyond the operand", x86emu.ErrOperand, func() error { _, err := g.phys.BitTestAndSet(ram, 4, 32); return err }},
	}
	for _, c := range refused {
		assert.ErrorIs(t, c.do(), c.err, c.name)
	}
	assert.Empty(t, rec.changes, "nothing reached memory")

	g.phys.Mem = struct{ hv.Memory }{g.mem}
	assert.ErrorIs(t, g.phys.Store(ram, 8, 0), ErrNotAtomic)
}
