package hv

import (
	"fmt"

	"github.com/tamahv/tamahv/vmx"
)

// HardwareVMCS is the current VMCS of the processor, through VMREAD and
// VMWRITE. A successful access is the instruction and a flag test; the
// error is built only when one fails.
type HardwareVMCS struct{ err error }

// Read executes VMREAD.
func (h *HardwareVMCS) Read(f vmx.Field) uint64 {
	v, ok := vmx.Read(f)
	if !ok {
		h.failed("VMREAD", f, 0)
	}
	return v
}

// Write executes VMWRITE.
func (h *HardwareVMCS) Write(f vmx.Field, v uint64) {
	if !vmx.Write(f, v) {
		h.failed("VMWRITE", f, v)
	}
}

// failed records the first failed access.
func (h *HardwareVMCS) failed(insn string, f vmx.Field, v uint64) {
	if h.err != nil {
		return
	}
	err := vmx.Failure(insn)
	if insn == "VMWRITE" {
		h.err = fmt.Errorf("VMWRITE %#x=%#x: %w", uint32(f), v, err)
	} else {
		h.err = fmt.Errorf("VMREAD %#x: %w", uint32(f), err)
	}
}

// Err returns the first failure since ClearErr.
func (h *HardwareVMCS) Err() error { return h.err }

// ClearErr forgets failures. It stores only when there is one to forget:
// the run loop calls it before every entry, and a pointer store costs a
// write barrier whenever a collection is under way.
func (h *HardwareVMCS) ClearErr() {
	if h.err != nil {
		h.err = nil
	}
}

// Memory is guest-physical memory as the monitor sees it. Guest RAM is
// mapped one to one, so these are host-physical addresses as well.
type Memory interface {
	ReadPhys(pa uint64, p []byte) error
	WritePhys(pa uint64, p []byte) error
	// CopyPhys copies n bytes from src to dst; the ranges may overlap
	// (memmove).
	CopyPhys(dst, src, n uint64) error
}

// E820 memory types (ACPI "Address Range Types").
const (
	E820RAM      = 1
	E820Reserved = 2
	E820ACPI     = 3
	E820NVS      = 4
	E820Unusable = 5
)

// E820Entry is one range of the guest's memory map.
type E820Entry struct {
	Addr, Size uint64
	Type       uint32
}

// PhysReader reads guest-physical memory.
type PhysReader interface {
	ReadPhys(pa uint64, p []byte) error
}
