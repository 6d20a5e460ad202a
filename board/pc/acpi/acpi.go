// Package acpi reads the firmware's tables from physical memory: the ACPI
// Root System Description Pointer (RSDP), wherever the boot path finds it
// (the legacy BIOS areas, the EFI configuration table, or the copy a
// Multiboot2 boot loader hands over), and the processor tables (the MADT
// found through it, and the MP table), which it also patches: tamahv hides
// a processor from the guest, or shows it, by its entry.
package acpi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// PhysRW reads and writes physical memory.
type PhysRW interface {
	ReadPhys(pa uint64, p []byte) error
	WritePhys(pa uint64, p []byte) error
}

// Table sources of a processor entry.
const (
	SourceMADT = "MADT"
	SourceMP   = "MP"
)

// Processor is one processor the firmware lists.
type Processor struct {
	APICID uint32
	// Enabled: usable now (MADT flags bit 0, MP CPU flags EN).
	Enabled bool
	// OnlineCapable: disabled now but the OS may enable it later (MADT
	// flags bit 1, ACPI 6.3).
	OnlineCapable bool
	// X2APIC: listed by a Processor Local x2APIC entry.
	X2APIC bool
	// Source is the table that lists it (SourceMADT or SourceMP).
	Source string
	entry  uint64 // physical address of the entry
}

// Processors are the processors the firmware's tables list, and where
// those tables lie.
type Processors struct {
	// List holds the MADT's processors where there is a MADT, else the MP
	// table's.
	List []Processor
	// MADT and MP are the physical addresses of the MADT and of the MP
	// configuration table; 0 where there is none.
	MADT, MP uint64
	// mp holds the MP table's processors (also where List is the MADT's:
	// both tables are patched).
	mp []Processor
}

// Limits on what the parser reads: the firmware is trusted to be the
// firmware, but a table read wrongly must not make tamahv read at random.
const (
	maxTableLen   = 64 << 10
	maxRSDTTables = 256
	ebdaSegPtr    = 0x40e
	baseMemKiBPtr = 0x413
	biosAreaStart = 0xe0000
	biosAreaEnd   = 0x100000
	mpBIOSStart   = 0xf0000
)

// ACPI table layouts (ACPI 6.5, 5.2.5 RSDP, 5.2.6 system description
// table header, 5.2.12 MADT) and MP table layouts (MultiProcessor
// Specification 1.4, chapter 4).
const (
	sdtHeaderLen   = 36
	sdtChecksumOff = 9
	sdtOEMIDOff    = 10
	oemIDLen       = 6
	madtEntriesOff = 44

	madtLocalAPIC  = 0
	madtLocalX2APC = 9
	madtEnabled    = 1 << 0
	madtOnlineCap  = 1 << 1

	mpFloatLen      = 16
	mpHeaderLen     = 44
	mpChecksumOff   = 7
	mpProcessor     = 0
	mpProcessorLen  = 20
	mpOtherEntryLen = 8
	mpCPUEnabled    = 1 << 0
)

// ErrNoRSDP is returned where the BIOS areas hold no ACPI RSDP.
var ErrNoRSDP = errors.New("acpi: no ACPI RSDP")

// ErrNoTables is returned when the firmware offers neither a MADT nor an
// MP table.
var ErrNoTables = errors.New("acpi: no ACPI MADT and no MP table")

// FindProcessors finds the firmware's processor list: the ACPI MADT (the
// RSDP in the first KiB of the EBDA or in 0xe0000-0xfffff, then the XSDT
// or RSDT) and the MP table (its floating pointer in the EBDA, the last
// KiB of base memory or 0xf0000-0xfffff). Tables with a bad signature,
// length or checksum are passed over. It fails only when neither table
// is found.
func FindProcessors(m PhysRW) (*Processors, error) { return FindProcessorsAt(m, 0) }

// FindProcessorsAt is FindProcessors with the ACPI RSDP at the physical
// address rsdp, where the boot path knows it (on UEFI machines the EFI
// configuration table's ACPI 2.0 entry, which firmware without a
// compatibility module gives instead of a copy in the BIOS areas); 0
// searches the legacy BIOS areas. The RSDP there is checked as a found
// one is.
func FindProcessorsAt(m PhysRW, rsdp uint64) (*Processors, error) {
	p := &Processors{}
	var errs []error
	if madt, err := findMADT(m, rsdp); err == nil {
		p.MADT = madt
		if p.List, err = madtProcessors(m, madt); err != nil {
			p.MADT = 0
			errs = append(errs, err)
		}
	} else {
		errs = append(errs, err)
	}
	if mp, err := findMP(m); err == nil {
		p.MP = mp
		if p.mp, err = mpProcessors(m, mp); err != nil {
			p.MP = 0
			errs = append(errs, err)
		}
	} else {
		errs = append(errs, err)
	}
	if p.MADT == 0 {
		p.List = p.mp
	}
	if p.MADT == 0 && p.MP == 0 {
		return nil, fmt.Errorf("%w: %w", ErrNoTables, errors.Join(errs...))
	}
	return p, nil
}

// FindOEMID returns the OEM ID of the firmware's ACPI tables, its 6 bytes
// as the firmware wrote them ("BOCHS " for Bochs's BIOS and QEMU): the
// MADT's, where the RSDP leads to one, else the RSDP's. rsdp is as
// FindProcessorsAt's (0: search the legacy BIOS areas). It fails where
// there is no RSDP.
func FindOEMID(m PhysRW, rsdp uint64) (string, error) {
	b, err := findRSDP(m, rsdp)
	if err != nil {
		return "", err
	}
	if madt, err := findMADT(m, rsdp); err == nil {
		var h [sdtHeaderLen]byte
		if m.ReadPhys(madt, h[:]) == nil {
			return string(h[sdtOEMIDOff : sdtOEMIDOff+oemIDLen]), nil
		}
	}
	return string(b[oemIDOff : oemIDOff+oemIDLen]), nil
}

// ebda returns the EBDA's address, 0 where the BIOS data area gives none
// that makes sense.
func ebda(m PhysRW) uint64 {
	var b [2]byte
	if m.ReadPhys(ebdaSegPtr, b[:]) != nil {
		return 0
	}
	pa := uint64(binary.LittleEndian.Uint16(b[:])) << 4
	if pa < 0x80000 || pa >= 0xa0000 {
		return 0
	}
	return pa
}

// scan returns the first 16-byte aligned offset in [start, end) where sig
// starts and check accepts the bytes there.
func scan(m PhysRW, start, end uint64, sig string, check func(b []byte) bool) (uint64, bool) {
	if start == 0 || end <= start {
		return 0, false
	}
	buf := make([]byte, end-start)
	if m.ReadPhys(start, buf) != nil {
		return 0, false
	}
	for off := 0; off+len(sig) <= len(buf); off += 16 {
		if string(buf[off:off+len(sig)]) == sig && check(buf[off:]) {
			return start + uint64(off), true
		}
	}
	return 0, false
}

// rsdpOK checks an RSDP (Parse): the ACPI 1.0 checksum over 20 bytes
// and, from revision 2, the length and the extended checksum.
func rsdpOK(b []byte) bool {
	_, err := Parse(b)
	return err == nil
}

// findRSDP returns the RSDP's 36 bytes (20 for revision 0): the one at
// at, or, where at is 0, the one found in the BIOS areas.
func findRSDP(m PhysRW, at uint64) ([]byte, error) {
	pa, ok := at, false
	switch {
	case at != 0:
		b := make([]byte, 36)
		if m.ReadPhys(at, b[:20]) != nil {
			return nil, fmt.Errorf("acpi: no ACPI RSDP at %#x", at)
		}
		if b[15] >= 2 && m.ReadPhys(at, b) != nil {
			return nil, fmt.Errorf("acpi: no ACPI RSDP at %#x", at)
		}
		ok = string(b[:8]) == "RSD PTR " && rsdpOK(b)
		if !ok {
			return nil, fmt.Errorf("acpi: no ACPI RSDP at %#x (signature or checksum)", at)
		}
	default:
		if e := ebda(m); e != 0 {
			pa, ok = scan(m, e, e+1024, "RSD PTR ", rsdpOK)
		}
		if !ok {
			pa, ok = scan(m, biosAreaStart, biosAreaEnd, "RSD PTR ", rsdpOK)
		}
	}
	if !ok {
		return nil, ErrNoRSDP
	}
	b := make([]byte, 36)
	if err := m.ReadPhys(pa, b); err != nil {
		return nil, err
	}
	if b[15] < 2 {
		b = b[:20]
	}
	return b, nil
}

// readSDT reads the system description table at pa with signature sig
// (any when empty), checking its length and checksum.
func readSDT(m PhysRW, pa uint64, sig string) ([]byte, error) {
	b, sumOK, err := readTable(m, pa, sig, maxTableLen)
	if err == nil && !sumOK {
		return nil, fmt.Errorf("acpi: %q at %#x: bad checksum", b[:4], pa)
	}
	return b, err
}

// readTable reads the table at pa with signature sig (any when empty) and
// a length from the header up to maxLen; sumOK says whether its checksum
// holds.
func readTable(m PhysRW, pa uint64, sig string, maxLen uint32) (b []byte, sumOK bool, err error) {
	var h [sdtHeaderLen]byte
	if err := m.ReadPhys(pa, h[:]); err != nil {
		return nil, false, err
	}
	if sig != "" && string(h[:4]) != sig {
		return nil, false, fmt.Errorf("acpi: no %s at %#x", sig, pa)
	}
	n := binary.LittleEndian.Uint32(h[4:])
	if n < sdtHeaderLen || n > maxLen {
		return nil, false, fmt.Errorf("acpi: %q at %#x: length %d", h[:4], pa, n)
	}
	b = make([]byte, n)
	if err := m.ReadPhys(pa, b); err != nil {
		return nil, false, err
	}
	return b, sum8(b) == 0, nil
}

// rootLists follows the RSDP at at (0: the BIOS areas) to its root
// tables, the XSDT where revision 2 gives one, then the RSDT, and returns
// the table addresses each good one lists, in that order, with the errors
// of those that are not.
func rootLists(m PhysRW, at uint64) ([]rootList, []error, error) {
	rsdp, err := findRSDP(m, at)
	if err != nil {
		return nil, nil, err
	}
	type root struct {
		pa    uint64
		sig   string
		width int
	}
	var roots []root
	if len(rsdp) >= 36 {
		if x := binary.LittleEndian.Uint64(rsdp[24:]); x != 0 {
			roots = append(roots, root{x, "XSDT", 8})
		}
	}
	roots = append(roots, root{uint64(binary.LittleEndian.Uint32(rsdp[16:])), "RSDT", 4})
	var lists []rootList
	var errs []error
	for _, r := range roots {
		t, err := readSDT(m, r.pa, r.sig)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		list := rootList{sig: r.sig}
		ents := t[sdtHeaderLen:]
		for i := 0; i+r.width <= len(ents) && i/r.width < maxRSDTTables; i += r.width {
			if r.width == 8 {
				list.tables = append(list.tables, binary.LittleEndian.Uint64(ents[i:]))
			} else {
				list.tables = append(list.tables, uint64(binary.LittleEndian.Uint32(ents[i:])))
			}
		}
		lists = append(lists, list)
	}
	return lists, errs, nil
}

// rootList is the tables one root table (XSDT, RSDT) lists.
type rootList struct {
	sig    string
	tables []uint64
}

// findMADT follows the RSDP to the MADT: through the XSDT where revision
// 2 gives one, else (or where the XSDT is bad) through the RSDT.
func findMADT(m PhysRW, at uint64) (uint64, error) {
	lists, errs, err := rootLists(m, at)
	if err != nil {
		return 0, err
	}
	for _, list := range lists {
		for _, pa := range list.tables {
			var sig [4]byte
			if pa == 0 || m.ReadPhys(pa, sig[:]) != nil || string(sig[:]) != "APIC" {
				continue
			}
			if _, err := readSDT(m, pa, "APIC"); err != nil {
				errs = append(errs, err)
				continue
			}
			return pa, nil
		}
		errs = append(errs, fmt.Errorf("acpi: no MADT in the %s", list.sig))
	}
	return 0, errors.Join(errs...)
}

// madtProcessors lists the MADT's Processor Local APIC and Processor
// Local x2APIC entries.
func madtProcessors(m PhysRW, pa uint64) ([]Processor, error) {
	t, err := readSDT(m, pa, "APIC")
	if err != nil {
		return nil, err
	}
	if len(t) < madtEntriesOff {
		return nil, fmt.Errorf("acpi: MADT at %#x: %d bytes", pa, len(t))
	}
	var list []Processor
	for off := madtEntriesOff; off < len(t); {
		if off+2 > len(t) {
			return nil, fmt.Errorf("acpi: MADT at %#x: a byte after the last entry", pa)
		}
		typ, n := t[off], int(t[off+1])
		if n < 2 || off+n > len(t) {
			return nil, fmt.Errorf("acpi: MADT at %#x: entry at %d of length %d", pa, off, n)
		}
		e := t[off : off+n]
		switch {
		case typ == madtLocalAPIC && n >= 8:
			list = append(list, Processor{
				APICID: uint32(e[3]), Enabled: e[4]&madtEnabled != 0, OnlineCapable: e[4]&madtOnlineCap != 0,
				Source: SourceMADT, entry: pa + uint64(off),
			})
		case typ == madtLocalX2APC && n >= 16:
			fl := binary.LittleEndian.Uint32(e[8:])
			list = append(list, Processor{
				APICID: binary.LittleEndian.Uint32(e[4:]), Enabled: fl&madtEnabled != 0, OnlineCapable: fl&madtOnlineCap != 0,
				X2APIC: true, Source: SourceMADT, entry: pa + uint64(off),
			})
		}
		off += n
	}
	return list, nil
}

// mpFloatOK checks an MP floating pointer structure.
func mpFloatOK(b []byte) bool {
	return len(b) >= mpFloatLen && b[8] == 1 && sum8(b[:mpFloatLen]) == 0
}

// findMP returns the MP configuration table's address.
func findMP(m PhysRW) (uint64, error) {
	pa, ok := uint64(0), false
	if e := ebda(m); e != 0 {
		pa, ok = scan(m, e, e+1024, "_MP_", mpFloatOK)
	}
	if !ok {
		var b [2]byte
		if m.ReadPhys(baseMemKiBPtr, b[:]) == nil {
			if top := uint64(binary.LittleEndian.Uint16(b[:])) << 10; top >= 0x80000 && top <= 0xa0000 {
				pa, ok = scan(m, top-1024, top, "_MP_", mpFloatOK)
			}
		}
	}
	if !ok {
		pa, ok = scan(m, mpBIOSStart, biosAreaEnd, "_MP_", mpFloatOK)
	}
	if !ok {
		return 0, errors.New("acpi: no MP floating pointer")
	}
	var f [mpFloatLen]byte
	if err := m.ReadPhys(pa, f[:]); err != nil {
		return 0, err
	}
	if f[11] != 0 {
		return 0, fmt.Errorf("acpi: MP default configuration %d (no table to patch)", f[11])
	}
	t := uint64(binary.LittleEndian.Uint32(f[4:]))
	if t == 0 {
		return 0, errors.New("acpi: MP floating pointer without a configuration table")
	}
	return t, nil
}

// readMP reads the MP configuration table's base table, checked.
func readMP(m PhysRW, pa uint64) ([]byte, error) {
	var h [mpHeaderLen]byte
	if err := m.ReadPhys(pa, h[:]); err != nil {
		return nil, err
	}
	n := int(binary.LittleEndian.Uint16(h[4:]))
	if string(h[:4]) != "PCMP" || n < mpHeaderLen {
		return nil, fmt.Errorf("acpi: no MP configuration table at %#x", pa)
	}
	b := make([]byte, n)
	if err := m.ReadPhys(pa, b); err != nil {
		return nil, err
	}
	if sum8(b) != 0 {
		return nil, fmt.Errorf("acpi: MP configuration table at %#x: bad checksum", pa)
	}
	return b, nil
}

// mpProcessors lists the MP table's processor entries.
func mpProcessors(m PhysRW, pa uint64) ([]Processor, error) {
	t, err := readMP(m, pa)
	if err != nil {
		return nil, err
	}
	count := int(binary.LittleEndian.Uint16(t[34:]))
	var list []Processor
	off := mpHeaderLen
	for i := 0; i < count; i++ {
		if off >= len(t) {
			return nil, fmt.Errorf("acpi: MP table at %#x: entry %d beyond its length", pa, i)
		}
		n := mpOtherEntryLen
		if t[off] == mpProcessor {
			n = mpProcessorLen
		} else if t[off] > 4 {
			return nil, fmt.Errorf("acpi: MP table at %#x: entry type %d", pa, t[off])
		}
		if off+n > len(t) {
			return nil, fmt.Errorf("acpi: MP table at %#x: entry %d beyond its length", pa, i)
		}
		if t[off] == mpProcessor {
			list = append(list, Processor{
				APICID: uint32(t[off+1]), Enabled: t[off+3]&mpCPUEnabled != 0,
				Source: SourceMP, entry: pa + uint64(off),
			})
		}
		off += n
	}
	return list, nil
}

// Hide removes the processor with the given APIC ID from the guest's view:
// in every table that lists it, its entry is marked disabled (and not
// online capable) and the table's checksum is fixed; each write is read
// back. It reports how many entries it changed.
func (p *Processors) Hide(m PhysRW, apicID uint32) (int, error) {
	return p.mark(m, apicID, false)
}

// Show lists the processor with apicID as enabled again in the tables it
// was hidden from (Hide), for the guest to start: tamahv runs it as a
// vCPU. It returns the number of entries changed.
func (p *Processors) Show(m PhysRW, apicID uint32) (int, error) {
	return p.mark(m, apicID, true)
}

// mark hides (show false) or shows every table entry of the processor
// with apicID; Show leaves an entry the firmware did not enable alone.
func (p *Processors) mark(m PhysRW, apicID uint32, show bool) (int, error) {
	var entries []Processor
	if p.MADT != 0 {
		entries = append(entries, p.List...)
	}
	if p.MP != 0 {
		entries = append(entries, p.mp...)
	}
	n := 0
	var errs []error
	for _, c := range entries {
		if c.APICID != apicID || show && !c.Enabled {
			continue
		}
		changed, err := markEntry(m, p, c, show)
		if err != nil {
			errs = append(errs, err)
		}
		if changed {
			n++
		}
	}
	return n, errors.Join(errs...)
}

// markEntry clears one entry's enabled flags (show false) or sets its
// enabled flag again (show true), and fixes its table's checksum.
func markEntry(m PhysRW, p *Processors, c Processor, show bool) (bool, error) {
	var table []byte
	var base uint64
	var flagOff, sumOff int
	var clearMask, setMask byte
	var err error
	switch c.Source {
	case SourceMADT:
		base, sumOff = p.MADT, sdtChecksumOff
		table, err = readSDT(m, base, "APIC")
		flagOff, clearMask, setMask = int(c.entry-base)+4, madtEnabled|madtOnlineCap, madtEnabled
		if c.X2APIC {
			flagOff = int(c.entry-base) + 8
		}
	case SourceMP:
		base, sumOff = p.MP, mpChecksumOff
		table, err = readMP(m, base)
		flagOff, clearMask, setMask = int(c.entry-base)+3, mpCPUEnabled, mpCPUEnabled
	default:
		return false, fmt.Errorf("acpi: processor from %q", c.Source)
	}
	if err != nil {
		return false, err
	}
	if flagOff < 0 || flagOff >= len(table) {
		return false, fmt.Errorf("acpi: %s entry at %#x outside its table", c.Source, c.entry)
	}
	want := bytes.Clone(table)
	if show {
		want[flagOff] |= setMask
	} else {
		want[flagOff] &^= clearMask
	}
	if want[flagOff] == table[flagOff] {
		return false, nil
	}
	want[sumOff] = 0
	want[sumOff] = -sum8(want)
	if err := m.WritePhys(base+uint64(flagOff), want[flagOff:flagOff+1]); err != nil {
		return false, err
	}
	if err := m.WritePhys(base+uint64(sumOff), want[sumOff:sumOff+1]); err != nil {
		return false, err
	}
	got := make([]byte, len(want))
	if err := m.ReadPhys(base, got); err != nil {
		return false, err
	}
	if !bytes.Equal(got, want) {
		return false, fmt.Errorf("acpi: %s at %#x did not take the write (read-only memory?)", c.Source, base)
	}
	return true, nil
}

// All returns every processor the tables list: List, then, where List is
// the MADT's, the MP table's (a processor both list appears twice).
func (p *Processors) All() []Processor {
	all := slices.Clone(p.List)
	if p.MADT != 0 && p.MP != 0 {
		all = append(all, p.mp...)
	}
	return all
}

// Plan decides, from the firmware's lists (MADT and MP table), which
// processors tamahv starts and parks (every enabled or online-capable one
// but the bootstrap processor: the guest could start the one, bring the
// other online later) and which it hides from the guest (every one but the
// bootstrap processor). Each APIC ID appears once, in the order listed.
func (p *Processors) Plan(bsp uint32) (start, hide []uint32) {
	for _, c := range p.All() {
		if c.APICID == bsp {
			continue
		}
		if !slices.Contains(hide, c.APICID) {
			hide = append(hide, c.APICID)
		}
		if (c.Enabled || c.OnlineCapable) && !slices.Contains(start, c.APICID) {
			start = append(start, c.APICID)
		}
	}
	return start, hide
}
