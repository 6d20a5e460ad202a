//go:build tamago

// Command tamahv is the hypervisor image: it boots on a PC-compatible
// machine, reports the processor's VMX capabilities, enters VMX operation
// and runs the Linux kernel it finds among the Multiboot modules as its
// guest, with swapmem serving the guest's swap-read hypercalls. Its own
// command line takes hc.ring3= (the default policy's grants to ring 3),
// console= (pc.ConsolePort: the serial port of tamahv's console),
// swap.deadline=, log.alive=, smp.kickcheck=, apic.trapinit= and
// fallback= (machine.ParseOptions; fallback=native boots the guest's
// kernel natively where tamahv cannot run it), smp.park (the application
// processors stay parked in VMX root operation and hidden from the guest,
// instead of each running a vCPU) and smp.visible (a test knob: the
// processor tables are left unpatched).
//
// It prints stable lines that users and tests rely on:
//
//	tamahv: VMX on (revision 0x..., EPT yes|no, VPID yes|no, unrestricted guest yes|no)
//	tamahv: VMX unavailable: <reason>
//	tamahv: booting the kernel natively, without tamahv (fallback=native): <why>; ...
//	tamahv: no native boot: <why>
//	tamahv: processors: ... (and the lines of smp.HoldProcessors)
//	tamahv: guest not started: <why> (a processor tamahv cannot account for, its region not all RAM, ...; then it halts or, with fallback=native, boots the kernel natively)
//	tamahv: local APIC writes trapped: INIT sticks in VMX non-root (Bochs 2.7) (apic.trapinit=auto|on)
//	tamahv: local APIC passed through: INIT and SIPI arrive as VM exits (apic.trapinit=auto|off)
//	tamahv: guest started: ...
//	tamahv: swapmem read ok: ... | tamahv: swapmem read FAILED: <reason>
//	tamahv: AP APIC ID N: vCPU i waits for start-up (without smp.park)
//	tamahv: vCPU N started
//	tamahv: alive: N exits (vCPU 0: a, vCPU 1: b, ...) (with log.alive=)
//	tamahv: guest exited (status N) after N exits (vCPU 0: a, vCPU 1: b, ...)
//	tamahv: halted
package main

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"unsafe"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/board/pc/bootinfo"
	"github.com/tamahv/tamahv/board/pc/e820"
	"github.com/tamahv/tamahv/board/pc/efi"
	"github.com/tamahv/tamahv/board/pc/smp"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/vmx"
)

// Version is the image's version, set with -ldflags "-X main.Version=...".
var Version = "dev"

// vmxonRegion backs the VMXON region; it must stay reachable while in VMX
// operation (the Go heap does not move objects).
var vmxonRegion []byte

func main() {
	// The boot information is copied out first, before anything of
	// tamahv's writes low memory; its console= picks the console.
	info, infoErr := pc.BootInfo()
	var consoleErr error
	if infoErr == nil {
		var port uint16
		if port, consoleErr = pc.ConsolePort(info.Cmdline); port != pc.COM1 {
			pc.SetConsole(port)
		}
	}
	fmt.Printf("tamahv %s: thin VT-x hypervisor (%s, %s)\n", Version, runtime.Version(), pc.AMD64.Name())
	if consoleErr != nil {
		fmt.Printf("tamahv: %v; the console stays on COM1\n", consoleErr)
	}
	hz, src := pc.TSCHzSource()
	fmt.Printf("tamahv: TSC %d.%03d MHz (%s)\n", hz/1e6, hz/1e3%1e3, src)
	reportBoot(info, infoErr)
	var rsdp uint64
	var rsdpErr error
	if infoErr == nil {
		rsdp, rsdpErr = acpiRSDP(info)
		if rsdpErr != nil {
			fmt.Printf("tamahv: ACPI: %v\n", rsdpErr)
		}
	}

	// fallback=native: where tamahv cannot run the guest, the kernel
	// boots natively.
	native := infoErr == nil && machine.NativeFallback(info.Cmdline)
	unavailable := func(reason string) {
		fmt.Printf("tamahv: VMX unavailable: %s\n", reason)
		if native {
			bootNative(info, rsdp, "VMX unavailable")
		}
		fmt.Println("tamahv: halted")
		pc.Halt()
	}

	// Fail closed: tamahv runs from its region, and the guest must not
	// lose memory the firmware keeps there.
	if infoErr == nil {
		if bad := e820.NotRAM(guestMemory(info), pc.RAMStart, pc.RAMEnd); len(bad) > 0 {
			var parts []string
			for _, e := range bad[:min(len(bad), 4)] {
				parts = append(parts, fmt.Sprintf("%#x-%#x %v", e.Addr, e.End(), e.Type))
			}
			fmt.Printf("tamahv: guest not started: tamahv's region %#x-%#x is not all RAM in the memory map (%s)\n",
				uint64(pc.RAMStart), uint64(pc.RAMEnd), strings.Join(parts, ", "))
			if native {
				bootNative(info, rsdp, "tamahv's region is not all RAM")
			}
			fmt.Println("tamahv: halted")
			pc.Halt()
		}
	}

	caps, err := vmx.Discover(pc.Hardware{})
	if err != nil {
		unavailable(err.Error())
	}
	caps.Report(os.Stdout)
	pa, region := alignedRegion(caps.RegionSize())
	if err := vmx.Prepare(pc.Hardware{}, caps, region); err != nil {
		unavailable(err.Error())
	}
	if err := vmx.VMXON(pa); err != nil {
		unavailable(fmt.Sprintf("VMXON failed: %v", err))
	}
	fmt.Printf("tamahv: VMX on (%s)\n", caps.Summary())
	vmxOn := true
	// notStarted ends tamahv's part where the guest could not start:
	// with fallback=native the kernel boots natively, out of VMX.
	notStarted := func(why string, held *smp.SMP) {
		if !native {
			return
		}
		// The APs that wait for commands halt in VMX root operation,
		// where INIT cannot reach them, hidden from the kernel (one
		// parked already does not answer, and stays as it is).
		if held != nil {
			for _, ap := range held.VCPUs() {
				_ = ap.Park()
			}
		}
		if err := vmx.VMXOFF(); err != nil {
			fmt.Printf("tamahv: VMXOFF: %v; no native boot\n", err)
			return
		}
		vmxOn = false
		bootNative(info, rsdp, why)
	}
	if infoErr == nil {
		if kernel, initrds, cmdline := modules(info); kernel != nil {
			memory := guestMemory(info)
			// Free for the APs' start-up page: RAM but what the boot
			// loader put there (on UEFI GRUB may load a module as low as
			// 0x1000).
			free := memory
			for _, m := range info.Modules {
				free = e820.Reserve(free, m.Start&^0xfff, (m.End+0xfff)&^0xfff)
			}
			var avail [][2]uint64
			for _, r := range free {
				if r.Type == e820.RAM {
					avail = append(avail, [2]uint64{r.Addr, r.End()})
				}
			}
			// smp.visible leaves the firmware's processor tables as they are.
			visible := slices.Contains(strings.Fields(info.Cmdline), "smp.visible")
			var held *smp.SMP
			if err = rsdpErr; err == nil {
				held, err = smp.HoldProcessors(avail, rsdp, visible, os.Stdout)
			}
			// Every held application processor runs a vCPU; with
			// smp.park they stay parked and hidden.
			vcpus := !slices.Contains(strings.Fields(info.Cmdline), "smp.park")
			if err != nil {
				// Fail closed: a processor tamahv does not hold could
				// run the guest's code outside VMX operation.
				fmt.Printf("tamahv: guest not started: %v\n", err)
				notStarted("the guest was not started", held)
			} else if started, err := runGuest(caps, info, memory, rsdp, kernel, initrds, cmdline, held, vcpus); !started {
				fmt.Printf("tamahv: guest not started: %v\n", err)
				notStarted("the guest was not started", held)
			} else if err != nil {
				fmt.Printf("tamahv: guest: %v\n", err)
			}
			runtime.KeepAlive(held) // the parked APs' pages
		} else {
			fmt.Println("tamahv: no guest (no Linux bzImage among the boot modules)")
		}
	}
	if vmxOn { // else a native boot failed after VMXOFF
		if err := vmx.VMXOFF(); err != nil {
			fmt.Printf("tamahv: VMXOFF: %v\n", err)
		}
	}
	fmt.Println("tamahv: halted")
	pc.Halt()
}

// acpiRSDP returns the physical address of the ACPI RSDP on UEFI: the EFI
// configuration table's (ACPI 2.0 entry, then 1.0), checked, and compared
// with the boot loader's copy where it gave one; a copy that disagrees is
// an error. Firmware without a compatibility module keeps no RSDP in the
// BIOS areas, and without the MADT tamahv cannot hold the application
// processors. Where the EFI tables give none, and on BIOS, it returns 0:
// HoldProcessors searches the legacy BIOS areas, and refuses to start the
// guest if it then cannot account for every processor.
func acpiRSDP(info *bootinfo.Info) (uint64, error) {
	if info.EFI == nil || info.EFI.SystemTable == 0 {
		return 0, nil
	}
	loc, err := efi.FindRSDP(pc.PhysMem{}, info.EFI.SystemTable)
	if err != nil {
		fmt.Printf("tamahv: no ACPI RSDP through the EFI system table at %#x: %v\n", info.EFI.SystemTable, err)
		return 0, nil
	}
	if err := info.CheckRSDP(loc.RSDP); err != nil {
		return 0, fmt.Errorf("ACPI RSDP at %#x: %w", loc.Addr, err)
	}
	kind := "ACPI 2.0"
	if loc.GUID == efi.ACPITableGUID {
		kind = "ACPI 1.0"
	}
	fmt.Printf("tamahv: ACPI RSDP at %#x (EFI configuration table, %s entry, revision %d); the boot loader's copy agrees\n", loc.Addr, kind, loc.RSDP.Revision)
	return loc.Addr, nil
}

// bootNative boots the guest's kernel natively, as a boot loader would,
// with the boot parameters it would have had as tamahv's guest (tamahv's
// region reserved in its memory maps): where tamahv cannot run the guest
// (fallback=native), the machine still boots. It returns only where it
// cannot, having said why. The caller has left VMX operation; the
// application processors have not been started, or are parked in VMX
// root operation and hidden from the kernel.
func bootNative(info *bootinfo.Info, rsdp uint64, why string) {
	kernel, initrds, cmdline := modules(info)
	if kernel == nil {
		fmt.Println("tamahv: no native boot: no Linux bzImage among the boot modules")
		return
	}
	c := guestConfig(info, guestMemory(info), rsdp, kernel, initrds, cmdline)
	s, err := c.LinuxBoot().Load(pc.PhysMem{})
	if err != nil {
		fmt.Printf("tamahv: no native boot: %v\n", err)
		return
	}
	if s.RIP >= 1<<32 || s.RSI >= 1<<32 || s.GDTBase >= 1<<32 {
		fmt.Printf("tamahv: no native boot: the kernel's entry %#x is above 4 GiB\n", s.RIP)
		return
	}
	fmt.Printf("tamahv: booting the kernel natively, without tamahv (fallback=native): %s; kernel at %#x, initrd %d bytes at %#x, command line %q\n",
		why, s.KernelPA, s.InitrdLen, s.InitrdPA, cmdline)
	err = pc.BootLinux32(pc.Entry32{EIP: uint32(s.RIP), ESI: uint32(s.RSI), GDTBase: uint32(s.GDTBase), GDTLimit: s.GDTLimit,
		CodeSel: s.CodeSel, DataSel: s.DataSel})
	fmt.Printf("tamahv: no native boot: %v\n", err)
}

// alignedRegion returns a zeroed, 4 KiB aligned region of at least n
// bytes and its physical address.
func alignedRegion(n int) (uint64, []byte) {
	vmxonRegion = make([]byte, n+4096)
	pa := pc.PhysAddr(unsafe.Pointer(&vmxonRegion[0]))
	off := (4096 - pa%4096) % 4096
	return pa + off, vmxonRegion[off : off+uint64(n)]
}

func reportBoot(info *bootinfo.Info, err error) {
	if err != nil {
		fmt.Printf("tamahv: no boot information: %v\n", err)
		return
	}
	var avail uint64
	for _, r := range info.MemoryMap {
		if r.Type == e820.RAM {
			avail += r.Size
		}
	}
	fmt.Printf("tamahv: booted by %q, command line %q, %d MiB available in %d regions, %d modules\n",
		info.LoaderName, info.Cmdline, avail>>20, len(info.MemoryMap), len(info.Modules))
	fmt.Printf("tamahv: boot protocol %v on %v firmware\n", info.Protocol, info.Firmware())
	fmt.Printf("tamahv: own region %#x-%#x\n", uint64(pc.RAMStart), uint64(pc.RAMEnd))
	port, _ := pc.ConsolePort(info.Cmdline)
	fmt.Printf("tamahv: console on port %#x; the guest's default console is %s\n", port, strings.Fields(guestCmdline(port))[0])
}
