package guestmem

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
)

type mapTables struct {
	pages map[uint64]*[512]uint64
	next  uint64
	limit int // the most tables at a time (0: no limit)
}

func (m *mapTables) Alloc() (uint64, error) {
	if m.limit > 0 && len(m.pages) >= m.limit {
		return 0, fmt.Errorf("table arena of %d pages is full", m.limit)
	}
	m.next += 4096
	m.pages[m.next] = new([512]uint64)
	return m.next, nil
}
func (m *mapTables) Free(pa uint64) { delete(m.pages, pa) }
func (m *mapTables) Table(pa uint64) (*[512]uint64, error) {
	if t := m.pages[pa]; t != nil {
		return t, nil
	}
	return nil, fmt.Errorf("no table %#x", pa)
}

func TestMapGuest(t *testing.T) {
	e, err := ept.New(&mapTables{pages: map[uint64]*[512]uint64{}, next: 0x1000000}, ept.Options{Pages1G: true})
	require.NoError(t, err)
	mm := append(machineMap, hv.E820Entry{Addr: 0x100000000, Size: 0x40000000, Type: hv.E820RAM})
	require.NoError(t, MapGuest(e, mm, [2]uint64{0x10000000, 0x18000000}, 0x12000000, nil))
	for _, c := range []struct {
		gpa, hpa uint64
		mt       ept.MemType
	}{
		{0x1000, 0x1000, ept.WriteBack},
		{0x9f000, 0x9f000, ept.Uncacheable}, // partial RAM page at the EBDA
		{0xb8000, 0xb8000, ept.Uncacheable},
		{0x100000, 0x100000, ept.WriteBack},
		{0x0ffff000, 0x0ffff000, ept.WriteBack},
		{0x10000000, 0x12000000, ept.WriteBack}, // the sink
		{0x17fff123, 0x121ff123, ept.WriteBack},
		{0x18000000, 0x18000000, ept.WriteBack},
		{0x3fff0000, 0x3fff0000, ept.Uncacheable}, // ACPI tables
		{0xfee00000, 0xfee00000, ept.Uncacheable}, // local APIC
		{0x120000000, 0x120000000, ept.WriteBack},
	} {
		hpa, p, mt, _, ok := e.Lookup(c.gpa)
		require.True(t, ok, "%#x", c.gpa)
		assert.Equal(t, c.hpa, hpa, "%#x", c.gpa)
		assert.Equal(t, c.mt, mt, "%#x", c.gpa)
		if c.gpa >= 0x10000000 && c.gpa < 0x18000000 {
			assert.Equal(t, ept.Read|ept.Write, p, "no execution from the sink")
		}
	}
	_, _, _, _, ok := e.Lookup(0x140000000)
	assert.False(t, ok, "no RAM there")
	assert.Error(t, MapGuest(e, mm, [2]uint64{0x10001000, 0x18000000}, 0, nil))
}

// With the host's MTRRs, the guest's non-RAM takes their types (RAM stays
// write-back whatever they say).
func TestMapGuestFollowsTheMTRRs(t *testing.T) {
	e, err := ept.New(&mapTables{pages: map[uint64]*[512]uint64{}, next: 0x1000000}, ept.Options{Pages1G: true})
	require.NoError(t, err)
	types := &ept.MTRRs{Enabled: true, Default: ept.WriteBack, FixedOn: true, Variable: []ept.VariableMTRR{
		{Base: 0xc0000000, Mask: ^uint64(1<<30 - 1), Type: ept.Uncacheable},
		{Base: 0x800000000, Mask: ^uint64(1<<30 - 1), Type: ept.WriteCombine},
	}}
	for i := range types.Fixed {
		types.Fixed[i] = ept.WriteBack
	}
	for i := 16; i < 24; i++ {
		types.Fixed[i] = ept.Uncacheable // 0xa0000-0xbffff
	}
	for i := 24; i < 88; i++ {
		types.Fixed[i] = ept.WriteProtect // 0xc0000-0xfffff
	}
	types.Fixed[0] = ept.WriteThrough // 0-0xffff: RAM, which stays WB
	require.NoError(t, MapGuest(e, machineMap, [2]uint64{0x10000000, 0x18000000}, 0x12000000, types))
	for gpa, want := range map[uint64]ept.MemType{
		0x1000:     ept.WriteBack,    // RAM
		0x9f000:    ept.WriteBack,    // the EBDA's page: not RAM, the MTRRs say WB
		0xb8000:    ept.Uncacheable,  // VGA
		0xf0000:    ept.WriteProtect, // the BIOS
		0x3fff0000: ept.WriteBack,    // ACPI tables
		0xfee00000: ept.Uncacheable,  // local APIC
	} {
		_, _, mt, _, ok := e.Lookup(gpa)
		require.True(t, ok, "%#x", gpa)
		assert.Equal(t, want, mt, "%#x", gpa)
	}
}

var machineMap = []hv.E820Entry{
	{Addr: 0, Size: 0x9fc00, Type: hv.E820RAM},
	{Addr: 0x9fc00, Size: 0x400, Type: hv.E820Reserved},
	{Addr: 0xf0000, Size: 0x10000, Type: hv.E820Reserved},
	{Addr: 0x100000, Size: 0x3fef0000, Type: hv.E820RAM},
	{Addr: 0x3fff0000, Size: 0x10000, Type: hv.E820ACPI},
}
