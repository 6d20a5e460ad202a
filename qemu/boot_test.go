package qemu

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// End-to-end tests: they build the image with make and boot it.

var (
	buildOnce sync.Once
	buildErr  error
	buildOut  []byte
)

// isoForTest builds build/tamahv.iso once, or skips the test saying why it
// cannot be built here.
func isoForTest(t *testing.T) string {
	t.Helper()
	return builtISO(t, "../build/tamahv.iso")
}

// isoForSMP is the ISO the 2-processor test boots (make iso-smp): its
// guest leaves out the ring-3 attacks the one-processor test makes on
// memory and read slots.
func isoForSMP(t *testing.T) string {
	t.Helper()
	return builtISO(t, "../build/smp.iso")
}

// isoForMB2 is the ISO that boots tamahv through Multiboot2 (make
// iso-mb2), on BIOS and on UEFI.
func isoForMB2(t *testing.T) string {
	t.Helper()
	return builtISO(t, "../build/mb2.iso")
}

// isoForFallback is the Multiboot2 ISO with fallback=native (make
// iso-fallback), whose kernel checks what it was handed.
func isoForFallback(t *testing.T) string {
	t.Helper()
	return builtISO(t, "../build/fallback.iso")
}

// builtISO builds the test ISOs once (make iso iso-smp iso-mb2
// iso-fallback iso-console), or skips the test
// saying why they cannot be built here, and returns path's absolute form.
func builtISO(t *testing.T, path string) string {
	t.Helper()
	if why := ImagePrerequisites("../go.mod"); why != "" {
		t.Skip("image tests skipped: " + why)
	}
	buildOnce.Do(func() {
		cmd := exec.Command("make", "-C", "..", "iso", "iso-smp", "iso-mb2", "iso-fallback", "iso-console")
		buildOut, buildErr = cmd.CombinedOutput()
	})
	require.NoError(t, buildErr, "make iso iso-smp iso-mb2 iso-fallback iso-console:\n%s", buildOut)
	iso, err := filepath.Abs(path)
	require.NoError(t, err)
	t.Logf("the guest kernel: %s", guestKernel())
	return iso
}

// guestKernel names the Debian kernel package make payload put in the
// ISO.
func guestKernel() string {
	b, err := os.ReadFile("../build/payload/kernel.version")
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	return strings.TrimSpace(string(b))
}

func needEmulator(t *testing.T, e Emulator) {
	t.Helper()
	if why := EmulatorPrerequisite(e); why != "" {
		t.Skip("emulator test skipped: " + why)
	}
}

// bochsAPICLine is tamahv's line about the local APIC in Bochs 2.7 on
// its BIOS, where apic.trapinit=auto traps the local APIC's writes.
const bochsAPICLine = "tamahv: local APIC writes trapped: INIT sticks in VMX non-root (Bochs 2.7) (apic.trapinit=auto)"

var vmxOnRE = regexp.MustCompile(`^tamahv: VMX on \(revision 0x[0-9a-f]+, EPT yes, VPID yes, unrestricted guest yes\)$`)

func bootUntilHalted(t *testing.T, c Config) *Result {
	t.Helper()
	return bootUntil(t, c, func(l string) bool { return l == "tamahv: halted" })
}

func bootUntil(t *testing.T, c Config, until func(string) bool) *Result {
	t.Helper()
	c.Dir = filepath.Join(t.TempDir(), string(c.Emulator))
	res, err := Run(context.Background(), c, nil, until)
	if err != nil {
		t.Logf("serial console:\n%s", res.Serial())
		if b, e := os.ReadFile(filepath.Join(c.Dir, "bochs.log")); e == nil {
			t.Logf("bochs.log (tail):\n%s", tail(string(b), 30))
		}
	}
	require.NoError(t, err)
	return res
}

// logMilestones logs when the guest's init reached each of its steps
// (its "guest: " lines and the attacks' outcomes), in wall time since the
// emulator started: where a slow run spends its time.
func logMilestones(t *testing.T, res *Result) {
	t.Helper()
	var b strings.Builder
	for i, l := range res.Guest {
		if strings.HasPrefix(l, "guest: ") || strings.HasPrefix(l, "hvguest: attack ") || strings.HasPrefix(l, "tamahv-adversary: ") {
			fmt.Fprintf(&b, "%8v  %s\n", res.GuestAt[i].Round(time.Second), l)
		}
	}
	t.Logf("milestones (wall time since the start):\n%s", b.String())
}

func tail(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

func lineWith(lines []string, prefix string) (string, int) {
	for i, l := range lines {
		if strings.HasPrefix(l, prefix) {
			return l, i
		}
	}
	return "", -1
}

func TestBochsEntersVMXOperation(t *testing.T) {
	iso := isoForTest(t)
	needEmulator(t, Bochs)
	res := bootUntil(t, Config{Emulator: Bochs, ISO: iso, Timeout: 3 * time.Minute},
		func(l string) bool { return strings.HasPrefix(l, "tamahv: VMX ") })
	on, i := lineWith(res.Lines, "tamahv: VMX ")
	require.GreaterOrEqual(t, i, 0, "no VMX line in:\n%s", res.Serial())
	assert.Regexp(t, vmxOnRE, on)
	boot, _ := lineWith(res.Lines, "tamahv: booted by ")
	assert.Contains(t, boot, "GRUB")
	fc, _ := lineWith(res.Lines, "vmx: IA32_FEATURE_CONTROL")
	assert.Contains(t, fc, "VMX outside SMX yes")
	t.Logf("Bochs: %q after %v", on, res.Elapsed.Round(time.Millisecond))
}

func TestTCGReportsVMXUnavailable(t *testing.T) {
	iso := isoForTest(t)
	needEmulator(t, TCG)
	res := bootUntilHalted(t, Config{Emulator: TCG, ISO: iso, Timeout: time.Minute})
	l, i := lineWith(res.Lines, "tamahv: VMX ")
	require.GreaterOrEqual(t, i, 0, "no VMX line in:\n%s", res.Serial())
	assert.Equal(t, "tamahv: VMX unavailable: no VMX in CPUID", l)
}

// TestTCGMultiboot2 boots tamahv through GRUB's multiboot2 on SeaBIOS
// and on OVMF (UEFI), under QEMU TCG, which has no VMX: tamahv reads the
// Multiboot2 information on both, and on UEFI finds the ACPI RSDP through
// the EFI system table and checks it against GRUB's copy, before it
// reports VMX unavailable.
func TestTCGMultiboot2(t *testing.T) {
	iso := isoForMB2(t)
	needEmulator(t, TCG)
	for _, uefi := range []bool{false, true} {
		fw := map[bool]string{false: "BIOS", true: "UEFI"}[uefi]
		t.Run(fw, func(t *testing.T) {
			if _, err := os.Stat(OVMFCode); uefi && err != nil {
				t.Skip("no OVMF firmware (Debian package ovmf)")
			}
			res := bootUntilHalted(t, Config{Emulator: TCG, ISO: iso, UEFI: uefi, Timeout: 2 * time.Minute})
			t.Logf("tamahv:\n%s", res.Serial())
			l, _ := lineWith(res.Lines, "tamahv: boot protocol ")
			assert.Equal(t, "tamahv: boot protocol Multiboot2 on "+fw+" firmware", l)
			l, _ = lineWith(res.Lines, "tamahv: booted by ")
			assert.Contains(t, l, "3 modules", "the kernel and the initramfs's two parts")
			rsdp, _ := lineWith(res.Lines, "tamahv: ACPI RSDP at ")
			if uefi {
				assert.Regexp(t, `^tamahv: ACPI RSDP at 0x[0-9a-f]+ \(EFI configuration table, ACPI 2\.0 entry, revision 2\); the boot loader's copy agrees$`, rsdp)
			} else {
				assert.Empty(t, rsdp, "on BIOS the legacy areas are searched later")
			}
			l, _ = lineWith(res.Lines, "tamahv: VMX ")
			assert.Equal(t, "tamahv: VMX unavailable: no VMX in CPUID", l)
		})
	}
}

// TestTCGNativeFallback boots tamahv with fallback=native under QEMU TCG,
// which has no VMX: tamahv reports VMX unavailable and boots the kernel
// natively with the boot parameters its guest would have had. On UEFI (q35
// and OVMF, 8 GiB, 2 and 4 processors) the kernel's init checks what it
// was handed: every processor, the memory above 4 GiB, the ACPI RSDP
// tamahv found through the EFI configuration table, the EFI runtime
// services (it reads variables through them), the GOP framebuffer, and
// tamahv's region reserved in its e820 and EFI memory maps. (The same
// boot on SeaBIOS hung once in the kernel under TCG with two processors
// and was left out; TestTCGConsoleOnCOM2 boots the kernel natively there.)
func TestTCGNativeFallback(t *testing.T) {
	iso := isoForFallback(t)
	needEmulator(t, TCG)
	for _, c := range []struct {
		uefi bool
		cpus int
	}{{true, 2}, {true, 4}} {
		fw := map[bool]string{false: "BIOS", true: "UEFI"}[c.uefi]
		t.Run(fmt.Sprintf("%s/%dcpus", fw, c.cpus), func(t *testing.T) {
			if _, err := os.Stat(OVMFCode); c.uefi && err != nil {
				t.Skip("no OVMF firmware (Debian package ovmf)")
			}
			const memMiB = 8192
			res := bootUntil(t, Config{Emulator: TCG, ISO: iso, UEFI: c.uefi, CPUs: c.cpus, MemMiB: memMiB, Timeout: 10 * time.Minute, Stall: 3 * time.Minute},
				func(l string) bool { return l == GuestPrefix+"guest: handover: done" || l == "tamahv: halted" })
			t.Logf("tamahv:\n%s", res.Serial())
			guest := res.GuestSerial()
			if res.Matched != GuestPrefix+"guest: handover: done" {
				t.Fatalf("the natively booted kernel did not finish its checks; guest console:\n%s", tail(guest, 60))
			}
			t.Logf("guest (its checks):\n%s", strings.Join(grepLines(res.Guest, "guest: "), "\n"))
			l, _ := lineWith(res.Lines, "tamahv: VMX ")
			assert.Equal(t, "tamahv: VMX unavailable: no VMX in CPUID", l)
			l, _ = lineWith(res.Lines, "tamahv: booting the kernel natively")
			assert.Regexp(t, `^tamahv: booting the kernel natively, without tamahv \(fallback=native\): VMX unavailable; kernel at 0x[0-9a-f]+, initrd [0-9]+ bytes at 0x[0-9a-f]+, command line ".*tamahv.check=handover"$`, l)
			if _, at, ok := res.GuestLine("guest: init started"); ok {
				t.Logf("figures: %s, %d processors, %d MiB: the native kernel's init after %v of wall time", fw, c.cpus, memMiB, at.Round(time.Second))
			}
			want := func(prefix string) string {
				t.Helper()
				l, _, ok := res.GuestLine(prefix)
				assert.True(t, ok, "no %q from the guest", prefix)
				return strings.TrimPrefix(l, prefix)
			}
			assert.Equal(t, fmt.Sprint(c.cpus), want("guest: handover: cpus "), "every processor runs")
			var kb int
			_, err := fmt.Sscanf(want("guest: handover: MemTotal: "), "%d kB", &kb)
			assert.NoError(t, err)
			assert.Greater(t, kb, 7<<20, "the memory above 4 GiB")
			assert.Equal(t, "0x10000000-0x17ffffff Reserved", want("guest: handover: memmap "), "tamahv's region is reserved in the kernel's e820 map")
			rsdp := want("guest: handover: ACPI: RSDP ")
			tr, _ := lineWith(res.Lines, "tamahv: ACPI RSDP at ")
			at, err := strconv.ParseUint(strings.Fields(strings.TrimPrefix(tr, "tamahv: ACPI RSDP at "))[0], 0, 64)
			if assert.NoError(t, err, "tamahv's RSDP line %q", tr) {
				got, err := strconv.ParseUint(rsdp, 0, 64)
				assert.NoError(t, err)
				assert.Equal(t, at, got, "the kernel's RSDP is the one tamahv handed it")
				assert.Equal(t, fmt.Sprintf("%#x", at), want("guest: handover: efi systab ACPI20="), "the EFI system table names the same RSDP")
			}
			assert.Regexp(t, `^0x[0-9a-f]+$`, want("guest: handover: efi runtime "), "the EFI runtime services")
			var vars int
			_, err = fmt.Sscanf(want("guest: handover: efi variables read "), "%d", &vars)
			assert.NoError(t, err)
			assert.Positive(t, vars, "the runtime services read the firmware's variables")
			// The EFI map's entries from tamahv's region on: reserved,
			// one after the other, to its end.
			next := uint64(0x10000000)
			for _, l := range grepLines(res.Guest, "guest: handover: efi map ") {
				m := efiMapRE.FindStringSubmatch(l)
				if !assert.NotNil(t, m, "an EFI map line: %q", l) {
					continue
				}
				start, _ := strconv.ParseUint(m[2], 16, 64)
				end, _ := strconv.ParseUint(m[3], 16, 64)
				assert.Equal(t, next, start, "%q follows the one before", l)
				assert.Equal(t, "Reserved", m[1], "%q in tamahv's region", l)
				next = end + 1
			}
			assert.Equal(t, uint64(0x18000000), next, "tamahv's region is reserved in the kernel's EFI memory map, to its end")
			assert.Contains(t, want("guest: handover: fb "), "EFI VGA", "the GOP framebuffer (efifb)")
		})
	}
}

// efiMapRE is an entry of the EFI memory map the kernel prints (efi=debug):
// its type and range.
var efiMapRE = regexp.MustCompile(`mem[0-9]+: \[([A-Za-z ]+?) *\|.*range=\[0x([0-9a-f]+)-0x([0-9a-f]+)\]`)

// checkS3Refused: tamahv hid the firmware's \_S3 from the guest (Bochs's
// BIOS names S3 SLP_TYP 1, S4 and S5 SLP_TYP 0, at PM1a control port
// 0xb004), whose kernel then offers suspend-to-idle only, and dropped the
// guest's raw write of S3's SLP_TYP with SLP_EN, after which the guest
// ran on.
func checkS3Refused(t *testing.T, res *Result) {
	t.Helper()
	l, _ := lineWith(res.Lines, "tamahv: ACPI sleep: S1-S3 refused")
	assert.Equal(t, "tamahv: ACPI sleep: S1-S3 refused at ports 0xb004; S4: SLP_TYP 0/0, S5: SLP_TYP 0/0 pass", l)
	l, _ = lineWith(res.Lines, "tamahv: ACPI sleep: hidden from the guest: ")
	assert.Regexp(t, `^tamahv: ACPI sleep: hidden from the guest: \\_S3 in the DSDT at 0x[0-9a-f]+$`, l)
	l, _, ok := res.GuestLine("guest: sleep: states ")
	if assert.True(t, ok, "the guest's sleep states") {
		assert.NotContains(t, l, "deep", "no suspend-to-RAM offered")
		assert.Contains(t, l, "s2idle")
		t.Log(l)
	}
	l, _, ok = res.GuestLine("hvguest: sleep: ")
	assert.True(t, ok, "the guest did not run on after its S3 write")
	assert.Equal(t, "hvguest: sleep: SLP_EN with SLP_TYP 1 (XS3_) written to port 0xb005: still running", l)
	l, _ = lineWith(res.Lines, "tamahv: ACPI sleep refused: ")
	assert.Equal(t, "tamahv: ACPI sleep refused: SLP_TYP 1 (S3) at port 0xb004 (1 so far)", l)
	// The PIIX4's PMBA (00:01.3, register 0x40) holds the PM base: the
	// guest's write that would move it is dropped.
	l, _ = lineWith(res.Lines, "tamahv: ACPI sleep: the PM base ")
	assert.Equal(t, "tamahv: ACPI sleep: the PM base 0xb000 is in PCI 00:01.3 register 0x40: its writes through ports 0xcf8-0xcff refused", l)
	l, _, ok = res.GuestLine("hvguest: sleep: moving the PM base")
	assert.True(t, ok, "the guest's move of the PM base")
	assert.Equal(t, "hvguest: sleep: moving the PM base in PCI 00:01.3 register 0x40 to 0xc001 had no effect: still 0xb001", l)
	assert.Contains(t, res.Serial(), "tamahv: ACPI sleep refused: a write of PCI 00:01.3 register 0x40, for the PM base (2 so far)")
}

// TestTCGConsoleOnCOM2 boots tamahv with console=com2 under QEMU TCG
// (SeaBIOS): its lines arrive on COM2, and the kernel it then boots
// natively, with tamahv's default guest command line, writes to COM1.
func TestTCGConsoleOnCOM2(t *testing.T) {
	iso := builtISO(t, "../build/console.iso")
	needEmulator(t, TCG)
	res := bootUntil(t, Config{Emulator: TCG, ISO: iso, Timeout: 3 * time.Minute},
		func(l string) bool {
			return strings.Contains(l, "Kernel command line: ") && !strings.HasPrefix(l, GuestPrefix)
		})
	t.Logf("COM2:\n%s", res.GuestSerial())
	l, _, ok := res.GuestLine("tamahv: console on port ")
	assert.True(t, ok, "tamahv's lines on COM2")
	assert.Equal(t, "tamahv: console on port 0x2f8; the guest's default console is console=ttyS0,115200", l)
	_, _, ok = res.GuestLine("tamahv: booting the kernel natively")
	assert.True(t, ok)
	for _, l := range res.Lines {
		assert.False(t, strings.HasPrefix(l, "tamahv"), "tamahv wrote to COM1: %q", l)
	}
	assert.Contains(t, res.Matched, "Kernel command line: console=ttyS0,115200 earlyprintk=serial,ttyS0,115200", "the kernel's console on COM1")
}

// grepLines returns the lines that contain s.
func grepLines(lines []string, s string) []string {
	var out []string
	for _, l := range lines {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}

// TestBochsUEFI boots the Multiboot2 ISO in Bochs on OVMF: GRUB EFI loads
// tamahv, which enters VMX operation on firmware state UEFI left and
// starts the Linux guest from the EFI memory map, until the guest's init
// runs. The guest's kernel finds the EFI system table (efi_info). Bochs
// 2.7 gives OVMF no ACPI tables: tamahv finds no RSDP through the EFI
// system table and, with one processor, starts the guest.
func TestBochsUEFI(t *testing.T) {
	iso := isoForMB2(t)
	needEmulator(t, Bochs)
	if _, err := os.Stat(OVMFImage); err != nil {
		t.Skip("no OVMF firmware (Debian package ovmf)")
	}
	res := bootUntil(t, Config{Emulator: Bochs, ISO: iso, UEFI: true, Timeout: 20 * time.Minute},
		func(l string) bool {
			return strings.HasPrefix(l, GuestPrefix+"guest: init started") || l == "tamahv: halted"
		})
	t.Logf("tamahv:\n%s", res.Serial())
	for _, want := range []string{"tamahv: boot protocol Multiboot2 on UEFI firmware", "tamahv: guest started", "tamahv: vCPU 0 started"} {
		l, _ := lineWith(res.Lines, want)
		assert.NotEmpty(t, l, "tamahv did not print %q", want)
	}
	l, _ := lineWith(res.Lines, "tamahv: VMX ")
	assert.Regexp(t, vmxOnRE, l)
	l, at, ok := res.GuestLine("guest: init started")
	if assert.True(t, ok, "the guest's init did not start; guest console:\n%s", tail(res.GuestSerial(), 40)) {
		t.Logf("figures: boot to the guest's init on UEFI: %v of wall time (%s)", at.Round(time.Second), l)
	}
	e820, _, _ := res.GuestLine("[    0.000000] BIOS-e820: ")
	assert.NotEmpty(t, e820, "the guest's memory map")
	assert.NotContains(t, res.GuestSerial(), "type 20", "GRUB's EFI type 20 never reaches the guest")
	assert.Regexp(t, `(?m)BIOS-e820: \[mem 0x0000000010000000-0x0000000017ffffff\] reserved`, res.GuestSerial(), "tamahv's region")
	assert.Regexp(t, `(?m)efi: EFI v[0-9.]+ by EDK II`, res.GuestSerial(), "the kernel was told of the EFI system table")
}

// TestBochsInstalledDisk boots, in Bochs on OVMF, a disk laid out as an
// installed Debian (qemu.Disk): GRUB EFI from the EFI system partition
// finds the root file system by its UUID and reads the configuration
// install/42_tamahv made, whose tamahv entry is the default for this boot
// (as make try would choose it). tamahv runs under VMX and starts the
// guest with the command line the entry gives (root=UUID=… ro). The
// guest's initramfs loads the disk and ext4 drivers, mounts the root file
// system by its UUID and hands over to the system on it, whose init makes
// hvguest's checks of tamahv that need no swap.
func TestBochsInstalledDisk(t *testing.T) {
	isoForMB2(t) // builds the image and the payload
	needEmulator(t, Bochs)
	if why := DiskPrerequisite(); why != "" {
		t.Skip("disk test skipped: " + why)
	}
	if _, err := os.Stat(OVMFImage); err != nil {
		t.Skip("no OVMF firmware (Debian package ovmf)")
	}
	const uuid = "2a4e2d1f-7a11-4b2b-9c55-1d0e6b0ca5e7"
	version := strings.TrimPrefix(guestKernel(), "linux-image-")
	d := Disk{Kernel: "../build/payload/vmlinuz", Initrd: "../build/payload/initrd.gz", Image: "../build/tamahv.elf",
		Version: version, Script: "../install/42_tamahv", UUID: uuid,
		Settings: "TAMAHV_OPTIONS=\"hc.ring3=secret,bpfault swap.deadline=5s log.alive=10s\"\n" +
			"TAMAHV_GUEST_CMDLINE=\"console=ttyS1,115200 earlyprintk=serial,ttyS1,115200 panic=-1\"\n"}
	var err error
	d.Files, err = GuestRoot("../build/payload/root/bin/busybox", "../build/payload/root/bin/hvguest", uuid)
	require.NoError(t, err)
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	id, err := d.Build(dir, disk)
	require.NoError(t, err)
	t.Logf("disk image with the entry %s", id)
	res := bootUntil(t, Config{Emulator: Bochs, Disk: disk, UEFI: true, Timeout: 20 * time.Minute},
		func(l string) bool {
			return l == GuestPrefix+"guest: root disk checks done" || l == "tamahv: halted" ||
				strings.HasPrefix(l, GuestPrefix+"guest: root ") && strings.Contains(l, " not mounted") ||
				l == GuestPrefix+"guest: no /sbin/init on the root file system"
		})
	t.Logf("tamahv:\n%s", res.Serial())
	for _, want := range []string{"tamahv: boot protocol Multiboot2 on UEFI firmware", "tamahv: guest started"} {
		l, _ := lineWith(res.Lines, want)
		assert.NotEmpty(t, l, "tamahv did not print %q", want)
	}
	l, _ := lineWith(res.Lines, "tamahv: VMX ")
	assert.Regexp(t, vmxOnRE, l)
	assert.Contains(t, res.GuestSerial(), "Kernel command line: root=UUID="+uuid+" ro", "the entry's command line")
	l, at, ok := res.GuestLine("guest: init started")
	if assert.True(t, ok, "the guest's init did not start; guest console:\n%s", tail(res.GuestSerial(), 40)) {
		t.Logf("figures: boot from the installed disk to the guest's init on UEFI: %v of wall time (%s)", at.Round(time.Second), l)
	}
	// Its initramfs mounted the root file system by its UUID, from the
	// disk, and handed over to the system there.
	l, _, ok = res.GuestLine("guest: root UUID=" + uuid + " mounted from ")
	assert.True(t, ok, "the root file system was not mounted; guest console:\n%s", tail(res.GuestSerial(), 40))
	t.Log(l)
	l, at, ok = res.GuestLine("guest: running from the root disk: ")
	if assert.True(t, ok, "the guest did not run from its root disk") {
		assert.Regexp(t, `^guest: running from the root disk: tamahv's test disk, root file system UUID=`+uuid+`, / is /dev/sd[a-z]2 ext4 ro,`, l)
		t.Logf("figures: boot from the installed disk to the system on its root file system: %v of wall time", at.Round(time.Second))
	}
	// The checks of tamahv the system on the disk makes.
	for _, want := range []string{
		"hvguest: running under tamahv, hypercall interface version 1",
		"hvguest: malformed hypercalls answered with errors",
		"hvguest: VMXON raised #UD (SIGILL)",
		"hvguest: /dev/mem ",
		"hvguest: CPUID costs ",
	} {
		l, _, ok := res.GuestLine(want)
		assert.True(t, ok, "the system on the disk did not print %q", want)
		assert.NotContains(t, l, "FAILED")
		t.Log(l)
	}
	assert.NotContains(t, res.GuestSerial(), "FAILED")
}

// TestBochsModels boots every Bochs CPU model tamahv supports, with its
// Linux guest; it is slow and runs on demand (make e2e-models sets
// TAMAHV_E2E_MODELS=1).
func TestBochsModels(t *testing.T) {
	if os.Getenv("TAMAHV_E2E_MODELS") == "" {
		t.Skip("model matrix runs on demand: make e2e-models")
	}
	iso := isoForTest(t)
	needEmulator(t, Bochs)
	for _, m := range BochsModels {
		t.Run(m, func(t *testing.T) {
			if !GuestModels[m] {
				// The guest kernel cannot boot on this model even without
				// tamahv: check VMX operation and the guest's start.
				res := bootUntil(t, Config{Emulator: Bochs, ISO: iso, Model: m, Timeout: 3 * time.Minute},
					func(l string) bool { return strings.HasPrefix(l, "tamahv: guest started") })
				on, _ := lineWith(res.Lines, "tamahv: VMX ")
				assert.Regexp(t, vmxOnRE, on)
				t.Logf("%s: guest not run to the end (Debian's kernel hangs on bare Bochs with this model)", m)
				return
			}
			res := bootUntilHalted(t, Config{Emulator: Bochs, ISO: iso, Model: m, Timeout: 6 * time.Minute})
			on, _ := lineWith(res.Lines, "tamahv: VMX ")
			assert.Regexp(t, vmxOnRE, on)
			exited, _ := lineWith(res.Lines, "tamahv: guest exited (status 0)")
			assert.NotEmpty(t, exited, "tamahv:\n%s\nguest:\n%s", res.Serial(), tail(res.GuestSerial(), 40))
			for _, want := range []string{"hvguest: running under tamahv", "hvguest: VMXON raised #UD", "guest: kernel log clean", "swapread: tamahv read the range"} {
				_, _, ok := res.GuestLine(want)
				assert.True(t, ok, "%s: no %q", m, want)
			}
			for _, l := range res.Lines {
				if strings.HasPrefix(l, "vmx: ") || strings.HasPrefix(l, "tamahv: swapmem read") || strings.HasPrefix(l, "tamahv: guest exited") {
					t.Log(l)
				}
			}
		})
	}
}

// The guest adversary's attacks (qemu/guest/kmod and hvguest attack), in
// the order the guest makes them.
var (
	kernelAttacks = []string{
		"detour-in-tamahv", "pmd-to-tamahv", "pmd-to-mmio", "pte-to-tamahv", "pte-to-mmio",
		"xsetbv-0x27", "xsetbv-0xe3", "xsetbv-0xf", "xsetbv-amx-tilecfg",
		"cr0-nw-without-cd", "cr0-paging-off", "cr0-pg-without-pe", "cr0-bit32",
		"cr4-pae-off", "cr4-la57-toggle", "cr4-vmxe", "cr4-bit32",
		"io-inw-0x3f7", "io-inl-0x3f5", "io-inl-0x3fe", "io-inw-0xffff",
		"mem-above-ram", "mem-above-4g", "wrmsr-tsc", "wrmsr-tsc-adjust", "pte-store-forms",
	}
	ring3Attacks = []string{
		"hash-kernel-va", "request-in-kernel", "kernelfault-option", "option-0",
		"bpfault-kernel-va", "bpfault-unmapped", "bpfault-prot-none", "nofault-left-pending", "mxcsr-unmasked", "hcexit-ring3",
		"nofault-large-reads", "slots-held", "writefault-dead-process", "exit-storm",
	}
	// smpSkipped are the ring-3 attacks the 2-processor test's guest
	// leaves out (qemu/grub-smp.cfg): the one-processor test makes them.
	smpSkipped = []string{"nofault-large-reads", "slots-held", "writefault-dead-process"}
	outcomeRE  = regexp.MustCompile(`: (refused|survived) \(.+\)$`)
)

// adversaryModule reports whether make iso put the adversary's kernel
// module in the guest, and if not why.
func adversaryModule() (bool, string) {
	if _, err := os.Stat("../build/payload/root/lib/modules/tamahv_adversary.ko"); err != nil {
		return false, "no guest kernel headers to build qemu/guest/kmod against (see README, \"The guest adversary\")"
	}
	return true, ""
}

// TestBochsLinuxGuest boots Debian's kernel under tamahv in Bochs: the
// guest's init proves it runs virtualized, checks tamahv's protections,
// attacks tamahv from its kernel and from ring 3 (the guest adversary) and
// ends itself through a hypercall its kernel module makes. GRUB boots
// tamahv through Multiboot2 and hands it the guest's files with module2
// --nounzip, as an installed system's menu entry does (the 2-processor
// test boots through Multiboot 1).
func TestBochsLinuxGuest(t *testing.T) {
	iso := isoForMB2(t)
	needEmulator(t, Bochs)
	withModule, why := adversaryModule()
	done := func(l string) bool {
		return l == "tamahv: halted" || (!withModule && l == GuestPrefix+"guest: done")
	}
	res := bootUntil(t, Config{Emulator: Bochs, ISO: iso, Timeout: 30 * time.Minute}, done)
	t.Logf("guest console:\n%s", res.GuestSerial())
	logMilestones(t, res)
	started, _ := lineWith(res.Lines, "tamahv: guest started")
	require.NotEmpty(t, started, "tamahv did not start the guest:\n%s", res.Serial())
	apic, _ := lineWith(res.Lines, "tamahv: local APIC")
	assert.Equal(t, bochsAPICLine, apic, "apic.trapinit=auto on Bochs")
	stopped, _ := lineWith(res.Lines, "tamahv: guest stopped")
	require.Empty(t, stopped, "tamahv:\n%s\nguest:\n%s", res.Serial(), tail(res.GuestSerial(), 40))
	if withModule {
		exited, _ := lineWith(res.Lines, "tamahv: guest exited")
		require.Equal(t, "tamahv: guest exited (status 0)", strings.SplitN(exited, " after", 2)[0], "tamahv:\n%s", res.Serial())
		t.Log(exited)
	} else {
		t.Log("guest adversary: kernel attacks skipped: " + why)
	}
	_, at, ok := res.GuestLine("guest: init started")
	require.True(t, ok, "no init marker")
	t.Logf("guest init after %v of wall time", at.Round(time.Millisecond))
	for _, l := range res.Lines {
		// tamahv's counters and its answers to the swap reads (the
		// attacks' among them).
		if strings.HasPrefix(l, "tamahv: exits ") || strings.HasPrefix(l, "tamahv: swapmem") || strings.HasPrefix(l, "tamahv: page-table") || strings.HasPrefix(l, "tamahv: breakpoint") || strings.HasPrefix(l, "tamahv: Go heap") {
			t.Log(l)
		}
	}
	for name, want := range map[string]string{
		"hypercall":        "hvguest: running under tamahv, hypercall interface version 1",
		"malformed calls":  "hvguest: malformed hypercalls answered with errors",
		"VMXON is #UD":     "hvguest: VMXON raised #UD (SIGILL)",
		"tamahv invisible": "hvguest: /dev/mem ",
		"kernel log":       "guest: kernel log clean",
		"swap on zram":     "guest: swap on zram",
		"swapread guest":   "swapread: tamahv read the range",
		"swapread hole":    "swapread: tamahv read the range but its hole",
		"ring-3 attacks":   fmt.Sprintf("hvguest: %d ring-3 attacks made, tamahv still answers", len(ring3Attacks)),
	} {
		t.Run(name, func(t *testing.T) {
			l, _, ok := res.GuestLine(want)
			assert.True(t, ok, "the guest did not print %q", want)
			assert.NotContains(t, l, "FAILED")
		})
	}
	t.Run("S3 refused", func(t *testing.T) { checkS3Refused(t, res) })
	t.Run("initrd in two parts", func(t *testing.T) {
		assert.Regexp(t, `initrd [0-9]+ bytes from 2 modules at 0x[0-9a-f]+,`, started)
		l, _, ok := res.GuestLine("guest: initrd part 2: ")
		assert.True(t, ok, "the guest did not find the initramfs's second part")
		assert.Equal(t, "guest: initrd part 2: 209715224 bytes, ending tamahv-initrd-part2-end", l, "200 MiB and the marker, whole")
		t.Log(started)
	})
	t.Run("memory types", func(t *testing.T) {
		l, _ := lineWith(res.Lines, "tamahv: memory types ")
		assert.Regexp(t, `^tamahv: memory types of the guest's non-RAM follow the MTRRs: (off|default (UC|WC|WT|WP|WB))`, l)
		t.Log(l)
	})
	t.Run("adversary kernel", func(t *testing.T) {
		if !withModule {
			t.Skip("kernel attacks skipped: " + why)
		}
		for _, a := range kernelAttacks {
			l, _, ok := res.GuestLine("tamahv-adversary: " + a + ":")
			if assert.True(t, ok, "no outcome for %s", a) {
				assert.Regexp(t, outcomeRE, l)
				t.Log(l)
			}
			_, _, ok = res.GuestLine("guest: tamahv answers after " + a)
			assert.True(t, ok, "tamahv did not answer after %s", a)
		}
	})
	t.Run("adversary ring 3", func(t *testing.T) {
		for _, a := range ring3Attacks {
			l, _, ok := res.GuestLine("hvguest: attack " + a + ":")
			if assert.True(t, ok, "no outcome for %s", a) {
				assert.Regexp(t, outcomeRE, l)
				t.Log(l)
			}
		}
		var after bool
		for _, l := range res.Guest {
			after = after || strings.HasPrefix(l, "hvguest: attack hcexit-ring3:")
			if after && strings.HasPrefix(l, "hvguest: running under tamahv") {
				return
			}
		}
		t.Error("hvguest identify not answered after the ring-3 attacks")
	})
	// swapmem: the guest pushed a 64-page buffer to zram swap and spun in
	// user mode (UserFault), then did the same looping on getppid
	// (BPFault); tamahv read each back and checked its SHA-256. Each
	// request's result is the next result line.
	var reads []string
	for i, l := range res.Lines {
		if !strings.HasPrefix(l, "tamahv: swapmem read of 262144 bytes") {
			continue
		}
		for _, r := range res.Lines[i+1:] {
			if strings.HasPrefix(r, "tamahv: swapmem read ok") || strings.HasPrefix(r, "tamahv: swapmem read FAILED") ||
				strings.HasPrefix(r, "tamahv: swapmem read partial") {
				reads = append(reads, r)
				break
			}
		}
	}
	for i, mode := range []string{"UserFault", "BPFault"} {
		t.Run("swapmem "+mode, func(t *testing.T) {
			require.Greater(t, len(reads), i, "tamahv:\n%s", res.Serial())
			ok := reads[i]
			assert.True(t, strings.HasPrefix(ok, "tamahv: swapmem read ok"), ok)
			l, _, _ := res.GuestLine("swapread: 262144 bytes")
			f := strings.Fields(l)
			require.GreaterOrEqual(t, len(f), 7)
			assert.Contains(t, ok, "sha256 "+f[6], "tamahv checked the hash the guest computed")
			assert.Contains(t, ok, "65 pages faulted in")
			t.Log(ok)
		})
	}
	// A 64-page range, swapped out, with 4 pages in the middle unmapped:
	// tamahv leaves the hole out, reads the rest and checks its hash;
	// the process lives on (its guest line above) and the kernel log
	// stays clean.
	t.Run("swapmem hole", func(t *testing.T) {
		l, _, ok := res.GuestLine("swapread: hole of 4 pages")
		require.True(t, ok, "guest:\n%s", tail(res.GuestSerial(), 30))
		f := strings.Fields(l)
		require.GreaterOrEqual(t, len(f), 14)
		partial, _ := lineWith(res.Lines, "tamahv: swapmem read partial")
		assert.Contains(t, partial, "sha256 "+f[len(f)-1], "tamahv checked the hash of the mapped parts")
		assert.Contains(t, partial, " 4 pages not mapped left out")
		var req string
		for _, r := range res.Lines {
			if strings.HasPrefix(r, "tamahv: swapmem read of") && strings.Contains(r, "pages not mapped skipped") {
				req = r
			}
		}
		assert.Contains(t, req, "4 pages not mapped skipped")
		t.Log(req)
		t.Log(partial)
	})
	// The guest runs with Linux's default mitigations: page-table
	// isolation on, which tamahv learnt.
	t.Run("page-table isolation", func(t *testing.T) {
		assert.Contains(t, res.GuestSerial(), "Kernel/User page tables isolation: enabled")
		if !withModule {
			t.Skip("tamahv's final report needs the guest's exit through the module")
		}
		l, _ := lineWith(res.Lines, "tamahv: page-table isolation")
		assert.True(t, strings.HasPrefix(l, "tamahv: page-table isolation on"), l)
		t.Log(l)
	})
	t.Run("breakpoint agent", func(t *testing.T) {
		if !withModule {
			t.Skip("tamahv's final report needs the guest's exit through the module")
		}
		l, _ := lineWith(res.Lines, "tamahv: breakpoint agent at")
		assert.Regexp(t, `agent at 0xffffffff[0-9a-f]+: \d+ hits, [1-9]\d* faults raised`, l)
		t.Log(l)
	})
}

// TestBochsOverhead boots the same guest without and with tamahv, one
// after the other, on one processor and then on two, and reports the
// wall time to init and the cost of CPUID inside the guest. On demand:
// make e2e-overhead.
func TestBochsOverhead(t *testing.T) {
	if os.Getenv("TAMAHV_E2E_OVERHEAD") == "" {
		t.Skip("overhead measurement runs on demand: make e2e-overhead")
	}
	iso := isoForTest(t)
	needEmulator(t, Bochs)
	native, err := filepath.Abs("../build/native.iso")
	require.NoError(t, err)
	done := func(l string) bool { return strings.HasPrefix(l, GuestPrefix+"hvguest: CPUID costs") }
	for _, cpus := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d processors", cpus), func(t *testing.T) {
			var at [2]time.Duration
			for i, img := range []string{native, iso} {
				res := bootUntil(t, Config{Emulator: Bochs, ISO: img, CPUs: cpus, Timeout: 6 * time.Minute}, done)
				_, a, ok := res.GuestLine("guest: init started")
				require.True(t, ok)
				at[i] = a
				cost, _, _ := res.GuestLine("hvguest: CPUID costs")
				up, _, _ := res.GuestLine("guest: init started")
				t.Logf("%s: init after %v of wall time (%s); %s", filepath.Base(img), a.Round(time.Millisecond), up, cost)
			}
			t.Logf("boot-to-init ratio under tamahv, %d processors: %.3f", cpus, float64(at[1])/float64(at[0]))
		})
	}
}

// TestBochsSwapmemCases runs the further swapmem cases on the Linux guest,
// each checked byte for byte (the guest sends the SHA-256 of what it
// expects): NoFault (completes once the guest touches the pages), a
// PreInject veto (nothing injected; completes the same way), WriteFault on
// pages shared copy-on-write after fork, a process exiting with its read
// pending (its read ends, served or failed; the next process's is served),
// a buffer that was a transparent huge page, two processes reading at
// once, a 16 MiB read (4,096 pages), pages of a private file mapping
// dropped from the page cache, a buffer a thread keeps writing during the
// read, and a process killed with SIGKILL while its read waits (its read
// ends; the next process's read is served). It logs each read's VM exits,
// preemption-timer exits and wall time per page. On demand: make
// e2e-swapmem.
func TestBochsSwapmemCases(t *testing.T) {
	if os.Getenv("TAMAHV_E2E_SWAPMEM") == "" {
		t.Skip("further swapmem cases run on demand: make e2e-swapmem")
	}
	needEmulator(t, Bochs)
	iso, err := filepath.Abs("../build/cases.iso")
	require.NoError(t, err)
	res := bootUntilHalted(t, Config{Emulator: Bochs, ISO: iso, Timeout: 15 * time.Minute})
	var reqs, results []string
	for _, l := range res.Lines {
		switch {
		case strings.HasPrefix(l, "tamahv: swapmem read of"):
			reqs = append(reqs, l)
		case strings.HasPrefix(l, "tamahv: swapmem read ok"), strings.HasPrefix(l, "tamahv: swapmem read FAILED"):
			results = append(results, l)
			t.Log(perPage(l))
		}
		if strings.HasPrefix(l, "tamahv: swapmem") || strings.HasPrefix(l, "tamahv: guest exited") {
			t.Log(l)
		}
	}
	for _, l := range res.Guest {
		if strings.HasPrefix(l, "swapread: ") {
			t.Log("guest: " + l)
		}
	}
	// The reads asked for, in order: user, bp, nofault, veto, cow, exit,
	// user, thp, pair (the peer's NoFault read, then this process's), the
	// 16 MiB read, file (NoFault), writer, kill (the victim's NoFault read,
	// then the later process's), hole.
	require.Len(t, reqs, 16, "user, bp, nofault, veto, cow, exit, user, thp, pair x2, 16 MiB, file, writer, kill x2, hole:\n%s\nguest:\n%s", res.Serial(), tail(res.GuestSerial(), 60))
	// Every read but the killed process's completes (the hole's read is
	// partial); the exiting process's read ends, served or failed (see
	// below); the killed process's read ends with its address space (or
	// by its deadline), not necessarily before the next read.
	require.Len(t, results, 15, "guest:\n%s", tail(res.GuestSerial(), 60))
	failed := 0
	for i, r := range results {
		switch {
		case i == 5:
			// The exiting process: tamahv serves its read before the
			// exit if it can (each #PF is taken at the instruction
			// after the hypercall), else the exit tears its address
			// space down (or leaves its pages not backed) and the
			// read fails.
			if strings.HasPrefix(r, "tamahv: swapmem read FAILED") {
				assert.Regexp(t, "went away|not backed", r)
			} else {
				assert.True(t, strings.HasPrefix(r, "tamahv: swapmem read ok"), r)
			}
		case i >= 13 && strings.HasPrefix(r, "tamahv: swapmem read FAILED"):
			failed++
		default:
			assert.True(t, strings.HasPrefix(r, "tamahv: swapmem read ok"), r)
		}
	}
	assert.Equal(t, 1, failed, "the killed process's read, and it only, fails")
	for _, r := range results[13:] {
		if strings.HasPrefix(r, "tamahv: swapmem read FAILED") {
			assert.Regexp(t, "went away|deadline", r, "the killed process's NoFault read ends with its address space or by its deadline")
		}
	}
	partial, _ := lineWith(res.Lines, "tamahv: swapmem read partial")
	assert.Contains(t, partial, "4 pages not mapped left out")
	assert.Contains(t, reqs[2], "(NoFault)")
	assert.Contains(t, results[2], " 0 #PFs injected", "NoFault injects nothing")
	assert.Contains(t, reqs[3], "every injection vetoed")
	assert.Contains(t, results[3], " 0 #PFs injected", "the veto held")
	assert.NotContains(t, results[3], " 0 vetoed")
	assert.Contains(t, reqs[4], "(UserFault|WriteFault)")
	assert.NotContains(t, results[4], " 0 #PFs injected", "copy-on-write broken by injected write faults")
	assert.Contains(t, reqs[7], "read of 2096952 bytes", "thp: 2 MiB less 200 bytes")
	assert.Contains(t, reqs[8], "(NoFault)", "pair: the peer's read")
	assert.Contains(t, reqs[10], "read of 16777216 bytes", "4,096 pages")
	assert.Contains(t, reqs[11], "(NoFault)", "file")
	assert.Contains(t, reqs[13], "(NoFault)", "kill: the victim's read")
	// Each case's own verdict, from the guest.
	for _, c := range []string{"thp", "pair", "file", "writer", "kill"} {
		l, _, ok := res.GuestLine("swapread: " + c + " ok")
		assert.True(t, ok, "%s:\nguest:\n%s", c, tail(res.GuestSerial(), 60))
		t.Log(l)
	}
	_, _, ok := res.GuestLine("swapread: tamahv read the range")
	assert.True(t, ok)
	_, _, ok = res.GuestLine("guest: kernel log clean")
	assert.True(t, ok, "guest:\n%s", tail(res.GuestSerial(), 30))
}

// readOK matches tamahv's "swapmem read ok" line.
var readOK = regexp.MustCompile(`read ok: sha256 [0-9a-f]+, (\d+) bytes, (\d+) pages faulted in, (\d+) #PFs injected, \d+ vetoed, (\d+) exits \((\d+) preemption timer\), (\S+) `)

// perPage returns a read's figures per page of its range: VM exits and
// wall time per page (tamahv's clock), and its preemption-timer exits. The
// #PFs injected are the engine's during the read, other reads' included.
func perPage(l string) string {
	m := readOK.FindStringSubmatch(l)
	if m == nil {
		return "figures: none (" + l + ")"
	}
	n := func(s string) float64 { f, _ := strconv.ParseFloat(s, 64); return f }
	// The pages the range covers: those faulted in, else (none missing)
	// its length in pages.
	pages := n(m[2])
	if pages == 0 {
		pages = math.Ceil(n(m[1]) / 4096)
	}
	d, err := time.ParseDuration(m[6])
	if err != nil {
		return "figures: bad duration " + m[6]
	}
	return fmt.Sprintf("figures: %.0f pages (%s faulted in, %s #PFs): %.2f exits a page, %v a page, %s preemption-timer exits",
		pages, m[2], m[3], n(m[4])/pages, (d / time.Duration(pages)).Round(time.Microsecond), m[5])
}

func TestPerPage(t *testing.T) {
	l := "tamahv: swapmem read ok: sha256 ab12, 262144 bytes, 65 pages faulted in, 65 #PFs injected, 0 vetoed, 130 exits (2 preemption timer), 130ms (flags 0)"
	assert.Equal(t, "figures: 65 pages (65 faulted in, 65 #PFs): 2.00 exits a page, 2ms a page, 2 preemption-timer exits", perPage(l))
	assert.Contains(t, perPage("tamahv: swapmem read FAILED: x"), "figures: none")
}
