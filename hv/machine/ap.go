package machine

import (
	"sync/atomic"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/vmx"
)

// AP is an application processor the board holds for the guest, one vCPU
// each. The AP runs no Go: its own exit loop, in tamahv's memory, enters
// the guest, answers its VMX-preemption-timer exits itself and keeps its
// part of the EPT shootdown (guestmem.ShootdownWords), and hands every other
// exit to the machine, whose handlers run on the bootstrap processor with
// every other vCPU's: the AP's VMCS, CPUID, MSRs and XCR0 are reached
// through the AP, which executes those instructions for the caller.
type AP interface {
	// APICID is the processor's local APIC ID.
	APICID() uint32
	// LoadVMCS makes the VMCS at pa current on the AP (VMCLEAR, VMPTRLD)
	// and returns access to it; the region's revision identifier is
	// written.
	LoadVMCS(pa uint64) (hv.VMCS, error)
	// Host returns the state the AP's VM exits load (its exit loop writes
	// HOST_RSP and HOST_RIP itself).
	Host() hv.HostState
	// CPUID executes CPUID on the AP.
	CPUID(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)
	// XSETBV loads an extended control register on the AP.
	XSETBV(xcr uint32, v uint64)
	// ReadMSR reads a model-specific register of the AP.
	ReadMSR(msr uint32) uint64
	// WriteMSR writes one, with a value tamahv's MSR policy checked.
	WriteMSR(msr uint32, v uint64)
	// TakeNMI returns, and forgets, how many NMIs reached the AP while
	// it was out of the guest (its exit loop counts them).
	TakeNMI() uint32
	// Bind tells the AP where its shootdown words are; before its first
	// entry.
	Bind(w guestmem.ShootdownWords) error
	// Enter runs the guest on the AP until the next exit it hands over,
	// with r's registers (they are stored back at the exit). It yields the
	// calling goroutine while the AP runs the guest. After Stop it
	// returns hv.ErrStopped.
	Enter(r *vmx.GuestRegs, launched bool) error
	// Pending reports whether an exit of the AP waits to be handled.
	Pending() bool
	// Started reports, once the AP's first VM entry was tried (done),
	// whether it failed.
	Started() (done bool, err error)
	// Show lists the AP in the guest's processor tables: its vCPU waits
	// for the guest's start-up IPI.
	Show() error
	// Stop ends the AP's guest: Enter returns hv.ErrStopped, and the AP
	// stays in VMX root operation from its next exit on.
	Stop()
}

// SMPBoard is a Board whose application processors can run vCPUs.
type SMPBoard interface {
	Board
	// APs returns the application processors held for the guest.
	APs() []AP
}

// Kicker is an AP that shortens two waits with NMIs: the bootstrap
// processor's for the AP's exits (it handles them only when out of the
// guest), and a shootdown's for the AP (until it leaves the guest). The
// machine tells these NMIs from the guest's by counting them.
type Kicker interface {
	// KickBSP has the AP send the bootstrap processor an NMI after each
	// exit it hands over while inGuest is 1, counting it in kicks first.
	KickBSP(inGuest, kicks *atomic.Uint32)
	// Kick sends the AP an NMI from the bootstrap processor, and reports
	// whether it went (the guest can disable the local APIC).
	Kick() bool
}
