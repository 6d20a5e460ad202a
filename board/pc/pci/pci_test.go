package pci

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// piix4 is configuration space as Bochs's PIIX4 has it: the host bridge at
// 00:00.0, the PIIX4 at 00:01.0-3 (function 3, power management, with its
// PMBA at 0x40 = 0xb001), and a VGA card at 00:02.0.
type piix4 struct {
	addr uint32
	regs map[uint32]uint32
}

func newPIIX4() *piix4 {
	f := &piix4{regs: map[uint32]uint32{}}
	set := func(dev, fn, off uint8, v uint32) { f.regs[Register{0, dev, fn, off}.address()] = v }
	set(0, 0, 0, 0x12378086)
	set(1, 0, 0, 0x70008086)
	set(1, 0, 0xc, 0x00800000) // multi-function
	set(1, 1, 0, 0x70108086)
	set(1, 3, 0, 0x71138086)
	set(1, 3, 0x40, 0xb001)
	set(1, 3, 0x90, 0xb101) // SMBus base: not the PM base
	set(2, 0, 0, 0x11111234)
	return f
}

func (f *piix4) io(port uint16, size int, in bool, val uint32) uint32 {
	switch {
	case port == AddressPort && size == 4 && !in:
		f.addr = val
	case port == DataPort && size == 4 && in:
		if v, ok := f.regs[f.addr]; ok {
			return v
		}
		if f.addr&0xfc == 0 {
			return 0xffffffff // no function
		}
		return 0
	}
	return 0
}

func TestFindIOBase(t *testing.T) {
	f := newPIIX4()
	assert.Equal(t, []Register{{0, 1, 3, 0x40}}, FindIOBase(f.io, 0xb000))
	assert.Empty(t, FindIOBase(f.io, 0xc000))
	assert.Empty(t, FindIOBase(f.io, 0), "no base, nothing to find")
	assert.Equal(t, "PCI 00:01.3 register 0x40", Register{0, 1, 3, 0x40}.String())
}

func TestGuardRefuses(t *testing.T) {
	g := &Guard{Registers: []Register{{0, 1, 3, 0x40}}}
	const pmba = 0x80000b40
	for _, c := range []struct {
		port uint16
		size int
		val  uint32
		addr uint32
		want bool
		name string
	}{
		{0xcfc, 4, 0xc001, pmba, true, "the dword"},
		{0xcfd, 1, 0xc0, pmba, true, "a byte of it"},
		{0xcfe, 2, 0, pmba, true, "its high half"},
		{0xcfc, 4, 0, pmba | 2, true, "the address's low bits are ignored"},
		{0xcfc, 4, 0, 0x80000b44, false, "the next register"},
		{0xcfc, 4, 0, 0x80000b3c, false, "the register before"},
		{0xcfd, 4, 0, 0x80000b3c, true, "from 0x3d: bytes 0x3d-0x40"},
		{0xcfc, 4, 0, 0x80000b3f, true, "an offset of 0x3f spills into 0x40 where the chipset adds the low bits"},
		{0xcfc, 4, 0, 0x81000b40, true, "bits 24-30 the chipset may ignore"},
		{0xcfc, 4, 0, 0x80010b40, false, "another bus"},
		{0xcfc, 4, 0, 0x00000b40, false, "CONFIG_ADDRESS not enabled"},
		{0xcf8, 4, pmba, pmba, false, "CONFIG_ADDRESS itself"},
		{0xcf9, 1, 0x06, pmba, false, "the reset control register"},
		{0xcfa, 4, 0, pmba, true, "a dword from 0xcfa reaches the data port"},
		{0xcf8, 1, 0xf0, pmba, true, "mechanism #2's enable register"},
		{0xcf8, 1, 0, pmba, false, "mechanism #2 off"},
		{0xcfa, 1, 0x01, pmba, true, "mechanism #2's forward register"},
		{0xcf8, 2, 0x0600, pmba, false, "0xcf8 zero, 0xcf9 a reset"},
	} {
		got, _ := g.Refuses(c.port, c.size, c.val, c.addr)
		assert.Equal(t, c.want, got, c.name)
	}
	_, what := g.Refuses(0xcfc, 4, 0xc001, pmba)
	assert.Equal(t, "PCI 00:01.3 register 0x40", what)
}
