// Package monitor is tamahv's default policy: which hypercalls the guest
// may make at which privilege level, and the swap reads they start.
//
// The guest is not trusted. Unprivileged guest code (CPL 3) gets only what
// is safe for any process: HcIdentify, and swap reads of its own memory
// (the lower, user half of its address space) that inject nothing but
// user-mode faults, with their status. Everything else needs CPL 0, unless
// tamahv's own command line (never the guest) grants it to CPL 3 through
// Ring3, as a test guest needs.
package monitor

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// Ring3 is a set of functions granted to CPL 3 beyond the default.
type Ring3 uint8

// Grants.
const (
	// Ring3Secret lets CPL 3 ask for the secret page (hcall.Secret).
	Ring3Secret Ring3 = 1 << iota
	// Ring3BPFault lets CPL 3 ask for swap reads with swapmem.BPFault:
	// a kernel-mode fault raised from the guest kernel's system-call path.
	Ring3BPFault
	// Ring3Exit lets CPL 3 end the guest (hcall.Exit).
	Ring3Exit
)

var ring3Names = []struct {
	name string
	g    Ring3
}{{"secret", Ring3Secret}, {"bpfault", Ring3BPFault}, {"exit", Ring3Exit}}

// String lists the grants as the command line spells them.
func (g Ring3) String() string {
	var s []string
	for _, n := range ring3Names {
		if g&n.g != 0 {
			s = append(s, n.name)
		}
	}
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ",")
}

// Ring3Option is the name of the command-line option that grants
// functions to CPL 3: hc.ring3=secret,bpfault,exit (any subset).
const Ring3Option = "hc.ring3"

// ErrOption is ParseCmdline's error for an option it cannot read.
var ErrOption = errors.New("monitor: bad option")

// ParseCmdline reads the grants from tamahv's command line: the words
// hc.ring3=NAME[,NAME...]; other words are not the monitor's and are left
// alone. An unknown name is an error; the grants read so far are returned
// with it.
func ParseCmdline(cmdline string) (Ring3, error) {
	var g Ring3
	for _, w := range strings.Fields(cmdline) {
		v, ok := strings.CutPrefix(w, Ring3Option+"=")
		if !ok {
			continue
		}
	names:
		for _, name := range strings.Split(v, ",") {
			for _, n := range ring3Names {
				if name == n.name {
					g |= n.g
					continue names
				}
			}
			return g, fmt.Errorf("%w: %s: unknown function %q (secret, bpfault, exit)", ErrOption, Ring3Option, name)
		}
	}
	return g, nil
}

// Memory is the guest memory the monitor reads hypercall arguments from:
// guest-physical reads that refuse tamahv's own memory.
type Memory interface {
	Translate(cr3, va uint64) (swapmem.Translation, error)
	ReadPhys(pa uint64, p []byte) error
}

// MaxReads is how many address spaces may have a swap read tracked at
// once; a new one beyond that is refused with hcall.Busy while every
// tracked read is pending.
const MaxReads = 64

// Log lines are limited to logBurst a second; the rest are counted.
const logBurst = 8

// Monitor answers the guest's hypercalls (hv.Hypercalls).
type Monitor struct {
	// Ring3 are the functions granted to CPL 3 beyond the default.
	Ring3 Ring3
	// Mem reads the guest's requests.
	Mem Memory
	// Engine serves swap reads (nil: none).
	Engine *swapmem.Engine
	// Spaces names address spaces: reads are kept per address space, the
	// user and kernel CR3 of an isolated process being one (nil: page-table
	// bases compared exactly).
	Spaces *hv.AddressSpaces
	// SecretPA is the page hcall.Secret reports (0: none).
	SecretPA uint64
	// Log receives one line per swap read (nil: discarded), at most a
	// few a second whatever the guest does.
	Log io.Writer
	// Now is the clock (nil: time.Now).
	Now func() time.Time
	// Paging is told, before a request is read, whether the guest uses
	// 5-level paging and execute-disable (nil: not told).
	Paging func(la57, nxe bool)
	// Exits returns the guest's VM exits so far and the
	// VMX-preemption-timer exits among them, for a read's figures: with
	// several vCPUs, a read may start on one and end on another (nil: v's
	// own counts).
	Exits func(v *hv.VCPU) (total, timer uint64)

	// Status is the exit status the guest gave with hcall.Exit.
	Status int

	extra      map[uint64]extra // functions an embedder added
	gen        uint64           // reads started
	reads      map[uint64]*read // by address space (Spaces.Of)
	logSecond  time.Time
	logLines   int
	suppressed int
}

// read is one address space's last swap read.
type read struct {
	state    uint64 // hcall.StatusPending, StatusOK, StatusFailed
	want     [32]byte
	start    time.Time
	exits    uint64
	timer    uint64 // VMX-preemption-timer exits when the read began
	injected uint64
	missing  int
	vetoes   int
	reported bool // the watchdog spoke

	// A read whose range has pages not mapped (see split) runs as one
	// engine read per mapped part; their bytes gather in data.
	gen     uint64 // this read's number: a late Done of an earlier read is ignored
	skipped int    // pages not mapped, left out of the read
	left    int    // parts not done yet
	data    []byte
	flags   swapmem.Flags
	txs     []*swapmem.Transaction
}

// MaxParts bounds the mapped parts one swap read of a range with pages
// not mapped may have; a range cut into more is refused.
const MaxParts = 16

// part is one mapped part of a read's range: n bytes at va, at offset
// off of the gathered data.
type part struct{ va, n, off uint64 }

// split cuts the range [va, va+n) at the pages that no fault can bring in
// (hv.Walker: a walk that ends at a zero entry or misses a table, as after
// munmap; or fails) and returns the parts in between, and the first page
// left out (r.skipped counts them). Reads without a fault (NoFault) wait
// for every page and are not cut. A range with no such page is one part.
func (m *Monitor) split(cr3, va, n uint64, opts swapmem.Options, r *read) ([]part, uint64) {
	if opts&swapmem.NoFault != 0 {
		return []part{{va, n, 0}}, 0
	}
	var parts []part
	var hole, off uint64
	end := va + n // the caller checked that the range does not wrap
	for cur, next := va, uint64(0); cur < end; cur = next {
		if next = cur&^0xfff + 0x1000; next == 0 || next > end {
			next = end
		}
		tr, err := m.Mem.Translate(cr3, cur)
		switch k := len(parts); {
		case err != nil || !tr.Present && !tr.Backed:
			if r.skipped == 0 {
				hole = cur &^ 0xfff
			}
			r.skipped++
		case k > 0 && parts[k-1].va+parts[k-1].n == cur:
			parts[k-1].n += next - cur
		default:
			parts = append(parts, part{cur, next - cur, off})
		}
		if err == nil && (tr.Present || tr.Backed) {
			off += next - cur
		}
	}
	return parts, hole
}

// partDone gathers one part of a read cut by split.
func (m *Monitor) partDone(v *hv.VCPU, r *read, gen, off uint64, rd swapmem.Read) {
	if r.gen != gen || r.state != hcall.StatusPending {
		return
	}
	if rd.Err != nil {
		m.abandon(r)
		m.done(v, r, rd)
		return
	}
	copy(r.data[off:], rd.Data)
	r.flags |= rd.Flags
	if r.left--; r.left > 0 {
		return
	}
	m.done(v, r, swapmem.Read{CR3: rd.CR3, VA: rd.VA, Data: r.data, Flags: r.flags})
	r.data = nil
}

// abandon removes the live engine reads of r's parts.
func (m *Monitor) abandon(r *read) {
	for _, tx := range r.txs {
		_ = m.Engine.RemoveTransaction(tx) // finished ones answer ErrNoTransaction
	}
	r.txs = nil
}

// Func is a hypercall function an embedder adds: it gets the arguments
// (RDI, RSI, RDX) and returns RAX; stop ends the run loop.
type Func func(v *hv.VCPU, a1, a2, a3 uint64) (ret uint64, stop bool)

type extra struct {
	f     Func
	ring3 bool
}

// ErrTaken is Add's error for a function number already in use.
var ErrTaken = errors.New("monitor: hypercall number taken")

// Add adds hypercall nr, for CPL 0 only or (ring3) for every privilege
// level. The numbers of package hcall are taken.
func (m *Monitor) Add(nr uint64, ring3 bool, f Func) error {
	if nr <= hcall.SwapStatus || m.extra[nr].f != nil || f == nil {
		return fmt.Errorf("%w: %d", ErrTaken, nr)
	}
	if m.extra == nil {
		m.extra = make(map[uint64]extra)
	}
	m.extra[nr] = extra{f, ring3}
	return nil
}

// Call implements hv.Hypercalls.
func (m *Monitor) Call(v *hv.VCPU, nr, a1, a2, a3 uint64) (uint64, bool) {
	cpl := v.CPL()
	switch nr {
	case hcall.Identify:
		return hcall.Magic, false
	case hcall.Exit:
		if cpl != 0 && m.Ring3&Ring3Exit == 0 {
			return hcall.Denied, false
		}
		if a1 > 255 {
			return hcall.Invalid, false
		}
		m.Status = int(a1)
		return 0, true
	case hcall.Secret:
		if cpl != 0 && m.Ring3&Ring3Secret == 0 {
			return hcall.Denied, false
		}
		if m.SecretPA == 0 {
			return hcall.Unknown, false
		}
		return m.SecretPA, false
	case hcall.SwapRead:
		if m.Engine == nil {
			return hcall.Unknown, false
		}
		return m.swapRead(v, cpl, a1, a2), false
	case hcall.SwapStatus:
		if m.Engine == nil {
			return hcall.Unknown, false
		}
		r := m.reads[m.Spaces.Of(v.VMCS.Read(vmx.GuestCR3))]
		if r == nil {
			return hcall.Invalid, false
		}
		return r.state, false
	}
	if x := m.extra[nr]; x.f != nil {
		if cpl != 0 && !x.ring3 {
			return hcall.Denied, false
		}
		return x.f(v, a1, a2, a3)
	}
	return hcall.Unknown, false
}

// Options CPL 3 may use in a swap read: faults taken in user mode, or
// none; BPFault only when granted. Option 0 (a fault in whatever ring the
// guest is in) and KernelFault are kernel-mode faults injected at whatever
// point the kernel happens to run (atomic context, SMAP): their safety on
// Linux is not shown, so no caller gets them; CPL 0 may use every other
// option.
const (
	ring3Options  = swapmem.UserFault | swapmem.NoFault | swapmem.WriteFault | swapmem.NoDups
	faultOptions  = swapmem.UserFault | swapmem.NoFault | swapmem.BPFault
	requestInPage = 4096 - hcall.SwapRequestSize
)

// userTop is the end of the lower canonical half: user space.
func userTop(la57 bool) uint64 {
	if la57 {
		return 1 << 56
	}
	return 1 << 47
}

// swapRead starts a swap read of the caller's memory described by the
// request at guest-virtual req.
func (m *Monitor) swapRead(v *hv.VCPU, cpl int, req, size uint64) uint64 {
	if size != hcall.SwapRequestSize {
		return hcall.Invalid
	}
	// The request is read through the guest's IA-32e page tables: the
	// guest must be using them.
	if v.VMCS.Read(vmx.EntryControls)&vmx.EntryIA32eMode == 0 || v.VMCS.Read(vmx.GuestCR0)&vmx.CR0PG == 0 {
		return hcall.Invalid
	}
	// The caller's address space: a process calling from user mode shows
	// its user CR3, the kernel its kernel CR3; both name one space.
	cr3 := m.Spaces.Of(v.VMCS.Read(vmx.GuestCR3))
	la57 := v.VMCS.Read(vmx.GuestCR4)&vmx.CR4LA57 != 0
	if m.Paging != nil {
		m.Paging(la57, v.VMCS.Read(vmx.GuestEFER)&vmx.EFERNXE != 0)
	}
	r := m.reads[cr3]
	if req&0xfff > requestInPage {
		return hcall.Invalid
	}
	tr, err := m.Mem.Translate(cr3, req)
	if err != nil || !tr.Present {
		return hcall.Invalid
	}
	if cpl != 0 && (!tr.User || req >= userTop(la57)) {
		return hcall.Denied
	}
	var b [hcall.SwapRequestSize]byte
	if m.Mem.ReadPhys(tr.PA, b[:]) != nil {
		return hcall.Invalid
	}
	rq, err := hcall.DecodeSwapRequest(b[:])
	if err != nil || rq.Len == 0 || rq.Len > swapmem.MaxLen || rq.VA+rq.Len < rq.VA {
		return hcall.Invalid
	}
	opts := swapmem.Options(rq.Options)
	if opts&faultOptions == 0 || opts&swapmem.KernelFault != 0 {
		return hcall.Denied
	}
	if cpl != 0 {
		allowed := ring3Options
		if m.Ring3&Ring3BPFault != 0 {
			allowed |= swapmem.BPFault
		}
		if opts&^allowed != 0 || opts&faultOptions == 0 || rq.VA+rq.Len > userTop(la57) {
			return hcall.Denied
		}
	}
	switch {
	case r == nil:
		if r = m.slot(); r == nil {
			return hcall.Busy
		}
		m.reads[cr3] = r
	case r.state == hcall.StatusPending:
		// The address space's earlier read gives way: a process asks
		// for one read at a time, and a process that died with a read
		// pending must not hold up the next one the kernel gives its
		// page tables to. The earlier read's Done, if it comes, is
		// ignored (gen).
		m.abandon(r)
		m.logf("tamahv: swapmem read in CR3 %#x replaced by a new one\n", cr3)
	}
	st := m.Engine.Stats()
	m.gen++
	exits, timer := m.exits(v)
	*r = read{state: hcall.StatusPending, want: rq.SHA256, start: m.now(), exits: exits, timer: timer, injected: st.Injected, gen: m.gen}
	var preInject func(cr3, va uint64) bool
	if rq.Options&hcall.SwapVeto != 0 {
		preInject = func(uint64, uint64) bool { r.vetoes++; return false }
	}
	parts, hole := m.split(cr3, rq.VA, rq.Len, opts, r)
	if r.skipped > 0 && (len(parts) == 0 || len(parts) > MaxParts) {
		r.state = hcall.StatusFailed
		m.logf("tamahv: swapmem read FAILED: %d pages of %#x+%d not mapped, the first at %#x, %d mapped parts\n", r.skipped, rq.VA, rq.Len, hole, len(parts))
		return hcall.Invalid
	}
	r.left = len(parts)
	if r.skipped > 0 {
		r.data = make([]byte, 0, rq.Len)
		for _, p := range parts {
			r.data = r.data[:len(r.data)+int(p.n)]
		}
	}
	for _, p := range parts {
		done := func(rd swapmem.Read) { m.done(v, r, rd) }
		if r.skipped > 0 {
			gen, off := r.gen, p.off
			done = func(rd swapmem.Read) { m.partDone(v, r, gen, off, rd) }
		}
		tx, err := m.Engine.ReadData(swapmem.Request{CR3: cr3, VA: p.va, Len: int(p.n), Options: opts, PreInject: preInject, Done: done})
		if err != nil {
			m.abandon(r)
			r.state = hcall.StatusFailed
			m.logf("tamahv: swapmem read FAILED: %v\n", err)
			return hcall.Invalid
		}
		if tx != nil {
			r.txs = append(r.txs, tx)
		}
	}
	r.missing = m.Engine.Stats().Pages - st.Pages
	veto := ""
	if preInject != nil {
		veto = ", every injection vetoed"
	}
	if r.skipped > 0 {
		veto += fmt.Sprintf(", %d pages not mapped skipped (the first at %#x), %d parts", r.skipped, hole, len(parts))
	}
	m.logf("tamahv: swapmem read of %d bytes at %#x in CR3 %#x (%v%s) from CPL %d: %d pages missing\n", rq.Len, rq.VA, cr3, opts, veto, cpl, r.missing)
	return 0
}

// slot returns a read record for a new address space: a fresh one while
// fewer than MaxReads are kept, else one whose read ended (nil if none).
func (m *Monitor) slot() *read {
	if m.reads == nil {
		m.reads = make(map[uint64]*read)
	}
	if len(m.reads) < MaxReads {
		return &read{}
	}
	for cr3, r := range m.reads {
		if r.state != hcall.StatusPending {
			delete(m.reads, cr3)
			return r
		}
	}
	return nil
}

// exits returns the exit counts a read's figures are taken from.
func (m *Monitor) exits(v *hv.VCPU) (total, timer uint64) {
	if m.Exits != nil {
		return m.Exits(v)
	}
	return v.Total(), v.Count(vmx.ExitPreemptionTimer)
}

func (m *Monitor) done(v *hv.VCPU, r *read, rd swapmem.Read) {
	took := m.now().Sub(r.start)
	inj := m.Engine.Stats().Injected - r.injected
	exits, timer := m.exits(v)
	exits -= r.exits
	timer -= r.timer
	switch {
	case rd.Err != nil:
		r.state = hcall.StatusFailed
		m.logf("tamahv: swapmem read FAILED: %v\n", rd.Err)
	case sha256.Sum256(rd.Data) != r.want:
		r.state = hcall.StatusFailed
		m.logf("tamahv: swapmem read FAILED: sha256 %x, the guest expected %x\n", sha256.Sum256(rd.Data), r.want)
	case r.skipped > 0:
		r.state = hcall.StatusPartial
		m.logf("tamahv: swapmem read partial: sha256 %x, %d bytes of the mapped parts, %d pages not mapped left out, %d pages faulted in, %d #PFs injected, %d exits, %v\n",
			r.want, len(rd.Data), r.skipped, r.missing, inj, exits, took.Round(time.Millisecond))
	default:
		r.state = hcall.StatusOK
		m.logf("tamahv: swapmem read ok: sha256 %x, %d bytes, %d pages faulted in, %d #PFs injected, %d vetoed, %d exits (%d preemption timer), %v (flags %v)\n",
			r.want, len(rd.Data), r.missing, inj, r.vetoes, exits, timer, took.Round(time.Millisecond), rd.Flags)
	}
}

// Pending returns how many swap reads are pending.
func (m *Monitor) Pending() int {
	n := 0
	for _, r := range m.reads {
		if r.state == hcall.StatusPending {
			n++
		}
	}
	return n
}

// Watchdog reports, once each, the swap reads pending for longer than
// after, and returns whether it reported any (the caller may add its own
// state to the report).
func (m *Monitor) Watchdog(w io.Writer, after time.Duration) bool {
	now, any := m.now(), false
	for cr3, r := range m.reads {
		if r.state != hcall.StatusPending || r.reported || now.Sub(r.start) < after {
			continue
		}
		r.reported, any = true, true
		fmt.Fprintf(w, "tamahv: swapmem read in CR3 %#x pending for %v\n", cr3, now.Sub(r.start).Round(time.Second))
	}
	if any && m.Engine != nil {
		m.Engine.Dump(w)
	}
	return any
}

func (m *Monitor) now() time.Time {
	if m.Now != nil {
		return m.Now()
	}
	return time.Now()
}

// logf writes a line to Log, at most logBurst a second: a guest that asks
// for reads in a loop must not be able to fill tamahv's console.
func (m *Monitor) logf(format string, args ...any) {
	if m.Log == nil {
		return
	}
	now := m.now()
	if now.Sub(m.logSecond) >= time.Second {
		if m.suppressed > 0 {
			fmt.Fprintf(m.Log, "tamahv: %d swapmem log lines suppressed\n", m.suppressed)
		}
		m.logSecond, m.logLines, m.suppressed = now, 0, 0
	}
	if m.logLines >= logBurst {
		m.suppressed++
		return
	}
	m.logLines++
	fmt.Fprintf(m.Log, format, args...)
}

// WatchFailed fails the reads of an address space whose page-table watch
// could not follow the guest's tables (hv.GuestMemory.OnWatchError): they
// would never hear of their pages again.
func (m *Monitor) WatchFailed(cr3, va uint64, err error) {
	m.logf("tamahv: swapmem read FAILED: watch of %#x in CR3 %#x: %v\n", va, cr3, err)
	if m.Engine == nil || m.Engine.RemoveTransactionsForVaSpace(cr3) != nil {
		return
	}
	// The watch's CR3 is the address space the read was requested for
	// (Spaces.Of then): the reads' key as it is.
	if r := m.reads[cr3]; r != nil && r.state == hcall.StatusPending {
		r.state = hcall.StatusFailed
	}
}
