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
//
// A Board that is also an SMPBoard gives one vCPU per application
// processor besides vCPU 0, the bootstrap processor's. Every vCPU's exits
// are handled by a goroutine of its own on the bootstrap processor, one
// handler at a time (hv.VCPU.Serial): the guest's memory, the EPT, the
// watcher, the agent, the engine and the policy are shared by all vCPUs;
// what follows one vCPU from an exit to its next (the #PF a delivery
// follows, the vCPU swapmem injects on) is per vCPU.
package machine

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/linux"
	"github.com/tamahv/tamahv/hv/monitor"
	"github.com/tamahv/tamahv/hv/pagein"
	"github.com/tamahv/tamahv/hv/x86emu"
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
	// AtomicMemory makes tamahv's stores to guest page tables single
	// instructions (guestmem.GuestPhys's, over Memory).
	x86emu.AtomicMemory
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
	// TakeNMI returns, and forgets, how many NMIs reached the processor
	// while tamahv ran in VMX root (the board's NMI handler counts them):
	// those that were not tamahv's own kicks are the guest's, which gets
	// one at the next entry.
	TakeNMI() uint32
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
	E820 []hv.E820Entry
	// Own is tamahv's region, [start, end), 2 MiB aligned: cut out of the
	// guest's memory map and out of its reach.
	Own [2]uint64
	// Console are the first and last I/O ports tamahv keeps (0, 0: none).
	Console [2]uint16
	// MTRRs are the host's memory type range registers: the guest's
	// non-RAM gets the memory types they give (nil: uncached).
	MTRRs *ept.MTRRs
	// PortGuards check the guest's writes to their ports (the ACPI sleep
	// registers, whose sleep states the firmware resumes from outside
	// tamahv).
	PortGuards []hv.PortGuard
	// Kernel is the physical address and length of the guest's bzImage;
	// Initrds those of the parts of its initramfs, in order (none, one, or
	// several the guest gets one after the other).
	Kernel  [2]uint64
	Initrds [][2]uint64
	// Cmdline is the guest kernel's command line.
	Cmdline string
	// RSDP is the ACPI RSDP's physical address the guest's kernel is told
	// of (boot_params.acpi_rsdp_addr; 0: none, the kernel searches the
	// BIOS areas, as it must find it on UEFI firmware without them).
	RSDP uint64
	// EFI, on UEFI firmware, is the system table and the memory map's
	// copy (tamahv's region reserved in it) the guest's kernel is told of
	// (boot_params.efi_info); nil: BIOS.
	EFI *linux.EFI
	// Framebuffer is the linear framebuffer the boot loader left, which
	// the guest's kernel takes over (boot_params.screen_info); nil: none.
	Framebuffer *linux.Framebuffer
	// Options is tamahv's own command line: the hc.ring3= grants of the
	// default policy, and the settings ParseOptions reads.
	Options string
	// OEMID is the 6-byte OEM ID of the firmware's ACPI tables ("" where
	// none were found): with the processor's hypervisor bit, what
	// apic.trapinit=auto decides on (TrapINITMode.Decide).
	OEMID string
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

// Machine is one guest, assembled and ready to run.
type Machine struct {
	// VCPU is the guest's processor, vCPU 0 (the bootstrap processor);
	// its exit handlers, observers and entry hooks are where extensions
	// attach.
	VCPU *hv.VCPU
	// VCPUs are all the guest's processors: VCPUs[0] is VCPU, VCPUs[i]
	// runs on the board's application processor i-1 (SMPBoard.APs). An
	// extension that follows the guest's exits attaches to each; they all
	// share one Serial, so that no two handlers run at once.
	VCPUs []*hv.VCPU
	// EPT maps the guest's physical memory.
	EPT *ept.EPT
	// Phys is the guest's physical memory as tamahv may touch it: guest
	// RAM only; it owns the EPT permissions tamahv changes.
	Phys *guestmem.GuestPhys
	// Memory is the guest memory introspection reads through, with the
	// page-table watches.
	Watcher *guestmem.Watcher
	// Agent raises BPFault faults from the guest kernel's system-call
	// path.
	Agent *pagein.BreakpointAgent
	// Trap gives an exit at the guest's return from a user-mode #PF.
	Trap *pagein.ReturnTrap
	// Engine reads guest memory, swapped out or not. Its requests name
	// address spaces as Spaces.Of does; CR3 0 is Spaces.System.
	Engine *swapmem.Engine
	// Spaces learns whether the guest isolates its page tables and names
	// its address spaces: every CR3 comparison goes through it.
	Spaces *guestmem.AddressSpaces
	// Delivery follows each #PF injected on vCPU 0 to the guest and
	// tells the engine whether it arrived; Deliveries[i] does for vCPU i
	// (Deliveries[0] is Delivery).
	Delivery   *pagein.PFDelivery
	Deliveries []*pagein.PFDelivery
	// Monitor is the default policy (nil when Config.Policy replaced it).
	Monitor *monitor.Monitor
	// Start is where the guest kernel starts.
	Start *hv.Start
	// Linux is the loaded guest.
	Linux *linux.Boot
	// Shootdown carries EPT changes to every vCPU's processor.
	Shootdown *guestmem.Shootdown

	board  Board
	log    io.Writer
	eptp   uint64
	fx     *vmx.FXArea
	secret uint64

	serial sync.Mutex // every vCPU's Serial
	// APIC emulates the guest's local APIC writes where they are trapped
	// (apic.trapinit) and the guest has application processors
	// (virtualizeINIT); nil otherwise.
	APIC *guestmem.APICWrites
	// trapINIT: the guest's local APIC writes are trapped (TrapsINIT).
	trapINIT  bool
	apicIDs   []uint32 // vCPU i's local APIC ID
	vcpuIndex map[*hv.VCPU]int
	// stuckErr: a vCPU never left the guest for an EPT change.
	stuckErr error
	// bspKick counts the application processors' NMIs to the bootstrap
	// processor (Kicker).
	bspKick kicks
	// kickCheck: every kickCheck-th entry of an AP's vCPU starts with a
	// kick sent (Options.KickCheck; 0: none).
	kickCheck uint64
	// cutShort: vCPU 0's last entry was made to exit at once
	// (kickedBeforeEntry); its goroutine's only.
	cutShort bool
	// sliced: vCPU 0's last entry ran the guest for a slice only.
	sliced bool
	aps    []*apVCPU
	// ended is the first application processor's vCPU whose Run returned
	// while the guest ran: vCPU 0 stops at its next entry.
	ended atomic.Pointer[apVCPU]
	// clock is time.Now; lastTick is when tick last ran (vCPU 0's).
	clock    func() time.Time
	lastTick time.Time
	// quietQ is vCPU 0's table for its board's exit stub, where the
	// board has one (quietB).
	quietQ *vmx.QuietCPUID
	quietB QuietEnterer
	// tsc reads the time-stamp counter where the board can and knows its
	// frequency (TSCReader): tickDue then compares counts and reads no
	// clock. tickTSC is tickPeriod in its ticks; lastTSC, the count when
	// tick last ran.
	tsc              func() uint64
	tickTSC, lastTSC uint64
	// alive writes tick's exits lines (Options.Alive).
	alive aliveLog
	// yield lets the APs' goroutines run in yieldToAPs (nil:
	// runtime.Gosched; tests run a scripted AP instead).
	yield func()
}

// The states of an application processor's vCPU.
const (
	apStarting = iota
	apShown
	apFinished
)

// apVCPU is a vCPU that runs on an application processor.
type apVCPU struct {
	ap    AP
	v     *hv.VCPU
	index int // the vCPU's number
	// kick counts the bootstrap processor's NMIs to the AP (a
	// shootdown's, an INIT's), without a limit: NMIs are blocked on an AP
	// only for the few instructions between an NMI exit and its loop's
	// IRET, or in its NMI handler, and collapse there only if three
	// arrive within them.
	kick kicks
	// initPending: the guest sent the vCPU an INIT (virtualINIT), which
	// its next entry applies.
	initPending bool
	// state is apStarting, then apShown (Run shows it to the guest) or
	// apFinished (its Run returned before): whichever comes first.
	state atomic.Int32
	done  atomic.Bool // Run returned; err is its result
	err   error       // Run's result
	// out: the vCPU left the guest and its goroutine has not entered it
	// again (it handles the exit, or waits for Serial to).
	out atomic.Bool
	// entries counts the vCPU's entries: each after an exit handled.
	entries atomic.Uint64
	// checks counts the kicks kickBeforeEntry sent.
	checks atomic.Uint64
	// cpuid is the AP where it answers CPUID itself (CPUIDAnswerer);
	// cpuidStale: its table is to be made (again) before the next
	// entry that may use it.
	cpuid      CPUIDAnswerer
	cpuidStale bool
}

// waiting reports whether the vCPU's goroutine has work that only runs
// while vCPU 0 yields: an exit the AP posted, or one being handled.
func (a *apVCPU) waiting() bool {
	return a.ap.Pending() || (a.out.Load() && !a.done.Load())
}

// ErrGuestFailed is Run's error when the guest stopped on an error.
var ErrGuestFailed = errors.New("machine: guest failed")

// LinuxBoot is the guest's kernel as c describes it, with tamahv's region
// (Own) reserved: what New loads into the guest, and what a boot without
// tamahv (fallback=native) loads in its place, so that the kernel gets the
// same boot parameters either way.
func (c *Config) LinuxBoot() *linux.Boot {
	return &linux.Boot{
		KernelPA: c.Kernel[0], KernelLen: c.Kernel[1], Initrds: c.Initrds,
		Cmdline: c.Cmdline, Map: c.E820, Reserved: [][2]uint64{c.Own}, RSDP: c.RSDP, EFI: c.EFI, Framebuffer: c.Framebuffer,
	}
}

// New builds the machine: EPT, VMCS, bitmaps, the guest kernel loaded, the
// watcher, the agent, the engine and the policy wired together.
func New(b Board, c Config) (*Machine, error) {
	if c.Caps == nil {
		return nil, errors.New("machine: no VMX capabilities")
	}
	m := &Machine{board: b, log: c.Log, clock: time.Now}
	if r, ok := b.(TSCReader); ok && b.TSCHz() != 0 {
		m.tsc, m.tickTSC = r.TSC, b.TSCHz()/uint64(time.Second/tickPeriod)
	}
	if m.log == nil {
		m.log = io.Discard
	}
	opts, err := ParseOptions(c.Options)
	if err != nil {
		return nil, err
	}
	if err := m.mapGuest(&c); err != nil {
		return nil, err
	}
	ctl, err := m.controlPages(&c)
	if err != nil {
		return nil, err
	}
	m.localAPIC(opts.TrapINIT, c.OEMID, ctl.msrBM)
	m.Linux = c.LinuxBoot()
	if m.Start, err = m.Linux.Load(b); err != nil {
		return nil, err
	}
	var aps []AP
	if sb, ok := b.(SMPBoard); ok {
		aps = sb.APs()
	}
	unmapped, err := m.guestMemory(&c, len(aps))
	if err != nil {
		return nil, err
	}
	policy, err := m.swapService(&c, opts)
	if err != nil {
		return nil, err
	}
	setup, err := m.bootVCPU(&c, ctl, unmapped, policy)
	if err != nil {
		return nil, err
	}
	for _, ap := range aps {
		if err := m.addAP(ap, &c, setup, unmapped, policy); err != nil {
			ap.Stop()
			fmt.Fprintf(m.log, "tamahv: AP APIC ID %d: not used: %v\n", ap.APICID(), err)
		}
	}
	if m.trapINIT {
		if err := m.virtualizeINIT(); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// The lines localAPIC writes, with apic.trapinit='s value after them.
const (
	trappedLine     = "tamahv: local APIC writes trapped: INIT sticks in VMX non-root (Bochs 2.7)"
	passThroughLine = "tamahv: local APIC passed through: INIT and SIPI arrive as VM exits"
)

// localAPIC decides whether the guest's local APIC writes are trapped
// (mode, the ACPI tables' OEM ID and the processor's hypervisor bit:
// TrapINITMode.Decide) and says so in one line. Passed through, the
// guest's x2APIC IPIs no longer exit either (msrBM is the MSR bitmap):
// every IPI goes out as written, and an INIT or start-up IPI reaches a
// vCPU as a VM exit (hv.VCPU.MakeAP). Trapped, virtualizeINIT protects
// the xAPIC's page where there are application processors, and the
// x2APIC's interrupt command register stays the only x2APIC register
// whose writes exit.
func (m *Machine) localAPIC(mode TrapINITMode, oemID string, msrBM *[4096]byte) {
	_, _, ecx, _ := m.board.CPUID(1, 0)
	m.trapINIT = mode.Decide(oemID, ecx&vmx.CPUIDHypervisorBit != 0)
	line := trappedLine
	if !m.trapINIT {
		line = passThroughLine
		hv.PassX2APICICRWrites(msrBM)
	}
	fmt.Fprintf(m.log, "%s (%s=%v)\n", line, TrapINITOption, mode)
}

// TrapsINIT reports whether the guest's local APIC writes are trapped
// (apic.trapinit): its INIT IPIs are then seen before they reach a
// processor. Otherwise the local APIC is passed through.
func (m *Machine) TrapsINIT() bool { return m.trapINIT }

// mapGuest builds the EPT: the guest's memory map one to one, tamahv's
// region and everything outside the map onto the sink.
func (m *Machine) mapGuest(c *Config) error {
	b := m.board
	var err error
	m.EPT, err = ept.New(b, ept.Options{Pages1G: c.Caps.EPTVPID.Has(vmx.EPT1GPages), ExecuteOnly: c.Caps.EPTVPID.Has(vmx.EPTExecuteOnly)})
	if err != nil {
		return err
	}
	sink, err := b.Sink()
	if err != nil {
		return fmt.Errorf("machine: the sink: %w", err)
	}
	if c.MTRRs != nil {
		if _, err := c.MTRRs.Spans(0, 1<<32); err != nil {
			fmt.Fprintf(m.log, "tamahv: memory types: %v; the guest's non-RAM is uncached\n", err)
			c.MTRRs = nil
		} else {
			fmt.Fprintf(m.log, "tamahv: memory types of the guest's non-RAM follow the MTRRs: %v\n", c.MTRRs)
		}
	}
	if err := guestmem.MapGuest(m.EPT, c.E820, c.Own, sink, c.MTRRs); err != nil {
		return err
	}
	m.eptp = m.EPT.Pointer(false)
	return nil
}

// control are vCPU 0's control pages: its VMCS, loaded, and the physical
// addresses of its MSR and I/O bitmaps.
type control struct {
	vmcs            hv.VMCS
	msrPA, ioA, ioB uint64
	msrBM           *[4096]byte
}

// controlPages takes vCPU 0's VMCS and bitmaps, the guest's FPU state at
// reset and the secret page from the board's pages, and fills them.
func (m *Machine) controlPages(c *Config) (control, error) {
	var ctl control
	vmcsPA, vmcsPage, err := m.page()
	if err != nil {
		return ctl, err
	}
	if err := vmx.PrepareRegion(c.Caps, vmcsPage[:]); err != nil {
		return ctl, err
	}
	if ctl.vmcs, err = m.board.LoadVMCS(vmcsPA); err != nil {
		return ctl, err
	}
	msrPA, msrBM, err := m.page()
	if err != nil {
		return ctl, err
	}
	hv.GuestMSRBitmap(msrBM)
	ioA, bmA, err := m.page()
	if err != nil {
		return ctl, err
	}
	ioB, bmB, err := m.page()
	if err != nil {
		return ctl, err
	}
	var ports [][2]uint16
	if c.Console != [2]uint16{} {
		ports = append(ports, c.Console)
	}
	for _, g := range c.PortGuards {
		ports = append(ports, [2]uint16{g.First, g.Last})
	}
	hv.IOBitmaps(bmA, bmB, ports...)
	ctl.msrPA, ctl.ioA, ctl.ioB, ctl.msrBM = msrPA, ioA, ioB, msrBM
	_, fxPage, err := m.page()
	if err != nil {
		return ctl, err
	}
	m.fx = (*vmx.FXArea)(fxPage[:512])
	m.fx[0], m.fx[1] = 0x7f, 0x03   // FCW: x87 exceptions masked
	m.fx[24], m.fx[25] = 0x80, 0x1f // MXCSR: SIMD exceptions masked
	var secret *[4096]byte
	if m.secret, secret, err = m.page(); err != nil {
		return ctl, err
	}
	for i := range secret {
		secret[i] = hcall.SecretByte
	}
	return ctl, nil
}

// guestMemory builds what reaches guest memory on the guest's behalf: the
// shootdown for naps application processors and vCPU 0, GuestPhys, the
// answer for unmapped memory, the address spaces, the page-table
// watcher and the breakpoint agent.
func (m *Machine) guestMemory(c *Config, naps int) (*guestmem.Unmapped, error) {
	b := m.board
	var ramTop uint64
	for _, r := range c.E820 {
		if r.Type == hv.E820RAM && r.Addr+r.Size > ramTop {
			ramTop = r.Addr + r.Size
		}
	}
	// Every change to the EPT reaches every vCPU's processor through the
	// shootdown. All Go runs on the bootstrap processor, which is out of
	// the guest whenever Go runs: every change is vCPU 0's (Changed(0)),
	// and the board's INVEPT is its part; the application processors'
	// exit loops keep theirs themselves (AP.Bind).
	m.Shootdown = guestmem.NewShootdown(1+naps, func(int) { b.InvalidateEPT(m.eptp) })
	m.Shootdown.Limit = time.Second
	// A shootdown kicks an application processor in the guest out of it
	// where the AP can be kicked; else it waits for the AP's timer.
	m.Shootdown.Kick = func(i int) {
		if i < 1 || i > len(m.aps) {
			return
		}
		a := m.aps[i-1]
		// Counted once sent: this processor holds Serial, so the AP's
		// NMI is taken (under Serial) after the count.
		if k, ok := a.ap.(Kicker); ok && k.Kick() {
			a.kick.sent.Add(1)
		}
	}
	invalidate := func() { m.Shootdown.Changed(0) }
	// Every guest-physical access on the guest's behalf goes through
	// Phys: guest RAM only, never tamahv's region, the sink or MMIO. An
	// EPT table it merges away goes back to the arena only after a
	// shootdown that reached every vCPU.
	m.Phys = &guestmem.GuestPhys{Mem: b, EPT: m.EPT, Hole: c.Own, Invalidate: invalidate,
		Invalidated: func() bool { _, stuck := m.Shootdown.Stuck(); return !stuck }}
	// Unmapped answers what the handlers installed after it pass on.
	unmapped := &guestmem.Unmapped{EPT: m.EPT, Hole: c.Own, Invalidate: invalidate, Types: c.MTRRs}
	m.Watcher = guestmem.NewWatcher(m.Phys, 0)
	// The address-space tracker keeps the walker's paging mode the
	// guest's (5-level paging, XD), whoever starts a walk.
	m.Spaces = &guestmem.AddressSpaces{Mem: m.Phys, Walker: &m.Watcher.Walker}
	m.Watcher.Walker.Limit = min(ramTop, b.Reach(ramTop))
	// Translations carry their top-level entry: reads end with their
	// address space (swapmem.ErrSpaceGone, the monitor's records).
	m.Watcher.Walker.TopEntry = true
	m.Agent = &pagein.BreakpointAgent{Phys: m.Phys, Walker: &m.Watcher.Walker, LSTAR: func(v *hv.VCPU) uint64 { return v.ReadMSR(vmx.MSRLSTAR) },
		Spaces: m.Spaces}
	if c.Caps.EPTVPID.Has(vmx.EPTExecuteOnly) {
		// The split view hides the int3 from guest reads.
		var err error
		if m.Agent.ShadowPA, m.Agent.Shadow, err = m.page(); err != nil {
			return nil, err
		}
	}
	return unmapped, nil
}

// swapService takes tamahv's options and builds swapmem's engine, the
// return trap and the policy: c.Policy, or the default monitor.
func (m *Machine) swapService(c *Config, opts Options) (hv.Hypercalls, error) {
	if c.Swap.Deadline == 0 && opts.SwapDeadline != 0 {
		c.Swap.Deadline = opts.SwapDeadline
		fmt.Fprintf(m.log, "tamahv: swap reads end after %v unless they set their own deadline\n", opts.SwapDeadline)
	}
	m.alive.every = opts.Alive
	m.kickCheck = opts.KickCheck
	m.Engine = swapmem.New(swapGuest{m.Watcher, m.Spaces, m.Agent}, c.Swap)
	m.Trap = &pagein.ReturnTrap{Phys: m.Phys, Walker: &m.Watcher.Walker}
	policy := c.Policy
	if policy == nil {
		ring3, err := monitor.ParseCmdline(c.Options)
		if err != nil {
			return nil, err
		}
		m.Monitor = &monitor.Monitor{Ring3: ring3, Mem: m.Watcher, Engine: m.Engine, Spaces: m.Spaces, SecretPA: m.secret, Log: c.Log,
			Exits: m.exits}
		policy = m.Monitor
		m.Watcher.OnWatchError = m.Monitor.WatchFailed
	}

	return policy, nil
}

// bootVCPU builds vCPU 0, the bootstrap processor's, with its extensions,
// its entry (kicks, cuts) and its start state, and returns the set-up the
// application processors' vCPUs share.
func (m *Machine) bootVCPU(c *Config, ctl control, unmapped *guestmem.Unmapped, policy hv.Hypercalls) (hv.Setup, error) {
	b := m.board
	v := hv.NewVCPU(ctl.vmcs, c.Caps)
	m.VCPU = v
	m.VCPUs = []*hv.VCPU{v}
	v.CPUID = b.CPUID
	v.XSETBV = b.XSETBV
	v.ReadMSR, v.WriteMSR = b.ReadMSR, b.WriteMSR
	v.TakeNMI = func() bool { return m.bspKick.fromRoot(b.TakeNMI()) }
	if u, ok := b.(NMIUnblocker); ok {
		m.bspKick.unblock = u.UnblockNMIs
	}
	if err := v.Intercept(vmx.ExitExceptionOrNMI, m.bspKick.intercept); err != nil {
		return hv.Setup{}, err
	}
	// Before vCPU 0's entry, it marks itself in the guest, then the
	// application processors' exits that wait are handled (their
	// goroutines run while vCPU 0 yields): an AP that posts an exit after
	// the look sees the mark and kicks it, and a kick that lands before
	// VM entry makes the entry exit at once (v.Enter). A change made
	// meanwhile is vCPU 0's processor's own (Changed(0)), which waits for
	// nobody there.
	v.OnEntry(func(v *hv.VCPU) {
		if m.tickDue() {
			m.tick(v)
		}
	})
	v.OnEntry(func(*hv.VCPU) { m.Shootdown.Enter(0) })
	v.OnEntry(func(*hv.VCPU) { m.yieldToAPs() })
	v.Observe(func(*hv.VCPU, *vmx.Exit) { m.Shootdown.Exit(0) })
	if err := m.attach(v, c, unmapped, policy); err != nil {
		return hv.Setup{}, err
	}
	m.Delivery = m.Deliveries[0]
	m.Agent.Delivery = m.Delivery
	// The guest's CPUID leaves 0x15 and 0x16 agree with the TSC tamahv
	// measured, or read as zeros (hv.VCPU.TSCHz).
	v.TSCHz = b.TSCHz()
	if hz := b.TSCHz(); hz != 0 {
		v.PreemptionTicks = uint32(min(hz/100>>c.Caps.PreemptionTimerShift(), 1<<31))
	}
	v.OnTick(func(v *hv.VCPU) {
		if m.cutShort || m.sliced {
			return // the exit kickedBeforeEntry asked for, not a period's end
		}
		m.ticked()
		m.tick(v)
	})
	v.Enter = func(v *hv.VCPU, launched bool) error {
		if m.ended.Load() != nil {
			return hv.ErrStopped // an application processor's vCPU ended the guest
		}
		if i, stuck := m.Shootdown.Stuck(); stuck {
			// An EPT change does not hold on vCPU i: tamahv's
			// protections cannot be trusted there.
			m.stuckErr = fmt.Errorf("vCPU %d did not leave the guest for an EPT change within %v", i, m.Shootdown.Limit)
			return hv.ErrStopped
		}
		// The last look before VM entry, after every entry hook: what
		// came since vCPU 0 marked itself in the guest makes the entry
		// exit at once (the VMX-preemption timer at 0: SDM Vol. 3C,
		// "VMX-Preemption Timer", an exit after any event injection and
		// before the guest's first instruction); the next entry loads
		// the timer's period again. Never two entries in a row, so
		// that the guest on vCPU 0 runs between two such exits however
		// often the application processors exit: the entry after one,
		// where something came again, runs the guest for a slice of the
		// period (sliceDiv), so that an AP's exit waits that long, not
		// a period. A guest that halted (its activity state HLT) has
		// nothing to run: its entries exit at once as often as kicks
		// come.
		kicked := v.PreemptionTicks != 0 && m.kickedBeforeEntry()
		cut := kicked && (!m.cutShort || v.VMCS.Read(vmx.GuestActivityState) == vmx.ActivityHLT)
		timer := uint64(0)
		if kicked && !cut {
			timer = uint64(max(v.PreemptionTicks/sliceDiv, 1))
		}
		if kicked {
			v.VMCS.Write(vmx.PreemptionTimerValue, timer)
		}
		var err error
		if q := m.quietQ; q != nil {
			// Not for a slice: each of the stub's entries would load
			// the slice's timer again.
			q.On = 0
			if !kicked && q.N != 0 && m.quietEntry(v) {
				q.On, q.Deadline = 1, m.lastTSC+m.tickTSC
			}
			err = m.quietB.QuietEnter(&v.Regs, m.fx, launched, q)
		} else {
			err = b.Enter(&v.Regs, m.fx, launched)
		}
		if kicked {
			v.VMCS.Write(vmx.PreemptionTimerValue, uint64(v.PreemptionTicks))
		}
		m.cutShort, m.sliced = cut, kicked && !cut
		return err
	}
	started := false
	v.OnEntry(func(*hv.VCPU) {
		if !started {
			started = true
			fmt.Fprintf(m.log, "tamahv: vCPU %d started\n", 0)
		}
	})
	if m.tsc != nil {
		// vCPU 0 answers CPUID from its table after a quiet entry, until
		// its tick is due: made at its first entry, and again after the
		// guest wrote IA32_APIC_BASE (leaf 1's APIC flag follows it).
		stale := true
		v.Observe(func(v *hv.VCPU, e *vmx.Exit) {
			stale = stale || e.Reason == vmx.ExitWRMSR && uint32(v.Regs.RCX) == vmx.MSRAPICBase
		})
		// NMIs held at a kicked entry (kickedBeforeEntry) are the next
		// full entry's to take.
		v.NeedExit(func(*hv.VCPU) bool { return m.bspKick.held != 0 })
		if qb, ok := b.(QuietEnterer); ok {
			m.quietB, m.quietQ = qb, new(vmx.QuietCPUID)
		}
		v.OnEntry(func(v *hv.VCPU) {
			if stale {
				stale = false
				t := v.CPUIDTable()
				v.QuietCPUID(t, m.tickPending)
				if q := m.quietQ; q != nil {
					q.N = 0
					if len(t) <= len(q.Table) {
						for i, e := range t {
							q.Table[i] = vmx.CPUIDAnswer{Leaf: e.Leaf, Subleaf: e.Subleaf, EAX: e.Regs[0], EBX: e.Regs[1], ECX: e.Regs[2], EDX: e.Regs[3], CR4Mask: e.CR4Mask, ECXIfCR4: e.ECXIfCR4}
						}
						q.N = uint32(len(t))
					}
				}
			}
		})
	}
	setup := hv.Setup{
		Host: b.Host(), EPTP: m.eptp, VPID: 1, Preemption: true, ExceptionBM: 1 << vmx.VectorBP,
		MSRBitmap: ctl.msrPA, IOBitmapA: ctl.ioA, IOBitmapB: ctl.ioB,
	}
	if err := v.Init(setup, m.Start); err != nil {
		return hv.Setup{}, err
	}
	return setup, nil
}

// LAPIC is a processor whose local APIC registers tamahv reads and writes
// for the guest: a Board's (the bootstrap processor's) or an AP's (its
// own).
type LAPIC interface {
	LAPICRead(off uint32) uint32
	LAPICWrite(off, val uint32)
}

// virtualizeINIT makes tamahv see the INIT IPIs the guest sends to its
// application processors, where its local APIC writes are trapped
// (localAPIC), it has application processors and every processor's local
// APIC is reachable: the local APIC's page is mapped without write access
// and every write emulated (guestmem.APICWrites), an INIT to an AP's vCPU
// applied by tamahv (virtualINIT) instead of sent.
func (m *Machine) virtualizeINIT() error {
	if len(m.aps) == 0 || len(m.VCPUs) > 64 { // guestmem.APICWrites's masks
		return nil
	}
	bsp, ok := m.board.(LAPIC)
	if !ok {
		return nil
	}
	lapics := []LAPIC{bsp}
	for _, a := range m.aps {
		l, ok := a.ap.(LAPIC)
		if !ok {
			return nil
		}
		lapics = append(lapics, l)
	}
	_, ebx, _, _ := m.board.CPUID(1, 0)
	m.vcpuIndex = make(map[*hv.VCPU]int, len(m.VCPUs))
	for i, v := range m.VCPUs {
		m.vcpuIndex[v] = i
	}
	m.apicIDs = []uint32{ebx >> 24}
	for _, a := range m.aps {
		m.apicIDs = append(m.apicIDs, a.ap.APICID())
	}
	base := m.board.ReadMSR(vmx.MSRAPICBase) & vmx.APICBaseAddr
	if _, err := m.EPT.Protect(base, ept.Read); err != nil {
		return fmt.Errorf("machine: the local APIC's page: %w", err)
	}
	m.Shootdown.Changed(0)
	m.APIC = &guestmem.APICWrites{Mem: m.Watcher, Base: base, IDs: m.apicIDs, Index: m.index,
		Read:  func(v *hv.VCPU, off uint32) uint32 { return lapics[m.index(v)].LAPICRead(off) },
		Write: func(v *hv.VCPU, off, val uint32) { lapics[m.index(v)].LAPICWrite(off, val) },
		INIT:  m.virtualINIT,
	}
	for _, v := range m.VCPUs {
		if err := m.APIC.Install(v); err != nil {
			return err
		}
	}
	for _, a := range m.aps {
		a.v.OnEntry(func(v *hv.VCPU) {
			if a.initPending {
				a.initPending = false
				v.ReceiveINIT()
			}
		})
	}
	return nil
}

// index returns v's number (one map lookup: it runs in every emulated
// local APIC write).
func (m *Machine) index(v *hv.VCPU) int { return m.vcpuIndex[v] }

// virtualINIT applies an INIT IPI v sends to the vCPUs in targets (a mask
// over m.apicIDs, from hv.IPITargets): an application processor's vCPU it
// reaches goes to its INIT state, waiting for a start-up IPI, at its next
// entry (kicked out of the guest first); one that waits already stays as
// it is. An INIT that reaches the bootstrap processor is sent to the
// vCPUs it reaches (tamahv stops the guest at its INIT exit).
func (m *Machine) virtualINIT(v *hv.VCPU, targets uint64) bool {
	if targets&1 != 0 {
		return false
	}
	for i, a := range m.aps {
		if targets&(1<<(i+1)) == 0 || a.v.WaitsForSIPI() {
			continue
		}
		a.initPending = true
		if k, ok := a.ap.(Kicker); ok && a.v != v && k.Kick() {
			a.kick.sent.Add(1)
		}
	}
	return true
}

// attach wires v to the parts every vCPU shares: its ports, the
// handlers and extensions, the policy and Serial. v gets its own #PF
// delivery and its own swapmem CPU (Deliveries[i]).
func (m *Machine) attach(v *hv.VCPU, c *Config, unmapped *guestmem.Unmapped, policy hv.Hypercalls) error {
	v.Serial = &m.serial
	v.Log = c.Log
	if c.Console != [2]uint16{} {
		v.OwnPorts(c.Console[0], c.Console[1])
	}
	for _, g := range c.PortGuards {
		v.GuardPorts(g)
	}
	v.PortIO = m.board.PortIO
	if err := unmapped.Install(v); err != nil {
		return err
	}
	m.Spaces.Install(v)
	if err := m.Watcher.Install(v); err != nil {
		return err
	}
	v.Mem = m.Phys
	d := &pagein.PFDelivery{Reports: m.Engine}
	if err := m.Agent.InstallVCPU(v, d); err != nil {
		return err
	}
	// Before the engine's entry hook: a fault lost at this entry is
	// injected again at once.
	d.Install(v)
	if err := m.Trap.Install(v); err != nil {
		return err
	}
	// Each vCPU arms a return trap of its own (its slot); every vCPU
	// springs any of them.
	slot := len(m.Deliveries)
	m.Trap.Slots(slot + 1)
	cpu := &pagein.TrapCPU{CPU: &pagein.SwapCPU{V: v, Agent: m.Agent, Spaces: m.Spaces, Delivery: d}, Trap: m.Trap, V: v, Slot: slot}
	if mon := m.Monitor; mon != nil {
		// The swap reads go on before the entry: their next pieces
		// start, whose pages may then be faulted in at once.
		v.OnEntry(func(*hv.VCPU) { mon.Pump() })
		v.NeedExit(func(*hv.VCPU) bool { return mon.Busy() })
	}
	v.OnEntry(func(*hv.VCPU) { _ = m.Engine.InjectPendingPF(cpu) })
	// A swap read whose pages wait for a #PF looks for its moment at
	// every exit.
	v.NeedExit(func(*hv.VCPU) bool { return m.Engine.Waiting() })
	// Those two can begin on any vCPU: the application processors then
	// hand their next exits over, as they come.
	v.OnEntry(func(*hv.VCPU) {
		if m.Engine.Waiting() || m.Monitor != nil && m.Monitor.Busy() {
			m.handOverAPs()
		}
	})
	// Last: the exit's ended watches reach every processor in one
	// shootdown.
	v.OnEntry(func(*hv.VCPU) { m.Watcher.Sync() })
	v.Hypercalls = policy
	m.Deliveries = append(m.Deliveries, d)
	return nil
}

// addAP builds the vCPU of application processor ap: its VMCS, loaded
// through ap, set up as vCPU 0's with ap's host state and its own VPID,
// made an application processor that waits for the guest's start-up IPI,
// bound to its part of the shootdown, and wired as vCPU 0.
func (m *Machine) addAP(ap AP, c *Config, setup hv.Setup, unmapped *guestmem.Unmapped, policy hv.Hypercalls) error {
	i := len(m.VCPUs)
	pa, page, err := m.page()
	if err != nil {
		return err
	}
	if err := vmx.PrepareRegion(c.Caps, page[:]); err != nil {
		return err
	}
	vmcs, err := ap.LoadVMCS(pa)
	if err != nil {
		return err
	}
	v := hv.NewVCPU(vmcs, c.Caps)
	a := &apVCPU{ap: ap, index: i}
	v.CPUID = ap.CPUID
	v.TSCHz = m.VCPU.TSCHz
	v.XSETBV = ap.XSETBV
	v.ReadMSR, v.WriteMSR = ap.ReadMSR, ap.WriteMSR
	v.TakeNMI = func() bool { return a.kick.fromRoot(ap.TakeNMI()) }
	if c, ok := ap.(EntryCounter); ok {
		// The page-table watcher keeps a page open for this vCPU's write
		// until its processor entered the guest again: its own count,
		// less the entries cut short before the guest ran.
		v.EntryCount = func() uint64 {
			entries, _, cuts := c.Counts()
			return entries - cuts
		}
	}
	if err := v.Intercept(vmx.ExitExceptionOrNMI, a.kick.intercept); err != nil {
		return err
	}
	setup.Host, setup.VPID = ap.Host(), uint16(i+1)
	if err := v.Init(setup, m.Start); err != nil {
		return err
	}
	if err := v.MakeAP(); err != nil {
		return err
	}
	w, err := m.Shootdown.Words(i)
	if err != nil {
		return err
	}
	if err := ap.Bind(w); err != nil {
		return err
	}
	if err := m.attach(v, c, unmapped, policy); err != nil {
		return err
	}
	// The application processor answers its preemption-timer exits
	// itself: its timer only bounds how long a shootdown waits for it
	// where a kick cannot reach it. It is vCPU 0's period: each exit wakes
	// a processor the guest left idle.
	v.PreemptionTicks = m.VCPU.PreemptionTicks
	v.Enter = func(v *hv.VCPU, launched bool) error {
		// From here the AP's exits are posted (AP.Pending) until Enter
		// returns; then the vCPU is out of the guest until its next
		// entry: its goroutine handles the exit, and vCPU 0 lets it
		// (yieldToAPs).
		a.out.Store(false)
		if a.cpuid != nil {
			m.armCPUID(a, v)
		}
		if n := a.entries.Add(1); m.kickCheck != 0 && n%m.kickCheck == 0 && !v.WaitsForSIPI() {
			m.kickBeforeEntry(a)
		}
		err := ap.Enter(&v.Regs, launched)
		a.out.Store(true)
		return err
	}
	if f, ok := ap.(CPUIDAnswerer); ok {
		a.cpuid, a.cpuidStale = f, true
		v.Observe(func(v *hv.VCPU, e *vmx.Exit) {
			if e.Reason == vmx.ExitWRMSR && uint32(v.Regs.RCX) == vmx.MSRAPICBase {
				a.cpuidStale = true // leaf 1's APIC flag follows the MSR
			}
		})
	}
	started := false
	v.OnEntry(func(v *hv.VCPU) {
		// Started at its first entry in an active state: after the
		// guest's start-up IPI.
		if !started && !v.WaitsForSIPI() {
			started = true
			fmt.Fprintf(m.log, "tamahv: vCPU %d started\n", i)
		}
	})
	m.VCPUs = append(m.VCPUs, v)
	a.v = v
	m.aps = append(m.aps, a)
	if k, ok := ap.(Kicker); ok {
		bsp, err := m.Shootdown.Words(0)
		if err != nil {
			return err
		}
		k.KickBSP(bsp.InGuest, &m.bspKick.sent)
		// Each kicking AP may have one kick of vCPU 0 on its way, and
		// vCPU 0's processor may latch one NMI more (kicks).
		m.bspKick.limit = max(m.bspKick.limit, 1) + 1
	}
	return nil
}

// armCPUID lets a's processor answer the coming entry's CPUID exits
// (and its preemption-timer exits) itself where the vCPU runs and is
// quiet (hv.VCPU.Quiet), or not; under Serial, the lock of everything
// Quiet asks and of handOverAPs. The answers are made (again) first where
// they are stale; an AP that cannot take them hands every CPUID exit
// over from then on.
func (m *Machine) armCPUID(a *apVCPU, v *hv.VCPU) {
	if v.Serial != nil {
		v.Serial.Lock()
		defer v.Serial.Unlock()
	}
	on := !v.WaitsForSIPI() && v.Quiet()
	if on && a.cpuidStale {
		a.cpuidStale = false
		if err := a.cpuid.SetCPUID(v.CPUIDTable()); err != nil {
			fmt.Fprintf(m.log, "tamahv: vCPU %d: its processor hands every CPUID exit over: %v\n", a.index, err)
			a.cpuid.AnswerCPUID(false)
			a.cpuid = nil
			return
		}
	}
	a.cpuid.AnswerCPUID(on)
}

// kickBeforeEntry sends a's processor a kick just before its entry
// (Options.KickCheck), counted as a shootdown's are.
func (m *Machine) kickBeforeEntry(a *apVCPU) {
	if k, ok := a.ap.(Kicker); ok && k.Kick() {
		a.kick.sent.Add(1)
		a.checks.Add(1)
	}
}

// tick is vCPU 0's periodic work: pending #PFs re-armed and deadlines
// kept (the swapmem engine), the watchdog, and a yield to the Go runtime.
// It runs at vCPU 0's VMX-preemption-timer exits and, where vCPU 0 exits
// too often for its timer to expire (the timer restarts at every entry;
// with APs, their kicks and local APIC writes keep it short), at an entry
// tickPeriod after the last run (tickDue).
func (m *Machine) tick(v *hv.VCPU) {
	m.Engine.ReinjectFailedPF()
	if m.Monitor != nil && m.Monitor.Watchdog(m.log, 10*time.Second) {
		fmt.Fprintf(m.log, "tamahv: page-table writes %d (accessed/dirty %d), translations changed %d, %d pages watched\n",
			m.Watcher.Writes, m.Watcher.ADWrites, m.Watcher.Changes, m.Watcher.Watches())
		v.Report(m.log, true)
	}
	m.aliveLine()
	// The vCPU's loop never blocks; yield at every tick so that the
	// Go runtime's own goroutines (the garbage collector's workers)
	// run and a collection ends: what guest requests allocated is
	// given back.
	runtime.Gosched()
}

// aliveLine writes "tamahv: alive: N exits (vCPU 0: a, ...)" when
// Options.Alive passed since the last such line and the guest exited
// since: a console that stays silent with the count unchanged is a guest
// that makes no progress.
func (m *Machine) aliveLine() {
	if l := m.alive.line(m.clock(), m.exitCounts); l != "" {
		fmt.Fprintln(m.log, l)
	}
}

// aliveLog decides when the exits line is written.
type aliveLog struct {
	every time.Duration // 0: never
	last  time.Time     // when a line was last due
	exits uint64        // the count last written
}

// line returns the exits line if one is due at now and the count (from
// counts) changed since the last, else "".
func (a *aliveLog) line(now time.Time, counts func() (uint64, string)) string {
	if a.every <= 0 || now.Sub(a.last) < a.every {
		return ""
	}
	a.last = now
	total, each := counts()
	if total == a.exits {
		return ""
	}
	a.exits = total
	return fmt.Sprintf("tamahv: alive: %d exits (%s)", total, each)
}

// exitCounts returns the exits of all vCPUs and each one's, as
// "vCPU 0: a, vCPU 1: b". Serial is held or the APs have stopped.
func (m *Machine) exitCounts() (uint64, string) {
	var total uint64
	var each strings.Builder
	for i, v := range m.VCPUs {
		total += v.Total()
		if i > 0 {
			each.WriteString(", ")
		}
		fmt.Fprintf(&each, "vCPU %d: %d", i, v.Total())
	}
	return total, each.String()
}

// tickPeriod is how often tick runs at least while vCPU 0 exits: the
// preemption timer's period.
const tickPeriod = 10 * time.Millisecond

// sliceDiv: vCPU 0's entry that follows one cut short, where an
// application processor's exit waits again, runs the guest for the
// preemption timer's period over sliceDiv (200 µs).
const sliceDiv = 50

// tickDue reports whether tickPeriod passed since tick last ran, and
// counts a run from now if so.
func (m *Machine) tickDue() bool {
	if m.tsc != nil {
		now := m.tsc()
		if now-m.lastTSC < m.tickTSC {
			return false
		}
		m.lastTSC = now
		return true
	}
	now := m.clock()
	if now.Sub(m.lastTick) < tickPeriod {
		return false
	}
	m.lastTick = now
	return true
}

// handOverAPs has every application processor hand its next exits over
// (none answered in its loop) until its next entry.
func (m *Machine) handOverAPs() {
	for _, a := range m.aps {
		if a.cpuid != nil {
			a.cpuid.AnswerCPUID(false)
		}
	}
}

// quietEntry reports whether vCPU 0's coming entry is quiet
// (hv.VCPU.Quiet), under Serial: its exit stub may then answer CPUID.
func (m *Machine) quietEntry(v *hv.VCPU) bool {
	if v.Serial != nil {
		v.Serial.Lock()
		defer v.Serial.Unlock()
	}
	return v.Quiet()
}

// QuietEnterer is a Board whose VM exit stub answers CPUID itself from a
// table of vCPU 0's answers (vmx.RunQuiet), after the entries the machine
// finds quiet and until vCPU 0's tick is due: those exits reach no Go.
type QuietEnterer interface {
	QuietEnter(r *vmx.GuestRegs, fx *vmx.FXArea, launched bool, q *vmx.QuietCPUID) error
}

// tickPending reports, without counting a run, whether tick is due
// (the time-stamp counter's way only).
func (m *Machine) tickPending() bool { return m.tsc()-m.lastTSC >= m.tickTSC }

// ticked counts a run of tick from now.
func (m *Machine) ticked() {
	if m.tsc != nil {
		m.lastTSC = m.tsc()
		return
	}
	m.lastTick = m.clock()
}

// TSCReader is a Board that reads its processor's time-stamp counter.
// With a known frequency (Board.TSCHz), vCPU 0's entries compare counts
// to see whether tick is due, instead of reading the clock.
type TSCReader interface {
	TSC() uint64
}

// kicks matches the NMIs tamahv sends one processor to make it leave the
// guest (its kicks) with the NMIs the processor receives, one to one:
// each NMI, whether it exits the guest or reaches VMX root, consumes one
// outstanding kick, and an NMI that finds none outstanding is the
// guest's. A kick whose NMI is still on its way when others arrive stays
// outstanding, and its NMI is not taken for the guest's when it comes.
//
// The processor can receive fewer NMIs than were sent to it: NMIs that
// arrive while NMIs are blocked there (in tamahv's NMI handler, or after
// an NMI exit until unblock ends it) collapse into the one the processor
// latches, so that one NMI is counted for several. The kicks left over
// then consume the guest's next NMIs in their place: the guest loses
// those, as it would lose an NMI that collapsed with another on the bare
// processor, and never receives a kick as its NMI. limit bounds how many
// NMIs the guest can lose that way, where no more kicks than limit can
// have NMIs still to come at once: vCPU 0's, one for each application
// processor that kicks it and one the processor latches. An AP kicks
// after it hands over an exit and hands over its next only after this
// processor handled that one and the AP entered the guest again, several
// microseconds in which its previous kick's NMI has arrived. Once every
// NMI that reached VMX root is matched, the kicks outstanding beyond limit
// are ones whose NMIs collapsed, and are forgotten.
type kicks struct {
	sent    atomic.Uint32 // kicks sent, counted by the sender before each NMI
	matched uint32        // kicks matched with an NMI (the vCPU's goroutine)
	// held are NMIs taken from the board at an entry (kickedBeforeEntry),
	// matched at the next.
	held uint32
	// limit is how many kicks can be on their way at once (0: no bound).
	limit   uint32
	unblock func() // unblocks NMIs on the processor (vCPU 0's only)
}

// match matches n NMIs the processor received with outstanding kicks, one
// each while there are any, and returns how many of them are the guest's.
func (k *kicks) match(n uint32) uint32 {
	m := min(n, k.sent.Load()-k.matched)
	k.matched += m
	return n - m
}

// fromRoot matches the n NMIs that reached VMX root (with those held at
// the last entry), reports whether any of them is the guest's, and then
// forgets the outstanding kicks beyond limit.
func (k *kicks) fromRoot(n uint32) bool {
	n, k.held = n+k.held, 0
	guest := k.match(n)
	if s := k.sent.Load(); k.limit != 0 && s-k.matched > k.limit {
		k.matched = s - k.limit
	}
	return guest > 0
}

// hold keeps n NMIs that reached VMX root for the next fromRoot, and
// reports whether there were any.
func (k *kicks) hold(n uint32) bool {
	k.held += n
	return n != 0
}

// intercept answers an NMI exit that was a kick: the guest never sees it.
// An NMI exit leaves NMIs blocked on its processor until an IRET; unblock
// ends that where it runs on it (vCPU 0's).
func (k *kicks) intercept(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
	if ev, ok := vmx.DecodeEvent(e.Interruption, 0); !ok || ev.Type != vmx.EventNMI {
		return next(v, e)
	}
	if k.unblock != nil {
		k.unblock()
	}
	if k.match(1) == 0 {
		return hv.Resume, nil
	}
	return next(v, e)
}

// kickedBeforeEntry reports, at vCPU 0's entry, whether an NMI reached
// VMX root since the NMIs were last taken (an application processor's
// kick that found vCPU 0 marked in the guest, or the guest's own NMI) or
// an application processor's exit is posted: either would wait for vCPU
// 0's next exit, up to a preemption-timer period. The NMIs are held for
// the next entry's TakeNMI.
func (m *Machine) kickedBeforeEntry() bool {
	if m.bspKick.hold(m.board.TakeNMI()) {
		return true
	}
	for _, a := range m.aps {
		if !a.done.Load() && a.ap.Pending() {
			return true
		}
	}
	return false
}

// EntryCounter is an AP that counts what its processor does without the
// bootstrap processor: VM entries, preemption-timer exits it answered,
// and entries it cut short (an NMI between its mark in the guest and the
// entry: the entry exits at once, and the exit is handed over).
type EntryCounter interface {
	Counts() (entries, ticks, cuts uint64)
}

// CPUIDAnswerer is an AP whose exit loop answers CPUID exits itself,
// from a table of its vCPU's answers (hv.VCPU.CPUIDTable), after the
// entries the machine finds quiet (hv.VCPU.Quiet): those exits reach
// neither the bootstrap processor nor any Observe function.
type CPUIDAnswerer interface {
	// SetCPUID gives the AP its answers, while it waits for a command.
	SetCPUID(t []hv.CPUIDEntry) error
	// AnswerCPUID says whether the coming entry's CPUID exits may be
	// answered from the table.
	AnswerCPUID(on bool)
	// Answered returns the CPUID exits the AP answered itself.
	Answered() uint64
}

// CommandCounter is an AP that counts the commands the bootstrap
// processor sent it: the round trips its exits cost (one resumes the
// guest; reads outside the exit's snapshot, CPUID and RDMSR add one each).
type CommandCounter interface {
	Commands() uint64
}

// NMIUnblocker is a Board that can end the blocking of NMIs an NMI exit
// leaves on the bootstrap processor (an IRET to itself).
type NMIUnblocker interface {
	UnblockNMIs()
}

// yieldToAPs lets the application processors' goroutines handle the
// exits that wait, from vCPU 0's entry: Serial is released while they
// run.
//
// Each AP that has such work when it starts gets one turn: it yields
// until that AP's exit is handled and its vCPU is back in the guest (or
// has nothing left to do), at most maxYields times: one that found its
// exit while vCPU 0 held Serial would otherwise wait for vCPU 0's next
// exit, up to a preemption-timer period. An AP that exits again meanwhile
// waits for vCPU 0's next entry (or kicks it out of the guest): the APs
// and vCPU 0 take turns, and an AP that exits without pause (a CPUID
// loop) gets one exit handled per vCPU 0 entry, not a run of them.
func (m *Machine) yieldToAPs() {
	var owed []*apVCPU
	var at []uint64
	for _, a := range m.aps {
		if a.waiting() {
			owed = append(owed, a)
			at = append(at, a.entries.Load())
		}
	}
	yield := m.yield
	if yield == nil {
		yield = runtime.Gosched
	}
	for n := 0; n < maxYields && len(owed) > 0; n++ {
		m.serial.Unlock()
		yield()
		m.serial.Lock()
		k := 0
		for i, a := range owed {
			if a.waiting() && a.entries.Load() == at[i] {
				owed[k], at[k] = a, at[i]
				k++
			}
		}
		owed, at = owed[:k], at[:k]
	}
}

// maxYields bounds yieldToAPs: a goroutine handles its exit within one
// yield (its handlers never yield), so more means one that is stuck.
const maxYields = 64

// apsWaiting reports whether an AP's goroutine has work (apVCPU.waiting).
func (m *Machine) apsWaiting() bool {
	for _, a := range m.aps {
		if a.waiting() {
			return true
		}
	}
	return false
}

// exits returns the exits of every vCPU so far, and the
// VMX-preemption-timer exits among them (the policy's figures). It runs
// in a handler: Serial is held, no vCPU counts meanwhile.
func (m *Machine) exits(*hv.VCPU) (total, timer uint64) {
	for _, v := range m.VCPUs {
		total += v.Total()
		timer += v.Count(vmx.ExitPreemptionTimer)
	}
	return total, timer
}

// ErrNoSystemSpace is the swapmem engine's error for a request with CR3 0
// before the guest has shown its kernel address space.
var ErrNoSystemSpace = errors.New("machine: the guest's kernel address space is not known yet")

// swapGuest is the guest as the swapmem engine sees it: Watcher, with
// the system address space (requests with CR3 0) learnt from the guest's
// exits.
type swapGuest struct {
	*guestmem.Watcher
	spaces *guestmem.AddressSpaces
	agent  *pagein.BreakpointAgent
}

// WithdrawBPFault implements swapmem.BPWithdrawer: the engine arms the
// agent for one page at a time, so the arming it takes back is the
// agent's.
func (g swapGuest) WithdrawBPFault(uint64) { _ = g.agent.Disarm() }

// SystemCR3 implements swapmem.Guest: the guest's kernel address space, 0
// while none is known.
func (g swapGuest) SystemCR3() uint64 { return g.spaces.System() }

// Translate implements swapmem.Guest; CR3 0 is no address space.
func (g swapGuest) Translate(cr3, va uint64) (swapmem.Translation, error) {
	if cr3 == 0 {
		return swapmem.Translation{}, ErrNoSystemSpace
	}
	return g.Watcher.Translate(cr3, va)
}

// Watch implements swapmem.Guest; CR3 0 is no address space.
func (g swapGuest) Watch(cr3, va uint64, changed func(swapmem.Translation)) (func(), error) {
	if cr3 == 0 {
		return nil, ErrNoSystemSpace
	}
	return g.Watcher.Watch(cr3, va, changed)
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

// apWait bounds how long Run waits for an application processor's first
// VM entry, and for its vCPU to stop.
const apWait = time.Second

// Run runs the guest until it exits (nil) or stops on an error, and
// writes tamahv's summary lines to the log.
//
// With application processors, each vCPU's Run goes in a goroutine of its
// own first; an application processor whose first VM entry (in the
// wait-for-SIPI state) succeeds is shown to the guest, one whose entry
// failed stays hidden and the guest runs without it. vCPU 0 runs in the
// calling goroutine. The guest ends when vCPU 0's Run returns, or when an
// application processor's does (its error, if any, is Run's): every
// application processor is then stopped.
func (m *Machine) Run() error {
	m.startAPs()
	err := m.VCPU.Run()
	ended := m.ended.Load()
	m.stopAPs()
	// The board owns the memory the processor used (VMCS, EPT, sink).
	runtime.KeepAlive(m.board)
	if err == nil && ended != nil && ended.err != nil {
		err = fmt.Errorf("vCPU %d: %w", ended.index, ended.err)
	}
	if err == nil && m.stuckErr != nil {
		err = m.stuckErr
	}
	if err != nil {
		fmt.Fprintf(m.log, "tamahv: guest stopped: %v\n", err)
		m.report(true)
		return fmt.Errorf("%w: %w", ErrGuestFailed, err)
	}
	status := 0
	if m.Monitor != nil {
		status = m.Monitor.Status
	}
	total, each := m.exitCounts()
	fmt.Fprintf(m.log, "tamahv: guest exited (status %d) after %d exits (%s)\n", status, total, each)
	m.report(false)
	st := m.Engine.Stats()
	fmt.Fprintf(m.log, "tamahv: swapmem %d #PFs injected, %d completed, %d failed, %d removed; page-table writes %d (accessed/dirty %d), watches walked again %d, translations changed %d, stale protections %d\n",
		st.Injected, st.Completed, st.Failed, st.Removed, m.Watcher.Writes, m.Watcher.ADWrites, m.Watcher.Rewalks, m.Watcher.Changes, m.Watcher.Stale)
	fmt.Fprintf(m.log, "tamahv: page-table writes emulated in their exit %d, opened until the next exit %d %v; returns from user faults trapped %d of %d\n",
		m.Watcher.Emulated, m.Watcher.Opened, fallbacks(m.Watcher), m.Trap.Hits, m.Trap.Arms)
	if a := m.APIC; a != nil {
		fmt.Fprintf(m.log, "tamahv: local APIC writes emulated %d (INITs applied %d, dropped %d, refused %d)\n", a.Emulated, a.INITs, a.Dropped, a.Refused)
	}
	if m.Agent.Detour() != 0 {
		fmt.Fprintf(m.log, "tamahv: breakpoint agent at %#x: %d hits, %d faults raised, %d passed in other address spaces, %d view switches\n",
			m.Agent.Detour(), m.Agent.Hits, m.Agent.Raised, m.Agent.Passed, m.Agent.Switches)
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fmt.Fprintf(m.log, "tamahv: Go heap %d KiB in use, %d collections, heap space %d KiB (a bound on the most it held)\n", ms.HeapAlloc>>10, ms.NumGC, ms.HeapSys>>10)
	var delivered, requeued, lost uint64
	for _, d := range m.Deliveries {
		delivered, requeued, lost = delivered+d.Delivered, requeued+d.Requeued, lost+d.Lost
	}
	fmt.Fprintf(m.log, "tamahv: page-table isolation %v (%d pair checks); #PF deliveries %d confirmed, %d interrupted and re-queued, %d lost and cancelled\n",
		m.Spaces.PTI(), m.Spaces.Checks, delivered, requeued, lost)
	return nil
}

// report writes each vCPU's exits: vCPU 0's as the only vCPU's were,
// the others' under a header line each.
func (m *Machine) report(recent bool) {
	m.VCPU.Report(m.log, recent)
	if q := m.quietQ; q != nil {
		fmt.Fprintf(m.log, "tamahv: vCPU 0's exit stub answered %d CPUID exits itself\n", q.Answered)
	}
	if n := m.VCPU.QuietlyAnswered(); n != 0 {
		fmt.Fprintf(m.log, "tamahv: vCPU 0 answered %d CPUID exits after a quiet entry, without their exit handling\n", n)
	}
	for _, a := range m.aps {
		if !a.done.Load() {
			continue // still running: its counts are not ours to read
		}
		fmt.Fprintf(m.log, "tamahv: vCPU %d exits\n", a.index)
		if c, ok := a.ap.(EntryCounter); ok {
			entries, ticks, cuts := c.Counts()
			fmt.Fprintf(m.log, "tamahv: vCPU %d entered the guest %d times; its processor answered %d preemption-timer exits itself, and cut %d entries short for an NMI that came before them\n",
				a.index, entries, ticks, cuts)
		}
		if m.kickCheck != 0 {
			fmt.Fprintf(m.log, "tamahv: vCPU %d: %d kicks sent just before an entry (%s)\n", a.index, a.checks.Load(), KickCheckOption)
		}
		a.v.Report(m.log, recent)
		if a.cpuid != nil {
			fmt.Fprintf(m.log, "tamahv: vCPU %d: its processor answered %d CPUID exits itself\n", a.index, a.cpuid.Answered())
		}
		if c, ok := a.ap.(CommandCounter); ok && a.v.Total() != 0 {
			n := c.Commands()
			fmt.Fprintf(m.log, "tamahv: vCPU %d: %d commands to its processor for %d exits handed over (%.2f an exit, the one that resumes the guest included)\n",
				a.index, n, a.v.Total(), float64(n)/float64(a.v.Total()))
		}
	}
}

// startAPs runs each application processor's vCPU in a goroutine and
// shows to the guest those whose first VM entry succeeded, waiting for
// each at most apWait.
func (m *Machine) startAPs() {
	for _, a := range m.aps {
		go func() {
			a.err = a.v.Run()
			if !a.state.CompareAndSwap(apStarting, apFinished) && a.state.Load() == apShown {
				// Shown to the guest: its end is the guest's.
				m.ended.CompareAndSwap(nil, a)
			}
			a.done.Store(true)
		}()
	}
	deadline := time.Now().Add(apWait)
	for _, a := range m.aps {
		var err error
		for {
			done, serr := a.ap.Started()
			if done {
				err = serr
				break
			}
			if !time.Now().Before(deadline) {
				err = fmt.Errorf("no first VM entry within %v", apWait)
				break
			}
			runtime.Gosched()
		}
		if err == nil && !a.state.CompareAndSwap(apStarting, apShown) {
			// Its Run ended before the guest could know it.
			err = a.err
			if err == nil {
				err = errors.New("the vCPU stopped")
			}
		}
		// The shown vCPUs' handlers write the log too.
		m.serial.Lock()
		if err != nil {
			a.state.CompareAndSwap(apStarting, apFinished)
			fmt.Fprintf(m.log, "tamahv: AP APIC ID %d: VM entry failed: %v\n", a.ap.APICID(), err)
			a.ap.Stop()
		} else {
			fmt.Fprintf(m.log, "tamahv: AP APIC ID %d: vCPU %d waits for start-up\n", a.ap.APICID(), a.index)
			if err := a.ap.Show(); err != nil {
				a.state.Store(apFinished)
				a.ap.Stop()
				fmt.Fprintf(m.log, "tamahv: AP APIC ID %d: vCPU %d not shown to the guest: %v\n", a.ap.APICID(), a.index, err)
			}
		}
		m.serial.Unlock()
	}
}

// stopAPs stops every application processor's vCPU and waits for their
// goroutines, at most apWait.
func (m *Machine) stopAPs() {
	for _, a := range m.aps {
		a.ap.Stop()
	}
	deadline := time.Now().Add(apWait)
	for _, a := range m.aps {
		for !a.done.Load() && time.Now().Before(deadline) {
			runtime.Gosched()
		}
		if !a.done.Load() {
			// Its handlers may write the log too, unless one is stuck.
			locked := m.serial.TryLock()
			fmt.Fprintf(m.log, "tamahv: AP APIC ID %d: vCPU %d did not stop\n", a.ap.APICID(), a.index)
			if locked {
				m.serial.Unlock()
			}
		}
	}
}

// fallbacks lists why page-table writes were not emulated, reason=count.
func fallbacks(g *guestmem.Watcher) string {
	var b strings.Builder
	b.WriteString("(")
	for i, n := range g.Fallbacks {
		if n > 0 {
			if b.Len() > 1 {
				b.WriteString(" ")
			}
			fmt.Fprintf(&b, "%v=%d", guestmem.PTFallback(i), n)
		}
	}
	b.WriteString(")")
	return b.String()
}
