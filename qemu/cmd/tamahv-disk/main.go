// Command tamahv-disk writes a disk image laid out as an installed Debian
// that boots on UEFI (qemu.Disk): an EFI system partition with GRUB EFI,
// and an ext4 root file system whose /boot holds the kernel, its
// initramfs, tamahv and the configuration install/42_tamahv makes, and a
// small system (busybox, hvguest, an /sbin/init) that the guest runs from
// the disk once its initramfs mounted it. It needs no root. make disk uses it; boot the result with tamahv-run -uefi -disk.
//
// Usage:
//
//	tamahv-disk -kernel build/payload/vmlinuz -initrd build/payload/initrd.gz -image build/tamahv.elf -version 6.1.0-57-amd64 build/disk.img
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/tamahv/tamahv/qemu"
)

func main() {
	var d qemu.Disk
	flag.StringVar(&d.Kernel, "kernel", "build/payload/vmlinuz", "the Linux kernel (bzImage)")
	flag.StringVar(&d.Initrd, "initrd", "build/payload/initrd.gz", "its initramfs")
	flag.StringVar(&d.Image, "image", "build/tamahv.elf", "tamahv's image")
	flag.StringVar(&d.Version, "version", "", "the kernel's version (/boot/vmlinuz-VERSION)")
	flag.StringVar(&d.Script, "script", "install/42_tamahv", "tamahv's grub-mkconfig script")
	settings := flag.String("settings", "install/default", "the settings file (/etc/default/tamahv)")
	flag.StringVar(&d.Cmdline, "cmdline", "", "GRUB_CMDLINE_LINUX: the kernel command line of the system's own entries")
	flag.StringVar(&d.UUID, "uuid", "2a4e2d1f-7a11-4b2b-9c55-1d0e6b0ca5e7", "the root file system's UUID")
	busybox := flag.String("busybox", "build/payload/root/bin/busybox", "busybox, for the root file system's /sbin/init")
	hvguest := flag.String("hvguest", "build/payload/root/bin/hvguest", "hvguest, for the root file system")
	flag.Parse()
	if flag.NArg() != 1 || d.Version == "" {
		fmt.Fprintln(os.Stderr, "usage: tamahv-disk [flags] -version VERSION disk.img")
		flag.PrintDefaults()
		os.Exit(2)
	}
	if why := qemu.DiskPrerequisite(); why != "" {
		fmt.Fprintln(os.Stderr, "tamahv-disk:", why)
		os.Exit(1)
	}
	b, err := os.ReadFile(*settings)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tamahv-disk:", err)
		os.Exit(1)
	}
	d.Settings = string(b)
	if d.Files, err = qemu.GuestRoot(*busybox, *hvguest, d.UUID); err != nil {
		fmt.Fprintln(os.Stderr, "tamahv-disk:", err)
		os.Exit(1)
	}
	work, err := os.MkdirTemp("", "tamahv-disk-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "tamahv-disk:", err)
		os.Exit(1)
	}
	defer os.RemoveAll(work)
	id, err := d.Build(work, flag.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, "tamahv-disk:", err)
		os.Exit(1)
	}
	fmt.Printf("tamahv-disk: %s: boots %s (GRUB's default in the image)\n", flag.Arg(0), id)
}
