package machine_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// smpBoard is board with application processors.
type smpBoard struct {
	*board
	aps []machine.AP
}

func (s *smpBoard) APs() []machine.AP { return s.aps }

// fakeAP is a machine.AP whose Enter plays a script of VM exits against
// its own fake VMCS, in the calling goroutine, and keeps its part of the
// shootdown as the AP's exit loop does: marked in the guest at each entry
// in an active state (invalidating first if the generation moved), out at
// each exit.
type fakeAP struct {
	t      *testing.T
	b      *board
	id     uint32
	vmcs   *hvtest.VMCS
	script []apStep
	// first is the first entry's error (nil: it succeeds).
	first error
	// done is closed when the script has run out; the AP then waits for
	// Stop.
	done chan struct{}

	words         guestmem.ShootdownWords
	bound         bool
	vmcsPA        uint64
	invalidations int
	shows         atomic.Int32
	entered       chan struct{} // closed at the first entry
	shown         chan struct{} // closed by Show
	stop          chan struct{} // closed by Stop
	stopOnce      sync.Once
	entries       int
	// leftover: the test expects steps of the script not to run; else
	// it fails when it ends with any left.
	leftover bool
	// nmis are the NMIs that reached the AP in VMX root, for TakeNMI.
	nmis atomic.Uint32
	// table is the CPUID table last set (tables: how many times);
	// answering, what AnswerCPUID said for each entry since.
	table     []hv.CPUIDEntry
	tables    int
	answering []bool
}

func (a *fakeAP) SetCPUID(t []hv.CPUIDEntry) error {
	a.table, a.tables = t, a.tables+1
	return nil
}
func (a *fakeAP) AnswerCPUID(on bool) { a.answering = append(a.answering, on) }
func (a *fakeAP) Answered() uint64    { return 0 }

// apStep is one scripted exit of an AP, as step is vCPU 0's.
type apStep struct {
	name  string
	check func(a *fakeAP, r *vmx.GuestRegs)
	exit  func(a *fakeAP, r *vmx.GuestRegs)
}

// newFakeAP returns an AP with an empty script; the test fails if it
// ends with steps of the AP's script that never ran (unless it set
// leftover).
func newFakeAP(t *testing.T, b *board, id uint32) *fakeAP {
	a := &fakeAP{t: t, b: b, id: id, vmcs: newVMCS(), done: make(chan struct{}),
		entered: make(chan struct{}), shown: make(chan struct{}), stop: make(chan struct{})}
	t.Cleanup(func() {
		if !a.leftover {
			var names []string
			for _, s := range a.script {
				names = append(names, s.name)
			}
			assert.Empty(t, names, "vCPU steps of APIC ID %d that never ran", id)
		}
	})
	return a
}

func (a *fakeAP) APICID() uint32 { return a.id }
func (a *fakeAP) LoadVMCS(pa uint64) (hv.VMCS, error) {
	a.vmcsPA = pa
	return a.vmcs, nil
}
func (a *fakeAP) Host() hv.HostState {
	return hv.HostState{CR0: 0x80000031, CR4: 0x2020, CS: 8, SS: 16, TR: 24, GSBase: uint64(a.id) << 12}
}
func (a *fakeAP) CPUID(leaf, _ uint32) (uint32, uint32, uint32, uint32) {
	return leaf + 100, a.id, 0, 0
}
func (a *fakeAP) XSETBV(uint32, uint64)   {}
func (a *fakeAP) ReadMSR(uint32) uint64   { return 0 }
func (a *fakeAP) WriteMSR(uint32, uint64) {}
func (a *fakeAP) TakeNMI() uint32         { return a.nmis.Swap(0) }
func (a *fakeAP) Bind(w guestmem.ShootdownWords) error {
	a.words, a.bound = w, true
	return nil
}
func (a *fakeAP) Pending() bool { return false }
func (a *fakeAP) Started() (bool, error) {
	<-a.entered // the fake's first entry is as good as done once called
	return true, a.first
}
func (a *fakeAP) Show() error {
	a.shows.Add(1)
	close(a.shown)
	return nil
}
func (a *fakeAP) Stop() { a.stopOnce.Do(func() { close(a.stop) }) }

func (a *fakeAP) stopped() bool {
	select {
	case <-a.stop:
		return true
	default:
		return false
	}
}

func (a *fakeAP) Enter(r *vmx.GuestRegs, launched bool) error {
	a.entries++
	if a.entries == 1 {
		assert.False(a.t, launched)
		close(a.entered)
		if a.first != nil {
			return a.first
		}
		// In wait-for-SIPI until the guest knows the AP.
		select {
		case <-a.shown:
		case <-a.stop:
			return hv.ErrStopped
		}
	}
	if len(a.script) == 0 {
		close(a.done)
		<-a.stop
		return hv.ErrStopped
	}
	s := a.script[0]
	a.script = a.script[1:]
	if a.vmcs.Fields[vmx.GuestActivityState] != vmx.ActivityWaitForSIPI {
		a.words.InGuest.Store(1)
		if g := a.words.Generation.Load(); a.words.Seen.Load() != g {
			a.invalidations++
			a.words.Seen.Store(g)
		}
	}
	if s.check != nil {
		s.check(a, r)
	}
	f := a.vmcs.Fields
	f[vmx.ExitQualification], f[vmx.ExitInstructionLen], f[vmx.IDTVectoringInfo] = 0, 3, 0
	f[vmx.GuestPhysAddr], f[vmx.EntryInterruptInfo] = 0, 0
	s.exit(a, r)
	a.words.InGuest.Store(0)
	return nil
}

func (a *fakeAP) exitWith(reason vmx.ExitReason) { a.vmcs.Fields[vmx.ExitReasonField] = uint64(reason) }

// run sets the privilege level and paging mode the AP's guest runs in,
// as board.run does vCPU 0's.
func (a *fakeAP) run(cpl int) {
	f := a.vmcs.Fields
	f[vmx.GuestSSAccess] = uint64(0x93 | cpl<<5)
	f[vmx.GuestCR3] = pml4
	f[vmx.GuestCR0] |= 1<<31 | 1
	f[vmx.GuestCR4] |= 1 << 5
	f[vmx.EntryControls] |= vmx.EntryIA32eMode
}

// sipi is the guest's start-up IPI to the AP, with vector 0x9a.
func sipi(a *fakeAP, _ *vmx.GuestRegs) {
	a.exitWith(vmx.ExitSIPI)
	a.vmcs.Fields[vmx.ExitQualification] = 0x9a
}

// lockedBuffer is a log written by several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// newSMPMachine is newMachine on a board with n application processors.
func newSMPMachine(t *testing.T, n int, setup func(aps []*fakeAP)) (*board, *machine.Machine, *lockedBuffer, []*fakeAP) {
	b := newBoard(t)
	b.vmcs = newVMCS()
	kernel := bzImage()
	require.NoError(t, b.WritePhys(0x100_0000, kernel))
	aps := make([]*fakeAP, n)
	sb := &smpBoard{board: b}
	for i := range aps {
		aps[i] = newFakeAP(t, b, uint32(i+1))
		sb.aps = append(sb.aps, aps[i])
	}
	if setup != nil {
		setup(aps)
	}
	log := &lockedBuffer{}
	c := exampleConfig(uint64(len(kernel)))
	c.Log = log
	m, err := machine.New(sb, c)
	require.NoError(t, err)
	return b, m, log, aps
}

// waitFor is vCPU 0's step that stays in the guest until the APs' scripts
// have run out, then exits the guest with status.
func waitFor(status uint64, aps ...*fakeAP) step {
	return step{name: "vCPU 0 waits for the APs", exit: func(b *board, r *vmx.GuestRegs) {
		for _, a := range aps {
			<-a.done
		}
		b.run(0)
		r.RAX, r.RDI = hcall.Exit, status
		b.exitWith(vmx.ExitVMCALL)
	}}
}

// TestSMPAPStartsAndRuns: an SMP board's AP gets a vCPU of its own (its
// VMCS loaded through the AP, its own VPID, a tenth of vCPU 0's timer,
// bound to its shootdown words) that waits for start-up; the guest's INIT
// puts it back in wait-for-SIPI, its SIPI starts it in real mode at the
// vector, and it runs: CPUID is the AP's, a hypercall from it is answered.
// vCPU 0's exit ends the guest and stops the AP; the exited line counts
// both vCPUs and vCPU 1's exits have a header of their own.
func TestSMPAPStartsAndRuns(t *testing.T) {
	b, m, log, aps := newSMPMachine(t, 1, nil)
	ap := aps[0]
	require.Len(t, m.VCPUs, 2)
	assert.Same(t, m.VCPU, m.VCPUs[0])
	f := ap.vmcs.Fields
	assert.EqualValues(t, vmx.ActivityWaitForSIPI, f[vmx.GuestActivityState], "MakeAP")
	assert.EqualValues(t, 2, f[vmx.VPID])
	assert.EqualValues(t, 1, b.vmcs.Fields[vmx.VPID])
	assert.Equal(t, b.vmcs.Fields[vmx.EPTPointer], f[vmx.EPTPointer], "one EPT")
	assert.Equal(t, b.vmcs.Fields[vmx.MSRBitmap], f[vmx.MSRBitmap])
	assert.EqualValues(t, 1<<12, f[vmx.HostGSBase], "the AP's host state")
	assert.Equal(t, m.VCPU.PreemptionTicks, m.VCPUs[1].PreemptionTicks)
	assert.NotZero(t, m.VCPUs[1].PreemptionTicks)
	rev, err := b.Bytes(ap.vmcsPA)
	require.NoError(t, err)
	assert.Equal(t, uint32(skylake().Revision()), uint32(rev[0])|uint32(rev[1])<<8|uint32(rev[2])<<16|uint32(rev[3])<<24, "revision written")
	w, err := m.Shootdown.Words(1)
	require.NoError(t, err)
	assert.True(t, ap.bound)
	assert.Same(t, w.InGuest, ap.words.InGuest)
	assert.Same(t, m.VCPU.Serial, m.VCPUs[1].Serial, "one Serial")

	ap.script = []apStep{
		{name: "INIT", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Contains(t, log.String(), "tamahv: AP APIC ID 1: vCPU 1 waits for start-up\n")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitINIT) }},
		{name: "SIPI", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.EqualValues(t, vmx.ActivityWaitForSIPI, a.vmcs.Fields[vmx.GuestActivityState], "INIT: waits again")
			assert.NotContains(t, log.String(), "vCPU 1 started")
		}, exit: sipi},
		{name: "CPUID", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.EqualValues(t, vmx.ActivityActive, a.vmcs.Fields[vmx.GuestActivityState])
			assert.EqualValues(t, 0x9a000, a.vmcs.Fields[vmx.GuestCSBase])
			assert.Zero(t, a.vmcs.Fields[vmx.GuestRIP])
			assert.Contains(t, log.String(), "tamahv: vCPU 1 started\n")
			assert.True(t, a.words.InGuest.Load() == 1, "marked in the guest when active")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			r.RAX = 0x17
			a.exitWith(vmx.ExitCPUID)
		}},
		{name: "identify from user mode", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.EqualValues(t, 0x17+100, r.RAX, "the AP's CPUID")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			a.run(3)
			r.RAX = hcall.Identify
			a.exitWith(vmx.ExitVMCALL)
		}},
		{name: "answered", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Equal(t, uint64(hcall.Magic), r.RAX)
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	b.script = []step{waitFor(3, ap)}
	require.NoError(t, m.Run(), "log:\n%s", log)
	out := log.String()
	assert.True(t, ap.stopped())
	assert.EqualValues(t, 1, ap.shows.Load())
	assert.Equal(t, 1, strings.Count(out, "tamahv: vCPU 1 started\n"))
	assert.Equal(t, 1, strings.Count(out, "tamahv: vCPU 0 started\n"))
	assert.Contains(t, out, "tamahv: guest exited (status 3) after 6 exits (vCPU 0: 1, vCPU 1: 5)\n")
	assert.Contains(t, out, "tamahv: exits VMCALL               1\ntamahv: vCPU 1 exits\ntamahv: exits INIT                 1\n")
	assert.NotContains(t, out, "did not stop")
}

// TestSMPSwapReadOnAP: a swap read asked on vCPU 1 gets its #PF injected
// on vCPU 1, the one in the address space, followed there by vCPU 1's
// delivery; vCPU 0, in the guest all along, gets nothing.
func TestSMPSwapReadOnAP(t *testing.T) {
	b, m, log, aps := newSMPMachine(t, 1, nil)
	ap := aps[0]
	want := bytes.Repeat([]byte("smp read"), 512)
	b.mapProcess(want)
	req := hcall.SwapRequest{VA: dataVA, Len: 4096, Options: uint64(swapmem.UserFault), SHA256: sha256.Sum256(want)}.Encode()
	require.NoError(t, b.WritePhys(reqPA, req[:]))

	ap.script = []apStep{
		{name: "SIPI", exit: sipi},
		{name: "swap read from user mode", exit: func(a *fakeAP, r *vmx.GuestRegs) {
			a.run(3)
			r.RAX, r.RDI, r.RSI = hcall.SwapRead, reqVA, hcall.SwapRequestSize
			a.exitWith(vmx.ExitVMCALL)
		}},
		{name: "the guest's pager writes the PTE", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Zero(t, r.RAX, "swap read accepted; log:\n%s", log)
			assert.Equal(t, uint64(1<<31|3<<8|1<<11|vmx.VectorPF), a.vmcs.Fields[vmx.EntryInterruptInfo], "#PF injected on vCPU 1")
			assert.Equal(t, uint64(dataVA), r.CR2)
			_, perm, _, _, ok := m.EPT.Lookup(pt)
			require.True(t, ok)
			assert.Zero(t, perm&ept.Write, "the page table is watched")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			a.vmcs.Fields[vmx.GuestPhysAddr] = pt + 8*(dataVA>>12&511)
			a.vmcs.Fields[vmx.ExitQualification] = 1<<1 | 1<<3 | 1<<5 | 1<<7 | 1<<8
			a.exitWith(vmx.ExitEPTViolation)
		}},
		{name: "the write is done; status", check: func(a *fakeAP, r *vmx.GuestRegs) { a.b.pagerDone() }, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			r.RAX = hcall.SwapStatus
			a.exitWith(vmx.ExitVMCALL)
		}},
		{name: "ok", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Equal(t, uint64(hcall.StatusOK), r.RAX, "log:\n%s", log)
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	b.script = []step{
		{name: "vCPU 0 in the guest", check: func(b *board, r *vmx.GuestRegs) {}, exit: func(b *board, r *vmx.GuestRegs) {
			<-ap.done
			assert.Zero(t, b.vmcs.Fields[vmx.EntryInterruptInfo], "nothing injected on vCPU 0")
			b.run(0)
			r.RAX, r.RDI = hcall.Exit, 0
			b.exitWith(vmx.ExitVMCALL)
		}},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
	out := log.String()
	assert.Contains(t, out, "tamahv: swapmem read ok")
	assert.EqualValues(t, 1, m.Engine.Stats().Injected)
	require.Len(t, m.Deliveries, 2)
	assert.Same(t, m.Delivery, m.Deliveries[0])
	assert.Zero(t, m.Deliveries[0].Delivered)
	assert.EqualValues(t, 1, m.Deliveries[1].Delivered, "confirmed at vCPU 1's next exit")
	assert.Contains(t, out, "#PF deliveries 1 confirmed, 0 interrupted and re-queued, 0 lost and cancelled")
	assert.Contains(t, out, "after 6 exits (vCPU 0: 1, vCPU 1: 5)")
}

// TestSMPShootdownFromAPExit: an EPT change made while handling vCPU 1's
// exit (memory above 4 GiB mapped on first touch) invalidates on the
// bootstrap processor and returns with vCPU 0 still in the guest, but
// waits for vCPU 2, in the guest with the old generation, until its
// processor marks itself out; vCPU 2 invalidates at its next entry.
func TestSMPShootdownFromAPExit(t *testing.T) {
	b, m, log, aps := newSMPMachine(t, 2, nil)
	ap1, ap2 := aps[0], aps[1]
	const far = 0x40_0000_0000 // 256 GiB: nothing there
	ap2In, v0In := make(chan struct{}), make(chan struct{})
	var ap2Out atomic.Bool
	var flushes int
	ap2.script = []apStep{
		{name: "SIPI", exit: sipi},
		{name: "in the guest until the EPT changes", exit: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.EqualValues(t, 1, a.words.InGuest.Load())
			seen := a.words.Seen.Load()
			close(ap2In)
			for a.words.Generation.Load() == seen {
				runtime.Gosched()
			}
			ap2Out.Store(true)
			a.exitWith(vmx.ExitCPUID)
		}},
		{name: "invalidated at entry", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Equal(t, 1, a.invalidations)
			assert.Equal(t, a.words.Generation.Load(), a.words.Seen.Load())
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	ap1.script = []apStep{
		{name: "SIPI", exit: sipi},
		{name: "touches memory above 4 GiB", exit: func(a *fakeAP, r *vmx.GuestRegs) {
			<-ap2In
			<-v0In
			flushes = b.flush
			a.vmcs.Fields[vmx.GuestPhysAddr] = far
			a.vmcs.Fields[vmx.ExitQualification] = 1 // read
			a.exitWith(vmx.ExitEPTViolation)
		}},
		{name: "after the change", check: func(a *fakeAP, r *vmx.GuestRegs) {
			_, _, _, _, ok := m.EPT.Lookup(far)
			assert.True(t, ok, "mapped")
			assert.True(t, ap2Out.Load(), "the change waited for vCPU 2 to leave the guest")
			c0, err := m.Shootdown.CPU(0)
			require.NoError(t, err)
			assert.True(t, c0.InGuest(), "and did not wait for vCPU 0, in the guest")
			assert.Equal(t, flushes+1, b.flush, "INVEPT on the bootstrap processor")
			assert.Equal(t, 1, a.invalidations, "vCPU 1, out of the guest at the change, invalidates at its next entry")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	wait := waitFor(0, ap1, ap2)
	b.script = []step{{name: "vCPU 0 in the guest", exit: func(b *board, r *vmx.GuestRegs) {
		close(v0In)
		wait.exit(b, r)
	}}}
	require.NoError(t, m.Run(), "log:\n%s", log)
	assert.Contains(t, log.String(), "after 7 exits (vCPU 0: 1, vCPU 1: 3, vCPU 2: 3)")
}

// TestSMPFailedAPStaysHidden: an AP whose first VM entry fails is logged
// and never shown to the guest, which runs on the others.
func TestSMPFailedAPStaysHidden(t *testing.T) {
	b, m, log, aps := newSMPMachine(t, 2, func(aps []*fakeAP) {
		aps[0].first = errors.New("VMLAUNCH failed")
	})
	b.script = []step{
		{name: "cpuid", exit: func(b *board, r *vmx.GuestRegs) {
			b.run(0)
			b.exitWith(vmx.ExitCPUID)
		}},
		{name: "exit", exit: func(b *board, r *vmx.GuestRegs) {
			r.RAX, r.RDI = hcall.Exit, 7
			b.exitWith(vmx.ExitVMCALL)
		}},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
	out := log.String()
	assert.Contains(t, out, "tamahv: AP APIC ID 1: VM entry failed: VMLAUNCH failed\n")
	assert.NotContains(t, out, "AP APIC ID 1: vCPU")
	assert.Contains(t, out, "tamahv: AP APIC ID 2: vCPU 2 waits for start-up\n")
	assert.Zero(t, aps[0].shows.Load(), "hidden")
	assert.EqualValues(t, 1, aps[1].shows.Load())
	assert.True(t, aps[0].stopped())
	assert.True(t, aps[1].stopped())
	assert.Contains(t, out, "tamahv: guest exited (status 7) after 2 exits (vCPU 0: 2, vCPU 1: 0, vCPU 2: 0)\n")
}

// TestSMPAPErrorStopsGuest: a running AP's vCPU that fails ends the
// guest: vCPU 0 stops at its next entry (it runs the guest until then,
// exiting on its timer), every AP is stopped, and Run reports the AP's
// error.
func TestSMPAPErrorStopsGuest(t *testing.T) {
	b, m, log, aps := newSMPMachine(t, 2, nil)
	ap1 := aps[0]
	ap1.script = []apStep{
		{name: "SIPI", exit: sipi},
		{name: "an exit reason tamahv does not know", exit: func(a *fakeAP, r *vmx.GuestRegs) {
			a.vmcs.Fields[vmx.ExitReasonField] = 200
		}},
	}
	b.idle = true
	err := m.Run()
	require.ErrorIs(t, err, machine.ErrGuestFailed)
	assert.ErrorIs(t, err, hv.ErrUnknownExit)
	assert.Contains(t, err.Error(), "vCPU 1: ")
	out := log.String()
	assert.Contains(t, out, "tamahv: guest stopped: vCPU 1: hv: unknown exit reason 200")
	assert.Contains(t, out, "tamahv: vCPU 1 exits\ntamahv: exits SIPI")
	assert.True(t, aps[0].stopped())
	assert.True(t, aps[1].stopped())
	assert.NotContains(t, out, "did not stop")
}

// TestSMPGuestExitsOnAP: the guest's exit hypercall made on an AP ends
// the guest as on vCPU 0: vCPU 0 stops at its next entry, and Run
// reports the status.
func TestSMPGuestExitsOnAP(t *testing.T) {
	b, m, log, aps := newSMPMachine(t, 1, nil)
	aps[0].script = []apStep{
		{name: "SIPI", exit: sipi},
		{name: "exit", exit: func(a *fakeAP, r *vmx.GuestRegs) {
			a.run(0)
			r.RAX, r.RDI = hcall.Exit, 9
			a.exitWith(vmx.ExitVMCALL)
		}},
	}
	b.idle = true
	require.NoError(t, m.Run(), "log:\n%s", log)
	assert.Contains(t, log.String(), "tamahv: guest exited (status 9) after ")
	assert.Contains(t, log.String(), ", vCPU 1: 2)\n")
	assert.True(t, aps[0].stopped())
}

// TestSMPAPNotUsedWithoutWaitForSIPI: where VM entry cannot leave a guest
// waiting for its start-up IPI, New uses no AP (each is stopped, with a
// line that says why) and the guest runs on vCPU 0.
func TestSMPAPNotUsedWithoutWaitForSIPI(t *testing.T) {
	b := newBoard(t)
	b.vmcs = newVMCS()
	kernel := bzImage()
	require.NoError(t, b.WritePhys(0x100_0000, kernel))
	ap := newFakeAP(t, b, 1)
	var log bytes.Buffer
	c := exampleConfig(uint64(len(kernel)))
	c.Log = &log
	c.Caps.Misc &^= 1 << 8 // IA32_VMX_MISC: no wait-for-SIPI
	m, err := machine.New(&smpBoard{board: b, aps: []machine.AP{ap}}, c)
	require.NoError(t, err)
	assert.Len(t, m.VCPUs, 1)
	assert.Contains(t, log.String(), "tamahv: AP APIC ID 1: not used: "+hv.ErrNoWaitForSIPI.Error()+"\n")
	assert.True(t, ap.stopped())
	b.script = []step{{name: "exit", exit: func(b *board, r *vmx.GuestRegs) {
		b.run(0)
		r.RAX, r.RDI = hcall.Exit, 0
		b.exitWith(vmx.ExitVMCALL)
	}}}
	require.NoError(t, m.Run())
	assert.Contains(t, log.String(), "tamahv: guest exited (status 0) after 1 exits (vCPU 0: 1)\n")
}

// kickAP is a fakeAP that can be kicked (machine.Kicker).
type kickAP struct {
	*fakeAP
	bspIn, bspKicks *atomic.Uint32
	kicked          int
}

func (k *kickAP) KickBSP(inGuest, kicks *atomic.Uint32) { k.bspIn, k.bspKicks = inGuest, kicks }
func (k *kickAP) Kick() bool                            { k.kicked++; return true }

// TestSMPKicksAreNotTheGuests: the NMIs tamahv sends to make a processor
// leave the guest never reach the guest, the guest's own NMIs do. A
// shootdown kicks an AP in the guest, whose NMI exit is then answered
// without an NMI for its guest; a second NMI exit, with no kick
// outstanding, is the guest's and is injected. The AP is told vCPU 0's
// in-guest mark and where to count its kicks of the bootstrap processor;
// vCPU 0 takes an NMI of an AP's for a kick, and its guest's NMI after
// that for the guest's.
func TestSMPKicksAreNotTheGuests(t *testing.T) {
	b := newBoard(t)
	b.vmcs = newVMCS()
	kernel := bzImage()
	require.NoError(t, b.WritePhys(0x100_0000, kernel))
	ap := &kickAP{fakeAP: newFakeAP(t, b, 1)}
	log := &lockedBuffer{}
	c := exampleConfig(uint64(len(kernel)))
	c.Log = log
	m, err := machine.New(&smpBoard{board: b, aps: []machine.AP{ap}}, c)
	require.NoError(t, err)
	w0, err := m.Shootdown.Words(0)
	require.NoError(t, err)
	require.Same(t, w0.InGuest, ap.bspIn, "the AP kicks vCPU 0 only while it is in the guest")
	require.NotNil(t, ap.bspKicks)

	nmi := func(a *fakeAP, r *vmx.GuestRegs) {
		a.exitWith(vmx.ExitExceptionOrNMI)
		a.vmcs.Fields[vmx.ExitInterruptInfo] = 1<<31 | uint64(vmx.EventNMI)<<8 | vmx.VectorNMI
	}
	injected := func(a *fakeAP) bool {
		info := a.vmcs.Fields[vmx.EntryInterruptInfo]
		return info&(1<<31) != 0 && info>>8&7 == uint64(vmx.EventNMI)
	}
	ap.script = []apStep{
		{name: "SIPI", exit: sipi},
		{name: "kicked by a shootdown", exit: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.EqualValues(t, 1, a.words.InGuest.Load())
			m.Shootdown.Kick(1) // what a change made meanwhile on vCPU 0's processor does
			nmi(a, r)
		}},
		{name: "the kick is not the guest's", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Equal(t, 1, ap.kicked)
			assert.False(t, injected(a), "a kick reached the guest")
		}, exit: nmi},
		{name: "the guest's NMI", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.True(t, injected(a), "the guest's NMI was lost")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	b.script = []step{
		{name: "an AP's kick", exit: func(b *board, r *vmx.GuestRegs) {
			<-ap.done
			ap.bspKicks.Add(1)
			b.exitWith(vmx.ExitExceptionOrNMI)
			b.vmcs.Fields[vmx.ExitInterruptInfo] = 1<<31 | uint64(vmx.EventNMI)<<8 | vmx.VectorNMI
		}},
		{name: "the guest's NMI", check: func(b *board, r *vmx.GuestRegs) {
			assert.Zero(t, b.vmcs.Fields[vmx.EntryInterruptInfo]&(1<<31), "the AP's kick reached the guest")
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.exitWith(vmx.ExitExceptionOrNMI)
			b.vmcs.Fields[vmx.ExitInterruptInfo] = 1<<31 | uint64(vmx.EventNMI)<<8 | vmx.VectorNMI
		}},
		{name: "exit", check: func(b *board, r *vmx.GuestRegs) {
			assert.NotZero(t, b.vmcs.Fields[vmx.EntryInterruptInfo]&(1<<31), "the guest's NMI was lost")
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.run(0)
			r.RAX, r.RDI = hcall.Exit, 0
			b.exitWith(vmx.ExitVMCALL)
		}},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
}

// deafAP is a kickAP whose kicks never go out (the guest disabled the
// local APIC they would go through).
type deafAP struct{ *kickAP }

func (d *deafAP) Kick() bool { d.kicked++; return false }

// TestSMPUnsentKickIsNotCounted: a shootdown's kick that did not go out
// is not counted, so the guest's own NMI on that AP still reaches it.
func TestSMPUnsentKickIsNotCounted(t *testing.T) {
	b := newBoard(t)
	b.vmcs = newVMCS()
	kernel := bzImage()
	require.NoError(t, b.WritePhys(0x100_0000, kernel))
	ap := &deafAP{&kickAP{fakeAP: newFakeAP(t, b, 1)}}
	log := &lockedBuffer{}
	c := exampleConfig(uint64(len(kernel)))
	c.Log = log
	m, err := machine.New(&smpBoard{board: b, aps: []machine.AP{ap}}, c)
	require.NoError(t, err)
	ap.script = []apStep{
		{name: "SIPI", exit: sipi},
		{name: "a kick that does not go out, then the guest's NMI", exit: func(a *fakeAP, r *vmx.GuestRegs) {
			m.Shootdown.Kick(1)
			a.exitWith(vmx.ExitExceptionOrNMI)
			a.vmcs.Fields[vmx.ExitInterruptInfo] = 1<<31 | uint64(vmx.EventNMI)<<8 | vmx.VectorNMI
		}},
		{name: "injected", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Equal(t, 1, ap.kicked)
			info := a.vmcs.Fields[vmx.EntryInterruptInfo]
			assert.True(t, info&(1<<31) != 0 && info>>8&7 == uint64(vmx.EventNMI), "the guest's NMI was taken for the kick")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	b.script = []step{waitFor(0, ap.fakeAP)}
	require.NoError(t, m.Run(), "log:\n%s", log)
}

// TestSMPAPAnswersCPUIDWhileQuiet: an AP that answers CPUID itself gets
// its vCPU's table at its first entry in an active state, made by the
// vCPU's own policy; it may use it after the entries where the vCPU is
// quiet, not while it waits for SIPI, nor at the entry that delivers an
// event; a write of IA32_APIC_BASE has the table made again.
func TestSMPAPAnswersCPUIDWhileQuiet(t *testing.T) {
	b, m, log, aps := newSMPMachine(t, 1, nil)
	ap := aps[0]
	last := func(a *fakeAP) bool { return a.answering[len(a.answering)-1] }
	ap.script = []apStep{
		{name: "SIPI", check: func(a *fakeAP, _ *vmx.GuestRegs) {
			assert.False(t, last(a), "waits for SIPI")
			assert.Zero(t, a.tables)
		}, exit: sipi},
		{name: "VMXON", check: func(a *fakeAP, _ *vmx.GuestRegs) {
			assert.True(t, last(a), "quiet")
			assert.Equal(t, 1, a.tables)
			assert.Equal(t, m.VCPUs[1].CPUIDTable(), a.table)
			assert.NotEmpty(t, a.table)
		}, exit: func(a *fakeAP, _ *vmx.GuestRegs) { a.exitWith(vmx.ExitVMXON) }},
		{name: "WRMSR IA32_APIC_BASE", check: func(a *fakeAP, _ *vmx.GuestRegs) {
			assert.NotZero(t, a.vmcs.Fields[vmx.EntryInterruptInfo]&vmx.EventValid, "#UD placed")
			assert.False(t, last(a), "an event is delivered at this entry")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			r.RCX, r.RAX, r.RDX = vmx.MSRAPICBase, 0, 0
			a.exitWith(vmx.ExitWRMSR)
		}},
		{name: "CPUID", check: func(a *fakeAP, _ *vmx.GuestRegs) {
			assert.True(t, last(a))
			assert.Equal(t, 2, a.tables, "made again after the MSR's write")
		}, exit: func(a *fakeAP, _ *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	b.script = []step{waitFor(3, ap)}
	require.NoError(t, m.Run(), "log:\n%s", log)
	assert.Contains(t, log.String(), "tamahv: vCPU 1: its processor answered 0 CPUID exits itself\n")
}
