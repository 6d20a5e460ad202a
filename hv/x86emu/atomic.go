package x86emu

import "errors"

// AtomicMemory changes physical memory the way one processor instruction
// does: another processor, and its page walker, sees each change whole or
// not at all. A store of 1, 2, 4 or 8 bytes is one MOV of that width; a
// read-modify-write is one locked instruction (SDM Vol. 3A, 9.1.1,
// "Guaranteed Atomic Operations", and 9.1.2.2, "Software Controlled Bus
// Locking"), never a read, a computation and a write.
//
// The operand is size bytes at pa: size is 1, 2, 4 or 8, and the operand
// lies within one 4 KiB page. A locked operand (every method but Store)
// is also naturally aligned: the processor then needs no split lock,
// which may fault (#AC) where split-lock detection is on. An
// implementation refuses any other operand with an error, and changes
// nothing then.
//
// The board implements it for host memory through its one-to-one map;
// GuestPhys implements it for guest RAM, over a Memory that implements
// it too.
type AtomicMemory interface {
	// Store writes the low size bytes of val at pa with one store of
	// that width.
	Store(pa uint64, size int, val uint64) error
	// Exchange writes the low size bytes of val at pa and returns what
	// was there, with one XCHG.
	Exchange(pa uint64, size int, val uint64) (uint64, error)
	// CompareExchange writes the low size bytes of val at pa where the
	// operand equals old, with one LOCK CMPXCHG. It returns the operand
	// as the instruction read it, and whether it was replaced.
	CompareExchange(pa uint64, size int, old, val uint64) (prev uint64, swapped bool, err error)
	// CompareExchange16 is CompareExchange of the 16 bytes at pa, which
	// is 16-byte aligned, with one LOCK CMPXCHG16B; element 0 of each
	// value is the low quadword.
	CompareExchange16(pa uint64, old, val [2]uint64) (prev [2]uint64, swapped bool, err error)
	// Or ORs the low size bytes of val into the operand with one LOCK
	// OR. It returns RFLAGS as the instruction left it: SF, ZF and PF
	// describe the result.
	Or(pa uint64, size int, val uint64) (rflags uint64, err error)
	// And is Or's LOCK AND.
	And(pa uint64, size int, val uint64) (rflags uint64, err error)
	// Xor is Or's LOCK XOR.
	Xor(pa uint64, size int, val uint64) (rflags uint64, err error)
	// BitTestAndSet sets bit bit (below 8×size) of the operand of 2, 4
	// or 8 bytes with one LOCK BTS, and reports the bit's old value (the
	// instruction's CF).
	BitTestAndSet(pa uint64, size int, bit uint) (bool, error)
	// BitTestAndReset is BitTestAndSet's LOCK BTR: it clears the bit.
	BitTestAndReset(pa uint64, size int, bit uint) (bool, error)
}

// ErrOperand is returned for an operand AtomicMemory does not take: a
// size other than 1, 2, 4 or 8 bytes (16 for CompareExchange16, 2, 4 or 8
// for the bit operations), a bit beyond it, an operand that crosses a
// page, or a locked one that is not naturally aligned.
var ErrOperand = errors.New("x86emu: operand not taken by a single instruction")
