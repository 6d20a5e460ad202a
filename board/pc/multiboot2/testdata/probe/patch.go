// Command patch writes the Multiboot 1 and Multiboot2 headers into the
// probe's ELF file, as tamahv's image build does with its own: the same
// reserved end, the same header contents.
//
// Usage (from the module root):
//
//	go run ./board/pc/multiboot2/testdata/probe/patch.go probe.elf
package main

import (
	"fmt"
	"os"

	"github.com/tamahv/tamahv/board/pc/multiboot"
	"github.com/tamahv/tamahv/board/pc/multiboot2"
)

// reserveEnd is tamahv's RAM region end (board/pc/layout.go RAMEnd).
const reserveEnd = 0x18000000

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: patch probe.elf")
		os.Exit(2)
	}
	if err := run(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "patch:", err)
		os.Exit(1)
	}
}

func run(path string) error {
	img, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	off1, err := multiboot.Patch(img, reserveEnd)
	if err != nil {
		return err
	}
	off2, err := multiboot2.Patch(img, reserveEnd)
	if err != nil {
		return err
	}
	fmt.Printf("patch: %s: Multiboot header at %#x, Multiboot2 header at %#x\n", path, off1, off2)
	return os.WriteFile(path, img, 0o644)
}
