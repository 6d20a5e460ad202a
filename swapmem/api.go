// Package swapmem reads ranges of guest virtual memory, including pages the
// guest has swapped out.
//
// A read is a transaction. Pages of the range that are present are copied at
// once; each missing page is watched (its page-table entries are hooked) and
// scheduled for a page fault that the hypervisor injects into the guest at a
// safe moment, so that the guest's own memory manager brings the page back.
// When every byte has been read the caller's Done function runs.
//
// The engine keeps at most one injected page fault pending in the whole guest,
// and no address space keeps it from the others for longer than
// Config.Timeout at a time. Transactions that wait for the same page share
// one watch and one fault. The per-VM-exit path, InjectPendingPF, costs O(1)
// in the number of live transactions and allocates nothing.
//
// A read keeps no buffer of its whole range: it keeps the pages read, each
// as it arrives, and a read with Request.Stream passes its bytes on in
// address order as they arrive, keeping only those that arrive ahead of a
// missing page. A read never outlives its address space: when the
// top-level entry on a waited page's walk goes away (Translation.Top), the
// reads of that address space end with ErrSpaceGone.
//
// A fault is injected only for a page the guest can bring in: one whose walk
// ends at a non-zero not-present entry (Translation.Backed: a swap or
// migration entry), or, for WriteFault, a present read-only page. Every read
// ends: with its data, with an error (a page that cannot be faulted, a fault
// the guest does not service, the request's deadline), or by its removal.
//
// The API follows the swapmem.h documentation of Bitdefender's Hypervisor
// Memory Introspection (IntSwapMemReadData and friends).
package swapmem

import (
	"errors"
	"fmt"
	"time"
)

// Options select how a read brings missing pages in (SWAPMEM_OPT_*).
type Options uint32

// The options of a Request.
const (
	// NoFault never injects; the engine waits for the guest to bring the
	// pages in by itself.
	NoFault Options = 0x00000001
	// UserFault injects only while the vCPU runs in user mode (CPL 3).
	UserFault Options = 0x00000002
	// KernelFault injects only while the vCPU runs in kernel mode (CPL 0).
	//
	// The engine checks only that the page is backed; whether a
	// kernel-mode #PF at the interrupted instruction is safe for the guest
	// (SMAP, atomic context, a user address without a VMA) it cannot see.
	// On Linux that safety is not established: callers must not offer
	// KernelFault, option 0 (any ring) or BPFault to requests they do not
	// trust, and should veto through PreInject what they cannot vouch for.
	KernelFault Options = 0x00000004
	// BPFault raises the fault from the int3 breakpoint agent (kernel #PFs).
	BPFault Options = 0x00000010
	// WriteFault faults with write access; a read-only page counts as
	// missing (forces copy-on-write).
	WriteFault Options = 0x00000020
	// NoDups keeps at most one live transaction per (CR3, VA, Len, Options).
	NoDups Options = 0x80000000

	knownOptions = NoFault | UserFault | KernelFault | BPFault | WriteFault | NoDups
	// faultClass are the options that decide where and how a fault for a
	// page may be injected; transactions share a page's fault only when
	// these agree.
	faultClass = NoFault | UserFault | KernelFault | BPFault | WriteFault
)

// String lists the set options by name.
func (o Options) String() string {
	return bitNames(uint32(o), optionNames)
}

var optionNames = []string{
	0: "NoFault", 1: "UserFault", 2: "KernelFault", 4: "BPFault", 5: "WriteFault", 31: "NoDups",
}

// Flags describe a completed read (SWAPMEM_FLAG_*).
type Flags uint32

// The flags of a Read.
const (
	// Async is set when Done runs after ReadData returned (a page had to
	// come in).
	Async Flags = 0x1
	// EntryXD is set when some page of the range is mapped execute-disable.
	EntryXD Flags = 0x2
)

// String lists the set flags by name.
func (f Flags) String() string {
	return bitNames(uint32(f), flagNames)
}

var flagNames = []string{0: "Async", 1: "EntryXD"}

func bitNames(v uint32, names []string) string {
	if v == 0 {
		return "0"
	}
	s := ""
	for i := 0; i < 32; i++ {
		if v&(1<<i) == 0 {
			continue
		}
		n := ""
		if i < len(names) {
			n = names[i]
		}
		if n == "" {
			n = fmt.Sprintf("%#x", uint32(1)<<i)
		}
		if s != "" {
			s += "|"
		}
		s += n
	}
	return s
}

// Page sizes a Translation can report.
const (
	PageSize4K = 1 << 12
	PageSize2M = 1 << 21
	PageSize1G = 1 << 30
)

// Translation is the result of translating one guest virtual address.
type Translation struct {
	PA       uint64 // physical address of the translated VA (valid when Present)
	PageSize uint64 // 4 KiB, 2 MiB or 1 GiB
	// Present, Writable, User and NX are the effective permissions of the
	// whole walk.
	Present, Writable, User, NX bool
	// Backed is set on a translation that is not present when the walk
	// stopped at a non-zero not-present entry of a page table or page
	// directory: a page the guest's memory manager holds elsewhere (on
	// Linux a swap or migration entry) and brings in on a #PF. A walk that
	// ends at a zero entry, or misses an upper level, is not backed: a #PF
	// there could kill the process or oops the kernel, so the engine never
	// injects one.
	Backed bool
	// Top is the top-level entry (PML4E, or PML5E with 5-level paging)
	// the walk went through: its address and present bit only, 0 when it
	// is not present. It names the part of the address space the page
	// lies in. A top-level entry of a live process's user half stays as
	// it is for the process's life: Linux clears them when it tears the
	// address space down (and when the process unmaps a whole 512 GiB
	// slot), before its top-level table can go to another process. The
	// engine takes a change of a present Top on a waited page's walk for
	// the end of that address space (ErrSpaceGone).
	Top uint64
}

// TopPresent is the present bit of Translation.Top.
const TopPresent = 1 << 0

// BPWithdrawer is implemented by a Guest whose breakpoint agent can take
// back an arming (CPU.InjectBPFault) before it raises its fault. The
// engine calls WithdrawBPFault for the page it armed when no transaction
// wants that fault any more (they ended, or the page came in by itself,
// or the arming timed out), with its lock held: it must not call back
// into the engine.
type BPWithdrawer interface {
	WithdrawBPFault(va uint64)
}

// Guest is the engine's view of guest memory. The hypervisor implements it;
// tests simulate it.
//
// The engine calls these methods with its lock held: they must not call back
// into the engine. The changed function given to Watch is called later, from
// outside Watch and outside cancel (typically from the VM-exit handler of the
// vCPU that wrote a page-table entry).
type Guest interface {
	// Translate walks cr3's paging structures for va. An error counts as
	// "not present".
	Translate(cr3, va uint64) (Translation, error)
	// ReadPhys reads len(p) bytes of guest-physical memory at pa.
	ReadPhys(pa uint64, p []byte) error
	// Watch calls changed with the new translation each time va's
	// translation in cr3 is rewritten, until cancel is called (the PTS hook).
	Watch(cr3, va uint64, changed func(Translation)) (cancel func(), err error)
	// SystemCR3 is the address space used for a request whose CR3 is 0.
	SystemCR3() uint64
}

// CPU is the vCPU whose VM exit is being handled. The engine calls these
// methods with its lock held: they must not call back into the engine.
type CPU interface {
	CR3() uint64
	Ring() int          // 0 or 3
	EventPending() bool // an event is already queued for the next VM entry
	// InjectPF queues a #PF for va (CR2) with errorCode for the next entry.
	InjectPF(va uint64, errorCode uint32) error
	// InjectBPFault arms the breakpoint agent to raise a #PF on va.
	InjectBPFault(va uint64) error
}

// Request describes one read.
type Request struct {
	CR3     uint64 // 0: the system address space, and any CR3 may take the fault
	VA      uint64
	Len     int
	Options Options
	// Done is called exactly once when all Len bytes are read, or when the
	// read fails (Read.Err); it may be nil.
	Done func(Read)
	// Stream, if set, receives the bytes as they are read, in address
	// order: each piece once, as soon as every byte before it was read,
	// and valid only during the call. Done's Read.Data is then nil. The
	// engine keeps only the pages read ahead of one still missing, so a
	// streaming read holds no more memory than those; without Stream the
	// engine keeps every page read until Done. Stream is called with the
	// engine's lock held: it must not call back into the engine. Pieces
	// passed on do not make a read succeed: one that fails afterwards
	// ends with Read.Err, and one that ReadData refuses may have passed
	// on pieces before it found why.
	Stream func(p []byte)
	// PreInject is asked before each injection for the page at va, with the
	// CR3 the fault would be taken in; false vetoes it. It may be nil.
	PreInject func(cr3, va uint64) bool
	// Deadline bounds the read's life: when it has passed and the read is
	// still live, Done runs with Err wrapping ErrDeadline. 0 selects
	// Config.Deadline; it may not be negative.
	Deadline time.Duration
}

// Read is what Done receives.
type Read struct {
	CR3, VA, PA uint64 // PA of the first byte
	// Data holds the bytes read (nil for a Stream request). It is the
	// transaction's own: the engine does not touch it after Done.
	Data  []byte
	Flags Flags
	// Err is non-nil when the range could not be read: it wraps
	// ErrNotServiced, ErrNotBacked or ErrDeadline, or a guest-memory error.
	// Data is then nil.
	Err error
}

// Config tunes an Engine. The zero value selects the defaults.
type Config struct {
	// Timeout is the age after which a pending #PF is re-armed (default
	// 1s). It is also how long a waiting page may stay not backed before
	// its transactions fail with ErrNotBacked.
	Timeout time.Duration
	// Now is a monotonic clock (default: time since New). Should it go
	// backwards, the engine takes the step back as no time passing and
	// counts on from there: timers are neither stalled nor fired by it.
	Now func() time.Duration
	// MaxAttempts is how many times a page's #PF is injected without the
	// page coming in before its transactions fail (default
	// DefaultMaxAttempts). A cancelled injection does not count. Injections
	// the CPU refuses (InjectPF or InjectBPFault failed) have their own
	// bound: refused for MaxAttempts × Timeout, the page fails.
	MaxAttempts int
	// Deadline is the life of a request that sets no Request.Deadline
	// (default DefaultDeadline).
	Deadline time.Duration
}

// Limits and defaults.
const (
	// MaxLen is the longest range one request may read.
	MaxLen = 16 << 20
	// DefaultTimeout is Config.Timeout's default.
	DefaultTimeout = time.Second
	// DefaultMaxAttempts is Config.MaxAttempts's default.
	DefaultMaxAttempts = 8
	// DefaultDeadline is Config.Deadline's default: well above what
	// DefaultMaxAttempts faults take (8 × DefaultTimeout), so that it ends
	// only reads that nothing else would end (NoFault reads the guest
	// never serves, reads of an address space that vanished).
	DefaultDeadline = 30 * time.Second
	// MaxPreInjectCalls bounds the PreInject calls one InjectPendingPF
	// makes, so that vetoes cannot make a VM exit cost more than O(1).
	// Vetoed pages move to the back of the queue, so every page is asked
	// in turn over successive exits.
	MaxPreInjectCalls = 8
)

// Page-fault error-code bits (Intel SDM Vol. 3A, "Interrupt 14—Page-Fault
// Exception (#PF)").
const (
	PFErrPresent = 1 << 0 // P: the fault was a protection violation
	PFErrWrite   = 1 << 1 // W/R: the access was a write
	PFErrUser    = 1 << 2 // U/S: the access was made in user mode
)

// Errors returned by the engine.
var (
	ErrClosed        = errors.New("swapmem: engine closed")
	ErrBadRequest    = errors.New("swapmem: bad request")
	ErrNoTransaction = errors.New("swapmem: no such live transaction")
	// ErrNotServiced is the Read.Err of a transaction whose page was
	// faulted MaxAttempts times without coming in.
	ErrNotServiced = errors.New("swapmem: guest did not service the page fault")
	// ErrNotBacked is returned by ReadData, or is the Read.Err, when a page
	// of a faulting request is missing and not backed (see
	// Translation.Backed): a #PF there would not bring it in.
	ErrNotBacked = errors.New("swapmem: page is not backed: no fault injected")
	// ErrDeadline is the Read.Err of a transaction whose deadline passed.
	ErrDeadline = errors.New("swapmem: read deadline passed")
	// ErrSpaceGone is the Read.Err of every transaction of an address
	// space whose top-level entry on a waited page's walk went away or
	// changed (see Translation.Top): the address space was torn down, and
	// its top-level table may already be another process's.
	ErrSpaceGone = errors.New("swapmem: the address space's page tables went away")
)
