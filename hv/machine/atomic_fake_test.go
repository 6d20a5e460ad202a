package machine_test

import (
	"encoding/binary"
	"fmt"
	"math/bits"

	"github.com/tamahv/tamahv/hv/x86emu"
	"github.com/tamahv/tamahv/vmx"
)

// The fake board's x86emu.AtomicMemory: each operation on its pages as the
// processor's instruction would leave them. The machine runs one handler
// at a time, so no other access comes between the read and the write.

var _ x86emu.AtomicMemory = (*board)(nil)

// atomicOperand reads the size bytes at pa.
func (b *board) atomicOperand(pa uint64, size int) (uint64, error) {
	switch size {
	case 1, 2, 4, 8:
	default:
		return 0, fmt.Errorf("fake board: %d-byte operand", size)
	}
	if pa&0xfff+uint64(size) > 0x1000 {
		return 0, fmt.Errorf("fake board: %#x+%d crosses a page", pa, size)
	}
	var x [8]byte
	_ = b.ReadPhys(pa, x[:size])
	return binary.LittleEndian.Uint64(x[:]), nil
}

func (b *board) atomicPut(pa uint64, size int, v uint64) {
	var x [8]byte
	binary.LittleEndian.PutUint64(x[:], v)
	_ = b.WritePhys(pa, x[:size])
}

func (b *board) Store(pa uint64, size int, val uint64) error {
	if _, err := b.atomicOperand(pa, size); err != nil {
		return err
	}
	b.atomicPut(pa, size, val)
	return nil
}

func (b *board) Exchange(pa uint64, size int, val uint64) (uint64, error) {
	old, err := b.atomicOperand(pa, size)
	if err == nil {
		b.atomicPut(pa, size, val)
	}
	return old, err
}

func (b *board) CompareExchange(pa uint64, size int, old, val uint64) (uint64, bool, error) {
	prev, err := b.atomicOperand(pa, size)
	if err != nil || prev != old {
		return prev, false, err
	}
	b.atomicPut(pa, size, val)
	return prev, true, nil
}

func (b *board) CompareExchange16(pa uint64, old, val [2]uint64) ([2]uint64, bool, error) {
	if pa%16 != 0 {
		return [2]uint64{}, false, fmt.Errorf("fake board: %#x is not 16-byte aligned", pa)
	}
	prev := [2]uint64{b.u64(pa), b.u64(pa + 8)}
	if prev != old {
		return prev, false, nil
	}
	b.put64(pa, val[0])
	b.put64(pa+8, val[1])
	return prev, true, nil
}

// atomicLogic applies f to the operand and returns the flags of the result.
func (b *board) atomicLogic(pa uint64, size int, f func(uint64) uint64) (uint64, error) {
	old, err := b.atomicOperand(pa, size)
	if err != nil {
		return 0, err
	}
	res := f(old) & (1<<(8*size) - 1) // all ones for 8 bytes
	b.atomicPut(pa, size, res)
	var flags uint64
	if res == 0 {
		flags |= vmx.RFLAGSZF
	}
	if res>>(8*size-1) != 0 {
		flags |= vmx.RFLAGSSF
	}
	if bits.OnesCount8(uint8(res))%2 == 0 {
		flags |= vmx.RFLAGSPF
	}
	return flags, nil
}

func (b *board) Or(pa uint64, size int, val uint64) (uint64, error) {
	return b.atomicLogic(pa, size, func(x uint64) uint64 { return x | val })
}

func (b *board) And(pa uint64, size int, val uint64) (uint64, error) {
	return b.atomicLogic(pa, size, func(x uint64) uint64 { return x & val })
}

func (b *board) Xor(pa uint64, size int, val uint64) (uint64, error) {
	return b.atomicLogic(pa, size, func(x uint64) uint64 { return x ^ val })
}

func (b *board) BitTestAndSet(pa uint64, size int, bit uint) (bool, error) {
	old, err := b.atomicOperand(pa, size)
	if err == nil {
		b.atomicPut(pa, size, old|1<<bit)
	}
	return old>>bit&1 != 0, err
}

func (b *board) BitTestAndReset(pa uint64, size int, bit uint) (bool, error) {
	old, err := b.atomicOperand(pa, size)
	if err == nil {
		b.atomicPut(pa, size, old&^(1<<bit))
	}
	return old>>bit&1 != 0, err
}
