package smp

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"
)

// CPUIDAnswer is an answer an AP's exit loop gives a CPUID exit itself:
// for EAX = Leaf and ECX = Subleaf exactly, the four registers, with
// ECXIfCR4 added to ECX while the guest's CR4 has a bit of CR4Mask set.
type CPUIDAnswer struct {
	Leaf, Subleaf uint32
	Regs          [4]uint32
	CR4Mask       uint32
	ECXIfCR4      uint32
}

// cpuidEntry is a CPUIDAnswer as the exit loop reads it, in its table
// page (smp_amd64.s has the offsets; TestExitLoopNumbers ties them).
type cpuidEntry struct {
	leaf, sub          uint32
	eax, ebx, ecx, edx uint32
	cr4Mask, ecxIfCR4  uint32
}

// maxCPUID is the number of answers a table page holds.
const maxCPUID = 4096 / unsafe.Sizeof(cpuidEntry{})

// ErrCPUIDTable is SetCPUID's error for a table that does not fit its
// page, or that answers one leaf and subleaf twice.
var ErrCPUIDTable = errors.New("smp: CPUID table")

// cpuidTable writes answers into the table page p and returns their
// number.
func cpuidTable(p *[4096]byte, answers []CPUIDAnswer) (int, error) {
	if uintptr(len(answers)) > maxCPUID {
		return 0, fmt.Errorf("%w: %d answers, %d fit", ErrCPUIDTable, len(answers), maxCPUID)
	}
	seen := map[[2]uint32]bool{}
	t := (*[maxCPUID]cpuidEntry)(unsafe.Pointer(p))
	for i, a := range answers {
		k := [2]uint32{a.Leaf, a.Subleaf}
		if seen[k] {
			return 0, fmt.Errorf("%w: leaf %#x subleaf %d twice", ErrCPUIDTable, a.Leaf, a.Subleaf)
		}
		seen[k] = true
		t[i] = cpuidEntry{a.Leaf, a.Subleaf, a.Regs[0], a.Regs[1], a.Regs[2], a.Regs[3], a.CR4Mask, a.ECXIfCR4}
	}
	return len(answers), nil
}

// setCPUID installs a table of n answers at physical address pa (0, 0:
// none) in the AP's block, while the AP waits for a command.
func (m mailbox) setCPUID(pa uint64, n int) {
	atomic.StoreUint32(m.u32(apCPUIDN), 0)
	atomic.StoreUint64(m.u64(apCPUIDTab), pa)
	atomic.StoreUint32(m.u32(apCPUIDN), uint32(n))
}

// answerCPUID lets the AP answer the coming entry's CPUID exits from its
// table, or not.
func (m mailbox) answerCPUID(on bool) {
	v := uint32(0)
	if on {
		v = 1
	}
	atomic.StoreUint32(m.u32(apFastOK), v)
}

// answered returns the CPUID exits the AP answered itself.
func (m mailbox) answered() uint64 { return atomic.LoadUint64(m.u64(apAnswered)) }
