// Package hcall is tamahv's hypercall ABI, shared by the monitor and the
// programs that run in its guest: the function numbers, the results, and
// the swap-read request, encoded and decoded in one place.
//
// A hypercall is VMCALL with the function in RAX and up to three arguments
// in RDI, RSI and RDX; the result comes back in RAX. A result above
// MaxOK is an error (a negated errno). This is version 1 of the interface.
package hcall

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Version is the interface version HcIdentify reports.
const Version = 1

// Magic is what Identify returns: "tamahv" and the interface version in
// the low 16 bits.
const Magic = 0x7461_6d61_6876_0000 | Version

// Function numbers (RAX).
const (
	// Identify returns Magic.
	Identify = 0
	// Exit ends the guest; RDI is its exit status (0-255).
	Exit = 1
	// Secret returns the physical address of 4 KiB of tamahv's memory
	// filled with SecretByte, for tests that check the guest cannot read
	// it.
	Secret = 2
	// SwapRead asks tamahv to read a range of the caller's memory through
	// swapmem: RDI is the virtual address of an encoded SwapRequest
	// (SwapRequestSize bytes, present, within one page), RSI its size. The
	// read runs while the guest goes on; SwapStatus tells how it ended.
	SwapRead = 3
	// SwapStatus returns StatusPending, StatusOK, StatusFailed or
	// StatusPartial for the last SwapRead of the caller's address space,
	// or Invalid when it has none: it asked for none, or tamahv let its
	// record go for another's, or the address space that asked was torn
	// down (its top-level table may be the caller's now).
	SwapStatus = 4
)

// SwapStatus results.
const (
	StatusPending = 1
	StatusOK      = 2
	StatusFailed  = 3
	// StatusPartial: pages of the range are not mapped (a fault there
	// would be SIGSEGV, so none is injected): they were left out, and the
	// bytes of the mapped parts, joined in address order, were read and
	// matched the request's SHA-256. A mismatch is StatusFailed.
	StatusPartial = 4
)

// Error results.
const (
	// Unknown is the result of an unknown function (-1).
	Unknown = ^uint64(0)
	// Denied is the result of a function or argument the caller's
	// privilege level may not use (-13, EACCES).
	Denied = ^uint64(12)
	// Busy is the result of SwapRead while tamahv holds as many reads, or
	// as many bytes of reads, as it may and none of them has been pending
	// long enough to give way (-16, EBUSY): ask again later.
	Busy = ^uint64(15)
	// Invalid is the result of bad arguments (-22, EINVAL).
	Invalid = ^uint64(21)
)

// MaxOK is the largest result that is not an error: results from
// ^uint64(4095) up are negated errnos, as in Linux.
const MaxOK = ^uint64(4095) - 1

// SecretByte fills the Secret page.
const SecretByte = 0x5a

// SwapVeto, in a swap request's options beside the swapmem ones (the low
// 32 bits), makes tamahv's PreInject veto every injection for the read.
const SwapVeto = 1 << 32

// SwapRequestSize is the size of an encoded SwapRequest.
const SwapRequestSize = 56

// SwapRequest is the argument of SwapRead.
type SwapRequest struct {
	VA  uint64 // first byte to read
	Len uint64 // bytes to read
	// Options are swapmem.Options in the low 32 bits, SwapVeto above.
	Options uint64
	// SHA256 is the digest of the bytes the caller expects; the read
	// succeeds only if the bytes read have it.
	SHA256 [32]byte
}

// ErrRequest is DecodeSwapRequest's error for a malformed request.
var ErrRequest = errors.New("hcall: malformed swap request")

// Encode returns the request as the guest passes it: VA, Len and Options
// as little-endian 64-bit words, then the digest.
func (r SwapRequest) Encode() [SwapRequestSize]byte {
	var b [SwapRequestSize]byte
	binary.LittleEndian.PutUint64(b[0:], r.VA)
	binary.LittleEndian.PutUint64(b[8:], r.Len)
	binary.LittleEndian.PutUint64(b[16:], r.Options)
	copy(b[24:], r.SHA256[:])
	return b
}

// DecodeSwapRequest decodes an encoded request. It refuses a buffer of
// another size and option bits above the swapmem ones other than
// SwapVeto; checking the swapmem options themselves is the caller's job.
func DecodeSwapRequest(b []byte) (SwapRequest, error) {
	if len(b) != SwapRequestSize {
		return SwapRequest{}, fmt.Errorf("%w: %d bytes, want %d", ErrRequest, len(b), SwapRequestSize)
	}
	r := SwapRequest{
		VA:      binary.LittleEndian.Uint64(b[0:]),
		Len:     binary.LittleEndian.Uint64(b[8:]),
		Options: binary.LittleEndian.Uint64(b[16:]),
	}
	copy(r.SHA256[:], b[24:])
	if r.Options>>32&^(SwapVeto>>32) != 0 {
		return SwapRequest{}, fmt.Errorf("%w: unknown option bits %#x", ErrRequest, r.Options&^(1<<32-1)&^SwapVeto)
	}
	return r, nil
}

// Error tells whether a hypercall result is an error.
func Error(ret uint64) bool { return ret > MaxOK }
