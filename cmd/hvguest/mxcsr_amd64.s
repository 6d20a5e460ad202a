#include "textflag.h"

// func unmaskedSpin(mxcsr uint32, fcw uint16, cpuids, ticks uint64) (exits uint64)
// Loads mxcsr into MXCSR and fcw into the x87 control word, executes
// CPUID cpuids times (each a VM exit under tamahv), then spins for ticks
// TSC ticks (long enough for preemption-timer exits), and puts the old
// MXCSR and control word back. It returns how many CPUIDs ran.
TEXT ·unmaskedSpin(SB),NOSPLIT,$16-32
	STMXCSR	0(SP)
	FSTCW	8(SP)
	MOVL	mxcsr+0(FP), AX
	MOVL	AX, 4(SP)
	MOVW	fcw+4(FP), AX
	MOVW	AX, 12(SP)
	LDMXCSR	4(SP)
	FLDCW	12(SP)
	MOVQ	cpuids+8(FP), R8
	XORQ	R10, R10
loop:
	CMPQ	R10, R8
	JAE	spin
	MOVL	$1, AX
	XORL	CX, CX
	CPUID
	INCQ	R10
	JMP	loop
spin:
	RDTSC
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	AX, R9
	MOVQ	ticks+16(FP), R11
again:
	PAUSE
	RDTSC
	SHLQ	$32, DX
	ORQ	DX, AX
	SUBQ	R9, AX
	CMPQ	AX, R11
	JB	again
	LDMXCSR	0(SP)
	FLDCW	8(SP)
	MOVQ	R10, exits+24(FP)
	RET
