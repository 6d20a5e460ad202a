//go:build tamago

package main

import (
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
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/monitor"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// IA32_LSTAR, the guest kernel's SYSCALL entry.
const msrLSTAR = 0xc0000082

// The guest's serial console is COM2; tamahv keeps COM1.
const guestCmdline = "console=ttyS1,115200 earlyprintk=serial,ttyS1,115200 panic=-1 mitigations=off"

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
	if err := hv.MSRBitmap(msrBM, hv.GuestMSRFaults()...); err != nil {
		return err
	}
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
		secret[i] = hcall.SecretByte
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
	ring3, err := monitor.ParseCmdline(info.Cmdline)
	if err != nil {
		return err
	}
	mon := &monitor.Monitor{Ring3: ring3, Mem: gm, Engine: eng, SecretPA: secretPA, Log: os.Stdout,
		Paging: func(la57 bool) { gm.Walker.LA57 = la57 }}
	v.OnTimer = func(v *hv.VCPU) {
		eng.ReinjectFailedPF()
		if mon.Watchdog(os.Stdout, 10*time.Second) {
			fmt.Printf("tamahv: page-table writes %d (accessed/dirty %d), translations changed %d, %d pages watched\n",
				gm.Writes, gm.ADWrites, gm.Changes, gm.Watches())
			v.Report(os.Stdout, true)
		}
	}
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
	fmt.Printf("tamahv: hypercalls granted to CPL 3 beyond the default: %v\n", ring3)
	fmt.Printf("tamahv: guest started: Linux boot protocol %d.%d, kernel %d bytes, initrd %d bytes at %#x, command line %q\n",
		start.ProtocolVersion>>8, start.ProtocolVersion&0xff, l.KernelLen, l.InitrdLen, start.InitrdPA, cmdline)
	err = v.Run()
	if err != nil {
		fmt.Printf("tamahv: guest stopped: %v\n", err)
		v.Report(os.Stdout, true)
		return errors.New("guest failed")
	}
	fmt.Printf("tamahv: guest exited (status %d) after %d exits\n", mon.Status, v.Total())
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
