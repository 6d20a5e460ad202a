// The RSDP's layout: ACPI Specification 6.5, "5.2.5 Root System
// Description Pointer (RSDP)".

package acpi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// Memory reads physical memory.
type Memory interface {
	ReadPhys(pa uint64, p []byte) error
}

// RSDP layout.
const (
	// Signature opens every RSDP.
	Signature = "RSD PTR "
	// V1Length is the size of an ACPI 1.0 RSDP (revision 0), the part
	// the first checksum covers.
	V1Length = 20
	// V2Length is the size of an ACPI 2.0 and later RSDP (revision 2 and
	// up) as defined today; its Length field may give more.
	V2Length = 36
	// MaxLength bounds the Length field this package accepts.
	MaxLength = 4096

	oemIDOff    = 9
	revisionOff = 15
	rsdtOff     = 16
	lengthOff   = 20
	xsdtOff     = 24
	// ExtendedRevision is the first revision with Length, XSDT and the
	// extended checksum.
	ExtendedRevision = 2
)

// RSDP is a checked Root System Description Pointer.
type RSDP struct {
	OEMID    [6]byte
	Revision uint8
	// RSDT is the 32-bit address of the RSDT.
	RSDT uint32
	// Length is the structure's length: V1Length below revision 2.
	Length uint32
	// XSDT is the 64-bit address of the XSDT; 0 below revision 2.
	XSDT uint64
}

// Root returns the root table's address: the XSDT's where there is one,
// else the RSDT's.
func (r RSDP) Root() uint64 {
	if r.XSDT != 0 {
		return r.XSDT
	}
	return uint64(r.RSDT)
}

// ErrBadRSDP is wrapped by every error about an RSDP's contents.
var ErrBadRSDP = errors.New("acpi: bad RSDP")

func sum8(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return s
}

// Parse checks and decodes the RSDP at the start of b: the signature, the
// checksum over the first 20 bytes and, from revision 2 on, the length
// and the extended checksum over the whole structure.
func Parse(b []byte) (RSDP, error) {
	if len(b) < V1Length {
		return RSDP{}, fmt.Errorf("%w: %d bytes", ErrBadRSDP, len(b))
	}
	if !bytes.Equal(b[:len(Signature)], []byte(Signature)) {
		return RSDP{}, fmt.Errorf("%w: signature %q", ErrBadRSDP, b[:len(Signature)])
	}
	if s := sum8(b[:V1Length]); s != 0 {
		return RSDP{}, fmt.Errorf("%w: checksum off by %#x", ErrBadRSDP, s)
	}
	r := RSDP{Revision: b[revisionOff], RSDT: binary.LittleEndian.Uint32(b[rsdtOff:]), Length: V1Length}
	copy(r.OEMID[:], b[oemIDOff:])
	if r.Revision < ExtendedRevision {
		return r, nil
	}
	if len(b) < V2Length {
		return RSDP{}, fmt.Errorf("%w: revision %d in %d bytes", ErrBadRSDP, r.Revision, len(b))
	}
	r.Length = binary.LittleEndian.Uint32(b[lengthOff:])
	if r.Length < V2Length || r.Length > MaxLength || int(r.Length) > len(b) {
		return RSDP{}, fmt.Errorf("%w: length %d (have %d bytes)", ErrBadRSDP, r.Length, len(b))
	}
	if s := sum8(b[:r.Length]); s != 0 {
		return RSDP{}, fmt.Errorf("%w: extended checksum off by %#x", ErrBadRSDP, s)
	}
	r.XSDT = binary.LittleEndian.Uint64(b[xsdtOff:])
	return r, nil
}

// Read reads and checks the RSDP at the physical address pa.
func Read(m Memory, pa uint64) (RSDP, error) {
	if pa == 0 || pa > ^uint64(0)-MaxLength {
		return RSDP{}, fmt.Errorf("%w: address %#x", ErrBadRSDP, pa)
	}
	b := make([]byte, V2Length)
	if err := m.ReadPhys(pa, b[:V1Length]); err != nil {
		return RSDP{}, fmt.Errorf("acpi: RSDP at %#x: %w", pa, err)
	}
	if b[revisionOff] < ExtendedRevision {
		return Parse(b[:V1Length])
	}
	if err := m.ReadPhys(pa+V1Length, b[V1Length:]); err != nil {
		return RSDP{}, fmt.Errorf("acpi: RSDP at %#x: %w", pa, err)
	}
	if n := binary.LittleEndian.Uint32(b[lengthOff:]); n > V2Length && n <= MaxLength {
		b = append(b, make([]byte, n-V2Length)...)
		if err := m.ReadPhys(pa+V2Length, b[V2Length:]); err != nil {
			return RSDP{}, fmt.Errorf("acpi: RSDP at %#x: %w", pa, err)
		}
	}
	r, err := Parse(b)
	if err != nil {
		return RSDP{}, fmt.Errorf("%w (at %#x)", err, pa)
	}
	return r, nil
}

// ErrCopyDiffers is returned by MatchCopy when a boot loader's copy of
// the RSDP is not the RSDP found in memory.
var ErrCopyDiffers = errors.New("acpi: the boot loader's RSDP copy differs from the RSDP in memory")

// MatchCopy checks that cp, a boot loader's copy of an RSDP (Multiboot2
// tag 14 or 15), is valid and the same as r: revision, OEM ID, RSDT and,
// from revision 2 on, length and XSDT. A boot loader copies an ACPI 1.0
// RSDP (revision 0) into tag 14 and an ACPI 2.0 one into tag 15; on UEFI
// they are two structures, found through two GUIDs, which may point to
// different root tables.
func MatchCopy(r RSDP, cp []byte) error {
	c, err := Parse(cp)
	if err != nil {
		return fmt.Errorf("acpi: boot loader's copy: %w", err)
	}
	if c != r {
		return fmt.Errorf("%w: copy %+v, memory %+v", ErrCopyDiffers, c, r)
	}
	return nil
}
