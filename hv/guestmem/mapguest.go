package guestmem

import (
	"fmt"
	"sort"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
)

// MapGuest maps guest-physical memory one to one in e: the whole first 4
// GiB (RAM write-back; MMIO, firmware and holes of the memory type the
// host's MTRRs give them, uncached where types is nil) and the RAM above.
// The hole (tamahv's own memory, 2 MiB aligned) is not the guest's: each 2
// MiB of it maps to the same 2 MiB sink, so the guest can neither read
// nor write a byte of tamahv.
func MapGuest(e *ept.EPT, mm []hv.E820Entry, hole [2]uint64, sink uint64, types *ept.MTRRs) error {
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
		if m.Type != hv.E820RAM {
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
			gaps, err := memTypes(types, cur, min(r.start, low))
			if err != nil {
				return err
			}
			for _, g := range gaps {
				spans = append(spans, span{g.Start, g.End, g.Type})
			}
		}
		spans = append(spans, r)
		cur = r.end
	}
	if cur < low {
		gaps, err := memTypes(types, cur, low)
		if err != nil {
			return err
		}
		for _, g := range gaps {
			spans = append(spans, span{g.Start, g.End, g.Type})
		}
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

// overlaps reports whether [a, a+an) and [b, b+bn) share a byte.
func overlaps(a, an, b, bn uint64) bool { return an > 0 && bn > 0 && a < b+bn && b < a+an }

// memTypes splits [start, end), which holds no RAM, into the spans of one
// memory type the MTRRs give it: uncached where types is nil.
func memTypes(types *ept.MTRRs, start, end uint64) ([]ept.Span, error) {
	if types == nil {
		return []ept.Span{{Start: start, End: end, Type: ept.Uncacheable}}, nil
	}
	return types.Spans(start, end)
}
