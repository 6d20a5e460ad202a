package acpi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// The FADT's fields tamahv reads (ACPI 6.5, 5.2.9 "Fixed ACPI Description
// Table"), the generic address structure (5.2.3.2) and the sleep bits of
// the PM1 control register (4.8.4.2.1) and of the sleep control register
// of hardware-reduced ACPI (4.8.3.7): SLP_TYP and SLP_EN sit at the same
// bits of the byte that holds them.
const (
	fadtDSDT         = 40
	fadtSMICmd       = 48
	fadtPM1aEvt      = 56
	fadtS4BIOSReq    = 54
	fadtPM1aCnt      = 64
	fadtPM1bCnt      = 68
	fadtPM1CntLen    = 89
	fadtFlags        = 112
	fadtXDSDT        = 140
	fadtXPM1aEvt     = 148
	fadtXPM1aCnt     = 172
	fadtXPM1bCnt     = 184
	fadtSleepControl = 244
	fadtHWReduced    = 1 << 20

	gasLen      = 12
	gasSystemIO = 1

	// In the byte of the register that holds them (the PM1 control
	// register's second, the sleep control register's only one).
	slpTypShift = 2
	slpTypMask  = 7
	slpEn       = 1 << 5

	maxAMLTableLen = 4 << 20
)

// ErrSleepUnguarded is FindSleep's error where the firmware's sleep
// registers are where tamahv cannot check the guest's writes (memory
// space): the guest must not start, as it could then resume from S3
// outside tamahv.
var ErrSleepUnguarded = errors.New("acpi: the sleep registers cannot be guarded")

// SleepRegister is an I/O register through which the operating system
// enters a sleep state: a PM1 control register (2 bytes; its second byte
// holds SLP_TYP and SLP_EN) or the sleep control register of
// hardware-reduced ACPI (1 byte).
type SleepRegister struct {
	Port uint16
	Len  int
	// B: PM1b, whose SLP_TYP is a \_Sx package's second value (SLP_TYPb);
	// else its first (SLP_TYPa).
	B bool
}

// slpByte is the port of the byte holding SLP_TYP and SLP_EN.
func (r SleepRegister) slpByte() uint16 {
	if r.Len == 1 {
		return r.Port
	}
	return r.Port + 1
}

// Sleep is what the firmware's tables say of the ACPI sleep states: the
// registers that enter them and the SLP_TYP values of the \_S0-\_S5
// objects the DSDT and SSDTs name.
type Sleep struct {
	Registers []SleepRegister
	// Types[s] are \_Ss's SLP_TYPa and SLP_TYPb, where Found[s].
	Types [6][2]uint8
	Found [6]bool
	// SMICmd is the FADT's SMI command port and S4BIOSReq the value that
	// asks the firmware for S4BIOS (0: none): a firmware that restores
	// memory itself resumes through the waking vector, like S3.
	SMICmd    uint16
	S4BIOSReq uint8
	// EventBase is the PM1a event block's port (the FADT's 32-bit
	// PM1a_EVT_BLK, else its X_ address in I/O space; 0: none): the chipset's power-management base, which
	// a PCI register of the chipset's may move.
	EventBase uint16
	// Hidden lists the tables (DSDT, SSDT) where HideStates renamed
	// objects, once per rename.
	Hidden []string
	// Warnings are what the tables got wrong that Linux forgives (a bad
	// checksum): read anyway.
	Warnings []string
	// tables are the AML tables' physical addresses and signatures.
	tables []amlTable
}

type amlTable struct {
	pa  uint64
	sig string
}

// FindSleep reads the FADT and the AML tables the RSDP at rsdp leads to
// (0: the BIOS areas are searched): the sleep registers, the SMI command
// port's S4BIOS request, and the sleep states' SLP_TYP values. It returns
// nil and no error where there is no ACPI (rsdp is 0 and the BIOS areas
// hold no RSDP) or no FADT, and ErrSleepUnguarded where a sleep register
// is in memory space or the FADT names none. A table whose checksum is
// wrong is read anyway, as Linux reads it, with a warning.
func FindSleep(m PhysRW, rsdp uint64) (*Sleep, error) {
	tabs, err := rootTables(m, rsdp)
	if rsdp == 0 && errors.Is(err, ErrNoRSDP) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var fadt []byte
	var ssdts []uint64
	var warns []string
	for _, pa := range tabs {
		var sig [4]byte
		if m.ReadPhys(pa, sig[:]) != nil {
			continue
		}
		switch string(sig[:]) {
		case "FACP":
			if fadt == nil {
				var warn string
				if fadt, warn, err = readAML(m, pa, "FACP"); err != nil {
					return nil, err
				}
				warns = append(warns, warn)
			}
		case "SSDT":
			ssdts = append(ssdts, pa)
		}
	}
	if fadt == nil {
		return nil, nil
	}
	if len(fadt) < fadtPM1bCnt+4 {
		return nil, fmt.Errorf("%w: a FADT of %d bytes", ErrSleepUnguarded, len(fadt))
	}
	s := &Sleep{}
	for _, w := range warns {
		if w != "" {
			s.Warnings = append(s.Warnings, w)
		}
	}
	field32 := func(off int) uint64 {
		if off+4 > len(fadt) {
			return 0
		}
		return uint64(binary.LittleEndian.Uint32(fadt[off:]))
	}
	// gas returns a generic address's space and address, 0 where the
	// FADT is too short for it.
	gas := func(off int) (byte, uint64) {
		if off+gasLen > len(fadt) {
			return 0, 0
		}
		return fadt[off], binary.LittleEndian.Uint64(fadt[off+4:])
	}
	addIO := func(what string, space byte, addr uint64, n int, b bool) error {
		switch {
		case addr == 0:
			return nil
		case space != gasSystemIO:
			return fmt.Errorf("%w: %s in address space %d at %#x", ErrSleepUnguarded, what, space, addr)
		case addr > 0x10000-uint64(n):
			return fmt.Errorf("%w: %s at port %#x", ErrSleepUnguarded, what, addr)
		}
		r := SleepRegister{Port: uint16(addr), Len: n, B: b}
		for _, o := range s.Registers {
			if o == r {
				return nil
			}
		}
		s.Registers = append(s.Registers, r)
		return nil
	}
	// Both the 32-bit and the 64-bit (X_) addresses: an operating
	// system may use either.
	n := 2
	if len(fadt) > fadtPM1CntLen && fadt[fadtPM1CntLen] >= 2 {
		n = int(fadt[fadtPM1CntLen])
	}
	type reg struct {
		what  string
		space byte
		addr  uint64
		n     int
		b     bool
	}
	regs := []reg{
		{"PM1a control", gasSystemIO, field32(fadtPM1aCnt), n, false},
		{"PM1b control", gasSystemIO, field32(fadtPM1bCnt), n, true},
	}
	for _, g := range []struct {
		what string
		off  int
		b    bool
	}{{"PM1a control (X_)", fadtXPM1aCnt, false}, {"PM1b control (X_)", fadtXPM1bCnt, true}} {
		sp, a := gas(g.off)
		regs = append(regs, reg{g.what, sp, a, n, g.b})
	}
	// The sleep control register is hardware-reduced ACPI's, but a guest
	// need not follow the FADT's flags: guarded wherever it is named.
	if sp, a := gas(fadtSleepControl); a != 0 {
		regs = append(regs, reg{"sleep control", sp, a, 1, false})
	}
	for _, r := range regs {
		if err := addIO(r.what, r.space, r.addr, r.n, r.b); err != nil {
			return nil, err
		}
	}
	if len(s.Registers) == 0 {
		return nil, fmt.Errorf("%w: the FADT names no sleep register", ErrSleepUnguarded)
	}
	if e := field32(fadtPM1aEvt); e < 0x10000 {
		s.EventBase = uint16(e)
	}
	if sp, a := gas(fadtXPM1aEvt); s.EventBase == 0 && sp == gasSystemIO && a < 0x10000 {
		s.EventBase = uint16(a)
	}
	if p := field32(fadtSMICmd); p != 0 && p < 0x10000 && len(fadt) > fadtS4BIOSReq && fadt[fadtS4BIOSReq] != 0 {
		s.SMICmd, s.S4BIOSReq = uint16(p), fadt[fadtS4BIOSReq]
	}
	// The DSDT (both addresses where they differ), then the SSDTs.
	var dsdts []uint64
	if len(fadt) >= fadtXDSDT+8 {
		if x := binary.LittleEndian.Uint64(fadt[fadtXDSDT:]); x != 0 {
			dsdts = append(dsdts, x)
		}
	}
	if d := field32(fadtDSDT); d != 0 && (len(dsdts) == 0 || dsdts[0] != d) {
		dsdts = append(dsdts, d)
	}
	for _, pa := range dsdts {
		s.tables = append(s.tables, amlTable{pa, "DSDT"})
	}
	for _, pa := range ssdts {
		s.tables = append(s.tables, amlTable{pa, "SSDT"})
	}
	for _, t := range s.tables {
		b, warn, err := readAML(m, t.pa, t.sig)
		if err != nil {
			return nil, err
		}
		if warn != "" {
			s.Warnings = append(s.Warnings, warn)
		}
		for st := 0; st <= 5; st++ {
			if s.Found[st] {
				continue
			}
			if a, b, ok := SleepPackage(b, stateName(st)); ok {
				s.Types[st], s.Found[st] = [2]uint8{a, b}, true
			}
		}
	}
	return s, nil
}

// readAML reads a table the sleep states come from (FADT, DSDT, SSDT),
// which may be larger than the other tables; a bad checksum is a warning,
// as Linux takes it.
func readAML(m PhysRW, pa uint64, sig string) ([]byte, string, error) {
	b, sumOK, err := readTable(m, pa, sig, maxAMLTableLen)
	if err != nil || sumOK {
		return b, "", err
	}
	return b, fmt.Sprintf("the %s at %#x has a bad checksum", sig, pa), nil
}

// rootTables lists the tables the XSDT (where the RSDP's revision gives a
// good one) or else the RSDT points at.
func rootTables(m PhysRW, at uint64) ([]uint64, error) {
	lists, errs, err := rootLists(m, at)
	if err != nil {
		return nil, err
	}
	if len(lists) == 0 {
		return nil, errors.Join(errs...)
	}
	return lists[0].tables, nil
}

// AML opcodes (ACPI 6.5, 20.2 "AML Grammar Definition").
const (
	amlZero       = 0x00
	amlOne        = 0x01
	amlName       = 0x08
	amlBytePrefix = 0x0a
	amlWordPrefix = 0x0b
	amlDWPrefix   = 0x0c
	amlQWPrefix   = 0x0e
	amlPackage    = 0x12
	amlRoot       = 0x5c
	amlOnes       = 0xff
)

// stateName is \_Sx's name segment.
func stateName(st int) string { return fmt.Sprintf("_S%d_", st) }

// sleepNames finds the objects Name (seg, ...) and Name (\seg, ...) in an
// AML table: the offsets of their name segments.
func sleepNames(aml []byte, name string) []int {
	seg := []byte(name)
	var at []int
	for i := sdtHeaderLen; i+4 <= len(aml); i++ {
		j := bytes.Index(aml[i:], seg)
		if j < 0 {
			break
		}
		i += j
		if i >= 1 && aml[i-1] == amlName || i >= 2 && aml[i-1] == amlRoot && aml[i-2] == amlName {
			at = append(at, i)
		}
	}
	return at
}

// SleepPackage reads the first Name (seg, Package () {a, b, ...}) of an
// AML table (a DSDT or SSDT, header included), as the \_Sx objects are:
// seg is a name segment such as "_S3_"; a and b are its SLP_TYPa and
// SLP_TYPb.
func SleepPackage(aml []byte, seg string) (a, b uint8, ok bool) {
	for _, i := range sleepNames(aml, seg) {
		p := i + 4
		if p >= len(aml) || aml[p] != amlPackage {
			continue
		}
		p++
		if p >= len(aml) {
			continue
		}
		p += 1 + int(aml[p]>>6) // PkgLength: its lead byte and 0-3 more
		p++                     // NumElements
		var vals []uint8
		for len(vals) < 2 && p < len(aml) {
			v, n, ok := amlInteger(aml[p:])
			if !ok {
				break
			}
			vals = append(vals, uint8(v))
			p += n
		}
		switch len(vals) {
		case 2:
			return vals[0], vals[1], true
		case 1:
			return vals[0], 0, true
		}
	}
	return 0, 0, false
}

// amlInteger decodes an AML integer constant: its value and length.
func amlInteger(b []byte) (uint64, int, bool) {
	le := binary.LittleEndian
	switch {
	case len(b) >= 1 && b[0] == amlZero:
		return 0, 1, true
	case len(b) >= 1 && b[0] == amlOne:
		return 1, 1, true
	case len(b) >= 1 && b[0] == amlOnes:
		return ^uint64(0), 1, true
	case len(b) >= 2 && b[0] == amlBytePrefix:
		return uint64(b[1]), 2, true
	case len(b) >= 3 && b[0] == amlWordPrefix:
		return uint64(le.Uint16(b[1:])), 3, true
	case len(b) >= 5 && b[0] == amlDWPrefix:
		return uint64(le.Uint32(b[1:])), 5, true
	case len(b) >= 9 && b[0] == amlQWPrefix:
		return le.Uint64(b[1:]), 9, true
	}
	return 0, 0, false
}

// HideStates renames the objects \_S1, \_S2 and \_S3 in the AML tables
// (to XS1_, XS2_, XS3_, and fixes each table's checksum), so that the
// guest's kernel finds no sleep state that the firmware resumes from
// through its waking vector, outside tamahv: its suspend-to-RAM becomes
// suspend-to-idle, which stays in the guest. It returns the states it
// hid.
func (s *Sleep) HideStates(m PhysRW) ([]int, error) {
	var hid []int
	for _, t := range s.tables {
		b, _, err := readAML(m, t.pa, t.sig)
		if err != nil {
			return hid, err
		}
		changed := false
		for st := 1; st <= 3; st++ {
			for _, i := range sleepNames(b, stateName(st)) {
				b[i] = 'X'
				changed = true
				s.Hidden = append(s.Hidden, fmt.Sprintf("\\_S%d in the %s at %#x", st, t.sig, t.pa))
				if !containsInt(hid, st) {
					hid = append(hid, st)
				}
			}
		}
		if !changed {
			continue
		}
		fixChecksum(b)
		if err := m.WritePhys(t.pa, b); err != nil {
			return hid, err
		}
		if c, _, err := readAML(m, t.pa, t.sig); err != nil || !bytes.Equal(c, b) {
			return hid, fmt.Errorf("acpi: the %s at %#x kept its \\_Sx objects (read-only memory?)", t.sig, t.pa)
		}
	}
	return hid, nil
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func fixChecksum(b []byte) {
	b[sdtChecksumOff] = 0
	b[sdtChecksumOff] = -sum8(b)
}

// Allowed reports whether a sleep register's SLP_TYP value enters a state
// a guest may enter under tamahv: S4 (hibernation, which resumes through
// a boot) or S5 (soft off), as the firmware's \_S4 and \_S5 give them,
// and never a value \_S1, \_S2 or \_S3 names, whatever \_S4 and \_S5
// say. Where the tables name neither, nothing is allowed: the guest's
// kernel then cannot power the machine off through ACPI either.
func (s *Sleep) Allowed(typ uint8, b bool) bool {
	i := 0
	if b {
		i = 1
	}
	for st := 1; st <= 3; st++ {
		if s.Found[st] && s.Types[st][i]&slpTypMask == typ {
			return false
		}
	}
	for _, st := range []int{4, 5} {
		if s.Found[st] && s.Types[st][i]&slpTypMask == typ {
			return true
		}
	}
	return false
}

// Refuses reports whether a guest's write of size bytes of val at port
// is to be dropped: it sets SLP_EN in a sleep register with an SLP_TYP
// that Allowed refuses (S1-S3, or a value the tables do not name); what
// names what it would have entered.
func (s *Sleep) Refuses(port uint16, size int, val uint32) (refused bool, what string) {
	if p := s.SMICmd; s.S4BIOSReq != 0 && uint32(p) >= uint32(port) && uint32(p) < uint32(port)+uint32(size) &&
		uint8(val>>(8*(p-port))) == s.S4BIOSReq {
		return true, fmt.Sprintf("S4BIOS_REQ %#x at SMI command port %#x", s.S4BIOSReq, p)
	}
	for _, r := range s.Registers {
		p := r.slpByte()
		if uint32(p) < uint32(port) || uint32(p) >= uint32(port)+uint32(size) {
			continue
		}
		b := uint8(val >> (8 * (p - port)))
		if b&slpEn == 0 {
			continue
		}
		typ := b >> slpTypShift & slpTypMask
		if s.Allowed(typ, r.B) {
			continue
		}
		return true, fmt.Sprintf("SLP_TYP %d%s at port %#x", typ, s.stateOf(typ, r.B), r.Port)
	}
	return false, ""
}

// stateOf names the states whose packages give typ, " (S3)".
func (s *Sleep) stateOf(typ uint8, b bool) string {
	i := 0
	if b {
		i = 1
	}
	var st []string
	for k := 0; k <= 5; k++ {
		if s.Found[k] && s.Types[k][i]&slpTypMask == typ {
			st = append(st, fmt.Sprintf("S%d", k))
		}
	}
	if len(st) == 0 {
		return ""
	}
	return " (" + strings.Join(st, ", ") + ")"
}

// Ranges are the port ranges of the sleep registers (and of the SMI
// command port, where the firmware offers S4BIOS), first and last.
func (s *Sleep) Ranges() [][2]uint16 {
	var out [][2]uint16
	for _, r := range s.Registers {
		out = append(out, [2]uint16{r.Port, r.Port + uint16(r.Len) - 1})
	}
	if s.S4BIOSReq != 0 {
		out = append(out, [2]uint16{s.SMICmd, s.SMICmd})
	}
	return out
}
