package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/tamahv/tamahv/swapmem"
)

// The further swapmem cases (make e2e-swapmem): each mode ends with a line
// "swapread: MODE ok: ..." when its reads came back as they should.

const (
	madvHugepage   = 14 // MADV_HUGEPAGE
	fadvDontneed   = 4  // POSIX_FADV_DONTNEED
	hugePageSize   = 2 << 20
	peerPendingMsg = "swapread: peer pending"
	userFault      = uint64(swapmem.UserFault)
	noFault        = uint64(swapmem.NoFault)
)

// caseMode returns the function that runs a further case, nil for the
// other modes.
func caseMode(mode string) func(pages int) error {
	switch mode {
	case "thp":
		return thpCase
	case "pair":
		return pairCase
	case "peer":
		return peerCase
	case "kill":
		return killCase
	case "file":
		return fileCase
	case "writer":
		return writerCase
	}
	return nil
}

// buffer is a range of random bytes that starts and ends mid-page in an
// anonymous private mapping of pages+1 pages.
type buffer struct {
	mem  []byte
	off  int
	data []byte
	want [32]byte
}

// newBuffer maps and fills a buffer of pages pages of bytes from seed.
func newBuffer(pages int, seed int64) (*buffer, error) {
	mem, err := syscall.Mmap(-1, 0, (pages+1)*pageSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		return nil, err
	}
	return fill(mem, seed), nil
}

// fill puts random bytes from seed in mem, but for 100 bytes at each end.
func fill(mem []byte, seed int64) *buffer {
	const off = 100
	b := &buffer{mem: mem, off: off, data: mem[off : len(mem)-off]}
	rand.New(rand.NewSource(seed)).Read(b.data)
	b.want = sha256.Sum256(b.data)
	return b
}

func (b *buffer) base() uintptr { return uintptr(unsafe.Pointer(&b.mem[0])) }
func (b *buffer) va() uintptr   { return b.base() + uintptr(b.off) }
func (b *buffer) span() int     { return len(b.mem) / pageSize }

// pageOut sends the buffer's pages to swap (MADV_PAGEOUT) and fails unless
// all went.
func (b *buffer) pageOut() error {
	swapped, err := pageOut(b.base(), b.span())
	if err != nil {
		return err
	}
	fmt.Printf("swapread: %d bytes at %#x, sha256 %x, %d of %d pages swapped out\n", len(b.data), b.va(), b.want, swapped, b.span())
	if swapped < b.span() {
		return fmt.Errorf("only %d of %d pages went to swap", swapped, b.span())
	}
	return nil
}

// read sends the read of the buffer with opts and waits for it (see await).
func (b *buffer) read(opts uint64, touch bool) (time.Duration, error) {
	start := time.Now()
	if r := send(b.va(), len(b.data), b.want, opts); r != 0 {
		return 0, fmt.Errorf("HcSwapRead answered %#x", r)
	}
	return await(b.data, opts, touch, start)
}

// thpCase reads a buffer that was a transparent huge page when it went to
// swap. It reports what the kernel made of the huge page: AnonHugePages of
// the mapping before and after MADV_PAGEOUT and the THP counters of
// /proc/vmstat (thp_swpout: swapped out whole; thp_swpout_fallback and
// thp_split_pmd: split first).
func thpCase(int) error {
	raw, err := syscall.Mmap(-1, 0, 2*hugePageSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		return err
	}
	a := (hugePageSize - int(uintptr(unsafe.Pointer(&raw[0]))%hugePageSize)) % hugePageSize
	mem := raw[a : a+hugePageSize]
	base := uintptr(unsafe.Pointer(&mem[0]))
	if _, _, e := syscall.Syscall(syscall.SYS_MADVISE, base, hugePageSize, madvHugepage); e != 0 {
		return fmt.Errorf("madvise(MADV_HUGEPAGE): %v", e)
	}
	enabled, _ := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled")
	before := vmstat("thp_")
	b := fill(mem, 2) // the first touch: a huge page if the kernel can
	huge := anonHuge(base)
	fmt.Printf("swapread: thp: THP %s; 2 MiB at %#x, AnonHugePages %d kB after the first touch\n", strings.TrimSpace(string(enabled)), base, huge)
	if huge < hugePageSize>>10 {
		return fmt.Errorf("thp: the range is not a huge page (AnonHugePages %d kB)", huge)
	}
	if err := b.pageOut(); err != nil {
		return err
	}
	after := vmstat("thp_")
	var moved []string
	for _, k := range []string{"thp_split_pmd", "thp_split_page", "thp_swpout", "thp_swpout_fallback"} {
		moved = append(moved, fmt.Sprintf("%s +%d", k, after[k]-before[k]))
	}
	fmt.Printf("swapread: thp: after MADV_PAGEOUT AnonHugePages %d kB; %s\n", anonHuge(base), strings.Join(moved, ", "))
	took, err := b.read(userFault, false)
	if err != nil {
		return err
	}
	fmt.Printf("swapread: thp ok: tamahv read the former huge page in %v of guest time; AnonHugePages now %d kB\n", took.Round(time.Millisecond), anonHuge(base))
	return nil
}

// anonHuge returns the AnonHugePages (kB) of the mapping at va
// (/proc/self/smaps).
func anonHuge(va uintptr) int {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return -1
	}
	defer f.Close()
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := sc.Text()
		if lo, hi, ok := smapsRange(l); ok {
			in = lo <= uint64(va) && uint64(va) < hi
			continue
		}
		if f := strings.Fields(l); in && len(f) >= 2 && f[0] == "AnonHugePages:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return -1
}

// smapsRange parses the range of a mapping's first line in smaps.
func smapsRange(l string) (lo, hi uint64, ok bool) {
	f := strings.Fields(l)
	if len(f) < 5 {
		return 0, 0, false
	}
	a, b, ok := strings.Cut(f[0], "-")
	if !ok {
		return 0, 0, false
	}
	lo, err1 := strconv.ParseUint(a, 16, 64)
	hi, err2 := strconv.ParseUint(b, 16, 64)
	return lo, hi, err1 == nil && err2 == nil
}

// vmstat returns the counters of /proc/vmstat whose names start with prefix.
func vmstat(prefix string) map[string]int64 {
	m := map[string]int64{}
	b, _ := os.ReadFile("/proc/vmstat")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 2 && strings.HasPrefix(f[0], prefix) {
			m[f[0]], _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	return m
}

// peer is another hvguest process with a NoFault read pending.
type peer struct {
	cmd  *exec.Cmd
	goOn io.WriteCloser
}

// startPeer starts "hvguest swapread peer PAGES" and returns once its read
// is pending.
func startPeer(pages int) (*peer, error) {
	cmd := exec.Command("/proc/self/exe", "swapread", "peer", strconv.Itoa(pages))
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	r := bufio.NewReader(out)
	for {
		l, err := r.ReadString('\n')
		fmt.Print(l)
		if err != nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return nil, fmt.Errorf("peer ended before its read was pending: %v", err)
		}
		if strings.TrimSpace(l) == peerPendingMsg {
			break
		}
	}
	go io.Copy(os.Stdout, r) // the peer's further lines
	return &peer{cmd: cmd, goOn: in}, nil
}

// peerCase is the other process of pair and kill: it sends a NoFault read
// (which cannot complete by itself), says so, and waits for a line on its
// standard input; then it reads its pages, which completes the read.
func peerCase(pages int) error {
	b, err := newBuffer(pages, int64(pages)+1000)
	if err != nil {
		return err
	}
	if err := b.pageOut(); err != nil {
		return err
	}
	start := time.Now()
	if r := send(b.va(), len(b.data), b.want, noFault); r != 0 {
		return fmt.Errorf("HcSwapRead answered %#x", r)
	}
	fmt.Printf("swapread: peer process %d: NoFault read sent\n%s\n", os.Getpid(), peerPendingMsg)
	var line [1]byte
	if _, err := os.Stdin.Read(line[:]); err != nil {
		return fmt.Errorf("peer: no go: %v", err)
	}
	took, err := await(b.data, noFault, true, start)
	if err != nil {
		return err
	}
	fmt.Printf("swapread: peer process %d: read complete after %v of guest time\n", os.Getpid(), took.Round(time.Millisecond))
	return nil
}

// pairCase has two processes' reads pending at once: a peer's NoFault read
// (pending until the peer reads its pages) and this process's UserFault
// read. Both must complete.
func pairCase(pages int) error {
	b, err := newBuffer(pages, int64(pages)+2000)
	if err != nil {
		return err
	}
	if err := b.pageOut(); err != nil {
		return err
	}
	p, err := startPeer(pages)
	if err != nil {
		return err
	}
	start := time.Now()
	r := send(b.va(), len(b.data), b.want, userFault)
	// Let the peer go on whatever the answer: it then completes its read.
	if _, err := p.goOn.Write([]byte("go\n")); err != nil {
		return err
	}
	if r != 0 {
		_ = p.cmd.Wait()
		return fmt.Errorf("HcSwapRead answered %#x with the peer's read pending", r)
	}
	took, err := await(b.data, userFault, false, start)
	if err != nil {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
		return err
	}
	fmt.Printf("swapread: pair: process %d's read complete after %v of guest time\n", os.Getpid(), took.Round(time.Millisecond))
	if err := p.cmd.Wait(); err != nil {
		return fmt.Errorf("pair: peer: %v", err)
	}
	fmt.Printf("swapread: pair ok: processes %d and %d read at once, both reads complete\n", os.Getpid(), p.cmd.Process.Pid)
	return nil
}

// killCase kills a peer with SIGKILL while its read waits (a NoFault read
// cannot complete without the peer), then reads in this process: tamahv
// must go on serving reads.
func killCase(pages int) error {
	p, err := startPeer(pages)
	if err != nil {
		return err
	}
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	err = p.cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		return fmt.Errorf("kill: peer ended with %v, want SIGKILL", err)
	}
	fmt.Printf("swapread: kill: process %d killed with SIGKILL, its read pending\n", p.cmd.Process.Pid)
	time.Sleep(time.Second) // tamahv logs at most 8 swapmem lines a second
	b, err := newBuffer(pages, int64(pages)+3000)
	if err != nil {
		return err
	}
	if err := b.pageOut(); err != nil {
		return err
	}
	took, err := b.read(userFault, false)
	if err != nil {
		return err
	}
	fmt.Printf("swapread: kill ok: a later read by process %d complete after %v of guest time\n", os.Getpid(), took.Round(time.Millisecond))
	return nil
}

// fileCase reads pages of a private file mapping that were dropped from
// the page cache. The guest has no filesystem whose pages can be dropped
// (its root is the initramfs, in RAM) and no mkfs, so the file is a block
// device: a fresh zram disk, whose page cache is dropped and read back
// from the disk like a disk filesystem's. The read is NoFault (a dropped
// file page has a zero PTE: nothing for a #PF to bring back that tamahv
// can tell); the process reads the pages itself after a while.
func fileCase(pages int) error {
	dev, err := zramDisk(pages)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	span := pages + 1
	img := make([]byte, span*pageSize)
	b := fill(img, int64(pages)+4000)
	if _, err := f.WriteAt(img, 0); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, span*pageSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE)
	if err != nil {
		return err
	}
	fb := &buffer{mem: mem, off: b.off, data: mem[b.off : len(mem)-b.off], want: b.want}
	if !bytes.Equal(fb.data, b.data) {
		return errors.New("file: the mapping does not hold what was written")
	}
	_, present, _ := pagemap(fb.base(), span)
	// Drop the pages: out of the mapping and out of the page cache.
	for try := 0; try < 10 && present+resident(fb.mem) > 0; try++ {
		if _, _, e := syscall.Syscall(syscall.SYS_MADVISE, fb.base(), uintptr(len(mem)), madvPageout); e != 0 {
			return fmt.Errorf("madvise(MADV_PAGEOUT): %v", e)
		}
		if _, _, e := syscall.Syscall6(syscall.SYS_FADVISE64, f.Fd(), 0, uintptr(len(mem)), fadvDontneed, 0, 0); e != 0 {
			return fmt.Errorf("fadvise(POSIX_FADV_DONTNEED): %v", e)
		}
		_, present, _ = pagemap(fb.base(), span)
	}
	res := resident(fb.mem)
	fmt.Printf("swapread: file: %d bytes at %#x of a private mapping of %s, sha256 %x; %d of %d pages mapped, %d in the page cache\n", len(fb.data), fb.va(), dev, fb.want, present, span, res)
	if present+res > 0 {
		return fmt.Errorf("file: %d pages still mapped, %d in the page cache", present, res)
	}
	took, err := fb.read(noFault, true)
	if err != nil {
		return err
	}
	_, present, _ = pagemap(fb.base(), span)
	fmt.Printf("swapread: file ok: tamahv read the dropped pages after %v of guest time; %d of %d pages mapped again\n", took.Round(time.Millisecond), present, span)
	return nil
}

// zramDisk adds a zram disk big enough for pages+1 pages and returns its
// device file.
func zramDisk(pages int) (string, error) {
	id, err := os.ReadFile("/sys/class/zram-control/hot_add")
	if err != nil {
		return "", fmt.Errorf("file: new zram disk: %v", err)
	}
	n := strings.TrimSpace(string(id))
	size := fmt.Sprint((pages + 1 + 255) / 256 * (1 << 20))
	if err := os.WriteFile("/sys/block/zram"+n+"/disksize", []byte(size), 0); err != nil {
		return "", fmt.Errorf("file: zram%s disksize: %v", n, err)
	}
	return "/dev/zram" + n, nil
}

// resident returns how many pages of the file mapping mem are in the page
// cache (mincore).
func resident(mem []byte) int {
	vec := make([]byte, len(mem)/pageSize)
	if _, _, e := syscall.Syscall(syscall.SYS_MINCORE, uintptr(unsafe.Pointer(&mem[0])), uintptr(len(mem)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		return -1
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

// writerCase reads a buffer that a thread of the same process keeps
// writing during the read: the first bytes of the range and of its middle
// page, each time with the bytes they already hold.
func writerCase(pages int) error {
	b, err := newBuffer(pages, int64(pages)+5000)
	if err != nil {
		return err
	}
	const w = 256
	mid := (pages / 2) * pageSize
	head := append([]byte(nil), b.data[:w]...)
	middle := append([]byte(nil), b.data[mid:mid+w]...)
	if err := b.pageOut(); err != nil {
		return err
	}
	// Two threads on the guest's one CPU: the kernel shares it between
	// the writer and this thread's wait, a few milliseconds each.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	var stop atomic.Bool
	var writes atomic.Int64
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread() // a thread of its own
		defer close(done)
		for !stop.Load() {
			copy(b.data[:w], head)
			copy(b.data[mid:mid+w], middle)
			writes.Add(1)
		}
	}()
	for writes.Load() < 1000 { // the writer is at work before the read
		runtime.Gosched()
	}
	start := time.Now()
	before := writes.Load()
	if r := send(b.va(), len(b.data), b.want, userFault); r != 0 {
		stop.Store(true)
		<-done
		return fmt.Errorf("HcSwapRead answered %#x", r)
	}
	took, err := await(b.data, userFault, false, start)
	during := writes.Load() - before
	stop.Store(true)
	<-done
	if err != nil {
		return err
	}
	if during == 0 {
		return fmt.Errorf("writer: the writer did not run during the read (%v)", took)
	}
	if sha256.Sum256(b.data) != b.want {
		return errors.New("writer: the buffer changed")
	}
	fmt.Printf("swapread: writer ok: tamahv read the range in %v of guest time while a thread rewrote it %d times\n", took.Round(time.Millisecond), during)
	return nil
}
