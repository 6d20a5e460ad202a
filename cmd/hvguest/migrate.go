package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// sysGetcpu is getcpu(2)'s number on linux/amd64 (package syscall has
// none).
const sysGetcpu = 309

// maxCPUs is how many processors a CPU mask here can name.
const maxCPUs = 1024

// cpuMask is the kernel's cpu_set_t: one bit a processor.
type cpuMask [maxCPUs / 64]uint64

// parseCPU reads a processor number from the command line.
func parseCPU(s string) (int, error) {
	c, err := strconv.Atoi(s)
	if err != nil || c < 0 || c >= maxCPUs {
		return 0, fmt.Errorf("bad processor %q", s)
	}
	return c, nil
}

// currentCPU returns the processor the calling thread runs on (getcpu(2)).
func currentCPU() (int, error) {
	var cpu uint32
	if _, _, e := syscall.RawSyscall(sysGetcpu, uintptr(unsafe.Pointer(&cpu)), 0, 0); e != 0 {
		return 0, fmt.Errorf("getcpu: %v", e)
	}
	return int(cpu), nil
}

// pinThread restricts thread tid (0: the caller) to processor cpu
// (sched_setaffinity(2)). When the thread is the caller, the kernel has
// moved it there by the time the call returns.
func pinThread(tid, cpu int) error {
	var m cpuMask
	m[cpu/64] = 1 << (cpu % 64)
	if _, _, e := syscall.RawSyscall(syscall.SYS_SCHED_SETAFFINITY, uintptr(tid), unsafe.Sizeof(m), uintptr(unsafe.Pointer(&m))); e != 0 {
		return fmt.Errorf("sched_setaffinity(%d, CPU %d): %w", tid, cpu, e)
	}
	return nil
}

// pinProcess moves every thread of this process to processor cpu, the
// calling one last, and checks that the caller runs there. Threads the
// Go runtime starts meanwhile are cloned from a thread already listed, so
// a pass that finds no new thread has moved them all.
func pinProcess(cpu int) error {
	done := map[int]bool{}
	self := syscall.Gettid()
	for {
		d, err := os.Open("/proc/self/task")
		if err != nil {
			return err
		}
		names, err := d.Readdirnames(-1)
		d.Close()
		if err != nil {
			return err
		}
		added := false
		for _, n := range names {
			tid, err := strconv.Atoi(n)
			if err != nil || done[tid] || tid == self {
				continue
			}
			// A thread that ended meanwhile is gone (ESRCH): nothing to move.
			if err := pinThread(tid, cpu); err != nil && !errors.Is(err, syscall.ESRCH) {
				return err
			}
			done[tid], added = true, true
		}
		if !added {
			break
		}
	}
	return pinSelf(cpu)
}

// pinSelf pins the calling thread to processor cpu and returns once it
// runs there.
func pinSelf(cpu int) error {
	if err := pinThread(0, cpu); err != nil {
		return err
	}
	// sched_setaffinity returns once the caller runs on an allowed
	// processor; ask the kernel to be sure, giving it the processor a
	// bounded number of times if it has not moved the thread yet.
	for try := 0; ; try++ {
		now, err := currentCPU()
		if err != nil {
			return err
		}
		if now == cpu {
			return nil
		}
		if try == 1000 {
			return fmt.Errorf("still on CPU %d after moving to CPU %d", now, cpu)
		}
		syscall.RawSyscall(syscall.SYS_SCHED_YIELD, 0, 0, 0)
	}
}

// swapMigrate is "hvguest swapmigrate user|bp FROM TO [PAGES]": a swapmem
// read whose process moves between processors while it waits. The
// process runs on processor FROM while it fills the buffer, pushes it to
// swap and sends the read; as soon as the hypercall returns, before it
// waits or asks for the read's status, the thread that sent it and waits
// moves to processor TO (the process's other threads stay on FROM); it
// checks there that the read is still pending and then
// waits for tamahv's answer on TO (UserFault spinning in user mode, or
// BPFault looping on getppid). The move happens at that one place in the
// program, whatever the timing: between the request and the wait.
func swapMigrate(args []string) error {
	if len(args) < 3 {
		return errors.New("swapmigrate user|bp FROM TO [PAGES]")
	}
	opts, ok := map[string]uint64{"user": uint64(swapmem.UserFault), "bp": uint64(swapmem.BPFault)}[args[0]]
	if !ok {
		return fmt.Errorf("unknown mode %q", args[0])
	}
	from, err := parseCPU(args[1])
	if err != nil {
		return err
	}
	to, err := parseCPU(args[2])
	if err != nil {
		return err
	}
	pages := 32
	if len(args) > 3 {
		n, err := strconv.Atoi(args[3])
		if err != nil || n < 1 || n > swapmem.MaxLen/pageSize {
			return fmt.Errorf("bad page count %q", args[3])
		}
		pages = n
	}
	// The hypercalls, the move and the wait all happen on this thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// A read can end before the move: every thread of the process takes
	// the read's faults, not only this one, while the move waits for the
	// guest's migration. Such a run shows nothing of a process that moves
	// while it waits, so a BPFault read is made again with migrateGrowth
	// times the pages, up to migrateTries runs in all. A UserFault read
	// is served at any return to user mode of any of the process's
	// threads (the Go runtime's among them), and in Bochs it ended before
	// the move even at 1,025 pages: its ending first is reported, and is
	// no failure.
	once := func(pages int) error { return migrateOnce(opts, from, to, pages) }
	if opts == uint64(swapmem.UserFault) {
		err := once(pages)
		if errors.Is(err, errEndedEarly) {
			fmt.Printf("swapread: migrate: %v: the process's threads on CPU %d served it\n", err, from)
			return nil
		}
		return err
	}
	return retryMigrate(pages, once)
}

// retryMigrate runs once with pages, and again with migrateGrowth times
// as many while the read ended before the move, up to migrateTries runs.
func retryMigrate(pages int, once func(pages int) error) error {
	for try := 1; ; try++ {
		err := once(pages)
		if !errors.Is(err, errEndedEarly) || try == migrateTries || migrateGrowth*pages >= swapmem.MaxLen/pageSize {
			return err
		}
		fmt.Printf("swapread: migrate: %v; again with %d pages\n", err, migrateGrowth*pages)
		pages *= migrateGrowth
	}
}

// migrateTries bounds swapMigrate's runs; each is migrateGrowth times
// the previous one's pages (a buffer stays below swapmem.MaxLen).
const (
	migrateTries  = 3
	migrateGrowth = 4
)

// errEndedEarly is migrateOnce's error for a read that ended before the
// process moved.
var errEndedEarly = errors.New("the read was no longer pending after the move")

// migrateOnce is one run of swapMigrate with a read of pages pages.
func migrateOnce(opts uint64, from, to, pages int) error {
	if err := pinProcess(from); err != nil {
		return err
	}
	b, err := newBuffer(pages, int64(pages)<<8|int64(from)<<4|int64(to))
	if err != nil {
		return err
	}
	defer syscall.Munmap(b.mem)
	if err := b.pageOut(); err != nil {
		return err
	}
	if now, err := currentCPU(); err != nil || now != from {
		return fmt.Errorf("on CPU %d (%v) before the read, want %d", now, err, from)
	}
	start := time.Now()
	if r := send(b.va(), len(b.data), b.want, opts); r != 0 {
		return fmt.Errorf("HcSwapRead answered %#x", r)
	}
	// Only this thread moves: one system call, where moving every thread
	// of the process takes dozens, each return to user mode a fault for
	// a UserFault read (and the read would end before the move).
	if err := pinSelf(to); err != nil {
		return err
	}
	status := vmx.VMCALL(hcall.SwapStatus, 0, 0)
	fmt.Printf("swapread: migrate: read sent on CPU %d, reader moved to CPU %d, status %d\n", from, to, status)
	if status != hcall.StatusPending {
		return fmt.Errorf("%w (status %d)", errEndedEarly, status)
	}
	took, err := await(b.data, opts, false, start)
	if err != nil {
		return err
	}
	now, err := currentCPU()
	if err != nil {
		return err
	}
	if now != to {
		return fmt.Errorf("answered on CPU %d, want %d", now, to)
	}
	_, present, _ := pagemap(b.base(), b.span())
	fmt.Printf("swapread: tamahv read the range in %v of guest time; %d of %d pages present again\n", took.Round(time.Millisecond), present, b.span())
	fmt.Printf("swapread: migrate ok: sent on CPU %d, answered on CPU %d\n", from, to)
	return nil
}
