// Package pci reads PCI configuration space through configuration
// mechanism #1 (CONFIG_ADDRESS at port 0xcf8, CONFIG_DATA at 0xcfc-0xcff)
// and guards registers there against the guest's writes: the chipset's
// power-management base, which a guest could otherwise move away from
// the ports tamahv guards (ACPI sleep).
package pci

import "fmt"

// The configuration mechanism's ports (PCI Local Bus Specification 3.0,
// 3.2.2.3.2).
const (
	AddressPort = 0xcf8
	DataPort    = 0xcfc
	// LastPort is the last port of the mechanism's range (0xcf9, the
	// reset control register, lies inside it and is no part of it).
	LastPort = 0xcff
	enable   = 1 << 31
)

// PortIO does one access of size 1, 2 or 4 bytes at a port (in: read and
// return; else write val's low bytes).
type PortIO func(port uint16, size int, in bool, val uint32) uint32

// Register is a dword of one function's configuration space.
type Register struct {
	Bus, Device, Function, Offset uint8
}

func (r Register) String() string {
	return fmt.Sprintf("PCI %02x:%02x.%d register %#x", r.Bus, r.Device, r.Function, r.Offset)
}

// address is CONFIG_ADDRESS for the register.
func (r Register) address() uint32 {
	return enable | uint32(r.Bus)<<16 | uint32(r.Device)<<11 | uint32(r.Function)<<8 | uint32(r.Offset)&0xfc
}

// Read reads a configuration dword.
func Read(io PortIO, r Register) uint32 {
	io(AddressPort, 4, false, r.address())
	return io(DataPort, 4, true, 0)
}

// FindIOBase finds, on bus 0 (where the chipset's functions are), the
// device-specific registers (0x40-0xfc) that hold an I/O base equal to
// base: a dword whose high half is zero and whose low half, less its I/O
// space bit, is base (PIIX4's PMBA, ICH's PMBASE).
func FindIOBase(io PortIO, base uint16) []Register {
	var out []Register
	for dev := uint8(0); dev < 32; dev++ {
		for fn := uint8(0); fn < 8; fn++ {
			id := Read(io, Register{0, dev, fn, 0})
			if id&0xffff == 0xffff {
				if fn == 0 {
					break // no device
				}
				continue
			}
			for off := 0x40; off <= 0xfc; off += 4 {
				r := Register{0, dev, fn, uint8(off)}
				if v := Read(io, r); v>>16 == 0 && uint16(v)&^1 == base && base != 0 {
					out = append(out, r)
				}
			}
			if fn == 0 && Read(io, Register{0, dev, 0, 0xc})>>16&0x80 == 0 {
				break // not a multi-function device
			}
		}
	}
	return out
}

// Guard refuses the guest's writes to configuration registers: Refuses
// is given a write at the mechanism's ports and the CONFIG_ADDRESS it goes
// to.
type Guard struct {
	Registers []Register
}

// Refuses reports whether a write of size bytes of val at port, with
// CONFIG_ADDRESS holding addr, is dropped; what names why. A write of
// CONFIG_DATA is refused where it reaches a byte of a guarded register:
// the function is matched by bus, device and function alone (a chipset
// may ignore CONFIG_ADDRESS's bits 24-30), and the bytes written run from
// the address's dword plus the data port's low bits to where a chipset
// that also adds CONFIG_ADDRESS's low bits would write. A non-zero byte
// written to 0xcf8 or 0xcfa, which configuration mechanism #2 would take
// for its enable and forward registers, is refused too. A dword written
// to CONFIG_ADDRESS, and writes to 0xcf9 (reset control), pass.
func (g *Guard) Refuses(port uint16, size int, val, addr uint32) (bool, string) {
	if port > LastPort || uint32(port)+uint32(size) <= AddressPort {
		return false, ""
	}
	if !(port == AddressPort && size == 4) && port < DataPort {
		for i := 0; i < size; i++ {
			p := uint32(port) + uint32(i)
			if (p == AddressPort || p == AddressPort+2) && uint8(val>>(8*i)) != 0 {
				return true, fmt.Sprintf("a configuration mechanism #2 write at %#x", p)
			}
		}
	}
	if addr&enable == 0 || uint32(port)+uint32(size) <= DataPort {
		return false, ""
	}
	// The data bytes the write reaches, as offsets into the function:
	// from the dword's offset, to where a chipset that adds (or ORs)
	// CONFIG_ADDRESS's low bits too would write.
	first := max(uint32(port), DataPort) - DataPort
	last := uint32(port) + uint32(size) - 1 - DataPort
	start, end := addr&0xfc+first, addr&0xff+last+1
	for _, r := range g.Registers {
		if addr&0x00ffff00 != r.address()&0x00ffff00 {
			continue
		}
		if start < uint32(r.Offset)+4 && end > uint32(r.Offset) {
			return true, r.String()
		}
	}
	return false, ""
}
