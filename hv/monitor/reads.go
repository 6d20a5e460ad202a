package monitor

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"time"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// The bounds on what the guest's swap reads make tamahv hold and do.
const (
	// MaxReads is how many address spaces may have a swap read tracked
	// at once, one read each.
	MaxReads = 64
	// ReadBudget bounds the bytes the live swap reads of the whole guest
	// may hold: each reserves its length (at most swapmem.MaxLen, half
	// the budget) from its start to its end. A read holds at most that
	// many bytes at any moment, and usually far fewer: the bytes are
	// hashed as they arrive in address order, and only those that
	// arrive ahead of a missing page are kept.
	ReadBudget = 2 * swapmem.MaxLen
	// Tenure is how long a pending read keeps its place. A new read
	// that finds MaxReads address spaces pending, or ReadBudget
	// reserved, ends the pending reads of other address spaces that have
	// had reads pending for longest, Tenure or more (a process that
	// replaces its own read keeps its age); with none such it is refused
	// with hcall.Busy.
	Tenure = 10 * time.Second
	// ExitBytes bounds the work of one VM exit on the guest's swap reads.
	// A read's range is walked once, in its hypercall's exit (at most
	// 4,096 walks), and cut into pieces of at most ExitBytes: the first
	// is started (its present pages read) in that exit, the next ones
	// one before each VM entry (Pump). Every byte is read, copied and
	// hashed once; bytes that arrive ahead of a missing page are kept
	// and hashed once it arrives, ExitBytes at most per exit.
	ExitBytes = 1 << 20
	// MaxParts bounds the mapped parts one swap read of a range with
	// pages not mapped may have; a range cut into more is refused.
	MaxParts = 16
)

// read is one address space's last swap read.
type read struct {
	space    uint64 // the address space (Spaces.Of), the key in reads
	state    uint64 // hcall.StatusPending, StatusOK, StatusFailed, StatusPartial
	want     [32]byte
	sum      hash.Hash // of the bytes passed on in address order
	bytes    uint64    // bytes hashed
	start    time.Time
	since    time.Time // the address space's reads have been pending since
	v        *hv.VCPU  // the caller
	exits    uint64
	timer    uint64 // VMX-preemption-timer exits when the read began
	injected uint64
	missing  int
	vetoes   int
	reported bool // the watchdog spoke

	opts      swapmem.Options
	preInject func(cr3, va uint64) bool
	gen       uint64  // this read's number: a late call of an earlier read is ignored
	skipped   int     // pages not mapped, left out of the read
	pieces    []piece // the mapped parts of the range, cut at ExitBytes
	next      int     // pieces started
	head      int     // pieces hashed whole
	flags     swapmem.Flags
	reserved  uint64 // bytes of ReadBudget
	queued    bool   // in Monitor.work
	advancing bool   // in advance

	// The record ends with its address space: a watch on the address of
	// the request that made it hears the top-level entry there change.
	top    uint64
	cancel func()
}

// piece is one engine read of a part of a swap read's range.
type piece struct {
	va, n uint64
	tx    *swapmem.Transaction // live; nil before its start and once done
	held  [][]byte             // its bytes that arrived before an earlier piece's
	done  bool
}

// live reports whether r is the pending read numbered gen.
func (r *read) live(gen uint64) bool { return r.gen == gen && r.state == hcall.StatusPending }

// part is a mapped part of a read's range: n bytes at va.
type part struct{ va, n uint64 }

// split cuts the range [va, va+n) at the pages that no fault can bring in
// (guestmem.Walker: a walk that ends at a zero entry or misses a table, as after
// munmap; or fails) and returns the parts in between, how many pages it
// left out and the first of them. Reads without a fault (NoFault) wait
// for every page and are not cut. A range with no such page is one part.
func (m *Monitor) split(cr3, va, n uint64, opts swapmem.Options) (parts []part, skipped int, hole uint64) {
	if opts&swapmem.NoFault != 0 {
		return []part{{va, n}}, 0, 0
	}
	end := va + n // the caller checked that the range does not wrap
	for cur, next := va, uint64(0); cur < end; cur = next {
		if next = cur&^0xfff + 0x1000; next == 0 || next > end {
			next = end
		}
		tr, err := m.Mem.Translate(cr3, cur)
		switch k := len(parts); {
		case err != nil || !tr.Present && !tr.Backed:
			if skipped == 0 {
				hole = cur &^ 0xfff
			}
			skipped++
		case k > 0 && parts[k-1].va+parts[k-1].n == cur:
			parts[k-1].n += next - cur
		default:
			parts = append(parts, part{cur, next - cur})
		}
	}
	return parts, skipped, hole
}

// cut makes the pieces of parts: at most ExitBytes each.
func cut(parts []part) []piece {
	var ps []piece
	for _, p := range parts {
		for off := uint64(0); off < p.n; off += ExitBytes {
			ps = append(ps, piece{va: p.va + off, n: min(ExitBytes, p.n-off)})
		}
	}
	return ps
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
	// its user CR3, the kernel its kernel CR3; both name one space. Space
	// 0 is no address space (to the engine it is the system's: a user
	// PGD at 0x1000 with page-table isolation would read the kernel's).
	cr3 := m.Spaces.Of(v.VMCS.Read(vmx.GuestCR3))
	if cr3 == 0 {
		return hcall.Invalid
	}
	la57 := v.VMCS.Read(vmx.GuestCR4)&vmx.CR4LA57 != 0
	if req&0xfff > requestInPage {
		return hcall.Invalid
	}
	tr, err := m.Mem.Translate(cr3, req)
	if err != nil || !tr.Present {
		return hcall.Invalid
	}
	if cpl != 0 && (!tr.User || req >= vmx.UserTop(la57)) {
		return hcall.Denied
	}
	var b [hcall.SwapRequestSize]byte
	if m.Mem.ReadPhys(tr.PA, b[:]) != nil {
		return hcall.Invalid
	}
	// Other vCPUs run meanwhile: the request counts only if its page
	// still translates as it did when it was read.
	if again, err := m.Mem.Translate(cr3, req); err != nil || again != tr {
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
		if opts&^allowed != 0 || opts&faultOptions == 0 || rq.VA+rq.Len > vmx.UserTop(la57) {
			return hcall.Denied
		}
	}

	parts, skipped, hole := m.split(cr3, rq.VA, rq.Len, opts)
	refused := skipped > 0 && (len(parts) == 0 || len(parts) > MaxParts)
	var need uint64
	if !refused {
		for _, p := range parts {
			need += p.n
		}
	}
	if m.reads[cr3] == nil {
		// A new address space's record ends with it: watch its
		// top-level entry where the request is.
		w := &read{space: cr3, top: tr.Top}
		if w.cancel, err = m.Mem.Watch(cr3, m.quietVA(req, tr.Top, la57), m.spaceWatch(w)); err != nil {
			return hcall.Invalid
		}
		if !m.admit(w, need) {
			w.cancel()
			return hcall.Busy
		}
	} else if !m.admit(m.reads[cr3], need) {
		return hcall.Busy
	}
	r := m.reads[cr3]
	since := m.now()
	if r.state == hcall.StatusPending || !r.start.IsZero() && since.Sub(r.start) < Tenure {
		// The address space's place is aged from the first read of
		// a run of reads each asked for within Tenure of the one
		// before: a process cannot stay young by asking again, nor
		// by slipping in a read that ends at once.
		since = r.since
	}
	if r.state == hcall.StatusPending {
		// The address space's earlier read gives way: a process asks
		// for one read at a time.
		m.abandon(r)
		m.logf("tamahv: swapmem read in CR3 %#x replaced by a new one\n", cr3)
	}
	st := m.Engine.Stats()
	m.gen++
	exits, timer := m.exits(v)
	*r = read{space: cr3, state: hcall.StatusPending, want: rq.SHA256, sum: sha256.New(), start: m.now(), since: since, v: v,
		exits: exits, timer: timer, injected: st.Injected, opts: opts, gen: m.gen, skipped: skipped,
		top: r.top, cancel: r.cancel, queued: r.queued}
	if rq.Options&hcall.SwapVeto != 0 {
		r.preInject = func(uint64, uint64) bool { r.vetoes++; return false }
	}
	if refused {
		r.state = hcall.StatusFailed
		m.logf("tamahv: swapmem read FAILED: %d pages of %#x+%d not mapped, the first at %#x, %d mapped parts\n", skipped, rq.VA, rq.Len, hole, len(parts))
		return hcall.Invalid
	}
	r.pieces = cut(parts)
	r.reserved = need
	m.held += need
	if err := m.advance(r, ExitBytes); err != nil {
		return hcall.Invalid
	}
	veto := ""
	if r.preInject != nil {
		veto = ", every injection vetoed"
	}
	if skipped > 0 {
		veto += fmt.Sprintf(", %d pages not mapped skipped (the first at %#x), %d parts", skipped, hole, len(parts))
	}
	m.logf("tamahv: swapmem read of %d bytes at %#x in CR3 %#x (%v%s) from CPL %d: %d pages missing\n", rq.Len, rq.VA, cr3, opts, veto, cpl, r.missing)
	return 0
}

// admit makes room for a read of need bytes by r's address space (r is
// its record, or a new one, not yet kept): a record, unless it has one,
// and need bytes of ReadBudget, counting those of its own pending read,
// which the new one replaces. Where there is no room, the pending reads of
// other address spaces pending since Tenure ago or more end, the oldest
// first. It reports false, and changes nothing, when that is not enough.
func (m *Monitor) admit(r *read, need uint64) bool {
	if m.reads == nil {
		m.reads = make(map[uint64]*read)
	}
	free := ReadBudget - m.held
	if r.state == hcall.StatusPending {
		free += r.reserved
	}
	kept := m.reads[r.space] == r
	now := m.now()
	// A record to reuse: one whose read ended and started Tenure ago or
	// more, else that of a read ended below. A read that ended lately
	// keeps its record: its process may still ask for its status.
	old := m.ended(now)
	record := kept || len(m.reads) < MaxReads || old != nil
	var victims []*read
	for !record || need > free {
		var v *read
		for _, x := range m.reads {
			if x == r || x.state != hcall.StatusPending || now.Sub(x.since) < Tenure || contains(victims, x) {
				continue
			}
			if v == nil || x.since.Before(v.since) || x.since.Equal(v.since) && x.space < v.space {
				v = x
			}
		}
		if v == nil {
			return false
		}
		victims = append(victims, v)
		free += v.reserved
		record = true // its record ends, and can be reused
	}
	for _, v := range victims {
		m.abandon(v)
		v.state = hcall.StatusFailed
		m.logf("tamahv: swapmem read in CR3 %#x ended after %v pending: another address space's read needs its place\n", v.space, now.Sub(v.since).Round(time.Second))
	}
	if !kept {
		if len(m.reads) >= MaxReads {
			if old == nil {
				old = victims[0]
			}
			m.forget(old)
		}
		m.reads[r.space] = r
	}
	return true
}

func contains(rs []*read, r *read) bool {
	for _, x := range rs {
		if x == r {
			return true
		}
	}
	return false
}

// ended returns the record whose read ended and started earliest, of
// those that started Tenure ago or more, or nil: a process that just had
// its answer can still ask for its status.
func (m *Monitor) ended(now time.Time) *read {
	var e *read
	for _, r := range m.reads {
		if r.state == hcall.StatusPending || now.Sub(r.start) < Tenure {
			continue
		}
		if e == nil || r.start.Before(e.start) || r.start.Equal(e.start) && r.space < e.space {
			e = r
		}
	}
	return e
}

// quietVA returns an address in the top-level slot of req whose walk stops
// at the next level, at an entry the guest left empty: a watch there
// protects two paging-structure pages only, which the guest rarely
// writes. Where it finds none, req.
func (m *Monitor) quietVA(req, top uint64, la57 bool) uint64 {
	if top&swapmem.TopPresent == 0 {
		return req
	}
	var table [4096]byte
	if m.Mem.ReadPhys(top&vmx.PTEAddress, table[:]) != nil {
		return req
	}
	shift := uint(39) // the slot of a PML4 entry, or of a PML5 entry below
	if la57 {
		shift = 48
	}
	for i := uint64(0); i < 512; i++ {
		if binary.LittleEndian.Uint64(table[8*i:]) == 0 {
			return req&^(1<<shift-1) | i<<(shift-9)
		}
	}
	return req
}

// spaceWatch returns the function of r's watch: when the top-level entry
// at r's request changes, the address space is gone (the guest tore it
// down; its top-level table may be another process's next), and with it
// r's read and status.
func (m *Monitor) spaceWatch(r *read) func(swapmem.Translation) {
	return func(tr swapmem.Translation) {
		if tr.Top == r.top || m.reads[r.space] != r {
			return
		}
		if r.state == hcall.StatusPending {
			m.logf("tamahv: swapmem read FAILED: address space %#x went away: its top-level entry was %#x, now %#x\n", r.space, r.top, tr.Top)
		}
		m.forget(r)
	}
}

// forget drops r's record: its read ends, and its status goes.
func (m *Monitor) forget(r *read) {
	m.abandon(r)
	r.state = hcall.StatusFailed
	if r.cancel != nil {
		r.cancel()
		r.cancel = nil
	}
	if m.reads[r.space] == r {
		delete(m.reads, r.space)
	}
}

// abandon removes the live engine reads of r's pieces and gives back what
// r holds; no piece of it starts any more.
func (m *Monitor) abandon(r *read) {
	for i := range r.pieces {
		p := &r.pieces[i]
		if p.tx != nil {
			_ = m.Engine.RemoveTransaction(p.tx) // finished ones answer ErrNoTransaction
			p.tx = nil
		}
		p.held = nil
	}
	r.next = len(r.pieces)
	m.release(r)
}

// release gives r's bytes back to ReadBudget.
func (m *Monitor) release(r *read) {
	m.held -= r.reserved
	r.reserved = 0
}

// Busy reports whether swap reads have work left for Pump.
func (m *Monitor) Busy() bool { return len(m.work) > 0 }

// Pump goes on with the swap reads that have work left, one read in turn,
// ExitBytes at most: bytes kept to hash, pieces to start. Call it before
// every VM entry: it costs one comparison when there is nothing to do.
func (m *Monitor) Pump() {
	for len(m.work) > 0 {
		r := m.work[0]
		m.work[0] = nil
		m.work = m.work[1:]
		r.queued = false
		if r.state != hcall.StatusPending {
			continue
		}
		_ = m.advance(r, ExitBytes) // a piece that cannot start ends its read
		return
	}
}

// advance hashes what r kept, then starts its next pieces, budget bytes in
// all (a piece at least when nothing was hashed); r ends when every piece
// is hashed. A read with work left waits in Monitor.work for Pump. A piece
// the engine refuses fails the read, and its error is returned.
func (m *Monitor) advance(r *read, budget uint64) error {
	if r.advancing {
		return nil // a piece that ended while advance started it: advance goes on
	}
	r.advancing = true
	defer func() { r.advancing = false }()
	gen := r.gen
	spent := m.flush(r, budget)
	var err error
	if r.live(gen) && spent < budget {
		var started uint64
		started, err = m.startPieces(r, budget-spent, spent == 0)
		spent += started
	}
	if r.live(gen) {
		// Pieces that ended at once were hashed as they were read.
		m.flush(r, budget-min(spent, budget))
	}
	m.queue(r)
	return err
}

// queue puts a pending r with work left in Monitor.work, for Pump.
func (m *Monitor) queue(r *read) {
	if r.state == hcall.StatusPending && !r.queued && (r.next < len(r.pieces) || r.backlog()) {
		r.queued = true
		m.work = append(m.work, r)
	}
}

// backlog reports whether r has bytes kept that may be hashed now.
func (r *read) backlog() bool {
	if r.head == len(r.pieces) {
		return false
	}
	h := &r.pieces[r.head]
	return len(h.held) > 0 || h.done
}

// flush hashes the bytes kept for r's pieces in address order, from its
// first piece not hashed whole, until budget bytes are hashed or a piece
// still misses bytes; it ends r once every piece is hashed. It returns
// the bytes hashed.
func (m *Monitor) flush(r *read, budget uint64) uint64 {
	var spent uint64
	for r.head < len(r.pieces) {
		h := &r.pieces[r.head]
		for len(h.held) > 0 && spent < budget {
			b := h.held[0]
			h.held[0] = nil
			h.held = h.held[1:]
			r.sum.Write(b)
			r.bytes += uint64(len(b))
			spent += uint64(len(b))
		}
		if len(h.held) > 0 || !h.done {
			break
		}
		h.held = nil
		r.head++
	}
	if r.head == len(r.pieces) {
		m.done(r)
	}
	return spent
}

// startPieces starts r's next pieces, up to budget bytes (and one in any
// case if one is set), and returns the bytes started. A piece the engine
// refuses fails the read, and its error is returned.
func (m *Monitor) startPieces(r *read, budget uint64, one bool) (started uint64, err error) {
	gen := r.gen
	for r.live(gen) && r.next < len(r.pieces) {
		k := r.next
		p := &r.pieces[k]
		if started+p.n > budget && !(one && started == 0) {
			break
		}
		started += p.n
		r.next++
		pages := m.Engine.Stats().Pages
		var tx *swapmem.Transaction
		tx, err = m.Engine.ReadData(swapmem.Request{CR3: r.space, VA: p.va, Len: int(p.n), Options: r.opts, PreInject: r.preInject,
			Stream: func(b []byte) { m.pieceBytes(r, gen, k, b) },
			Done:   func(rd swapmem.Read) { m.pieceDone(r, gen, k, rd) }})
		if err == nil && tx == nil && r.live(gen) && !p.done {
			err = errors.New("monitor: a read of the same range is live") // NoDups
		}
		if err != nil {
			if r.live(gen) {
				m.fail(r, err)
			}
			return started, err
		}
		if r.live(gen) && !p.done {
			p.tx = tx
			r.missing += m.Engine.Stats().Pages - pages
		}
	}
	return started, nil
}

// pieceBytes takes bytes of piece k of read gen, in address order within
// the piece: hashed at once when every byte before them is, else kept.
func (m *Monitor) pieceBytes(r *read, gen uint64, k int, b []byte) {
	if !r.live(gen) {
		return
	}
	if k == r.head && len(r.pieces[k].held) == 0 {
		r.sum.Write(b)
		r.bytes += uint64(len(b))
		return
	}
	r.pieces[k].held = append(r.pieces[k].held, append([]byte(nil), b...))
}

// pieceDone ends piece k of read gen; the read ends with its last piece,
// or with the first that fails.
func (m *Monitor) pieceDone(r *read, gen uint64, k int, rd swapmem.Read) {
	if !r.live(gen) {
		return
	}
	if rd.Err != nil {
		m.fail(r, rd.Err)
		return
	}
	p := &r.pieces[k]
	p.done, p.tx = true, nil
	r.flags |= rd.Flags
	if k == r.head && !r.advancing {
		// What was kept behind it is hashed before the next entries.
		m.flush(r, 0)
		m.queue(r)
	}
}

// fail ends r with err. (A read whose address space was torn down fails
// with swapmem.ErrSpaceGone; the record's own watch then takes the record
// away.)
func (m *Monitor) fail(r *read, err error) {
	m.abandon(r)
	r.state = hcall.StatusFailed
	m.logf("tamahv: swapmem read FAILED: %v\n", err)
}

// exits returns the exit counts a read's figures are taken from.
func (m *Monitor) exits(v *hv.VCPU) (total, timer uint64) {
	if m.Exits != nil {
		return m.Exits(v)
	}
	return v.Total(), v.Count(vmx.ExitPreemptionTimer)
}

// done ends r, every piece read and hashed: its status is whether the
// bytes have the digest the guest expected.
func (m *Monitor) done(r *read) {
	took := m.now().Sub(r.start)
	inj := m.Engine.Stats().Injected - r.injected
	exits, timer := m.exits(r.v)
	exits -= r.exits
	timer -= r.timer
	var got [32]byte
	r.sum.Sum(got[:0])
	r.sum, r.pieces = nil, nil
	m.release(r)
	switch {
	case got != r.want:
		r.state = hcall.StatusFailed
		m.logf("tamahv: swapmem read FAILED: sha256 %x, the guest expected %x\n", got, r.want)
	case r.skipped > 0:
		r.state = hcall.StatusPartial
		m.logf("tamahv: swapmem read partial: sha256 %x, %d bytes of the mapped parts, %d pages not mapped left out, %d pages faulted in, %d #PFs injected, %d exits, %v\n",
			r.want, r.bytes, r.skipped, r.missing, inj, exits, took.Round(time.Millisecond))
	default:
		r.state = hcall.StatusOK
		m.logf("tamahv: swapmem read ok: sha256 %x, %d bytes, %d pages faulted in, %d #PFs injected, %d vetoed, %d exits (%d preemption timer), %v (flags %v)\n",
			r.want, r.bytes, r.missing, inj, r.vetoes, exits, timer, took.Round(time.Millisecond), r.flags)
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

// Held returns the bytes of ReadBudget the pending swap reads reserved.
func (m *Monitor) Held() uint64 { return m.held }

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

// WatchFailed fails the reads of an address space whose page-table watch
// could not follow the guest's tables (guestmem.Watcher.OnWatchError): they
// would never hear of their pages again.
func (m *Monitor) WatchFailed(cr3, va uint64, err error) {
	m.logf("tamahv: swapmem read FAILED: watch of %#x in CR3 %#x: %v\n", va, cr3, err)
	if m.Engine == nil || m.Engine.RemoveTransactionsForVaSpace(cr3) != nil {
		return
	}
	// The watch's CR3 is the address space the read was requested for
	// (Spaces.Of then): the reads' key as it is.
	if r := m.reads[cr3]; r != nil && r.state == hcall.StatusPending {
		m.abandon(r)
		r.state = hcall.StatusFailed
	}
}
