package ept

import (
	"errors"
	"fmt"
	"sort"
)

// The MTRR registers' layout (SDM Vol. 3A, 12.11 "Memory Type Range
// Registers (MTRRs)").
const (
	mtrrCapVCNT     = 0xff    // IA32_MTRRCAP: number of variable ranges
	mtrrCapFixed    = 1 << 8  // IA32_MTRRCAP: fixed ranges supported
	mtrrDefType     = 0xff    // IA32_MTRR_DEF_TYPE: default type
	mtrrDefFixedOn  = 1 << 10 // IA32_MTRR_DEF_TYPE.FE
	mtrrDefEnabled  = 1 << 11 // IA32_MTRR_DEF_TYPE.E
	mtrrMaskValid   = 1 << 11 // IA32_MTRR_PHYSMASKn.V
	mtrrFixedTop    = 1 << 20 // the fixed ranges cover the first MiB
	maxVariableMTRR = 32
)

// MTRRs are the memory type range registers of the host, as the firmware
// set them: the memory type of every physical address outside the EPT.
// With EPT the guest's accesses take the EPT's memory type instead (SDM
// Vol. 3C, "EPT and Memory Typing"), so tamahv gives the guest's non-RAM
// what the MTRRs give it.
type MTRRs struct {
	// Enabled is IA32_MTRR_DEF_TYPE.E: clear, every address is UC.
	Enabled bool
	// Default is the type of addresses no range covers.
	Default MemType
	// FixedOn is IA32_MTRR_DEF_TYPE.FE with fixed ranges supported: the
	// first MiB takes Fixed's types.
	FixedOn bool
	// Fixed are the 88 fixed ranges' types, in address order: 8 of 64
	// KiB from 0, 16 of 16 KiB from 0x80000, 64 of 4 KiB from 0xc0000.
	Fixed [88]MemType
	// Variable are the enabled variable ranges.
	Variable []VariableMTRR
}

// VariableMTRR is one enabled variable range: an address pa is in it
// where pa&Mask == Base&Mask.
type VariableMTRR struct {
	Base, Mask uint64
	Type       MemType
}

// MSRReader reads a model-specific register.
type MSRReader func(msr uint32) uint64

// The MTRR MSRs (SDM Vol. 4, Table 2-2).
const (
	msrMTRRCap       = 0x0fe
	msrMTRRPhysBase0 = 0x200
	msrMTRRFix64K    = 0x250
	msrMTRRFix16K    = 0x258 // and 0x259
	msrMTRRFix4K     = 0x268 // to 0x26f
	msrMTRRDefType   = 0x2ff
)

// ReadMTRRs reads the MTRRs through read. physBits is the processor's
// physical-address width (CPUID 0x80000008:EAX[7:0]); it bounds the
// masks. A type the SDM reserves reads as UC.
func ReadMTRRs(read MSRReader, physBits uint) MTRRs {
	var m MTRRs
	def := read(msrMTRRDefType)
	m.Enabled = def&mtrrDefEnabled != 0
	m.Default = memType(def & mtrrDefType)
	capb := read(msrMTRRCap)
	if capb&mtrrCapFixed != 0 && def&mtrrDefFixedOn != 0 {
		m.FixedOn = true
		msrs := []uint32{msrMTRRFix64K, msrMTRRFix16K, msrMTRRFix16K + 1}
		for i := uint32(0); i < 8; i++ {
			msrs = append(msrs, msrMTRRFix4K+i)
		}
		for i, msr := range msrs {
			v := read(msr)
			for b := 0; b < 8; b++ {
				m.Fixed[i*8+b] = memType(v >> (8 * b) & 0xff)
			}
		}
	}
	top := uint64(1)<<min(physBits, 52) - 1
	for i := uint32(0); i < uint32(min(capb&mtrrCapVCNT, maxVariableMTRR)); i++ {
		mask := read(msrMTRRPhysBase0 + 2*i + 1)
		if mask&mtrrMaskValid == 0 {
			continue
		}
		base := read(msrMTRRPhysBase0 + 2*i)
		m.Variable = append(m.Variable, VariableMTRR{Base: base &^ 0xfff & top, Mask: mask&^0xfff&top | ^top, Type: memType(base & 0xff)})
	}
	return m
}

// memType is an MTRR type field as a memory type: the reserved encodings
// (2, 3, 7 and up) as UC.
func memType(v uint64) MemType {
	switch t := MemType(v); t {
	case Uncacheable, WriteCombine, WriteThrough, WriteProtect, WriteBack:
		return t
	}
	return Uncacheable
}

// TypeOf returns the memory type the MTRRs give pa (SDM Vol. 3A,
// 12.11.4.1 "MTRR Precedences"): UC where they are off; the fixed range's
// in the first MiB where those are on; else the variable ranges' that
// cover it (UC where any is UC, WT where they are WT and WB, UC for any
// other overlap, which the SDM leaves undefined); else the default.
func (m *MTRRs) TypeOf(pa uint64) MemType {
	if !m.Enabled {
		return Uncacheable
	}
	if m.FixedOn && pa < mtrrFixedTop {
		switch {
		case pa < 0x80000:
			return m.Fixed[pa>>16]
		case pa < 0xc0000:
			return m.Fixed[8+(pa-0x80000)>>14]
		default:
			return m.Fixed[24+(pa-0xc0000)>>12]
		}
	}
	found, t := false, m.Default
	for _, v := range m.Variable {
		if pa&v.Mask != v.Base&v.Mask {
			continue
		}
		switch {
		case !found:
			found, t = true, v.Type
		case t == v.Type:
		case t == Uncacheable || v.Type == Uncacheable:
			t = Uncacheable
		case t == WriteThrough && v.Type == WriteBack, t == WriteBack && v.Type == WriteThrough:
			t = WriteThrough
		default:
			t = Uncacheable
		}
	}
	return t
}

// Span is a range of physical addresses, [Start, End), of one memory type.
type Span struct {
	Start, End uint64
	Type       MemType
}

// ErrMTRRMask is Spans's error for a variable range whose mask is not
// contiguous: legal, never seen, and not split into spans here.
var ErrMTRRMask = errors.New("ept: a variable MTRR with a mask that is not contiguous")

// Spans splits [start, end) into the ranges of one memory type each, in
// order, adjacent ones of the same type merged. Both ends are 4 KiB
// aligned.
func (m *MTRRs) Spans(start, end uint64) ([]Span, error) {
	if start%Size4K != 0 || end%Size4K != 0 || end < start {
		return nil, fmt.Errorf("ept: MTRR spans of %#x-%#x", start, end)
	}
	if end == start {
		return nil, nil
	}
	cuts := map[uint64]bool{start: true, end: true}
	add := func(a uint64) {
		if a > start && a < end {
			cuts[a] = true
		}
	}
	if m.Enabled && m.FixedOn {
		for a := uint64(0); a <= mtrrFixedTop; {
			add(a)
			switch {
			case a < 0x80000:
				a += 1 << 16
			case a < 0xc0000:
				a += 1 << 14
			default:
				a += 1 << 12
			}
		}
	}
	if m.Enabled {
		for _, v := range m.Variable {
			// A contiguous mask covers one aligned block: its lowest
			// set bit is its size.
			size := v.Mask & -v.Mask
			if ^(v.Mask | (size - 1)) != 0 {
				return nil, fmt.Errorf("%w: base %#x, mask %#x", ErrMTRRMask, v.Base, v.Mask)
			}
			add(v.Base & v.Mask)
			add(v.Base&v.Mask + size)
		}
	}
	at := make([]uint64, 0, len(cuts))
	for a := range cuts {
		at = append(at, a)
	}
	sort.Slice(at, func(i, j int) bool { return at[i] < at[j] })
	var out []Span
	for i := 0; i+1 < len(at); i++ {
		t := m.TypeOf(at[i])
		if n := len(out); n > 0 && out[n-1].Type == t && out[n-1].End == at[i] {
			out[n-1].End = at[i+1]
			continue
		}
		out = append(out, Span{at[i], at[i+1], t})
	}
	return out, nil
}

// String describes the MTRRs in one line: whether they are on, the
// default type, the fixed ranges, and each variable range as its type,
// base and size.
func (m *MTRRs) String() string {
	if !m.Enabled {
		return "off (every address UC)"
	}
	s := "default " + m.Default.String()
	if m.FixedOn {
		s += ", fixed ranges on"
	}
	for _, v := range m.Variable {
		size := v.Mask & -v.Mask
		s += fmt.Sprintf(", %v %#x+%s", v.Type, v.Base, sizeString(size))
	}
	return s
}

// sizeString writes a power-of-two size in the largest unit that holds it.
func sizeString(n uint64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%#x", n)
}

// String is the memory type's short name: UC, WC, WT, WP or WB.
func (t MemType) String() string {
	switch t {
	case Uncacheable:
		return "UC"
	case WriteCombine:
		return "WC"
	case WriteThrough:
		return "WT"
	case WriteProtect:
		return "WP"
	case WriteBack:
		return "WB"
	}
	return fmt.Sprintf("MemType(%d)", uint8(t))
}
