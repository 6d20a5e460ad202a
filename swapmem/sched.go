package swapmem

import (
	"fmt"
	"io"
)

// InjectPendingPF injects one #PF for a waiting page if the moment is right
// for c (IntSwapMemInjectPendingPF). Call it before every VM entry.
//
// It does nothing while a swapmem #PF is pending anywhere in the guest,
// while c has an event pending, or when no waiting page may be faulted in
// c's address space and ring. Otherwise it takes the page that has waited
// longest among those that may, asks the PreInject functions of the
// transactions waiting for it (a veto moves on to another page), and either
// injects the #PF through c.InjectPF or arms the breakpoint agent with
// c.InjectBPFault. It costs O(1) in the number of live transactions and
// allocates nothing. On a closed engine it does nothing.
func (e *Engine) InjectPendingPF(c CPU) error {
	if e.nready.Load() == 0 || e.busy.Load() {
		return nil
	}
	if c.EventPending() {
		return nil
	}
	cr3, ring := c.CR3(), c.Ring()
	e.mu.Lock()
	defer e.mu.Unlock()
	budget := MaxPreInjectCalls
	for !e.closed && e.pending == nil && !e.orphan.active {
		s := e.pick(cr3, ring)
		if s == nil {
			return nil
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
			e.enqueue(s) // to the back: the others get their turn
			if budget == 0 {
				return nil
			}
			continue
		}
		return e.inject(c, s, ring)
	}
	return nil
}

// pick returns the ready page that has waited longest among those c may
// fault: the heads of at most six queues are compared.
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
	consider(e.spaces[cr3])
	if cr3 != 0 {
		consider(e.spaces[0])
	}
	return best
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

// inject raises the #PF for the claimed slot s.
func (e *Engine) inject(c CPU, s *slot, ring int) error {
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
		e.enqueue(s)
		return fmt.Errorf("swapmem: injecting #PF for %#x: %w", s.key.page, err)
	}
	s.state = slotPending
	s.attempts++
	s.since = e.now()
	e.stats.Injected++
	return nil
}

// CancelPendingPF puts the page of a pending #PF for va back in its queue
// (IntSwapMemCancelPendingPF). Call it when the hypervisor had to inject
// another event instead of ours; the cancelled attempt does not count
// towards Config.MaxAttempts.
func (e *Engine) CancelPendingPF(va uint64) {
	page := va &^ pageMask
	e.mu.Lock()
	defer e.mu.Unlock()
	if s := e.pending; s != nil && s.state == slotPending && s.key.page == page {
		s.attempts--
		e.stats.Cancelled++
		e.setPending(nil)
		e.enqueue(s)
		return
	}
	if e.orphan.active && e.orphan.page == page {
		e.setOrphan(orphanPF{})
	}
}

// ReinjectFailedPF re-arms a pending #PF older than Config.Timeout
// (IntSwapMemReinjectFailedPF); call it from a timer. A page whose #PF has
// been injected Config.MaxAttempts times fails its transactions instead:
// their Done runs with Err wrapping ErrNotServiced.
func (e *Engine) ReinjectFailedPF() {
	e.mu.Lock()
	now := e.now()
	if e.orphan.active && now-e.orphan.since >= e.timeout {
		e.setOrphan(orphanPF{})
	}
	s := e.pending
	if s == nil || s.state != slotPending || now-s.since < e.timeout {
		e.mu.Unlock()
		return
	}
	e.stats.TimedOut++
	e.setPending(nil)
	if s.attempts < e.maxAttempts {
		e.enqueue(s)
		e.mu.Unlock()
		return
	}
	err := fmt.Errorf("%w: %#x in CR3 %#x after %d attempts", ErrNotServiced, s.key.page, s.w.key.cr3, s.attempts)
	var batch *Transaction
	for s.waiters.n > 0 && e.slots[s.key] == s {
		batch = e.fail(s.waiters.head.tx, err, batch)
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

// Stats returns the engine's counters.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.stats
	s.Live = e.all.n
	s.Pages = len(e.slots)
	s.Watches = len(e.watches)
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
			t.id, t.cr3, t.va, len(t.buf), t.opts, t.missing, t.flags)
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
