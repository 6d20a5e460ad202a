//go:build tamago

package main

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
	"unsafe"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/board/pc/multiboot"
	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// IA32_LSTAR, the guest kernel's SYSCALL entry.
const msrLSTAR = 0xc0000082

// The guest's serial console is COM2; tamahv keeps COM1.
const guestCmdline = "console=ttyS1,115200 earlyprintk=serial,ttyS1,115200 panic=-1 mitigations=off"

// monitor is the default policy: the hypercalls a guest may make.
type monitor struct {
	status int
	secret uint64
	gm     *hv.GuestMemory
	eng    *swapmem.Engine
	swap   swapRead
}

// swapRead is the state of the guest's last HcSwapRead.
type swapRead struct {
	state    uint64
	cr3      uint64
	vetoes   int
	want     [32]byte
	start    time.Time
	exits    uint64
	injected uint64
	missing  int
	reported bool // the watchdog spoke
}

// watchdog reports a read pending for long, once: the engine's state and
// the page-table watch counters.
func (m *monitor) watchdog(v *hv.VCPU) {
	if m.swap.state != hv.SwapPending || m.swap.reported || time.Since(m.swap.start) < 10*time.Second {
		return
	}
	m.swap.reported = true
	fmt.Printf("tamahv: swapmem read pending for %v; page-table writes %d (accessed/dirty %d), translations changed %d, %d pages watched\n",
		time.Since(m.swap.start).Round(time.Second), m.gm.Writes, m.gm.ADWrites, m.gm.Changes, m.gm.Watches())
	m.eng.Dump(os.Stdout)
	v.Report(os.Stdout, true)
}

func (m *monitor) Call(v *hv.VCPU, nr, a1, a2, a3 uint64) (uint64, bool) {
	switch nr {
	case hv.HcSwapRead:
		return m.swapRead(v, a1, a2), false
	case hv.HcSwapStatus:
		if m.swap.state == 0 {
			return hv.HypercallInvalid, false
		}
		return m.swap.state, false
	case hv.HcIdentify:
		return hv.HypercallMagic, false
	case hv.HcExit:
		if a1 > 255 {
			return hv.HypercallInvalid, false
		}
		m.status = int(a1)
		return 0, true
	case hv.HcSecret:
		return m.secret, false
	}
	return hv.HypercallUnknown, false
}

// swapRead starts a swapmem read of the caller's memory described by the
// request at guest-virtual req.
func (m *monitor) swapRead(v *hv.VCPU, req, size uint64) uint64 {
	if m.swap.state == hv.SwapPending {
		return hv.HypercallBusy
	}
	if size != hv.SwapRequestSize {
		return hv.HypercallInvalid
	}
	cr3 := v.VMCS.Read(vmx.GuestCR3) & hv.CR3Mask
	m.gm.Walker.LA57 = v.VMCS.Read(vmx.GuestCR4)&(1<<12) != 0
	var b [hv.SwapRequestSize]byte
	tr, err := m.gm.Translate(cr3, req)
	if err != nil || !tr.Present || req&0xfff > 4096-hv.SwapRequestSize || m.gm.ReadPhys(tr.PA, b[:]) != nil {
		return hv.HypercallInvalid
	}
	va := binary.LittleEndian.Uint64(b[0:])
	n := binary.LittleEndian.Uint64(b[8:])
	raw := binary.LittleEndian.Uint64(b[16:])
	if raw>>32&^(hv.SwapVeto>>32) != 0 {
		return hv.HypercallInvalid
	}
	opts := swapmem.Options(raw)
	m.swap = swapRead{state: hv.SwapPending, cr3: cr3, start: time.Now(), exits: v.Total(), injected: m.eng.Stats().Injected}
	var preInject func(cr3, va uint64) bool
	if raw&hv.SwapVeto != 0 {
		preInject = func(uint64, uint64) bool { m.swap.vetoes++; return false }
	}
	copy(m.swap.want[:], b[24:])
	if n > swapmem.MaxLen {
		m.swap.state = hv.SwapFailed
		return hv.HypercallInvalid
	}
	tx, err := m.eng.ReadData(swapmem.Request{CR3: cr3, VA: va, Len: int(n), Options: opts, PreInject: preInject,
		Done: func(r swapmem.Read) { m.swapDone(v, r) }})
	if err != nil {
		fmt.Printf("tamahv: swapmem read FAILED: %v\n", err)
		m.swap.state = hv.SwapFailed
		return hv.HypercallInvalid
	}
	if tx != nil {
		m.swap.missing = m.eng.Stats().Pages
	}
	veto := ""
	if preInject != nil {
		veto = ", every injection vetoed"
	}
	fmt.Printf("tamahv: swapmem read of %d bytes at %#x in CR3 %#x (%v%s): %d pages missing\n", n, va, cr3, opts, veto, m.swap.missing)
	return 0
}

// gone drops the reads of an address space whose mappings were torn down
// (a process that exited).
func (m *monitor) gone(cr3 uint64) {
	before := m.eng.Stats().Live
	if err := m.eng.RemoveTransactionsForVaSpace(cr3); err != nil {
		return
	}
	if n := before - m.eng.Stats().Live; n > 0 {
		fmt.Printf("tamahv: swapmem: address space %#x torn down, %d reads removed\n", cr3, n)
		if m.swap.cr3 == cr3 && m.swap.state == hv.SwapPending {
			m.swap.state = 0
		}
	}
}

func (m *monitor) swapDone(v *hv.VCPU, r swapmem.Read) {
	took := time.Since(m.swap.start)
	inj := m.eng.Stats().Injected - m.swap.injected
	exits := v.Total() - m.swap.exits
	switch {
	case r.Err != nil:
		m.swap.state = hv.SwapFailed
		fmt.Printf("tamahv: swapmem read FAILED: %v\n", r.Err)
	case sha256.Sum256(r.Data) != m.swap.want:
		m.swap.state = hv.SwapFailed
		fmt.Printf("tamahv: swapmem read FAILED: sha256 %x, the guest expected %x\n", sha256.Sum256(r.Data), m.swap.want)
	default:
		m.swap.state = hv.SwapOK
		fmt.Printf("tamahv: swapmem read ok: sha256 %x, %d bytes, %d pages faulted in, %d #PFs injected, %d vetoed, %d exits, %v (flags %v)\n",
			m.swap.want, len(r.Data), m.swap.missing, inj, m.swap.vetoes, exits, took.Round(time.Millisecond), r.Flags)
	}
}

// modules finds the kernel and initramfs among the Multiboot modules: the
// kernel is the one whose name ends in "vmlinuz"; its arguments, if any,
// replace the default guest command line.
func modules(info *multiboot.Info) (kernel, initrd *multiboot.Module, cmdline string) {
	cmdline = guestCmdline
	for i := range info.Modules {
		m := &info.Modules[i]
		f := strings.Fields(m.Cmdline)
		switch {
		case len(f) > 0 && strings.HasSuffix(f[0], "vmlinuz"):
			kernel = m
			if len(f) > 1 {
				cmdline = strings.Join(f[1:], " ")
			}
		case initrd == nil:
			initrd = m
		}
	}
	return kernel, initrd, cmdline
}

func runGuest(caps *vmx.Caps, info *multiboot.Info, kernel, initrd *multiboot.Module, cmdline string) error {
	var e820 []hv.E820Entry
	for _, r := range info.MemoryMap {
		e820 = append(e820, hv.E820Entry{Addr: r.Base, Size: r.Length, Type: r.Type})
	}
	own := [2]uint64{pc.RAMStart, pc.RAMEnd}
	arena := pc.NewPageArena(1024)
	tables, err := ept.New(arena, ept.Options{Pages1G: caps.EPTVPID.Has(vmx.EPT1GPages), ExecuteOnly: caps.EPTVPID.Has(vmx.EPTExecuteOnly)})
	if err != nil {
		return err
	}
	sinkMem := make([]byte, 2*ept.Size2M)
	sink := (pc.PhysAddr(unsafe.Pointer(&sinkMem[0])) + ept.Size2M - 1) &^ (ept.Size2M - 1)
	if err := hv.MapGuest(tables, e820, own, sink); err != nil {
		return err
	}

	page := func() (uint64, *[4096]byte, error) {
		pa, err := arena.Alloc()
		if err != nil {
			return 0, nil, err
		}
		b, err := arena.Bytes(pa)
		return pa, b, err
	}
	vmcsPA, vmcs, err := page()
	if err != nil {
		return err
	}
	vmcs[0], vmcs[1], vmcs[2], vmcs[3] = byte(caps.Revision()), byte(caps.Revision()>>8), byte(caps.Revision()>>16), byte(caps.Revision()>>24)
	if err := vmx.VMCLEAR(vmcsPA); err != nil {
		return err
	}
	if err := vmx.VMPTRLD(vmcsPA); err != nil {
		return err
	}
	msrPA, msrBM, err := page()
	if err != nil {
		return err
	}
	hv.GuestMSRBitmap(msrBM)
	ioA, bmA, err := page()
	if err != nil {
		return err
	}
	ioB, bmB, err := page()
	if err != nil {
		return err
	}
	console := [2]uint16{pc.COM1, pc.COM1 + 7}
	hv.IOBitmaps(bmA, bmB, console)
	_, fxPage, err := page()
	if err != nil {
		return err
	}
	fx := (*vmx.FXArea)(fxPage[:512])
	fx[0], fx[1] = 0x7f, 0x03   // FCW: x87 exceptions masked
	fx[24], fx[25] = 0x80, 0x1f // MXCSR: SIMD exceptions masked
	secretPA, secret, err := page()
	if err != nil {
		return err
	}
	for i := range secret {
		secret[i] = hv.SecretByte
	}

	l := &hv.Linux{
		KernelPA: kernel.Start, KernelLen: kernel.End - kernel.Start,
		Cmdline: cmdline, Map: e820, Reserved: [][2]uint64{own},
	}
	if initrd != nil {
		l.InitrdPA, l.InitrdLen = initrd.Start, initrd.End-initrd.Start
	}
	start, err := l.Load(pc.PhysMem{})
	if err != nil {
		return err
	}

	pc.EnableXSAVE()
	h := pc.Host()
	v := hv.NewVCPU(&hv.HardwareVMCS{}, caps)
	v.CPUID = pc.Hardware{}.CPUID
	v.XSETBV = pc.XSETBV
	v.ReadMSR, v.WriteMSR = pc.Hardware{}.ReadMSR, pc.Hardware{}.WriteMSR
	if err := pc.SetNMIHandler(vmx.NMIHandler()); err != nil {
		return err
	}
	v.TakeNMI = vmx.TakeNMI
	v.Log = os.Stdout
	v.OwnPorts(console[0], console[1])
	var ramTop uint64
	for _, r := range e820 {
		if r.Type == hv.E820RAM && r.Addr+r.Size > ramTop {
			ramTop = r.Addr + r.Size
		}
	}
	eptp := tables.Pointer(false)
	invept := func() {
		if err := vmx.INVEPT(vmx.InveptSingle, eptp); err != nil {
			_ = vmx.INVEPT(vmx.InveptAll, 0)
		}
	}
	gm := &hv.GuestMemory{Walker: hv.Walker{Mem: pc.PhysMem{}, Limit: max(ramTop, 1<<32)}, Mem: pc.PhysMem{},
		EPT: tables, Invalidate: invept, Hole: own}
	gm.Install(v)
	agent := &hv.BreakpointAgent{Mem: pc.PhysMem{}, Walker: &gm.Walker, LSTAR: func() uint64 { return pc.Hardware{}.ReadMSR(msrLSTAR) }}
	if caps.EPTVPID.Has(vmx.EPTExecuteOnly) {
		// The split view hides the int3 from guest reads.
		shadow, _, err := page()
		if err != nil {
			return err
		}
		agent.EPT, agent.Shadow, agent.Invalidate = tables, shadow, invept
	}
	agent.Install(v)
	eng := swapmem.New(gm, swapmem.Config{})
	cpu := &hv.SwapCPU{V: v, Agent: agent}
	v.BeforeEntry = func(*hv.VCPU) { _ = eng.InjectPendingPF(cpu) }
	hz, _ := pc.TSCHzSource()
	v.PreemptionTicks = uint32(min(hz/100>>caps.PreemptionTimerShift(), 1<<31))
	mon := &monitor{secret: secretPA, gm: gm, eng: eng}
	v.OnTimer = func(v *hv.VCPU) {
		eng.ReinjectFailedPF()
		mon.watchdog(v)
	}
	gm.OnGone = mon.gone
	v.Hypercalls = mon
	v.Enter = func(v *hv.VCPU, launched bool) error { return vmx.Run(&v.Regs, fx, launched) }
	err = v.Init(hv.Setup{
		Host: hv.HostState{
			CR0: h.CR0, CR3: h.CR3, CR4: h.CR4, FSBase: h.FSBase, GSBase: h.GSBase,
			TRBase: h.TRBase, GDTRBase: h.GDTRBase, IDTRBase: h.IDTRBase, EFER: h.EFER, PAT: h.PAT,
			CS: h.CodeSel, SS: h.DataSel, DS: h.DataSel, ES: h.DataSel, TR: h.TSel,
		},
		EPTP: eptp, VPID: 1, Preemption: true, ExceptionBM: 1 << vmx.VectorBP,
		MSRBitmap: msrPA, IOBitmapA: ioA, IOBitmapB: ioB,
	}, start)
	if err != nil {
		return err
	}
	fmt.Printf("tamahv: guest started: Linux boot protocol %d.%d, kernel %d bytes, initrd %d bytes at %#x, command line %q\n",
		start.ProtocolVersion>>8, start.ProtocolVersion&0xff, l.KernelLen, l.InitrdLen, start.InitrdPA, cmdline)
	err = v.Run()
	if err != nil {
		fmt.Printf("tamahv: guest stopped: %v\n", err)
		v.Report(os.Stdout, true)
		return errors.New("guest failed")
	}
	fmt.Printf("tamahv: guest exited (status %d) after %d exits\n", mon.status, v.Total())
	v.Report(os.Stdout, false)
	st := eng.Stats()
	fmt.Printf("tamahv: swapmem %d #PFs injected, %d completed, %d failed, %d removed; page-table writes %d (accessed/dirty %d), translations changed %d, stale protections %d\n",
		st.Injected, st.Completed, st.Failed, st.Removed, gm.Writes, gm.ADWrites, gm.Changes, gm.Stale)
	if agent.Detour() != 0 {
		fmt.Printf("tamahv: breakpoint agent at %#x: %d hits, %d faults raised, %d passed in other address spaces, %d view switches\n",
			agent.Detour(), agent.Hits, agent.Raised, agent.Passed, agent.Switches)
	}
	return nil
}
