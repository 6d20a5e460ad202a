package smp

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"
)

// The mailbox in an AP's parameter block, after the start-up fields
// (trampoline.go): the bootstrap processor writes a command's arguments,
// then the command; the AP's exit loop (apLoop, smp_amd64.s, which has the
// same numbers) executes it, writes the results and clears the command.
const (
	apCmd      = 64  // uint32: the command; 0 once done
	apFlags    = 68  // uint32: RFLAGS after its instruction (CF or ZF: failed)
	apArg0     = 72  // arguments
	apArg1     = 80  //
	apRet0     = 88  // results
	apRet1     = 96  //
	apRet2     = 104 //
	apRet3     = 112 //
	apGen      = 120 // *uint64: the EPT shootdown's generation
	apSeen     = 128 // *uint64: the generation this AP last invalidated for
	apInGuest  = 136 // *uint32: 1 while this AP runs the guest
	apNMIs     = 144 // uint32: NMIs that reached the AP in VMX root (apNMI)
	apStop     = 148 // uint32: 1: stay in VMX root from the next exit on
	apTicks    = 152 // uint64: VMX-preemption-timer exits the AP answered
	apEPTDesc  = 160 // 16 bytes: the INVEPT descriptor
	apLaunch   = 176 // uint32: 1 once VMLAUNCH was tried, 2 where it failed
	apExitRSP  = 184 // the exit loop's stack, HOST_RSP
	apEntries  = 192 // uint64: VM entries
	apRegs     = 200 // *vmx.GuestRegs of the guest being run
	apBSPIn    = 208 // *uint32: 1 while the bootstrap processor runs the guest (0: no kick)
	apBSPKicks = 216 // *uint32: NMIs sent to the bootstrap processor, counted before each
	apBSPAPIC  = 224 // uint32: the bootstrap processor's APIC ID
	apWindow   = 232 // uint32: 1 from the mark in the guest to the VM exit (apNMI cuts the entry)
	apCut      = 236 // uint32: 1 once the entry's VMX-preemption timer was set to 0
	apTimer    = 240 // uint32: the timer value the cut entry replaced
	apCuts     = 248 // uint64: entries cut because an NMI reached VMX root
	apBlockEnd = 256
)

// The hand-off in the parameter block: the VMCS fields the AP reads at
// every exit it hands over (the exit's snapshot), and the operations the
// bootstrap processor queues for it, which the AP carries out, in order,
// before its next command. An exit handled on the bootstrap processor
// thus reads its fields without asking the AP, and its writes travel with
// the command that resumes the guest.
const (
	apSnapN    = 256  // uint32: the fields of the snapshot
	apOpsN     = 260  // uint32: the operations queued; the AP zeroes it once it carried them out
	apOpFail   = 264  // uint32: 1 + the index of the first queued operation that failed; 0: none
	apOpFlags  = 268  // uint32: that operation's RFLAGS
	apSnapOK   = 272  // uint64: bit i: field i was read at the exit
	apFastOK   = 280  // uint32: 1: the AP may answer this entry's CPUID exits from its table
	apCPUIDN   = 284  // uint32: the table's entries (0: none)
	apCPUIDTab = 288  // uint64: the table's address (a page of cpuidEntry)
	apAnswered = 296  // uint64: CPUID exits the AP answered itself
	apSnapF    = 512  // [maxSnap]uint32: the snapshot's fields
	apSnapV    = 640  // [maxSnap]uint64: their values at the exit
	apOps      = 1024 // [maxOps]struct{ kind, a, b uint64 }: the queued operations
	apOpsEnd   = apOps + maxOps*opSize

	// maxSnap is the number of fields a snapshot holds at most.
	maxSnap = 32
	// maxOps is the number of operations the block queues at most; one
	// more sends those queued first (cmdFlush).
	maxOps = 120
	opSize = 24
)

// Queued operations (apOps).
const (
	opVMWRITE = 1 // VMCS[a] = b
	opWRMSR   = 2 // MSR[a] = b
	opXSETBV  = 3 // XCR[a] = b
	opMMIOWr  = 4 // the 32 bits at physical a = b
)

// apPages is the number of pages each AP gets: its parameter block, its
// stack, its VMXON region and its CPUID answers (cpuid.go).
const apPages = 4

// Mailbox commands.
const (
	cmdVMPTRLD = 1  // VMCLEAR, VMPTRLD [arg0]
	cmdVMREAD  = 2  // ret0 = VMCS[arg0]
	cmdVMWRITE = 3  // VMCS[arg0] = arg1
	cmdCPUID   = 4  // ret0-3 = CPUID(arg0, arg1)
	cmdRDMSR   = 5  // ret0 = MSR[arg0]
	cmdWRMSR   = 6  // MSR[arg0] = arg1
	cmdXSETBV  = 7  // XCR[arg0] = arg1
	cmdRun     = 8  // enter the guest: arg0 *vmx.GuestRegs, arg1 launched
	cmdPark    = 9  // halt for good
	cmdRegs    = 10 // ret0-2 = CR0, CR3, CR4
	cmdMMIORd  = 11 // ret0 = the 32 bits at physical arg0 (the AP's local APIC)
	cmdMMIOWr  = 12 // the 32 bits at physical arg0 = arg1
	cmdFlush   = 13 // nothing but the queued operations, which every command carries out first
)

// rflags bits that report a failed VMX instruction (SDM Vol. 3C,
// "Conventions": VMfailInvalid sets CF, VMfailValid ZF).
const flagsFailed = 1<<0 | 1<<6

// ErrAPSilent is returned when an AP does not answer a command in time:
// it stopped (a fault in VMX root halts it) or never ran its loop.
var ErrAPSilent = errors.New("smp: the application processor does not answer")

// ErrAPBusy is returned for a command sent while the AP runs the guest or
// another command.
var ErrAPBusy = errors.New("smp: the application processor is busy")

// mailbox drives one AP's exit loop through its parameter block.
type mailbox struct {
	p *[4096]byte
	// timeout bounds the wait for a command's answer.
	timeout time.Duration
}

func (m mailbox) u32(off int) *uint32 { return (*uint32)(unsafe.Pointer(&m.p[off])) }
func (m mailbox) u64(off int) *uint64 { return (*uint64)(unsafe.Pointer(&m.p[off])) }

// takeNMIs returns, and zeroes, the count of NMIs that reached the AP in
// VMX root (apNMIs): its NMI handler adds one with a locked increment, so
// none is lost between the read and the zero.
func (m mailbox) takeNMIs() uint32 { return atomic.SwapUint32(m.u32(apNMIs), 0) }

// busy reports whether the AP has not finished its last command.
func (m mailbox) busy() bool { return atomic.LoadUint32(m.u32(apCmd)) != 0 }

// post sends a command without waiting for its end.
func (m mailbox) post(cmd uint32, a0, a1 uint64) error {
	if m.busy() {
		return ErrAPBusy
	}
	atomic.StoreUint64(m.u64(apArg0), a0)
	atomic.StoreUint64(m.u64(apArg1), a1)
	atomic.StoreUint32(m.u32(apCmd), cmd)
	return nil
}

// call sends a command and waits (spinning) for the AP's answer; it
// returns the four result words and the instruction's RFLAGS.
func (m mailbox) call(cmd uint32, a0, a1 uint64) ([4]uint64, uint32, error) {
	if err := m.post(cmd, a0, a1); err != nil {
		return [4]uint64{}, 0, err
	}
	// The clock is read only once the AP is slow to answer: after the
	// first 1,024 looks.
	var start time.Time
	for n := 1; m.busy(); n++ {
		if n%1024 != 0 {
			continue
		}
		if start.IsZero() {
			start = time.Now()
		} else if time.Since(start) > m.timeout {
			return [4]uint64{}, 0, fmt.Errorf("%w (command %d)", ErrAPSilent, cmd)
		}
	}
	return [4]uint64{
		atomic.LoadUint64(m.u64(apRet0)), atomic.LoadUint64(m.u64(apRet1)),
		atomic.LoadUint64(m.u64(apRet2)), atomic.LoadUint64(m.u64(apRet3)),
	}, atomic.LoadUint32(m.u32(apFlags)), nil
}
