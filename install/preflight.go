// Package install is what installing tamahv under a machine's own system
// needs besides the GRUB script next to it (42_tamahv): the preflight,
// which says from the running system whether this machine can run tamahv.
package install

import (
	"bufio"
	"bytes"
	"fmt"
	"io/fs"
	"strconv"
	"strings"
)

// Outcome is a check's result.
type Outcome uint8

// Outcomes.
const (
	Pass Outcome = iota
	Fail
	Unknown // the system does not say
)

// String is the outcome as the preflight prints it.
func (o Outcome) String() string {
	switch o {
	case Pass:
		return "ok"
	case Fail:
		return "FAIL"
	}
	return "unknown"
}

// Check is one preflight check.
type Check struct {
	Name    string
	Outcome Outcome
	Detail  string
}

// String is the check's line.
func (c Check) String() string {
	return fmt.Sprintf("preflight: %-7s %s: %s", c.Outcome, c.Name, c.Detail)
}

// Region is tamahv's memory, [start, end): the image claims it whole.
var Region = [2]uint64{0x10000000, 0x18000000}

// secureBootVar is the EFI global variable SecureBoot in efivarfs: four
// bytes of attributes, then the value (1: Secure Boot enforced).
const secureBootVar = "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"

// Preflight checks, from the files of the running system under root (the
// root directory as an fs.FS: proc/cpuinfo, proc/iomem, sys/firmware),
// what tamahv needs of a machine: an Intel processor with VMX, EPT and
// unrestricted guest; Secure Boot off (tamahv's image is not signed); and
// its region in RAM. It also says which firmware booted the system.
func Preflight(root fs.FS) []Check {
	var out []Check
	cpu, err := fs.ReadFile(root, "proc/cpuinfo")
	vendor, flags, vmxFlags, hasVMXFlags := cpuInfo(cpu)
	switch {
	case err != nil:
		out = append(out, Check{"VMX", Unknown, "no /proc/cpuinfo"})
	case vendor != "GenuineIntel":
		out = append(out, Check{"VMX", Fail, fmt.Sprintf("the processor is %q, not Intel: tamahv needs VT-x", vendor)})
	case !flags["vmx"]:
		out = append(out, Check{"VMX", Fail, "no vmx flag: VT-x is off in the firmware's settings, or this system runs in a virtual machine without nested VT-x"})
	default:
		out = append(out, Check{"VMX", Pass, "Intel VT-x"})
	}
	if err == nil && flags["vmx"] {
		for _, f := range []struct{ flag, name, why string }{
			{"ept", "EPT", "extended page tables"},
			{"unrestricted_guest", "unrestricted guest", "the guest starts in real and protected mode without paging"},
		} {
			switch {
			case !hasVMXFlags:
				out = append(out, Check{f.name, Unknown, "the kernel lists no \"vmx flags\" (Linux 5.8 and later do)"})
			case vmxFlags[f.flag]:
				out = append(out, Check{f.name, Pass, f.why})
			default:
				out = append(out, Check{f.name, Fail, "missing: " + f.why})
			}
		}
	}
	uefi := false
	if _, err := fs.Stat(root, "sys/firmware/efi"); err == nil {
		uefi = true
	}
	fw := "BIOS (no /sys/firmware/efi): GRUB's multiboot2 from the BIOS platform"
	if uefi {
		fw = "UEFI: GRUB EFI's multiboot2, which ends the boot services before tamahv runs"
	}
	out = append(out, Check{"firmware", Pass, fw})
	if uefi {
		switch b, err := fs.ReadFile(root, secureBootVar); {
		case err != nil:
			out = append(out, Check{"Secure Boot", Unknown, "no SecureBoot variable in efivarfs"})
		case len(b) >= 5 && b[4] == 1:
			out = append(out, Check{"Secure Boot", Fail, "on: the firmware and shim boot only signed images, and tamahv's is not; turn Secure Boot off in the firmware's settings"})
		default:
			out = append(out, Check{"Secure Boot", Pass, "off"})
		}
	}
	iomem, err := fs.ReadFile(root, "proc/iomem")
	out = append(out, regionCheck(iomem, err))
	return out
}

// cpuInfo reads the first processor's vendor, flags and VMX flags.
func cpuInfo(b []byte) (vendor string, flags, vmxFlags map[string]bool, hasVMXFlags bool) {
	flags, vmxFlags = map[string]bool{}, map[string]bool{}
	s := bufio.NewScanner(bytes.NewReader(b))
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if !ok {
			if strings.TrimSpace(s.Text()) == "" && vendor != "" {
				break // the first processor only
			}
			continue
		}
		switch strings.TrimSpace(k) {
		case "vendor_id":
			vendor = strings.TrimSpace(v)
		case "flags":
			for _, f := range strings.Fields(v) {
				flags[f] = true
			}
		case "vmx flags":
			hasVMXFlags = true
			for _, f := range strings.Fields(v) {
				vmxFlags[f] = true
			}
		}
	}
	return vendor, flags, vmxFlags, hasVMXFlags
}

// regionCheck says whether /proc/iomem's System RAM covers Region.
func regionCheck(iomem []byte, err error) Check {
	name := fmt.Sprintf("region %#x-%#x", Region[0], Region[1])
	if err != nil {
		return Check{name, Unknown, "no /proc/iomem"}
	}
	var ram [][2]uint64
	zero := true
	s := bufio.NewScanner(bytes.NewReader(iomem))
	for s.Scan() {
		line := s.Text()
		if strings.HasPrefix(line, " ") {
			continue // a child of a top-level range
		}
		rng, what, ok := strings.Cut(line, " : ")
		lo, hi, ok2 := strings.Cut(rng, "-")
		if !ok || !ok2 {
			continue
		}
		a, err1 := strconv.ParseUint(lo, 16, 64)
		b, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || b < a {
			continue
		}
		if a != 0 || b != 0 {
			zero = false
		}
		if strings.TrimSpace(what) == "System RAM" {
			ram = append(ram, [2]uint64{a, b + 1})
		}
	}
	if zero {
		return Check{name, Unknown, "/proc/iomem shows no addresses (run the preflight as root)"}
	}
	for pos := Region[0]; ; {
		found := false
		for _, r := range ram {
			if r[0] <= pos && pos < r[1] {
				pos, found = r[1], true
				break
			}
		}
		if !found {
			return Check{name, Fail, fmt.Sprintf("%#x is not RAM: GRUB cannot load tamahv there", pos)}
		}
		if pos >= Region[1] {
			return Check{name, Pass, "all RAM, free for GRUB to load tamahv into"}
		}
	}
}

// Failed reports whether a check failed.
func Failed(cs []Check) bool {
	for _, c := range cs {
		if c.Outcome == Fail {
			return true
		}
	}
	return false
}
