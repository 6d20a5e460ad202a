// QUIET_CPUID answers a CPUID exit from a QuietCPUID table (run.go's
// RunQuiet has the rules), or jumps to bail: q is the register holding
// the table, r the one holding the *GuestRegs the exit stored. It changes
// AX, BX, CX, DX and R9-R12. quiet_test.go ties the numbers to vmx's.

#define Q_EXIT_REASON		0x4402
#define Q_GUEST_RFLAGS		0x6820
#define Q_GUEST_CR4		0x6804
#define Q_GUEST_RIP		0x681e
#define Q_INSN_LEN		0x440c
#define Q_INTERRUPTIBILITY	0x4824
#define Q_EXIT_CPUID		10
#define Q_RFLAGS_TF		0x100
#define Q_BLOCKING_STI_MOVSS	3

#define QUIET_CPUID(q, r, bail) \
	MOVL	QuietCPUID_On(q), AX; \
	TESTL	AX, AX; \
	JZ	bail; \
	MOVQ	$Q_EXIT_REASON, DX; \
	VMREAD_RAX_RDX; \
	CMPQ	AX, $Q_EXIT_CPUID; \
	JNE	bail; \
	RDTSC; \
	SHLQ	$32, DX; \
	ORQ	DX, AX; \
	CMPQ	AX, QuietCPUID_Deadline(q); \
	JCC	bail; \
	MOVQ	$Q_GUEST_RFLAGS, DX; \
	VMREAD_RAX_RDX; \
	TESTQ	$Q_RFLAGS_TF, AX; \
	JNZ	bail; \
	MOVL	GuestRegs_RAX(r), R9; \
	MOVL	GuestRegs_RCX(r), R10; \
	LEAQ	QuietCPUID_Table(q), R11; \
	MOVL	QuietCPUID_N(q), R12; \
qclook: \
	TESTL	R12, R12; \
	JZ	bail; \
	CMPL	CPUIDAnswer_Leaf(R11), R9; \
	JNE	qcskip; \
	CMPL	CPUIDAnswer_Subleaf(R11), R10; \
	JEQ	qcfound; \
qcskip: \
	ADDQ	$CPUIDAnswer__size, R11; \
	DECL	R12; \
	JMP	qclook; \
qcfound: \
	MOVL	·nmis(SB), AX; \
	TESTL	AX, AX; \
	JNZ	bail; \
	MOVL	CPUIDAnswer_ECX(R11), BX; \
	MOVL	CPUIDAnswer_CR4Mask(R11), CX; \
	TESTL	CX, CX; \
	JZ	qcanswer; \
	MOVQ	$Q_GUEST_CR4, DX; \
	VMREAD_RAX_RDX; \
	TESTQ	CX, AX; \
	JZ	qcanswer; \
	ORL	CPUIDAnswer_ECXIfCR4(R11), BX; \
qcanswer: \
	MOVL	CPUIDAnswer_EAX(R11), AX; \
	MOVQ	AX, GuestRegs_RAX(r); \
	MOVL	CPUIDAnswer_EBX(R11), AX; \
	MOVQ	AX, GuestRegs_RBX(r); \
	MOVQ	BX, GuestRegs_RCX(r); \
	MOVL	CPUIDAnswer_EDX(R11), AX; \
	MOVQ	AX, GuestRegs_RDX(r); \
	MOVQ	$Q_INSN_LEN, DX; \
	VMREAD_RAX_RDX; \
	MOVQ	AX, BX; \
	MOVQ	$Q_GUEST_RIP, DX; \
	VMREAD_RAX_RDX; \
	ADDQ	BX, AX; \
	VMWRITE_RDX_RAX; \
	MOVQ	$Q_INTERRUPTIBILITY, DX; \
	VMREAD_RAX_RDX; \
	TESTL	$Q_BLOCKING_STI_MOVSS, AX; \
	JZ	qcdone; \
	ANDL	$~Q_BLOCKING_STI_MOVSS, AX; \
	VMWRITE_RDX_RAX; \
qcdone: \
	INCQ	QuietCPUID_Answered(q)
