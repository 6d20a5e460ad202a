//go:build tamago

package pc

import "unsafe"

// Implemented in cpu_amd64.s.
func jumpTo(pc uint64)

// BootLinux32 leaves long mode and starts a kernel at e with the 32-bit
// boot protocol, on this processor, without VMX (the caller has left VMX
// operation): what a boot loader would have done. It returns only an
// error found before it leaves; then nothing has changed. The code that
// leaves runs from tamahv's region, mapped one to one below 2 GiB; the
// kernel's GDT, boot parameters and image must already be in place.
func BootLinux32(e Entry32) error {
	buf := make([]byte, len(longModeExit)+16)
	base := (PhysAddr(unsafe.Pointer(&buf[0])) + 15) &^ 15
	code, err := LongModeExit(base, e)
	if err != nil {
		return err
	}
	copy(buf[base-PhysAddr(unsafe.Pointer(&buf[0])):], code)
	jumpTo(base)
	return nil // not reached
}
