package pc

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Entry32 is where a kernel's 32-bit boot protocol starts
// (Documentation/arch/x86/boot.rst, "32-bit Boot Protocol"): protected
// mode with paging off, the GDT at GDTBase holding flat segments CodeSel
// and DataSel, interrupts off, ESI the boot parameters, EBX, EDI and EBP
// zero.
type Entry32 struct {
	EIP, ESI         uint32
	GDTBase          uint32
	GDTLimit         uint16
	CodeSel, DataSel uint16
}

// longModeExit leaves long mode for the 32-bit boot protocol: from 64-bit
// code it loads the kernel's GDT and far-returns to its code segment
// (compatibility mode), which turns paging off (long mode ends), clears
// EFER.LME and CR4, loads the data segments and jumps to the kernel. It
// must run from memory mapped one to one below 2 GiB (its far return
// pushes a 32-bit address; paging goes off under it). Assembled from (GNU
// as):
//
//	.code64
//	00 cli
//	01 lgdt gdtr(%rip)          ; 0f 01 15 <rel32>
//	08 pushq $codesel           ; 68 <codesel:32>
//	0d pushq $pm32              ; 68 <base+0x13:32>
//	12 lretq                    ; 48 cb
//	.code32
//	14 pm32: mov %cr0, %eax
//	17 and $0x7fffffff, %eax    ; CR0.PG off: long mode ends
//	1c mov %eax, %cr0
//	1f mov $0xc0000080, %ecx    ; IA32_EFER
//	24 rdmsr
//	26 and $0xfffffeff, %eax    ; EFER.LME off
//	2b wrmsr
//	2d xor %eax, %eax
//	2f mov %eax, %cr4           ; PAE, PGE and the rest off
//	32 mov $datasel, %eax       ; b8 <datasel:32>
//	37 mov %eax, %ds / %es / %ss / %fs / %gs
//	41 mov $params, %esi        ; be <params:32>
//	46 mov $entry, %eax         ; b8 <entry:32>
//	4b xor %ebx, %ebx
//	4d xor %edi, %edi
//	4f xor %ebp, %ebp
//	51 jmp *%eax
//	53 gdtr: .word limit; .quad base
var longModeExit = [...]byte{
	0xfa, 0x0f, 0x01, 0x15, 0x00, 0x00, 0x00, 0x00, 0x68, 0x00, 0x00, 0x00,
	0x00, 0x68, 0x00, 0x00, 0x00, 0x00, 0x48, 0xcb, 0x0f, 0x20, 0xc0, 0x25,
	0xff, 0xff, 0xff, 0x7f, 0x0f, 0x22, 0xc0, 0xb9, 0x80, 0x00, 0x00, 0xc0,
	0x0f, 0x32, 0x25, 0xff, 0xfe, 0xff, 0xff, 0x0f, 0x30, 0x31, 0xc0, 0x0f,
	0x22, 0xe0, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e,
	0xd0, 0x8e, 0xe0, 0x8e, 0xe8, 0xbe, 0x00, 0x00, 0x00, 0x00, 0xb8, 0x00,
	0x00, 0x00, 0x00, 0x31, 0xdb, 0x31, 0xff, 0x31, 0xed, 0xff, 0xe0,
	0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // gdtr
}

// Offsets in longModeExit: where the code leaves 64-bit mode, and the
// fields LongModeExit patches.
const (
	lmxGDTRRel  = 0x04 // lgdt's rel32, from the end of lgdt (0x08)
	lmxCodeSel  = 0x09
	lmxPM32Addr = 0x0e
	lmxPM32     = 0x14
	lmxDataSel  = 0x33
	lmxParams   = 0x42
	lmxEntry    = 0x47
	lmxGDTR     = 0x53
)

// ErrLongModeExit is LongModeExit's error for an entry it cannot reach.
var ErrLongModeExit = errors.New("pc: long mode exit")

// LongModeExit returns the code that leaves long mode for e, to be run
// from physical address base (mapped one to one): base, and with it the
// whole code, must lie below 2 GiB, and e's code selector must be a
// descriptor of e's GDT.
func LongModeExit(base uint64, e Entry32) ([]byte, error) {
	if base+uint64(len(longModeExit)) > 1<<31 {
		return nil, fmt.Errorf("%w: code at %#x, above 2 GiB", ErrLongModeExit, base)
	}
	if e.CodeSel&7 != 0 || e.DataSel&7 != 0 || e.CodeSel == 0 || e.DataSel == 0 ||
		uint32(e.CodeSel)+7 > uint32(e.GDTLimit) || uint32(e.DataSel)+7 > uint32(e.GDTLimit) {
		return nil, fmt.Errorf("%w: selectors %#x and %#x in a GDT of limit %#x", ErrLongModeExit, e.CodeSel, e.DataSel, e.GDTLimit)
	}
	b := longModeExit
	le := binary.LittleEndian
	le.PutUint32(b[lmxGDTRRel:], lmxGDTR-(lmxGDTRRel+4))
	le.PutUint32(b[lmxCodeSel:], uint32(e.CodeSel))
	le.PutUint32(b[lmxPM32Addr:], uint32(base+lmxPM32))
	le.PutUint32(b[lmxDataSel:], uint32(e.DataSel))
	le.PutUint32(b[lmxParams:], e.ESI)
	le.PutUint32(b[lmxEntry:], e.EIP)
	le.PutUint16(b[lmxGDTR:], e.GDTLimit)
	le.PutUint64(b[lmxGDTR+2:], uint64(e.GDTBase))
	return b[:], nil
}
