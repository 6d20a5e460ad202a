#include "textflag.h"
#include "go_asm.h"
#include "vmx_amd64.h"
#include "fpu_amd64.h"
#include "quiet_amd64.h"

#define HOST_RSP 0x6c14
#define HOST_RIP 0x6c16

// func vmrun(r *GuestRegs, fx *byte, launched uint64, q *QuietCPUID) (rflags uint64)
//
// Stack while the guest runs (HOST_RSP points at it):
//	0(SP)  r
//	8(SP)  fx
//	16(SP) tamahv's MXCSR, 20(SP) its x87 control word (HOST_FP_SAVE)
//	24(SP) the caller's BP
//	32(SP) return address, then the arguments at 40(SP): r, fx,
//	launched, q (64(SP)), and the result (72(SP))
TEXT ·vmrun(SB),NOSPLIT|NOFRAME,$0-40
	MOVQ	r+0(FP), SI
	MOVQ	fx+8(FP), DI
	MOVQ	launched+16(FP), CX
	PUSHQ	BP
	PUSHQ	$0
	HOST_FP_SAVE(0)
	PUSHQ	DI
	PUSHQ	SI

	// HOST_RSP at every entry: Go stacks move. HOST_RIP is the same
	// address for every VMCS: written at VMLAUNCH, it holds for the
	// VMRESUMEs that follow (VMCLEAR makes the next entry a VMLAUNCH).
	MOVQ	$HOST_RSP, DX
	MOVQ	SP, AX
	VMWRITE_RDX_RAX
	TESTQ	CX, CX
	JNE	hostrip
	MOVQ	$HOST_RIP, DX
	LEAQ	·vmexit<>(SB), AX
	VMWRITE_RDX_RAX
hostrip:

	FXRSTOR64	(DI)
	MOVQ	GuestRegs_CR2(SI), AX
	MOVQ	AX, CR2

	MOVQ	CX, BX			// launched, kept past the register loads
	MOVQ	GuestRegs_RAX(SI), AX
	MOVQ	GuestRegs_RCX(SI), CX
	MOVQ	GuestRegs_RDX(SI), DX
	MOVQ	GuestRegs_RBP(SI), BP
	MOVQ	GuestRegs_RDI(SI), DI
	MOVQ	GuestRegs_R8(SI), R8
	MOVQ	GuestRegs_R9(SI), R9
	MOVQ	GuestRegs_R10(SI), R10
	MOVQ	GuestRegs_R11(SI), R11
	MOVQ	GuestRegs_R12(SI), R12
	MOVQ	GuestRegs_R13(SI), R13
	MOVQ	GuestRegs_R14(SI), R14
	MOVQ	GuestRegs_R15(SI), R15
	TESTQ	BX, BX
	MOVQ	GuestRegs_RBX(SI), BX	// MOV leaves the flags alone
	MOVQ	GuestRegs_RSI(SI), SI
	JNE	resume
	VMLAUNCH
	JMP	failed
resume:
	VMRESUME
failed:
	// VM entry failed: the guest registers are loaded, the stack is ours.
	// The guest's x87/SSE state is loaded too (its area is unchanged).
	PUSHFQ
	POPQ	AX
	POPQ	SI
	POPQ	DI
	HOST_FP_LOAD(0)
	POPQ	CX
	POPQ	BP
	MOVQ	AX, rflags+32(FP)
	RET

// vmexit is HOST_RIP: the processor arrives with RSP = HOST_RSP, the
// guest's registers live and the host's flags clear (so DF and AC are 0;
// SDM Vol. 3C, "Loading Host RIP, RSP, SSP, and RFLAGS"). The guest's
// x87/SSE state is saved and tamahv's controls loaded before any Go code
// runs (fpu_amd64.h). It returns from vmrun
// for it, so it moves SP without pushes of its own (with LEAQ, which the
// assembler's push/pop accounting leaves alone).
TEXT ·vmexit<>(SB),NOSPLIT|NOFRAME,$0
	XCHGQ	SI, 0(SP)		// SI = r; the guest's RSI takes its slot
	MOVQ	AX, GuestRegs_RAX(SI)
	MOVQ	CX, GuestRegs_RCX(SI)
	MOVQ	DX, GuestRegs_RDX(SI)
	MOVQ	BX, GuestRegs_RBX(SI)
	MOVQ	BP, GuestRegs_RBP(SI)
	MOVQ	DI, GuestRegs_RDI(SI)
	MOVQ	R8, GuestRegs_R8(SI)
	MOVQ	R9, GuestRegs_R9(SI)
	MOVQ	R10, GuestRegs_R10(SI)
	MOVQ	R11, GuestRegs_R11(SI)
	MOVQ	R12, GuestRegs_R12(SI)
	MOVQ	R13, GuestRegs_R13(SI)
	MOVQ	R14, GuestRegs_R14(SI)
	MOVQ	R15, GuestRegs_R15(SI)
	MOVQ	0(SP), AX
	MOVQ	AX, GuestRegs_RSI(SI)
	MOVQ	CR2, AX
	MOVQ	AX, GuestRegs_CR2(SI)
	XORL	R15, R15		// vmrun's result: the exit
	MOVQ	64(SP), R8		// q
	TESTQ	R8, R8
	JZ	handle
	QUIET_CPUID(R8, SI, handle)
	// Answered: the guest runs on, its x87/SSE state untouched. HOST_RSP
	// finds r in its slot again.
	MOVQ	SI, 0(SP)
	MOVQ	GuestRegs_RAX(SI), AX
	MOVQ	GuestRegs_RCX(SI), CX
	MOVQ	GuestRegs_RDX(SI), DX
	MOVQ	GuestRegs_RBX(SI), BX
	MOVQ	GuestRegs_RBP(SI), BP
	MOVQ	GuestRegs_RDI(SI), DI
	MOVQ	GuestRegs_R8(SI), R8
	MOVQ	GuestRegs_R9(SI), R9
	MOVQ	GuestRegs_R10(SI), R10
	MOVQ	GuestRegs_R11(SI), R11
	MOVQ	GuestRegs_R12(SI), R12
	MOVQ	GuestRegs_R13(SI), R13
	MOVQ	GuestRegs_R14(SI), R14
	MOVQ	GuestRegs_R15(SI), R15
	MOVQ	GuestRegs_RSI(SI), SI
	VMRESUME
	// VM entry failed: vmrun returns its RFLAGS, with the registers as
	// they were stored.
	PUSHFQ
	POPQ	R15
	MOVQ	0(SP), SI
handle:
	MOVQ	8(SP), DI		// fx
	FXSAVE64	(DI)
	HOST_FP_LOAD(16)
	MOVQ	24(SP), BP
	LEAQ	32(SP), SP		// now at vmrun's return address
	// vmrun's result, past the return address and four argument words.
	MOVQ	R15, 40(SP)
	RET
