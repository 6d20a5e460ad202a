//go:build tamago

#include "textflag.h"
#define SEL_CODE	0x08
#define SEL_DATA	0x10
#include "../../../vmx/vmx_amd64.h"
#include "apvcpu_amd64.h"

// Offsets in the AP parameter block (trampoline.go).
#define AP_GDTR		0
#define AP_IDTR		16
#define AP_STACK	32
#define AP_VMXON	40
#define AP_STATUS	48
#define AP_APICID	52
#define AP_FEATCTL	56
#define AP_CMD		64
#define AP_FLAGS	68
#define AP_ARG0		72
#define AP_ARG1		80
#define AP_RET0		88
#define AP_RET1		96
#define AP_RET2		104
#define AP_RET3		112
#define AP_GEN		120
#define AP_SEEN		128
#define AP_INGUEST	136
#define AP_NMIS		144
#define AP_STOP		148
#define AP_TICKS	152
#define AP_EPTDESC	160
#define AP_LAUNCH	176
#define AP_EXITRSP	184
#define AP_ENTRIES	192
#define AP_REGS		200
#define AP_BSPINGUEST	208
#define AP_BSPKICKS	216
#define AP_BSPAPIC	224
#define AP_WINDOW	232
#define AP_CUT		236
#define AP_TIMER	240
#define AP_CUTS		248
#define AP_SNAPN	256
#define AP_OPSN		260
#define AP_OPFAIL	264
#define AP_OPFLAGS	268
#define AP_SNAPOK	272
#define AP_FASTOK	280
#define AP_CPUIDN	284
#define AP_CPUIDTAB	288
#define AP_ANSWERED	296

// An answer in the CPUID table (cpuid.go's cpuidEntry).
#define CE_LEAF		0
#define CE_SUB		4
#define CE_EAX		8
#define CE_EBX		12
#define CE_ECX		16
#define CE_EDX		20
#define CE_CR4MASK	24
#define CE_ECXIFCR4	28
#define CE_SIZE		32
#define AP_SNAPF	512
#define AP_SNAPV	640
#define AP_OPS		1024
#define OP_SIZE		24

// Queued operations (mailbox.go).
#define OP_VMWRITE	1
#define OP_WRMSR	2
#define OP_XSETBV	3
#define OP_MMIOWRITE	4

// The local APIC (smp.go).
#define MSR_APIC_BASE	0x1b
#define APIC_BASE_EN	0x800
#define APIC_BASE_EXTD	0x400
#define MSR_X2APIC_ICR	0x830
#define LAPIC_ICR_LOW	0x300
#define LAPIC_ICR_HIGH	0x310
#define ICR_PENDING	0x1000
#define ICR_NMI		0x4400

// Mailbox commands (mailbox.go).
#define CMD_VMPTRLD	1
#define CMD_VMREAD	2
#define CMD_VMWRITE	3
#define CMD_CPUID	4
#define CMD_RDMSR	5
#define CMD_WRMSR	6
#define CMD_XSETBV	7
#define CMD_RUN		8
#define CMD_PARK	9
#define CMD_REGS	10
#define CMD_MMIOREAD	11
#define CMD_MMIOWRITE	12
#define CMD_FLUSH	13

// vmx.GuestRegs (vmx/run.go); apvcpu_test.go checks the offsets.
#define R_RAX	0
#define R_RCX	8
#define R_RDX	16
#define R_RBX	24
#define R_RBP	32
#define R_RSI	40
#define R_RDI	48
#define R_R8	56
#define R_R9	64
#define R_R10	72
#define R_R11	80
#define R_R12	88
#define R_R13	96
#define R_R14	104
#define R_R15	112
#define R_CR2	120

// VMCS fields (vmx/fields.go) and exit reasons the loop reads.
#define F_EXIT_REASON	0x4402
#define F_IDT_VECTORING	0x4408
#define F_ACTIVITY	0x4826
#define F_INTERRUPTIBILITY	0x4824
#define F_TIMER_VALUE	0x482e
#define BLOCKING_SMI	4
#define EXIT_PREEMPTION	52
#define EXIT_CPUID	10
#define F_RFLAGS	0x6820
#define F_GUEST_CR4	0x6804
#define F_GUEST_RIP	0x681e
#define F_INSN_LEN	0x440c
#define RFLAGS_TF	0x100
#define BLOCKING_STI_MOVSS	3
#define ACTIVITY_SIPI	3
#define MSR_GS_BASE	0xc0000101

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
	// GS base = the parameter block, before any NMI can arrive: the
	// NMI handler counts there (apNMI).
	MOVL	$MSR_GS_BASE, CX
	MOVQ	DI, AX
	MOVQ	DI, DX
	SHRQ	$32, DX
	WRMSR
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
	// CR4.OSXSAVE where the processor has XSAVE: the exit loop loads
	// the guest's XCR0 with XSETBV.
	MOVL	$1, AX
	XORL	CX, CX
	CPUID
	TESTL	$(1<<26), CX
	JZ	parked
	MOVQ	CR4, AX
	ORQ	$(1<<18), AX
	MOVQ	AX, CR4
parked:
	MOVL	$2, AP_STATUS(DI)		// APParked
	JMP	apLoop<>(SB)
fail:
	MOVL	R10, AP_STATUS(DI)
park:
	CLI
	HLT
	JMP	park

// apNMI is an AP's NMI handler in VMX root operation: it counts the NMI
// in the AP's parameter block (GS base) for the guest, as vmx.NMIHandler
// does on the bootstrap processor, and returns to the loop. An NMI that
// lands between the loop's mark in the guest and its VM entry (AP_WINDOW)
// would otherwise wait for the AP's next exit: it sets the entry's
// VMX-preemption timer to 0, so that the entry exits at once (SDM Vol.
// 3C, "VMX-Preemption Timer"), and the exit path hands the NMI over.
// IRETQ restores the flags the compare changes.
TEXT ·apNMI(SB),NOSPLIT|NOFRAME,$0
	LOCK_INCL_GS_NMIS
	CMPL_GS_WINDOW_0
	JEQ	nmiret
	PUSHQ	AX
	PUSHQ	DX
	XORL	AX, AX
	MOVQ	$F_TIMER_VALUE, DX
	VMWRITE_RDX_RAX
	MOVL_1_GS_CUT
	POPQ	DX
	POPQ	AX
nmiret:
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

// apLoop is an AP's exit loop, in VMX root operation with interrupts off
// and DI pointing at its parameter block, for as long as tamahv runs. It
// waits for a command from the bootstrap processor in the block's
// mailbox (mailbox.go), executes it, writes the results and clears the
// command. CMD_RUN enters the guest of the AP's current VMCS; at the exit
// the guest's registers are stored and the command cleared, except for a
// VMX-preemption-timer exit that interrupted no event delivery, after an
// entry the bootstrap processor found quiet (AP_FASTOK) and with no NMI
// waiting, and a CPUID its table answers (apCPUID): the loop answers
// those itself by entering again. Before every entry the loop
// keeps its part of the EPT shootdown (hv.Shootdown): it marks itself in
// the guest (not when the guest waits for a start-up IPI: it runs nothing
// there, and the IPI exits), then compares the generation with the one it
// last invalidated for; at every exit it marks itself out.
//
// The loop's stack is AP_EXITRSP, also HOST_RSP: 0(SP) holds the block's
// address for the exit path, 8(SP) is its scratch slot; an NMI's frame
// goes below. The loop is one function, entered at its start both from
// apLong (no guest registers to store yet: AP_REGS is 0) and at every VM
// exit (HOST_RIP), so that its jumps stay within it.
TEXT apLoop<>(SB),NOSPLIT|NOFRAME,$0
	MOVQ	AP_EXITRSP(DI), SP
	MOVQ	DI, 0(SP)
	JMP	apExit<>(SB)

// apExit is HOST_RIP of every AP's VMCS: RSP = HOST_RSP = AP_EXITRSP, the
// guest's registers live, interrupts off.
TEXT apExit<>(SB),NOSPLIT|NOFRAME,$0
	XCHGQ	DI, 0(SP)			// DI: the block; the guest's RDI in the slot
	MOVQ	SI, 8(SP)
	MOVQ	AP_REGS(DI), SI
	TESTQ	SI, SI
	JNZ	store
	MOVQ	DI, 0(SP)			// from apLong: no guest yet
	JMP	wait
store:
	MOVQ	AX, R_RAX(SI)
	MOVQ	CX, R_RCX(SI)
	MOVQ	DX, R_RDX(SI)
	MOVQ	BX, R_RBX(SI)
	MOVQ	BP, R_RBP(SI)
	MOVQ	R8, R_R8(SI)
	MOVQ	R9, R_R9(SI)
	MOVQ	R10, R_R10(SI)
	MOVQ	R11, R_R11(SI)
	MOVQ	R12, R_R12(SI)
	MOVQ	R13, R_R13(SI)
	MOVQ	R14, R_R14(SI)
	MOVQ	R15, R_R15(SI)
	MOVQ	0(SP), AX
	MOVQ	AX, R_RDI(SI)
	MOVQ	8(SP), AX
	MOVQ	AX, R_RSI(SI)
	MOVQ	DI, 0(SP)
	MOVQ	CR2, AX
	MOVQ	AX, R_CR2(SI)
	MOVQ	AP_INGUEST(DI), BX
	XORL	CX, CX
	XCHGL	CX, 0(BX)
	CALL	apUncut<>(SB)
	MOVQ	$1, AP_ARG1(DI)			// entered: VMRESUME from now on
	MOVL	AP_STOP(DI), AX
	TESTL	AX, AX
	JNZ	halt
	MOVQ	$F_EXIT_REASON, DX
	VMREAD_RAX_RDX
	TESTQ	AX, AX				// exception or NMI
	JNZ	reason
	// An NMI exit leaves NMIs blocked until an IRET, which VM entry
	// does not stand in for everywhere (Bochs): one to itself.
	CALL	apIRET<>(SB)
	XORL	AX, AX
reason:
	CMPQ	AX, $EXIT_CPUID
	JNE	timer
	CALL	apCPUID<>(SB)
	TESTL	AX, AX
	JNZ	post
	INCQ	AP_ANSWERED(DI)
	JMP	run
timer:
	CMPQ	AX, $EXIT_PREEMPTION
	JNE	post
	MOVQ	$F_IDT_VECTORING, DX
	VMREAD_RAX_RDX
	TESTL	$0x80000000, AX
	JNZ	post
	// NMIs that reached VMX root (a kick, or the guest's own) go to the
	// bootstrap processor with this exit: it matches them with its kicks.
	MOVL	AP_NMIS(DI), AX
	TESTL	AX, AX
	JNZ	post
	// So does the exit of a vCPU that is not quiet: something of
	// tamahv's waits for its next exit (hv.VCPU.Quiet).
	MOVL	AP_FASTOK(DI), AX
	TESTL	AX, AX
	JZ	post
	INCQ	AP_TICKS(DI)
	JMP	run
post:
	// The exit's snapshot: each field of AP_SNAPF into AP_SNAPV, its bit
	// in AP_SNAPOK where VMREAD succeeded.
	MOVL	AP_SNAPN(DI), R12
	XORL	R13, R13
	XORL	R14, R14
snap:
	CMPL	R13, R12
	JAE	snapped
	MOVL	AP_SNAPF(DI)(R13*4), DX
	VMREAD_RAX_RDX
	JCS	snapnext
	JEQ	snapnext
	MOVQ	AX, AP_SNAPV(DI)(R13*8)
	MOVL	R13, CX
	MOVL	$1, AX
	SHLQ	CX, AX
	ORQ	AX, R14
snapnext:
	INCL	R13
	JMP	snap
snapped:
	MOVQ	R14, AP_SNAPOK(DI)
	// Hand the exit over, then kick the bootstrap processor out of the
	// guest if it runs it: its handlers run only when it is in VMX root.
	// The XCHG orders the post before the load of its mark (its side:
	// mark, then look for posted exits; hv.Shootdown's pattern).
	MOVL	$0, AP_FLAGS(DI)
	XORL	AX, AX
	XCHGL	AX, AP_CMD(DI)
	MOVQ	AP_BSPINGUEST(DI), BX
	TESTQ	BX, BX
	JZ	wait
	MOVL	0(BX), AX
	TESTL	AX, AX
	JZ	wait
	MOVQ	AP_BSPKICKS(DI), R9
	// The NMI through this AP's local APIC (SDM Vol. 3A, "Issuing
	// Interprocessor Interrupts"), as the guest left it: not at all where
	// the guest disabled it; through the x2APIC's ICR MSR; or through the
	// xAPIC's, keeping the destination the guest may have written for
	// its own next IPI. Each NMI is counted before it goes, only if it
	// goes.
	MOVL	$MSR_APIC_BASE, CX
	RDMSR
	TESTL	$APIC_BASE_EN, AX
	JZ	wait
	TESTL	$APIC_BASE_EXTD, AX
	JNZ	x2apic
	ANDL	$0xfffff000, AX
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	AX, BX
	MOVL	$1000, CX
idle:
	MOVL	LAPIC_ICR_LOW(BX), AX
	TESTL	$ICR_PENDING, AX
	JZ	send
	PAUSE
	LOOP	idle
	JMP	wait
send:
	LOCK
	INCL	0(R9)
	MOVL	LAPIC_ICR_HIGH(BX), R8
	MOVL	AP_BSPAPIC(DI), AX
	SHLL	$24, AX
	MOVL	AX, LAPIC_ICR_HIGH(BX)
	MOVL	$ICR_NMI, LAPIC_ICR_LOW(BX)
	MOVL	$1000, CX
sent:
	MOVL	LAPIC_ICR_LOW(BX), AX
	TESTL	$ICR_PENDING, AX
	JZ	restore
	PAUSE
	LOOP	sent
restore:
	MOVL	R8, LAPIC_ICR_HIGH(BX)
	JMP	wait
x2apic:
	LOCK
	INCL	0(R9)
	MOVL	AP_BSPAPIC(DI), DX
	MOVL	$ICR_NMI, AX
	MOVL	$MSR_X2APIC_ICR, CX
	WRMSR
	JMP	wait

wait:
	MOVL	AP_CMD(DI), AX
	TESTL	AX, AX
	JNZ	dispatch
	PAUSE
	JMP	wait
dispatch:
	// The operations queued with the command come first.
	MOVL	AP_OPSN(DI), CX
	TESTL	CX, CX
	JZ	dispatched
	PUSHQ	AX
	CALL	apApply<>(SB)
	POPQ	AX
dispatched:
	CMPL	AX, $CMD_VMREAD
	JEQ	vmread
	CMPL	AX, $CMD_VMWRITE
	JEQ	vmwrite
	CMPL	AX, $CMD_RUN
	JEQ	runcmd
	CMPL	AX, $CMD_CPUID
	JEQ	cpuid
	CMPL	AX, $CMD_RDMSR
	JEQ	rdmsr
	CMPL	AX, $CMD_WRMSR
	JEQ	wrmsr
	CMPL	AX, $CMD_XSETBV
	JEQ	xsetbv
	CMPL	AX, $CMD_VMPTRLD
	JEQ	vmptrld
	CMPL	AX, $CMD_REGS
	JEQ	regs
	CMPL	AX, $CMD_MMIOREAD
	JEQ	mmioread
	CMPL	AX, $CMD_MMIOWRITE
	JEQ	mmiowrite
	CMPL	AX, $CMD_PARK
	JEQ	halt
	CMPL	AX, $CMD_FLUSH
	JEQ	flush
	MOVL	$-1, AX				// unknown command
done:
	// AX: RFLAGS after the instruction (CF or ZF: it failed), or 0.
	MOVL	AX, AP_FLAGS(DI)
	XORL	AX, AX
	XCHGL	AX, AP_CMD(DI)			// results first: XCHG orders them
	JMP	wait

flush:
	XORL	AX, AX
	JMP	done

vmread:
	MOVQ	AP_ARG0(DI), DX
	VMREAD_RAX_RDX
	PUSHFQ
	POPQ	BX
	MOVQ	AX, AP_RET0(DI)
	MOVQ	BX, AX
	JMP	done

vmwrite:
	MOVQ	AP_ARG0(DI), DX
	MOVQ	AP_ARG1(DI), AX
	VMWRITE_RDX_RAX
	PUSHFQ
	POPQ	AX
	JMP	done

vmptrld:
	LEAQ	AP_ARG0(DI), AX
	VMCLEAR_RAX
	PUSHFQ
	POPQ	BX
	TESTQ	$0x41, BX			// CF or ZF
	JNZ	vmptrldFailed
	LEAQ	AP_ARG0(DI), AX
	VMPTRLD_RAX
	PUSHFQ
	POPQ	BX
vmptrldFailed:
	MOVQ	BX, AX
	JMP	done

cpuid:
	MOVL	AP_ARG0(DI), AX
	MOVL	AP_ARG1(DI), CX
	CPUID
	MOVQ	AX, AP_RET0(DI)
	MOVQ	BX, AP_RET1(DI)
	MOVQ	CX, AP_RET2(DI)
	MOVQ	DX, AP_RET3(DI)
	XORL	AX, AX
	JMP	done

rdmsr:
	MOVL	AP_ARG0(DI), CX
	RDMSR
	SHLQ	$32, DX
	ORQ	DX, AX
	MOVQ	AX, AP_RET0(DI)
	XORL	AX, AX
	JMP	done

wrmsr:
	MOVL	AP_ARG0(DI), CX
	MOVQ	AP_ARG1(DI), AX
	MOVQ	AX, DX
	SHRQ	$32, DX
	WRMSR
	XORL	AX, AX
	JMP	done

xsetbv:
	MOVL	AP_ARG0(DI), CX
	MOVQ	AP_ARG1(DI), AX
	MOVQ	AX, DX
	SHRQ	$32, DX
	XSETBV_
	XORL	AX, AX
	JMP	done

regs:
	MOVQ	CR0, AX
	MOVQ	AX, AP_RET0(DI)
	MOVQ	CR3, AX
	MOVQ	AX, AP_RET1(DI)
	MOVQ	CR4, AX
	MOVQ	AX, AP_RET2(DI)
	XORL	AX, AX
	JMP	done

mmioread:
	MOVQ	AP_ARG0(DI), BX
	MOVL	0(BX), AX
	MOVQ	AX, AP_RET0(DI)
	XORL	AX, AX
	JMP	done

mmiowrite:
	MOVQ	AP_ARG0(DI), BX
	MOVQ	AP_ARG1(DI), AX
	MOVL	AX, 0(BX)
	XORL	AX, AX
	JMP	done

halt:
	// Parked for good: NMIs are counted and return here.
	CLI
	HLT
	JMP	halt

runcmd:
	// AP_ARG0: the vmx.GuestRegs; AP_ARG1: launched (VMRESUME). Not
	// after a queued operation failed: the VMCS is not what the
	// bootstrap processor made it.
	MOVL	AP_OPFAIL(DI), AX
	TESTL	AX, AX
	JZ	runregs
	MOVL	AP_OPFLAGS(DI), AX
	JMP	done
runregs:
	MOVQ	AP_ARG0(DI), AX
	MOVQ	AX, AP_REGS(DI)
run:
	MOVL	AP_STOP(DI), AX
	TESTL	AX, AX
	JNZ	halt
	MOVQ	$F_ACTIVITY, DX
	VMREAD_RAX_RDX
	MOVQ	AP_INGUEST(DI), BX
	XORL	CX, CX
	CMPQ	AX, $ACTIVITY_SIPI
	JEQ	mark
	MOVL	$1, CX
mark:
	XCHGL	CX, 0(BX)			// a full barrier before the load
	MOVQ	AP_GEN(DI), BX
	MOVQ	0(BX), R8
	MOVQ	AP_SEEN(DI), BX
	CMPQ	R8, 0(BX)
	JEQ	window
	LEAQ	AP_EPTDESC(DI), AX
	MOVQ	$2, DX				// all-context
	INVEPT_RDX_RAX
	MOVQ	R8, 0(BX)
window:
	// Marked in the guest, a kick may come: from here to the VM exit an
	// NMI cuts the entry (apNMI). One that came since the bootstrap
	// processor last took them cuts it now.
	MOVQ	AP_INGUEST(DI), BX
	MOVL	0(BX), AX
	TESTL	AX, AX
	JZ	enter
	MOVQ	$F_TIMER_VALUE, DX
	VMREAD_RAX_RDX
	MOVL	AX, AP_TIMER(DI)
	MOVL	$1, AP_WINDOW(DI)
	MOVL	AP_NMIS(DI), AX
	TESTL	AX, AX
	JZ	enter
	XORL	AX, AX
	VMWRITE_RDX_RAX
	MOVL	$1, AP_CUT(DI)
enter:
	// Blocking by SMI outside SMM fails VM entry; Bochs saves it for an
	// AP it started (its SMIs stay disabled), so it goes.
	MOVQ	$F_INTERRUPTIBILITY, DX
	VMREAD_RAX_RDX
	TESTL	$BLOCKING_SMI, AX
	JZ	counted
	ANDL	$~BLOCKING_SMI, AX
	VMWRITE_RDX_RAX
counted:
	INCQ	AP_ENTRIES(DI)
	MOVQ	AP_REGS(DI), SI
	MOVQ	R_CR2(SI), AX
	MOVQ	AX, CR2
	MOVQ	AP_ARG1(DI), BX
	TESTQ	BX, BX
	JNE	loadregs
	MOVL	$1, AP_LAUNCH(DI)		// the first entry: VMLAUNCH
loadregs:
	MOVQ	R_RAX(SI), AX
	MOVQ	R_RCX(SI), CX
	MOVQ	R_RDX(SI), DX
	MOVQ	R_RBP(SI), BP
	MOVQ	R_R8(SI), R8
	MOVQ	R_R9(SI), R9
	MOVQ	R_R10(SI), R10
	MOVQ	R_R11(SI), R11
	MOVQ	R_R12(SI), R12
	MOVQ	R_R13(SI), R13
	MOVQ	R_R14(SI), R14
	MOVQ	R_R15(SI), R15
	TESTQ	BX, BX
	MOVQ	R_RBX(SI), BX			// MOV leaves the flags alone
	MOVQ	R_RDI(SI), DI
	MOVQ	R_RSI(SI), SI
	JNE	resume
	VMLAUNCH
	JMP	entryFailed
resume:
	VMRESUME
entryFailed:
	PUSHFQ
	POPQ	AX
	MOVQ	0(SP), DI
	MOVQ	AP_INGUEST(DI), BX
	XORL	CX, CX
	XCHGL	CX, 0(BX)
	MOVQ	AX, 8(SP)
	CALL	apUncut<>(SB)
	MOVQ	8(SP), AX
	MOVQ	AP_ARG1(DI), BX
	TESTQ	BX, BX
	JNE	done
	MOVL	$2, AP_LAUNCH(DI)		// VMLAUNCH failed
	JMP	done

// apUncut closes an AP's entry window (DI: its parameter block) once it
// is out of the guest, and gives a cut entry's VMX-preemption timer value
// back. It changes AX and DX.
TEXT apUncut<>(SB),NOSPLIT|NOFRAME,$0
	MOVL	$0, AP_WINDOW(DI)
	MOVL	AP_CUT(DI), AX
	TESTL	AX, AX
	JZ	uncut
	MOVL	$0, AP_CUT(DI)
	INCQ	AP_CUTS(DI)
	MOVL	AP_TIMER(DI), AX
	MOVQ	$F_TIMER_VALUE, DX
	VMWRITE_RDX_RAX
uncut:
	RET

// apCPUID answers a CPUID exit from the AP's table (AP_CPUIDTAB,
// AP_CPUIDN answers; DI: the parameter block) where the bootstrap
// processor found the entry quiet (AP_FASTOK), no NMI waits to be handed
// over, and the guest does not single-step (RFLAGS.TF): the guest's EAX,
// EBX, ECX and EDX get the answer for its EAX and ECX, and RIP moves past
// the instruction, which ends blocking by STI and MOV SS, as the Go
// handler's Next does. AX is 0 where it answered, else 1 (the exit is
// handed over). It changes AX, BX, CX, DX, SI and R8-R11.
TEXT apCPUID<>(SB),NOSPLIT|NOFRAME,$0
	MOVL	AP_FASTOK(DI), AX
	TESTL	AX, AX
	JZ	no
	MOVL	AP_NMIS(DI), AX
	TESTL	AX, AX
	JNZ	no
	MOVQ	$F_RFLAGS, DX
	VMREAD_RAX_RDX
	TESTQ	$RFLAGS_TF, AX
	JNZ	no
	MOVQ	AP_REGS(DI), SI
	MOVL	R_RAX(SI), R8
	MOVL	R_RCX(SI), R9
	MOVQ	AP_CPUIDTAB(DI), R10
	MOVL	AP_CPUIDN(DI), R11
look:
	TESTL	R11, R11
	JZ	no
	CMPL	CE_LEAF(R10), R8
	JNE	skip
	CMPL	CE_SUB(R10), R9
	JEQ	found
skip:
	ADDQ	$CE_SIZE, R10
	DECL	R11
	JMP	look
found:
	MOVL	CE_ECX(R10), BX
	MOVL	CE_CR4MASK(R10), CX
	TESTL	CX, CX
	JZ	answer
	MOVQ	$F_GUEST_CR4, DX
	VMREAD_RAX_RDX
	TESTQ	CX, AX
	JZ	answer
	ORL	CE_ECXIFCR4(R10), BX
answer:
	// 32-bit moves: CPUID clears the registers' upper halves.
	MOVL	CE_EAX(R10), AX
	MOVQ	AX, R_RAX(SI)
	MOVL	CE_EBX(R10), AX
	MOVQ	AX, R_RBX(SI)
	MOVQ	BX, R_RCX(SI)
	MOVL	CE_EDX(R10), AX
	MOVQ	AX, R_RDX(SI)
	MOVQ	$F_INSN_LEN, DX
	VMREAD_RAX_RDX
	MOVQ	AX, BX
	MOVQ	$F_GUEST_RIP, DX
	VMREAD_RAX_RDX
	ADDQ	BX, AX
	VMWRITE_RDX_RAX
	MOVQ	$F_INTERRUPTIBILITY, DX
	VMREAD_RAX_RDX
	TESTL	$BLOCKING_STI_MOVSS, AX
	JZ	answered
	ANDL	$~BLOCKING_STI_MOVSS, AX
	VMWRITE_RDX_RAX
answered:
	XORL	AX, AX
	RET
no:
	MOVL	$1, AX
	RET

// apApply carries out the operations queued in the parameter block (DI),
// in order, and zeroes their count. The first that fails is recorded: 1 +
// its index in AP_OPFAIL (unless one is recorded already), its RFLAGS in
// AP_OPFLAGS. It changes AX, BX, CX, DX, R8 and R12-R14.
TEXT apApply<>(SB),NOSPLIT|NOFRAME,$0
	MOVL	AP_OPSN(DI), R12
	XORL	R13, R13
	LEAQ	AP_OPS(DI), R14
next:
	CMPL	R13, R12
	JAE	applied
	MOVQ	0(R14), R8
	MOVQ	8(R14), DX
	MOVQ	16(R14), AX
	CMPQ	R8, $OP_VMWRITE
	JEQ	opvmwrite
	CMPQ	R8, $OP_WRMSR
	JEQ	opwrmsr
	CMPQ	R8, $OP_XSETBV
	JEQ	opxsetbv
	CMPQ	R8, $OP_MMIOWRITE
	JEQ	opmmio
	MOVL	$-1, BX				// unknown operation
	JMP	opfailed
opvmwrite:
	VMWRITE_RDX_RAX
	PUSHFQ
	POPQ	BX
	TESTQ	$0x41, BX			// CF or ZF
	JNZ	opfailed
	JMP	opnext
opwrmsr:
	MOVL	DX, CX
	MOVQ	AX, DX
	SHRQ	$32, DX
	WRMSR
	JMP	opnext
opxsetbv:
	MOVL	DX, CX
	MOVQ	AX, DX
	SHRQ	$32, DX
	XSETBV_
	JMP	opnext
opmmio:
	MOVL	AX, 0(DX)
	JMP	opnext
opfailed:
	MOVL	AP_OPFAIL(DI), CX
	TESTL	CX, CX
	JNZ	opnext
	MOVL	R13, CX
	INCL	CX
	MOVL	CX, AP_OPFAIL(DI)
	MOVL	BX, AP_OPFLAGS(DI)
opnext:
	INCL	R13
	ADDQ	$OP_SIZE, R14
	JMP	next
applied:
	MOVL	$0, AP_OPSN(DI)
	RET

// apIRET returns to its caller through IRETQ, ending the blocking of
// NMIs an NMI exit left.
TEXT apIRET<>(SB),NOSPLIT|NOFRAME,$0
	POPQ	AX
	MOVQ	SP, BX
	XORQ	CX, CX
	MOVW	SS, CX
	PUSHQ	CX
	PUSHQ	BX
	PUSHFQ
	MOVW	CS, CX
	PUSHQ	CX
	PUSHQ	AX
	IRETQ

// func apExitPC() uint64
TEXT ·apExitPC(SB),NOSPLIT,$0-8
	MOVQ	$apExit<>(SB), AX
	MOVQ	AX, ret+0(FP)
	RET
