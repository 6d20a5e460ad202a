// Package hv is the vCPU: its run loop, the extension API (Intercept,
// Observe, OnEntry, OnTick; Place, Queued, Complete, Raise), events, the
// default handlers, the MSR and CPUID policy, VMCS set-up, and INIT and
// SIPI. What the monitor does with guest memory, the page-in machinery
// and the Linux loader are extensions in its sub-packages, built on its
// exported API. The architecture numbers it uses come from packages vmx
// and ept.
//
// The loop talks to the processor through small interfaces (VMCS, Enter)
// so that everything but the VMX instructions runs in host tests.
package hv

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/tamahv/tamahv/vmx"
)

// VMCS reads and writes the current VMCS. A failed access is remembered
// and reported by Err, so handlers need not check every field.
type VMCS interface {
	Read(f vmx.Field) uint64
	Write(f vmx.Field, v uint64)
	// Err returns the first failed access since the last ClearErr.
	Err() error
	ClearErr()
}

// Action is what a handler wants done with the exiting instruction.
type Action uint8

// Actions.
const (
	// Next advances RIP past the exiting instruction.
	Next Action = iota
	// Resume re-enters at the same RIP (an event was injected, or the
	// instruction must run again).
	Resume
	// Stop ends the run loop.
	Stop
)

// Handler handles one VM exit.
type Handler func(v *VCPU, e *vmx.Exit) (Action, error)

// ExitRecord is one entry of the ring of recent exits.
type ExitRecord struct {
	Reason vmx.ExitReason
	RIP    uint64
	Qual   uint64
}

const recentExits = 32

// Hypercalls answer VMCALL.
type Hypercalls interface {
	// Call handles hypercall nr with arguments from the guest's registers
	// and returns RAX. Stop ends the run loop after the call.
	Call(v *VCPU, nr, a1, a2, a3 uint64) (ret uint64, stop bool)
}

// VCPU is one virtual processor.
type VCPU struct {
	VMCS VMCS
	Regs vmx.GuestRegs
	Caps *vmx.Caps
	// Enter runs the guest until the next VM exit (vmx.Run in the image).
	Enter func(v *VCPU, launched bool) error
	// Log receives diagnostics (nil: discarded).
	Log io.Writer
	// Hypercalls answers VMCALL (nil: every call fails).
	Hypercalls Hypercalls
	// PreemptionTicks re-arms the VMX-preemption timer at each entry
	// (0: timer off).
	PreemptionTicks uint32
	// CPUID executes CPUID for the guest (the host's values, filtered by
	// the CPUID handler).
	CPUID func(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)
	// TSCHz is the TSC frequency tamahv measured (0: unknown). Where the
	// frequency CPUID's leaves 0x15 and 0x16 give is more than 5% from
	// it, both leaves read as zeros (not enumerated) and the guest
	// calibrates its TSC itself, as it does on processors without them:
	// an emulated processor may report its model's frequency while its
	// TSC counts at the emulator's rate.
	TSCHz uint64
	// XSETBV loads XCR0 with a value the handler checked.
	XSETBV func(xcr uint32, v uint64)
	// PortIO does real port I/O for the bytes of an exiting I/O
	// instruction that tamahv does not own: size is 1, 2 or 4; in reads
	// and returns the value, else val is written. Nil: those ports read
	// all ones and drop writes, as with no device.
	PortIO func(port uint16, size int, in bool, val uint32) uint32
	// Mem reads guest-physical memory for emulation (the PAE PDPTEs); it
	// must refuse tamahv's memory, as the Watcher does. Nil: PAE paging
	// entered through an exiting MOV to CR0 or CR4 raises #GP.
	Mem PhysReader
	// ReadMSR and WriteMSR access the processor's MSRs for the MSR
	// handlers (msr.go); WriteMSR receives only values the policy
	// checked. Nil: the MSRs that need them raise #GP in the guest.
	ReadMSR  func(msr uint32) uint64
	WriteMSR func(msr uint32, v uint64)
	// TakeNMI reports, and forgets, an NMI that arrived while tamahv ran
	// in VMX root (vmx.TakeNMI in the image); it is injected at the next
	// entry. Nil: none are counted.
	TakeNMI func() bool
	// EntryCount, where set, counts the VM entries the vCPU's processor
	// made in which the guest ran (an application processor's exit loop
	// counts its own): a prepared entry may be made only after other
	// vCPUs' exits were handled, or be cut short before the guest ran.
	EntryCount func() uint64
	// Serial, where set, is held while the vCPU handles an exit and
	// prepares its next entry, and released while the guest runs (never
	// across VM entry). vCPUs whose exits are handled by goroutines of one
	// program share one, so that their handlers never interleave, even
	// where the Go runtime preempts a goroutine in a handler.
	Serial sync.Locker

	pdptes [32]byte // loadPDPTEs reads here: the exit path allocates nothing

	handlers  [vmx.NumExitReasons]Handler // the defaults with every interceptor in front
	cur       vmx.Exit                    // the exit being handled, shared by pointer
	observers []Observer
	// intercepted: an Intercept came for the reason.
	intercepted [vmx.NumExitReasons]bool
	needExit    []func(v *VCPU) bool
	entered     uint64 // VM entries made (Entries)
	entries     []func(v *VCPU)
	ticks       []func(v *VCPU)
	counts      [vmx.NumExitReasons + 1]uint64 // the last counts unknown reasons
	recent      [recentExits]ExitRecord
	nrecent     uint64
	events      eventQueue
	launched    bool
	sipiWait    bool // in wait-for-SIPI, put there by tamahv
	// windows are the event-window exits deliverEvent last asked for in
	// the processor-based controls (ProcInterruptWindow, ProcNMIWindow):
	// with none asked for and no event queued, an entry needs neither
	// read nor write of the controls.
	windows uint64
	// timerLoaded is the VMX-preemption timer value last written to the
	// VMCS, valid with timerKept: the field keeps it from entry to entry,
	// as the exit controls do not save the timer into it.
	timerLoaded uint32
	timerKept   bool
	// ioPorts are the ports whose accesses exit (the console's); reads
	// return all ones, writes are dropped.
	ioPorts [][2]uint16
	// portGuards check the writes to their ports (GuardPorts).
	portGuards []PortGuard
	exited     error
	// tscAdjust is the guest's IA32_TSC_ADJUST (msr.go).
	tscAdjust uint64
	// quiet answers CPUID at the exits after a quiet entry (QuietCPUID).
	quiet *quietCPUID
	// tscLeaves is whether leaves 0x15 and 0x16 pass (tscLeavesPass) or
	// read as zeros (tscLeavesHidden), decided at their first read.
	tscLeaves uint8
}

// Errors of the run loop.
var (
	ErrEntryFailed = errors.New("hv: VM entry failed")
	ErrFatalExit   = errors.New("hv: fatal VM exit")
	ErrUnknownExit = errors.New("hv: unknown exit reason")
	// ErrStopped, from Enter, ends Run without an error: the machine
	// stopped this vCPU (its guest ended elsewhere).
	ErrStopped = errors.New("hv: vCPU stopped")
)

// NewVCPU returns a vCPU with the default exit handlers.
func NewVCPU(vmcs VMCS, caps *vmx.Caps) *VCPU {
	v := &VCPU{VMCS: vmcs, Caps: caps, handlers: defaultHandlers()}
	return v
}

// Extensions attach to a vCPU in three ways, each append-only and ordered,
// so that independent extensions compose without knowing each other:
//
//   - Intercept puts a handler in front of one exit reason's handling. The
//     interceptor installed last sees the exit first; each answers it or
//     passes it on to the handling installed before it, down to tamahv's
//     default handler (a reason without one is fatal).
//   - Observe adds a function that sees every exit before it is handled,
//     in the order observers were added.
//   - OnEntry adds a function run before every VM entry, after pending
//     events were placed, in the order added; OnTick one run at every
//     VMX-preemption-timer exit, in the order added.
//
// Chains are built when an extension is added: the exit path allocates
// nothing.

// Interceptor handles exits of one reason: it answers the exit itself, or
// passes it on by calling next.
type Interceptor func(v *VCPU, e *vmx.Exit, next Handler) (Action, error)

// Observer sees a VM exit before it is handled.
type Observer func(v *VCPU, e *vmx.Exit)

// Intercept puts h in front of the handling of reason r.
func (v *VCPU) Intercept(r vmx.ExitReason, h Interceptor) error {
	if !r.Valid() {
		return fmt.Errorf("hv: exit reason %d is not one the SDM defines", r)
	}
	if h == nil {
		return errors.New("hv: nil interceptor")
	}
	next := v.handlers[r]
	if next == nil {
		next = fatal
	}
	v.intercepted[r] = true
	v.handlers[r] = func(v *VCPU, e *vmx.Exit) (Action, error) { return h(v, e, next) }
	return nil
}

// fatal is the handling of a reason without a handler.
func fatal(v *VCPU, e *vmx.Exit) (Action, error) {
	return Stop, fmt.Errorf("%w: %v at RIP %#x, qualification %#x", ErrFatalExit, e.Reason, e.RIP, e.Qualification)
}

// Observe adds o to the functions that see every exit.
func (v *VCPU) Observe(o Observer) {
	if o != nil {
		v.observers = append(v.observers, o)
	}
}

// OnEntry adds f to the functions run before every VM entry.
func (v *VCPU) OnEntry(f func(v *VCPU)) {
	if f != nil {
		v.entries = append(v.entries, f)
	}
}

// OnTick adds f to the functions run at every preemption-timer exit.
func (v *VCPU) OnTick(f func(v *VCPU)) {
	if f != nil {
		v.ticks = append(v.ticks, f)
	}
}

// observe runs the observers.
func (v *VCPU) observe(e *vmx.Exit) {
	for _, o := range v.observers {
		o(v, e)
	}
}

// tick runs the OnTick functions.
func (v *VCPU) tick() {
	for _, f := range v.ticks {
		f(v)
	}
}

// Counts returns the number of exits per reason seen so far (reasons with
// no exits are left out).
func (v *VCPU) Counts() map[vmx.ExitReason]uint64 {
	m := map[vmx.ExitReason]uint64{}
	for r, n := range v.counts[:vmx.NumExitReasons] {
		if n > 0 {
			m[vmx.ExitReason(r)] = n
		}
	}
	return m
}

// Count returns the number of exits of reason r so far.
func (v *VCPU) Count(r vmx.ExitReason) uint64 {
	if !r.Valid() {
		return 0
	}
	return v.counts[r]
}

// CPL is the guest's current privilege level: SS.DPL (SDM Vol. 3C,
// 27.3.1.2, "Checks on Guest Segment Registers"); 0 in real-address
// mode, 3 in virtual-8086 mode.
func (v *VCPU) CPL() int { return int(v.VMCS.Read(vmx.GuestSSAccess) >> 5 & 3) }

// Entries returns the number of VM entries so far: those the processor
// made where EntryCount says, else those prepared (PrepareEntry, which Run
// calls before each; read it under Serial where the vCPU shares one: it
// grows before Serial is released for the entry).
func (v *VCPU) Entries() uint64 {
	if v.EntryCount != nil {
		return v.EntryCount()
	}
	return v.entered
}

// Total returns the number of VM exits so far.
func (v *VCPU) Total() uint64 {
	var t uint64
	for _, n := range v.counts {
		t += n
	}
	return t
}

// Recent returns the latest exits, oldest first.
func (v *VCPU) Recent() []ExitRecord {
	n := v.nrecent
	if n > recentExits {
		n = recentExits
	}
	out := make([]ExitRecord, 0, n)
	for i := v.nrecent - n; i < v.nrecent; i++ {
		out = append(out, v.recent[i%recentExits])
	}
	return out
}

func (v *VCPU) logf(format string, args ...any) {
	if v.Log != nil {
		fmt.Fprintf(v.Log, format, args...)
	}
}

// Run enters the guest and handles its exits until a handler stops it or
// something fails. The exit path allocates nothing.
func (v *VCPU) Run() error {
	if v.Serial != nil {
		v.Serial.Lock()
		defer v.Serial.Unlock()
	}
	for {
		if err := v.prepareEntry(); err != nil {
			return err
		}
		for {
			quiet := v.quiet != nil && v.Quiet()
			if v.Serial != nil {
				v.Serial.Unlock()
			}
			err := v.Enter(v, v.launched)
			if v.Serial != nil {
				v.Serial.Lock()
			}
			if errors.Is(err, ErrStopped) {
				return nil
			}
			if err != nil {
				return fmt.Errorf("%w: %v%s", ErrEntryFailed, err, v.entryDiagnostic())
			}
			v.launched = true
			if !quiet || !v.answerQuietly() {
				break
			}
		}
		act, err := v.HandleExit()
		if err != nil {
			return err
		}
		if act == Stop {
			return v.exited
		}
	}
}

// PrepareEntry is the first half of Run's loop, for a caller that makes
// the VM entry itself: it places a pending event, re-arms the
// VMX-preemption timer, runs the OnEntry functions and counts the entry.
func (v *VCPU) PrepareEntry() error { return v.prepareEntry() }

// HandleExit is the second half: it handles the VM exit the VMCS holds,
// as Run does after each entry (observers, the interrupted event put back,
// the exit's handling), and returns what the handling decided.
func (v *VCPU) HandleExit() (Action, error) {
	act, err := v.exit()
	if err == nil {
		err = v.err()
	}
	return act, err
}

// prepareEntry places a pending event, re-arms the timer and runs the
// OnEntry functions.
func (v *VCPU) prepareEntry() error {
	v.clearErr()
	if v.TakeNMI != nil && v.TakeNMI() {
		v.queueNMI()
	}
	if v.sipiWait {
		// A processor waiting for SIPI takes no event, and VM entry
		// fails with one (SDM Vol. 3C, "Checks on Guest Non-Register
		// State"): what came for it is lost, as on the processor.
		v.DropEvents()
	}
	if v.events.n != 0 || v.windows != 0 {
		v.deliverEvent()
	}
	if t := v.PreemptionTicks; t != 0 && (!v.timerKept || !v.launched || t != v.timerLoaded) {
		v.armTimer()
	}
	for _, f := range v.entries {
		f(v)
	}
	if v.sipiWait && v.VMCS.Read(vmx.EntryInterruptInfo)&vmx.EventValid != 0 {
		v.VMCS.Write(vmx.EntryInterruptInfo, 0) // an extension's injection
	}
	if err := v.err(); err != nil {
		return err
	}
	v.entered++
	return nil
}

// armTimer makes the next entry load the VMX-preemption timer with
// PreemptionTicks. With "save VMX-preemption timer value" off, VM entry
// loads the timer from the VMCS field and VM exit leaves the field alone
// (SDM Vol. 3C, "VMX-Preemption Timer" under VM entries, and "Saving
// Non-Register State" under VM exits): prepareEntry calls it when the value
// changes and at the first entry of a VMCS (which checks the exit
// controls), not at every entry.
func (v *VCPU) armTimer() {
	t := v.PreemptionTicks
	v.write(vmx.PreemptionTimerValue, uint64(t))
	v.timerLoaded = t
	v.timerKept = v.read(vmx.ExitControls)&vmx.ExitSavePreemptionTime == 0
}

// read, read2 and write are the run loop's VMCS accesses: for the
// processor's VMCS they execute VMREAD and VMWRITE directly, without the
// interface and HardwareVMCS's bookkeeping on success; for another VMCS (a
// fake in tests) they go through the interface.
func (v *VCPU) read(f vmx.Field) uint64 {
	if h, ok := v.VMCS.(*HardwareVMCS); ok {
		x, ok := vmx.Read(f)
		if !ok {
			h.failed("VMREAD", f, 0)
		}
		return x
	}
	return v.VMCS.Read(f)
}

// read2 reads two fields, with one call for the processor's VMCS.
func (v *VCPU) read2(f, g vmx.Field) (uint64, uint64) {
	if h, ok := v.VMCS.(*HardwareVMCS); ok {
		a, b, ok := vmx.Read2(f, g)
		if !ok {
			// Again one at a time, to record which failed.
			h.Read(f)
			h.Read(g)
		}
		return a, b
	}
	return v.VMCS.Read(f), v.VMCS.Read(g)
}

func (v *VCPU) write(f vmx.Field, val uint64) {
	if h, ok := v.VMCS.(*HardwareVMCS); ok {
		if !vmx.Write(f, val) {
			h.failed("VMWRITE", f, val)
		}
		return
	}
	v.VMCS.Write(f, val)
}

func (v *VCPU) clearErr() {
	if h, ok := v.VMCS.(*HardwareVMCS); ok {
		h.ClearErr()
		return
	}
	v.VMCS.ClearErr()
}

func (v *VCPU) err() error {
	if h, ok := v.VMCS.(*HardwareVMCS); ok {
		return h.err
	}
	return v.VMCS.Err()
}

// ExitFields returns the VMCS fields a vCPU's exit handling reads at
// most VM exits (the exit's own, the guest state its handlers and
// extensions look at, and the controls they check). A board that hands
// an exit over from the processor that took it reads them there, in one
// go, and answers the handler from that copy.
func ExitFields() []vmx.Field {
	return []vmx.Field{
		vmx.ExitReasonField, vmx.GuestRIP, vmx.ExitQualification, vmx.IDTVectoringInfo,
		vmx.IDTVectoringError, vmx.ExitInstructionLen, vmx.ExitInstructionInfo,
		vmx.GuestInterruptibility, vmx.GuestPhysAddr, vmx.GuestLinearAddr,
		vmx.ExitInterruptInfo, vmx.ExitInterruptError, vmx.EntryInterruptInfo,
		vmx.GuestRFLAGS, vmx.GuestRSP, vmx.GuestCR0, vmx.GuestCR3, vmx.GuestCR4,
		vmx.CR0ReadShadow, vmx.CR4ReadShadow, vmx.GuestEFER, vmx.GuestCSAccess,
		vmx.GuestSSAccess, vmx.GuestCSBase, vmx.GuestActivityState,
		vmx.PinControls, vmx.ProcControls, vmx.Proc2Controls, vmx.EntryControls,
		vmx.TSCOffset,
	}
}

// snapshot reads one VM exit's state from the VMCS: what every exit
// records, and what this exit's reason records. An exit of an
// instruction that has neither an exit qualification nor a place in event
// delivery (vmx.ExitReason.Plain) skips those two fields: the processor
// cleared them.
func (v *VCPU) snapshot() *vmx.Exit {
	e := &v.cur
	*e = vmx.Exit{}
	// read2, written out: this is the hottest read of all.
	var reason, rip uint64
	if h, ok := v.VMCS.(*HardwareVMCS); ok {
		var good bool
		if reason, rip, good = vmx.Read2(vmx.ExitReasonField, vmx.GuestRIP); !good {
			h.Read(vmx.ExitReasonField)
			h.Read(vmx.GuestRIP)
		}
	} else {
		reason, rip = v.VMCS.Read(vmx.ExitReasonField), v.VMCS.Read(vmx.GuestRIP)
	}
	e.Reason, e.RIP = vmx.ExitReason(reason), rip
	if reason&^0xffff != 0 {
		*e = vmx.DecodeExit(uint32(reason))
		e.RIP = rip
	}
	if e.Reason.Plain() && !e.EntryFail {
		return e
	}
	var idt uint64
	e.Qualification, idt = v.read2(vmx.ExitQualification, vmx.IDTVectoringInfo)
	e.IDTVectoring = uint32(idt)
	switch e.Reason {
	case vmx.ExitEPTViolation, vmx.ExitEPTMisconfig:
		e.GuestPA = v.read(vmx.GuestPhysAddr)
	case vmx.ExitExceptionOrNMI:
		e.Interruption = uint32(v.read(vmx.ExitInterruptInfo))
		if e.Interruption&vmx.EventErrorValid != 0 {
			e.InterruptionError = uint32(v.read(vmx.ExitInterruptError))
		}
	}
	return e
}

// exit reads and dispatches one VM exit.
func (v *VCPU) exit() (Action, error) {
	e := v.snapshot()
	rip, qual := e.RIP, e.Qualification
	v.recent[v.nrecent%recentExits] = ExitRecord{e.Reason, rip, qual}
	v.nrecent++
	if !e.Reason.Valid() {
		v.counts[vmx.NumExitReasons]++
		return Stop, fmt.Errorf("%w %d at RIP %#x", ErrUnknownExit, e.Reason, rip)
	}
	v.counts[e.Reason]++
	v.observe(e)
	if e.EntryFail {
		return Stop, fmt.Errorf("%w: %v at RIP %#x, qualification %#x%s", ErrEntryFailed, e.Reason, rip, qual, v.entryDiagnostic())
	}
	// The common exit interrupted no event delivery and is neither an
	// exception nor an EPT violation: it skips both calls.
	if e.IDTVectoring&vmx.EventValid != 0 {
		v.requeueVectoring(e)
	}
	if e.Reason == vmx.ExitExceptionOrNMI || e.Reason == vmx.ExitEPTViolation {
		v.restoreNMIBlocking(e)
	}
	h := v.handlers[e.Reason]
	if h == nil {
		h = fatal
	}
	act, err := h(v, e)
	if err != nil {
		return Stop, err
	}
	if act == Next {
		v.skipInstruction(e.RIP)
	}
	return act, nil
}

// Complete ends an instruction at rip, n bytes long, that an extension
// carried out for the guest: RIP moves past it, and blocking by STI or by
// MOV SS ends, as the instruction's completion ends it (SDM Vol. 3C,
// "Guest Non-Register State"). Handlers whose exit reports the length
// return Next instead.
func (v *VCPU) Complete(rip uint64, n int) {
	v.write(vmx.GuestRIP, rip+uint64(n))
	if s := v.read(vmx.GuestInterruptibility); s&(vmx.BlockingSTI|vmx.BlockingMovSS) != 0 {
		v.write(vmx.GuestInterruptibility, s&^(vmx.BlockingSTI|vmx.BlockingMovSS))
	}
}

// skipInstruction advances RIP past the exiting instruction at rip and
// drops blocking by STI and MOV SS, as completing the instruction would.
func (v *VCPU) skipInstruction(rip uint64) {
	if h, ok := v.VMCS.(*HardwareVMCS); ok {
		// read2 and write, written out: every instruction exit comes
		// here.
		n, s, good := vmx.Read2(vmx.ExitInstructionLen, vmx.GuestInterruptibility)
		if !good {
			h.Read(vmx.ExitInstructionLen)
			h.Read(vmx.GuestInterruptibility)
		}
		if !vmx.Write(vmx.GuestRIP, rip+n) {
			h.failed("VMWRITE", vmx.GuestRIP, rip+n)
		}
		if s&(vmx.BlockingSTI|vmx.BlockingMovSS) != 0 {
			h.Write(vmx.GuestInterruptibility, s&^(vmx.BlockingSTI|vmx.BlockingMovSS))
		}
		return
	}
	v.Complete(rip, int(v.read(vmx.ExitInstructionLen)))
}

func (v *VCPU) entryDiagnostic() string {
	r := v.VMCS.Read
	var seg strings.Builder
	for _, f := range [][5]any{
		{"CS", vmx.GuestCS, vmx.GuestCSBase, vmx.GuestCSLimit, vmx.GuestCSAccess},
		{"SS", vmx.GuestSS, vmx.GuestSSBase, vmx.GuestSSLimit, vmx.GuestSSAccess},
		{"DS", vmx.GuestDS, vmx.GuestDSBase, vmx.GuestDSLimit, vmx.GuestDSAccess},
		{"ES", vmx.GuestES, vmx.GuestESBase, vmx.GuestESLimit, vmx.GuestESAccess},
		{"FS", vmx.GuestFS, vmx.GuestFSBase, vmx.GuestFSLimit, vmx.GuestFSAccess},
		{"GS", vmx.GuestGS, vmx.GuestGSBase, vmx.GuestGSLimit, vmx.GuestGSAccess},
		{"TR", vmx.GuestTR, vmx.GuestTRBase, vmx.GuestTRLimit, vmx.GuestTRAccess},
		{"LDTR", vmx.GuestLDTR, vmx.GuestLDTRBase, vmx.GuestLDTRLimit, vmx.GuestLDTRAccess},
	} {
		fmt.Fprintf(&seg, " %s %#x/%#x/%#x/%#x", f[0], r(f[1].(vmx.Field)), r(f[2].(vmx.Field)), r(f[3].(vmx.Field)), r(f[4].(vmx.Field)))
	}
	return fmt.Sprintf(" (RIP %#x CR0 %#x CR4 %#x EFER %#x entry controls %#x RFLAGS %#x interruptibility %#x activity %d pending debug %#x;%s)",
		r(vmx.GuestRIP), r(vmx.GuestCR0), r(vmx.GuestCR4), r(vmx.GuestEFER), r(vmx.EntryControls),
		r(vmx.GuestRFLAGS), r(vmx.GuestInterruptibility), r(vmx.GuestActivityState), r(vmx.GuestPendingDebug), seg.String())
}

// Report writes the exit counts, one reason per line, and the recent
// exits.
func (v *VCPU) Report(w io.Writer, recent bool) {
	for r, n := range v.counts[:vmx.NumExitReasons] {
		if n > 0 {
			fmt.Fprintf(w, "tamahv: exits %-20s %d\n", vmx.ExitReason(r).String(), n)
		}
	}
	if n := v.counts[vmx.NumExitReasons]; n > 0 {
		fmt.Fprintf(w, "tamahv: exits %-20s %d\n", "unknown", n)
	}
	if recent {
		for _, r := range v.Recent() {
			fmt.Fprintf(w, "tamahv: recent exit %v at RIP %#x, qualification %#x\n", r.Reason, r.RIP, r.Qual)
		}
	}
}

// Stopped ends the run loop from a handler with err as Run's result (nil
// for a clean end).
func (v *VCPU) Stopped(err error) (Action, error) {
	v.exited = err
	return Stop, nil
}
