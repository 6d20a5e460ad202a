package pc

import (
	"encoding/binary"
	"fmt"
	"time"
)

// apTrampoline is the code an application processor runs from its
// start-up IPI: real mode at CS = base>>4, IP = 0, to protected mode, to
// long mode on tamahv's page tables, then a jump to apEntry (in tamahv's
// image) with RDI pointing at the processor's parameter block (apParams).
// It is position dependent: Trampoline patches the addresses marked below.
// Assembled from (GNU as):
//
//	.code16
//	00 cli
//	01 cld
//	02 mov %cs, %ax
//	04 mov %ax, %ds
//	06 lgdtl gdtr               ; 66 0f 01 16 <gdtr offset:16>
//	0c mov %cr0, %eax
//	0f or $1, %eax              ; CR0.PE
//	13 mov %eax, %cr0
//	16 ljmpl $0x08, $pm32       ; 66 ea <base+0x1e:32> 08 00
//	.code32
//	1e mov $0x10, %ax
//	22 mov %ax, %ds / %es / %ss
//	28 mov %cr4, %eax
//	2b or $0xa0, %eax           ; CR4.PAE, CR4.PGE
//	30 mov %eax, %cr4
//	33 mov $cr3, %eax           ; b8 <cr3:32>
//	38 mov %eax, %cr3
//	3b mov $0xc0000080, %ecx    ; IA32_EFER
//	40 rdmsr
//	42 or $0x100, %eax          ; EFER.LME
//	47 wrmsr
//	49 mov %cr0, %eax
//	4c or $0x80000020, %eax     ; CR0.PG, CR0.NE
//	51 mov %eax, %cr0
//	54 ljmp $0x18, $lm64        ; ea <base+0x5b:32> 18 00
//	.code64
//	5b movabs $params, %rdi     ; 48 bf <params:64>
//	65 movabs $entry, %rax      ; 48 b8 <entry:64>
//	6f jmp *%rax
//	78 gdt: null, 32-bit code (0x08), data (0x10), 64-bit code (0x18)
//	98 gdtr: .word 31; .long base+0x78
var apTrampoline = [...]byte{
	0xfa, 0xfc, 0x8c, 0xc8, 0x8e, 0xd8, 0x66, 0x0f, 0x01, 0x16, 0x00, 0x00,
	0x0f, 0x20, 0xc0, 0x66, 0x83, 0xc8, 0x01, 0x0f, 0x22, 0xc0, 0x66, 0xea,
	0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8,
	0x8e, 0xc0, 0x8e, 0xd0, 0x0f, 0x20, 0xe0, 0x0d, 0xa0, 0x00, 0x00, 0x00,
	0x0f, 0x22, 0xe0, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x22, 0xd8, 0xb9,
	0x80, 0x00, 0x00, 0xc0, 0x0f, 0x32, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f,
	0x30, 0x0f, 0x20, 0xc0, 0x0d, 0x20, 0x00, 0x00, 0x80, 0x0f, 0x22, 0xc0,
	0xea, 0x00, 0x00, 0x00, 0x00, 0x18, 0x00, 0x48, 0xbf, 0x00, 0x00, 0x00,
	0x00, 0x00, 0x00, 0x00, 0x00, 0x48, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00,
	0x00, 0x00, 0x00, 0xff, 0xe0, 0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00,
	0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00,
	0x00, 0x9a, 0xcf, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00,
	0x00, 0x00, 0x00, 0x00, 0x00, 0x9a, 0x20, 0x00, 0x1f, 0x00, 0x00, 0x00,
	0x00, 0x00,
}

// Offsets in apTrampoline.
const (
	trGDTROperand = 0x0a // lgdtl's 16-bit displacement
	trPM32Target  = 0x18
	trPM32        = 0x1e
	trCR3         = 0x34
	trLM64Target  = 0x55
	trLM64        = 0x5b
	trParams      = 0x5d
	trEntry       = 0x67
	trGDT         = 0x78
	trGDTR        = 0x98
	trGDTRBase    = 0x9a
)

// Trampoline returns the AP start-up code for the page at base (4 KiB
// aligned, below 1 MiB: a start-up IPI's vector is base>>12), loading cr3
// (below 4 GiB) and jumping to entry with RDI = params.
func Trampoline(base uint32, cr3 uint64, entry, params uint64) ([]byte, error) {
	if base%4096 != 0 || base >= 1<<20 {
		return nil, fmt.Errorf("pc: AP trampoline at %#x: not a page below 1 MiB", base)
	}
	if cr3 >= 1<<32 {
		return nil, fmt.Errorf("pc: AP trampoline: CR3 %#x above 4 GiB", cr3)
	}
	b := apTrampoline
	le := binary.LittleEndian
	le.PutUint16(b[trGDTROperand:], trGDTR)
	le.PutUint32(b[trPM32Target:], base+trPM32)
	le.PutUint32(b[trCR3:], uint32(cr3))
	le.PutUint32(b[trLM64Target:], base+trLM64)
	le.PutUint64(b[trParams:], params)
	le.PutUint64(b[trEntry:], entry)
	le.PutUint32(b[trGDTRBase:], base+trGDT)
	return b[:], nil
}

// The AP parameter block, one page per AP, in tamahv's memory. apEntry
// (smp_amd64.s) reads and writes it at these offsets.
const (
	apGDTR     = 0  // 10 bytes: tamahv's GDT
	apIDTR     = 16 // 10 bytes: the parked APs' IDT
	apStack    = 32 // the AP's stack top
	apVMXON    = 40 // physical address of its VMXON region
	apStatus   = 48 // uint32, APStatus, written by the AP
	apAPICID   = 52 // uint32, the AP's initial APIC ID (CPUID)
	apFeatCtl  = 56 // IA32_FEATURE_CONTROL as the AP found it
	apParamLen = 64
)

// APStatus is how far an application processor got.
type APStatus uint32

// The statuses apEntry writes.
const (
	// APSilent: the processor never ran the trampoline.
	APSilent APStatus = 0
	// APStarted: it reached apEntry (an AP that stays here stopped
	// before VMX operation).
	APStarted APStatus = 1
	// APParked: it is in VMX root operation, halted with interrupts off:
	// INIT is blocked there and start-up IPIs are ignored.
	APParked APStatus = 2
	// APNoVMX: CPUID reports no VMX.
	APNoVMX APStatus = 0x81
	// APVMXLockedOff: IA32_FEATURE_CONTROL is locked with VMX off.
	APVMXLockedOff APStatus = 0x82
	// APVMXONFailed: VMXON failed.
	APVMXONFailed APStatus = 0x83
)

// String says in words how far the AP got.
func (s APStatus) String() string {
	switch s {
	case APSilent:
		return "did not start"
	case APStarted:
		return "started, not in VMX operation"
	case APParked:
		return "parked in VMX root operation"
	case APNoVMX:
		return "no VMX"
	case APVMXLockedOff:
		return "VMX locked off by IA32_FEATURE_CONTROL"
	case APVMXONFailed:
		return "VMXON failed"
	}
	return fmt.Sprintf("status %#x", uint32(s))
}

// Held reports whether the processor is under tamahv's control: in VMX
// root operation, where the guest's INIT and start-up IPIs cannot reach
// it.
func (s APStatus) Held() bool { return s == APParked }

// APParams builds an AP's parameter block.
func APParams(gdtr, idtr [10]byte, stackTop, vmxon uint64) [apParamLen]byte {
	var b [apParamLen]byte
	copy(b[apGDTR:], gdtr[:])
	copy(b[apIDTR:], idtr[:])
	binary.LittleEndian.PutUint64(b[apStack:], stackTop)
	binary.LittleEndian.PutUint64(b[apVMXON:], vmxon)
	return b
}

// Descriptor returns a GDTR or IDTR image: limit, then base.
func Descriptor(base uint64, limit uint16) [10]byte {
	var d [10]byte
	binary.LittleEndian.PutUint16(d[0:], limit)
	binary.LittleEndian.PutUint64(d[2:], base)
	return d
}

// ParkIDT fills a 256-entry IDT (4 KiB) for parked APs: NMI (vector 2)
// goes to nmi, which returns to the halt loop; every other vector to
// fault, which halts for good (SDM Vol. 3A, "64-Bit Mode IDT": 64-bit
// interrupt gates, present, DPL 0, selector code).
func ParkIDT(idt *[4096]byte, code uint16, nmi, fault uint64) {
	for v := 0; v < 256; v++ {
		h := fault
		if v == 2 {
			h = nmi
		}
		g := idt[v*16 : v*16+16]
		clear(g)
		binary.LittleEndian.PutUint16(g[0:], uint16(h))
		binary.LittleEndian.PutUint16(g[2:], code)
		g[5] = 0x8e
		binary.LittleEndian.PutUint16(g[6:], uint16(h>>16))
		binary.LittleEndian.PutUint32(g[8:], uint32(h>>32))
	}
}

// TrampolinePage picks the page for the AP trampoline: the highest page
// in [0x1000, 0x9f000) that the memory map gives as available RAM.
// regions are [start, end) pairs of available RAM.
func TrampolinePage(regions [][2]uint64) (uint32, error) {
	best := uint64(0)
	for _, r := range regions {
		lo := max(r[0], 0x1000)
		lo = (lo + 4095) &^ 4095
		hi := min(r[1], 0x9f000) &^ 4095
		if hi >= lo+4096 && hi-4096 > best {
			best = hi - 4096
		}
	}
	if best == 0 {
		return 0, fmt.Errorf("pc: no available page below 640 KiB for the AP trampoline")
	}
	return uint32(best), nil
}

// AP is an application processor StartAPs tried to start.
type AP struct {
	// APICID is its local APIC ID, from the firmware's table.
	APICID uint32
	// Status is how far it got; only an AP whose Status is Held is under
	// tamahv's control.
	Status APStatus
	// FeatureControl is IA32_FEATURE_CONTROL as the AP found it.
	FeatureControl uint64
	// Took is the time from INIT to its last report.
	Took time.Duration

	params   *[4096]byte
	paramsPA uint64 // the parameter block's address: the AP's GS base
	idtPA    uint64 // the APs' IDT
}

// Unheld returns the APIC IDs of the APs that answered but are not under
// tamahv's control: the guest could INIT and start them natively, so the
// guest must not run. An AP that never answered is not among them (it
// was sent INIT again and waits for a start-up IPI it would get only
// from the guest, which does not see it).
func Unheld(aps []AP) []uint32 {
	var ids []uint32
	for _, ap := range aps {
		if !ap.Status.Held() && ap.Status != APSilent {
			ids = append(ids, ap.APICID)
		}
	}
	return ids
}

// PackageProcessors returns the number of logical processors in the
// executing processor's package from CPUID leaf 0BH (SDM Vol. 2A, CPUID,
// "Extended Topology Enumeration Leaf"): EBX[15:0] of the last level
// whose type (ECX[15:8]) is not 0. leafB executes CPUID(0BH, subleaf).
// It returns 0 where the leaf enumerates nothing.
func PackageProcessors(leafB func(subleaf uint32) (eax, ebx, ecx, edx uint32)) int {
	n := 0
	for sub := uint32(0); sub < 8; sub++ {
		_, b, c, _ := leafB(sub)
		if c>>8&0xff == 0 {
			break
		}
		n = int(b & 0xffff)
	}
	return n
}
