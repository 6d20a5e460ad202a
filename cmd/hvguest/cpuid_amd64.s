#include "textflag.h"

// func cpuidTicks(n uint64) uint64
// The TSC ticks n executions of CPUID (leaf 0) take.
TEXT ·cpuidTicks(SB),NOSPLIT,$0-16
	MOVQ	n+0(FP), R8
	RDTSC
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	AX, R9
loop:
	TESTQ	R8, R8
	JZ	done
	XORL	AX, AX
	XORL	CX, CX
	CPUID
	DECQ	R8
	JMP	loop
done:
	RDTSC
	SHLQ	$32, DX
	ORQ	DX, AX
	SUBQ	R9, AX
	MOVQ	AX, ret+8(FP)
	RET

// func tsc() uint64
TEXT ·tsc(SB),NOSPLIT,$0-8
	RDTSC
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	AX, ret+0(FP)
	RET
