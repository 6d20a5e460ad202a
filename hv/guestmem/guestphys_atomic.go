package guestmem

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/hv/x86emu"
)

// Errors of single-instruction guest-physical accesses.
var (
	// ErrNotAtomic is returned when GuestPhys's Memory cannot change
	// memory with single instructions (it is no x86emu.AtomicMemory).
	ErrNotAtomic = errors.New("hv: the memory has no single-instruction stores")
)

var _ x86emu.AtomicMemory = (*GuestPhys)(nil)

// atomicOperand checks an operand of size bytes at pa against the rules
// of x86emu.AtomicMemory.
func atomicOperand(pa uint64, size int, locked bool) error {
	switch size {
	case 1, 2, 4, 8, 16:
	default:
		return fmt.Errorf("%w: %d bytes", x86emu.ErrOperand, size)
	}
	if pa&0xfff+uint64(size) > 0x1000 {
		return fmt.Errorf("%w: %#x+%d crosses a page", x86emu.ErrOperand, pa, size)
	}
	if locked && pa%uint64(size) != 0 {
		return fmt.Errorf("%w: locked %#x+%d is not aligned", x86emu.ErrOperand, pa, size)
	}
	return nil
}

// atomic checks an operand of size bytes at pa, which must be guest RAM
// (Check), and returns the memory that changes it.
func (g *GuestPhys) atomic(pa uint64, size int, locked bool) (x86emu.AtomicMemory, error) {
	a, ok := g.Mem.(x86emu.AtomicMemory)
	if !ok {
		return nil, ErrNotAtomic
	}
	if err := atomicOperand(pa, size, locked); err != nil {
		return nil, err
	}
	if err := g.Check(pa, uint64(size)); err != nil {
		return nil, err
	}
	return a, nil
}

// Store implements x86emu.AtomicMemory for guest RAM.
func (g *GuestPhys) Store(pa uint64, size int, val uint64) error {
	if size == 16 {
		return fmt.Errorf("%w: a 16-byte store", x86emu.ErrOperand)
	}
	a, err := g.atomic(pa, size, false)
	if err != nil {
		return err
	}
	return a.Store(pa, size, val)
}

// Exchange implements x86emu.AtomicMemory for guest RAM.
func (g *GuestPhys) Exchange(pa uint64, size int, val uint64) (uint64, error) {
	a, err := g.scalar(pa, size)
	if err != nil {
		return 0, err
	}
	return a.Exchange(pa, size, val)
}

// CompareExchange implements x86emu.AtomicMemory for guest RAM.
func (g *GuestPhys) CompareExchange(pa uint64, size int, old, val uint64) (uint64, bool, error) {
	a, err := g.scalar(pa, size)
	if err != nil {
		return 0, false, err
	}
	return a.CompareExchange(pa, size, old, val)
}

// CompareExchange16 implements x86emu.AtomicMemory for guest RAM.
func (g *GuestPhys) CompareExchange16(pa uint64, old, val [2]uint64) ([2]uint64, bool, error) {
	a, err := g.atomic(pa, 16, true)
	if err != nil {
		return [2]uint64{}, false, err
	}
	return a.CompareExchange16(pa, old, val)
}

// Or implements x86emu.AtomicMemory for guest RAM.
func (g *GuestPhys) Or(pa uint64, size int, val uint64) (uint64, error) {
	a, err := g.scalar(pa, size)
	if err != nil {
		return 0, err
	}
	return a.Or(pa, size, val)
}

// And implements x86emu.AtomicMemory for guest RAM.
func (g *GuestPhys) And(pa uint64, size int, val uint64) (uint64, error) {
	a, err := g.scalar(pa, size)
	if err != nil {
		return 0, err
	}
	return a.And(pa, size, val)
}

// Xor implements x86emu.AtomicMemory for guest RAM.
func (g *GuestPhys) Xor(pa uint64, size int, val uint64) (uint64, error) {
	a, err := g.scalar(pa, size)
	if err != nil {
		return 0, err
	}
	return a.Xor(pa, size, val)
}

// BitTestAndSet implements x86emu.AtomicMemory for guest RAM.
func (g *GuestPhys) BitTestAndSet(pa uint64, size int, bit uint) (bool, error) {
	a, err := g.bitOperand(pa, size, bit)
	if err != nil {
		return false, err
	}
	return a.BitTestAndSet(pa, size, bit)
}

// BitTestAndReset implements x86emu.AtomicMemory for guest RAM.
func (g *GuestPhys) BitTestAndReset(pa uint64, size int, bit uint) (bool, error) {
	a, err := g.bitOperand(pa, size, bit)
	if err != nil {
		return false, err
	}
	return a.BitTestAndReset(pa, size, bit)
}

// scalar checks the locked operand of 1, 2, 4 or 8 bytes at pa.
func (g *GuestPhys) scalar(pa uint64, size int) (x86emu.AtomicMemory, error) {
	if size == 16 {
		return nil, fmt.Errorf("%w: 16 bytes", x86emu.ErrOperand)
	}
	return g.atomic(pa, size, true)
}

// bitOperand checks the operand of a bit operation: 2, 4 or 8 bytes at
// pa, and a bit within them.
func (g *GuestPhys) bitOperand(pa uint64, size int, bit uint) (x86emu.AtomicMemory, error) {
	if size == 1 || size == 16 || bit >= uint(8*size) {
		return nil, fmt.Errorf("%w: bit %d of %d bytes", x86emu.ErrOperand, bit, size)
	}
	return g.atomic(pa, size, true)
}
