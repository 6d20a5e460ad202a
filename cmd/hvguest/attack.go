package main

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// The ring-3 half of the guest adversary: every attack an unprivileged
// process can make on tamahv according to the trust-boundary review
// (findings 4-8). Each attack runs in a child process of its own (its own
// address space, so per-address-space swap state starts clean) and prints
// one line:
//
//	hvguest: attack <name>: refused|survived|FAILED (<detail>)
//
// "refused": tamahv answered with the error its hypercall policy
// prescribes; "survived": the action ran and tamahv still answers;
// "FAILED": tamahv answered wrongly.

// Hypercall errors as the guest sees them.
const (
	errDenied  = hcall.Denied
	errInvalid = hcall.Invalid
	errBusy    = hcall.Busy
)

// attacks are the ring-3 attacks in the order they run.
var attacks = []struct {
	name string
	run  func() (verdict, detail string)
}{
	{"hash-kernel-va", attackHashKernel},
	{"request-in-kernel", attackRequestInKernel},
	{"kernelfault-option", func() (string, string) { return attackOption("KernelFault", uint64(swapmem.KernelFault), swapped) }},
	{"option-0", func() (string, string) { return attackOption("no option", 0, swapped) }},
	{"bpfault-kernel-va", attackBPFaultKernel},
	{"bpfault-unmapped", func() (string, string) { return attackOption("BPFault", uint64(swapmem.BPFault), unmapped) }},
	{"bpfault-prot-none", func() (string, string) { return attackOption("BPFault", uint64(swapmem.BPFault), protNone) }},
	{"nofault-left-pending", attackNoFaultPending},
	{"mxcsr-unmasked", attackMXCSR},
	{"hcexit-ring3", attackExit},
	{"nofault-large-reads", attackLargeReads},
	{"slots-held", attackSlots},
	{"writefault-dead-process", attackWriteFaultDead},
	{"exit-storm", attackExitStorm},
}

// unmaskedSpin is in mxcsr_amd64.s.
func unmaskedSpin(mxcsr uint32, fcw uint16, cpuids, ticks uint64) (exits uint64)

func errName(r uint64) string {
	switch r {
	case 0:
		return "0"
	case errDenied:
		return "-13 EACCES"
	case errInvalid:
		return "-22 EINVAL"
	case errBusy:
		return "-16 EBUSY"
	case hcall.Unknown:
		return "-1"
	}
	return fmt.Sprintf("%#x", r)
}

func statusName(s uint64) string {
	switch s {
	case hcall.StatusPending:
		return "pending"
	case hcall.StatusOK:
		return "ok"
	case hcall.StatusFailed:
		return "failed"
	}
	return errName(s)
}

// attack runs every ring-3 attack (or the named ones), each in a child
// process, and fails if one of them was answered wrongly.
func attack(names []string) error {
	if len(names) > 0 && names[0] == "one" {
		if len(names) < 2 {
			return errors.New("attack one NAME")
		}
		return attackOne(names[1])
	}
	if len(names) == 1 && names[0] == "list" {
		for _, a := range attacks {
			fmt.Println(a.name)
		}
		return nil
	}
	if len(names) == 0 {
		for _, a := range attacks {
			names = append(names, a.name)
		}
	}
	var failed []string
	for _, name := range names {
		out, err := exec.Command("/proc/self/exe", "attack", "one", name).CombinedOutput()
		line := ""
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if strings.HasPrefix(l, "hvguest: attack ") {
				line = l
			} else if l != "" {
				fmt.Println(l)
			}
		}
		switch {
		case line == "":
			line = fmt.Sprintf("hvguest: attack %s: FAILED (no outcome: %v)", name, err)
		case err != nil && !strings.Contains(line, ": FAILED "):
			line = fmt.Sprintf("hvguest: attack %s: FAILED (%v after %q)", name, err, line)
		}
		fmt.Println(line)
		if strings.Contains(line, ": FAILED ") {
			failed = append(failed, name)
		}
		if r := vmx.VMCALL(hcall.Identify, 0, 0); r&^0xffff != hcall.Magic&^0xffff {
			return fmt.Errorf("tamahv no longer answers after %s (%#x)", name, r)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("tamahv answered wrongly: %s", strings.Join(failed, ", "))
	}
	fmt.Printf("hvguest: %d ring-3 attacks made, tamahv still answers\n", len(names))
	return nil
}

func attackOne(name string) error {
	for _, a := range attacks {
		if a.name == name {
			verdict, detail := a.run()
			fmt.Printf("hvguest: attack %s: %s (%s)\n", name, verdict, detail)
			if verdict == "FAILED" {
				os.Exit(1)
			}
			return nil
		}
	}
	return fmt.Errorf("unknown attack %q", name)
}

// request builds a swap request for n bytes at va.
func newRequest(va uint64, n int, opts uint64, want [32]byte) *[hcall.SwapRequestSize]byte {
	b := hcall.SwapRequest{VA: va, Len: uint64(n), Options: opts, SHA256: want}.Encode()
	return &b
}

func sendRequest(req *[hcall.SwapRequestSize]byte) uint64 {
	return vmx.VMCALL(hcall.SwapRead, uint64(uintptr(unsafe.Pointer(req))), hcall.SwapRequestSize)
}

// waitStatus asks HcSwapStatus until the caller's read is no longer
// pending or limit has passed.
func waitStatus(limit time.Duration) (uint64, time.Duration) {
	start := time.Now()
	for {
		s := vmx.VMCALL(hcall.SwapStatus, 0, 0)
		if s != hcall.StatusPending || time.Since(start) > limit {
			return s, time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kernelZeroPage is the address of the kernel's empty_zero_page (4 KiB of
// zeros: a guess of kernel memory that is right), from /proc/kallsyms.
func kernelZeroPage() uint64 {
	b, err := os.ReadFile("/proc/kallsyms")
	if err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			f := strings.Fields(l)
			if len(f) >= 3 && f[2] == "empty_zero_page" {
				if a, err := strconv.ParseUint(f[0], 16, 64); err == nil && a != 0 {
					return a
				}
			}
		}
	}
	return 0xffffffff81000000
}

// refusal judges a hypercall's answer that policy says must be an error.
func refusal(what string, r uint64, allowed ...uint64) (string, string) {
	for _, a := range allowed {
		if r == a {
			return "refused", fmt.Sprintf("%s: %s", what, errName(r))
		}
	}
	if r == 0 {
		s, took := waitStatus(30 * time.Second)
		return "FAILED", fmt.Sprintf("%s accepted; status %s after %v", what, statusName(s), took.Round(time.Millisecond))
	}
	return "FAILED", fmt.Sprintf("%s: %s", what, errName(r))
}

// attackHashKernel asks for reads of kernel memory with hashes that are
// right guesses (finding 6): 4 KiB and 1 byte of the kernel's zero page.
func attackHashKernel() (string, string) {
	zp := kernelZeroPage()
	for _, n := range []int{4096, 1} {
		want := sha256.Sum256(make([]byte, n))
		req := newRequest(zp, n, uint64(swapmem.UserFault), want)
		if v, d := refusal(fmt.Sprintf("%d bytes at kernel %#x with the right hash", n, zp), sendRequest(req), errDenied); v != "refused" {
			return v, d
		}
	}
	return "refused", fmt.Sprintf("reads of kernel %#x (4096 and 1 bytes, right guesses): -13 EACCES", zp)
}

// attackRequestInKernel names a request structure in kernel memory.
func attackRequestInKernel() (string, string) {
	zp := kernelZeroPage()
	return refusal(fmt.Sprintf("request structure at kernel %#x", zp),
		vmx.VMCALL(hcall.SwapRead, zp, hcall.SwapRequestSize), errDenied)
}

// attackBPFaultKernel asks for a BPFault read of kernel memory (finding 7).
func attackBPFaultKernel() (string, string) {
	zp := kernelZeroPage()
	req := newRequest(zp, 64, uint64(swapmem.BPFault), sha256.Sum256(make([]byte, 64)))
	return refusal(fmt.Sprintf("BPFault read of kernel %#x", zp), sendRequest(req), errDenied)
}

// pageOut pushes the span pages at base to swap (MADV_PAGEOUT) and
// returns how many are swapped out. It asks again, after a pause that
// grows, while some are not: the kernel skips pages it is busy with, and
// the swap device may need a moment to make room.
func pageOut(base uintptr, span int) (int, error) {
	swapped := 0
	for try := 0; try < 20 && swapped < span; try++ {
		if try > 0 {
			time.Sleep(time.Duration(try) * 10 * time.Millisecond)
		}
		if _, _, e := syscall.Syscall(syscall.SYS_MADVISE, base, uintptr(span*pageSize), madvPageout); e != 0 {
			return 0, fmt.Errorf("madvise(MADV_PAGEOUT): %v", e)
		}
		var err error
		if swapped, _, err = pagemap(base, span); err != nil {
			return 0, err
		}
	}
	return swapped, nil
}

// swappedOut maps pages+1 pages, fills them and pushes them to swap; it
// returns the range (starting mid-page), its hash and the mapping.
func swappedOut(pages int) (mem []byte, va uint64, n int, want [32]byte, err error) {
	span := pages + 1
	mem, err = syscall.Mmap(-1, 0, span*pageSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		return nil, 0, 0, want, err
	}
	base := uintptr(unsafe.Pointer(&mem[0]))
	const off = 100
	n = pages*pageSize + 200 - 2*off
	rand.New(rand.NewSource(int64(pages) + int64(os.Getpid()))).Read(mem[off : off+n])
	want = sha256.Sum256(mem[off : off+n])
	swapped, err := pageOut(base, span)
	if err != nil {
		return nil, 0, 0, want, err
	}
	if swapped < span {
		return nil, 0, 0, want, fmt.Errorf("only %d of %d pages went to swap", swapped, span)
	}
	return mem, uint64(base) + off, n, want, nil
}

// Where attackOption's read points.
const (
	swapped  = iota // the process's own swapped-out pages
	unmapped        // an address with no mapping at all
	protNone        // a page the process touched, then made PROT_NONE
)

// attackOption asks for a read of the process's own memory with options
// ring 3 may not use, or with BPFault (granted by hc.ring3=bpfault) where
// a fault raised in the kernel cannot be served (finding 7): Linux would
// oops on a kernel-mode fault at an address with no VMA or no access.
func attackOption(what string, opts uint64, where int) (string, string) {
	var va uint64
	var n int
	var want [32]byte
	switch where {
	case unmapped, protNone:
		mem, err := syscall.Mmap(-1, 0, 16*pageSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
		if err != nil {
			return "FAILED", err.Error()
		}
		va = uint64(uintptr(unsafe.Pointer(&mem[0]))) + 8*pageSize
		n = pageSize
		if where == unmapped {
			err = syscall.Munmap(mem)
		} else {
			mem[8*pageSize] = 1
			want = sha256.Sum256(mem[8*pageSize : 9*pageSize])
			err = syscall.Mprotect(mem[8*pageSize:9*pageSize], syscall.PROT_NONE)
			defer syscall.Munmap(mem)
		}
		if err != nil {
			return "FAILED", err.Error()
		}
		if where == unmapped {
			want = sha256.Sum256(make([]byte, n))
		}
	default:
		mem, v, l, w, err := swappedOut(4)
		if err != nil {
			return "FAILED", err.Error()
		}
		defer syscall.Munmap(mem)
		va, n, want = v, l, w
	}
	desc := map[int]string{swapped: "swapped-out user pages", unmapped: "an unmapped user address", protNone: "a PROT_NONE user page"}[where]
	r := sendRequest(newRequest(va, n, opts, want))
	if r == errDenied || r == errInvalid {
		return "refused", fmt.Sprintf("%s read of %s %#x: %s", what, desc, va, errName(r))
	}
	if r != 0 || where == swapped {
		return refusal(fmt.Sprintf("%s read of %s %#x", what, desc, va), r, errDenied)
	}
	// A BPFault read the policy lets through (hc.ring3=bpfault): the
	// process makes system calls, where the fault would be raised; the
	// read must end in a failure, the kernel unharmed.
	start := time.Now()
	s := uint64(hcall.StatusPending)
	for i := 0; s == hcall.StatusPending && time.Since(start) < 60*time.Second; i++ {
		syscall.Getppid()
		if i%1024 == 0 {
			s = vmx.VMCALL(hcall.SwapStatus, 0, 0)
		}
	}
	if s != hcall.StatusFailed {
		return "FAILED", fmt.Sprintf("%s read of %s %#x accepted; status %s after %v", what, desc, va, statusName(s), time.Since(start).Round(time.Millisecond))
	}
	return "survived", fmt.Sprintf("%s read of %s %#x accepted, ended failed after %v", what, desc, va, time.Since(start).Round(time.Millisecond))
}

// attackNoFaultPending leaves a NoFault read of a swapped-out page pending
// in one process and has another process read its own memory (finding 8):
// the second read must be served, the first must end by tamahv's
// deadline.
func attackNoFaultPending() (string, string) {
	if len(os.Args) > 4 && os.Args[4] == "hold" {
		return holdNoFault()
	}
	h, err := startHolder("nofault-left-pending", "hold")
	if err != nil {
		return "FAILED", err.Error()
	}
	if h.first != "hold: pending" {
		h.kill()
		return "FAILED", fmt.Sprintf("the holding process said %q", h.first)
	}
	// Another process's read, while the first one waits.
	mem, va, n, want, err := swappedOut(8)
	if err != nil {
		h.kill()
		return "FAILED", err.Error()
	}
	defer syscall.Munmap(mem)
	r := sendRequest(newRequest(va, n, uint64(swapmem.UserFault), want))
	status := uint64(hcall.StatusPending)
	start := time.Now()
	if r == 0 {
		for i := 0; status == hcall.StatusPending && time.Since(start) < 90*time.Second; i++ {
			if i%(1<<20) == 0 {
				status = vmx.VMCALL(hcall.SwapStatus, 0, 0)
			}
		}
	}
	served := time.Since(start)
	end := h.next()
	h.in.Close()
	werr := h.cmd.Wait()
	if r != 0 || status != hcall.StatusOK {
		return "FAILED", fmt.Sprintf("another process's read answered %s, status %s, while a NoFault read was pending", errName(r), statusName(status))
	}
	if werr != nil || !strings.HasPrefix(end, "hold: ended failed") {
		return "FAILED", fmt.Sprintf("other process's read served in %v, but the NoFault read: %q (%v)", served.Round(time.Millisecond), end, werr)
	}
	return "refused", fmt.Sprintf("another process's read was served in %v; the pending NoFault read %s", served.Round(time.Millisecond), strings.TrimPrefix(end, "hold: "))
}

// holdNoFault is the holding process: a NoFault read of its swapped-out
// pages, never touched; it reports when tamahv ends it.
func holdNoFault() (string, string) {
	mem, va, n, want, err := swappedOut(2)
	if err != nil {
		fmt.Println("hold: " + err.Error())
		return "FAILED", err.Error()
	}
	defer syscall.Munmap(mem)
	r := sendRequest(newRequest(va, n, uint64(swapmem.NoFault), want))
	if r != 0 {
		fmt.Println("hold: HcSwapRead answered " + errName(r))
		return "FAILED", "HcSwapRead answered " + errName(r)
	}
	if s := vmx.VMCALL(hcall.SwapStatus, 0, 0); s != hcall.StatusPending {
		fmt.Println("hold: status " + statusName(s))
		return "FAILED", "status " + statusName(s)
	}
	fmt.Println("hold: pending")
	s, took := waitStatus(150 * time.Second)
	fmt.Printf("hold: ended %s after %v\n", statusName(s), took.Round(time.Millisecond))
	return "survived", "held"
}

// attackMXCSR unmasks every SIMD and x87 exception and makes tamahv run
// at VM exits (CPUID, then preemption-timer exits during a spin of at
// least 50 ms) with that state live (finding 4).
func attackMXCSR() (string, string) {
	mhz := 0.0
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.SplitN(l, ":", 2); len(f) == 2 && strings.TrimSpace(f[0]) == "cpu MHz" {
				mhz, _ = strconv.ParseFloat(strings.TrimSpace(f[1]), 64)
				break
			}
		}
	}
	if mhz < 100 {
		mhz = 3000
	}
	ticks := uint64(mhz * 1e3 * 50) // 50 ms
	const mxcsr, fcw = 0x0000, 0x0340
	start := time.Now()
	n := unmaskedSpin(mxcsr, fcw, 2000, ticks)
	took := time.Since(start)
	if r := vmx.VMCALL(hcall.Identify, 0, 0); r&^0xffff != hcall.Magic&^0xffff {
		return "FAILED", fmt.Sprintf("HcIdentify answered %#x afterwards", r)
	}
	return "survived", fmt.Sprintf("MXCSR %#x and FCW %#x live for %d CPUID exits and a %d-tick spin (%v)", mxcsr, fcw, n, ticks, took.Round(time.Millisecond))
}

// attackExit asks tamahv to end the guest from ring 3 (finding 5).
func attackExit() (string, string) {
	r := vmx.VMCALL(hcall.Exit, 0, 0)
	if r == errDenied {
		return "refused", "HcExit from ring 3: -13 EACCES"
	}
	return "FAILED", "HcExit from ring 3 answered " + errName(r)
}
