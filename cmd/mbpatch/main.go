// Command mbpatch is the post-link step of the tamahv image: it writes a
// Multiboot 1 header with address fields into the ELF file's first 8 KiB
// and a Multiboot2 header into its first 32 KiB, so that GRUB can boot it
// with either protocol (multiboot or multiboot2) and keeps its modules and
// information structure out of tamahv's RAM region, then checks the
// result.
//
// Usage:
//
//	mbpatch -reserve-end 0x18000000 build/tamahv.elf
package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"

	"github.com/tamahv/tamahv/board/pc/multiboot"
	"github.com/tamahv/tamahv/board/pc/multiboot2"
)

func main() {
	end := flag.String("reserve-end", "0", "end of the memory the boot loader must leave to the image (tamahv's RAM end)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: mbpatch [-reserve-end ADDR] image.elf\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(flag.Arg(0), *end); err != nil {
		fmt.Fprintln(os.Stderr, "mbpatch:", err)
		os.Exit(1)
	}
}

func run(path, endArg string) error {
	end, err := strconv.ParseUint(endArg, 0, 64)
	if err != nil {
		return fmt.Errorf("-reserve-end: %w", err)
	}
	img, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	off, err := multiboot.Patch(img, end)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	off2, err := multiboot2.Patch(img, end)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := os.WriteFile(path, img, 0o755); err != nil {
		return err
	}
	h, _, _ := multiboot.Find(img)
	fmt.Printf("mbpatch: %s: Multiboot header at file offset %#x: load %#x-%#x, reserved to %#x, entry %#x\n",
		path, off, h.LoadAddr, h.LoadEndAddr, h.BSSEndAddr, h.EntryAddr)
	if _, _, err := multiboot2.Find(img); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	fmt.Printf("mbpatch: %s: Multiboot2 header at file offset %#x\n", path, off2)
	return nil
}
