package smp

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/tamahv/tamahv/vmx"
)

// ErrSnapshotFields is SetSnapshot's error for a list it cannot hold.
var ErrSnapshotFields = errors.New("smp: too many snapshot fields")

// handoff is the bootstrap processor's side of an AP's exits: the
// snapshot of the exit being handled, and the operations queued for the
// AP. A command carries the queued operations with it (the AP carries
// them out first), so that a handled exit costs the command that resumes
// the guest and those that must read something only the AP can (CPUID,
// an MSR, a VMCS field outside the snapshot).
type handoff struct {
	mb    mailbox
	index map[uint32]int // a snapshot field's slot
	// valid: the snapshot is the exit being handled (from Enter's return
	// to the next command that enters the guest).
	valid bool
	n     int    // operations queued
	err   error  // the first queued operation that failed, until taken
	cmds  uint64 // commands sent
}

func newHandoff(mb mailbox) *handoff { return &handoff{mb: mb, index: map[uint32]int{}} }

// setSnapshot tells the AP which VMCS fields to read at every exit it
// hands over; at most maxSnap, before its first entry.
func (h *handoff) setSnapshot(fields []uint32) error {
	if len(fields) > maxSnap {
		return fmt.Errorf("%w: %d, %d at most", ErrSnapshotFields, len(fields), maxSnap)
	}
	clear(h.index)
	for i, f := range fields {
		atomic.StoreUint32(h.mb.u32(apSnapF+4*i), f)
		h.index[f] = i
	}
	atomic.StoreUint32(h.mb.u32(apSnapN), uint32(len(fields)))
	h.valid = false
	return nil
}

// read returns field f from the snapshot of the exit being handled, with
// the writes queued since; ok is false where the snapshot does not hold
// it.
func (h *handoff) read(f uint32) (v uint64, ok bool) {
	i, in := h.index[f]
	if !h.valid || !in || atomic.LoadUint64(h.mb.u64(apSnapOK))&(1<<i) == 0 {
		return 0, false
	}
	return atomic.LoadUint64(h.mb.u64(apSnapV + 8*i)), true
}

// queue adds an operation for the AP; a full queue is sent first. A field
// the snapshot holds takes a queued VMWRITE's value at once.
func (h *handoff) queue(kind, a, b uint64) error {
	if h.n == maxOps {
		if _, _, err := h.call(cmdFlush, 0, 0); err != nil {
			return err
		}
	}
	off := apOps + h.n*opSize
	atomic.StoreUint64(h.mb.u64(off), kind)
	atomic.StoreUint64(h.mb.u64(off+8), a)
	atomic.StoreUint64(h.mb.u64(off+16), b)
	h.n++
	if kind == opVMWRITE && h.valid {
		if i, in := h.index[uint32(a)]; in {
			// What VMWRITE leaves there: a read-only field keeps its
			// value (the write fails), a narrow one the low bits.
			f := vmx.Field(a)
			if f.ReadOnly() {
				return nil
			}
			switch f.Width() {
			case vmx.Width16:
				b &= 0xffff
			case vmx.Width32:
				b &= 0xffffffff
			}
			atomic.StoreUint64(h.mb.u64(apSnapV+8*i), b)
			atomic.OrUint64(h.mb.u64(apSnapOK), 1<<i)
		}
	}
	return nil
}

// send hands the queued operations over with the next command.
func (h *handoff) send() {
	atomic.StoreUint32(h.mb.u32(apOpsN), uint32(h.n))
	h.n = 0
	h.cmds++
}

// call sends a command, with the queued operations, and waits for its
// answer.
func (h *handoff) call(cmd uint32, a0, a1 uint64) ([4]uint64, uint32, error) {
	if h.mb.busy() {
		return [4]uint64{}, 0, ErrAPBusy
	}
	h.send()
	r, flags, err := h.mb.call(cmd, a0, a1)
	if err == nil {
		h.takeFailed()
	}
	return r, flags, err
}

// post sends a command that enters the guest, with the queued
// operations, without waiting: the snapshot stops being the exit's.
func (h *handoff) post(cmd uint32, a0, a1 uint64) error {
	if h.mb.busy() {
		return ErrAPBusy
	}
	h.send()
	h.valid = false
	return h.mb.post(cmd, a0, a1)
}

// exited records that the AP handed an exit over: its snapshot is the
// exit's.
func (h *handoff) exited() { h.valid = true }

// takeFailed records the first queued operation the AP's last command
// found failing (the AP does not enter the guest after one).
func (h *handoff) takeFailed() {
	i := atomic.SwapUint32(h.mb.u32(apOpFail), 0)
	if i == 0 || h.err != nil {
		return
	}
	off := apOps + int(i-1)*opSize
	kind, a, b := atomic.LoadUint64(h.mb.u64(off)), atomic.LoadUint64(h.mb.u64(off+8)), atomic.LoadUint64(h.mb.u64(off+16))
	name := map[uint64]string{opVMWRITE: "VMWRITE", opWRMSR: "WRMSR", opXSETBV: "XSETBV", opMMIOWr: "MMIO write"}[kind]
	if name == "" {
		name = fmt.Sprintf("operation %d", kind)
	}
	h.err = fmt.Errorf("smp: %s %#x = %#x on the application processor failed (RFLAGS %#x)", name, a, b, atomic.LoadUint32(h.mb.u32(apOpFlags)))
}

// failed returns, and forgets, the first queued operation that failed.
func (h *handoff) failed() error {
	err := h.err
	h.err = nil
	return err
}

// vmx calls a command that executes a VMX instruction and turns a failure
// into an error.
func (h *handoff) vmx(name string, cmd uint32, a0, a1 uint64) (uint64, error) {
	r, flags, err := h.call(cmd, a0, a1)
	if err != nil {
		return 0, err
	}
	if flags&flagsFailed != 0 {
		return 0, fmt.Errorf("smp: %s %#x on the application processor failed (RFLAGS %#x)", name, a0, flags)
	}
	return r[0], nil
}
