package swapmemtest

import (
	"fmt"

	"github.com/tamahv/tamahv/swapmem"
)

// VCPU is a simulated virtual CPU: a CR3, a ring and an event-pending mark.
// It implements swapmem.CPU; the #PFs injected through it wait in the
// machine's queue until Deliver.
type VCPU struct {
	m     *Machine
	id    int
	cr3   uint64
	ring  int
	event bool
	// Fail makes the next injection return this error (and clears it).
	Fail error
}

// NewVCPU returns a vCPU running the kernel (system CR3, ring 0).
func (m *Machine) NewVCPU(id int) *VCPU {
	return &VCPU{m: m, id: id, cr3: m.system.CR3}
}

// Switch changes the address space and ring the vCPU runs in.
func (c *VCPU) Switch(cr3 uint64, ring int) {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	c.cr3, c.ring = cr3, ring
}

// SetEventPending marks an event (one not from swapmem) queued or not.
func (c *VCPU) SetEventPending(p bool) {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	c.event = p
}

// CR3 implements swapmem.CPU.
func (c *VCPU) CR3() uint64 {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	return c.cr3
}

// Ring implements swapmem.CPU.
func (c *VCPU) Ring() int {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	return c.ring
}

// EventPending implements swapmem.CPU.
func (c *VCPU) EventPending() bool {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	return c.event
}

// InjectPF implements swapmem.CPU.
func (c *VCPU) InjectPF(va uint64, code uint32) error {
	return c.inject(Fault{VA: va, Code: code})
}

// InjectBPFault implements swapmem.CPU: the breakpoint agent raises a
// kernel-mode read #PF on va when the guest next runs.
func (c *VCPU) InjectBPFault(va uint64) error {
	return c.inject(Fault{VA: va, BP: true})
}

func (c *VCPU) inject(f Fault) error {
	m := c.m
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := c.Fail; err != nil {
		c.Fail = nil
		return err
	}
	if c.event {
		m.Violations = append(m.Violations, fmt.Sprintf("vCPU %d: #PF for %#x injected while an event was pending", c.id, f.VA))
	}
	for _, q := range m.faults {
		if m.outstanding(q) {
			m.Violations = append(m.Violations, fmt.Sprintf("vCPU %d: #PF for %#x injected while %#x was undelivered", c.id, f.VA, q.VA))
		}
	}
	f.CPU, f.CR3, f.Ring = c.id, c.cr3, c.ring
	m.faults = append(m.faults, f)
	return nil
}

// Queued returns the injected #PFs not delivered yet.
func (m *Machine) Queued() []Fault {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Fault(nil), m.faults...)
}

// Drop discards the queued #PFs, as when the hypervisor injects another
// event instead; the caller then tells the engine (CancelPendingPF).
func (m *Machine) Drop() []Fault {
	m.mu.Lock()
	defer m.mu.Unlock()
	f := m.faults
	m.faults = nil
	return f
}

// Delivered returns every #PF delivered (or lost) so far.
func (m *Machine) Delivered() []Fault {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Fault(nil), m.delivered...)
}

// Deliver lets the guest run: each queued #PF reaches the guest's page-fault
// handler, which swaps the page in, breaks copy-on-write on a write fault,
// or finds nothing to do. With LoseEvery set, some #PFs are lost on the way.
func (m *Machine) Deliver() {
	_ = m.mutate(func() error {
		for _, f := range m.faults {
			m.nfaults++
			switch {
			case m.LoseEvery > 0 && m.nfaults%m.LoseEvery == 0:
				f.Lost = true
			default:
				m.handleFault(&f)
			}
			m.delivered = append(m.delivered, f)
		}
		m.faults = m.faults[:0]
		return nil
	})
}

// outstanding reports whether a queued #PF still has work to do: its page
// is still missing (or read-only, for a write fault). One whose page came in
// meanwhile is only a spurious fault waiting to happen.
func (m *Machine) outstanding(f Fault) bool {
	if m.spaces[f.CR3] == nil {
		return false // the process is gone
	}
	_, e, _, err := m.leaf(f.CR3, f.VA, 0, false)
	if err != nil || e&PteP == 0 {
		return true
	}
	return f.Code&swapmem.PFErrWrite != 0 && e&PteRW == 0
}

func (m *Machine) handleFault(f *Fault) {
	_, e, _, err := m.leaf(f.CR3, f.VA, 0, false)
	switch {
	case err != nil || e == 0:
		f.Segv = true
	case e&PteP == 0:
		f.PagIn = m.swapIn(f.CR3, f.VA) == nil
	case f.Code&swapmem.PFErrWrite != 0 && e&PteRW == 0:
		f.PagIn = m.breakCoW(f.CR3, f.VA) == nil
	}
}
