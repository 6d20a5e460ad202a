//go:build tamago

#include "textflag.h"

// func inb(port uint16) uint8
TEXT ·inb(SB),NOSPLIT,$0-9
	MOVW	port+0(FP), DX
	INB
	MOVB	AX, ret+8(FP)
	RET

// func outb(port uint16, v uint8)
TEXT ·outb(SB),NOSPLIT,$0-3
	MOVW	port+0(FP), DX
	MOVB	v+2(FP), AX
	OUTB
	RET

// func readMSR(msr uint32) uint64
TEXT ·readMSR(SB),NOSPLIT,$0-16
	MOVL	msr+0(FP), CX
	RDMSR
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	AX, ret+8(FP)
	RET

// func writeMSR(msr uint32, v uint64)
TEXT ·writeMSR(SB),NOSPLIT,$0-16
	MOVL	msr+0(FP), CX
	MOVQ	v+8(FP), AX
	MOVQ	AX, DX
	SHRQ	$32, DX
	WRMSR
	RET

// func readCR0() uint64
TEXT ·readCR0(SB),NOSPLIT,$0-8
	MOVQ	CR0, AX
	MOVQ	AX, ret+0(FP)
	RET

// func writeCR0(v uint64)
TEXT ·writeCR0(SB),NOSPLIT,$0-8
	MOVQ	v+0(FP), AX
	MOVQ	AX, CR0
	RET

// func readCR4() uint64
TEXT ·readCR4(SB),NOSPLIT,$0-8
	MOVQ	CR4, AX
	MOVQ	AX, ret+0(FP)
	RET

// func writeCR4(v uint64)
TEXT ·writeCR4(SB),NOSPLIT,$0-8
	MOVQ	v+0(FP), AX
	MOVQ	AX, CR4
	RET

// func cpuid(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)
TEXT ·cpuid(SB),NOSPLIT,$0-24
	MOVL	leaf+0(FP), AX
	MOVL	subleaf+4(FP), CX
	CPUID
	MOVL	AX, eax+8(FP)
	MOVL	BX, ebx+12(FP)
	MOVL	CX, ecx+16(FP)
	MOVL	DX, edx+20(FP)
	RET

// func rdtsc() uint64
TEXT ·rdtsc(SB),NOSPLIT,$0-8
	RDTSC
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	AX, ret+0(FP)
	RET

// func haltForever()
TEXT ·haltForever(SB),NOSPLIT,$0
	CLI
again:
	HLT
	JMP	again

// func readCR3() uint64
TEXT ·readCR3(SB),NOSPLIT,$0-8
	MOVQ	CR3, AX
	MOVQ	AX, ret+0(FP)
	RET

// func writeCR3(v uint64)
TEXT ·writeCR3(SB),NOSPLIT,$0-8
	MOVQ	v+0(FP), AX
	MOVQ	AX, CR3
	RET

// func sidt(p *[10]byte)
TEXT ·sidt(SB),NOSPLIT,$0-8
	MOVQ	p+0(FP), AX
	BYTE	$0x0f; BYTE $0x01; BYTE $0x08	// SIDT (AX)
	RET

// func xsetbv(xcr uint32, v uint64)
TEXT ·xsetbv(SB),NOSPLIT,$0-16
	MOVL	xcr+0(FP), CX
	MOVQ	v+8(FP), AX
	MOVQ	AX, DX
	SHRQ	$32, DX
	BYTE	$0x0f; BYTE $0x01; BYTE $0xd1	// XSETBV
	RET

// func movePhys(dst, src, n uint64)
// memmove: backwards when the destination lies above an overlapping source.
TEXT ·movePhys(SB),NOSPLIT,$0-24
	MOVQ	dst+0(FP), DI
	MOVQ	src+8(FP), SI
	MOVQ	n+16(FP), CX
	CMPQ	DI, SI
	JLS	forward
	LEAQ	(SI)(CX*1), AX
	CMPQ	DI, AX
	JCC	forward
	LEAQ	-1(DI)(CX*1), DI
	LEAQ	-1(SI)(CX*1), SI
	STD
	REP;	MOVSB
	CLD
	RET
forward:
	CLD
	REP;	MOVSB
	RET

// func jumpTo(pc uint64)
// Jumps to code that never returns (LongModeExit's).
TEXT ·jumpTo(SB),NOSPLIT,$0-8
	CLI
	MOVQ	pc+0(FP), AX
	JMP	AX
