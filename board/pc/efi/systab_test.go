package efi

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/board/pc/acpi"
)

// mem is sparse physical memory.
type mem map[uint64][]byte

func (m mem) ReadPhys(pa uint64, p []byte) error {
	for base, b := range m {
		if pa >= base && pa-base <= uint64(len(b)) && uint64(len(p)) <= uint64(len(b))-(pa-base) {
			copy(p, b[pa-base:])
			return nil
		}
	}
	return fmt.Errorf("no memory at %#x+%d", pa, len(p))
}

// The GUIDs as they lie in memory (OVMF's configuration table).
const (
	acpi20Bytes = "71e86888f1e4d311bc220080c73c8881"
	acpi10Bytes = "302d9deb882dd3119a160090273fc14d"
	smbiosBytes = "312d9deb882dd3119a160090273fc14d"
	// RSDPs OVMF left (acpi package tests).
	rsdpV1 = "5253442050545220cc424f434853200000d0773f"
	rsdpV2 = "525344205054522056424f434853200274d0773f24000000e8d0773f000000006e000000"

	systabAt = 0x3f5ec018
	tablesAt = 0x3f5ecc98
	rsdp1At  = 0x3f77e000
	rsdp2At  = 0x3f77e014
)

func unhex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

// firmware builds a system table at systabAt whose configuration table
// lists the given GUIDs (memory form) and addresses, and both RSDPs.
func firmware(entries ...any) mem {
	le := binary.LittleEndian
	st := make([]byte, SystemTableLength)
	le.PutUint64(st, SystemTableSignature)
	le.PutUint32(st[revisionOff:], 2<<16|70)
	le.PutUint32(st[headerSizeOff:], SystemTableLength)
	le.PutUint64(st[runtimeServicesOff:], 0x3f5ecb98)
	le.PutUint64(st[numberOfTablesOff:], uint64(len(entries)/2))
	le.PutUint64(st[configTableOff:], tablesAt)
	tables := make([]byte, 0, len(entries)/2*ConfigurationTableEntryLength)
	for i := 0; i < len(entries); i += 2 {
		tables = append(tables, unhex(entries[i].(string))...)
		tables = le.AppendUint64(tables, entries[i+1].(uint64))
	}
	rsdps := append(unhex(rsdpV1), unhex(rsdpV2)...)
	return mem{systabAt: st, tablesAt: tables, rsdp1At: rsdps}
}

func TestGUIDString(t *testing.T) {
	for s, want := range map[string]string{acpi20Bytes: ACPI20TableGUID, acpi10Bytes: ACPITableGUID, smbiosBytes: SMBIOSTableGUID} {
		var g GUID
		copy(g[:], unhex(s))
		assert.Equal(t, want, g.String())
	}
}

func TestFindRSDP(t *testing.T) {
	m := firmware(smbiosBytes, uint64(0x3f518000), acpi10Bytes, uint64(rsdp1At), acpi20Bytes, uint64(rsdp2At))
	st, err := ReadSystemTable(m, systabAt)
	require.NoError(t, err)
	assert.Equal(t, uint32(2<<16|70), st.Revision)
	assert.Len(t, st.Tables, 3)
	at, ok := st.Table(SMBIOSTableGUID)
	assert.True(t, ok)
	assert.Equal(t, uint64(0x3f518000), at)
	_, ok = st.Table(SMBIOS3TableGUID)
	assert.False(t, ok)

	loc, err := FindRSDP(m, systabAt)
	require.NoError(t, err)
	assert.Equal(t, uint64(rsdp2At), loc.Addr, "ACPI 2.0 before 1.0, whatever the order")
	assert.Equal(t, ACPI20TableGUID, loc.GUID)
	assert.Equal(t, uint64(0x3f77d0e8), loc.RSDP.XSDT)
	assert.NoError(t, acpi.MatchCopy(loc.RSDP, unhex(rsdpV2)))

	// A bad ACPI 2.0 RSDP: the ACPI 1.0 one is used.
	m[rsdp1At][acpi.V1Length+8]++ // the 2.0 RSDP's checksum
	loc, err = FindRSDP(m, systabAt)
	require.NoError(t, err)
	assert.Equal(t, uint64(rsdp1At), loc.Addr)
	assert.Equal(t, ACPITableGUID, loc.GUID)
	assert.Equal(t, uint32(0x3f77d000), loc.RSDP.RSDT)

	// Both bad: no RSDP, and the error says why for each.
	m[rsdp1At][0] = 'r'
	_, err = FindRSDP(m, systabAt)
	assert.ErrorIs(t, err, ErrNoRSDP)
	assert.ErrorIs(t, err, acpi.ErrBadRSDP)
	assert.ErrorContains(t, err, ACPI20TableGUID)

	// No ACPI entry at all (firmware without ACPI, as OVMF in Bochs).
	_, err = FindRSDP(firmware(smbiosBytes, uint64(0x3f518000)), systabAt)
	assert.ErrorIs(t, err, ErrNoRSDP)
	_, err = FindRSDP(firmware(), systabAt)
	assert.ErrorIs(t, err, ErrNoRSDP, "no configuration table")
}

func TestFindRSDPHostile(t *testing.T) {
	le := binary.LittleEndian
	good := func() mem { return firmware(acpi20Bytes, uint64(rsdp2At)) }
	for name, c := range map[string]struct {
		mutate func(m mem)
		at     uint64
		want   error
	}{
		"signature":          {func(m mem) { m[systabAt][0] = 'X' }, systabAt, ErrBadSystemTable},
		"header size":        {func(m mem) { le.PutUint32(m[systabAt][headerSizeOff:], 24) }, systabAt, ErrBadSystemTable},
		"entries huge":       {func(m mem) { le.PutUint64(m[systabAt][numberOfTablesOff:], 1<<60) }, systabAt, ErrBadSystemTable},
		"entries 1025":       {func(m mem) { le.PutUint64(m[systabAt][numberOfTablesOff:], MaxConfigurationTables+1) }, systabAt, ErrBadSystemTable},
		"table at 0":         {func(m mem) { le.PutUint64(m[systabAt][configTableOff:], 0) }, systabAt, ErrBadSystemTable},
		"table wraps":        {func(m mem) { le.PutUint64(m[systabAt][configTableOff:], ^uint64(0)-8) }, systabAt, ErrBadSystemTable},
		"system table 0":     {func(m mem) {}, 0, ErrBadSystemTable},
		"system table wraps": {func(m mem) {}, ^uint64(0) - 16, ErrBadSystemTable},
		"RSDP nowhere":       {func(m mem) { le.PutUint64(m[tablesAt][16:], 0xdead0000) }, systabAt, ErrNoRSDP},
		"RSDP at 0":          {func(m mem) { le.PutUint64(m[tablesAt][16:], 0) }, systabAt, ErrNoRSDP},
		"RSDP wraps":         {func(m mem) { le.PutUint64(m[tablesAt][16:], ^uint64(0)-4) }, systabAt, ErrNoRSDP},
		"bad extended sum":   {func(m mem) { m[rsdp1At][acpi.V1Length+32]++ }, systabAt, ErrNoRSDP},
	} {
		m := good()
		c.mutate(m)
		_, err := FindRSDP(m, c.at)
		assert.ErrorIs(t, err, c.want, name)
	}

	// Entries past the memory: the read fails, nothing is made up.
	m := good()
	le.PutUint64(m[systabAt][numberOfTablesOff:], MaxConfigurationTables)
	_, err := FindRSDP(m, systabAt)
	assert.ErrorContains(t, err, "configuration table at")
	_, err = FindRSDP(good(), 0x1000)
	assert.ErrorContains(t, err, "no memory")
}
