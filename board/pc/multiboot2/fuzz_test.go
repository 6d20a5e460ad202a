package multiboot2

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/board/pc/e820"
	"github.com/tamahv/tamahv/board/pc/efi"
)

// FuzzMultiboot2 feeds ParseBytes arbitrary structures, seeded with
// GRUB's, and what it accepts to the guest map builders: nothing may
// panic, errors must be ErrBadInfo, and what is accepted must hold
// together.
func FuzzMultiboot2(f *testing.F) {
	f.Add(golden(f, goldenBIOS))
	f.Add(golden(f, goldenEFI))
	f.Add(info(uint32(TagEFIBS), []byte{}, uint32(TagModule), append(u32s(0x1000, 0x2000), 'm', 0)))
	f.Add(info(uint32(TagFramebuffer), append(make([]byte, 24), 1, 0, 1, 2, 3)))
	f.Fuzz(func(t *testing.T, data []byte) {
		in, err := ParseBytes(data)
		if err != nil {
			require.ErrorIs(t, err, ErrBadInfo)
			return
		}
		assert.LessOrEqual(t, 8*len(in.Tags), len(data))
		assert.LessOrEqual(t, len(in.Modules), MaxModules)
		for _, m := range in.Modules {
			assert.LessOrEqual(t, m.Start, m.End)
		}
		if in.Framebuffer != nil {
			assert.LessOrEqual(t, 3*len(in.Framebuffer.Palette), len(data))
		}
		m := in.EFIMemoryMap
		if m == nil {
			return
		}
		for _, d := range m.Descriptors {
			assert.GreaterOrEqual(t, d.End(), d.PhysicalStart, "descriptor end wraps")
		}
		const base, end = 0x10000000, 0x18000000
		es, cp := e820.FromEFIReserving(m, base, end)
		for i := 1; i < len(es); i++ {
			prev, e := es[i-1], es[i]
			assert.LessOrEqual(t, prev.Addr, e.Addr, "sorted")
			assert.False(t, prev.Type == e.Type && prev.End() == e.Addr, "touching entries of one type are merged")
		}
		for _, e := range es {
			if e.Type != e820.Reserved && e.Addr < end && base < e.End() {
				t.Fatalf("e820 entry %+v overlaps the reserved region", e)
			}
		}
		for _, d := range cp.Descriptors {
			if d.Type != efi.ReservedMemoryType && d.PhysicalStart < end && base < d.End() {
				t.Fatalf("EFI descriptor %+v overlaps the reserved region", d)
			}
		}
	})
}
