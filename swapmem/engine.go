package swapmem

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

const pageMask = PageSize4K - 1

// Transaction is one live read: a range whose missing pages have not all
// come in yet. It is the handle RemoveTransaction takes.
type Transaction struct {
	e         *Engine
	id        uint64
	cr3       uint64 // as requested (0: system space, any CR3 faults)
	tcr3      uint64 // the address space translated
	va        uint64
	opts      Options
	done      func(Read)
	preInject func(cr3, va uint64) bool

	n int // bytes requested
	// stream passes bytes on in address order (Request.Stream); sent is
	// how many it passed on.
	stream func([]byte)
	sent   int
	// held are the bytes read and kept, by page of the range: those of a
	// streaming read that wait for a page before them, or every page of
	// a read without Stream until Done. Allocated at the first page kept.
	held    [][]byte
	heldN   int // bytes in held
	data    []byte
	pa      uint64
	flags   Flags
	missing int // waiters still attached
	waiters []waiter
	state   txState
	err     error

	deadline time.Duration // engine time (Engine.clock) at which it fails
	dl       int           // index+1 in Engine.dl; 0: not there

	all      link[Transaction] // Engine.all, in creation order
	inSpace  link[Transaction] // space.txs
	doneNext *Transaction      // completion batch, run after unlocking
}

type txState uint8

const (
	txLive txState = iota
	txFinished
	txRemoved
)

// waiter is one missing page of one transaction.
type waiter struct {
	tx   *Transaction
	off  int // offset of the page's first wanted byte in the range
	n    int // bytes wanted from this page
	s    *slot
	link link[waiter]
}

func (w *waiter) va() uint64 { return w.tx.va + uint64(w.off) }

// slotKey identifies a schedulable page: transactions share a fault when
// they ask for the same page of the same requested space with the same
// fault options.
type slotKey struct {
	cr3   uint64 // requested CR3
	page  uint64
	class Options
}

type slotState uint8

const (
	slotWaiting slotState = iota // NoFault: never injected
	slotReady                    // in a ready queue
	slotClaimed                  // chosen by InjectPendingPF, PreInject being asked
	slotPending                  // #PF injected, page not in yet
	slotParked                   // not backed: not injected; fails after Config.Timeout
	slotBackoff                  // the last injection failed: retried after the next timer tick
)

var slotStateNames = [...]string{"waiting", "ready", "claimed", "pending", "parked", "backoff"}

type slot struct {
	key      slotKey
	w        *watch
	sp       *space
	waiters  ilist[waiter]
	state    slotState
	queue    *ilist[slot] // the list qlink is in: a ready queue, parked or backoff
	qlink    link[slot]
	wlink    link[slot] // watch.slots
	seq      uint64     // queue order: smaller was queued earlier
	attempts int
	// refusedSince is when the CPU began refusing this slot's injections
	// (valid while refusing).
	refusedSince time.Duration
	refusing     bool
	// since is when the pending #PF was injected (or confirmed delivered),
	// or when the slot was parked.
	since     time.Duration
	delivered bool // the pending #PF reached the guest (PFDelivered)
}

func (s *slot) write() bool { return s.key.class&WriteFault != 0 }

// injectable reports whether a #PF can bring in a page whose translation is
// tr: a backed not-present page, or a present read-only one for a write.
func injectable(tr Translation, write bool) bool {
	if tr.Present {
		return write && !tr.Writable
	}
	return tr.Backed
}

// queueIndex says which ring queue of a space a slot waits in.
func (s *slot) queueIndex() int {
	switch {
	case s.key.class&UserFault != 0:
		return queueUser
	case s.key.class&KernelFault != 0:
		return queueKernel
	}
	return queueAny
}

const (
	queueAny = iota
	queueUser
	queueKernel
	numQueues
)

type watchKey struct {
	cr3  uint64 // translated CR3
	page uint64
}

type watch struct {
	key    watchKey
	cancel func()
	tr     Translation // the latest translation seen
	slots  ilist[slot]
	dead   bool
}

// space holds what belongs to one requested CR3: its transactions and the
// ready queues of its pages, one per ring rule.
type space struct {
	cr3    uint64
	txs    ilist[Transaction]
	queues [numQueues]ilist[slot]
	nready int // slots in queues
}

type orphanPF struct {
	active bool
	page   uint64
	since  time.Duration
}

type dupKey struct {
	cr3, va uint64
	n       int
	opts    Options
}

// Stats counts what an Engine did.
type Stats struct {
	Live      int    // live transactions
	Pages     int    // distinct pages waiting (shared by transactions)
	Watches   int    // page-table watches held
	Spaces    int    // address spaces with live transactions
	Injected  uint64 // #PFs injected (directly or through the breakpoint agent)
	Cancelled uint64 // injections displaced by another event
	Delivered uint64 // injections confirmed delivered (PFDelivered)
	TimedOut  uint64 // pending #PFs re-armed by ReinjectFailedPF
	Vetoed    uint64 // injections vetoed by PreInject
	Refused   uint64 // injections the CPU refused (InjectPF or InjectBPFault failed)
	Completed uint64 // transactions whose Done ran with data
	Failed    uint64 // transactions whose Done ran with an error
	Expired   uint64 // transactions failed by their deadline (also in Failed)
	Removed   uint64 // transactions removed before completing
	// SpaceGone counts transactions ended because their address space's
	// tables went away (ErrSpaceGone; also in Failed).
	SpaceGone uint64
	// Withdrawn counts breakpoint-agent armings taken back (BPWithdrawer).
	Withdrawn uint64
	// Held is the bytes live transactions hold: read, and not yet passed
	// on (Stream) or delivered (Done).
	Held int
	// Yielded counts injections an address space gave up to another's
	// after holding the in-flight #PF for Config.Timeout.
	Yielded uint64
}

// Engine is the swapmem engine for one guest. Its methods are safe for
// concurrent use by several vCPUs.
type Engine struct {
	mu          sync.Mutex
	g           Guest
	timeout     time.Duration
	deadline    time.Duration
	now         func() time.Duration
	maxAttempts int
	closed      bool

	// lastNow is the clock's latest reading and skew what clock adds to
	// it: the sum of the steps back it took.
	lastNow, skew time.Duration

	// nready and busy let InjectPendingPF return without the lock when
	// there is nothing to do.
	nready atomic.Int64
	busy   atomic.Bool

	watches map[watchKey]*watch
	slots   map[slotKey]*slot
	spaces  map[uint64]*space
	dups    map[dupKey]*Transaction
	all     ilist[Transaction]
	pending *slot // claimed or pending
	orphan  orphanPF
	parked  ilist[slot]    // slots not backed, oldest first
	backoff ilist[slot]    // slots whose injection failed
	dl      []*Transaction // live transactions, a min-heap on deadline
	seq     uint64
	nextID  uint64
	stats   Stats
	held    int // bytes all transactions hold
	// run is the address space whose #PFs hold the guest-wide slot, or
	// held it last, and since when it holds it with no other space's #PF
	// in between (see mayInject).
	run holdRun
	// owed is the ready page that had waited longest when the slot last
	// became free, and owedSince when: for a while only its address space
	// may take the slot (pick).
	owed      *slot
	owedSince time.Duration
	// scratch is where a page is read before it is passed on or kept.
	scratch [PageSize4K]byte
}

// holdRun is one address space's run of #PFs in the guest-wide slot.
type holdRun struct {
	cr3   uint64 // requested CR3 of the slots injected
	since time.Duration
	// yielding: the space has held the slot for Config.Timeout and gives
	// way to others since yieldSince.
	yielding   bool
	yieldSince time.Duration
	last       time.Duration // when its latest #PF left the slot
}

// New returns an engine that reads g's memory (IntSwapMemInit).
func New(g Guest, c Config) *Engine {
	e := &Engine{
		g:           g,
		timeout:     c.Timeout,
		now:         c.Now,
		maxAttempts: c.MaxAttempts,
		watches:     make(map[watchKey]*watch),
		slots:       make(map[slotKey]*slot),
		spaces:      make(map[uint64]*space),
		dups:        make(map[dupKey]*Transaction),
		all:         ilist[Transaction]{at: func(t *Transaction) *link[Transaction] { return &t.all }},
		deadline:    c.Deadline,
	}
	e.parked.at = func(s *slot) *link[slot] { return &s.qlink }
	e.backoff.at = e.parked.at
	if e.timeout <= 0 {
		e.timeout = DefaultTimeout
	}
	if e.deadline <= 0 {
		e.deadline = DefaultDeadline
	}
	if e.maxAttempts <= 0 {
		e.maxAttempts = DefaultMaxAttempts
	}
	if e.now == nil {
		start := time.Now()
		e.now = func() time.Duration { return time.Since(start) }
	}
	return e
}

// clock returns the engine's time: Config.Now made monotonic. A step back
// of the clock counts as no time passing, so that a clock set back (a guest
// that writes the TSC) neither stalls the timers nor fires them. The caller
// holds e.mu.
func (e *Engine) clock() time.Duration {
	now := e.now()
	if now < e.lastNow {
		e.skew += e.lastNow - now
	}
	e.lastNow = now
	return now + e.skew
}

// validate checks a request without touching the engine.
func validate(r *Request) error {
	switch {
	case r.Len <= 0:
		return fmt.Errorf("%w: length %d", ErrBadRequest, r.Len)
	case r.Len > MaxLen:
		return fmt.Errorf("%w: length %d above the maximum %d", ErrBadRequest, r.Len, MaxLen)
	case r.VA+uint64(r.Len)-1 < r.VA:
		return fmt.Errorf("%w: range %#x+%#x wraps", ErrBadRequest, r.VA, r.Len)
	case !canonical(r.VA, r.VA+uint64(r.Len)-1):
		return fmt.Errorf("%w: range %#x+%#x is not canonical", ErrBadRequest, r.VA, r.Len)
	case r.Options&^knownOptions != 0:
		return fmt.Errorf("%w: unknown options %#x", ErrBadRequest, uint32(r.Options&^knownOptions))
	case r.Options&UserFault != 0 && r.Options&KernelFault != 0:
		return fmt.Errorf("%w: UserFault and KernelFault together", ErrBadRequest)
	case r.Options&NoFault != 0 && r.Options&(UserFault|KernelFault|BPFault) != 0:
		return fmt.Errorf("%w: NoFault with an injection option (%v)", ErrBadRequest, r.Options)
	case r.Options&BPFault != 0 && r.Options&UserFault != 0:
		return fmt.Errorf("%w: BPFault raises kernel-mode faults; UserFault contradicts it", ErrBadRequest)
	case r.Options&BPFault != 0 && r.Options&WriteFault != 0:
		// CPU.InjectBPFault carries no access type.
		return fmt.Errorf("%w: BPFault raises read faults; WriteFault needs a direct injection", ErrBadRequest)
	case r.Deadline < 0:
		return fmt.Errorf("%w: negative deadline %v", ErrBadRequest, r.Deadline)
	}
	return nil
}

// canonical reports whether first and last lie in the same canonical half
// of the widest (57-bit, 5-level) address space.
func canonical(first, last uint64) bool {
	const lowTop, highBottom = 1<<56 - 1, ^uint64(1<<56 - 1)
	if last <= lowTop {
		return true
	}
	return first >= highBottom
}

// ReadData reads r.Len bytes at r.VA in r.CR3 and calls r.Done when all of
// them are in (IntSwapMemReadData).
//
// If every page is present, Done runs before ReadData returns, without
// Async, and the returned *Transaction is nil. Otherwise the missing pages
// are watched and scheduled for injection, and the transaction is returned.
// With NoDups and a live transaction of the same CR3, VA, Len and Options,
// ReadData returns nil, nil and does nothing else.
//
// A bad request returns an error wrapping ErrBadRequest and changes
// nothing: Len ≤ 0 or above MaxLen, a range that wraps or leaves the
// canonical half it starts in, unknown option bits, UserFault with
// KernelFault, NoFault with an injection option, BPFault with UserFault or
// WriteFault (the breakpoint agent raises kernel-mode read faults), a
// negative Deadline.
//
// Without NoFault, a missing page that a #PF cannot bring in (not backed,
// see Translation.Backed) makes ReadData return an error wrapping
// ErrNotBacked, and nothing changes; with NoFault the read waits for it.
// A page that stops being backed while it is waited for is not faulted
// and, unless it is backed again within Config.Timeout, fails the read
// with ErrNotBacked.
//
// The transaction's deadline is Request.Deadline, or Config.Deadline when
// that is 0; once it has passed, ReinjectFailedPF fails the read with
// ErrDeadline.
func (e *Engine) ReadData(r Request) (*Transaction, error) {
	if err := validate(&r); err != nil {
		return nil, err
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil, ErrClosed
	}
	dk := dupKey{r.CR3, r.VA, r.Len, r.Options}
	if r.Options&NoDups != 0 && e.dups[dk] != nil {
		e.mu.Unlock()
		return nil, nil
	}
	t := &Transaction{
		e: e, cr3: r.CR3, tcr3: r.CR3, va: r.VA, opts: r.Options,
		done: r.Done, preInject: r.PreInject, n: r.Len, stream: r.Stream,
	}
	if t.tcr3 == 0 {
		t.tcr3 = e.g.SystemCR3()
	}
	if err := e.readPresent(t); err != nil {
		e.release(t)
		e.mu.Unlock()
		return nil, err
	}
	if len(t.waiters) > 0 {
		if err := e.attach(t); err != nil {
			e.forgetSpace(t.cr3)
			e.release(t)
			e.mu.Unlock()
			return nil, err
		}
	}
	if t.missing == 0 {
		// Attaching may have made the space of t's pages; nothing else
		// would free it.
		e.forgetSpace(t.cr3)
		t.state = txFinished
		e.stats.Completed++
		e.deliver(t)
		e.mu.Unlock()
		t.call(0)
		return nil, nil
	}
	e.nextID++
	t.id = e.nextID
	e.all.pushBack(t)
	e.spaceOf(t.cr3).txs.pushBack(t)
	d := r.Deadline
	if d == 0 {
		d = e.deadline
	}
	now := e.clock()
	t.deadline = now + d
	if t.deadline < now {
		t.deadline = 1<<63 - 1
	}
	e.dlPush(t)
	if r.Options&NoDups != 0 {
		e.dups[dk] = t
	}
	e.mu.Unlock()
	return t, nil
}

// readPresent translates the range a 4 KiB page at a time, reads what is
// present and records a waiter for each missing page. A missing page that a
// faulting request could not fault in fails the request with ErrNotBacked.
func (e *Engine) readPresent(t *Transaction) error {
	write := t.opts&WriteFault != 0
	end := t.va + uint64(t.n) // may be 0 for a range ending at 2^64
	for cur := t.va; cur != end; {
		n := chunk(cur, end, PageSize4K)
		tr, err := e.g.Translate(t.tcr3, cur)
		if t.opts&NoFault == 0 && (err != nil || !satisfies(tr, write) && !injectable(tr, write)) {
			return fmt.Errorf("%w: %#x in CR3 %#x", ErrNotBacked, cur, t.tcr3)
		}
		if err == nil && satisfies(tr, write) {
			ok, err := e.readStable(t, cur, tr, write, int(n))
			if err != nil {
				return err
			}
			if ok {
				cur += n
				continue
			}
		}
		t.waiters = append(t.waiters, waiter{tx: t, off: int(cur - t.va), n: int(n)})
		cur += n
	}
	return nil
}

// chunk returns how many bytes from cur up to end lie in cur's page of the
// given size.
func chunk(cur, end, size uint64) uint64 {
	n := size - cur&(size-1)
	if end != 0 && end-cur < n {
		n = end - cur
	}
	return n
}

func satisfies(tr Translation, write bool) bool {
	return tr.Present && (tr.Writable || !write)
}

// collect records what reading va at pa tells the caller.
func (t *Transaction) collect(va, pa uint64, nx bool) {
	if va == t.va {
		t.pa = pa
	}
	if nx {
		t.flags |= EntryXD
	}
}

// attach hooks every missing page of t. A page that came in between the
// first translation and the watch is read at once. On error nothing stays
// attached.
func (e *Engine) attach(t *Transaction) error {
	for i := range t.waiters {
		if err := e.attachOne(&t.waiters[i]); err != nil {
			e.drop(t)
			return err
		}
	}
	return nil
}

func (e *Engine) attachOne(wt *waiter) error {
	t := wt.tx
	s, err := e.slotFor(slotKey{t.cr3, wt.va() &^ pageMask, t.opts & faultClass}, t.tcr3)
	if err != nil {
		return err
	}
	if satisfies(s.w.tr, s.write()) {
		// In already: it came in before the watch was in place. If it moved
		// again while it was read, the watch (in place now) reports where.
		tr := s.w.tr
		tr.PA += wt.va() & pageMask
		ok, err := e.readStable(wt.tx, wt.va(), tr, s.write(), wt.n)
		if err != nil || ok {
			e.releaseIfEmpty(s)
			return err
		}
	}
	wt.s = s
	s.waiters.pushBack(wt)
	t.missing++
	return nil
}

// slotFor returns the slot for k, creating it (and its watch) if needed.
func (e *Engine) slotFor(k slotKey, tcr3 uint64) (*slot, error) {
	if s := e.slots[k]; s != nil {
		return s, nil
	}
	w, err := e.watchFor(watchKey{tcr3, k.page})
	if err != nil {
		return nil, err
	}
	s := &slot{key: k, w: w, sp: e.spaceOf(k.cr3)}
	s.waiters.at = func(x *waiter) *link[waiter] { return &x.link }
	e.slots[k] = s
	w.slots.pushBack(s)
	if k.class&NoFault == 0 {
		e.requeue(s, false)
	}
	return s, nil
}

func (e *Engine) watchFor(k watchKey) (*watch, error) {
	if w := e.watches[k]; w != nil {
		return w, nil
	}
	w := &watch{key: k}
	w.slots.at = func(s *slot) *link[slot] { return &s.wlink }
	cancel, err := e.g.Watch(k.cr3, k.page, func(tr Translation) { e.changed(w, tr) })
	if err != nil {
		return nil, fmt.Errorf("swapmem: watching %#x in CR3 %#x: %w", k.page, k.cr3, err)
	}
	w.cancel = cancel
	// Translate again now that the hook is in place: a page that came in
	// before the hook would otherwise never be seen.
	if tr, err := e.g.Translate(k.cr3, k.page); err == nil {
		w.tr = tr
	}
	e.watches[k] = w
	return w, nil
}

func (e *Engine) spaceOf(cr3 uint64) *space {
	sp := e.spaces[cr3]
	if sp == nil {
		sp = &space{cr3: cr3}
		sp.txs.at = func(t *Transaction) *link[Transaction] { return &t.inSpace }
		for i := range sp.queues {
			sp.queues[i].at = func(s *slot) *link[slot] { return &s.qlink }
		}
		e.spaces[cr3] = sp
	}
	return sp
}

// forgetSpace deletes cr3's space if no transaction is in it (then no slot
// is either: a slot lives only while a transaction waits on it).
func (e *Engine) forgetSpace(cr3 uint64) {
	if sp := e.spaces[cr3]; sp != nil && sp.txs.n == 0 {
		delete(e.spaces, cr3)
	}
}

// releaseIfEmpty frees a slot that no waiter uses.
func (e *Engine) releaseIfEmpty(s *slot) {
	if s.waiters.n == 0 {
		e.freeSlot(s)
	}
}

// readStable reads n bytes of t at va (within one page), which tr (va's
// translation, PA of va itself) says is present, and walks again
// afterwards: another vCPU or the guest's pager may have moved the page
// between the walk and the copy, leaving another page's bytes in the
// frame. Bytes read stably are t's (put); it reports false, and keeps
// nothing, when va no longer translates to the same frame with the access
// needed: the page is to be read again.
func (e *Engine) readStable(t *Transaction, va uint64, tr Translation, write bool, n int) (bool, error) {
	p := e.scratch[:n]
	if err := e.g.ReadPhys(tr.PA, p); err != nil {
		return false, fmt.Errorf("swapmem: reading %#x (PA %#x) in CR3 %#x: %w", va, tr.PA, t.tcr3, err)
	}
	again, err := e.g.Translate(t.tcr3, va)
	if err != nil || !satisfies(again, write) || again.PA != tr.PA {
		return false, nil
	}
	e.put(t, int(va-t.va), p)
	t.collect(va, tr.PA, tr.NX)
	return true, nil
}

// readWaiter reads a waiter's bytes from a translation of its page.
func (e *Engine) readWaiter(wt *waiter, tr Translation) error {
	t := wt.tx
	va := wt.va()
	pa := tr.PA + va&pageMask
	p := e.scratch[:wt.n]
	if err := e.g.ReadPhys(pa, p); err != nil {
		return fmt.Errorf("swapmem: reading %#x (PA %#x) in CR3 %#x: %w", va, pa, t.tcr3, err)
	}
	e.put(t, wt.off, p)
	t.collect(va, pa, tr.NX)
	return nil
}

// put takes the bytes p read at offset off of t's range (within one page
// of it; p may be the scratch page): a streaming read passes them on at
// once when every byte before them was passed on, with the pages kept
// behind them; otherwise they are kept.
func (e *Engine) put(t *Transaction, off int, p []byte) {
	if t.stream != nil && off == t.sent {
		t.stream(p)
		t.sent += len(p)
		for t.sent < t.n {
			i := t.page(t.sent)
			if t.held == nil || t.held[i] == nil {
				break
			}
			q := t.held[i]
			t.held[i] = nil
			t.heldN -= len(q)
			e.held -= len(q)
			t.stream(q)
			t.sent += len(q)
		}
		return
	}
	if t.held == nil {
		t.held = make([][]byte, t.page(t.n-1)+1)
	}
	t.held[t.page(off)] = append([]byte(nil), p...)
	t.heldN += len(p)
	e.held += len(p)
}

// page returns the index of the page of t's range that holds offset off.
func (t *Transaction) page(off int) int {
	return (int(t.va&pageMask) + off) >> 12
}

// deliver makes the Read.Data of a read without Stream from the pages it
// kept, in one buffer of its own. Called once every page is in.
func (e *Engine) deliver(t *Transaction) {
	if t.stream == nil {
		t.data = make([]byte, 0, t.n)
		for _, p := range t.held {
			t.data = append(t.data, p...)
		}
	}
	e.release(t)
}

// release drops the pages t keeps.
func (e *Engine) release(t *Transaction) {
	e.held -= t.heldN
	t.held, t.heldN = nil, 0
}

// requeue makes a faulting slot that is in no list schedulable again: into
// its ready queue (at the front, keeping its turn, or at the back) if a #PF
// can bring its page in, else parked.
func (e *Engine) requeue(s *slot, front bool) {
	if !injectable(s.w.tr, s.write()) {
		e.park(s)
		return
	}
	q := &s.sp.queues[s.queueIndex()]
	if front && (q.head == nil || q.head.seq > s.seq) {
		q.pushFront(s)
	} else {
		e.seq++
		s.seq = e.seq
		q.pushBack(s)
	}
	s.state = slotReady
	s.queue = q
	s.sp.nready++
	e.nready.Add(1)
}

// park sets aside a slot whose page is not backed; ReinjectFailedPF fails
// it once it has been parked for Config.Timeout.
func (e *Engine) park(s *slot) {
	s.state = slotParked
	s.since = e.clock()
	s.queue = &e.parked
	e.parked.pushBack(s)
}

// dequeue takes s out of the list it is in, if any.
func (e *Engine) dequeue(s *slot) {
	if s.queue == nil {
		return
	}
	s.queue.remove(s)
	s.queue = nil
	if s.state == slotReady {
		s.sp.nready--
		e.nready.Add(-1)
	}
}

// setPending changes the pending slot and the lock-free busy mark with it.
func (e *Engine) setPending(s *slot) {
	if p := e.pending; p != nil && p.state == slotPending && p.key.cr3 == e.run.cr3 {
		e.run.last = e.clock()
	}
	e.pending = s
	e.busy.Store(s != nil || e.orphan.active)
	if s == nil && !e.orphan.active {
		e.owe()
	}
}

func (e *Engine) setOrphan(o orphanPF) {
	e.orphan = o
	e.busy.Store(e.pending != nil || o.active)
	if e.pending == nil && !o.active {
		e.owe()
	}
}

// owe gives the free guest-wide slot, for a while (owedWindow), to the
// address space of the ready page that has waited longest, whichever
// space's vCPU asks first: the slot goes round the address spaces in the
// order their pages became ready, and no group of processes can pass it
// among themselves while another's page waits. Its cost is one look at
// the head of each address space's queues, each time the slot becomes
// free.
func (e *Engine) owe() {
	var best *slot
	now := e.clock()
	for cr3, sp := range e.spaces {
		if cr3 != 0 && cr3 == e.run.cr3 && now-e.run.since >= e.timeout {
			continue // it has had its run: it gives way (mayInject)
		}
		for i := range sp.queues {
			if h := sp.queues[i].head; h != nil && (best == nil || h.seq < best.seq) {
				best = h
			}
		}
	}
	e.owed, e.owedSince = best, now
}

// owedWindow is how long the slot stays owed to one address space: a
// quarter of Config.Timeout. A space whose vCPU does not come for it in
// that time (its process sleeps) loses its turn until the slot is free
// again.
func (e *Engine) owedWindow() time.Duration { return e.timeout / 4 }

// detach removes one waiter from its slot, freeing the slot when it was the
// last.
func (e *Engine) detach(wt *waiter) {
	s := wt.s
	s.waiters.remove(wt)
	wt.s = nil
	wt.tx.missing--
	e.releaseIfEmpty(s)
}

// freeSlot forgets a slot. If its #PF was confirmed delivered (PFDelivered)
// the guest-wide pending slot is free at once: the guest has the fault and
// serves it without us. A #PF injected but not yet confirmed may still be
// on its way into the guest; it stays accounted for (as an orphan) until
// the hypervisor reports it delivered or displaced (at the injecting vCPU's
// next exit) or, without a report, until it times out, so that never two
// swapmem #PFs are on their way into the guest at once.
func (e *Engine) freeSlot(s *slot) {
	e.dequeue(s)
	if e.owed == s {
		e.owed = nil // nobody waits there any more
	}
	if e.pending == s {
		if s.state == slotPending && !s.delivered {
			e.withdraw(s)
			e.setOrphan(orphanPF{active: true, page: s.key.page, since: s.since})
		}
		e.setPending(nil)
	}
	delete(e.slots, s.key)
	w := s.w
	w.slots.remove(s)
	if w.slots.n == 0 {
		w.dead = true
		delete(e.watches, w.key)
		if w.cancel != nil {
			w.cancel()
		}
	}
}

// changed is the watch callback: the translation of w's page was rewritten.
func (e *Engine) changed(w *watch, tr Translation) {
	e.mu.Lock()
	if w.dead {
		e.mu.Unlock()
		return
	}
	old := w.tr
	w.tr = tr
	var batch *Transaction
	if old.Top&TopPresent != 0 && tr.Top != old.Top {
		// The address space was torn down: its reads end with it, and
		// nothing of theirs is injected into whoever gets its tables.
		err := fmt.Errorf("%w: CR3 %#x, top-level entry of %#x was %#x, now %#x", ErrSpaceGone, w.key.cr3, w.key.page, old.Top, tr.Top)
		batch = e.endSpace(w.key.cr3, err, nil)
		e.mu.Unlock()
		runBatch(batch)
		return
	}
	// Every processed slot leaves the watch, and failing a transaction may
	// free other slots of it, so always restart from the front.
	for !w.dead {
		s := w.slots.head
		for s != nil && !satisfies(tr, s.write()) {
			s = w.slots.next(s)
		}
		if s == nil {
			break
		}
		batch = e.pageIn(s, tr, batch)
	}
	// The slots left still wait: a page that stopped being backed is not
	// faulted any more, one that is backed again is.
	for s := w.slots.head; s != nil && !w.dead; s = w.slots.next(s) {
		switch ok := injectable(tr, s.write()); {
		case s.state == slotReady && !ok:
			e.dequeue(s)
			e.park(s)
		case s.state == slotParked && ok:
			e.dequeue(s)
			e.requeue(s, false)
		}
	}
	e.mu.Unlock()
	runBatch(batch)
}

// pageIn reads every waiter of a slot whose page came in, and frees the
// slot. Transactions that finish are prepended to batch.
func (e *Engine) pageIn(s *slot, tr Translation, batch *Transaction) *Transaction {
	for wt := s.waiters.head; wt != nil; wt = s.waiters.head {
		t := wt.tx
		err := e.readWaiter(wt, tr)
		s.waiters.remove(wt)
		wt.s = nil
		t.missing--
		if err != nil {
			batch = e.fail(t, err, batch)
		} else if t.missing == 0 {
			batch = e.finish(t, nil, batch)
		}
	}
	if e.pending == s {
		// Our #PF (if any) did its job: the page is in. An arming the
		// breakpoint agent has not raised yet is not needed any more.
		if s.state == slotPending && !s.delivered {
			e.withdraw(s)
		}
		e.setPending(nil)
	}
	e.freeSlot(s)
	return batch
}

// endSpace fails every live transaction translated in address space tcr3
// with err: those requested for it, and those of the system space (CR3 0)
// that were translated in it.
func (e *Engine) endSpace(tcr3 uint64, err error, batch *Transaction) *Transaction {
	for sp := e.spaces[tcr3]; sp != nil && sp.txs.head != nil; sp = e.spaces[tcr3] {
		e.stats.SpaceGone++
		batch = e.fail(sp.txs.head, err, batch)
	}
	if sp := e.spaces[0]; sp != nil && tcr3 != 0 {
		for t := sp.txs.head; t != nil; {
			next := sp.txs.next(t)
			if t.tcr3 == tcr3 {
				e.stats.SpaceGone++
				batch = e.fail(t, err, batch)
			}
			t = next
		}
	}
	return batch
}

// withdraw takes back the breakpoint agent's arming for the pending slot
// s, where the guest can (BPWithdrawer): no transaction wants its fault
// any more.
func (e *Engine) withdraw(s *slot) {
	if s.key.class&BPFault == 0 {
		return
	}
	if w, ok := e.g.(BPWithdrawer); ok {
		w.WithdrawBPFault(s.key.page)
		e.stats.Withdrawn++
	}
}

// failSlot fails every transaction waiting for s with err.
func (e *Engine) failSlot(s *slot, err error, batch *Transaction) *Transaction {
	for s.waiters.n > 0 && e.slots[s.key] == s {
		batch = e.fail(s.waiters.head.tx, err, batch)
	}
	return batch
}

// fail detaches every remaining page of t and finishes it with err.
func (e *Engine) fail(t *Transaction, err error, batch *Transaction) *Transaction {
	e.drop(t)
	return e.finish(t, err, batch)
}

// drop detaches all of t's waiters.
func (e *Engine) drop(t *Transaction) {
	for i := range t.waiters {
		if t.waiters[i].s != nil {
			e.detach(&t.waiters[i])
		}
	}
}

// finish takes a transaction whose pages are all in (or that failed) out of
// the engine and queues its Done call.
func (e *Engine) finish(t *Transaction, err error, batch *Transaction) *Transaction {
	e.unlink(t)
	t.state = txFinished
	t.err = err
	if err != nil {
		e.stats.Failed++
		e.release(t)
	} else {
		e.stats.Completed++
		e.deliver(t)
	}
	t.doneNext = batch
	return t
}

// unlink takes t off the engine's lists.
func (e *Engine) unlink(t *Transaction) {
	e.all.remove(t)
	e.dlRemove(t)
	if sp := e.spaces[t.cr3]; sp != nil {
		sp.txs.remove(t)
		if sp.txs.n == 0 {
			delete(e.spaces, t.cr3)
		}
	}
	if t.opts&NoDups != 0 {
		k := dupKey{t.cr3, t.va, t.n, t.opts}
		if e.dups[k] == t {
			delete(e.dups, k)
		}
	}
}

// runBatch calls Done for finished transactions, outside the lock.
func runBatch(t *Transaction) {
	for t != nil {
		next := t.doneNext
		t.doneNext = nil
		t.call(Async)
		t = next
	}
}

func (t *Transaction) call(extra Flags) {
	if t.done == nil {
		return
	}
	r := Read{CR3: t.cr3, VA: t.va, PA: t.pa, Flags: t.flags | extra, Err: t.err}
	if t.err == nil {
		r.Data = t.data
	} else {
		r.PA = 0
	}
	t.data = nil
	t.done(r)
}

// The deadline heap: e.dl is a binary min-heap of the live transactions on
// their deadline; each knows its index (plus one) in t.dl. Pushing may grow
// the slice (in ReadData only); removing never allocates.

func (e *Engine) dlPush(t *Transaction) {
	e.dl = append(e.dl, t)
	t.dl = len(e.dl)
	e.dlUp(len(e.dl) - 1)
}

func (e *Engine) dlRemove(t *Transaction) {
	if t.dl == 0 {
		return
	}
	i, last := t.dl-1, len(e.dl)-1
	if i != last {
		e.dlSwap(i, last)
	}
	e.dl[last] = nil
	e.dl = e.dl[:last]
	t.dl = 0
	if i != last {
		e.dlDown(i)
		e.dlUp(i)
	}
}

func (e *Engine) dlSwap(i, j int) {
	e.dl[i], e.dl[j] = e.dl[j], e.dl[i]
	e.dl[i].dl, e.dl[j].dl = i+1, j+1
}

func (e *Engine) dlUp(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if e.dl[p].deadline <= e.dl[i].deadline {
			return
		}
		e.dlSwap(i, p)
		i = p
	}
}

func (e *Engine) dlDown(i int) {
	for {
		c := 2*i + 1
		if c >= len(e.dl) {
			return
		}
		if r := c + 1; r < len(e.dl) && e.dl[r].deadline < e.dl[c].deadline {
			c = r
		}
		if e.dl[i].deadline <= e.dl[c].deadline {
			return
		}
		e.dlSwap(i, c)
		i = c
	}
}
