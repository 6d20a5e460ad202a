// Package machine assembles tamahv's guest from the packages that do the
// work: the EPT (guest memory one to one, tamahv's region cut out and sent
// to a sink), the vCPU and its VMCS, the page-table watcher, the
// breakpoint agent, the swapmem engine, the hypercall policy and the
// timers. It is where an embedder starts: New builds a ready machine from
// a Board (what the platform provides) and a Config, and every part stays
// reachable through Machine's fields for the embedder's own extensions.
//
// Nothing here touches the processor directly: the Board does. The image
// passes board/pc's; host tests pass fakes.
package machine

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"time"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/monitor"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// Board is what the machine needs from the platform.
type Board interface {
	// Tables gives zeroed 4 KiB pages of host memory that the board keeps
	// allocated (and reachable) for as long as the machine runs: the
	// hardware reads them (VMCS, EPT, bitmaps).
	ept.Tables
	// Bytes returns an allocated page as bytes.
	Bytes(pa uint64) (*[4096]byte, error)
	// Memory reads and writes physical memory (loading the guest).
	hv.Memory
	// Sink returns 2 MiB of host memory, 2 MiB aligned, kept as long as
	// the machine runs: every guest-physical page of tamahv's region maps
	// there.
	Sink() (uint64, error)
	// Reach makes host-physical memory up to top readable through Memory
	// where it can, and returns how far Memory reaches.
	Reach(top uint64) uint64
	// CPUID executes CPUID on the processor.
	CPUID(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)
	// XSETBV loads an extended control register.
	XSETBV(xcr uint32, v uint64)
	// ReadMSR reads a model-specific register.
	ReadMSR(msr uint32) uint64
	// WriteMSR writes one, with a value tamahv's MSR policy checked.
	WriteMSR(msr uint32, v uint64)
	// TakeNMI reports, and forgets, an NMI that arrived while tamahv ran
	// in VMX root (the board's NMI handler counts them): the guest gets
	// it at the next entry.
	TakeNMI() bool
	// PortIO does real port I/O of size bytes (1, 2 or 4) at port: an
	// IN returns what it read, an OUT writes val.
	PortIO(port uint16, size int, in bool, val uint32) uint32
	// Host returns the state VM exits return to.
	Host() hv.HostState
	// TSCHz returns the TSC frequency (0: unknown; the preemption timer is
	// then off).
	TSCHz() uint64
	// LoadVMCS makes the VMCS at pa current (VMCLEAR, VMPTRLD) and returns
	// access to it.
	LoadVMCS(pa uint64) (hv.VMCS, error)
	// InvalidateEPT flushes the processor's EPT translations for eptp.
	InvalidateEPT(eptp uint64)
	// Enter runs the guest until its next VM exit (vmx.Run).
	Enter(r *vmx.GuestRegs, fx *vmx.FXArea, launched bool) error
}

// Config describes the guest.
type Config struct {
	Caps *vmx.Caps
	// Memory is the machine's memory map.
	Memory []hv.E820Entry
	// Own is tamahv's region, [start, end), 2 MiB aligned: cut out of the
	// guest's memory map and out of its reach.
	Own [2]uint64
	// Console are the first and last I/O ports tamahv keeps (0, 0: none).
	Console [2]uint16
	// Kernel and Initrd are the physical address and length of the guest's
	// bzImage and initramfs (Initrd may be zero).
	Kernel, Initrd [2]uint64
	// Cmdline is the guest kernel's command line.
	Cmdline string
	// Options is tamahv's own command line: the hc.ring3= grants of the
	// default policy.
	Options string
	// Arena is how many pages New may take from the board for EPT
	// tables (0: 1024).
	Arena int
	// Log receives tamahv's lines (nil: discarded).
	Log io.Writer
	// Policy answers hypercalls (nil: the default, monitor.Monitor).
	Policy hv.Hypercalls
	// Swap configures the swapmem engine.
	Swap swapmem.Config
}

// IA32_LSTAR, the guest kernel's SYSCALL entry (SDM Vol. 4, Table 2-2).
const msrLSTAR = 0xc0000082

// Machine is one guest, assembled and ready to run.
type Machine struct {
	// VCPU is the guest's processor; its exit handlers, observers and
	// entry hooks are where extensions attach.
	VCPU *hv.VCPU
	// EPT maps the guest's physical memory.
	EPT *ept.EPT
	// Phys is the guest's physical memory as tamahv may touch it: guest
	// RAM only; it owns the EPT permissions tamahv changes.
	Phys *hv.GuestPhys
	// Memory is the guest memory introspection reads through, with the
	// page-table watches.
	Memory *hv.GuestMemory
	// Agent raises BPFault faults from the guest kernel's system-call
	// path.
	Agent *hv.BreakpointAgent
	// Trap gives an exit at the guest's return from a user-mode #PF.
	Trap *hv.ReturnTrap
	// Engine reads guest memory, swapped out or not. Its requests name
	// address spaces as Spaces.Of does; CR3 0 is Spaces.System.
	Engine *swapmem.Engine
	// Spaces learns whether the guest isolates its page tables and names
	// its address spaces: every CR3 comparison goes through it.
	Spaces *hv.AddressSpaces
	// Delivery follows each injected #PF to the guest and tells the
	// engine whether it arrived.
	Delivery *hv.PFDelivery
	// Monitor is the default policy (nil when Config.Policy replaced it).
	Monitor *monitor.Monitor
	// Start is where the guest kernel starts.
	Start *hv.Start
	// Linux is the loaded guest.
	Linux *hv.Linux
	// Shootdown carries EPT changes to every vCPU's processor.
	Shootdown *hv.Shootdown

	board  Board
	log    io.Writer
	eptp   uint64
	fx     *vmx.FXArea
	secret uint64
}

// ErrGuestFailed is Run's error when the guest stopped on an error.
var ErrGuestFailed = errors.New("machine: guest failed")

// New builds the machine: EPT, VMCS, bitmaps, the guest kernel loaded, the
// watcher, the agent, the engine and the policy wired together.
func New(b Board, c Config) (*Machine, error) {
	if c.Caps == nil {
		return nil, errors.New("machine: no VMX capabilities")
	}
	m := &Machine{board: b, log: c.Log}
	if m.log == nil {
		m.log = io.Discard
	}
	var err error
	m.EPT, err = ept.New(b, ept.Options{Pages1G: c.Caps.EPTVPID.Has(vmx.EPT1GPages), ExecuteOnly: c.Caps.EPTVPID.Has(vmx.EPTExecuteOnly)})
	if err != nil {
		return nil, err
	}
	sink, err := b.Sink()
	if err != nil {
		return nil, fmt.Errorf("machine: the sink: %w", err)
	}
	if err := hv.MapGuest(m.EPT, c.Memory, c.Own, sink); err != nil {
		return nil, err
	}

	vmcsPA, vmcsPage, err := m.page()
	if err != nil {
		return nil, err
	}
	rev := c.Caps.Revision()
	vmcsPage[0], vmcsPage[1], vmcsPage[2], vmcsPage[3] = byte(rev), byte(rev>>8), byte(rev>>16), byte(rev>>24)
	vmcs, err := b.LoadVMCS(vmcsPA)
	if err != nil {
		return nil, err
	}
	msrPA, msrBM, err := m.page()
	if err != nil {
		return nil, err
	}
	hv.GuestMSRBitmap(msrBM)
	ioA, bmA, err := m.page()
	if err != nil {
		return nil, err
	}
	ioB, bmB, err := m.page()
	if err != nil {
		return nil, err
	}
	hv.IOBitmaps(bmA, bmB, c.Console)
	_, fxPage, err := m.page()
	if err != nil {
		return nil, err
	}
	m.fx = (*vmx.FXArea)(fxPage[:512])
	m.fx[0], m.fx[1] = 0x7f, 0x03   // FCW: x87 exceptions masked
	m.fx[24], m.fx[25] = 0x80, 0x1f // MXCSR: SIMD exceptions masked
	var secret *[4096]byte
	if m.secret, secret, err = m.page(); err != nil {
		return nil, err
	}
	for i := range secret {
		secret[i] = hcall.SecretByte
	}

	m.Linux = &hv.Linux{
		KernelPA: c.Kernel[0], KernelLen: c.Kernel[1], InitrdPA: c.Initrd[0], InitrdLen: c.Initrd[1],
		Cmdline: c.Cmdline, Map: c.Memory, Reserved: [][2]uint64{c.Own},
	}
	if m.Start, err = m.Linux.Load(b); err != nil {
		return nil, err
	}

	v := hv.NewVCPU(vmcs, c.Caps)
	m.VCPU = v
	v.CPUID = b.CPUID
	v.XSETBV = b.XSETBV
	v.ReadMSR, v.WriteMSR = b.ReadMSR, b.WriteMSR
	v.TakeNMI = b.TakeNMI
	v.Log = c.Log
	if c.Console != [2]uint16{} {
		v.OwnPorts(c.Console[0], c.Console[1])
	}
	v.PortIO = b.PortIO
	var ramTop uint64
	for _, r := range c.Memory {
		if r.Type == hv.E820RAM && r.Addr+r.Size > ramTop {
			ramTop = r.Addr + r.Size
		}
	}
	m.eptp = m.EPT.Pointer(false)
	// Every change to the EPT reaches every vCPU's processor through the
	// shootdown (one vCPU today: its own INVEPT at the change).
	m.Shootdown = hv.NewShootdown(1, func(int) { b.InvalidateEPT(m.eptp) })
	invalidate := func() { m.Shootdown.Changed(0) }
	v.OnEntry(func(*hv.VCPU) { m.Shootdown.Enter(0) })
	v.Observe(func(*hv.VCPU, *vmx.Exit) { m.Shootdown.Exit(0) })
	// Every guest-physical access on the guest's behalf goes through
	// Phys: guest RAM only, never tamahv's region, the sink or MMIO.
	m.Phys = &hv.GuestPhys{Mem: b, EPT: m.EPT, Hole: c.Own, Invalidate: invalidate}
	// Unmapped answers what the handlers installed after it pass on.
	unmapped := &hv.Unmapped{EPT: m.EPT, Hole: c.Own, Invalidate: invalidate}
	if err := unmapped.Install(v); err != nil {
		return nil, err
	}
	m.Spaces = &hv.AddressSpaces{Mem: m.Phys}
	m.Spaces.Install(v)
	m.Memory = hv.NewGuestMemory(m.Phys, 0)
	m.Memory.Walker.Limit = min(ramTop, b.Reach(ramTop))
	if err := m.Memory.Install(v); err != nil {
		return nil, err
	}
	v.Mem = m.Phys
	m.Delivery = &hv.PFDelivery{}
	m.Agent = &hv.BreakpointAgent{Phys: m.Phys, Walker: &m.Memory.Walker, LSTAR: func() uint64 { return b.ReadMSR(msrLSTAR) },
		Spaces: m.Spaces, Delivery: m.Delivery}
	if c.Caps.EPTVPID.Has(vmx.EPTExecuteOnly) {
		// The split view hides the int3 from guest reads.
		if m.Agent.ShadowPA, m.Agent.Shadow, err = m.page(); err != nil {
			return nil, err
		}
	}
	if err := m.Agent.Install(v); err != nil {
		return nil, err
	}
	m.Engine = swapmem.New(swapGuest{m.Memory, m.Spaces}, c.Swap)
	m.Delivery.Reports = m.Engine
	// Before the engine's entry hook: a fault lost at this entry is
	// injected again at once.
	m.Delivery.Install(v)
	m.Trap = &hv.ReturnTrap{Phys: m.Phys, Walker: &m.Memory.Walker}
	if err := m.Trap.Install(v); err != nil {
		return nil, err
	}
	cpu := &hv.TrapCPU{CPU: &hv.SwapCPU{V: v, Agent: m.Agent, Spaces: m.Spaces, Delivery: m.Delivery}, Trap: m.Trap, V: v}
	v.OnEntry(func(*hv.VCPU) { _ = m.Engine.InjectPendingPF(cpu) })
	if hz := b.TSCHz(); hz != 0 {
		v.PreemptionTicks = uint32(min(hz/100>>c.Caps.PreemptionTimerShift(), 1<<31))
	}
	v.Hypercalls = c.Policy
	if c.Policy == nil {
		ring3, err := monitor.ParseCmdline(c.Options)
		if err != nil {
			return nil, err
		}
		m.Monitor = &monitor.Monitor{Ring3: ring3, Mem: m.Memory, Engine: m.Engine, Spaces: m.Spaces, SecretPA: m.secret, Log: c.Log,
			Paging: func(la57, nxe bool) { m.Memory.Walker.LA57, m.Memory.Walker.NoNXE = la57, !nxe }}
		v.Hypercalls = m.Monitor
		m.Memory.OnWatchError = m.Monitor.WatchFailed
	}
	v.OnTick(func(v *hv.VCPU) {
		m.Engine.ReinjectFailedPF()
		if m.Monitor != nil && m.Monitor.Watchdog(m.log, 10*time.Second) {
			fmt.Fprintf(m.log, "tamahv: page-table writes %d (accessed/dirty %d), translations changed %d, %d pages watched\n",
				m.Memory.Writes, m.Memory.ADWrites, m.Memory.Changes, m.Memory.Watches())
			v.Report(m.log, true)
		}
		// The vCPU's loop never blocks; yield at every tick so that the
		// Go runtime's own goroutines (the garbage collector's workers)
		// run and a collection ends: what guest requests allocated is
		// given back.
		runtime.Gosched()
	})
	v.Enter = func(v *hv.VCPU, launched bool) error { return b.Enter(&v.Regs, m.fx, launched) }
	started := false
	v.OnEntry(func(*hv.VCPU) {
		if !started {
			started = true
			fmt.Fprintf(m.log, "tamahv: vCPU %d started\n", 0)
		}
	})
	h := b.Host()
	err = v.Init(hv.Setup{
		Host: h, EPTP: m.eptp, VPID: 1, Preemption: true, ExceptionBM: 1 << vmx.VectorBP,
		MSRBitmap: msrPA, IOBitmapA: ioA, IOBitmapB: ioB,
	}, m.Start)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// ErrNoSystemSpace is the swapmem engine's error for a request with CR3 0
// before the guest has shown its kernel address space.
var ErrNoSystemSpace = errors.New("machine: the guest's kernel address space is not known yet")

// swapGuest is the guest as the swapmem engine sees it: GuestMemory, with
// the system address space (requests with CR3 0) learnt from the guest's
// exits.
type swapGuest struct {
	*hv.GuestMemory
	spaces *hv.AddressSpaces
}

// SystemCR3 implements swapmem.Guest: the guest's kernel address space, 0
// while none is known.
func (g swapGuest) SystemCR3() uint64 { return g.spaces.System() }

// Translate implements swapmem.Guest; CR3 0 is no address space.
func (g swapGuest) Translate(cr3, va uint64) (swapmem.Translation, error) {
	if cr3 == 0 {
		return swapmem.Translation{}, ErrNoSystemSpace
	}
	return g.GuestMemory.Translate(cr3, va)
}

// Watch implements swapmem.Guest; CR3 0 is no address space.
func (g swapGuest) Watch(cr3, va uint64, changed func(swapmem.Translation)) (func(), error) {
	if cr3 == 0 {
		return nil, ErrNoSystemSpace
	}
	return g.GuestMemory.Watch(cr3, va, changed)
}

// page allocates a page from the board.
func (m *Machine) page() (uint64, *[4096]byte, error) {
	pa, err := m.board.Alloc()
	if err != nil {
		return 0, nil, err
	}
	b, err := m.board.Bytes(pa)
	return pa, b, err
}

// SecretPA is the page hcall.Secret reports.
func (m *Machine) SecretPA() uint64 { return m.secret }

// Run runs the guest until it exits (nil) or stops on an error, and
// writes tamahv's summary lines to the log.
func (m *Machine) Run() error {
	v := m.VCPU
	err := v.Run()
	// The board owns the memory the processor used (VMCS, EPT, sink).
	runtime.KeepAlive(m.board)
	if err != nil {
		fmt.Fprintf(m.log, "tamahv: guest stopped: %v\n", err)
		v.Report(m.log, true)
		return fmt.Errorf("%w: %w", ErrGuestFailed, err)
	}
	status := 0
	if m.Monitor != nil {
		status = m.Monitor.Status
	}
	fmt.Fprintf(m.log, "tamahv: guest exited (status %d) after %d exits (vCPU 0: %d)\n", status, v.Total(), v.Total())
	v.Report(m.log, false)
	st := m.Engine.Stats()
	fmt.Fprintf(m.log, "tamahv: swapmem %d #PFs injected, %d completed, %d failed, %d removed; page-table writes %d (accessed/dirty %d), translations changed %d, stale protections %d\n",
		st.Injected, st.Completed, st.Failed, st.Removed, m.Memory.Writes, m.Memory.ADWrites, m.Memory.Changes, m.Memory.Stale)
	fmt.Fprintf(m.log, "tamahv: page-table writes emulated in their exit %d, opened until the next exit %d %v; returns from user faults trapped %d of %d\n",
		m.Memory.Emulated, m.Memory.Opened, fallbacks(m.Memory), m.Trap.Hits, m.Trap.Arms)
	if m.Agent.Detour() != 0 {
		fmt.Fprintf(m.log, "tamahv: breakpoint agent at %#x: %d hits, %d faults raised, %d passed in other address spaces, %d view switches\n",
			m.Agent.Detour(), m.Agent.Hits, m.Agent.Raised, m.Agent.Passed, m.Agent.Switches)
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fmt.Fprintf(m.log, "tamahv: Go heap %d KiB in use, %d collections\n", ms.HeapAlloc>>10, ms.NumGC)
	fmt.Fprintf(m.log, "tamahv: page-table isolation %v (%d pair checks); #PF deliveries %d confirmed, %d interrupted and re-queued, %d lost and cancelled\n",
		m.Spaces.PTI(), m.Spaces.Checks, m.Delivery.Delivered, m.Delivery.Requeued, m.Delivery.Lost)
	return nil
}

// fallbacks lists why page-table writes were not emulated, reason=count.
func fallbacks(g *hv.GuestMemory) string {
	var b strings.Builder
	b.WriteString("(")
	for i, n := range g.Fallbacks {
		if n > 0 {
			if b.Len() > 1 {
				b.WriteString(" ")
			}
			fmt.Fprintf(&b, "%v=%d", hv.PTFallback(i), n)
		}
	}
	b.WriteString(")")
	return b.String()
}
