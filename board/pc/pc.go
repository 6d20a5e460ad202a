//go:build tamago

package pc

import (
	"encoding/binary"
	"fmt"
	"runtime/goos"
	"unsafe"
	_ "unsafe" // go:linkname

	"github.com/usbarmory/tamago/amd64"
	"github.com/usbarmory/tamago/soc/intel/uart"

	"github.com/tamahv/tamahv/board/pc/bootinfo"
	"github.com/tamahv/tamahv/board/pc/multiboot"
	"github.com/tamahv/tamahv/board/pc/multiboot2"
)

// The board's devices.
var (
	// AMD64 is the bootstrap processor.
	AMD64 = &amd64.CPU{TimerMultiplier: 1}
	// UART0 is tamahv's console: COM1 unless console= picks another
	// port (SetConsole).
	UART0 = &uart.UART{Index: 1, Base: COM1}
)

// Set by cpuinit from EAX and EBX at entry.
var bootMagic, bootInfo uint32

// TSC frequency and where it came from, set by hwinit1.
var (
	tscHz     uint64
	tscSource string
)

//go:linkname ramSize runtime/goos.RamSize
var ramSize uint64 = RAMSize

//go:linkname nanotime runtime/goos.Nanotime
func nanotime() int64 { return AMD64.GetTime() }

//go:linkname printk runtime/goos.Printk
func printk(c byte) { UART0.Tx(c) }

// Implemented in cpu_amd64.s.
func inb(port uint16) uint8
func outb(port uint16, v uint8)
func readMSR(msr uint32) uint64
func writeMSR(msr uint32, v uint64)
func readCR0() uint64
func writeCR0(v uint64)
func readCR4() uint64
func writeCR4(v uint64)
func cpuid(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)
func rdtsc() uint64
func haltForever()

//go:linkname hwinit1 runtime/goos.Hwinit1
func hwinit1() {
	AMD64.Init()
	calibrateTSC()
	UART0.Init()
	goos.Exit = func(int32) { haltForever() }
}

func init() {
	AMD64.EnableExceptions()
}

// calibrateTSC sets the runtime clock from the TSC frequency: CPUID leaf
// 0x15 where it answers, else a measurement against PIT channel 2 (no KVM
// clock is needed).
func calibrateTSC() {
	if max, _, _, _ := cpuid(0, 0); max >= 0x15 {
		a, b, c, _ := cpuid(0x15, 0)
		if hz := CPUIDTSCHz(a, b, c); hz != 0 {
			tscHz, tscSource = hz, "CPUID.15H"
		}
	}
	if tscHz == 0 {
		if hz, err := measureTSC(); err == nil {
			tscHz, tscSource = hz, "PIT"
		}
	}
	if tscHz == 0 {
		tscHz, tscSource = 1_000_000_000, "assumed"
	}
	AMD64.TimerMultiplier = 1e9 / float64(tscHz)
	AMD64.TimerOffset = 0
}

// measureTSC counts TSC ticks while PIT channel 2 counts down once in mode
// 0 (interrupt on terminal count), read through port 0x61 bit 5.
func measureTSC() (uint64, error) {
	const port61, pitCmd, pitCh2 = 0x61, 0x43, 0x42
	outb(port61, inb(port61)&^0x02|0x01) // speaker off, gate 2 on
	outb(pitCmd, 0xb0)                   // channel 2, lo/hi byte, mode 0, binary
	outb(pitCh2, pitCalibCount&0xff)
	t0 := rdtsc()
	outb(pitCh2, pitCalibCount>>8) // counting starts
	for i := 0; inb(port61)&0x20 == 0; i++ {
		if i > 1<<26 {
			return 0, ErrCalibration
		}
	}
	return TSCHz(rdtsc()-t0, pitCalibCount)
}

// TSC reads the executing processor's time-stamp counter.
func TSC() uint64 { return rdtsc() }

// TSCHzSource returns the TSC frequency in use and how it was found
// ("CPUID.15H", "PIT" or "assumed").
func TSCHzSource() (uint64, string) { return tscHz, tscSource }

// SetConsole moves tamahv's console to the UART at base and sets it up.
// Call it before any goroutine but the caller prints.
func SetConsole(base uint16) {
	UART0.Base = base
	UART0.Init()
}

// Halt stops the processor for good.
func Halt() { haltForever() }

// Hardware gives vmx the processor's CPUID, MSRs and control registers. It
// implements vmx.Machine.
type Hardware struct{}

// CPUID executes CPUID.
func (Hardware) CPUID(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32) { return cpuid(leaf, subleaf) }

// ReadMSR executes RDMSR.
func (Hardware) ReadMSR(msr uint32) uint64 { return readMSR(msr) }

// WriteMSR executes WRMSR.
func (Hardware) WriteMSR(msr uint32, v uint64) { writeMSR(msr, v) }

// CR0 reads CR0.
func (Hardware) CR0() uint64 { return readCR0() }

// SetCR0 writes CR0.
func (Hardware) SetCR0(v uint64) { writeCR0(v) }

// CR4 reads CR4.
func (Hardware) CR4() uint64 { return readCR4() }

// CR3 reads CR3.
func (Hardware) CR3() uint64 { return readCR3() }

// SetCR4 writes CR4.
func (Hardware) SetCR4(v uint64) { writeCR4(v) }

// PhysMem reads physical memory through the board's one-to-one map: the
// first 4 GiB from start-up, and all RAM once MapRAM ran.
type PhysMem struct{}

// physTop is the end of the one-to-one map. Like the page tables it
// describes, it belongs to the machine, not to any one object.
var physTop uint64 = 1 << 32

// mapped checks that n bytes at pa lie in the one-to-one map.
func mapped(pa, n uint64) error {
	if pa+n > physTop || pa+n < pa {
		return fmt.Errorf("pc: %#x+%#x is not mapped", pa, n)
	}
	return nil
}

// MapRAM extends the board's one-to-one map, which start-up builds for the
// first 4 GiB, up to top (the end of RAM in the memory map), with 1 GiB
// pages where the processor has them, else 2 MiB pages. The tables it
// needs come from the reserved area's Scratch pages. On an error the map
// ends where it could go.
func MapRAM(top uint64) error {
	if top <= physTop {
		return nil
	}
	pages1G := false
	if max, _, _, _ := cpuid(0x80000000, 0); max >= 0x80000001 {
		_, _, _, edx := cpuid(0x80000001, 0)
		pages1G = edx&cpuidPage1GB != 0
	}
	next := uint64(Scratch)
	t := pageTables{
		read: func(pa uint64) uint64 {
			var b [8]byte
			_ = PhysMem{}.ReadPhys(pa, b[:])
			return binary.LittleEndian.Uint64(b[:])
		},
		write: func(pa, v uint64) {
			var b [8]byte
			binary.LittleEndian.PutUint64(b[:], v)
			_ = PhysMem{}.WritePhys(pa, b[:])
		},
		alloc: func() (uint64, error) {
			if next+4096 > ScratchEnd {
				return 0, fmt.Errorf("pc: the reserved area has no page left for page tables")
			}
			pa := next
			next += 4096
			var zero [4096]byte
			return pa, PhysMem{}.WritePhys(pa, zero[:])
		},
	}
	end, err := identityMap(t, EarlyPML4, physTop, top, pages1G)
	writeCR3(readCR3()) // the new entries were not present: a flush for good measure
	if end > physTop {
		physTop = end
	}
	return err
}

// PhysTop returns the end of the board's one-to-one map.
func PhysTop() uint64 { return physTop }

// ReadPhys copies len(p) bytes at pa into p.
func (PhysMem) ReadPhys(pa uint64, p []byte) error {
	if err := mapped(pa, uint64(len(p))); err != nil || len(p) == 0 {
		return err
	}
	movePhys(PhysAddr(unsafe.Pointer(&p[0])), pa, uint64(len(p)))
	return nil
}

// BootInfo parses the boot information the boot loader passed, Multiboot
// 1 or Multiboot2 by the magic it left in EAX.
func BootInfo() (*bootinfo.Info, error) {
	if bootMagic == multiboot2.BootMagic {
		mb, err := multiboot2.Parse(PhysMem{}, bootMagic, uint64(bootInfo))
		if err != nil {
			return nil, err
		}
		return bootinfo.FromMultiboot2(mb)
	}
	mb, err := multiboot.Parse(PhysMem{}, bootMagic, uint64(bootInfo))
	if err != nil {
		return nil, err
	}
	return bootinfo.FromMultiboot(mb), nil
}
