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

	buf     []byte
	pa      uint64
	flags   Flags
	missing int // waiters still attached
	waiters []waiter
	state   txState
	err     error

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
	off  int // offset of the page's first wanted byte in tx.buf
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
)

var slotStateNames = [...]string{"waiting", "ready", "claimed", "pending"}

type slot struct {
	key      slotKey
	w        *watch
	sp       *space
	waiters  ilist[waiter]
	state    slotState
	queue    *ilist[slot]
	qlink    link[slot] // space ready queue
	wlink    link[slot] // watch.slots
	seq      uint64     // queue order: smaller was queued earlier
	attempts int
	since    time.Duration
}

func (s *slot) write() bool { return s.key.class&WriteFault != 0 }

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
	Injected  uint64 // #PFs injected (directly or through the breakpoint agent)
	Cancelled uint64 // injections displaced by another event
	TimedOut  uint64 // pending #PFs re-armed by ReinjectFailedPF
	Vetoed    uint64 // injections vetoed by PreInject
	Completed uint64 // transactions whose Done ran with data
	Failed    uint64 // transactions whose Done ran with an error
	Removed   uint64 // transactions removed before completing
}

// Engine is the swapmem engine for one guest. Its methods are safe for
// concurrent use by several vCPUs.
type Engine struct {
	mu          sync.Mutex
	g           Guest
	timeout     time.Duration
	now         func() time.Duration
	maxAttempts int
	closed      bool

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
	seq     uint64
	nextID  uint64
	stats   Stats
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
	}
	if e.timeout <= 0 {
		e.timeout = DefaultTimeout
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
// WriteFault (the breakpoint agent raises kernel-mode read faults).
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
		done: r.Done, preInject: r.PreInject, buf: make([]byte, r.Len),
	}
	if t.tcr3 == 0 {
		t.tcr3 = e.g.SystemCR3()
	}
	if err := e.readPresent(t); err != nil {
		e.mu.Unlock()
		return nil, err
	}
	if len(t.waiters) > 0 {
		if err := e.attach(t); err != nil {
			e.mu.Unlock()
			return nil, err
		}
	}
	if t.missing == 0 {
		t.state = txFinished
		e.stats.Completed++
		e.mu.Unlock()
		t.call(0)
		return nil, nil
	}
	e.nextID++
	t.id = e.nextID
	e.all.pushBack(t)
	e.spaceOf(t.cr3).txs.pushBack(t)
	if r.Options&NoDups != 0 {
		e.dups[dk] = t
	}
	e.mu.Unlock()
	return t, nil
}

// readPresent translates the range, copies what is present and records a
// waiter for each missing 4 KiB page.
func (e *Engine) readPresent(t *Transaction) error {
	write := t.opts&WriteFault != 0
	end := t.va + uint64(len(t.buf)) // may be 0 for a range ending at 2^64
	for cur := t.va; cur != end; {
		tr, err := e.g.Translate(t.tcr3, cur)
		if err == nil && satisfies(tr, write) {
			n := chunk(cur, end, pageSize(tr))
			off := cur - t.va
			ok, err := e.readStable(t.tcr3, cur, tr, write, t.buf[off:off+n])
			if err != nil {
				return err
			}
			if ok {
				t.collect(cur, tr.PA, tr.NX)
				cur += n
				continue
			}
		}
		n := chunk(cur, end, PageSize4K)
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

func pageSize(tr Translation) uint64 {
	switch tr.PageSize {
	case PageSize2M, PageSize1G:
		return tr.PageSize
	}
	return PageSize4K
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
		t := wt.tx
		va := wt.va()
		pa := s.w.tr.PA + va&pageMask
		ok, err := e.readStable(t.tcr3, va, Translation{Present: true, PA: pa, Writable: s.w.tr.Writable}, s.write(), t.buf[wt.off:wt.off+wt.n])
		if err != nil || ok {
			if ok {
				t.collect(va, pa, s.w.tr.NX)
			}
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
		e.enqueue(s)
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

// releaseIfEmpty frees a slot that no waiter uses.
func (e *Engine) releaseIfEmpty(s *slot) {
	if s.waiters.n == 0 {
		e.freeSlot(s)
	}
}

// readStable copies len(dst) bytes of va, which tr (va's translation, PA of
// va itself) says is present, and walks again afterwards: another vCPU or
// the guest's pager may have moved the page between the walk and the copy,
// leaving another page's bytes in the frame. It reports false when va no
// longer translates to the same frame with the access needed; dst is then
// to be read again.
func (e *Engine) readStable(cr3, va uint64, tr Translation, write bool, dst []byte) (bool, error) {
	if err := e.g.ReadPhys(tr.PA, dst); err != nil {
		return false, fmt.Errorf("swapmem: reading %#x (PA %#x) in CR3 %#x: %w", va, tr.PA, cr3, err)
	}
	again, err := e.g.Translate(cr3, va)
	return err == nil && satisfies(again, write) && again.PA == tr.PA, nil
}

// readWaiter copies a waiter's bytes from a translation of its page.
func (e *Engine) readWaiter(wt *waiter, tr Translation) error {
	t := wt.tx
	va := wt.va()
	pa := tr.PA + va&pageMask
	if err := e.g.ReadPhys(pa, t.buf[wt.off:wt.off+wt.n]); err != nil {
		return fmt.Errorf("swapmem: reading %#x (PA %#x) in CR3 %#x: %w", va, pa, t.tcr3, err)
	}
	t.collect(va, pa, tr.NX)
	return nil
}

// enqueue puts s at the back of its ready queue.
func (e *Engine) enqueue(s *slot) {
	e.seq++
	s.seq = e.seq
	s.state = slotReady
	s.queue = &s.sp.queues[s.queueIndex()]
	s.queue.pushBack(s)
	e.nready.Add(1)
}

func (e *Engine) dequeue(s *slot) {
	if s.state == slotReady {
		s.queue.remove(s)
		e.nready.Add(-1)
	}
}

// setPending changes the pending slot and the lock-free busy mark with it.
func (e *Engine) setPending(s *slot) {
	e.pending = s
	e.busy.Store(s != nil || e.orphan.active)
}

func (e *Engine) setOrphan(o orphanPF) {
	e.orphan = o
	e.busy.Store(e.pending != nil || o.active)
}

// detach removes one waiter from its slot, freeing the slot when it was the
// last.
func (e *Engine) detach(wt *waiter) {
	s := wt.s
	s.waiters.remove(wt)
	wt.s = nil
	wt.tx.missing--
	e.releaseIfEmpty(s)
}

// freeSlot forgets a slot. An injected #PF that is still pending for it
// stays accounted for (as an orphan) until it times out or is cancelled, so
// that never two swapmem #PFs are in the guest at once.
func (e *Engine) freeSlot(s *slot) {
	e.dequeue(s)
	if e.pending == s {
		if s.state == slotPending {
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
	w.tr = tr
	var batch *Transaction
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
		// Our #PF (if any) did its job: the page is in.
		e.setPending(nil)
	}
	e.freeSlot(s)
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
	} else {
		e.stats.Completed++
	}
	t.doneNext = batch
	return t
}

// unlink takes t off the engine's lists.
func (e *Engine) unlink(t *Transaction) {
	e.all.remove(t)
	if sp := e.spaces[t.cr3]; sp != nil {
		sp.txs.remove(t)
		if sp.txs.n == 0 {
			delete(e.spaces, t.cr3)
		}
	}
	if t.opts&NoDups != 0 {
		k := dupKey{t.cr3, t.va, len(t.buf), t.opts}
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
		r.Data = t.buf
	} else {
		r.PA = 0
	}
	t.done(r)
}
