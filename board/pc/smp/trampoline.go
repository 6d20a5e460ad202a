package smp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"strings"
	"time"

	"github.com/tamahv/tamahv/board/pc/acpi"
	"github.com/tamahv/tamahv/vmx"
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
		return nil, fmt.Errorf("smp: AP trampoline at %#x: not a page below 1 MiB", base)
	}
	if cr3 >= 1<<32 {
		return nil, fmt.Errorf("smp: AP trampoline: CR3 %#x above 4 GiB", cr3)
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
		return 0, fmt.Errorf("smp: no available page below 640 KiB for the AP trampoline")
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
	paramsPA uint64      // the parameter block's address: the AP's GS base
	idtPA    uint64      // the APs' IDT
	cpuid    *[4096]byte // the CPUID answers its exit loop gives itself
	cpuidPA  uint64
}

// Topology is what CPUID tells of the bootstrap processor's package.
type Topology struct {
	// Logical is the number of logical processors in the package (1 at
	// least).
	Logical int
	// Shift is the number of low APIC ID bits that tell the package's
	// logical processors apart: processors whose APIC IDs agree above
	// them are in the same package.
	Shift uint
	// Leaf says which CPUID leaf gave the numbers.
	Leaf string
}

// PackageTopology reads the executing processor's package from CPUID
// (SDM Vol. 2A, CPUID; Vol. 3A, "Hierarchical Mapping of Shared
// Resources"). cpuid executes CPUID. Leaf 0BH, where its first subleaf
// enumerates a level: the last level's logical processors (EBX[15:0]) and
// APIC ID shift (EAX[4:0]). Else leaf 1: with HTT, EBX[23:16], the
// package's largest number of logical processor IDs, and the bits they
// take; without, one processor. (Bochs, for one, answers leaf 0BH with a
// level of type 0 and the number of packages in EBX where each package
// has one core of one thread; that is leaf 1's case.)
func PackageTopology(cpuid func(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)) Topology {
	if top, _, _, _ := cpuid(0, 0); top >= vmx.CPUIDLeafTopology {
		var t Topology
		for sub := uint32(0); sub < 8; sub++ {
			a, b, c, _ := cpuid(vmx.CPUIDLeafTopology, sub)
			if c>>8&0xff == 0 {
				break
			}
			t = Topology{Logical: int(b & 0xffff), Shift: uint(a & 0x1f), Leaf: "leaf 0BH"}
		}
		if t.Logical > 0 {
			return t
		}
	}
	_, b, _, d := cpuid(1, 0)
	if d&vmx.CPUIDHTT.Mask() == 0 {
		return Topology{Logical: 1, Leaf: "leaf 1, no HTT"}
	}
	n := max(int(b>>vmx.CPUIDLeaf1LogicalShift&vmx.CPUIDLeaf1LogicalMask), 1)
	return Topology{Logical: n, Shift: uint(bits.Len(uint(n - 1))), Leaf: "leaf 1"}
}

// ErrUnaccounted is the error of a Census that finds a processor tamahv
// does not hold: the guest could start it outside VMX operation, where it
// would run with no EPT and reach all of memory, tamahv's included.
var ErrUnaccounted = errors.New("processors tamahv cannot account for")

// Census is what tamahv knows of the machine's processors when it decides
// whether the guest may start.
type Census struct {
	// Tables: the firmware's MADT or MP table was found.
	Tables bool
	// Listed are the processors the tables list (both tables'), the
	// bootstrap processor's included.
	Listed []acpi.Processor
	// BSP is the bootstrap processor's APIC ID.
	BSP uint32
	// APs are the processors StartAPs tried, each with how far it got.
	APs []AP
	// Topology is CPUID's view of the bootstrap processor's package.
	Topology Topology
}

// Check returns nil where tamahv holds every processor it can know of,
// and else an error (ErrUnaccounted) that says which and why:
//
//   - with no MADT and no MP table, CPUID must count one logical
//     processor in the bootstrap processor's package;
//   - every listed processor that is enabled or online capable (the
//     guest could start it, or bring it online later) but the bootstrap
//     processor must be held (parked in VMX root operation, or a vCPU's
//     processor): one that did not start, or started but could not enter
//     VMX operation, waits outside VMX for a start-up IPI;
//   - tamahv must hold at least as many processors in the bootstrap
//     processor's package (APIC IDs equal above Topology.Shift) as CPUID
//     counts there: a processor no table lists is never started.
//
// CPUID describes the executing processor's package only; it cannot tell
// how many packages the machine has, so processors of a package that no
// table lists at all are beyond what tamahv can account for. Listed
// processors that are neither enabled nor online capable are not started
// (the firmware says they cannot be used); where one exists in the
// bootstrap processor's package, the count above finds it missing.
func (c Census) Check() error {
	held := map[uint32]bool{c.BSP: true}
	status := map[uint32]APStatus{}
	for _, ap := range c.APs {
		status[ap.APICID] = ap.Status
		if ap.Status.Held() {
			held[ap.APICID] = true
		}
	}
	var why []string
	if !c.Tables {
		if c.Topology.Logical > 1 {
			why = append(why, fmt.Sprintf("no ACPI MADT or MP table, and CPUID (%s) counts %d logical processors in the bootstrap processor's package",
				c.Topology.Leaf, c.Topology.Logical))
		}
		return unaccounted(why)
	}
	// Each reason once, with the APIC IDs it holds.
	var reasons []string
	ids := map[string][]uint32{}
	seen := map[uint32]bool{}
	for _, p := range c.Listed {
		if seen[p.APICID] || held[p.APICID] || !p.Enabled && !p.OnlineCapable {
			continue
		}
		seen[p.APICID] = true
		kind := "enabled"
		if !p.Enabled {
			kind = "online capable"
		}
		r := "not started"
		if st, ok := status[p.APICID]; ok {
			r = st.String()
		}
		r = fmt.Sprintf("listed %s, %s", kind, r)
		if _, ok := ids[r]; !ok {
			reasons = append(reasons, r)
		}
		ids[r] = append(ids[r], p.APICID)
	}
	for _, r := range reasons {
		why = append(why, fmt.Sprintf("APIC IDs %v: %s", ids[r], r))
	}
	var mine []uint32
	for id := range held {
		if id>>c.Topology.Shift == c.BSP>>c.Topology.Shift {
			mine = append(mine, id)
		}
	}
	if len(mine) < c.Topology.Logical {
		slices.Sort(mine)
		why = append(why, fmt.Sprintf("CPUID (%s) counts %d logical processors in the bootstrap processor's package, tamahv holds %d there (APIC IDs %v)",
			c.Topology.Leaf, c.Topology.Logical, len(mine), mine))
	}
	return unaccounted(why)
}

func unaccounted(why []string) error {
	if len(why) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrUnaccounted, strings.Join(why, "; "))
}
