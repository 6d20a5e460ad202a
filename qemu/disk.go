package qemu

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Disk describes a disk image laid out as an installed Debian that boots
// on UEFI: a GPT with an EFI system partition holding GRUB EFI
// (EFI/BOOT/BOOTX64.EFI, which finds the root file system by its UUID)
// and an ext4 root file system whose /boot holds the kernel, its
// initramfs, tamahv's image in /boot/tamahv and GRUB's configuration, made
// by install/42_tamahv as update-grub would.
type Disk struct {
	Kernel, Initrd, Image string // the files to install
	Version               string // the kernel's version (vmlinuz-VERSION)
	Script                string // install/42_tamahv
	Settings              string // /etc/default/tamahv's contents
	// Cmdline is GRUB_CMDLINE_LINUX: what the system's own entries give
	// the kernel (42_tamahv adds root=UUID=… ro in front).
	Cmdline string
	// UUID is the root file system's.
	UUID string
	// Files are more files for the root file system (beside /boot), each
	// with its path there, contents and mode; the directories /dev, /proc
	// and /sys are made as mount points.
	Files []DiskFile
}

// DiskFile is a file of a disk image's root file system.
type DiskFile struct {
	Path string
	Data []byte
	Mode os.FileMode
}

// Partition sizes, in 512-byte sectors.
const (
	diskStart   = 2048
	espSectors  = 16 << 11  // 16 MiB
	rootSectors = 128 << 11 // 128 MiB
	diskTail    = 2048      // the backup GPT
)

// The geometry Bochs is given for a disk image: 16 heads, 63 sectors a
// track, as many cylinders as the image holds.
const (
	diskHeads = 16
	diskSPT   = 63
)

// DiskGeometry returns the cylinders of a disk image of size bytes.
func DiskGeometry(size int64) (cylinders int64) { return size / 512 / (diskHeads * diskSPT) }

// DiskPrerequisite says which tool the disk image needs and lacks ("" when
// none): none of them needs root, a loop device or a mount.
func DiskPrerequisite() string {
	for _, p := range []struct{ prog, pkg string }{
		{"sfdisk", "fdisk"}, {"mke2fs", "e2fsprogs"}, {"mformat", "mtools"}, {"mcopy", "mtools"}, {"mmd", "mtools"},
		{"grub-mkimage", "grub-common"}, {"sh", "dash"},
	} {
		if _, err := exec.LookPath(p.prog); err != nil {
			return fmt.Sprintf("%s is not installed (Debian package %s)", p.prog, p.pkg)
		}
	}
	if _, err := os.Stat("/usr/lib/grub/x86_64-efi/normal.mod"); err != nil {
		return "GRUB's EFI modules are not installed (Debian package grub-efi-amd64-bin)"
	}
	return ""
}

// Build writes the disk image to out, working in dir. It returns the
// entry id of the newest kernel's tamahv entry (GRUB's default in the
// image, as make try would choose it for one boot).
func (d *Disk) Build(dir, out string) (string, error) {
	if d.UUID == "" || d.Version == "" {
		return "", errors.New("qemu: disk: no UUID or kernel version")
	}
	tree := filepath.Join(dir, "root")
	boot := filepath.Join(tree, "boot")
	for _, f := range []struct{ src, dst string }{
		{d.Kernel, "vmlinuz-" + d.Version}, {d.Initrd, "initrd.img-" + d.Version}, {d.Image, "tamahv/tamahv.elf"},
	} {
		if err := copyFile(f.src, filepath.Join(boot, f.dst)); err != nil {
			return "", err
		}
	}
	for _, d := range []string{"dev", "proc", "sys"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			return "", err
		}
	}
	for _, f := range d.Files {
		p := filepath.Join(tree, filepath.Clean("/"+f.Path))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return "", err
		}
		if err := os.WriteFile(p, f.Data, f.Mode); err != nil {
			return "", err
		}
	}
	settings := filepath.Join(dir, "tamahv.settings")
	if err := os.WriteFile(settings, []byte(d.Settings), 0o644); err != nil {
		return "", err
	}
	// What grub-mkconfig_lib gives the script: paths relative to the root
	// file system, and the device already found (the EFI image's search).
	lib := filepath.Join(dir, "grub-mkconfig_lib")
	libText := "make_system_path_relative_to_its_root () { echo \"$1\" | sed -e \"s,^" + tree + ",,\" ; }\n" +
		"prepare_grub_to_access_device () { : ; }\nversion_sort () { sort -V \"$@\" ; }\n"
	if err := os.WriteFile(lib, []byte(libText), 0o644); err != nil {
		return "", err
	}
	cmd := exec.Command("sh", d.Script)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "TAMAHV_BOOT=" + boot, "TAMAHV_GRUB_LIB=" + lib, "TAMAHV_SETTINGS=" + settings,
		"GRUB_DEVICE_UUID=" + d.UUID, "GRUB_DISTRIBUTOR=Debian", "GRUB_CMDLINE_LINUX=" + d.Cmdline}
	entries, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("qemu: disk: %s: %w", d.Script, err)
	}
	id := "tamahv-" + d.Version
	if !bytes.Contains(entries, []byte("--id '"+id+"'")) {
		return "", fmt.Errorf("qemu: disk: %s made no entry %s:\n%s", d.Script, id, entries)
	}
	header := "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\nset timeout=0\nset default=\"" + id + "\"\n"
	if err := os.MkdirAll(filepath.Join(boot, "grub"), 0o755); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(boot, "grub", "grub.cfg"), append([]byte(header), entries...), 0o644); err != nil {
		return "", err
	}

	// GRUB EFI with a configuration of its own that finds the root file
	// system, as Debian's signed GRUB does.
	embed := filepath.Join(dir, "embed.cfg")
	if err := os.WriteFile(embed, []byte("search --no-floppy --fs-uuid --set=root "+d.UUID+"\nset prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n"), 0o644); err != nil {
		return "", err
	}
	efi := filepath.Join(dir, "BOOTX64.EFI")
	rootImg, espImg := filepath.Join(dir, "root.img"), filepath.Join(dir, "esp.img")
	steps := [][]string{
		{"grub-mkimage", "-O", "x86_64-efi", "-p", "/boot/grub", "-c", embed, "-o", efi,
			"part_gpt", "fat", "ext2", "normal", "configfile", "search", "search_fs_uuid", "multiboot2", "serial", "terminal", "echo", "test", "sleep", "gzio", "all_video"},
		// GRUB 2.06 reads ext4 without these newer features.
		{"mke2fs", "-q", "-F", "-t", "ext4", "-O", "^orphan_file,^metadata_csum_seed", "-U", d.UUID, "-d", tree, rootImg, fmt.Sprintf("%dk", rootSectors/2)},
		{"mformat", "-i", espImg, "-C", "-T", fmt.Sprint(espSectors), "-h", "16", "-s", "63", "::"},
		{"mmd", "-i", espImg, "::/EFI", "::/EFI/BOOT"},
		{"mcopy", "-i", espImg, efi, "::/EFI/BOOT/BOOTX64.EFI"},
	}
	for _, s := range steps {
		if b, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			return "", fmt.Errorf("qemu: disk: %s: %w\n%s", strings.Join(s, " "), err, b)
		}
	}
	// Whole cylinders of 16 heads and 63 sectors, as Bochs wants a flat
	// image (DiskGeometry).
	total := int64(diskStart + espSectors + rootSectors + diskTail)
	total = (total + diskHeads*diskSPT - 1) / (diskHeads * diskSPT) * (diskHeads * diskSPT)
	f, err := os.Create(out)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := f.Truncate(total * 512); err != nil {
		return "", err
	}
	layout := fmt.Sprintf("label: gpt\nstart=%d, size=%d, type=uefi\nstart=%d, size=%d, type=linux\n",
		diskStart, espSectors, diskStart+espSectors, rootSectors)
	sf := exec.Command("sfdisk", "--quiet", out)
	sf.Stdin = strings.NewReader(layout)
	if b, err := sf.CombinedOutput(); err != nil {
		return "", fmt.Errorf("qemu: disk: sfdisk: %w\n%s", err, b)
	}
	for _, p := range []struct {
		img string
		at  int64
	}{{espImg, diskStart}, {rootImg, diskStart + espSectors}} {
		b, err := os.ReadFile(p.img)
		if err != nil {
			return "", err
		}
		if _, err := f.WriteAt(b, p.at*512); err != nil {
			return "", err
		}
	}
	return id, f.Close()
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}

// guestRootInit is /sbin/init of the test guest's root file system: it
// says that the guest runs from its root disk, runs hvguest's checks of
// tamahv that need no swap (identify, badcall, vmxon-check, devmem,
// cpuid-cost), and powers the machine off. Its file system is read-only:
// busybox is called by name.
const guestRootInit = `#!/bin/busybox sh
# /sbin/init of tamahv's test disk (qemu.GuestRoot): the guest's root file
# system, mounted from the disk by its initramfs.
bb=/bin/busybox
echo "guest: running from the root disk: $($bb cat /etc/tamahv-disk), / is $($bb awk '$2 == "/" { d = $1 " " $3 " " $4 } END { print d }' /proc/mounts)"
for c in identify badcall vmxon-check devmem cpuid-cost; do
	/bin/hvguest $c
done
echo "guest: root disk checks done"
$bb sleep 1
$bb poweroff -f
`

// GuestRoot returns the files of the test guest's root file system (for
// Disk.Files): busybox and hvguest from the paths given, an /sbin/init
// that reports it runs from the disk, runs hvguest's checks and powers off,
// and /etc/tamahv-disk naming the file system by its UUID.
func GuestRoot(busybox, hvguest, uuid string) ([]DiskFile, error) {
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return nil, err
	}
	hg, err := os.ReadFile(hvguest)
	if err != nil {
		return nil, err
	}
	return []DiskFile{
		{Path: "bin/busybox", Data: bb, Mode: 0o755},
		{Path: "bin/hvguest", Data: hg, Mode: 0o755},
		{Path: "sbin/init", Data: []byte(guestRootInit), Mode: 0o755},
		{Path: "etc/tamahv-disk", Data: []byte("tamahv's test disk, root file system UUID=" + uuid + "\n"), Mode: 0o644},
	}, nil
}
