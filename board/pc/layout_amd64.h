// Fixed addresses of tamahv's early structures; layout.go has the same
// numbers, layout_test.go checks they agree.

#define RAM_START	0x10000000
#define RAM_SIZE	0x08000000
#define STACK_OFFSET	0x100000
#define RESERVED	0x17fc0000
#define EARLY_PML4	0x17fc0000
#define EARLY_PDPT	0x17fc1000
#define EARLY_PD	0x17fc2000
#define GDT_BASE	0x17fc6000
#define GDTR_BASE	0x17fc6100
#define TSS_BASE	0x17fc7000

#define SEL_CODE	0x08
#define SEL_DATA	0x10
#define SEL_TSS		0x18

#define MSR_EFER	0xc0000080
#define MULTIBOOT_MAGIC	0x2badb002
