package acpi

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Where the sleep tests put their tables (the high window).
const (
	tDSDT = 0x3fff1000
	tSSDT = 0x3fff2000
)

// aml name objects: Name (\_S3, Package (4) {1, 1, 0, 0}) as iasl writes
// it, Name (_S5, Package (4) {0, 0, 0, 0}), Name (_S4, Package (2)
// {6, 6}) with byte prefixes, and a string "_S3_" that is no name.
var (
	amlS3     = []byte{amlName, amlRoot, '_', 'S', '3', '_', amlPackage, 6, 4, amlOne, amlOne, amlZero, amlZero}
	amlS5     = []byte{amlName, '_', 'S', '5', '_', amlPackage, 6, 4, amlZero, amlZero, amlZero, amlZero}
	amlS4     = []byte{amlName, '_', 'S', '4', '_', amlPackage, 6, 2, amlBytePrefix, 6, amlBytePrefix, 6}
	amlString = []byte{0x0d, '_', 'S', '3', '_', 0}
)

// fadt builds a FADT of ACPI 6 length with the given PM1 control ports,
// their X_ generic addresses (space, address) and flags.
func fadt(pm1a, pm1b uint32, xa [2]uint64, flags uint32, sleepCtl [2]uint64) []byte {
	body := make([]byte, 276-sdtHeaderLen)
	le := binary.LittleEndian
	at := func(off int) []byte { return body[off-sdtHeaderLen:] }
	le.PutUint32(at(fadtDSDT), tDSDT)
	le.PutUint64(at(fadtXDSDT), tDSDT)
	le.PutUint32(at(fadtPM1aCnt), pm1a)
	if pm1a != 0 {
		le.PutUint32(at(fadtPM1aEvt), pm1a-4)
	}
	le.PutUint32(at(fadtPM1bCnt), pm1b)
	at(fadtPM1CntLen)[0] = 2
	le.PutUint32(at(fadtFlags), flags)
	at(fadtXPM1aCnt)[0] = byte(xa[0])
	le.PutUint64(at(fadtXPM1aCnt+4), xa[1])
	at(fadtSleepControl)[0] = byte(sleepCtl[0])
	le.PutUint64(at(fadtSleepControl+4), sleepCtl[1])
	return sdt("FACP", body)
}

// sleepMachine lays out RSDP, RSDT, FADT, a DSDT with \_S3 and \_S5 (and
// a string "_S3_") and an SSDT with \_S4.
func sleepMachine(f []byte) *fakePhys {
	m := newFakePhys()
	m.put(tRSDP, rsdp(0, tRSDT, 0))
	var rsdt []byte
	for _, pa := range []uint32{tFADT, tSSDT} {
		rsdt = binary.LittleEndian.AppendUint32(rsdt, pa)
	}
	m.put(tRSDT, sdt("RSDT", rsdt))
	m.put(tFADT, f)
	var dsdt []byte
	dsdt = append(dsdt, amlString...)
	dsdt = append(dsdt, amlS3...)
	dsdt = append(dsdt, amlS5...)
	m.put(tDSDT, sdt("DSDT", dsdt))
	m.put(tSSDT, sdt("SSDT", amlS4))
	return m
}

func TestFindSleep(t *testing.T) {
	m := sleepMachine(fadt(0xb004, 0, [2]uint64{gasSystemIO, 0xb004}, 0, [2]uint64{}))
	s, err := FindSleep(m, 0)
	require.NoError(t, err)
	require.NotNil(t, s)
	assert.Equal(t, []SleepRegister{{Port: 0xb004, Len: 2}}, s.Registers, "the 32-bit and X_ addresses, once")
	assert.Equal(t, [6]bool{false, false, false, true, true, true}, s.Found)
	assert.Equal(t, [2]uint8{1, 1}, s.Types[3])
	assert.Equal(t, [2]uint8{6, 6}, s.Types[4], "from the SSDT")
	assert.Equal(t, [2]uint8{0, 0}, s.Types[5])
	assert.Equal(t, [][2]uint16{{0xb004, 0xb005}}, s.Ranges())
	assert.Equal(t, uint16(0xb000), s.EventBase)
}

func TestSleepRefuses(t *testing.T) {
	m := sleepMachine(fadt(0xb004, 0, [2]uint64{}, 0, [2]uint64{}))
	s, err := FindSleep(m, 0)
	require.NoError(t, err)
	const en = 1 << 13
	for _, c := range []struct {
		port uint16
		size int
		val  uint32
		want bool
		name string
	}{
		{0xb004, 2, en | 1<<10, true, "S3, a 16-bit write"},
		{0xb005, 1, 1<<5 | 1<<2, true, "S3, the high byte alone"},
		{0xb002, 4, (en | 1<<10) << 16, true, "S3 in a 32-bit write from below"},
		{0xb004, 2, en | 2<<10, true, "a type no package names"},
		{0xb004, 2, en, false, "S5: soft off"},
		{0xb004, 2, en | 6<<10, false, "S4: hibernation"},
		{0xb004, 2, 1 << 10, false, "S3's type without SLP_EN"},
		{0xb004, 1, 0xff, false, "the low byte alone (SCI_EN and the rest)"},
		{0xb006, 2, 0xffff, false, "another register"},
		{0xb003, 1, 0xff, false, "below"},
	} {
		got, what := s.Refuses(c.port, c.size, c.val)
		assert.Equal(t, c.want, got, c.name)
		if c.want {
			assert.Contains(t, what, "at port 0xb004", c.name)
		}
	}
	_, what := s.Refuses(0xb004, 2, en|1<<10)
	assert.Equal(t, "SLP_TYP 1 (S3) at port 0xb004", what)
}

func TestSleepWithoutS5RefusesEverySleep(t *testing.T) {
	m := sleepMachine(fadt(0xb004, 0, [2]uint64{}, 0, [2]uint64{}))
	s, err := FindSleep(m, 0)
	require.NoError(t, err)
	s.Found[4], s.Found[5] = false, false
	for typ := uint32(0); typ < 8; typ++ {
		r, _ := s.Refuses(0xb004, 2, 1<<13|typ<<10)
		assert.True(t, r, "type %d", typ)
	}
}

func TestSleepPM1bAndHardwareReduced(t *testing.T) {
	m := sleepMachine(fadt(0xb004, 0xc004, [2]uint64{}, fadtHWReduced, [2]uint64{gasSystemIO, 0xd000}))
	s, err := FindSleep(m, 0)
	require.NoError(t, err)
	assert.Equal(t, []SleepRegister{{Port: 0xb004, Len: 2}, {Port: 0xc004, Len: 2, B: true}, {Port: 0xd000, Len: 1}}, s.Registers)
	r, _ := s.Refuses(0xc005, 1, 1<<5|1<<2)
	assert.True(t, r, "PM1b, S3's SLP_TYPb")
	r, _ = s.Refuses(0xd000, 1, 1<<5|1<<2)
	assert.True(t, r, "the sleep control register")
	r, _ = s.Refuses(0xd000, 1, 1<<5|6<<2)
	assert.False(t, r, "S4 through the sleep control register")
}

func TestSleepControlWithoutTheHardwareReducedFlag(t *testing.T) {
	m := sleepMachine(fadt(0xb004, 0, [2]uint64{}, 0, [2]uint64{gasSystemIO, 0xd000}))
	s, err := FindSleep(m, 0)
	require.NoError(t, err)
	r, _ := s.Refuses(0xd000, 1, 1<<5|1<<2)
	assert.True(t, r, "a guest need not follow the FADT's flags")
}

func TestSleepRefusesWhatS1ToS3NameWhateverS5Says(t *testing.T) {
	m := sleepMachine(fadt(0xb004, 0, [2]uint64{}, 0, [2]uint64{}))
	s, err := FindSleep(m, 0)
	require.NoError(t, err)
	s.Types[5] = [2]uint8{1, 1} // as a stray \_S5 package inside a method could give it
	r, _ := s.Refuses(0xb004, 2, 1<<13|1<<10)
	assert.True(t, r, "S3's type stays refused")
}

func TestSleepRefusesS4BIOS(t *testing.T) {
	f := fadt(0xb004, 0, [2]uint64{}, 0, [2]uint64{})
	binary.LittleEndian.PutUint32(f[fadtSMICmd:], 0xb2)
	f[fadtS4BIOSReq] = 0xf2
	f[52] = 0xf1 // ACPI_ENABLE
	m := sleepMachine(fix(f, sdtChecksumOff))
	s, err := FindSleep(m, 0)
	require.NoError(t, err)
	assert.Contains(t, s.Ranges(), [2]uint16{0xb2, 0xb2})
	r, what := s.Refuses(0xb2, 1, 0xf2)
	assert.True(t, r)
	assert.Equal(t, "S4BIOS_REQ 0xf2 at SMI command port 0xb2", what)
	r, _ = s.Refuses(0xb2, 1, 0xf1)
	assert.False(t, r, "ACPI_ENABLE passes")
}

func TestSleepTablesWithBadChecksumsAreReadWithAWarning(t *testing.T) {
	m := sleepMachine(fadt(0xb004, 0, [2]uint64{}, 0, [2]uint64{}))
	b, err := m.at(tDSDT+sdtChecksumOff, 1)
	require.NoError(t, err)
	b[0]++
	s, err := FindSleep(m, 0)
	require.NoError(t, err)
	assert.Equal(t, []string{"the DSDT at 0x3fff1000 has a bad checksum"}, s.Warnings)
	assert.True(t, s.Found[3], "read anyway")
	_, err = s.HideStates(m)
	require.NoError(t, err)
	_, warn, err := readAML(m, tDSDT, "DSDT")
	require.NoError(t, err)
	assert.Empty(t, warn, "its checksum holds once renamed")
}

func TestSleepWithoutRegistersIsUnguarded(t *testing.T) {
	_, err := FindSleep(sleepMachine(fadt(0, 0, [2]uint64{}, 0, [2]uint64{})), 0)
	assert.ErrorIs(t, err, ErrSleepUnguarded, "no PM1 control register")
	short := sdt("FACP", make([]byte, 60-sdtHeaderLen))
	_, err = FindSleep(sleepMachine(short), 0)
	assert.ErrorIs(t, err, ErrSleepUnguarded, "a FADT too short for its PM1 control registers")
	_, err = FindSleep(sleepMachine(fadt(0, 0, [2]uint64{gasSystemIO, 0xffffffff_ffffffff}, 0, [2]uint64{})), 0)
	assert.ErrorIs(t, err, ErrSleepUnguarded, "a port beyond 0xffff")
}

func TestSleepInMemorySpaceIsUnguarded(t *testing.T) {
	m := sleepMachine(fadt(0, 0, [2]uint64{0, 0xfed80004}, 0, [2]uint64{}))
	_, err := FindSleep(m, 0)
	assert.ErrorIs(t, err, ErrSleepUnguarded)
	assert.ErrorContains(t, err, "0xfed80004")
	m = sleepMachine(fadt(0xb004, 0, [2]uint64{}, fadtHWReduced, [2]uint64{0, 0xfed80000}))
	_, err = FindSleep(m, 0)
	assert.ErrorIs(t, err, ErrSleepUnguarded, "a hardware-reduced sleep control register in memory")
}

func TestFindSleepWithoutFADT(t *testing.T) {
	m := newFakePhys()
	m.put(tRSDP, rsdp(0, tRSDT, 0))
	m.put(tRSDT, sdt("RSDT", binary.LittleEndian.AppendUint32(nil, tSSDT)))
	m.put(tSSDT, sdt("SSDT", amlS4))
	s, err := FindSleep(m, 0)
	assert.NoError(t, err)
	assert.Nil(t, s, "no FADT: no ACPI sleep")
	s, err = FindSleep(newFakePhys(), 0)
	assert.NoError(t, err)
	assert.Nil(t, s, "no ACPI")
	_, err = FindSleep(newFakePhys(), tRSDP)
	assert.Error(t, err, "no RSDP where the boot path said")
}

func TestHideStates(t *testing.T) {
	m := sleepMachine(fadt(0xb004, 0, [2]uint64{}, 0, [2]uint64{}))
	s, err := FindSleep(m, 0)
	require.NoError(t, err)
	hid, err := s.HideStates(m)
	require.NoError(t, err)
	assert.Equal(t, []int{3}, hid)
	assert.Equal(t, []string{`\_S3 in the DSDT at 0x3fff1000`}, s.Hidden)
	d, warn, err := readAML(m, tDSDT, "DSDT")
	require.NoError(t, err)
	assert.Empty(t, warn, "the checksum holds")
	assert.Contains(t, string(d), "\\XS3_", "renamed")
	assert.Contains(t, string(d), "\x0d_S3_", "a string is no name: left")
	again, err := FindSleep(m, 0)
	require.NoError(t, err)
	assert.False(t, again.Found[3], "the guest finds no \\_S3")
	assert.True(t, again.Found[4] && again.Found[5])
	a, bb, ok := SleepPackage(d, "XS3_")
	assert.True(t, ok, "what the guest finds under the new name")
	assert.Equal(t, [2]uint8{1, 1}, [2]uint8{a, bb})
	r, _ := s.Refuses(0xb004, 2, 1<<13|1<<10)
	assert.True(t, r, "the first reading still knows S3's type")

	m = sleepMachine(fadt(0xb004, 0, [2]uint64{}, 0, [2]uint64{}))
	m.readOnly = [2]uint64{tDSDT, tDSDT + 0x100}
	s, err = FindSleep(m, 0)
	require.NoError(t, err)
	_, err = s.HideStates(m)
	assert.ErrorContains(t, err, "kept its")
}
