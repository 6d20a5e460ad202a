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
// is given a write at the data ports and the CONFIG_ADDRESS it goes to.
type Guard struct {
	Registers []Register
}

// Refuses reports whether a write of size bytes at port, with
// CONFIG_ADDRESS holding addr, reaches a guarded register; what names it.
// Writes to CONFIG_ADDRESS itself, and to 0xcf9, pass.
func (g *Guard) Refuses(port uint16, size int, addr uint32) (bool, string) {
	if port+uint16(size) <= DataPort || port > LastPort || addr&enable == 0 {
		return false, ""
	}
	for _, r := range g.Registers {
		if addr&^3 == r.address() {
			return true, r.String()
		}
	}
	return false, ""
}
