//go:build tamago

package main

import (
	"fmt"
	"os"
	"strings"
	"sync/atomic"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/board/pc/acpi"
	"github.com/tamahv/tamahv/board/pc/bootinfo"
	"github.com/tamahv/tamahv/board/pc/e820"
	"github.com/tamahv/tamahv/board/pc/efi"
	"github.com/tamahv/tamahv/board/pc/multiboot2"
	"github.com/tamahv/tamahv/board/pc/pci"
	"github.com/tamahv/tamahv/board/pc/smp"
	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/linux"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/vmx"
)

// guestCmdline is the guest's default command line: its serial console is
// COM2 where tamahv keeps COM1 (the default), else COM1.
func guestCmdline(tamahvConsole uint16) string {
	tty := "ttyS1"
	if tamahvConsole == pc.COM2 {
		tty = "ttyS0"
	}
	return fmt.Sprintf("console=%s,115200 earlyprintk=serial,%s,115200 panic=-1", tty, tty)
}

// consolePort is tamahv's console port, from console= on its command line
// (COM1 where that is missing or bad; main reports a bad one).
func consolePort(info *bootinfo.Info) uint16 {
	p, _ := pc.ConsolePort(info.Cmdline)
	return p
}

// modules finds the kernel and the initramfs among the boot modules: the
// kernel is the first module that is a bzImage (linux.IsBzImage), whatever
// its name; the words after its name, if any, replace the default guest
// command line. Every other module is a part of the initramfs, in order.
func modules(info *bootinfo.Info) (kernel *bootinfo.Module, initrds []bootinfo.Module, cmdline string) {
	cmdline = guestCmdline(consolePort(info))
	for i := range info.Modules {
		m := &info.Modules[i]
		if kernel == nil && m.End > m.Start && linux.IsBzImage(pc.PhysMem{}, m.Start, m.End-m.Start) {
			kernel = m
			if f := strings.Fields(m.Cmdline); len(f) > 1 {
				cmdline = strings.Join(f[1:], " ")
			}
			continue
		}
		initrds = append(initrds, *m)
	}
	return kernel, initrds, cmdline
}

// framebuffer is the linear framebuffer of direct colour the boot loader
// left, for the guest's kernel; nil where it left none (or a text mode, or
// a palette).
func framebuffer(info *bootinfo.Info) *linux.Framebuffer {
	fb := info.Framebuffer
	if fb == nil || fb.Type != multiboot2.FramebufferRGB {
		return nil
	}
	l := &linux.Framebuffer{Base: fb.Addr, Pitch: fb.Pitch, Width: fb.Width, Height: fb.Height, BPP: fb.BPP,
		RedPos: fb.Red.Position, RedSize: fb.Red.Size, GreenPos: fb.Green.Position, GreenSize: fb.Green.Size,
		BluePos: fb.Blue.Position, BlueSize: fb.Blue.Size, EFI: info.Firmware() == bootinfo.UEFI}
	// The bits above the colours are reserved (the alpha byte of 32-bit
	// pixels).
	top := max(fb.Red.Position+fb.Red.Size, fb.Green.Position+fb.Green.Size, fb.Blue.Position+fb.Blue.Size)
	if top < fb.BPP {
		l.ReservedPos, l.ReservedSize = top, fb.BPP-top
	}
	return l
}

// guestMemory is the machine's memory map for the guest: built from the
// EFI memory map with the EFI stub's rules where the boot loader passed
// one (UEFI), else the boot loader's map with the types a guest knows.
func guestMemory(info *bootinfo.Info) []e820.Entry {
	if info.EFI != nil && info.EFI.MemoryMap != nil {
		return e820.FromEFI(info.EFI.MemoryMap)
	}
	return e820.FromLoader(info.MemoryMap)
}

// guestConfig is the machine's configuration for the guest the boot
// modules hold, but its VMX capabilities: the kernel, its initramfs and
// command line, the memory map (tamahv's region reserved), the ACPI RSDP,
// the EFI system table and memory map, and the framebuffer.
func guestConfig(info *bootinfo.Info, memory []e820.Entry, rsdp uint64, kernel *bootinfo.Module, initrds []bootinfo.Module, cmdline string) machine.Config {
	c := machine.Config{
		Own: [2]uint64{pc.RAMStart, pc.RAMEnd}, Console: [2]uint16{consolePort(info), consolePort(info) + 7},
		Kernel: [2]uint64{kernel.Start, kernel.End - kernel.Start}, Cmdline: cmdline, Options: info.Cmdline, Log: os.Stdout,
		RSDP: rsdp,
	}
	for _, r := range memory {
		c.E820 = append(c.E820, hv.E820Entry{Addr: r.Addr, Size: r.Size, Type: uint32(r.Type)})
	}
	for _, m := range initrds {
		c.Initrds = append(c.Initrds, [2]uint64{m.Start, m.End - m.Start})
	}
	c.Framebuffer = framebuffer(info)
	if e := info.EFI; e != nil && e.SystemTable != 0 && e.MemoryMap != nil {
		// The guest's copy of the EFI memory map has tamahv's region
		// reserved, as its e820 map has.
		_, em := info.GuestMemoryMaps(pc.RAMStart, pc.RAMEnd)
		c.EFI = &linux.EFI{SystemTable: e.SystemTable, MemoryMap: em.Bytes(),
			DescriptorSize: uint32(max(int(em.DescriptorSize), efi.DescriptorLength)), DescriptorVersion: em.DescriptorVersion}
	}
	return c
}

// runGuest builds the machine and runs the guest; started reports whether
// the guest ran (else the kernel may still be booted natively).
func runGuest(caps *vmx.Caps, info *bootinfo.Info, memory []e820.Entry, rsdp uint64, kernel *bootinfo.Module, initrds []bootinfo.Module, cmdline string, smp *smp.SMP, vcpus bool) (started bool, err error) {
	m, sleep, err := buildGuest(caps, info, memory, rsdp, kernel, initrds, cmdline, smp, vcpus)
	if err != nil {
		return false, err
	}
	if sleep != nil {
		// Only now, the guest's start sure: a native boot keeps the
		// firmware's tables as they are.
		hideSleep(sleep)
	}
	l := m.Linux
	fmt.Printf("tamahv: hypercalls granted to CPL 3 beyond the default: %v\n", m.Monitor.Ring3)
	parts := "1 module"
	if n := len(l.Initrds); n != 1 {
		parts = fmt.Sprintf("%d modules", n)
	}
	fmt.Printf("tamahv: guest started: Linux boot protocol %d.%d, kernel %d bytes at %#x, initrd %d bytes from %s at %#x, command line %q\n",
		m.Start.ProtocolVersion>>8, m.Start.ProtocolVersion&0xff, l.KernelLen, m.Start.KernelPA, m.Start.InitrdLen, parts, m.Start.InitrdPA, cmdline)
	return true, m.Run()
}

// buildGuest builds the machine, the guest loaded and not yet started,
// and returns the ACPI sleep states it guards (nil: no ACPI).
func buildGuest(caps *vmx.Caps, info *bootinfo.Info, memory []e820.Entry, rsdp uint64, kernel *bootinfo.Module, initrds []bootinfo.Module, cmdline string, smp *smp.SMP, vcpus bool) (*machine.Machine, *acpi.Sleep, error) {
	c := guestConfig(info, memory, rsdp, kernel, initrds, cmdline)
	c.Caps = caps
	c.MTRRs = hostMTRRs()
	// apic.trapinit=auto traps the local APIC's writes on Bochs itself,
	// which the ACPI tables' OEM ID tells (with the processor's
	// hypervisor bit, which the machine reads): no tables, no Bochs.
	if id, err := acpi.FindOEMID(pc.PhysMem{}, rsdp); err == nil {
		c.OEMID = id
	}
	// Fail closed: a sleep register tamahv cannot guard would let the
	// guest suspend to RAM and resume outside tamahv.
	sleep, err := acpi.FindSleep(pc.PhysMem{}, rsdp)
	if err != nil {
		return nil, nil, fmt.Errorf("ACPI sleep: %w", err)
	}
	if sleep != nil {
		if c.PortGuards, err = guardSleep(sleep); err != nil {
			return nil, nil, fmt.Errorf("ACPI sleep: %w", err)
		}
	}
	pc.EnableXSAVE()
	// NMIs that arrive while tamahv runs are counted for the guest.
	if err := pc.SetNMIHandler(vmx.NMIHandler()); err != nil {
		return nil, nil, err
	}
	var b machine.Board = newBoard(1024)
	if aps := smp.VCPUs(); len(aps) > 0 && !vcpus {
		// Parked for good: halted in VMX root, hidden from the guest.
		for _, ap := range aps {
			if err := ap.Park(); err != nil {
				// Fail closed: a processor tamahv cannot park is not
				// accounted for.
				return nil, nil, fmt.Errorf("AP APIC ID %d: not parked: %w", ap.APICID(), err)
			}
		}
	} else if len(aps) > 0 {
		sb := &smpBoard{board: b.(*board)}
		for _, ap := range aps {
			// The exit loop answers, on the right processor.
			_, ebx, _, _ := ap.CPUID(1, 0)
			if err := ap.Err(); err != nil || ebx>>24 != ap.APICID()&0xff {
				// Fail closed: it stays in VMX root operation, but
				// tamahv cannot account for what it runs.
				return nil, nil, fmt.Errorf("AP APIC ID %d: its exit loop does not answer (%v, CPUID APIC ID %d)", ap.APICID(), err, ebx>>24)
			}
			sb.aps = append(sb.aps, apCPU{ap})
		}
		b = sb
	}
	m, err := machine.New(b, c)
	return m, sleep, err
}

// guardSleep returns the guards of the sleep registers, which drop the
// guest's writes that would enter the sleep states the firmware resumes
// from through its waking vector (S1-S3, and S4BIOS): resumed by the
// firmware, the guest would run outside tamahv with tamahv's memory in its
// reach. S4 and S5 pass: a hibernated or powered-off machine starts again
// through its boot loader. It fails, and the guest must not start, where
// no PCI register holds the chipset's PM base: the guest could move the
// sleep registers. It prints:
//
//	tamahv: ACPI sleep: S1-S3 refused at ports <ports>; S4: SLP_TYP a/b, S5: SLP_TYP a/b pass
//	tamahv: ACPI sleep: <a warning about the tables>
//	tamahv: ACPI sleep refused: SLP_TYP n (S3) at port 0x... (the first 8, then every 1000th)
func guardSleep(s *acpi.Sleep) ([]hv.PortGuard, error) {
	var ports []string
	for _, r := range s.Registers {
		ports = append(ports, fmt.Sprintf("%#x", r.Port))
	}
	var pass []string
	for _, st := range []int{4, 5} {
		if s.Found[st] {
			pass = append(pass, fmt.Sprintf("S%d: SLP_TYP %d/%d", st, s.Types[st][0], s.Types[st][1]))
		}
	}
	switch {
	case len(pass) == 0:
		pass = append(pass, "none: the tables name no \\_S4 or \\_S5, so ACPI power-off is refused too")
	case !s.Found[5]:
		pass = append(pass, "no \\_S5: ACPI power-off is refused")
	}
	fmt.Printf("tamahv: ACPI sleep: S1-S3 refused at ports %s; %s pass\n", strings.Join(ports, ", "), strings.Join(pass, ", "))
	if s.S4BIOSReq != 0 {
		fmt.Printf("tamahv: ACPI sleep: S4BIOS requests (%#x at SMI command port %#x) refused\n", s.S4BIOSReq, s.SMICmd)
	}
	for _, w := range s.Warnings {
		fmt.Printf("tamahv: ACPI sleep: %s (read anyway)\n", w)
	}
	var refused atomic.Uint64
	report := func(what string) {
		if n := refused.Add(1); n <= 8 || n%1000 == 0 {
			fmt.Printf("tamahv: ACPI sleep refused: %s (%d so far)\n", what, n)
		}
	}
	refuse := func(port uint16, size int, val uint32) bool {
		r, what := s.Refuses(port, size, val)
		if r {
			report(what)
		}
		return r
	}
	var g []hv.PortGuard
	for _, r := range s.Ranges() {
		g = append(g, hv.PortGuard{First: r[0], Last: r[1], Refuse: refuse})
	}
	// The chipset's register that holds the power-management base: the
	// guest owns PCI configuration space, and moving the base would take
	// the sleep registers away from the guarded ports. Every access to the
	// configuration mechanism's ports exits (CONFIG_ADDRESS too, so that
	// no other processor changes it between the check and the write),
	// and a write of CONFIG_DATA to that register is dropped.
	// Fail closed: a PM base tamahv cannot find, it cannot keep in place.
	regs := pci.FindIOBase(pc.PortIO, s.EventBase)
	if len(regs) == 0 {
		return nil, fmt.Errorf("no PCI register on bus 0 holds the PM base %#x, so the guest could move the sleep registers away from their guards", s.EventBase)
	}
	pg := &pci.Guard{Registers: regs}
	var names []string
	for _, r := range regs {
		names = append(names, r.String())
	}
	fmt.Printf("tamahv: ACPI sleep: the PM base %#x is in %s: its writes through ports 0xcf8-0xcff refused\n", s.EventBase, strings.Join(names, ", "))
	g = append(g, hv.PortGuard{First: pci.AddressPort, Last: pci.LastPort, Refuse: func(port uint16, size int, val uint32) bool {
		r, what := pg.Refuses(port, size, val, pc.PortIO(pci.AddressPort, 4, true, 0))
		if r {
			report("a write of " + what + ", for the PM base")
		}
		return r
	}})
	return g, nil
}

// hostMTRRs reads the processor's MTRRs (nil where CPUID.1:EDX.MTRR[12]
// says it has none: their MSRs would fault).
func hostMTRRs() *ept.MTRRs {
	hw := pc.Hardware{}
	if _, _, _, edx := hw.CPUID(1, 0); edx&(1<<12) == 0 {
		return nil
	}
	bits := uint(36)
	if top, _, _, _ := hw.CPUID(0x80000000, 0); top >= 0x80000008 {
		if a, _, _, _ := hw.CPUID(0x80000008, 0); a&0xff != 0 {
			bits = uint(a & 0xff)
		}
	}
	m := ept.ReadMTRRs(hw.ReadMSR, bits)
	return &m
}

// hideSleep renames \_S1-\_S3 in the firmware's AML tables, so that the
// guest's kernel offers no sleep the guards would refuse. It prints:
//
//	tamahv: ACPI sleep: hidden from the guest: \_S3 in the DSDT at 0x...
func hideSleep(s *acpi.Sleep) {
	if _, err := s.HideStates(pc.PhysMem{}); err != nil {
		// The guards still hold; the guest's kernel may offer a sleep
		// that then does not happen.
		fmt.Printf("tamahv: ACPI sleep: not hidden from the guest: %v\n", err)
	}
	for _, h := range s.Hidden {
		fmt.Printf("tamahv: ACPI sleep: hidden from the guest: %s\n", h)
	}
}
