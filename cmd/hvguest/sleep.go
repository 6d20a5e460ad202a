package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/tamahv/tamahv/board/pc/acpi"
)

// sleepS3 enters S3 the way a hostile kernel could, without asking ACPI:
// through /dev/port it writes SLP_EN, with the SLP_TYP of the firmware's
// \_S3 (under tamahv renamed XS3_), to the PM1a control register the FADT
// names. The firmware would resume the guest from S3 through its waking
// vector, outside tamahv: tamahv drops the write, and the guest runs on.
// Where the tables name no S3, it writes a type that neither \_S4 nor
// \_S5 gives.
func sleepS3() error {
	fadt, err := os.ReadFile("/sys/firmware/acpi/tables/FACP")
	if err != nil {
		return err
	}
	if len(fadt) < 68 {
		return fmt.Errorf("a FADT of %d bytes", len(fadt))
	}
	port := int64(binary.LittleEndian.Uint32(fadt[64:]))
	if len(fadt) >= 184 && fadt[172] == 1 {
		if x := int64(binary.LittleEndian.Uint64(fadt[176:])); x != 0 {
			port = x
		}
	}
	if port == 0 || port > 0xfffe {
		return fmt.Errorf("no PM1a control port in the FADT (%#x)", port)
	}
	dsdt, err := os.ReadFile("/sys/firmware/acpi/tables/DSDT")
	if err != nil {
		return err
	}
	name, typ := "", uint8(0)
	for _, seg := range []string{"XS3_", "_S3_"} {
		if a, _, ok := acpi.SleepPackage(dsdt, seg); ok {
			name, typ = seg, a
			break
		}
	}
	if name == "" {
		name = "a type no state names"
		used := map[uint8]bool{}
		for _, seg := range []string{"_S4_", "_S5_"} {
			if a, _, ok := acpi.SleepPackage(dsdt, seg); ok {
				used[a] = true
			}
		}
		for typ = 1; used[typ]; typ++ {
		}
	}
	f, err := os.OpenFile("/dev/port", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// SLP_TYP and SLP_EN are in the register's second byte.
	var b [1]byte
	if _, err := f.ReadAt(b[:], port+1); err != nil {
		return err
	}
	b[0] = b[0]&^(7<<2|1<<5) | typ<<2 | 1<<5
	if _, err := f.WriteAt(b[:], port+1); err != nil {
		return err
	}
	time.Sleep(100 * time.Millisecond)
	fmt.Printf("hvguest: sleep: SLP_EN with SLP_TYP %d (%s) written to port %#x: still running\n", typ, name, port+1)
	return nil
}

// outl and inl are port I/O (ports_amd64.s); they need iopl(3).
func outl(port uint16, v uint32)
func inl(port uint16) uint32

// sleepPMBase moves the chipset's power-management base the way a hostile
// kernel could, through PCI configuration mechanism #1: it finds, on bus
// 0, the register that holds the FADT's PM1a event block (PIIX4's PMBA,
// ICH's PMBASE) and writes a base 0x1000 higher. Under tamahv the write
// is dropped: the sleep registers stay at the ports tamahv guards.
func sleepPMBase() error {
	fadt, err := os.ReadFile("/sys/firmware/acpi/tables/FACP")
	if err != nil {
		return err
	}
	if len(fadt) < 60 {
		return fmt.Errorf("a FADT of %d bytes", len(fadt))
	}
	base := binary.LittleEndian.Uint32(fadt[56:])
	if base == 0 || base > 0xefff {
		return fmt.Errorf("no PM1a event block in the FADT (%#x)", base)
	}
	if err := syscall.Iopl(3); err != nil {
		return err
	}
	addr := func(dev, fn, off uint32) uint32 { return 1<<31 | dev<<11 | fn<<8 | off }
	for dev := uint32(0); dev < 32; dev++ {
		for fn := uint32(0); fn < 8; fn++ {
			outl(0xcf8, addr(dev, fn, 0))
			if inl(0xcfc)&0xffff == 0xffff {
				continue
			}
			for off := uint32(0x40); off <= 0xfc; off += 4 {
				outl(0xcf8, addr(dev, fn, off))
				v := inl(0xcfc)
				if v>>16 != 0 || v&^1 != base {
					continue
				}
				outl(0xcf8, addr(dev, fn, off))
				outl(0xcfc, v+0x1000)
				outl(0xcf8, addr(dev, fn, off))
				after := inl(0xcfc)
				where := fmt.Sprintf("PCI 00:%02x.%d register %#x", dev, fn, off)
				if after != v {
					outl(0xcf8, addr(dev, fn, off))
					outl(0xcfc, v) // put it back
					return fmt.Errorf("the PM base in %s moved from %#x to %#x", where, v, after)
				}
				fmt.Printf("hvguest: sleep: moving the PM base in %s to %#x had no effect: still %#x\n", where, v+0x1000, after)
				return nil
			}
		}
	}
	return fmt.Errorf("no PCI register on bus 0 holds the PM base %#x", base)
}
