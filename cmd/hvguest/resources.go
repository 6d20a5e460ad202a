package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"reflect"
	"runtime"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// The ring-3 attacks on what tamahv holds for the guest: memory, read
// slots, the processor that handles exits. Each starts processes of its
// own (hvguest again, "attack one NAME ROLE"), which report to it through
// lines on their standard output that start with "hold: ".

// Sizes of the attacks.
const (
	largeHolders  = 8                      // processes holding a large NoFault read
	largeBytes    = swapmem.MaxLen         // each one's range: 16 MiB
	slotHolders   = 64                     // processes holding a read slot each
	innocents     = 40                     // processes started after the WriteFault requester died
	holdRefresh   = 2 * time.Second        // how often a slot holder asks again
	victimPatient = 60 * time.Second       // how long the victim keeps asking while busy
	stormCPUIDs   = uint64(1) << 40        // the storm's CPUID loop: until it is killed
	textPageMask  = ^uintptr(pageSize - 1) // the page of an address
)

// holder is one process started by an attack, and what it reported.
type holder struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines *bufio.Scanner
	first string // its first "hold: " line
}

// startHolder starts "hvguest attack one NAME ROLE..." and waits for its
// first "hold: " line.
func startHolder(name string, role ...string) (*holder, error) {
	h := &holder{cmd: exec.Command("/proc/self/exe", append([]string{"attack", "one", name}, role...)...)}
	out, err := h.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if h.in, err = h.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	h.cmd.Stderr = os.Stderr
	if err := h.cmd.Start(); err != nil {
		return nil, err
	}
	h.lines = bufio.NewScanner(out)
	h.first = h.next()
	return h, nil
}

// next returns the holder's next "hold: " line ("" at its end).
func (h *holder) next() string {
	for h.lines.Scan() {
		if l := h.lines.Text(); strings.HasPrefix(l, "hold: ") {
			return l
		}
	}
	return ""
}

// kill ends a holder that may not end by itself.
func (h *holder) kill() {
	h.in.Close()
	_ = h.cmd.Process.Kill()
	_ = h.cmd.Wait()
}

// stdinClosed returns a channel that is closed when the process's
// standard input ends (a holder's signal to stop).
func stdinClosed() <-chan struct{} {
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(done)
	}()
	return done
}

// attackLargeReads has eight processes each keep a NoFault read of 16 MiB
// of untouched memory pending at once: tamahv must refuse what its memory
// budget cannot hold (busy) and end the rest at their deadline, never run
// out of memory itself.
func attackLargeReads() (string, string) {
	if len(os.Args) > 5 && os.Args[4] == "hold" {
		return holdLarge(os.Args[5])
	}
	zeros := sha256.Sum256(make([]byte, largeBytes))
	var hs []*holder
	defer func() {
		for _, h := range hs {
			h.kill()
		}
	}()
	pending, busy := 0, 0
	for i := 0; i < largeHolders; i++ {
		h, err := startHolder("nofault-large-reads", "hold", hex.EncodeToString(zeros[:]))
		if err != nil {
			return "FAILED", err.Error()
		}
		hs = append(hs, h)
		switch h.first {
		case "hold: pending":
			pending++
		case "hold: busy":
			busy++
		default:
			return "FAILED", fmt.Sprintf("holder %d said %q", i, h.first)
		}
	}
	if r := vmx.VMCALL(hcall.Identify, 0, 0); r&^0xffff != hcall.Magic&^0xffff {
		return "FAILED", fmt.Sprintf("HcIdentify answered %#x with %d reads of %d MiB pending", r, pending, largeBytes>>20)
	}
	ended := 0
	for i, h := range hs {
		if h.first != "hold: pending" {
			continue
		}
		last := h.next()
		if !strings.HasPrefix(last, "hold: ended failed") {
			return "FAILED", fmt.Sprintf("holder %d's pending read: %q", i, last)
		}
		ended++
	}
	return "survived", fmt.Sprintf("%d processes asked for NoFault reads of %d MiB of untouched memory: %d held until their deadline, %d refused busy; tamahv answers",
		largeHolders, largeBytes>>20, ended, busy)
}

// holdLarge is one of attackLargeReads's processes; sum is the SHA-256 of
// its range (16 MiB of zeros), in hex.
func holdLarge(sum string) (string, string) {
	var want [32]byte
	if b, err := hex.DecodeString(sum); err != nil || len(b) != len(want) {
		fmt.Println("hold: bad hash argument")
		return "FAILED", "bad hash argument"
	} else {
		copy(want[:], b)
	}
	mem, err := syscall.Mmap(-1, 0, largeBytes, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		fmt.Println("hold: " + err.Error())
		return "FAILED", err.Error()
	}
	defer syscall.Munmap(mem)
	va := uint64(uintptr(unsafe.Pointer(&mem[0])))
	r := sendRequest(newRequest(va, largeBytes, uint64(swapmem.NoFault), want))
	switch r {
	case 0:
	case errBusy:
		fmt.Println("hold: busy")
		return "refused", "busy"
	default:
		fmt.Println("hold: HcSwapRead answered " + errName(r))
		return "FAILED", errName(r)
	}
	fmt.Println("hold: pending")
	s, took := waitStatus(150 * time.Second)
	fmt.Printf("hold: ended %s after %v\n", statusName(s), took.Round(time.Millisecond))
	return "survived", "held"
}

// attackSlots has 64 processes each keep a NoFault read of an untouched
// page pending, asking again every 2 s (each request replaces its own
// read): another process's read must still be served.
func attackSlots() (string, string) {
	if len(os.Args) > 4 && os.Args[4] == "hold" {
		return holdSlot()
	}
	var hs []*holder
	defer func() {
		for _, h := range hs {
			h.kill()
		}
	}()
	pending := 0
	for i := 0; i < slotHolders; i++ {
		h, err := startHolder("slots-held", "hold")
		if err != nil {
			return "FAILED", fmt.Sprintf("holder %d: %v", i, err)
		}
		hs = append(hs, h)
		if h.first == "hold: pending" {
			pending++
		}
	}
	mem, va, n, want, err := swappedOut(8)
	if err != nil {
		return "FAILED", err.Error()
	}
	defer syscall.Munmap(mem)
	start, busy := time.Now(), 0
	r := sendRequest(newRequest(va, n, uint64(swapmem.UserFault), want))
	for r == errBusy && time.Since(start) < victimPatient {
		busy++
		time.Sleep(200 * time.Millisecond)
		r = sendRequest(newRequest(va, n, uint64(swapmem.UserFault), want))
	}
	if r != 0 {
		return "FAILED", fmt.Sprintf("%d processes hold reads (%d pending at start): another process's read answered %s for %v (%d busy answers)",
			slotHolders, pending, errName(r), time.Since(start).Round(time.Millisecond), busy)
	}
	s, took := spinStatus(90 * time.Second)
	if s != hcall.StatusOK {
		return "FAILED", fmt.Sprintf("another process's read accepted after %d busy answers, then status %s after %v", busy, statusName(s), took.Round(time.Millisecond))
	}
	return "refused", fmt.Sprintf("%d processes kept reads pending (%d at start); another process's read was accepted after %d busy answers (%v) and served",
		slotHolders, pending, busy, time.Since(start).Round(time.Millisecond))
}

// spinStatus asks HcSwapStatus while spinning in user mode (where a
// UserFault read's faults are raised) until the read is no longer pending
// or limit has passed.
func spinStatus(limit time.Duration) (uint64, time.Duration) {
	start := time.Now()
	s := uint64(hcall.StatusPending)
	for i := 0; s == hcall.StatusPending && time.Since(start) < limit; i++ {
		if i%(1<<16) == 0 {
			s = vmx.VMCALL(hcall.SwapStatus, 0, 0)
		}
	}
	return s, time.Since(start)
}

// holdSlot is one of attackSlots's processes: it asks again every
// holdRefresh until its standard input closes.
func holdSlot() (string, string) {
	mem, err := syscall.Mmap(-1, 0, pageSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		fmt.Println("hold: " + err.Error())
		return "FAILED", err.Error()
	}
	defer syscall.Munmap(mem)
	req := newRequest(uint64(uintptr(unsafe.Pointer(&mem[0]))), pageSize, uint64(swapmem.NoFault), sha256.Sum256(make([]byte, pageSize)))
	r := sendRequest(req)
	if r == 0 {
		fmt.Println("hold: pending")
	} else {
		fmt.Println("hold: " + errName(r))
	}
	done := stdinClosed()
	for {
		select {
		case <-done:
			fmt.Println("hold: done")
			return "survived", "held"
		case <-time.After(holdRefresh):
			sendRequest(req)
		}
	}
}

// attackWriteFaultDead has a process ask for a WriteFault read of its own
// read-only text page, so that the fault tamahv injects kills it; then
// starts 40 short-lived processes of the same binary, which the kernel
// may give the dead process's page tables: none of them may die.
func attackWriteFaultDead() (string, string) {
	if len(os.Args) > 4 && os.Args[4] == "requester" {
		return writeFaultRequester()
	}
	req := exec.Command("/proc/self/exe", "attack", "one", "writefault-dead-process", "requester")
	out, _ := req.CombinedOutput()
	requester := "exited"
	if st, ok := req.ProcessState.Sys().(syscall.WaitStatus); ok && st.Signaled() {
		requester = "killed by " + st.Signal().String()
	} else if strings.Contains(string(out), "unexpected fault address") || strings.Contains(string(out), "SIGSEGV") {
		requester = "died of its fault"
	} else if l := lastLine(string(out), "hold: "); l != "" {
		requester = strings.TrimPrefix(l, "hold: ")
	}
	died := 0
	var first string
	for i := 0; i < innocents; i++ {
		o, err := exec.Command("/proc/self/exe", "innocent").CombinedOutput()
		if err != nil {
			died++
			if first == "" {
				first = fmt.Sprintf("%v: %s", err, lastLine(string(o), ""))
			}
		}
	}
	if died > 0 {
		return "FAILED", fmt.Sprintf("the WriteFault requester %s; %d of %d innocent processes of the same binary died (first: %s)", requester, died, innocents, first)
	}
	return "refused", fmt.Sprintf("the WriteFault requester %s; %d innocent processes of the same binary ran after it, none died", requester, innocents)
}

// lastLine returns the last line of s that starts with prefix.
func lastLine(s, prefix string) string {
	l := ""
	for _, x := range strings.Split(strings.TrimSpace(s), "\n") {
		if strings.HasPrefix(x, prefix) {
			l = x
		}
	}
	return l
}

// writeFaultRequester asks for a WriteFault|UserFault read of the page
// that holds its own code and spins in user mode until the fault tamahv
// injects ends it, or 20 s have passed.
func writeFaultRequester() (string, string) {
	text := reflect.ValueOf(cpuidTicks).Pointer() & textPageMask
	page := make([]byte, pageSize)
	f, err := os.Open("/proc/self/mem")
	if err == nil {
		_, err = f.ReadAt(page, int64(text))
		f.Close()
	}
	if err != nil {
		fmt.Println("hold: reading the text page: " + err.Error())
		return "FAILED", err.Error()
	}
	want := sha256.Sum256(page)
	r := sendRequest(newRequest(uint64(text), pageSize, uint64(swapmem.WriteFault|swapmem.UserFault), want))
	if r != 0 {
		fmt.Println("hold: refused " + errName(r))
		return "refused", errName(r)
	}
	runtime.LockOSThread()
	s, took := spinStatus(20 * time.Second)
	fmt.Printf("hold: lived, read %s after %v\n", statusName(s), took.Round(time.Millisecond))
	return "survived", "lived"
}

// innocent is a process that asks tamahv for nothing: it makes a few
// exits in user mode and ends.
func innocent() {
	cpuidTicks(200)
}

// attackExitStorm has a process on the last processor run CPUID in a loop
// (an exit each) while a process on processor 0 has tamahv read 64 of its
// swapped-out pages: the read must be served, and tamahv still answer. The
// same read without the storm, just before, gives the storm's cost.
func attackExitStorm() (string, string) {
	if len(os.Args) > 4 && os.Args[4] == "storm" {
		fmt.Println("hold: storming")
		cpuidTicks(stormCPUIDs)
		return "survived", "storm"
	}
	cpus := runtime.NumCPU()
	if cpus < 2 {
		return "survived", "one processor online: no other processor to storm from"
	}
	if err := pinProcess(0); err != nil {
		return "FAILED", err.Error()
	}
	calm, err := timedRead(64)
	if err != nil {
		return "FAILED", "without the storm: " + err.Error()
	}
	storm := exec.Command("taskset", "-c", fmt.Sprint(cpus-1), "/proc/self/exe", "attack", "one", "exit-storm", "storm")
	out, err := storm.StdoutPipe()
	if err != nil {
		return "FAILED", err.Error()
	}
	if err := storm.Start(); err != nil {
		return "FAILED", err.Error()
	}
	defer func() {
		_ = storm.Process.Kill()
		_ = storm.Wait()
	}()
	sc := bufio.NewScanner(out)
	for sc.Scan() && sc.Text() != "hold: storming" {
	}
	stormed, err := timedRead(64)
	if err != nil {
		return "FAILED", fmt.Sprintf("during a CPUID storm on CPU %d: %v", cpus-1, err)
	}
	return "survived", fmt.Sprintf("a 64-page read on CPU 0 was served in %v while CPU %d ran CPUID in a loop, in %v without: %.2f times as long",
		stormed.Round(time.Millisecond), cpus-1, calm.Round(time.Millisecond), float64(stormed)/float64(calm))
}

// timedRead has tamahv read pages of the process's swapped-out pages and
// returns how long the read took, from the request to its answer.
func timedRead(pages int) (time.Duration, error) {
	mem, va, n, want, err := swappedOut(pages)
	if err != nil {
		return 0, err
	}
	defer syscall.Munmap(mem)
	start := time.Now()
	if r := sendRequest(newRequest(va, n, uint64(swapmem.UserFault), want)); r != 0 {
		return 0, errors.New("HcSwapRead answered " + errName(r))
	}
	s, took := spinStatus(120 * time.Second)
	if s != hcall.StatusOK {
		return 0, fmt.Errorf("a %d-page read on CPU 0: status %s after %v", pages, statusName(s), took.Round(time.Millisecond))
	}
	return time.Since(start), nil
}
