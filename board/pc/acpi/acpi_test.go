package acpi

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakePhys is the first MiB of physical memory and one high window, the
// way firmware lays its tables out; addresses elsewhere are not mapped.
type fakePhys struct {
	low      []byte
	highBase uint64
	high     []byte
	readOnly [2]uint64 // writes here are dropped, as in ROM
}

func newFakePhys() *fakePhys {
	return &fakePhys{low: make([]byte, 1<<20), highBase: 0x3fff0000, high: make([]byte, 1<<16)}
}

func (f *fakePhys) at(pa uint64, n int) ([]byte, error) {
	switch {
	case pa+uint64(n) <= uint64(len(f.low)):
		return f.low[pa : pa+uint64(n)], nil
	case pa >= f.highBase && pa+uint64(n) <= f.highBase+uint64(len(f.high)):
		return f.high[pa-f.highBase : pa-f.highBase+uint64(n)], nil
	}
	return nil, fmt.Errorf("%#x+%d not mapped", pa, n)
}

func (f *fakePhys) ReadPhys(pa uint64, p []byte) error {
	b, err := f.at(pa, len(p))
	if err == nil {
		copy(p, b)
	}
	return err
}

func (f *fakePhys) WritePhys(pa uint64, p []byte) error {
	b, err := f.at(pa, len(p))
	if err == nil && !(pa >= f.readOnly[0] && pa < f.readOnly[1]) {
		copy(b, p)
	}
	return err
}

func (f *fakePhys) put(pa uint64, p []byte) {
	b, err := f.at(pa, len(p))
	if err != nil {
		panic(err)
	}
	copy(b, p)
}

// fix sets the checksum byte at off so that b sums to zero.
func fix(b []byte, off int) []byte {
	b[off] = 0
	b[off] = -sum8(b)
	return b
}

func sdt(sig string, body []byte) []byte {
	b := make([]byte, sdtHeaderLen, sdtHeaderLen+len(body))
	copy(b, sig)
	b = append(b, body...)
	binary.LittleEndian.PutUint32(b[4:], uint32(len(b)))
	b[8] = 1
	return fix(b, sdtChecksumOff)
}

func rsdp(rev byte, rsdt uint32, xsdt uint64) []byte {
	b := make([]byte, 36)
	copy(b, "RSD PTR ")
	b[15] = rev
	binary.LittleEndian.PutUint32(b[16:], rsdt)
	binary.LittleEndian.PutUint32(b[20:], 36)
	binary.LittleEndian.PutUint64(b[24:], xsdt)
	fix(b[:20], 8)
	return fix(b, 32)
}

func madtBody(entries ...[]byte) []byte {
	b := make([]byte, madtEntriesOff-sdtHeaderLen) // local APIC address, flags
	binary.LittleEndian.PutUint32(b, 0xfee00000)
	for _, e := range entries {
		b = append(b, e...)
	}
	return b
}

func lapicEntry(uid, id, flags byte) []byte { return []byte{madtLocalAPIC, 8, uid, id, flags, 0, 0, 0} }

func x2apicEntry(id, flags uint32) []byte {
	b := make([]byte, 16)
	b[0], b[1] = madtLocalX2APC, 16
	binary.LittleEndian.PutUint32(b[4:], id)
	binary.LittleEndian.PutUint32(b[8:], flags)
	return b
}

func ioapicEntry() []byte { return []byte{1, 12, 2, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0} }

func mpTable(cpus ...[2]byte) []byte {
	b := make([]byte, mpHeaderLen)
	copy(b, "PCMP")
	b[6] = 4
	for _, c := range cpus {
		e := make([]byte, mpProcessorLen)
		e[1], e[2], e[3] = c[0], 0x14, c[1]
		b = append(b, e...)
	}
	b = append(b, 1, 0, 'I', 'S', 'A', ' ', ' ', ' ') // a bus entry
	binary.LittleEndian.PutUint16(b[4:], uint16(len(b)))
	binary.LittleEndian.PutUint16(b[34:], uint16(len(cpus)+1))
	return fix(b, mpChecksumOff)
}

func mpFloat(table uint32) []byte {
	b := make([]byte, mpFloatLen)
	copy(b, "_MP_")
	binary.LittleEndian.PutUint32(b[4:], table)
	b[8], b[9] = 1, 4
	return fix(b, 10)
}

// Addresses of the tables the way Bochs's BIOS places them.
const (
	tRSDP = 0xfa000
	tRSDT = 0x3fff0000
	tXSDT = 0x3fff0100
	tMADT = 0x3fff0200
	tFADT = 0x3fff0400
	tMPF  = 0xfb000
	tMP   = 0x3fff0800
)

// bochsTables lays out an RSDP (revision 2), RSDT and XSDT (with a FADT
// before the MADT), a MADT with two enabled processors, one disabled but
// online capable and one x2APIC processor, and an MP table with the two
// enabled ones.
func bochsTables() *fakePhys {
	f := newFakePhys()
	f.put(tRSDP, rsdp(2, tRSDT, tXSDT))
	rsdt := make([]byte, 8)
	binary.LittleEndian.PutUint32(rsdt, tFADT)
	binary.LittleEndian.PutUint32(rsdt[4:], tMADT)
	f.put(tRSDT, sdt("RSDT", rsdt))
	xsdt := make([]byte, 16)
	binary.LittleEndian.PutUint64(xsdt, tFADT)
	binary.LittleEndian.PutUint64(xsdt[8:], tMADT)
	f.put(tXSDT, sdt("XSDT", xsdt))
	f.put(tFADT, sdt("FACP", make([]byte, 80)))
	f.put(tMADT, sdt("APIC", madtBody(
		lapicEntry(0, 0, madtEnabled), lapicEntry(1, 1, madtEnabled), ioapicEntry(),
		lapicEntry(2, 2, madtOnlineCap), x2apicEntry(0x100, madtEnabled))))
	f.put(tMPF, mpFloat(tMP))
	f.put(tMP, mpTable([2]byte{0, 3}, [2]byte{1, 1}))
	return f
}

func ids(list []Processor) (enabled, other []uint32) {
	for _, p := range list {
		if p.Enabled {
			enabled = append(enabled, p.APICID)
		} else {
			other = append(other, p.APICID)
		}
	}
	return
}

func TestFindProcessorsMADT(t *testing.T) {
	p, err := FindProcessors(bochsTables())
	require.NoError(t, err)
	assert.Equal(t, uint64(tMADT), p.MADT)
	assert.Equal(t, uint64(tMP), p.MP)
	require.Len(t, p.List, 4)
	en, other := ids(p.List)
	assert.Equal(t, []uint32{0, 1, 0x100}, en)
	assert.Equal(t, []uint32{2}, other)
	assert.True(t, p.List[2].OnlineCapable)
	assert.True(t, p.List[3].X2APIC)
	for _, c := range p.List {
		assert.Equal(t, SourceMADT, c.Source)
	}
	require.Len(t, p.mp, 2)
}

func TestFindProcessorsRSDPInEBDA(t *testing.T) {
	f := bochsTables()
	clear(f.low[tRSDP : tRSDP+36])
	f.put(ebdaSegPtr, []byte{0xc0, 0x9f}) // EBDA at 0x9fc00
	f.put(0x9fc00+0x40, rsdp(0, tRSDT, 0))
	p, err := FindProcessors(f)
	require.NoError(t, err)
	assert.Equal(t, uint64(tMADT), p.MADT)
}

func TestFindProcessorsBadXSDTFallsBackToRSDT(t *testing.T) {
	f := bochsTables()
	f.high[tXSDT-tRSDT+sdtHeaderLen] ^= 0xff // XSDT checksum now wrong
	p, err := FindProcessors(f)
	require.NoError(t, err)
	assert.Equal(t, uint64(tMADT), p.MADT)
}

func TestFindProcessorsBadRSDPChecksum(t *testing.T) {
	f := bochsTables()
	f.low[tRSDP+16] ^= 1 // RSDT address: the checksum no longer holds
	p, err := FindProcessors(f)
	require.NoError(t, err, "the MP table remains")
	assert.Zero(t, p.MADT)
	en, _ := ids(p.List)
	assert.Equal(t, []uint32{0, 1}, en)
	assert.Equal(t, SourceMP, p.List[0].Source)
}

func TestFindProcessorsMalformedMADT(t *testing.T) {
	for name, entries := range map[string][][]byte{
		"zero length":   {lapicEntry(0, 0, 1), {madtLocalAPIC, 0}},
		"past the end":  {lapicEntry(0, 0, 1), {madtLocalAPIC, 200, 0, 1, 1, 0, 0, 0}},
		"one byte left": {lapicEntry(0, 0, 1), {madtLocalAPIC}},
	} {
		t.Run(name, func(t *testing.T) {
			f := bochsTables()
			f.put(tMADT, sdt("APIC", madtBody(entries...)))
			p, err := FindProcessors(f)
			require.NoError(t, err)
			assert.Zero(t, p.MADT, "a MADT that cannot be read whole is not used")
			assert.Equal(t, SourceMP, p.List[0].Source)
		})
	}
}

func TestFindProcessorsShortEntriesIgnored(t *testing.T) {
	f := bochsTables()
	f.put(tMADT, sdt("APIC", madtBody(lapicEntry(0, 0, 1), []byte{madtLocalAPIC, 4, 0, 7}, []byte{madtLocalX2APC, 8, 0, 0, 9, 0, 0, 0})))
	p, err := FindProcessors(f)
	require.NoError(t, err)
	en, other := ids(p.List)
	assert.Equal(t, []uint32{0}, en)
	assert.Empty(t, other)
}

func TestFindProcessorsHugeLength(t *testing.T) {
	f := bochsTables()
	b := sdt("APIC", madtBody(lapicEntry(0, 0, 1)))
	binary.LittleEndian.PutUint32(b[4:], 0xffffffff)
	f.put(tMADT, b)
	p, err := FindProcessors(f)
	require.NoError(t, err)
	assert.Zero(t, p.MADT)
}

func TestFindProcessorsMPTableBad(t *testing.T) {
	f := bochsTables()
	f.high[tMP-tRSDT+34] = 50 // more entries than the table holds
	p, err := FindProcessors(f)
	require.NoError(t, err)
	assert.Zero(t, p.MP)
	assert.Equal(t, uint64(tMADT), p.MADT)
}

func TestFindProcessorsNone(t *testing.T) {
	_, err := FindProcessors(newFakePhys())
	require.ErrorIs(t, err, ErrNoTables)
}

func TestHideFixesChecksums(t *testing.T) {
	f := bochsTables()
	p, err := FindProcessors(f)
	require.NoError(t, err)
	n, err := p.Hide(f, 1)
	require.NoError(t, err)
	assert.Equal(t, 2, n, "the MADT entry and the MP entry")
	n, err = p.Hide(f, 2) // disabled, online capable: no longer capable
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	n, err = p.Hide(f, 0x100)
	require.NoError(t, err)
	assert.Equal(t, 1, n)

	again, err := FindProcessors(f) // checksums hold, or this would fail over
	require.NoError(t, err)
	assert.Equal(t, uint64(tMADT), again.MADT)
	assert.Equal(t, uint64(tMP), again.MP)
	en, _ := ids(again.List)
	assert.Equal(t, []uint32{0}, en)
	for _, c := range again.List {
		assert.False(t, c.OnlineCapable, "APIC %d", c.APICID)
	}
	en, _ = ids(again.mp)
	assert.Equal(t, []uint32{0}, en)

	n, err = again.Hide(f, 1)
	require.NoError(t, err)
	assert.Zero(t, n, "already hidden")
}

func TestHideMPOnly(t *testing.T) {
	f := bochsTables()
	clear(f.low[tRSDP : tRSDP+36])
	p, err := FindProcessors(f)
	require.NoError(t, err)
	require.Zero(t, p.MADT)
	n, err := p.Hide(f, 1)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	again, err := FindProcessors(f)
	require.NoError(t, err)
	en, _ := ids(again.List)
	assert.Equal(t, []uint32{0}, en)
}

func TestHideReadOnlyTable(t *testing.T) {
	f := bochsTables()
	f.readOnly = [2]uint64{tMP, tMP + 0x100}
	p, err := FindProcessors(f)
	require.NoError(t, err)
	n, err := p.Hide(f, 1)
	require.Error(t, err, "the MP table did not change")
	assert.Equal(t, 1, n, "the MADT did")
}

func TestPlan(t *testing.T) {
	p := &Processors{List: []Processor{
		{APICID: 0, Enabled: true}, {APICID: 1, Enabled: true}, {APICID: 2, OnlineCapable: true},
		{APICID: 1, Enabled: true, X2APIC: true}, {APICID: 3}, {APICID: 0x100, Enabled: true, X2APIC: true},
	}}
	start, hide := p.Plan(0)
	assert.Equal(t, []uint32{1, 2, 0x100}, start, "enabled and online-capable APs once each; not the BSP; not the unusable ones")
	assert.Equal(t, []uint32{1, 2, 3, 0x100}, hide)
	start, hide = p.Plan(1)
	assert.Equal(t, []uint32{0, 2, 0x100}, start, "the BSP need not be APIC ID 0")
	assert.Equal(t, []uint32{0, 2, 3, 0x100}, hide)
}

// TestPlanStartsWhatEitherTableLists: a processor only the MP table lists
// (beside a MADT) is started and hidden too: the guest reads both tables.
func TestPlanStartsWhatEitherTableLists(t *testing.T) {
	f := bochsTables()
	f.put(tMP, mpTable([2]byte{0, 3}, [2]byte{1, 1}, [2]byte{5, 1}))
	p, err := FindProcessors(f)
	require.NoError(t, err)
	require.NotZero(t, p.MADT)
	start, hide := p.Plan(0)
	assert.Equal(t, []uint32{1, 2, 0x100, 5}, start)
	assert.Equal(t, []uint32{1, 2, 0x100, 5}, hide)
}

// TestFindProcessorsAtAGivenRSDP: the RSDP the boot path gives (UEFI's
// configuration table) is used where the BIOS areas have none, and
// checked like a found one.
func TestFindProcessorsAtAGivenRSDP(t *testing.T) {
	f := bochsTables()
	clear(f.low[tRSDP : tRSDP+36])
	const at = 0x3fff0f00
	f.put(at, rsdp(2, tRSDT, tXSDT))
	p, err := FindProcessors(f)
	require.NoError(t, err)
	assert.Zero(t, p.MADT, "not in the BIOS areas")
	p, err = FindProcessorsAt(f, at)
	require.NoError(t, err)
	assert.Equal(t, uint64(tMADT), p.MADT)

	f.high[at-tRSDT+16] ^= 1 // the checksum no longer holds
	p, err = FindProcessorsAt(f, at)
	require.NoError(t, err, "the MP table remains")
	assert.Zero(t, p.MADT)
	p, err = FindProcessorsAt(f, 0x7fff0000) // not mapped
	require.NoError(t, err)
	assert.Zero(t, p.MADT)
}

func TestShowUndoesHide(t *testing.T) {
	f := bochsTables()
	p, err := FindProcessors(f)
	require.NoError(t, err)
	_, err = p.Hide(f, 1)
	require.NoError(t, err)
	n, err := p.Show(f, 1)
	require.NoError(t, err)
	assert.Equal(t, 2, n, "the MADT entry and the MP entry")
	again, err := FindProcessors(f) // checksums hold, or this would fail over
	require.NoError(t, err)
	assert.Equal(t, uint64(tMADT), again.MADT)
	en, _ := ids(again.List)
	assert.Equal(t, []uint32{0, 1, 0x100}, en, "as the firmware listed them")
	en, _ = ids(again.mp)
	assert.Equal(t, []uint32{0, 1}, en)
	n, err = p.Show(f, 1)
	require.NoError(t, err)
	assert.Zero(t, n, "already shown")
	n, err = p.Show(f, 2) // never enabled: stays as the firmware left it
	require.NoError(t, err)
	assert.Zero(t, n)
}

// TestFindOEMID: the MADT's OEM ID where the RSDP leads to a MADT, else
// the RSDP's; no RSDP, no OEM ID.
func TestFindOEMID(t *testing.T) {
	f := bochsTables()
	r := rsdp(2, tRSDT, tXSDT)
	copy(r[oemIDOff:], "RSDPID")
	fix(r[:V1Length], 8)
	f.put(tRSDP, fix(r, 32))
	madt := sdt("APIC", madtBody(lapicEntry(0, 0, madtEnabled)))
	copy(madt[sdtOEMIDOff:], "BOCHS ")
	f.put(tMADT, fix(madt, sdtChecksumOff))
	id, err := FindOEMID(f, 0)
	require.NoError(t, err)
	assert.Equal(t, "BOCHS ", id, "the MADT's")

	const at = 0x3fff0f00
	f.put(at, r)
	id, err = FindOEMID(f, at)
	require.NoError(t, err)
	assert.Equal(t, "BOCHS ", id, "through the RSDP the boot path gives")

	f.put(tMADT, sdt("FACP", make([]byte, 80))) // no MADT left
	id, err = FindOEMID(f, 0)
	require.NoError(t, err)
	assert.Equal(t, "RSDPID", id, "without a MADT, the RSDP's")

	clear(f.low[tRSDP : tRSDP+36])
	_, err = FindOEMID(f, 0)
	assert.Error(t, err, "no RSDP")
}
