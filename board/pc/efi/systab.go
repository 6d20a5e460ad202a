package efi

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/board/pc/acpi"
)

// Memory reads physical memory.
type Memory interface {
	ReadPhys(pa uint64, p []byte) error
}

// EFI_SYSTEM_TABLE of a 64-bit firmware.
const (
	// SystemTableSignature is EFI_SYSTEM_TABLE_SIGNATURE ("IBI SYST").
	SystemTableSignature = 0x5453595320494249
	// SystemTableLength is the size of the 64-bit system table up to and
	// including ConfigurationTable.
	SystemTableLength = 120
	// ConfigurationTableEntryLength is the size of one
	// EFI_CONFIGURATION_TABLE entry: a GUID and a pointer.
	ConfigurationTableEntryLength = 24
	// MaxConfigurationTables bounds NumberOfTableEntries; firmware lists
	// a few dozen.
	MaxConfigurationTables = 1024

	revisionOff        = 8
	headerSizeOff      = 12
	runtimeServicesOff = 88
	numberOfTablesOff  = 104
	configTableOff     = 112
)

// Configuration table GUIDs, in their canonical text form.
const (
	ACPI20TableGUID  = "8868e871-e4f1-11d3-bc22-0080c73c8881"
	ACPITableGUID    = "eb9d2d30-2d88-11d3-9a16-0090273fc14d"
	SMBIOSTableGUID  = "eb9d2d31-2d88-11d3-9a16-0090273fc14d"
	SMBIOS3TableGUID = "f2fd1544-9794-4a2c-992e-e5bbcf20e394"
)

// GUID is an EFI_GUID as it lies in memory: the first three fields little
// endian.
type GUID [16]byte

// String returns g in the canonical form, as in the *TableGUID constants.
func (g GUID) String() string {
	le := binary.LittleEndian
	return fmt.Sprintf("%08x-%04x-%04x-%x-%x", le.Uint32(g[0:]), le.Uint16(g[4:]), le.Uint16(g[6:]), g[8:10], g[10:])
}

// ConfigurationTable is one entry of the system table's configuration
// table.
type ConfigurationTable struct {
	VendorGUID  GUID
	VendorTable uint64
}

// SystemTable holds what tamahv reads of an EFI system table.
type SystemTable struct {
	// Revision is the specification revision: major in the high 16 bits.
	Revision        uint32
	RuntimeServices uint64
	Tables          []ConfigurationTable
}

// ErrBadSystemTable is wrapped by errors about a system table's contents.
var ErrBadSystemTable = errors.New("efi: bad system table")

// ReadSystemTable reads the 64-bit system table at pa and its
// configuration table. It checks the signature and header size and
// refuses more than MaxConfigurationTables entries; it does not check
// the header's CRC32.
func ReadSystemTable(m Memory, pa uint64) (*SystemTable, error) {
	if pa == 0 || pa > ^uint64(0)-SystemTableLength {
		return nil, fmt.Errorf("%w: address %#x", ErrBadSystemTable, pa)
	}
	var b [SystemTableLength]byte
	if err := m.ReadPhys(pa, b[:]); err != nil {
		return nil, fmt.Errorf("efi: system table at %#x: %w", pa, err)
	}
	le := binary.LittleEndian
	if sig := le.Uint64(b[:]); sig != SystemTableSignature {
		return nil, fmt.Errorf("%w: signature %#x at %#x", ErrBadSystemTable, sig, pa)
	}
	if hs := le.Uint32(b[headerSizeOff:]); hs < SystemTableLength {
		return nil, fmt.Errorf("%w: header size %d", ErrBadSystemTable, hs)
	}
	st := &SystemTable{Revision: le.Uint32(b[revisionOff:]), RuntimeServices: le.Uint64(b[runtimeServicesOff:])}
	n, at := le.Uint64(b[numberOfTablesOff:]), le.Uint64(b[configTableOff:])
	if n > MaxConfigurationTables {
		return nil, fmt.Errorf("%w: %d configuration tables (at most %d)", ErrBadSystemTable, n, MaxConfigurationTables)
	}
	if n == 0 {
		return st, nil
	}
	if at == 0 || at > ^uint64(0)-n*ConfigurationTableEntryLength {
		return nil, fmt.Errorf("%w: configuration table at %#x", ErrBadSystemTable, at)
	}
	raw := make([]byte, n*ConfigurationTableEntryLength)
	if err := m.ReadPhys(at, raw); err != nil {
		return nil, fmt.Errorf("efi: configuration table at %#x: %w", at, err)
	}
	st.Tables = make([]ConfigurationTable, n)
	for i := range st.Tables {
		e := raw[i*ConfigurationTableEntryLength:]
		copy(st.Tables[i].VendorGUID[:], e)
		st.Tables[i].VendorTable = le.Uint64(e[16:])
	}
	return st, nil
}

// Table returns the address of the first configuration table entry with
// the GUID guid (canonical form), and whether there is one.
func (st *SystemTable) Table(guid string) (uint64, bool) {
	for _, t := range st.Tables {
		if t.VendorGUID.String() == guid {
			return t.VendorTable, true
		}
	}
	return 0, false
}

// RSDPLocation is an RSDP found through the configuration table.
type RSDPLocation struct {
	// Addr is the RSDP's physical address, what a guest gets as
	// boot_params.acpi_rsdp_addr.
	Addr uint64
	// GUID is the entry it came from: ACPI20TableGUID or ACPITableGUID.
	GUID string
	RSDP acpi.RSDP
}

// ErrNoRSDP is returned by FindRSDP when no configuration table entry
// leads to a valid RSDP.
var ErrNoRSDP = errors.New("efi: no valid ACPI RSDP in the configuration table")

// FindRSDP finds the ACPI RSDP through the system table at systab: the
// ACPI 2.0 entry first, then the ACPI 1.0 one, as Linux does. An entry
// whose RSDP fails acpi.Read's checks (signature, checksums, length) is
// passed over; the error then says why.
func FindRSDP(m Memory, systab uint64) (RSDPLocation, error) {
	st, err := ReadSystemTable(m, systab)
	if err != nil {
		return RSDPLocation{}, err
	}
	var errs []error
	for _, guid := range []string{ACPI20TableGUID, ACPITableGUID} {
		pa, ok := st.Table(guid)
		if !ok {
			continue
		}
		r, err := acpi.Read(m, pa)
		if err != nil {
			errs = append(errs, fmt.Errorf("entry %s: %w", guid, err))
			continue
		}
		return RSDPLocation{Addr: pa, GUID: guid, RSDP: r}, nil
	}
	if len(errs) == 0 {
		return RSDPLocation{}, fmt.Errorf("%w: no ACPI entry among %d", ErrNoRSDP, len(st.Tables))
	}
	return RSDPLocation{}, fmt.Errorf("%w: %w", ErrNoRSDP, errors.Join(errs...))
}
