package hv

// The hypercall interface: VMCALL with the function number in RAX and up
// to three arguments in RDI, RSI and RDX; the result comes back in RAX. A
// negative result is an error. Version 1.
const (
	// HypercallMagic is what HcIdentify returns: "tamahv" and the
	// interface version in the low 16 bits.
	HypercallMagic   = 0x7461_6d61_6876_0000 | HypercallVersion
	HypercallVersion = 1

	// HcIdentify returns HypercallMagic.
	HcIdentify = 0
	// HcExit ends the guest; RDI is its exit status (0-255).
	HcExit = 1
	// HcSecret returns the physical address of 4 KiB of tamahv's memory
	// filled with SecretByte, for tests that check the guest cannot read
	// it.
	HcSecret = 2
	// SwapVeto, in a swap request's options beside the swapmem ones,
	// makes tamahv's PreInject veto every injection for it.
	SwapVeto = 1 << 32

	// HcSwapRead asks tamahv to read a range of the caller's memory
	// through swapmem: RDI is the virtual address of a SwapRequest
	// (SwapRequestSize bytes, present), RSI its size. The read runs while
	// the guest goes on; HcSwapStatus tells how it ended.
	HcSwapRead = 3
	// HcSwapStatus returns SwapPending, SwapOK or SwapFailed for the last
	// HcSwapRead.
	HcSwapStatus = 4

	// SwapRequestSize is the size of a swap request: virtual address,
	// length and swapmem options (8 bytes each), then the SHA-256 of the
	// bytes the caller expects.
	SwapRequestSize = 56

	// HcSwapStatus results.
	SwapPending = 1
	SwapOK      = 2
	SwapFailed  = 3

	// HypercallBusy is the result of HcSwapRead while a read runs (-16,
	// EBUSY).
	HypercallBusy = ^uint64(15)

	// HypercallUnknown is the result of an unknown function (-1).
	HypercallUnknown = ^uint64(0)
	// HypercallInvalid is the result of bad arguments (-22, EINVAL).
	HypercallInvalid = ^uint64(21)

	// SecretByte fills the HcSecret page.
	SecretByte = 0x5a
)
