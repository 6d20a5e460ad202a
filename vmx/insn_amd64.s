// The VMX instructions, each returning RFLAGS so that Go can tell
// VMsucceed, VMfailInvalid (CF) and VMfailValid (ZF) apart (SDM Vol. 3C,
// "Conventions" in "VMX Instruction Reference").

#include "textflag.h"
#include "vmx_amd64.h"

// func vmxon(pa *uint64) (rflags uint64)
TEXT ·vmxon(SB),NOSPLIT,$0-16
	MOVQ	pa+0(FP), AX
	VMXON_RAX
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+8(FP)
	RET

// func vmclear(pa *uint64) (rflags uint64)
TEXT ·vmclear(SB),NOSPLIT,$0-16
	MOVQ	pa+0(FP), AX
	VMCLEAR_RAX
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+8(FP)
	RET

// func vmptrld(pa *uint64) (rflags uint64)
TEXT ·vmptrld(SB),NOSPLIT,$0-16
	MOVQ	pa+0(FP), AX
	VMPTRLD_RAX
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+8(FP)
	RET

// func vmread(field uint64) (value, rflags uint64)
TEXT ·vmread(SB),NOSPLIT,$0-24
	MOVQ	field+0(FP), DX
	XORQ	AX, AX
	VMREAD_RAX_RDX
	MOVQ	AX, value+8(FP)
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+16(FP)
	RET

// func vmwrite(field, value uint64) (rflags uint64)
TEXT ·vmwrite(SB),NOSPLIT,$0-24
	MOVQ	field+0(FP), DX
	MOVQ	value+8(FP), AX
	VMWRITE_RDX_RAX
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+16(FP)
	RET

// func vmxoff() (rflags uint64)
TEXT ·vmxoff(SB),NOSPLIT,$0-8
	VMXOFF
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+0(FP)
	RET

// func vmcall(nr, a1, a2 uint64) (ret uint64)
// The guest side of a hypercall: number in RAX, arguments in RDI and RSI,
// result in RAX.
TEXT ·vmcall(SB),NOSPLIT,$0-32
	MOVQ	nr+0(FP), AX
	MOVQ	a1+8(FP), DI
	MOVQ	a2+16(FP), SI
	VMCALL
	MOVQ	AX, ret+24(FP)
	RET

// func invept(typ uint64, desc *[2]uint64) (rflags uint64)
TEXT ·invept(SB),NOSPLIT,$0-24
	MOVQ	typ+0(FP), DX
	MOVQ	desc+8(FP), AX
	INVEPT_RDX_RAX
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+16(FP)
	RET

// func invvpid(typ uint64, desc *[2]uint64) (rflags uint64)
TEXT ·invvpid(SB),NOSPLIT,$0-24
	MOVQ	typ+0(FP), DX
	MOVQ	desc+8(FP), AX
	INVVPID_RDX_RAX
	PUSHFQ
	POPQ	AX
	MOVQ	AX, rflags+16(FP)
	RET

// func Read(f Field) (v uint64, ok bool)
// ok is "above": neither CF (VMfailInvalid) nor ZF (VMfailValid).
TEXT ·Read(SB),NOSPLIT,$0-17
	MOVL	f+0(FP), DX
	XORL	AX, AX
	VMREAD_RAX_RDX
	SETHI	ok+16(FP)
	MOVQ	AX, v+8(FP)
	RET

// func Write(f Field, v uint64) (ok bool)
TEXT ·Write(SB),NOSPLIT,$0-17
	MOVL	f+0(FP), DX
	MOVQ	v+8(FP), AX
	VMWRITE_RDX_RAX
	SETHI	ok+16(FP)
	RET

// func Read2(f1, f2 Field) (v1, v2 uint64, ok bool)
TEXT ·Read2(SB),NOSPLIT,$0-25
	MOVL	f1+0(FP), DX
	XORL	AX, AX
	VMREAD_RAX_RDX
	SETHI	BX
	MOVQ	AX, v1+8(FP)
	MOVL	f2+4(FP), DX
	XORL	AX, AX
	VMREAD_RAX_RDX
	SETHI	CX
	ANDB	CX, BX
	MOVQ	AX, v2+16(FP)
	MOVB	BX, ok+24(FP)
	RET
