//go:build tamago && linkcpuinit

#include "textflag.h"
#include "layout_amd64.h"

// cpuinit is the image's entry point (runtime/goos.CPUInit jumps here).
//
// GRUB arrives in 32-bit protected mode with paging off, EAX holding the
// Multiboot magic and EBX the information structure (Multiboot
// Specification 0.6.96, "3.2 Machine state"). The Go assembler only knows
// 64-bit mode, so up to the far return below this code uses only
// instructions that encode the same in both modes: 32-bit operands, no REX
// prefix, no RIP-relative operand.
TEXT cpuinit(SB),NOSPLIT|NOFRAME,$0
	CLI
	MOVL	AX, SI			// keep the Multiboot magic
	MOVL	BX, BP			// and the information pointer
	MOVL	$(RESERVED+0x10000), SP	// early stack, top of the reserved area

	// Reinitialise both 8259 PICs onto vectors 0x20-0x2f and mask every
	// line (ICW1-ICW4, then OCW1 = 0xff). The BIOS left IRQ0, the timer, on
	// vector 8, which long mode takes for #DF; reinitialising also drops a
	// request already latched, which masking alone would leave to arrive
	// as a spurious IRQ 7 once interrupts are on.
	MOVB	$0x11, AL		// ICW1: edge, cascade, ICW4 follows
	MOVW	$0x20, DX
	OUTB
	MOVW	$0xa0, DX
	OUTB
	MOVB	$0x20, AL		// ICW2: master base vector
	MOVW	$0x21, DX
	OUTB
	MOVB	$0x28, AL		// ICW2: slave base vector
	MOVW	$0xa1, DX
	OUTB
	MOVB	$0x04, AL		// ICW3: slave on IRQ2
	MOVW	$0x21, DX
	OUTB
	MOVB	$0x02, AL		// ICW3: slave identity
	MOVW	$0xa1, DX
	OUTB
	MOVB	$0x01, AL		// ICW4: 8086 mode
	MOVW	$0x21, DX
	OUTB
	MOVW	$0xa1, DX
	OUTB
	MOVB	$0xff, AL		// OCW1: mask all
	MOVW	$0x21, DX
	OUTB
	MOVW	$0xa1, DX
	OUTB

	// Clear the early tables, GDT and TSS (0x8000 bytes).
	MOVL	$RESERVED, DI
	XORL	AX, AX
	MOVL	$(0x8000/4), CX
	CLD
	REP;	STOSL

	// Identity map of the first 4 GiB with 2 MiB pages; the top GiB
	// (LAPIC, I/O APIC, MMIO) uncached (Intel SDM Vol. 3A, "4-Level
	// Paging and 5-Level Paging").
	MOVL	$EARLY_PML4, DI
	MOVL	$(EARLY_PDPT|3), (DI)		// P, R/W
	MOVL	$EARLY_PDPT, DI
	MOVL	$(EARLY_PD+0x0000|3), 0(DI)
	MOVL	$(EARLY_PD+0x1000|3), 8(DI)
	MOVL	$(EARLY_PD+0x2000|3), 16(DI)
	MOVL	$(EARLY_PD+0x3000|3), 24(DI)
	MOVL	$EARLY_PD, DI
	MOVL	$0x83, AX			// P, R/W, PS
pde:
	MOVL	AX, BX
	CMPL	AX, $0xc0000000
	JCS	cached
	ORL	$0x18, BX			// PWT, PCD
cached:
	MOVL	BX, (DI)
	ADDL	$8, DI
	ADDL	$0x200000, AX
	JCC	pde				// until the address wraps at 4 GiB

	// GDT: null, 64-bit code, data, 64-bit available TSS (SDM Vol. 3A,
	// "Segment Descriptors", "TSS Descriptor in 64-bit mode").
	MOVL	$GDT_BASE, DI
	MOVL	$0x00209a00, (SEL_CODE+4)(DI)	// P, S, execute/read, L
	MOVL	$0x0000ffff, SEL_DATA(DI)
	MOVL	$0x00cf9200, (SEL_DATA+4)(DI)	// P, S, read/write, G, D/B
	MOVL	$(((TSS_BASE&0xffff)<<16)|0x67), SEL_TSS(DI)
	MOVL	$((TSS_BASE&0xff000000)|0x8900|((TSS_BASE>>16)&0xff)), (SEL_TSS+4)(DI)
	MOVL	$TSS_BASE, DI
	MOVW	$0x68, 0x66(DI)			// I/O map base beyond the limit: no bitmap
	MOVL	$GDTR_BASE, DI
	MOVW	$(5*8-1), (DI)
	MOVL	$GDT_BASE, 2(DI)
	LGDT	(DI)

	// Long mode: CR4.PAE and PGE, CR3, EFER.LME, then CR0.PG with NE
	// (which VMXON needs) and PE. CR4.OSXSAVE is cleared whatever the
	// loader left: the Go runtime then finds no AVX (internal/cpu needs
	// OSXSAVE and XCR0.AVX), so tamahv's code never depends on XCR0,
	// which the guest sets (hv handleXSETBV) and tamahv does not switch.
	MOVL	CR4, AX
	ANDL	$~(1<<18), AX
	ORL	$((1<<5)|(1<<7)), AX
	MOVL	AX, CR4
	MOVL	$EARLY_PML4, AX
	MOVL	AX, CR3
	MOVL	$MSR_EFER, CX
	RDMSR
	ORL	$(1<<8), AX
	WRMSR
	MOVL	CR0, AX
	ORL	$((1<<31)|(1<<5)|(1<<0)), AX
	MOVL	AX, CR0

	// Far return into the 64-bit code segment. LEAL assembles
	// RIP-relative; in 32-bit mode the same bytes load the displacement,
	// to which the address of the next instruction is added.
	CALL	·here<>(SB)
	LEAL	·long<>(SB), BX
	ADDL	$6, AX				// the length of LEAL
	ADDL	BX, AX
	PUSHQ	$SEL_CODE
	PUSHQ	AX
	BYTE	$0xcb				// RETF (32-bit)

// here returns its return address in AX (valid in 32-bit and 64-bit mode).
TEXT ·here<>(SB),NOSPLIT|NOFRAME,$0
	MOVL	(SP), AX
	RET

TEXT ·long<>(SB),NOSPLIT|NOFRAME,$0
	MOVW	$SEL_DATA, AX
	MOVW	AX, DS
	MOVW	AX, ES
	MOVW	AX, SS
	XORL	AX, AX
	MOVW	AX, FS
	MOVW	AX, GS
	MOVW	$SEL_TSS, AX
	BYTE	$0x0f; BYTE $0x00; BYTE $0xd8	// LTR AX
	MOVL	SI, ·bootMagic(SB)
	MOVL	BP, ·bootInfo(SB)

	CALL	sse_enable(SB)

	MOVQ	runtime∕goos·RamStart(SB), SP
	ADDQ	runtime∕goos·RamSize(SB), SP
	SUBQ	runtime∕goos·RamStackOffset(SB), SP
	STI	// the PICs are masked; nothing is armed yet
	JMP	_rt0_tamago_start(SB)
