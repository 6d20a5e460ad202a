//go:build tamago

package smp

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/board/pc/acpi"
	"github.com/tamahv/tamahv/vmx"
)

// ErrAPStopped is APVCPU.Enter's answer once Stop was called.
var ErrAPStopped = errors.New("smp: the application processor's vCPU was stopped")

// launchWait is how long after VMLAUNCH was tried an AP that reported no
// failure counts as in the guest (VM-entry checks fail at the
// instruction; a guest in wait-for-SIPI runs nothing that would show
// success).
const launchWait = time.Millisecond

// APVCPU is a held application processor as a vCPU's processor: its exit
// loop (apLoop) runs the guest and executes VMX instructions, CPUID, MSR
// accesses and XSETBV for the bootstrap processor, which handles the
// exits. Its methods run on the bootstrap processor.
type APVCPU struct {
	ap      *AP
	mb      mailbox
	h       *handoff
	procs   *acpi.Processors
	running atomic.Bool
	stopped atomic.Bool
	tried   time.Time // when VMLAUNCH was first seen tried
	lapic   uint64    // the local APIC's address (apicBase)
	err     error     // the first command that got no answer
}

// VCPUs returns the held APs as vCPU processors, in the order started.
func (s *SMP) VCPUs() []*APVCPU {
	if s == nil {
		return nil
	}
	var out []*APVCPU
	for i := range s.APs {
		ap := &s.APs[i]
		if ap.Status.Held() {
			mb := mailbox{p: ap.params, timeout: time.Second}
			out = append(out, &APVCPU{ap: ap, mb: mb, h: newHandoff(mb), procs: s.procs})
		}
	}
	return out
}

// APICID is the AP's local APIC ID.
func (a *APVCPU) APICID() uint32 { return a.ap.APICID }

// Err returns the first command the AP did not answer, or the first
// queued operation it found failing.
func (a *APVCPU) Err() error {
	if a.err == nil {
		a.err = a.h.failed()
	}
	return a.err
}

// Commands returns the number of commands sent to the AP: the round
// trips its exits cost the bootstrap processor.
func (a *APVCPU) Commands() uint64 { return a.h.cmds }

// SetCPUID gives the AP's exit loop the CPUID answers it may give the
// guest itself (at most 128; none: nil), while it waits for a command.
func (a *APVCPU) SetCPUID(answers []CPUIDAnswer) error {
	a.mb.setCPUID(0, 0)
	n, err := cpuidTable(a.ap.cpuid, answers)
	if err != nil {
		return err
	}
	a.mb.setCPUID(a.ap.cpuidPA, n)
	return nil
}

// AnswerCPUID lets the AP answer the coming entry's CPUID exits from its
// table (on), or has it hand them over.
func (a *APVCPU) AnswerCPUID(on bool) { a.mb.answerCPUID(on) }

// Answered returns the CPUID exits the AP answered itself.
func (a *APVCPU) Answered() uint64 { return a.mb.answered() }

// SetSnapshot names the VMCS fields the AP reads at every exit it hands
// over (at most 32), before its first entry: VMRead answers them from
// there until the guest runs again.
func (a *APVCPU) SetSnapshot(fields []uint32) error { return a.h.setSnapshot(fields) }

func (a *APVCPU) call(cmd uint32, a0, a1 uint64) [4]uint64 {
	r, _, err := a.h.call(cmd, a0, a1)
	if err != nil && a.err == nil {
		a.err = err
	}
	return r
}

// queue queues an operation the AP carries out before its next command.
func (a *APVCPU) queue(kind, x, v uint64) {
	if err := a.h.queue(kind, x, v); err != nil && a.err == nil {
		a.err = err
	}
}

// LoadVMCS makes the VMCS at pa current on the AP and points its host
// RSP and RIP at the exit loop.
func (a *APVCPU) LoadVMCS(pa uint64) error {
	if _, err := a.h.vmx("VMPTRLD", cmdVMPTRLD, pa, 0); err != nil {
		return err
	}
	if err := a.VMWrite(uint32(vmx.HostRSP), binaryU64(a.ap.params[apExitRSP:])); err != nil {
		return err
	}
	return a.VMWrite(uint32(vmx.HostRIP), apExitPC())
}

// VMRead reads a field of the AP's current VMCS: from the exit's
// snapshot where it holds the field, else from the AP.
func (a *APVCPU) VMRead(f uint32) (uint64, error) {
	if v, ok := a.h.read(f); ok {
		return v, nil
	}
	return a.h.vmx("VMREAD", cmdVMREAD, uint64(f), 0)
}

// VMWrite writes a field of the AP's current VMCS: the write is queued
// for the AP's next command, and the snapshot takes its value. Where the
// AP finds it failing, Err says so, and the AP does not enter the guest.
func (a *APVCPU) VMWrite(f uint32, v uint64) error {
	return a.h.queue(opVMWRITE, uint64(f), v)
}

// CPUID executes CPUID on the AP.
func (a *APVCPU) CPUID(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32) {
	r := a.call(cmdCPUID, uint64(leaf), uint64(subleaf))
	return uint32(r[0]), uint32(r[1]), uint32(r[2]), uint32(r[3])
}

// ReadMSR reads an MSR of the AP.
func (a *APVCPU) ReadMSR(msr uint32) uint64 { return a.call(cmdRDMSR, uint64(msr), 0)[0] }

// WriteMSR writes an MSR of the AP, before its next command.
func (a *APVCPU) WriteMSR(msr uint32, v uint64) { a.queue(opWRMSR, uint64(msr), v) }

// XSETBV loads an extended control register of the AP, before its next
// command.
func (a *APVCPU) XSETBV(xcr uint32, v uint64) { a.queue(opXSETBV, uint64(xcr), v) }

// TakeNMI returns, and forgets, how many NMIs reached the AP in VMX root
// (its NMI handler counts them in the mailbox).
func (a *APVCPU) TakeNMI() uint32 { return a.mb.takeNMIs() }

// Bind tells the AP's loop where its EPT shootdown words are.
func (a *APVCPU) Bind(gen, seen *atomic.Uint64, inGuest *atomic.Uint32) {
	atomic.StoreUint64(a.mb.u64(apGen), uint64(uintptr(unsafe.Pointer(gen))))
	atomic.StoreUint64(a.mb.u64(apSeen), uint64(uintptr(unsafe.Pointer(seen))))
	atomic.StoreUint64(a.mb.u64(apInGuest), uint64(uintptr(unsafe.Pointer(inGuest))))
}

// Host returns the state the AP's exits load: tamahv's page tables, GDT
// and TSS, the APs' IDT, the AP's own control registers, EFER and PAT,
// and its parameter block as GS base (the NMI handler counts there).
func (a *APVCPU) Host() pc.HostRegisters {
	h := pc.Host()
	r := a.call(cmdRegs, 0, 0)
	h.CR0, h.CR3, h.CR4 = r[0], r[1], r[2]
	h.EFER, h.PAT = a.ReadMSR(vmx.MSREFER), a.ReadMSR(vmx.MSRPAT)
	h.FSBase, h.GSBase, h.IDTRBase = 0, a.ap.paramsPA, a.ap.idtPA
	return h
}

// Enter runs the guest on the AP with r's registers until its next exit
// that the AP does not answer itself, yielding the calling goroutine
// meanwhile; r must stay where it is (a heap object) while the AP runs.
func (a *APVCPU) Enter(r *vmx.GuestRegs, launched bool) error {
	if a.stopped.Load() {
		return ErrAPStopped
	}
	if err := a.Err(); err != nil {
		return err
	}
	l := uint64(0)
	if launched {
		l = 1
	}
	if err := a.h.post(cmdRun, uint64(uintptr(unsafe.Pointer(r))), l); err != nil {
		return err
	}
	a.running.Store(true)
	for a.mb.busy() {
		if a.stopped.Load() {
			return ErrAPStopped
		}
		runtime.Gosched()
	}
	a.running.Store(false)
	if a.h.takeFailed(); a.h.err != nil {
		return a.h.failed()
	}
	if flags := atomic.LoadUint32(a.mb.u32(apFlags)); flags&flagsFailed != 0 {
		ie, _ := a.VMRead(uint32(vmx.InstructionError))
		insn := "VMRESUME"
		if !launched {
			insn = "VMLAUNCH"
		}
		return fmt.Errorf("smp: %s on APIC ID %d failed (RFLAGS %#x, VM-instruction error %d)", insn, a.ap.APICID, flags, ie)
	}
	a.h.exited()
	return nil
}

// Pending reports whether an exit of the AP waits to be handled.
func (a *APVCPU) Pending() bool { return a.running.Load() && !a.mb.busy() }

// Started reports, once the AP's first VM entry was tried (done), whether
// it failed.
func (a *APVCPU) Started() (done bool, err error) {
	switch atomic.LoadUint32(a.mb.u32(apLaunch)) {
	case 0:
		return false, nil
	case 2:
		return true, fmt.Errorf("smp: VMLAUNCH on APIC ID %d failed", a.ap.APICID)
	}
	if a.tried.IsZero() {
		a.tried = time.Now()
	}
	return time.Since(a.tried) >= launchWait && atomic.LoadUint32(a.mb.u32(apLaunch)) == 1, nil
}

// Show lists the AP in the guest's processor tables.
func (a *APVCPU) Show() error {
	if a.procs == nil {
		return errors.New("smp: no processor tables")
	}
	_, err := a.procs.Show(pc.PhysMem{}, a.ap.APICID)
	return err
}

// Stop makes the AP stay in VMX root operation from its next exit on, and
// Enter return ErrAPStopped.
func (a *APVCPU) Stop() {
	a.stopped.Store(true)
	atomic.StoreUint32(a.mb.u32(apStop), 1)
}

// Park halts an AP that runs no vCPU for good (its loop would spin).
func (a *APVCPU) Park() error { return a.h.post(cmdPark, 0, 0) }

// Counts returns the AP's VM entries, the preemption-timer exits it
// answered itself, and the entries an NMI cut short (apNMI).
func (a *APVCPU) Counts() (entries, ticks, cuts uint64) {
	return atomic.LoadUint64(a.mb.u64(apEntries)), atomic.LoadUint64(a.mb.u64(apTicks)), atomic.LoadUint64(a.mb.u64(apCuts))
}

func binaryU64(b []byte) uint64 { return *(*uint64)(unsafe.Pointer(&b[0])) }

// KickBSP has the AP send an NMI to the bootstrap processor (APIC ID
// bspAPIC) after it hands an exit over while inGuest says the bootstrap
// processor runs the guest, counting each NMI in kicks first: the
// bootstrap processor's NMI handling tells these from the guest's by the
// count.
func (a *APVCPU) KickBSP(inGuest, kicks *atomic.Uint32, bspAPIC uint32) {
	atomic.StoreUint32(a.mb.u32(apBSPAPIC), bspAPIC)
	atomic.StoreUint64(a.mb.u64(apBSPKicks), uint64(uintptr(unsafe.Pointer(kicks))))
	atomic.StoreUint64(a.mb.u64(apBSPIn), uint64(uintptr(unsafe.Pointer(inGuest))))
}

// Kick sends the AP an NMI from the calling (bootstrap) processor's local
// APIC, as the guest left it: an AP in the guest exits (NMI exiting). The
// guest's own next destination in the xAPIC's ICR is kept. It reports
// whether the NMI went: not where the guest disabled that local APIC or
// kept its ICR busy.
func (a *APVCPU) Kick() bool {
	base := hw.ReadMSR(vmx.MSRAPICBase)
	switch {
	case base&vmx.APICBaseEnable == 0:
		return false
	case base&vmx.APICBaseX2APIC != 0:
		hw.WriteMSR(vmx.MSRX2APICICR, uint64(a.ap.APICID)<<32|vmx.ICRDeliveryNMI|vmx.ICRLevelAssert)
		return true
	}
	mmio := base & vmx.APICBaseAddr
	idle := func() bool { return mmioRead32(mmio+vmx.APICICRLow)&vmx.ICRPending == 0 }
	for i := 0; i < 1000 && !idle(); i++ {
	}
	if !idle() {
		return false
	}
	high := mmioRead32(mmio + vmx.APICICRHigh)
	mmioWrite32(mmio+vmx.APICICRHigh, a.ap.APICID<<24)
	mmioWrite32(mmio+vmx.APICICRLow, vmx.ICRDeliveryNMI|vmx.ICRLevelAssert)
	for i := 0; i < 1000 && !idle(); i++ {
	}
	mmioWrite32(mmio+vmx.APICICRHigh, high)
	return true
}

// LAPICRead reads the AP's local APIC register at off (xAPIC, at the
// address IA32_APIC_BASE gives).
func (a *APVCPU) LAPICRead(off uint32) uint32 {
	return uint32(a.call(cmdMMIORd, a.apicBase()+uint64(off&0xff0), 0)[0])
}

// LAPICWrite writes the AP's local APIC register at off, before its next
// command.
func (a *APVCPU) LAPICWrite(off, v uint32) {
	a.queue(opMMIOWr, a.apicBase()+uint64(off&0xff0), uint64(v))
}

// apicBase is the AP's local APIC address, read once: the guest cannot
// move it (hv's MSR policy refuses a new base), so every emulated write
// costs one command, not two.
func (a *APVCPU) apicBase() uint64 {
	if a.lapic == 0 {
		a.lapic = a.ReadMSR(vmx.MSRAPICBase) & vmx.APICBaseAddr
	}
	return a.lapic
}

// LAPICRead reads the calling processor's local APIC register at off.
func LAPICRead(off uint32) uint32 {
	return mmioRead32(hw.ReadMSR(vmx.MSRAPICBase)&vmx.APICBaseAddr + uint64(off&0xff0))
}

// LAPICWrite writes the calling processor's local APIC register at off.
func LAPICWrite(off, v uint32) {
	mmioWrite32(hw.ReadMSR(vmx.MSRAPICBase)&vmx.APICBaseAddr+uint64(off&0xff0), v)
}
