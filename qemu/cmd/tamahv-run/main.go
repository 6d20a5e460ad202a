// Command tamahv-run boots the tamahv ISO in an emulator and shows its
// serial console on the terminal until tamahv halts, the emulator exits or
// the time limit passes. make run uses it.
//
// Usage:
//
//	tamahv-run [-emu bochs|tcg|kvm] [-uefi] [-model corei7_skylake_x] [-mem 1024] [-cpus 1] [-timeout 10m] build/tamahv.iso
//	tamahv-run -uefi -disk build/disk.img
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"time"

	"github.com/tamahv/tamahv/qemu"
)

func main() {
	emu := flag.String("emu", "bochs", "emulator: bochs (VMX with EPT), tcg (QEMU, no VMX) or kvm (QEMU with nested VMX)")
	model := flag.String("model", qemu.DefaultModel, "Bochs CPU model")
	mem := flag.Int("mem", qemu.DefaultMemMiB, "memory in MiB")
	cpus := flag.Int("cpus", 1, "processors")
	timeout := flag.Duration("timeout", 10*time.Minute, "time limit")
	stall := flag.Duration("stall", qemu.DefaultStall, "end the run when neither console says anything for this long")
	dir := flag.String("logs", "", "directory for the serial log and the emulator's logs (default: a new temporary one)")
	uefi := flag.Bool("uefi", false, "boot on OVMF (UEFI) instead of the BIOS")
	disk := flag.Bool("disk", false, "the image is a disk (tamahv-disk), not an ISO")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: tamahv-run [flags] tamahv.iso")
		flag.PrintDefaults()
		os.Exit(2)
	}
	e, err := qemu.ParseEmulator(*emu)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt)
	defer cancel()
	c := qemu.Config{Emulator: e, Model: *model, MemMiB: *mem, CPUs: *cpus, Timeout: *timeout, Stall: *stall, Dir: *dir, UEFI: *uefi}
	if *disk {
		c.Disk = flag.Arg(0)
	} else {
		c.ISO = flag.Arg(0)
	}
	fmt.Fprintf(os.Stderr, "tamahv-run: booting %s in %s (time limit %v, %v without output)\n", flag.Arg(0), describe(c), *timeout, *stall)
	res, err := qemu.Run(ctx, c, os.Stdout, func(l string) bool { return l == "tamahv: halted" })
	if res != nil {
		fmt.Fprintf(os.Stderr, "tamahv-run: %v elapsed; logs in %s\n", res.Elapsed.Round(time.Millisecond), res.Dir)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tamahv-run:", err)
		os.Exit(1)
	}
}

func describe(c qemu.Config) string {
	switch c.Emulator {
	case qemu.Bochs:
		return fmt.Sprintf("Bochs (%s, VMX with EPT, %d processors)", c.Model, c.CPUs)
	case qemu.KVM:
		return "QEMU with KVM and nested VMX"
	}
	return "QEMU TCG (no VMX)"
}
