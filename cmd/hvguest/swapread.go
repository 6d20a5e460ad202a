package main

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// sink keeps the reads that touch pages from being optimised away.
var sink byte

const (
	pageSize    = 4096
	madvPageout = 21 // MADV_PAGEOUT
)

// pagemap returns how many of the n pages at va are swapped out and how
// many are present (/proc/self/pagemap: bit 62 swapped, bit 63 present).
func pagemap(va uintptr, n int) (swapped, present int, err error) {
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	b := make([]byte, 8*n)
	if _, err := f.ReadAt(b, int64(va/pageSize)*8); err != nil {
		return 0, 0, err
	}
	for i := 0; i < n; i++ {
		e := binary.LittleEndian.Uint64(b[8*i:])
		if e&(1<<62) != 0 {
			swapped++
		}
		if e&(1<<63) != 0 {
			present++
		}
	}
	return swapped, present, nil
}

func swapRead(args []string) error {
	if len(args) < 1 {
		return errors.New("swapread user|bp|nofault|veto|cow|exit|hole|thp|pair|peer|kill|file|writer [pages]")
	}
	mode := args[0]
	if run := caseMode(mode); run != nil {
		pages := 16
		if len(args) > 1 {
			n, err := strconv.Atoi(args[1])
			if err != nil || n < 1 || n > swapmem.MaxLen/pageSize {
				return fmt.Errorf("bad page count %q", args[1])
			}
			pages = n
		}
		return run(pages)
	}
	opts, ok := map[string]uint64{
		"user": uint64(swapmem.UserFault), "bp": uint64(swapmem.BPFault), "nofault": uint64(swapmem.NoFault),
		"veto": uint64(swapmem.UserFault) | hcall.SwapVeto, "cow": uint64(swapmem.UserFault | swapmem.WriteFault),
		"exit": uint64(swapmem.UserFault), "hole": uint64(swapmem.UserFault),
	}[mode]
	if !ok {
		return fmt.Errorf("unknown mode %q", mode)
	}
	// Modes that complete only when the program itself touches the pages.
	touch := mode == "nofault" || mode == "veto"
	pages := 64
	if len(args) > 1 {
		n, err := strconv.Atoi(args[1])
		if err != nil || n < 1 {
			return fmt.Errorf("bad page count %q", args[1])
		}
		pages = n
	}
	// The range starts and ends mid-page: pages+1 pages hold it.
	span := pages + 1
	mem, err := syscall.Mmap(-1, 0, span*pageSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		return err
	}
	base := uintptr(unsafe.Pointer(&mem[0]))
	const off = 100
	n := pages*pageSize + 200 - 2*off
	data := mem[off : off+n]
	rand.New(rand.NewSource(int64(pages))).Read(data)
	want := sha256.Sum256(data)
	var hole holeRange
	if mode == "hole" {
		// The hash of what will be left once the hole is unmapped, taken
		// before the pages go to swap.
		if hole, err = holeIn(mem, off, n); err != nil {
			return err
		}
	}

	if mode == "cow" {
		// Share the pages with a child: both see them read-only
		// (copy-on-write) until one writes.
		pid, _, e := syscall.RawSyscall(syscall.SYS_FORK, 0, 0, 0)
		if e != 0 {
			return fmt.Errorf("fork: %v", e)
		}
		if pid == 0 {
			for {
				syscall.RawSyscall(syscall.SYS_PAUSE, 0, 0, 0)
			}
		}
		defer syscall.Kill(int(pid), syscall.SIGKILL)
		fmt.Printf("swapread: %d bytes at %#x, sha256 %x, shared copy-on-write with process %d\n", n, base+off, want, pid)
		return request(mem, off, n, want, opts, false)
	}

	swapped, err := pageOut(base, span)
	if err != nil {
		return err
	}
	fmt.Printf("swapread: %d bytes at %#x, sha256 %x, %d of %d pages swapped out\n", n, base+off, want, swapped, span)
	if swapped < span {
		return fmt.Errorf("only %d of %d pages went to swap", swapped, span)
	}

	if mode == "hole" {
		return holeRead(mem, off, n, opts, hole)
	}
	if mode == "exit" {
		// Exit at once after the send. tamahv may still serve the read
		// before the exit (each #PF is taken at the instruction after
		// the hypercall); else the exit leaves the pages not backed.
		fmt.Println("swapread: exiting with the read pending")
		if r := send(base+off, n, want, opts); r != 0 {
			return fmt.Errorf("HcSwapRead answered %#x", r)
		}
		syscall.RawSyscall(syscall.SYS_EXIT_GROUP, 0, 0, 0)
	}
	return request(mem, off, n, want, opts, touch)
}

// send asks tamahv to read n bytes at va and to compare them with want.
func send(va uintptr, n int, want [32]byte, opts uint64) uint64 {
	req := hcall.SwapRequest{VA: uint64(va), Len: uint64(n), Options: opts, SHA256: want}.Encode()
	return vmx.VMCALL(hcall.SwapRead, uint64(uintptr(unsafe.Pointer(&req))), hcall.SwapRequestSize)
}

// request sends the read and waits for tamahv's answer without touching
// the buffer (unless touch: then, after a while, the program reads the
// pages itself, as the guest's own activity would).
func request(mem []byte, off, n int, want [32]byte, opts uint64, touch bool) error {
	base := uintptr(unsafe.Pointer(&mem[0]))
	span := len(mem) / pageSize
	start := time.Now()
	if r := send(base+uintptr(off), n, want, opts); r != 0 {
		return fmt.Errorf("HcSwapRead answered %#x", r)
	}
	took, err := await(mem[off:off+n], opts, touch, start)
	if err != nil {
		return err
	}
	_, present, _ := pagemap(base, span)
	fmt.Printf("swapread: tamahv read the range in %v of guest time; %d of %d pages present again\n", took.Round(time.Millisecond), present, span)
	return nil
}

// await waits for the answer to the read of data sent at start, without
// touching data (unless touch: then, after a while, the program reads the
// pages itself, as the guest's own activity would). It fails unless the
// read completed (hcall.StatusOK).
func await(data []byte, opts uint64, touch bool, start time.Time) (time.Duration, error) {
	// Wait without touching the buffer: spin in user mode (or, for
	// BPFault, in a cheap system call), asking now and then. With NoFault
	// nothing comes in until the buffer is read.
	status := uint64(hcall.StatusPending)
	every := 1 << 20
	bp := swapmem.Options(opts)&swapmem.BPFault != 0
	if bp {
		every = 1 << 10
	}
	// Long reads get longer: 90 s and 20 ms a page of guest time.
	limit := 90*time.Second + time.Duration(len(data)/pageSize)*20*time.Millisecond
	for i := 0; status == hcall.StatusPending; i++ {
		if bp {
			syscall.Getppid()
		}
		if i%every == 0 {
			status = vmx.VMCALL(hcall.SwapStatus, 0, 0)
			// After twenty questions (the guest's clock is no measure
			// under emulation), read the pages.
			if touch && i/every >= 20 {
				// The guest's own activity brings the pages in.
				for p := 0; p < len(data); p += pageSize {
					sink += data[p]
				}
				sink += data[len(data)-1] // the last page, which it may start
			}
			if time.Since(start) > limit {
				return 0, fmt.Errorf("no answer from tamahv in %v", limit)
			}
		}
	}
	took := time.Since(start)
	if status != hcall.StatusOK {
		return took, fmt.Errorf("tamahv reports status %d after %v", status, took)
	}
	return took, nil
}

// holeCount is how many pages holeRead unmaps in the middle of the range.
const holeCount = 4

// holeRange is the part of the range holeRead unmaps: bytes lo to hi of
// the data, and the SHA-256 of the data without them.
type holeRange struct {
	first, lo, hi int // first: its first page in the mapping
	want          [32]byte
}

// holeIn picks the hole in the middle of the range.
func holeIn(mem []byte, off, n int) (holeRange, error) {
	span := len(mem) / pageSize
	if span < holeCount+4 {
		return holeRange{}, fmt.Errorf("hole: %d pages are too few", span)
	}
	h := holeRange{first: span/2 - holeCount/2}
	h.lo, h.hi = h.first*pageSize-off, (h.first+holeCount)*pageSize-off
	data := mem[off : off+n]
	h.want = sha256.Sum256(append(append([]byte{}, data[:h.lo]...), data[h.hi:]...))
	return h, nil
}

// holeRead unmaps the hole, swapped out with the rest, and asks for the
// whole range: tamahv must leave the unmapped pages out (a fault there
// would be SIGSEGV) and read the rest, whose SHA-256 the request carries
// (hcall.StatusPartial).
func holeRead(mem []byte, off, n int, opts uint64, h holeRange) error {
	base := uintptr(unsafe.Pointer(&mem[0]))
	hole := mem[h.first*pageSize : (h.first+holeCount)*pageSize]
	data := mem[off : off+n]
	lo, hi, want := h.lo, h.hi, h.want
	if _, _, e := syscall.Syscall(syscall.SYS_MUNMAP, uintptr(unsafe.Pointer(&hole[0])), uintptr(len(hole)), 0); e != 0 {
		return fmt.Errorf("munmap: %v", e)
	}
	fmt.Printf("swapread: hole of %d pages at %#x unmapped; the other %d bytes have sha256 %x\n", holeCount, base+uintptr(h.first*pageSize), n-(hi-lo), want)
	start := time.Now()
	if r := send(base+uintptr(off), n, want, opts); r != 0 {
		return fmt.Errorf("HcSwapRead answered %#x", r)
	}
	status := uint64(hcall.StatusPending)
	for i := 0; status == hcall.StatusPending; i++ {
		if i%(1<<20) == 0 {
			status = vmx.VMCALL(hcall.SwapStatus, 0, 0)
			if time.Since(start) > 90*time.Second {
				return errors.New("no answer from tamahv in 90 s")
			}
		}
	}
	if status != hcall.StatusPartial {
		return fmt.Errorf("tamahv reports status %d for a range with a hole, want %d (partial)", status, hcall.StatusPartial)
	}
	// The process lives on, and the pages around the hole are its own.
	for p := 0; p < lo; p += pageSize {
		sink += data[p]
	}
	for p := hi; p < len(data); p += pageSize {
		sink += data[p]
	}
	if sha256.Sum256(append(append([]byte{}, data[:lo]...), data[hi:]...)) != want {
		return errors.New("the pages around the hole changed")
	}
	fmt.Printf("swapread: tamahv read the range but its hole in %v of guest time; the process lives on\n", time.Since(start).Round(time.Millisecond))
	return nil
}
