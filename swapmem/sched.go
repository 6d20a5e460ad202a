package swapmem

import (
	"fmt"
	"io"
	"time"
)

// InjectPendingPF injects one #PF for a waiting page if the moment is right
// for c (IntSwapMemInjectPendingPF). Call it before every VM entry.
//
// It does nothing while a swapmem #PF is pending anywhere in the guest,
// while c has an event pending, or when no waiting page may be faulted in
// c's address space and ring. An address space whose #PFs have held the
// guest-wide slot one after the other for Config.Timeout gives way, for up
// to Config.Timeout, to the other address spaces with a page waiting.
// Otherwise it takes the page that has waited
// longest among those that may, asks the PreInject functions of the
// transactions waiting for it (a veto moves on to another page), and either
// injects the #PF through c.InjectPF or arms the breakpoint agent with
// c.InjectBPFault. It costs O(1) in the number of live transactions and
// allocates nothing. On a closed engine it does nothing.
//
// When c refuses the injection, InjectPendingPF returns the error and the
// page is not tried again before the next ReinjectFailedPF, so that a page
// that cannot be armed does not cost every VM entry a try. A page whose
// injections have been refused for Config.MaxAttempts × Config.Timeout
// (as long as that many lost faults take; a successful injection starts
// the count again) fails its transactions with ErrNotServiced.
func (e *Engine) InjectPendingPF(c CPU) error {
	if e.nready.Load() == 0 || e.busy.Load() {
		return nil
	}
	if c.EventPending() {
		return nil
	}
	cr3, ring := c.CR3(), c.Ring()
	e.mu.Lock()
	batch, err := e.injectPending(c, cr3, ring)
	e.mu.Unlock()
	runBatch(batch)
	return err
}

func (e *Engine) injectPending(c CPU, cr3 uint64, ring int) (*Transaction, error) {
	budget := MaxPreInjectCalls
	for !e.closed && e.pending == nil && !e.orphan.active {
		s := e.pick(cr3, ring)
		if s == nil {
			return nil, nil
		}
		e.dequeue(s)
		s.state = slotClaimed
		e.setPending(s)
		ok := e.ask(s, cr3, &budget)
		if e.pending != s {
			// Completed or removed while PreInject ran.
			continue
		}
		if !ok {
			e.stats.Vetoed++
			e.setPending(nil)
			e.requeue(s, false) // to the back: the others get their turn
			if budget == 0 {
				return nil, nil
			}
			continue
		}
		if !injectable(s.w.tr, s.write()) {
			// No longer backed: its watch fired while PreInject ran.
			e.setPending(nil)
			e.park(s)
			continue
		}
		return e.inject(c, s, ring)
	}
	return nil, nil
}

// pick returns the ready page that has waited longest among those c may
// fault: the heads of at most six queues are compared. The pages of c's
// own address space are left out while it gives way to others
// (mayInject); while the slot is owed to another address space (owe),
// none is.
func (e *Engine) pick(cr3 uint64, ring int) *slot {
	var best *slot
	consider := func(sp *space) {
		if sp == nil {
			return
		}
		for i := range sp.queues {
			if (i == queueUser && ring != 3) || (i == queueKernel && ring != 0) {
				continue
			}
			if h := sp.queues[i].head; h != nil && (best == nil || h.seq < best.seq) {
				best = h
			}
		}
	}
	own, sys := e.spaces[cr3], e.spaces[0]
	if o := e.owed; o != nil {
		switch {
		case o.state != slotReady || e.clock()-e.owedSince >= e.owedWindow():
			e.owed = nil
		case o.sp == sys && cr3 != 0:
			own = nil // the slot is owed to the system address space
		case o.sp != own:
			return nil // owed to another address space
		}
	}
	if e.mayInject(cr3, own) {
		consider(own)
	}
	if cr3 != 0 {
		consider(sys)
	}
	return best
}

// mayInject reports whether the pages of address space cr3 (sp) may take
// the guest-wide #PF slot now. An address space whose #PFs have held the
// slot one after the other for Config.Timeout (with no other space's #PF
// in between, and the slot never free for as long) gives way to the other
// address spaces with a page ready, for up to Config.Timeout; then its run
// starts again. One process cannot keep the slot from the others however
// it answers its faults, nor is it kept waiting when nobody else waits.
func (e *Engine) mayInject(cr3 uint64, sp *space) bool {
	r := &e.run
	if sp == nil || sp.nready == 0 || cr3 == 0 || cr3 != r.cr3 {
		return true
	}
	now := e.clock()
	if now-r.since < e.timeout || now-r.last >= e.timeout {
		return true
	}
	if e.nready.Load() == int64(sp.nready) {
		r.yielding = false // nobody else waits
		return true
	}
	if !r.yielding {
		r.yielding, r.yieldSince = true, now
		e.stats.Yielded++
	}
	if now-r.yieldSince >= e.timeout {
		*r = holdRun{cr3: cr3, since: now, last: now}
		return true
	}
	return false
}

// ask consults the PreInject functions of s's waiters, with the lock
// released during each call. It reports whether some transaction agrees
// (one without PreInject always does). It stops asking when s stopped
// being the pending slot or the budget is spent.
func (e *Engine) ask(s *slot, cr3 uint64, budget *int) bool {
	wt := s.waiters.head
	for wt != nil {
		f := wt.tx.preInject
		if f == nil {
			return true
		}
		if *budget == 0 {
			return false
		}
		*budget--
		e.mu.Unlock()
		ok := f(cr3, s.key.page)
		e.mu.Lock()
		if e.pending != s {
			return false
		}
		if ok {
			return true
		}
		if wt.s == s {
			wt = s.waiters.next(wt)
		} else {
			// Removed while asked; its neighbours may have gone too.
			wt = s.waiters.head
		}
	}
	return false
}

// inject raises the #PF for the claimed slot s. When c refuses, s backs
// off until the next timer tick, or fails its transactions (returned as a
// batch) once its injections have been refused for refuseLimit.
func (e *Engine) inject(c CPU, s *slot, ring int) (*Transaction, error) {
	var err error
	if s.key.class&BPFault != 0 {
		err = c.InjectBPFault(s.key.page)
	} else {
		var code uint32
		if s.w.tr.Present {
			code |= PFErrPresent
		}
		if s.write() {
			code |= PFErrWrite
		}
		if ring == 3 {
			code |= PFErrUser
		}
		err = c.InjectPF(s.key.page, code)
	}
	if err != nil {
		e.setPending(nil)
		e.stats.Refused++
		now := e.clock()
		if !s.refusing {
			s.refusing, s.refusedSince = true, now
		}
		if limit := e.refuseLimit(); now-s.refusedSince >= limit {
			ferr := fmt.Errorf("%w: %#x in CR3 %#x: injection refused for %v: %w", ErrNotServiced, s.key.page, s.w.key.cr3, limit, err)
			return e.failSlot(s, ferr, nil), fmt.Errorf("swapmem: injecting #PF for %#x: %w", s.key.page, err)
		}
		s.state = slotBackoff
		s.queue = &e.backoff
		e.backoff.pushBack(s)
		return nil, fmt.Errorf("swapmem: injecting #PF for %#x: %w", s.key.page, err)
	}
	s.refusing = false
	s.state = slotPending
	s.delivered = false
	s.attempts++
	s.since = e.clock()
	if r := &e.run; s.key.cr3 != r.cr3 || s.since-r.last >= e.timeout {
		// Another address space's turn, or the slot was free for long:
		// a new run.
		*r = holdRun{cr3: s.key.cr3, since: s.since, last: s.since}
	}
	e.stats.Injected++
	return nil, nil
}

// refuseLimit is how long the CPU may keep refusing a page's injection
// before its transactions fail: as long as MaxAttempts lost faults take.
func (e *Engine) refuseLimit() time.Duration {
	return time.Duration(e.maxAttempts) * e.timeout
}

// CancelPendingPF puts the page of a pending #PF for va back at the front
// of its queue (IntSwapMemCancelPendingPF), to be injected again at the next
// entry that may take it. Call it when the #PF did not reach the guest: the
// hypervisor had to inject another event instead of ours, or the exit
// after the entry that injected it shows it in the IDT-vectoring
// information (its delivery was interrupted). The cancelled attempt does
// not count towards Config.MaxAttempts. For the #PF of a removed
// transaction, it frees the guest-wide pending slot. A #PF already reported
// delivered (PFDelivered) is not cancelled.
func (e *Engine) CancelPendingPF(va uint64) {
	page := va &^ pageMask
	e.mu.Lock()
	defer e.mu.Unlock()
	if s := e.pending; s != nil && s.state == slotPending && s.key.page == page {
		if s.delivered {
			return // a late report: the guest has it
		}
		s.attempts--
		e.stats.Cancelled++
		e.setPending(nil)
		e.requeue(s, true)
		return
	}
	if e.orphan.active && e.orphan.page == page {
		e.setOrphan(orphanPF{})
	}
}

// PFDelivered records that the pending #PF for va reached the guest: the
// exit after the entry that injected it shows no delivery in progress (or
// the breakpoint agent raised it). The page stays pending until it comes in
// or Config.Timeout passes from now. Removing its transactions from now on
// frees the guest-wide pending slot at once; if they were already removed,
// it is freed now.
func (e *Engine) PFDelivered(va uint64) {
	page := va &^ pageMask
	e.mu.Lock()
	defer e.mu.Unlock()
	if s := e.pending; s != nil && s.state == slotPending && s.key.page == page {
		if !s.delivered {
			s.delivered = true
			s.since = e.clock()
			e.stats.Delivered++
		}
		return
	}
	if e.orphan.active && e.orphan.page == page {
		e.stats.Delivered++
		e.setOrphan(orphanPF{})
	}
}

// ReinjectFailedPF runs the engine's timers (IntSwapMemReinjectFailedPF);
// call it from a timer, a few times per Config.Timeout. It
//
//   - re-arms a pending #PF older than Config.Timeout; a page whose #PF has
//     been injected Config.MaxAttempts times fails its transactions
//     instead, with Err wrapping ErrNotServiced;
//   - makes pages whose injection was refused schedulable again;
//   - fails the transactions of a page that has not been backed for
//     Config.Timeout, with Err wrapping ErrNotBacked;
//   - fails every transaction whose deadline has passed, with Err wrapping
//     ErrDeadline.
//
// Its cost is O(1) plus O(log n) for each transaction it ends and O(1) for
// each page it makes schedulable; it does not look at the others.
func (e *Engine) ReinjectFailedPF() {
	e.mu.Lock()
	now := e.clock()
	var batch *Transaction
	if e.orphan.active && now-e.orphan.since >= e.timeout {
		e.setOrphan(orphanPF{})
	}
	if s := e.pending; s != nil && s.state == slotPending && now-s.since >= e.timeout {
		e.stats.TimedOut++
		if !s.delivered {
			e.withdraw(s)
		}
		e.setPending(nil)
		if s.attempts < e.maxAttempts {
			e.requeue(s, false)
		} else {
			err := fmt.Errorf("%w: %#x in CR3 %#x after %d attempts", ErrNotServiced, s.key.page, s.w.key.cr3, s.attempts)
			batch = e.failSlot(s, err, batch)
		}
	}
	for s := e.backoff.head; s != nil; s = e.backoff.head {
		e.dequeue(s)
		e.requeue(s, false)
	}
	for s := e.parked.head; s != nil && now-s.since >= e.timeout; s = e.parked.head {
		err := fmt.Errorf("%w: %#x in CR3 %#x", ErrNotBacked, s.key.page, s.w.key.cr3)
		batch = e.failSlot(s, err, batch)
		if e.parked.head == s {
			break // cannot happen: a slot lives only while it has waiters
		}
	}
	for len(e.dl) > 0 && e.dl[0].deadline <= now {
		t := e.dl[0]
		e.stats.Expired++
		batch = e.fail(t, fmt.Errorf("%w: %#x+%d in CR3 %#x", ErrDeadline, t.va, t.n, t.cr3), batch)
	}
	e.mu.Unlock()
	runBatch(batch)
}

// RemoveTransaction removes a live transaction (IntSwapMemRemoveTransaction):
// its Done will not be called and its watches are released. It returns
// ErrNoTransaction for nil, for a transaction of another engine and for one
// that already finished or was removed.
func (e *Engine) RemoveTransaction(t *Transaction) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return ErrClosed
	}
	if t == nil || t.e != e || t.state != txLive {
		return ErrNoTransaction
	}
	e.remove(t)
	return nil
}

func (e *Engine) remove(t *Transaction) {
	e.drop(t)
	e.unlink(t)
	e.release(t)
	t.state = txRemoved
	e.stats.Removed++
}

// RemoveTransactionsForVaSpace removes every live transaction requested for
// cr3 (IntSwapMemRemoveTransactionsForVaSpace), as when a process exits.
// None of their Done functions will be called.
func (e *Engine) RemoveTransactionsForVaSpace(cr3 uint64) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return ErrClosed
	}
	for sp := e.spaces[cr3]; sp != nil && sp.txs.head != nil; sp = e.spaces[cr3] {
		e.remove(sp.txs.head)
	}
	return nil
}

// Close removes every transaction without calling Done and releases every
// watch (IntSwapMemUnInit). Later calls return ErrClosed.
func (e *Engine) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return ErrClosed
	}
	for e.all.head != nil {
		e.remove(e.all.head)
	}
	e.setOrphan(orphanPF{})
	e.closed = true
	return nil
}

// Waiting reports whether pages wait for a #PF to be injected at a safe
// moment: InjectPendingPF has work, and looks for it at every exit.
func (e *Engine) Waiting() bool { return e.nready.Load() != 0 }

// Stats returns the engine's counters.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.stats
	s.Live = e.all.n
	s.Pages = len(e.slots)
	s.Watches = len(e.watches)
	s.Spaces = len(e.spaces)
	s.Held = e.held
	return s
}

// Dump writes the engine's state (IntSwapMemDump): a summary line, then one
// line per transaction, each followed by one line per page it waits for.
func (e *Engine) Dump(w io.Writer) {
	e.mu.Lock()
	defer e.mu.Unlock()
	pend := "none"
	if s := e.pending; s != nil {
		pend = fmt.Sprintf("%#x (%s, attempt %d)", s.key.page, slotStateNames[s.state], s.attempts)
	} else if e.orphan.active {
		pend = fmt.Sprintf("%#x (transaction removed)", e.orphan.page)
	}
	fmt.Fprintf(w, "swapmem: %d transactions, %d pages, %d watches, pending #PF: %s\n",
		e.all.n, len(e.slots), len(e.watches), pend)
	for t := e.all.head; t != nil; t = e.all.next(t) {
		fmt.Fprintf(w, "tx %d: cr3=%#x va=%#x len=%d opts=%v missing=%d flags=%v\n",
			t.id, t.cr3, t.va, t.n, t.opts, t.missing, t.flags)
		for i := range t.waiters {
			wt := &t.waiters[i]
			if wt.s == nil {
				continue
			}
			s := wt.s
			fmt.Fprintf(w, "  page %#x: bytes %d+%d state=%s attempts=%d sharers=%d present=%t writable=%t\n",
				s.key.page, wt.off, wt.n, slotStateNames[s.state], s.attempts, s.waiters.n, s.w.tr.Present, s.w.tr.Writable)
		}
	}
}
