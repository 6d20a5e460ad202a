package hv

import (
	"fmt"

	"github.com/tamahv/tamahv/vmx"
)

// HostState is what a VM exit loads into the processor (SDM Vol. 3C,
// "Host-State Area"). HOST_RSP and HOST_RIP are written by vmx.Run.
type HostState struct {
	CR0, CR3, CR4                              uint64
	FSBase, GSBase, TRBase, GDTRBase, IDTRBase uint64
	EFER, PAT                                  uint64
	CS, SS, DS, ES, FS, GS, TR                 uint16
}

// Setup describes the VMCS of a vCPU.
type Setup struct {
	Host        HostState
	EPTP        uint64
	VPID        uint16
	MSRBitmap   uint64 // physical addresses of 4 KiB pages
	IOBitmapA   uint64
	IOBitmapB   uint64
	Preemption  bool // enable the VMX-preemption timer
	ExceptionBM uint32
}

// Init writes every VMCS field for a guest entering the 32-bit Linux boot
// protocol state s (protected mode, paging off: this needs unrestricted
// guest). Controls are adjusted to the capability MSRs.
func (v *VCPU) Init(c Setup, s *Start) error {
	caps := v.Caps
	if !caps.UnrestrictedGuest() || !caps.EPT() {
		return fmt.Errorf("hv: the processor lacks EPT or unrestricted guest (%s)", caps.Summary())
	}
	pinWant := uint32(0)
	if c.Preemption {
		pinWant |= vmx.PinPreemptionTimer
	}
	// NMIs that arrive while the guest runs exit and are re-injected
	// (handleException); virtual NMIs make NMI-window exiting usable and
	// let VM entry unblock physical NMIs (SDM Vol. 3C, "Pin-Based
	// VM-Execution Controls", "Changes to Instruction Behavior in VMX
	// Non-Root Operation").
	if caps.Pin.Can(vmx.PinNMIExiting | vmx.PinVirtualNMIs) {
		pinWant |= vmx.PinNMIExiting | vmx.PinVirtualNMIs
	}
	pin, err := caps.Pin.Adjust(pinWant)
	if err != nil {
		return fmt.Errorf("pin-based controls: %w", err)
	}
	procWant := uint32(vmx.ProcUseMSRBitmaps | vmx.ProcUseIOBitmaps | vmx.ProcActivateSecondary)
	if caps.Proc.Can(vmx.ProcTSCOffsetting) {
		// The guest's TSC writes move its offset, never tamahv's clock
		// (msr.go).
		procWant |= vmx.ProcTSCOffsetting
	}
	proc, err := caps.Proc.Adjust(procWant)
	if err != nil {
		return fmt.Errorf("processor-based controls: %w", err)
	}
	want2 := uint32(vmx.Proc2EnableEPT | vmx.Proc2Unrestricted)
	// XSAVES stays off: its supervisor state (IA32_XSS) is not switched
	// between host and guest. PCONFIG stays off: the guest does not
	// program memory-encryption keys. The CPUID handler hides every
	// feature whose control is off (vmx.Proc2Gates).
	for _, opt := range []uint32{vmx.Proc2EnableVPID, vmx.Proc2RDTSCP, vmx.Proc2INVPCID, vmx.Proc2UserWait} {
		if caps.Proc2.Can(opt) && (opt != vmx.Proc2EnableVPID || c.VPID != 0) {
			want2 |= opt
		}
	}
	proc2, err := caps.Proc2.Adjust(want2)
	if err != nil {
		return fmt.Errorf("secondary controls: %w", err)
	}
	// DR7 and IA32_DEBUGCTL: every VM exit clears them for tamahv; the
	// debug controls save the guest's at exit and load them at entry.
	exitWant := uint32(vmx.ExitHostAddrSpaceSize | vmx.ExitSaveEFER | vmx.ExitLoadEFER | vmx.ExitSavePAT | vmx.ExitLoadPAT | vmx.ExitSaveDebug)
	entryWant := uint32(vmx.EntryLoadEFER | vmx.EntryLoadPAT | vmx.EntryLoadDebug)
	// Performance counters stop in VMX root (host value 0) and run again
	// with the guest's enables at entry; the WRMSR handler keeps the
	// guest's value. Without the controls the PMU is hidden.
	if caps.Exit.Can(vmx.ExitLoadPerfGlobal) && caps.Entry.Can(vmx.EntryLoadPerf) {
		exitWant |= vmx.ExitLoadPerfGlobal
		entryWant |= vmx.EntryLoadPerf
	}
	// Intel PT is hidden from the guest; should it run anyway, it stops
	// at every exit.
	if caps.Exit.Can(vmx.ExitClearRTITCtl) {
		exitWant |= vmx.ExitClearRTITCtl
	}
	exit, err := caps.Exit.Adjust(exitWant)
	if err != nil {
		return fmt.Errorf("exit controls: %w", err)
	}
	entry, err := caps.Entry.Adjust(entryWant)
	if err != nil {
		return fmt.Errorf("entry controls: %w", err)
	}

	w := v.VMCS.Write
	w(vmx.PinControls, uint64(pin))
	w(vmx.ProcControls, uint64(proc))
	w(vmx.Proc2Controls, uint64(proc2))
	w(vmx.ExitControls, uint64(exit))
	w(vmx.EntryControls, uint64(entry))
	w(vmx.ExceptionBitmap, uint64(c.ExceptionBM))
	w(vmx.PFErrorCodeMask, 0)
	w(vmx.PFErrorCodeMatch, 0)
	w(vmx.CR3TargetCount, 0)
	w(vmx.ExitMSRStoreCount, 0)
	w(vmx.ExitMSRLoadCount, 0)
	w(vmx.EntryMSRLoadCount, 0)
	w(vmx.EntryInterruptInfo, 0)
	w(vmx.MSRBitmap, c.MSRBitmap)
	w(vmx.IOBitmapA, c.IOBitmapA)
	w(vmx.IOBitmapB, c.IOBitmapB)
	w(vmx.EPTPointer, c.EPTP)
	if proc2&vmx.Proc2EnableVPID != 0 {
		w(vmx.VPID, uint64(c.VPID))
	}
	w(vmx.TSCOffset, 0)
	v.tscAdjust = 0
	w(vmx.VMCSLinkPointer, ^uint64(0))

	// CR0 and CR4: the guest owns every bit but those VMX fixes, which
	// it sees through the read shadows.
	w(vmx.CR0GuestHostMask, (caps.CR0Fixed0&^(vmx.CR0PE|vmx.CR0PG))|(^caps.CR0Fixed1&0xffffffff))
	w(vmx.CR4GuestHostMask, caps.CR4Fixed0|(^caps.CR4Fixed1&0xffffffff))
	const cr0Boot = vmx.CR0PE | vmx.CR0ET
	v.writeGuestState(guestState{
		cr0: cr0Boot, rip: s.RIP,
		cs:   segment{sel: s.CodeSel, limit: 0xffffffff, access: vmx.AccessCode32},
		data: segment{sel: s.DataSel, limit: 0xffffffff, access: vmx.AccessData32},
		ldtr: segment{access: vmx.AccessUnusable},
		tr:   segment{limit: 0xff, access: vmx.AccessTSSBusy32},
		gdt:  [2]uint64{s.GDTBase, uint64(s.GDTLimit)},
	})
	v.Regs = vmx.GuestRegs{RSI: s.RSI}
	w(vmx.GuestDebugCtl, 0)
	w(vmx.GuestEFER, 0)
	w(vmx.GuestPAT, vmx.PATReset)
	if entry&vmx.EntryLoadPerf != 0 {
		w(vmx.GuestPerfGlobal, 0)
		w(vmx.HostPerfGlobal, 0)
	}
	w(vmx.GuestSysenterCS, 0)
	w(vmx.GuestSysenterESP, 0)
	w(vmx.GuestSysenterEIP, 0)

	h := c.Host
	w(vmx.HostCR0, h.CR0)
	w(vmx.HostCR3, h.CR3)
	w(vmx.HostCR4, h.CR4)
	w(vmx.HostCS, uint64(h.CS))
	w(vmx.HostSS, uint64(h.SS))
	w(vmx.HostDS, uint64(h.DS))
	w(vmx.HostES, uint64(h.ES))
	w(vmx.HostFS, uint64(h.FS))
	w(vmx.HostGS, uint64(h.GS))
	w(vmx.HostTR, uint64(h.TR))
	w(vmx.HostFSBase, h.FSBase)
	w(vmx.HostGSBase, h.GSBase)
	w(vmx.HostTRBase, h.TRBase)
	w(vmx.HostGDTRBase, h.GDTRBase)
	w(vmx.HostIDTRBase, h.IDTRBase)
	w(vmx.HostEFER, h.EFER)
	w(vmx.HostPAT, h.PAT)
	w(vmx.HostSysenterCS, 0)
	w(vmx.HostSysenterESP, 0)
	w(vmx.HostSysenterEIP, 0)
	return v.VMCS.Err()
}

// IOBitmaps fills the I/O bitmaps A (ports 0-0x7fff) and B so that the
// given port ranges exit and every other port passes through.
func IOBitmaps(a, b *[4096]byte, ranges ...[2]uint16) {
	*a, *b = [4096]byte{}, [4096]byte{}
	for _, r := range ranges {
		for p := uint32(r[0]); p <= uint32(r[1]); p++ {
			bm := a
			q := p
			if p >= 0x8000 {
				bm, q = b, p-0x8000
			}
			bm[q/8] |= 1 << (q % 8)
		}
	}
}

// Start is the guest state the 32-bit boot protocol wants: protected mode,
// paging off, flat __BOOT_CS and __BOOT_DS from a GDT at GDTBase, ESI
// pointing at the boot parameters, EIP at the kernel's 32-bit entry.
type Start struct {
	RIP, RSI         uint64
	GDTBase          uint64
	GDTLimit         uint16
	CodeSel, DataSel uint16
	InitrdPA         uint64
	InitrdLen        uint64
	// KernelPA is where the protected-mode kernel went: its preferred
	// address (pref_address), whose init_size bytes it decompresses into.
	KernelPA        uint64
	BootParams      uint64
	ProtocolVersion uint16
	E820            []E820Entry
}

// segment is a segment register's state in the guest.
type segment struct {
	sel                 uint16
	base, limit, access uint64
}

// guestState is what a vCPU's start (Init, INIT) writes alike: CR0 (the
// guest's view, and the value with the fixed bits), CR4 and CR3 clear,
// RIP, RSP clear, RFLAGS and DR7 as after reset, the segment registers
// (the data segments share one state), GDTR and IDTR, and no blocking,
// pending debug exception or event.
type guestState struct {
	cr0, rip           uint64
	cs, data, ldtr, tr segment
	gdt, idt           [2]uint64 // base, limit
}

// writeGuestState writes g into the VMCS.
func (v *VCPU) writeGuestState(g guestState) {
	w := v.VMCS.Write
	w(vmx.CR0ReadShadow, g.cr0)
	w(vmx.GuestCR0, v.Caps.FixCR0(g.cr0, true))
	w(vmx.CR4ReadShadow, 0)
	w(vmx.GuestCR4, v.Caps.FixCR4(0))
	w(vmx.GuestCR3, 0)
	w(vmx.GuestDR7, vmx.DR7Reset)
	w(vmx.GuestRSP, 0)
	w(vmx.GuestRIP, g.rip)
	w(vmx.GuestRFLAGS, vmx.RFLAGSFixed)
	seg := func(f [4]vmx.Field, s segment) {
		w(f[0], uint64(s.sel))
		w(f[1], s.base)
		w(f[2], s.limit)
		w(f[3], s.access)
	}
	seg([4]vmx.Field{vmx.GuestCS, vmx.GuestCSBase, vmx.GuestCSLimit, vmx.GuestCSAccess}, g.cs)
	for _, f := range [][4]vmx.Field{
		{vmx.GuestDS, vmx.GuestDSBase, vmx.GuestDSLimit, vmx.GuestDSAccess},
		{vmx.GuestES, vmx.GuestESBase, vmx.GuestESLimit, vmx.GuestESAccess},
		{vmx.GuestSS, vmx.GuestSSBase, vmx.GuestSSLimit, vmx.GuestSSAccess},
		{vmx.GuestFS, vmx.GuestFSBase, vmx.GuestFSLimit, vmx.GuestFSAccess},
		{vmx.GuestGS, vmx.GuestGSBase, vmx.GuestGSLimit, vmx.GuestGSAccess},
	} {
		seg(f, g.data)
	}
	seg([4]vmx.Field{vmx.GuestLDTR, vmx.GuestLDTRBase, vmx.GuestLDTRLimit, vmx.GuestLDTRAccess}, g.ldtr)
	seg([4]vmx.Field{vmx.GuestTR, vmx.GuestTRBase, vmx.GuestTRLimit, vmx.GuestTRAccess}, g.tr)
	w(vmx.GuestGDTRBase, g.gdt[0])
	w(vmx.GuestGDTRLimit, g.gdt[1])
	w(vmx.GuestIDTRBase, g.idt[0])
	w(vmx.GuestIDTRLimit, g.idt[1])
	w(vmx.GuestInterruptibility, 0)
	w(vmx.GuestPendingDebug, 0)
	w(vmx.GuestActivityState, vmx.ActivityActive)
}
