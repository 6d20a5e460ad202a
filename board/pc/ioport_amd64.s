//go:build tamago

#include "textflag.h"

// func inw(port uint16) uint16
TEXT ·inw(SB),NOSPLIT,$0-10
	MOVW	port+0(FP), DX
	BYTE	$0x66; BYTE $0xed	// IN AX, DX
	MOVW	AX, ret+8(FP)
	RET

// func inl(port uint16) uint32
TEXT ·inl(SB),NOSPLIT,$0-12
	MOVW	port+0(FP), DX
	BYTE	$0xed	// IN EAX, DX
	MOVL	AX, ret+8(FP)
	RET

// func outw(port uint16, v uint16)
TEXT ·outw(SB),NOSPLIT,$0-4
	MOVW	port+0(FP), DX
	MOVW	v+2(FP), AX
	BYTE	$0x66; BYTE $0xef	// OUT DX, AX
	RET

// func outl(port uint16, v uint32)
TEXT ·outl(SB),NOSPLIT,$0-8
	MOVW	port+0(FP), DX
	MOVL	v+4(FP), AX
	BYTE	$0xef	// OUT DX, EAX
	RET
