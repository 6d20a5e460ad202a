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
	// HypercallUnknown is the result of an unknown function (-1).
	HypercallUnknown = ^uint64(0)
	// HypercallInvalid is the result of bad arguments (-22, EINVAL).
	HypercallInvalid = ^uint64(21)

	// SecretByte fills the HcSecret page.
	SecretByte = 0x5a
)
