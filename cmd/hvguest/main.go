// Command hvguest runs inside tamahv's Linux guest (a static linux/amd64
// binary in the initramfs) and checks the hypervisor from there.
//
// Usage:
//
//	hvguest identify      ask tamahv who it is (VMCALL)
//	hvguest badcall       make malformed hypercalls; tamahv must answer errors
//	hvguest vmxon-check   run VMXON in a child process; it must die of #UD (SIGILL)
//	hvguest devmem        read tamahv's secret page through /dev/mem; none of it may show
//	hvguest cpuid-cost    measure CPUID in TSC ticks (an exit under tamahv)
//	hvguest call-cost     measure a hypercall (HcIdentify) in TSC ticks
//	hvguest swapread MODE [PAGES]
//	                      fill a buffer, push it to swap, and have tamahv read it
//	                      through swapmem without touching it; MODE user spins in
//	                      user mode (UserFault), bp loops on getppid (BPFault),
//	                      nofault waits for the pages to be touched (NoFault)
//	hvguest swapmigrate user|bp FROM TO [PAGES]
//	                      the same read (UserFault or BPFault), sent on processor
//	                      FROM; the process moves to processor TO before it waits
//	hvguest attack [NAME...]
//	                      make the ring-3 attacks on tamahv (all, or those named),
//	                      each in a child process; one line per attack
//	hvguest innocent      make a few exits in user mode and end (a process
//	                      that asks tamahv for nothing)
//	hvguest sleep-s3      write S3's SLP_TYP and SLP_EN to the PM1a control
//	                      register through /dev/port; tamahv drops it
//	hvguest sleep-pmbase  move the chipset's PM base through PCI
//	                      configuration space; tamahv drops the write
//	hvguest exit N        end the guest with status N (tamahv refuses it
//	                      from ring 3; the guest's init ends through its
//	                      kernel module)
package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/vmx"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: hvguest identify|badcall|vmxon-check|devmem|cpuid-cost|call-cost|swapread MODE [PAGES]|swapmigrate user|bp FROM TO [PAGES]|attack [NAME...]|sleep-s3|sleep-pmbase|exit N")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2:]); err != nil {
		fmt.Printf("hvguest: %s FAILED: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// cpuidTicks is in cpuid_amd64.s.
func cpuidTicks(n uint64) uint64

// tsc reads the time-stamp counter (cpuid_amd64.s).
func tsc() uint64

func run(cmd string, args []string) error {
	switch cmd {
	case "identify":
		r := vmx.VMCALL(hcall.Identify, 0, 0)
		if r&^0xffff != hcall.Magic&^0xffff {
			return fmt.Errorf("hypercall identify answered %#x", r)
		}
		fmt.Printf("hvguest: running under tamahv, hypercall interface version %d\n", r&0xffff)
	case "badcall":
		if r := vmx.VMCALL(0xbad0, 1, 2); r != hcall.Unknown {
			return fmt.Errorf("unknown hypercall answered %#x", r)
		}
		// From ring 3 the exit hypercall is refused whatever its argument
		// unless tamahv's command line opts in (hc.ring3=exit).
		if r := vmx.VMCALL(hcall.Exit, 1000, 0); r != hcall.Invalid && r != hcall.Denied {
			return fmt.Errorf("exit with status 1000 answered %#x", r)
		}
		fmt.Println("hvguest: malformed hypercalls answered with errors")
	case "vmxon":
		_ = vmx.VMXON(0) // must not return: #UD
		fmt.Println("hvguest: VMXON returned")
	case "vmxon-check":
		out, err := exec.Command("/proc/self/exe", "vmxon").CombinedOutput()
		if err == nil || !bytes.Contains(out, []byte("SIGILL")) {
			return fmt.Errorf("VMXON child: %v: %s", err, out)
		}
		fmt.Println("hvguest: VMXON raised #UD (SIGILL)")
	case "devmem":
		pa := vmx.VMCALL(hcall.Secret, 0, 0)
		f, err := os.Open("/dev/mem")
		if err != nil {
			fmt.Printf("hvguest: /dev/mem unavailable (%v): tamahv's memory not visible\n", err)
			return nil
		}
		defer f.Close()
		b := make([]byte, 4096)
		if _, err := f.ReadAt(b, int64(pa)); err != nil {
			fmt.Printf("hvguest: /dev/mem refused %#x (%v): tamahv's memory not visible\n", pa, err)
			return nil
		}
		if n := bytes.Count(b, []byte{hcall.SecretByte}); n == len(b) {
			return fmt.Errorf("tamahv's secret page at %#x is readable", pa)
		}
		fmt.Printf("hvguest: /dev/mem at %#x shows none of tamahv's bytes\n", pa)
	case "innocent":
		innocent()
	case "cpuid-cost":
		const n = 2000
		cpuidTicks(100) // warm up
		fmt.Printf("hvguest: CPUID costs %d TSC ticks\n", cpuidTicks(n)/n)
	case "call-cost":
		// A hypercall's round trip: on an application processor, its
		// exit is handed over to the bootstrap processor.
		const n = 200
		for i := 0; i < 10; i++ {
			vmx.VMCALL(hcall.Identify, 0, 0)
		}
		t0 := tsc()
		for i := 0; i < n; i++ {
			vmx.VMCALL(hcall.Identify, 0, 0)
		}
		fmt.Printf("hvguest: a hypercall costs %d TSC ticks\n", (tsc()-t0)/n)
	case "sleep-s3":
		return sleepS3()
	case "sleep-pmbase":
		return sleepPMBase()
	case "swapread":
		return swapRead(args)
	case "swapmigrate":
		return swapMigrate(args)
	case "attack":
		return attack(args)
	case "exit":
		status := 0
		if len(args) > 0 {
			n, err := strconv.Atoi(args[0])
			if err != nil {
				return err
			}
			status = n
		}
		vmx.VMCALL(hcall.Exit, uint64(status), 0)
		return fmt.Errorf("still running after the exit hypercall")
	default:
		return fmt.Errorf("unknown command %q", cmd)
	}
	return nil
}
