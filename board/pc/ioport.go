//go:build tamago

package pc

// Implemented in ioport_amd64.s.
func inw(port uint16) uint16
func inl(port uint16) uint32
func outw(port uint16, v uint16)
func outl(port uint16, v uint32)

// PortIO does one port access of size 1, 2 or 4 bytes: in reads and
// returns the value, else val's low bytes are written. It is the
// monitor's real port I/O for the guest (hv.VCPU.PortIO).
func PortIO(port uint16, size int, in bool, val uint32) uint32 {
	switch {
	case in && size == 1:
		return uint32(inb(port))
	case in && size == 2:
		return uint32(inw(port))
	case in:
		return inl(port)
	case size == 1:
		outb(port, uint8(val))
	case size == 2:
		outw(port, uint16(val))
	default:
		outl(port, val)
	}
	return 0
}
