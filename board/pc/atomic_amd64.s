// Single-instruction changes of memory (atomic_amd64.go). Each function
// reaches the operand at addr with exactly one instruction of the width
// size (1, 2, 4 or 8) selects; the read-modify-writes are locked. The
// caller checks addr and size.

#include "textflag.h"

// func storeAt(addr uint64, size int, v uint64)
TEXT ·storeAt(SB),NOSPLIT,$0-24
	MOVQ	addr+0(FP), DI
	MOVQ	size+8(FP), CX
	MOVQ	v+16(FP), AX
	CMPQ	CX, $1
	JEQ	b
	CMPQ	CX, $2
	JEQ	w
	CMPQ	CX, $4
	JEQ	l
	MOVQ	AX, (DI)
	RET
b:
	MOVB	AX, (DI)
	RET
w:
	MOVW	AX, (DI)
	RET
l:
	MOVL	AX, (DI)
	RET

// func exchangeAt(addr uint64, size int, v uint64) (old uint64)
// XCHG with a memory operand locks without a prefix.
TEXT ·exchangeAt(SB),NOSPLIT,$0-32
	MOVQ	addr+0(FP), DI
	MOVQ	size+8(FP), CX
	MOVQ	v+16(FP), AX
	CMPQ	CX, $1
	JEQ	b
	CMPQ	CX, $2
	JEQ	w
	CMPQ	CX, $4
	JEQ	l
	XCHGQ	AX, (DI)
	JMP	done
b:
	XCHGB	AX, (DI)
	JMP	done
w:
	XCHGW	AX, (DI)
	JMP	done
l:
	XCHGL	AX, (DI)
done:
	MOVQ	AX, old+24(FP)
	RET

// func compareExchangeAt(addr uint64, size int, old, v uint64) (prev uint64, swapped bool)
TEXT ·compareExchangeAt(SB),NOSPLIT,$0-41
	MOVQ	addr+0(FP), DI
	MOVQ	size+8(FP), CX
	MOVQ	old+16(FP), AX
	MOVQ	v+24(FP), DX
	CMPQ	CX, $1
	JEQ	b
	CMPQ	CX, $2
	JEQ	w
	CMPQ	CX, $4
	JEQ	l
	LOCK;	CMPXCHGQ	DX, (DI)
	JMP	done
b:
	LOCK;	CMPXCHGB	DX, (DI)
	JMP	done
w:
	LOCK;	CMPXCHGW	DX, (DI)
	JMP	done
l:
	LOCK;	CMPXCHGL	DX, (DI)
done:
	SETEQ	swapped+40(FP)
	MOVQ	AX, prev+32(FP)
	RET

// func compareExchange16At(addr, oldLo, oldHi, lo, hi uint64) (prevLo, prevHi uint64, swapped bool)
TEXT ·compareExchange16At(SB),NOSPLIT,$0-57
	MOVQ	addr+0(FP), DI
	MOVQ	oldLo+8(FP), AX
	MOVQ	oldHi+16(FP), DX
	MOVQ	lo+24(FP), BX
	MOVQ	hi+32(FP), CX
	LOCK;	CMPXCHG16B	(DI)
	SETEQ	swapped+56(FP)
	MOVQ	AX, prevLo+40(FP)
	MOVQ	DX, prevHi+48(FP)
	RET

// func orAt(addr uint64, size int, v uint64) (rflags uint64)
TEXT ·orAt(SB),NOSPLIT,$0-32
	MOVQ	addr+0(FP), DI
	MOVQ	size+8(FP), CX
	MOVQ	v+16(FP), AX
	CMPQ	CX, $1
	JEQ	b
	CMPQ	CX, $2
	JEQ	w
	CMPQ	CX, $4
	JEQ	l
	LOCK;	ORQ	AX, (DI)
	JMP	done
b:
	LOCK;	ORB	AX, (DI)
	JMP	done
w:
	LOCK;	ORW	AX, (DI)
	JMP	done
l:
	LOCK;	ORL	AX, (DI)
done:
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+24(FP)
	RET

// func andAt(addr uint64, size int, v uint64) (rflags uint64)
TEXT ·andAt(SB),NOSPLIT,$0-32
	MOVQ	addr+0(FP), DI
	MOVQ	size+8(FP), CX
	MOVQ	v+16(FP), AX
	CMPQ	CX, $1
	JEQ	b
	CMPQ	CX, $2
	JEQ	w
	CMPQ	CX, $4
	JEQ	l
	LOCK;	ANDQ	AX, (DI)
	JMP	done
b:
	LOCK;	ANDB	AX, (DI)
	JMP	done
w:
	LOCK;	ANDW	AX, (DI)
	JMP	done
l:
	LOCK;	ANDL	AX, (DI)
done:
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+24(FP)
	RET

// func xorAt(addr uint64, size int, v uint64) (rflags uint64)
TEXT ·xorAt(SB),NOSPLIT,$0-32
	MOVQ	addr+0(FP), DI
	MOVQ	size+8(FP), CX
	MOVQ	v+16(FP), AX
	CMPQ	CX, $1
	JEQ	b
	CMPQ	CX, $2
	JEQ	w
	CMPQ	CX, $4
	JEQ	l
	LOCK;	XORQ	AX, (DI)
	JMP	done
b:
	LOCK;	XORB	AX, (DI)
	JMP	done
w:
	LOCK;	XORW	AX, (DI)
	JMP	done
l:
	LOCK;	XORL	AX, (DI)
done:
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+24(FP)
	RET

// func btsAt(addr uint64, size int, bit uint64) (rflags uint64)
// The bit lies within the operand: the register form then reaches no
// other bytes.
TEXT ·btsAt(SB),NOSPLIT,$0-32
	MOVQ	addr+0(FP), DI
	MOVQ	size+8(FP), CX
	MOVQ	bit+16(FP), AX
	CMPQ	CX, $2
	JEQ	w
	CMPQ	CX, $4
	JEQ	l
	LOCK;	BTSQ	AX, (DI)
	JMP	done
w:
	LOCK;	BTSW	AX, (DI)
	JMP	done
l:
	LOCK;	BTSL	AX, (DI)
done:
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+24(FP)
	RET

// func btrAt(addr uint64, size int, bit uint64) (rflags uint64)
TEXT ·btrAt(SB),NOSPLIT,$0-32
	MOVQ	addr+0(FP), DI
	MOVQ	size+8(FP), CX
	MOVQ	bit+16(FP), AX
	CMPQ	CX, $2
	JEQ	w
	CMPQ	CX, $4
	JEQ	l
	LOCK;	BTRQ	AX, (DI)
	JMP	done
w:
	LOCK;	BTRW	AX, (DI)
	JMP	done
l:
	LOCK;	BTRL	AX, (DI)
done:
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+24(FP)
	RET
