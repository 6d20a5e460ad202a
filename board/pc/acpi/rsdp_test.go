package acpi

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The RSDPs OVMF left in QEMU (GRUB's tags 14 and 15 in
// board/pc/multiboot2/testdata/grub-efi.mbi).
const (
	ovmfV1 = "5253442050545220cc424f434853200000d0773f"
	ovmfV2 = "525344205054522056424f434853200274d0773f24000000e8d0773f000000006e000000"
)

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	require.NoError(t, err)
	return b
}

func bochs() [6]byte { return [6]byte{'B', 'O', 'C', 'H', 'S', ' '} }

func TestParseFirmwareRSDPs(t *testing.T) {
	r, err := Parse(unhex(t, ovmfV1))
	require.NoError(t, err)
	assert.Equal(t, RSDP{OEMID: bochs(), RSDT: 0x3f77d000, Length: V1Length}, r)
	assert.Equal(t, uint64(0x3f77d000), r.Root())

	r, err = Parse(unhex(t, ovmfV2))
	require.NoError(t, err)
	assert.Equal(t, RSDP{OEMID: bochs(), Revision: 2, RSDT: 0x3f77d074, Length: V2Length, XSDT: 0x3f77d0e8}, r)
	assert.Equal(t, uint64(0x3f77d0e8), r.Root(), "the XSDT first")
}

// fixSums recomputes both checksums of an RSDP.
func fixSums(b []byte) {
	b[8] = 0
	b[8] = -sum8(b[:V1Length])
	if len(b) >= V2Length {
		b[32] = 0
		b[32] = -sum8(b[:binary.LittleEndian.Uint32(b[lengthOff:])])
	}
}

func TestParseRejects(t *testing.T) {
	for name, c := range map[string]func(t *testing.T) []byte{
		"short":     func(t *testing.T) []byte { return unhex(t, ovmfV1)[:19] },
		"signature": func(t *testing.T) []byte { b := unhex(t, ovmfV1); b[0] = 'X'; return b },
		"checksum":  func(t *testing.T) []byte { b := unhex(t, ovmfV1); b[16]++; return b },
		"extended checksum": func(t *testing.T) []byte {
			b := unhex(t, ovmfV2)
			b[28]++ // in the XSDT address: only the extended checksum covers it
			return b
		},
		"revision 2 in 20 bytes": func(t *testing.T) []byte { return unhex(t, ovmfV2)[:V1Length] },
		"length 20": func(t *testing.T) []byte {
			b := unhex(t, ovmfV2)
			binary.LittleEndian.PutUint32(b[lengthOff:], V1Length)
			fixSums(b[:V1Length])
			return b
		},
		"length past the data": func(t *testing.T) []byte {
			b := unhex(t, ovmfV2)
			binary.LittleEndian.PutUint32(b[lengthOff:], 40)
			b[8] = 0
			b[8] = -sum8(b[:V1Length])
			return b
		},
		"length huge": func(t *testing.T) []byte {
			b := unhex(t, ovmfV2)
			binary.LittleEndian.PutUint32(b[lengthOff:], 0xffffffff)
			b[8] = 0
			b[8] = -sum8(b[:V1Length])
			return b
		},
	} {
		_, err := Parse(c(t))
		assert.ErrorIs(t, err, ErrBadRSDP, name)
	}
}

// mem is physical memory: a map of pages.
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

func TestRead(t *testing.T) {
	page := make([]byte, 0x1000)
	copy(page, unhex(t, ovmfV1))
	copy(page[0x14:], unhex(t, ovmfV2))
	m := mem{0x3f77e000: page}
	r, err := Read(m, 0x3f77e014)
	require.NoError(t, err)
	assert.Equal(t, uint8(2), r.Revision)
	r, err = Read(m, 0x3f77e000)
	require.NoError(t, err)
	assert.Equal(t, uint8(0), r.Revision)

	// A revision 0 RSDP is read in its 20 bytes, up to the end of memory.
	end := mem{0x1000: unhex(t, ovmfV1)}
	_, err = Read(end, 0x1000)
	assert.NoError(t, err)

	// A longer revision 2 RSDP is read and checked over its whole length.
	long := make([]byte, 48)
	copy(long, unhex(t, ovmfV2))
	binary.LittleEndian.PutUint32(long[lengthOff:], 48)
	long[40] = 0x55
	fixSums(long)
	r, err = Read(mem{0x2000: long}, 0x2000)
	require.NoError(t, err)
	assert.Equal(t, uint32(48), r.Length)
	long[40]++
	_, err = Read(mem{0x2000: long}, 0x2000)
	assert.ErrorIs(t, err, ErrBadRSDP)

	_, err = Read(m, 0)
	assert.ErrorIs(t, err, ErrBadRSDP, "address 0")
	_, err = Read(m, ^uint64(0)-10)
	assert.ErrorIs(t, err, ErrBadRSDP, "wraps")
	_, err = Read(m, 0x5000)
	assert.Error(t, err, "no memory")
	_, err = Read(mem{0x3f77e014: unhex(t, ovmfV2)[:V1Length]}, 0x3f77e014)
	assert.Error(t, err, "revision 2 cut at the end of memory")
}

func TestMatchCopy(t *testing.T) {
	v2, err := Parse(unhex(t, ovmfV2))
	require.NoError(t, err)
	v1, err := Parse(unhex(t, ovmfV1))
	require.NoError(t, err)
	assert.NoError(t, MatchCopy(v2, unhex(t, ovmfV2)))
	assert.NoError(t, MatchCopy(v1, unhex(t, ovmfV1)))
	assert.ErrorIs(t, MatchCopy(v2, unhex(t, ovmfV1)), ErrCopyDiffers, "OVMF's two RSDPs differ")

	other := unhex(t, ovmfV2)
	binary.LittleEndian.PutUint64(other[xsdtOff:], 0x3f000000)
	fixSums(other)
	assert.ErrorIs(t, MatchCopy(v2, other), ErrCopyDiffers, "another XSDT")
	bad := unhex(t, ovmfV2)
	bad[0] = 'r'
	assert.ErrorIs(t, MatchCopy(v2, bad), ErrBadRSDP)
}
