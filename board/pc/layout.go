// Package pc is a TamaGo board for PC-compatible machines (Bochs, QEMU pc
// and q35, real hardware) booted by GRUB with Multiboot 1.
//
// Its early start-up code (cpuinit, built with the linkcpuinit tag) masks
// the legacy 8259 PIC before interrupts are enabled, maps the first 4 GiB
// one to one, loads a GDT with a 64-bit TSS (VM entry needs a host TR) and
// enters the Go runtime. The runtime gets tamahv's RAM region; the
// Multiboot header makes the boot loader keep that whole region free, so
// the rest of memory belongs to the guest. The system timer is the TSC,
// calibrated against the PIT where CPUID does not give its frequency, and
// the console is COM1.
//
// Import it for its side effects in a GOOS=tamago build with the tags
// linkcpuinit and linkramsize.
package pc

// tamahv's RAM region and the fixed structures in its top 256 KiB, well
// above the Go stack, which starts StackOffset below RAMEnd (the runtime
// writes its start-up arguments just above that point). These must match
// layout_amd64.h (a test checks them).
const (
	RAMStart    = 0x10000000 // the tamago/amd64 runtime's RamStart
	RAMSize     = 0x08000000 // 128 MiB
	RAMEnd      = RAMStart + RAMSize
	StackOffset = 0x100000 // the Go stack starts this far below RAMEnd

	Reserved  = RAMEnd - 0x40000
	EarlyPML4 = Reserved + 0x0000
	EarlyPDPT = Reserved + 0x1000
	EarlyPD   = Reserved + 0x2000 // four tables: 4 GiB in 2 MiB pages
	GDT       = Reserved + 0x6000
	GDTR      = Reserved + 0x6100
	TSS       = Reserved + 0x7000
	// Scratch holds the page tables MapRAM adds for RAM above 4 GiB.
	Scratch    = Reserved + 0x10000
	ScratchEnd = RAMEnd
)

// GDT selectors.
const (
	SelectorCode = 0x08
	SelectorData = 0x10
	SelectorTSS  = 0x18
	TSSLimit     = 0x67
)
