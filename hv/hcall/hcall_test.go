package hcall_test

import (
	"crypto/sha256"
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/hcall"
)

func TestSwapRequestRoundTrip(t *testing.T) {
	want := hcall.SwapRequest{VA: 0x7f12_3456_7000, Len: 65536, Options: 1 | hcall.SwapVeto, SHA256: sha256.Sum256([]byte("x"))}
	b := want.Encode()
	// The layout the guest writes by hand in C: VA, Len, Options, digest.
	assert.Equal(t, []byte{0x00, 0x70, 0x56, 0x34, 0x12, 0x7f, 0, 0}, b[0:8])
	assert.Equal(t, []byte{0, 0, 1, 0, 0, 0, 0, 0}, b[8:16])
	assert.Equal(t, []byte{1, 0, 0, 0, 1, 0, 0, 0}, b[16:24])
	assert.Equal(t, want.SHA256[:], b[24:])
	got, err := hcall.DecodeSwapRequest(b[:])
	require.NoError(t, err)
	assert.Equal(t, want, got)
}

func TestDecodeSwapRequestRefuses(t *testing.T) {
	b := hcall.SwapRequest{Options: 1 << 33}.Encode()
	_, err := hcall.DecodeSwapRequest(b[:])
	assert.ErrorIs(t, err, hcall.ErrRequest)
	_, err = hcall.DecodeSwapRequest(b[:55])
	assert.ErrorIs(t, err, hcall.ErrRequest)
	_, err = hcall.DecodeSwapRequest(make([]byte, 57))
	assert.ErrorIs(t, err, hcall.ErrRequest)
}

func TestResults(t *testing.T) {
	for _, r := range []uint64{hcall.Unknown, hcall.Denied, hcall.Busy, hcall.Invalid} {
		assert.True(t, hcall.Error(r), "%#x", r)
	}
	errno := func(r uint64) int64 { return int64(r) }
	assert.EqualValues(t, -1, errno(hcall.Unknown))
	assert.EqualValues(t, -13, errno(hcall.Denied))
	assert.EqualValues(t, -16, errno(hcall.Busy))
	assert.EqualValues(t, -22, errno(hcall.Invalid))
	for _, r := range []uint64{0, hcall.Magic, hcall.StatusFailed, 0x1000_0000} {
		assert.False(t, hcall.Error(r), "%#x", r)
	}
	var magic [8]byte
	binary.BigEndian.PutUint64(magic[:], hcall.Magic)
	assert.Equal(t, "tamahv", string(magic[:6]))
	assert.EqualValues(t, hcall.Version, binary.BigEndian.Uint16(magic[6:]))
}

// FuzzDecodeSwapRequest: decoding never panics, and what decodes encodes
// back to the same bytes.
func FuzzDecodeSwapRequest(f *testing.F) {
	b := hcall.SwapRequest{VA: 1, Len: 2, Options: 3}.Encode()
	f.Add(b[:])
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := hcall.DecodeSwapRequest(in)
		if err != nil {
			return
		}
		out := r.Encode()
		assert.Equal(t, in, out[:])
	})
}
