#include "textflag.h"

// nmiEntry is the NMI handler (IDT vector 2, an interrupt gate: the
// processor pushed SS, RSP, RFLAGS, CS and RIP, and blocks NMIs until the
// IRETQ).
TEXT ·nmiEntry(SB),NOSPLIT|NOFRAME,$0
	LOCK
	INCL	·nmis(SB)
	IRETQ

// func nmiEntryPC() uintptr
TEXT ·nmiEntryPC(SB),NOSPLIT,$0-8
	MOVQ	$·nmiEntry(SB), AX
	MOVQ	AX, ret+0(FP)
	RET

// func simulateNMI(rflags uint64) (after uint64)
//
// simulateNMI enters nmiEntry as the processor delivers an interrupt in
// 64-bit mode, at the caller's privilege level (IRETQ returns to the same
// CPL, so this runs in a host test), with rflags loaded; it returns RFLAGS
// as the handler left them.
TEXT ·simulateNMI(SB),NOSPLIT,$0-16
	MOVQ	rflags+0(FP), DX
	CALL	nmiFrame<>(SB)
	PUSHFQ
	POPQ	AX
	MOVQ	AX, after+8(FP)
	RET

// nmiFrame turns its return address into an interrupt frame.
TEXT nmiFrame<>(SB),NOSPLIT|NOFRAME,$0
	POPQ	AX			// RIP: back in simulateNMI
	MOVQ	SP, BX			// RSP after the return
	XORQ	CX, CX
	MOVW	SS, CX
	PUSHQ	CX
	PUSHQ	BX
	PUSHQ	DX			// RFLAGS
	MOVW	CS, CX
	PUSHQ	CX
	PUSHQ	AX
	JMP	·nmiEntry(SB)

// func unblockNMIs()
//
// unblockNMIs executes IRETQ to the instruction after its own frame:
// after an NMI exit, NMIs stay blocked in VMX root until an IRET (SDM
// Vol. 3C, "Saving Non-Register State" and "NMI exiting"), and VM entry
// does not unblock them on every implementation (Bochs): this is that
// IRET.
TEXT ·unblockNMIs(SB),NOSPLIT,$0-0
	CALL	iretFrame<>(SB)
	RET

// iretFrame turns its return address into an interrupt frame and returns
// through it with IRETQ.
TEXT iretFrame<>(SB),NOSPLIT|NOFRAME,$0
	POPQ	AX			// RIP: back in unblockNMIs
	MOVQ	SP, BX			// RSP after the return
	XORQ	CX, CX
	MOVW	SS, CX
	PUSHQ	CX
	PUSHQ	BX
	PUSHFQ
	MOVW	CS, CX
	PUSHQ	CX
	PUSHQ	AX
	IRETQ
