// Package qemu is tamahv's emulator harness: it boots the tamahv ISO in
// Bochs (VMX with EPT, emulated) or QEMU (TCG without VMX, or KVM with
// nested VMX), with a time limit, the serial console written to a file and
// followed line by line, and the emulator ended through the process it
// started.
package qemu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// Emulator selects what boots the image.
type Emulator string

// The emulators.
const (
	// Bochs emulates VT-x with EPT: the default, and the one that runs
	// tamahv's guest anywhere.
	Bochs Emulator = "bochs"
	// TCG is QEMU's software emulation: no VMX.
	TCG Emulator = "tcg"
	// KVM is QEMU with KVM and nested VMX, where /dev/kvm offers it.
	KVM Emulator = "kvm"
)

// ParseEmulator accepts the names of the emulators.
func ParseEmulator(s string) (Emulator, error) {
	switch e := Emulator(strings.ToLower(s)); e {
	case Bochs, TCG, KVM:
		return e, nil
	}
	return "", fmt.Errorf("qemu: unknown emulator %q (bochs, tcg or kvm)", s)
}

// BochsModels are the Bochs CPU models with VMX, EPT and unrestricted
// guest that tamahv is run on.
var BochsModels = []string{"corei7_skylake_x", "broadwell_ult", "corei7_icelake_u", "tigerlake"}

// GuestModels are the BochsModels on which Debian's 6.1 kernel boots in
// Bochs 2.7 at all: on corei7_icelake_u and tigerlake it stops at "LSM:
// Security Framework initializing" on bare Bochs too.
var GuestModels = map[string]bool{"corei7_skylake_x": true, "broadwell_ult": true}

// Config describes one boot.
type Config struct {
	Emulator Emulator
	ISO      string // the bootable image
	// Disk, instead of ISO, is a raw disk image to boot from (Disk.Build).
	Disk   string
	Model  string // Bochs CPU model (default corei7_skylake_x)
	MemMiB int    // guest-physical memory (default 1024)
	CPUs   int    // processors (default 1)
	// Timeout is the outer limit: the emulator is ended after this long
	// whatever it does (default 2 minutes).
	Timeout time.Duration
	// Stall ends the run when neither console grew for this long: no
	// line from tamahv (whose "tamahv: alive" lines count the guest's
	// exits while it runs) and none from the guest (default
	// DefaultStall, never more than Timeout).
	Stall time.Duration
	// Dir receives the serial log, the emulator's own log and its
	// configuration (default: a new temporary directory).
	Dir string
	// Program replaces the emulator's executable (for tests of the
	// harness itself); it gets the same arguments.
	Program string
	// UEFI boots with OVMF (Debian's ovmf package) instead of the BIOS:
	// QEMU on the q35 machine, with a copy of the firmware's variables in
	// Dir; Bochs with OVMF's 2 MiB image as its ROM (Bochs 2.7 gives it no
	// ACPI tables).
	UEFI bool
}

// OVMF's firmware and the template of its variables for QEMU, and its
// whole image for Bochs (Debian's ovmf).
const (
	OVMFCode  = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	OVMFVars  = "/usr/share/OVMF/OVMF_VARS_4M.fd"
	OVMFImage = "/usr/share/ovmf/OVMF.fd"
)

// Defaults.
const (
	DefaultModel   = "corei7_skylake_x"
	DefaultMemMiB  = 1024
	DefaultTimeout = 2 * time.Minute
	// DefaultStall is Config.Stall's default: longer than the guest's
	// longest silence on a busy 2-core host (its kernel's start with
	// several processors in Bochs, between tamahv's alive lines).
	DefaultStall = 5 * time.Minute
	// MaxCPUs is the most processors a boot is given.
	MaxCPUs = 8
	// bochsIPS is the instructions per second Bochs emulates; its TSC
	// runs at this rate.
	bochsIPS = 200_000_000
)

func (c *Config) fill() error {
	if c.Emulator == "" {
		c.Emulator = Bochs
	}
	if _, err := ParseEmulator(string(c.Emulator)); err != nil {
		return err
	}
	if (c.ISO == "") == (c.Disk == "") {
		return errors.New("qemu: give an ISO or a disk image, one of them")
	}
	for _, p := range []*string{&c.ISO, &c.Disk} {
		if *p == "" {
			continue
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return err
		}
		*p = abs
		if _, err := os.Stat(abs); err != nil {
			return fmt.Errorf("qemu: %w", err)
		}
	}
	if c.Model == "" {
		c.Model = DefaultModel
	}
	if c.MemMiB == 0 {
		c.MemMiB = DefaultMemMiB
	}
	if c.MemMiB < 512 {
		return fmt.Errorf("qemu: %d MiB of memory: tamahv's own region ends at 384 MiB, give at least 512", c.MemMiB)
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.Stall == 0 {
		c.Stall = DefaultStall
	}
	if c.Stall < 0 || c.Timeout < 0 {
		return fmt.Errorf("qemu: negative time limit (timeout %v, stall %v)", c.Timeout, c.Stall)
	}
	c.Stall = min(c.Stall, c.Timeout)
	if c.CPUs == 0 {
		c.CPUs = 1
	}
	if c.CPUs < 1 || c.CPUs > MaxCPUs {
		return fmt.Errorf("qemu: %d processors: give 1 to %d", c.CPUs, MaxCPUs)
	}
	return nil
}

// SerialLog is where tamahv's serial console (COM1) of a boot in dir is
// written.
func SerialLog(dir string) string { return filepath.Join(dir, "serial.log") }

// GuestLog is where the guest's serial console (COM2) is written.
func GuestLog(dir string) string { return filepath.Join(dir, "guest.log") }

// bochsDrive is the Bochs configuration of c's boot drive: the ISO as a
// CD, or the disk image as a flat disk of DiskGeometry.
func bochsDrive(c *Config) string {
	if c.Disk == "" {
		return fmt.Sprintf("ata0-master: type=cdrom, path=%q, status=inserted\nboot: cdrom", c.ISO)
	}
	var size int64
	if fi, err := os.Stat(c.Disk); err == nil {
		size = fi.Size()
	}
	return fmt.Sprintf("ata0-master: type=disk, mode=flat, path=%q, cylinders=%d, heads=%d, spt=%d\nboot: disk",
		c.Disk, DiskGeometry(size), diskHeads, diskSPT)
}

// bochsrc is the Bochs configuration for c, writing into dir.
func bochsrc(c *Config, dir string) string {
	rom := "romimage: file=/usr/share/bochs/BIOS-bochs-latest"
	if c.UEFI {
		rom = "romimage: file=" + OVMFImage + ", address=0xffe00000"
	}
	return strings.Join([]string{
		fmt.Sprintf("megs: %d", c.MemMiB),
		fmt.Sprintf("cpu: model=%s, count=%d, ips=%d, reset_on_triple_fault=0", c.Model, c.CPUs, bochsIPS),
		rom,
		"vgaromimage: file=/usr/share/vgabios/vgabios.bin",
		bochsDrive(c),
		fmt.Sprintf("com1: enabled=1, mode=file, dev=%q", SerialLog(dir)),
		fmt.Sprintf("com2: enabled=1, mode=file, dev=%q", GuestLog(dir)),
		"display_library: term",
		"clock: sync=none, time0=local",
		fmt.Sprintf("log: %q", filepath.Join(dir, "bochs.log")),
		"panic: action=fatal",
		"error: action=report",
		"info: action=ignore",
		"debug: action=ignore",
		"",
	}, "\n")
}

// command returns the program and arguments for c. For Bochs it writes the
// configuration and the debugger's command file into dir.
func command(c *Config, dir string) (string, []string, error) {
	switch c.Emulator {
	case Bochs:
		rc := filepath.Join(dir, "bochsrc")
		if err := os.WriteFile(rc, []byte(bochsrc(c, dir)), 0o644); err != nil {
			return "", nil, err
		}
		// Debian's Bochs has its debugger built in: "c" lets it run.
		cmds := filepath.Join(dir, "bochs.cmds")
		if err := os.WriteFile(cmds, []byte("c\n"), 0o644); err != nil {
			return "", nil, err
		}
		return c.program("bochs"), []string{"-q", "-f", rc, "-rc", cmds}, nil
	case TCG, KVM:
		machine := "pc"
		var firmware []string
		if c.UEFI {
			vars := filepath.Join(dir, "OVMF_VARS.fd")
			b, err := os.ReadFile(OVMFVars)
			if err != nil {
				return "", nil, fmt.Errorf("qemu: UEFI: %w (Debian package ovmf)", err)
			}
			if err := os.WriteFile(vars, b, 0o644); err != nil {
				return "", nil, err
			}
			machine = "q35"
			firmware = []string{
				"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + OVMFCode,
				"-drive", "if=pflash,format=raw,unit=1,file=" + vars,
			}
		}
		args := []string{
			"-machine", machine, "-m", fmt.Sprint(c.MemMiB), "-smp", fmt.Sprint(c.CPUs),
		}
		if c.Disk != "" {
			args = append(args, "-drive", "file="+c.Disk+",format=raw,if=ide")
		} else {
			args = append(args, "-cdrom", c.ISO, "-boot", "d")
		}
		args = append(args,
			"-display", "none", "-monitor", "none", "-no-reboot",
			"-serial", "file:"+SerialLog(dir),
			"-serial", "file:"+GuestLog(dir),
		)
		args = append(args, firmware...)
		if c.Emulator == KVM {
			args = append(args, "-enable-kvm", "-cpu", "host,+vmx")
		} else {
			// max gives RDRAND, which the Go runtime's start-up uses; TCG
			// has no VMX whatever the model.
			args = append(args, "-cpu", "max")
		}
		return c.program("qemu-system-x86_64"), args, nil
	}
	return "", nil, fmt.Errorf("qemu: unknown emulator %q", c.Emulator)
}

func (c *Config) program(def string) string {
	if c.Program != "" {
		return c.Program
	}
	return def
}

// KVMStatus reports whether QEMU with KVM can give a guest VMX: nil if so,
// else the reason it cannot.
func KVMStatus() error {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		return fmt.Errorf("KVM needs a linux/amd64 host, this is %s/%s", runtime.GOOS, runtime.GOARCH)
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("/dev/kvm is not usable: %w", err)
	}
	f.Close()
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return err
	}
	return kvmVMX(string(info), readParam("/sys/module/kvm_intel/parameters/nested"))
}

func readParam(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// kvmVMX decides from /proc/cpuinfo and kvm_intel's nested parameter.
func kvmVMX(cpuinfo, nested string) error {
	hasVMX := false
	for _, l := range strings.Split(cpuinfo, "\n") {
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.TrimSpace(k) == "flags" {
			for _, f := range strings.Fields(v) {
				if f == "vmx" {
					hasVMX = true
				}
			}
			break
		}
	}
	switch {
	case !hasVMX:
		return errors.New("the host CPU has no VMX (KVM here cannot give a guest VT-x)")
	case nested != "Y" && nested != "1":
		return fmt.Errorf("kvm_intel nested virtualization is off (nested=%q)", nested)
	}
	return nil
}
