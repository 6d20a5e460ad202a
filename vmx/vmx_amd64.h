// VMX instructions as bytes: the Go assembler has no VMX mnemonics. Each
// line is "#define NAME bytes // the instruction in Intel syntax";
// insn_test.go decodes every one and compares it with that comment.
// Opcodes: SDM Vol. 2 and Vol. 3C, "Chapter 31 VMX Instruction Reference".

#define VMXON_RAX	BYTE $0xf3; BYTE $0x0f; BYTE $0xc7; BYTE $0x30	// vmxon QWORD PTR [rax]
#define VMCLEAR_RAX	BYTE $0x66; BYTE $0x0f; BYTE $0xc7; BYTE $0x30	// vmclear QWORD PTR [rax]
#define VMPTRLD_RAX	BYTE $0x0f; BYTE $0xc7; BYTE $0x30	// vmptrld QWORD PTR [rax]
#define VMREAD_RAX_RDX	BYTE $0x0f; BYTE $0x78; BYTE $0xd0	// vmread rax,rdx
#define VMWRITE_RDX_RAX	BYTE $0x0f; BYTE $0x79; BYTE $0xd0	// vmwrite rdx,rax
#define VMLAUNCH	BYTE $0x0f; BYTE $0x01; BYTE $0xc2	// vmlaunch
#define VMRESUME	BYTE $0x0f; BYTE $0x01; BYTE $0xc3	// vmresume
#define VMXOFF	BYTE $0x0f; BYTE $0x01; BYTE $0xc4	// vmxoff
#define VMCALL	BYTE $0x0f; BYTE $0x01; BYTE $0xc1	// vmcall
#define INVEPT_RDX_RAX	BYTE $0x66; BYTE $0x0f; BYTE $0x38; BYTE $0x80; BYTE $0x10	// invept rdx,OWORD PTR [rax]
#define INVVPID_RDX_RAX	BYTE $0x66; BYTE $0x0f; BYTE $0x38; BYTE $0x81; BYTE $0x10	// invvpid rdx,OWORD PTR [rax]
