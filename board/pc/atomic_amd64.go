package pc

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/vmx"
)

// Single-instruction changes of memory, for the guest's page-table entries
// that tamahv writes for it: another processor, and its page walker,
// must see each change whole or not at all (SDM Vol. 3A, 9.1.1,
// "Guaranteed Atomic Operations"). A store is one MOV of its width, a
// read-modify-write one locked instruction, never a string move.
//
// The functions take the operand's address in tamahv's address space:
// PhysMem passes physical addresses, which the one-to-one map makes the
// same. Each checks the operand first, so that no instruction here can
// fault: the size is one the instruction has, the operand lies within a
// page, and a locked operand is naturally aligned (CMPXCHG16B raises #GP
// otherwise, and a lock that splits a cache line raises #AC where
// split-lock detection is on).

// Implemented in atomic_amd64.s: one instruction each on the operand.
func storeAt(addr uint64, size int, v uint64)
func exchangeAt(addr uint64, size int, v uint64) (old uint64)
func compareExchangeAt(addr uint64, size int, old, v uint64) (prev uint64, swapped bool)
func compareExchange16At(addr, oldLo, oldHi, lo, hi uint64) (prevLo, prevHi uint64, swapped bool)
func orAt(addr uint64, size int, v uint64) (rflags uint64)
func andAt(addr uint64, size int, v uint64) (rflags uint64)
func xorAt(addr uint64, size int, v uint64) (rflags uint64)
func btsAt(addr uint64, size int, bit uint64) (rflags uint64)
func btrAt(addr uint64, size int, bit uint64) (rflags uint64)

// errOperand is returned for an operand no single instruction here takes.
var errOperand = errors.New("pc: operand not taken by a single instruction")

// operand checks size bytes at addr: 1, 2, 4 or 8 (16 where wide), within
// one 4 KiB page, naturally aligned where locked.
func operand(addr uint64, size int, locked, wide bool) error {
	switch {
	case size == 1 || size == 2 || size == 4 || size == 8:
	case size == 16 && wide:
	default:
		return fmt.Errorf("%w: %d bytes", errOperand, size)
	}
	if addr&0xfff+uint64(size) > 0x1000 {
		return fmt.Errorf("%w: %#x+%d crosses a page", errOperand, addr, size)
	}
	if locked && addr%uint64(size) != 0 {
		return fmt.Errorf("%w: locked %#x+%d is not aligned", errOperand, addr, size)
	}
	return nil
}

// sizeMask keeps the low size bytes of a value.
func sizeMask(size int) uint64 {
	if size == 8 {
		return ^uint64(0)
	}
	return 1<<(8*size) - 1
}

// atomicStore writes the low size bytes of v at addr with one MOV.
func atomicStore(addr uint64, size int, v uint64) error {
	if err := operand(addr, size, false, false); err != nil {
		return err
	}
	storeAt(addr, size, v)
	return nil
}

// atomicExchange writes the low size bytes of v at addr with one XCHG and
// returns what was there.
func atomicExchange(addr uint64, size int, v uint64) (uint64, error) {
	if err := operand(addr, size, true, false); err != nil {
		return 0, err
	}
	return exchangeAt(addr, size, v) & sizeMask(size), nil
}

// atomicCompareExchange writes the low size bytes of v at addr where they
// equal old, with one LOCK CMPXCHG; it returns what the instruction read
// and whether it wrote.
func atomicCompareExchange(addr uint64, size int, old, v uint64) (uint64, bool, error) {
	if err := operand(addr, size, true, false); err != nil {
		return 0, false, err
	}
	m := sizeMask(size)
	prev, swapped := compareExchangeAt(addr, size, old&m, v&m)
	return prev & m, swapped, nil
}

// atomicCompareExchange16 is atomicCompareExchange of 16 bytes with one
// LOCK CMPXCHG16B; element 0 is the low quadword.
func atomicCompareExchange16(addr uint64, old, v [2]uint64) ([2]uint64, bool, error) {
	if err := operand(addr, 16, true, true); err != nil {
		return [2]uint64{}, false, err
	}
	lo, hi, swapped := compareExchange16At(addr, old[0], old[1], v[0], v[1])
	return [2]uint64{lo, hi}, swapped, nil
}

// atomicOr ORs the low size bytes of v into addr with one LOCK OR and
// returns RFLAGS as the instruction left it.
func atomicOr(addr uint64, size int, v uint64) (uint64, error) {
	if err := operand(addr, size, true, false); err != nil {
		return 0, err
	}
	return orAt(addr, size, v), nil
}

// atomicAnd is atomicOr's LOCK AND.
func atomicAnd(addr uint64, size int, v uint64) (uint64, error) {
	if err := operand(addr, size, true, false); err != nil {
		return 0, err
	}
	return andAt(addr, size, v), nil
}

// atomicXor is atomicOr's LOCK XOR.
func atomicXor(addr uint64, size int, v uint64) (uint64, error) {
	if err := operand(addr, size, true, false); err != nil {
		return 0, err
	}
	return xorAt(addr, size, v), nil
}

// bitOperand checks a bit operation's operand: 2, 4 or 8 bytes at addr,
// and a bit within them.
func bitOperand(addr uint64, size int, bit uint) error {
	if size == 1 || bit >= 64 || bit >= uint(8*size) {
		return fmt.Errorf("%w: bit %d of %d bytes", errOperand, bit, size)
	}
	return operand(addr, size, true, false)
}

// atomicBitTestAndSet sets bit bit of the size bytes at addr with one
// LOCK BTS and reports its old value.
func atomicBitTestAndSet(addr uint64, size int, bit uint) (bool, error) {
	if err := bitOperand(addr, size, bit); err != nil {
		return false, err
	}
	return btsAt(addr, size, uint64(bit))&vmx.RFLAGSCF != 0, nil
}

// atomicBitTestAndReset is atomicBitTestAndSet's LOCK BTR: it clears the
// bit.
func atomicBitTestAndReset(addr uint64, size int, bit uint) (bool, error) {
	if err := bitOperand(addr, size, bit); err != nil {
		return false, err
	}
	return btrAt(addr, size, uint64(bit))&vmx.RFLAGSCF != 0, nil
}
