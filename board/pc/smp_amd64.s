//go:build tamago

#include "textflag.h"
#include "layout_amd64.h"

// Offsets in the AP parameter block (trampoline.go).
#define AP_GDTR		0
#define AP_IDTR		16
#define AP_STACK	32
#define AP_VMXON	40
#define AP_STATUS	48
#define AP_APICID	52
#define AP_FEATCTL	56

// MSRs (SDM Vol. 4) and bits (SDM Vol. 3C, "Enabling and Entering VMX
// Operation"; Vol. 3D, appendix A).
#define MSR_FEATURE_CONTROL	0x3a
#define MSR_VMX_BASIC		0x480
#define MSR_VMX_CR0_FIXED0	0x486
#define MSR_VMX_CR0_FIXED1	0x487
#define MSR_VMX_CR4_FIXED0	0x488
#define MSR_VMX_CR4_FIXED1	0x489
#define CR4_VMXE		(1<<13)

// apEntry is where an application processor arrives from the trampoline:
// 64-bit mode on tamahv's page tables, the trampoline's GDT, interrupts
// off, RDI pointing at its parameter block. It loads tamahv's GDT and the
// parked APs' IDT, takes its own stack, enters VMX root operation (the
// steps of vmx.Prepare and VMXON) and halts there for good: in VMX root
// operation INIT is blocked and start-up IPIs are ignored (SDM Vol. 3C,
// "VMX Root Operation"; "Handling of INIT and SIPI"), so the guest can
// never start it. Its status field tells the BSP how far it got.
TEXT ·apEntry(SB),NOSPLIT|NOFRAME,$0
	LGDT	AP_GDTR(DI)
	MOVW	$SEL_DATA, AX
	MOVW	AX, DS
	MOVW	AX, ES
	MOVW	AX, SS
	XORL	AX, AX
	MOVW	AX, FS
	MOVW	AX, GS
	MOVQ	AP_STACK(DI), SP
	MOVQ	$apLong<>(SB), AX
	PUSHQ	$SEL_CODE
	PUSHQ	AX
	RETFQ

TEXT apLong<>(SB),NOSPLIT|NOFRAME,$0
	LIDT	AP_IDTR(DI)
	MOVL	$1, AP_STATUS(DI)		// APStarted

	MOVL	$1, AX
	XORL	CX, CX
	CPUID
	MOVL	BX, AX
	SHRL	$24, AX
	MOVL	AX, AP_APICID(DI)
	MOVL	$0x81, R10			// APNoVMX
	TESTL	$(1<<5), CX			// CPUID.1:ECX.VMX
	JZ	fail

	MOVL	$MSR_FEATURE_CONTROL, CX
	RDMSR
	MOVL	AX, AP_FEATCTL(DI)
	MOVL	DX, (AP_FEATCTL+4)(DI)
	TESTL	$1, AX				// locked
	JNZ	locked
	ORL	$5, AX				// lock, VMX outside SMX
	WRMSR
	RDMSR
locked:
	MOVL	$0x82, R10			// APVMXLockedOff
	TESTL	$4, AX
	JZ	fail

	MOVL	$MSR_VMX_CR0_FIXED0, CX
	RDMSR
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	AX, R8
	MOVL	$MSR_VMX_CR0_FIXED1, CX
	RDMSR
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	CR0, BX
	ORQ	R8, BX
	ANDQ	AX, BX
	MOVQ	BX, CR0

	MOVL	$MSR_VMX_CR4_FIXED0, CX
	RDMSR
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	AX, R8
	MOVL	$MSR_VMX_CR4_FIXED1, CX
	RDMSR
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	CR4, BX
	ORQ	$CR4_VMXE, BX
	ORQ	R8, BX
	ANDQ	AX, BX
	MOVQ	BX, CR4

	MOVL	$MSR_VMX_BASIC, CX		// the revision identifier
	RDMSR
	ANDL	$0x7fffffff, AX
	MOVQ	AP_VMXON(DI), BX
	MOVL	AX, (BX)

	MOVL	$0x83, R10			// APVMXONFailed
	BYTE	$0xf3; BYTE $0x0f; BYTE $0xc7; BYTE $0x77; BYTE $AP_VMXON	// VMXON AP_VMXON(DI)
	JCS	fail
	JEQ	fail
	MOVL	$2, AP_STATUS(DI)		// APParked
	JMP	park
fail:
	MOVL	R10, AP_STATUS(DI)
park:
	CLI
	HLT
	JMP	park

// apNMI is a parked AP's NMI handler: back to the halt loop.
TEXT ·apNMI(SB),NOSPLIT|NOFRAME,$0
	IRETQ

// apFault is a parked AP's handler for every other vector: it halts.
TEXT ·apFault(SB),NOSPLIT|NOFRAME,$0
	CLI
halt:
	HLT
	JMP	halt

// func apEntryPC() uint64
TEXT ·apEntryPC(SB),NOSPLIT,$0-8
	MOVQ	$·apEntry(SB), AX
	MOVQ	AX, ret+0(FP)
	RET

// func apNMIPC() uint64
TEXT ·apNMIPC(SB),NOSPLIT,$0-8
	MOVQ	$·apNMI(SB), AX
	MOVQ	AX, ret+0(FP)
	RET

// func apFaultPC() uint64
TEXT ·apFaultPC(SB),NOSPLIT,$0-8
	MOVQ	$·apFault(SB), AX
	MOVQ	AX, ret+0(FP)
	RET

// func mmioRead32(pa uint64) uint32
TEXT ·mmioRead32(SB),NOSPLIT,$0-12
	MOVQ	pa+0(FP), AX
	MOVL	(AX), BX
	MOVL	BX, ret+8(FP)
	RET

// func mmioWrite32(pa uint64, v uint32)
TEXT ·mmioWrite32(SB),NOSPLIT,$0-12
	MOVQ	pa+0(FP), AX
	MOVL	v+8(FP), BX
	MOVL	BX, (AX)
	RET
