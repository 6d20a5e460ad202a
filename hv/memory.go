package hv

import (
	"fmt"
	"sort"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/vmx"
)

// MapGuest maps guest-physical memory one to one in e: the whole first 4
// GiB (RAM write-back; MMIO, firmware and holes uncached) and the RAM
// above. The hole (tamahv's own memory, 2 MiB aligned) is not the guest's:
// each 2 MiB of it maps to the same 2 MiB sink, so the guest can neither
// read nor write a byte of tamahv.
func MapGuest(e *ept.EPT, mm []E820Entry, hole [2]uint64, sink uint64) error {
	if hole[0]%ept.Size2M != 0 || hole[1]%ept.Size2M != 0 || sink%ept.Size2M != 0 {
		return fmt.Errorf("hv: hole %#x-%#x and sink %#x must be 2 MiB aligned", hole[0], hole[1], sink)
	}
	type span struct {
		start, end uint64
		mt         ept.MemType
	}
	const low = 1 << 32
	var ram []span
	for _, m := range mm {
		if m.Type != E820RAM {
			continue
		}
		s, end := (m.Addr+0xfff)&^0xfff, (m.Addr+m.Size)&^0xfff
		if end > s {
			ram = append(ram, span{s, end, ept.WriteBack})
		}
	}
	sort.Slice(ram, func(i, j int) bool { return ram[i].start < ram[j].start })
	var spans []span
	cur := uint64(0)
	for _, r := range ram {
		if r.start < cur {
			r.start = cur // overlapping entries: first wins
		}
		if r.end <= r.start {
			continue
		}
		if r.start > cur && cur < low {
			spans = append(spans, span{cur, min(r.start, low), ept.Uncacheable})
		}
		spans = append(spans, r)
		cur = r.end
	}
	if cur < low {
		spans = append(spans, span{cur, low, ept.Uncacheable})
	}
	for _, s := range spans {
		for _, piece := range cut(s.start, s.end, hole) {
			if err := e.Map(piece[0], piece[0], piece[1]-piece[0], ept.RWX, s.mt); err != nil {
				return fmt.Errorf("hv: mapping %#x-%#x: %w", piece[0], piece[1], err)
			}
		}
	}
	for gpa := hole[0]; gpa < hole[1]; gpa += ept.Size2M {
		if err := e.Map(gpa, sink, ept.Size2M, ept.Read|ept.Write, ept.WriteBack); err != nil {
			return fmt.Errorf("hv: mapping the sink at %#x: %w", gpa, err)
		}
	}
	return nil
}

// cut returns [start, end) without the hole, as zero, one or two ranges.
func cut(start, end uint64, hole [2]uint64) [][2]uint64 {
	if hole[1] <= start || hole[0] >= end {
		return [][2]uint64{{start, end}}
	}
	var out [][2]uint64
	if start < hole[0] {
		out = append(out, [2]uint64{start, hole[0]})
	}
	if hole[1] < end {
		out = append(out, [2]uint64{hole[1], end})
	}
	return out
}

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

// overlaps reports whether [a, a+an) and [b, b+bn) share a byte.
func overlaps(a, an, b, bn uint64) bool { return an > 0 && bn > 0 && a < b+bn && b < a+an }
