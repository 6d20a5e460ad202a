package hv

import (
	"errors"
	"fmt"

	"github.com/tamahv/tamahv/vmx"
)

// eventQueue is a small ring of events waiting for VM entry; it never
// allocates.
type eventQueue struct {
	buf  [8]vmx.Event
	head int
	n    int
}

func (q *eventQueue) push(e vmx.Event) bool {
	if q.n == len(q.buf) {
		return false
	}
	q.buf[(q.head+q.n)%len(q.buf)] = e
	q.n++
	return true
}

func (q *eventQueue) pushFront(e vmx.Event) bool {
	if q.n == len(q.buf) {
		return false
	}
	q.head = (q.head + len(q.buf) - 1) % len(q.buf)
	q.buf[q.head] = e
	q.n++
	return true
}

func (q *eventQueue) peek() (vmx.Event, bool) {
	if q.n == 0 {
		return vmx.Event{}, false
	}
	return q.buf[q.head], true
}

func (q *eventQueue) pop() {
	if q.n > 0 {
		q.head = (q.head + 1) % len(q.buf)
		q.n--
	}
}

// ErrEventQueueFull is returned by Inject when events pile up.
var ErrEventQueueFull = errors.New("hv: event queue full")

// Inject queues an event for delivery at the next VM entry that can take
// it.
func (v *VCPU) Inject(e vmx.Event) error {
	if !v.events.push(e) {
		return ErrEventQueueFull
	}
	return nil
}

// InjectException queues a processor exception.
func (v *VCPU) InjectException(vector uint8, errorCode uint32) error {
	return v.Inject(vmx.Exception(vector, errorCode, uint32(v.VMCS.Read(vmx.ExitInstructionLen))))
}

// queueNMI queues an NMI for the guest unless one already waits: like the
// processor, the guest has at most one NMI pending.
func (v *VCPU) queueNMI() {
	for i := 0; i < v.events.n; i++ {
		if v.events.buf[(v.events.head+i)%len(v.events.buf)].Type == vmx.EventNMI {
			return
		}
	}
	if !v.events.push(vmx.Event{Vector: vmx.VectorNMI, Type: vmx.EventNMI}) {
		v.logf("tamahv: event queue full, NMI lost\n")
	}
}

// EventPending reports whether an event waits in the vCPU's queue for a
// VM entry.
func (v *VCPU) EventPending() bool { return v.events.n > 0 }

// DropEvents forgets the events queued for the guest, as an INIT makes the
// processor forget what it had pending.
func (v *VCPU) DropEvents() { v.events = eventQueue{} }

// Queued reports whether an event in the vCPU's queue (not yet placed in
// the VM-entry fields) satisfies match.
func (v *VCPU) Queued(match func(vmx.Event) bool) bool {
	for i := 0; i < v.events.n; i++ {
		if match(v.events.buf[(v.events.head+i)%len(v.events.buf)]) {
			return true
		}
	}
	return false
}

// Placed reports whether the VM-entry event fields hold an event for the
// coming entry.
func (v *VCPU) Placed() bool {
	return v.VMCS.Read(vmx.EntryInterruptInfo)&vmx.EventValid != 0
}

// ErrEventTaken is Place's error when the VM-entry fields already hold an
// event: one entry delivers one.
var ErrEventTaken = errors.New("hv: an event is already placed for VM entry")

// Place writes e into the VM-entry event fields, for the coming entry
// (after the run loop placed the first queued event: call it from an
// OnEntry function or a handler). The queue's events wait for later
// entries. An error code is dropped where the SDM forbids one (placeEvent).
func (v *VCPU) Place(e vmx.Event) error {
	if v.Placed() {
		return ErrEventTaken
	}
	v.placeEvent(e)
	return v.VMCS.Err()
}

// deliverEvent places the first queued event into the VM-entry fields if
// the guest can take it now, else asks for an interrupt or NMI window.
// prepareEntry calls it only with an event queued or a window asked for:
// the common entry touches no control.
func (v *VCPU) deliverEvent() {
	const windows = vmx.ProcInterruptWindow | vmx.ProcNMIWindow
	proc := v.read(vmx.ProcControls)
	want := proc &^ windows
	if e, ok := v.events.peek(); ok {
		block := v.VMCS.Read(vmx.GuestInterruptibility)
		switch {
		case e.Type == vmx.EventExternal && (v.VMCS.Read(vmx.GuestRFLAGS)&vmx.RFLAGSIF == 0 || block&(vmx.BlockingSTI|vmx.BlockingMovSS) != 0):
			want |= vmx.ProcInterruptWindow
		case e.Type == vmx.EventNMI && block&(vmx.BlockingNMI|vmx.BlockingMovSS) != 0:
			// NMI-window exiting needs virtual NMIs (SDM Vol. 3C,
			// "Checks on VM-Execution Control Fields"); without them the
			// NMI waits for a later exit.
			if v.VMCS.Read(vmx.PinControls)&vmx.PinVirtualNMIs != 0 {
				want |= vmx.ProcNMIWindow
			}
		default:
			v.placeEvent(e)
			v.events.pop()
		}
	}
	if want != proc {
		v.write(vmx.ProcControls, want)
	}
	v.windows = want & windows
}

// placeEvent writes e into the VM-entry event fields. Every injection
// goes through here, for the rule of SDM Vol. 3C 26.2.1.3 (VM-entry
// checks on event injection): an error code is delivered only for a
// hardware exception while the guest's CR0.PE is 1. In real-address mode
// (unrestricted guest) the processor pushes none, so the same #GP or #PF
// arrives without it; asking for one there fails VM entry.
func (v *VCPU) placeEvent(e vmx.Event) {
	if e.HasError && (e.Type != vmx.EventHardwareException || v.VMCS.Read(vmx.GuestCR0)&vmx.CR0PE == 0) {
		e.HasError, e.ErrorCode = false, 0
	}
	v.VMCS.Write(vmx.EntryInterruptInfo, uint64(e.Info()))
	if e.HasError {
		v.VMCS.Write(vmx.EntryExceptionError, uint64(e.ErrorCode))
	}
	if e.NeedsInstrLen() {
		v.VMCS.Write(vmx.EntryInstructionLen, uint64(e.InstrLen))
	}
}

// requeueVectoring puts back an event whose delivery the VM exit
// interrupted (IDT-vectoring information), ahead of everything else.
func (v *VCPU) requeueVectoring(x *vmx.Exit) {
	e, ok := vmx.DecodeEvent(x.IDTVectoring, 0)
	if !ok {
		return
	}
	if e.HasError {
		e.ErrorCode = uint32(v.VMCS.Read(vmx.IDTVectoringError))
	}
	if e.NeedsInstrLen() {
		e.InstrLen = uint32(v.VMCS.Read(vmx.ExitInstructionLen))
	}
	if e.Type == vmx.EventNMI {
		// The exit interrupted the NMI's delivery and left blocking by
		// NMI set, though the guest never saw the NMI; it must be clear
		// for the NMI to be injected again (SDM Vol. 3C, "Information
		// for VM Exits During Event Delivery"; KVM's
		// __vmx_complete_interrupts does the same).
		if b := v.VMCS.Read(vmx.GuestInterruptibility); b&vmx.BlockingNMI != 0 {
			v.VMCS.Write(vmx.GuestInterruptibility, b&^vmx.BlockingNMI)
		}
	}
	if !v.events.pushFront(e) {
		v.logf("tamahv: event queue full, vectoring event %d lost\n", e.Vector)
	}
}

// restoreNMIBlocking sets virtual-NMI blocking again when the exit
// interrupted an IRET that had cleared it: the IRET runs again after the
// exit, and no NMI may come in before it completes (SDM Vol. 3C, "Resuming
// Guest Software After Handling an Exception"; KVM's
// vmx_recover_nmi_blocking). A double fault or an exit during event
// delivery does not restart the IRET.
func (v *VCPU) restoreNMIBlocking(e *vmx.Exit) {
	var unblocked bool
	switch e.Reason {
	case vmx.ExitExceptionOrNMI:
		unblocked = e.Interruption&vmx.NMIUnblockedByIRET != 0 && uint8(e.Interruption) != vmx.VectorDF
	case vmx.ExitEPTViolation:
		unblocked = e.Qualification&vmx.NMIUnblockedByIRET != 0
	default:
		return
	}
	if !unblocked || v.VMCS.Read(vmx.PinControls)&vmx.PinVirtualNMIs == 0 || e.IDTVectoring&vmx.EventValid != 0 {
		return
	}
	v.VMCS.Write(vmx.GuestInterruptibility, v.VMCS.Read(vmx.GuestInterruptibility)|vmx.BlockingNMI)
}

// Raise answers exit e with the exception vector (such as #GP(0) or
// #UD) the access an extension carried out for the guest raised. Where the exit interrupted an event's delivery (the run
// loop put that event back at the front of the queue), the two combine as
// the processor combines them (SDM Vol. 3A, "Interrupt 8—Double Fault
// Exception (#DF)"): after #DF, a triple fault; a contributory exception
// after a contributory one or a page fault, #DF(0); otherwise the new
// exception alone, with an interrupted external interrupt or NMI still
// pending behind it (an exception or software interrupt comes again
// from its instruction).
func (v *VCPU) Raise(e *vmx.Exit, vector uint8) (Action, error) {
	first, ok := vmx.DecodeEvent(e.IDTVectoring, 0)
	if !ok {
		return Resume, v.InjectException(vector, 0)
	}
	if f, queued := v.events.peek(); queued && f.Vector == first.Vector && f.Type == first.Type {
		v.events.pop()
	}
	exc := vmx.Exception(vector, 0, 0)
	if first.Type == vmx.EventHardwareException {
		switch {
		case first.Vector == vmx.VectorDF:
			return v.Stopped(fmt.Errorf("%w at RIP %#x (an exception while delivering #DF)", ErrGuestTripleFault, e.RIP))
		case (contributory(first.Vector) || first.Vector == vmx.VectorPF) && contributory(vector):
			exc = vmx.Exception(vmx.VectorDF, 0, 0)
		}
	}
	if first.Type == vmx.EventExternal || first.Type == vmx.EventNMI {
		if !v.events.pushFront(first) {
			return Resume, ErrEventQueueFull
		}
	}
	if !v.events.pushFront(exc) {
		return Resume, ErrEventQueueFull
	}
	return Resume, nil
}

// contributory reports whether an exception is of the contributory class
// (SDM Vol. 3A, "Interrupt 8—Double Fault Exception (#DF)", Table 6-4).
func contributory(vector uint8) bool {
	switch vector {
	case vmx.VectorDE, vmx.VectorTS, vmx.VectorNP, vmx.VectorSS, vmx.VectorGP, vmx.VectorCP:
		return true
	}
	return false
}
