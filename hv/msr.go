package hv

import "github.com/tamahv/tamahv/vmx"

// The MSR policy. MSRs GuestMSRBitmap leaves out pass through: the guest
// reads and writes the processor's, and the VMCS switches those tamahv
// relies on (EFER, PAT, DEBUGCTL, FS/GS base, SYSENTER,
// IA32_PERF_GLOBAL_CTRL). Reads, writes or both of the others exit and get
// the answers below; README "MSR policy" has the table. A read exits only
// where tamahv answers it without touching the processor's MSR, or the MSR
// exists on every processor with VMX: an RDMSR of an absent MSR in VMX
// root would be tamahv's #GP.

// msrPolicy is the class of an intercepted MSR.
type msrPolicy uint8

const (
	msrPass      msrPolicy = iota // not intercepted
	msrFault                      // #GP both ways (absent for the guest)
	msrFeature                    // IA32_FEATURE_CONTROL: locked, VMX off
	msrTSC                        // reads offset, writes move the offset
	msrTSCAdj                     // virtual, emulated with the offset
	msrAPICBase                   // reads pass, writes checked: the base never moves
	msrIgnored                    // reads pass, writes dropped
	msrPerfGlob                   // IA32_PERF_GLOBAL_CTRL: kept in the VMCS
	msrSMMMon                     // IA32_SMM_MONITOR_CTL: reads 0, writes #GP
	msrX2APICICR                  // IA32_X2APIC_ICR: reads pass, writes checked IPIs
)

// exits reports whether reads and writes of a class exit.
func (p msrPolicy) exits() (read, write bool) {
	switch p {
	case msrPass:
		return false, false
	case msrAPICBase, msrIgnored, msrX2APICICR:
		return false, true
	}
	return true, true
}

// policy returns the class of msr.
func policy(msr uint32) msrPolicy {
	switch {
	case msr == vmx.MSRFeatureControl:
		return msrFeature
	case msr >= vmx.MSRVMXBasic && msr <= vmx.MSRVMFunc:
		return msrFault
	case msr == vmx.MSRTSC:
		return msrTSC
	case msr == vmx.MSRTSCAdjust:
		return msrTSCAdj
	case msr == vmx.MSRAPICBase:
		return msrAPICBase
	case msr >= vmx.MSRMTRRPhysBase0 && msr <= vmx.MSRMTRRPhysLast,
		msr == vmx.MSRMTRRFix64K, msr == vmx.MSRMTRRFix16K80000, msr == vmx.MSRMTRRFix16KA0000,
		msr >= vmx.MSRMTRRFix4KFirst && msr <= vmx.MSRMTRRFix4KLast, msr == vmx.MSRMTRRDefType:
		return msrIgnored
	case msr == vmx.MSRMiscEnable, msr == vmx.MSRBIOSUpdateTrigger,
		msr == vmx.MSRDebugInterface, msr == vmx.MSRTMEActivate:
		return msrIgnored
	case msr == vmx.MSRPerfGlobalCtrl:
		return msrPerfGlob
	case msr == vmx.MSRSMMMonitorCtl:
		return msrSMMMon
	case msr == vmx.MSRX2APICICR:
		return msrX2APICICR
	case msr == vmx.MSRPEBSEnable, msr == vmx.MSRDSArea,
		msr == vmx.MSRRTITOutputBase, msr == vmx.MSRRTITOutputMask,
		msr >= vmx.MSRRTITCtl && msr <= vmx.MSRRTITCR3Match,
		msr >= vmx.MSRRTITAddr0A && msr <= vmx.MSRRTITAddr3B:
		return msrFault
	}
	return msrPass
}

// GuestMSRBitmap fills an MSR bitmap (SDM Vol. 3C, "VM-Execution
// Controls", MSR-Bitmap Address) with the policy: the reads and writes
// that exit. Every MSR the policy names lies below 0x2000; MSRs outside
// the bitmap's ranges always exit and raise #GP.
func GuestMSRBitmap(b *[4096]byte) {
	*b = [4096]byte{}
	for m := uint32(0); m <= vmx.MSRBitmapLowEnd; m++ {
		r, w := policy(m).exits()
		if r {
			b[m/8] |= 1 << (m % 8)
		}
		if w {
			b[2048+m/8] |= 1 << (m % 8)
		}
	}
}

// PassX2APICICRWrites lets the guest's writes to IA32_X2APIC_ICR pass in
// a bitmap GuestMSRBitmap filled: its x2APIC IPIs then go out as written,
// with no exit, as its xAPIC IPIs do where the local APIC's page is
// passed through. It is for machines where INIT and start-up IPIs reach
// the guest's processors as VM exits (hv/machine's apic.trapinit): no
// start-up IPI then starts a processor tamahv does not run.
func PassX2APICICRWrites(b *[4096]byte) {
	const m = vmx.MSRX2APICICR
	b[2048+m/8] &^= 1 << (m % 8)
}

// rdmsr answers RDMSR of an intercepted MSR; ok false means #GP.
func (v *VCPU) rdmsr(msr uint32) (val uint64, ok bool) {
	switch policy(msr) {
	case msrFeature:
		return FeatureControlGuest, true
	case msrTSC:
		// The TSC exists on every processor with VMX.
		if v.ReadMSR != nil {
			return v.ReadMSR(msr) + v.VMCS.Read(vmx.TSCOffset), true
		}
	case msrTSCAdj:
		if v.hasFeature(vmx.CPUIDTSCAdj) {
			return v.tscAdjust, true
		}
	case msrPerfGlob:
		if v.perfGlobalMask() != 0 {
			return v.VMCS.Read(vmx.GuestPerfGlobal), true
		}
	case msrSMMMon:
		return 0, true
	}
	return 0, false
}

// wrmsr carries out WRMSR of an intercepted MSR; false means #GP.
func (v *VCPU) wrmsr(msr uint32, val uint64) bool {
	switch policy(msr) {
	case msrTSC:
		// The guest's TSC is the processor's plus the offset; tamahv's
		// clock (the processor's TSC) never moves. Writing the TSC moves
		// TSC_ADJUST by the same amount (SDM Vol. 3B, "Time-Stamp Counter
		// Adjustment").
		if v.ReadMSR == nil || v.VMCS.Read(vmx.ProcControls)&vmx.ProcTSCOffsetting == 0 {
			return false
		}
		host := v.ReadMSR(vmx.MSRTSC)
		off := v.VMCS.Read(vmx.TSCOffset)
		v.tscAdjust += val - (host + off)
		v.VMCS.Write(vmx.TSCOffset, val-host)
		return true
	case msrTSCAdj:
		if !v.hasFeature(vmx.CPUIDTSCAdj) || v.VMCS.Read(vmx.ProcControls)&vmx.ProcTSCOffsetting == 0 {
			return false
		}
		v.VMCS.Write(vmx.TSCOffset, v.VMCS.Read(vmx.TSCOffset)+val-v.tscAdjust)
		v.tscAdjust = val
		return true
	case msrAPICBase:
		return v.writeAPICBase(val)
	case msrX2APICICR:
		return v.writeX2APICICR(val)
	case msrIgnored:
		// MTRRs: with EPT the guest's memory types come from EPT and
		// the guest's PAT, so its MTRRs would only change tamahv's.
		// IA32_MISC_ENABLE: XD, CPUID limits, fast strings and MONITOR
		// stay as tamahv has them. Microcode is never loaded. Silicon
		// debug (DCI) is not opened and memory encryption not activated
		// under tamahv.
		return true
	case msrPerfGlob:
		m := v.perfGlobalMask()
		if m == 0 || val&^m != 0 {
			return false
		}
		v.VMCS.Write(vmx.GuestPerfGlobal, val)
		return true
	}
	return false
}

// writeAPICBase accepts what the processor would, but never moves the
// APIC window: tamahv's own accesses to physical memory go through it
// too. Enabling, disabling and x2APIC mode are the guest's (SDM Vol. 3A,
// "x2APIC State Transitions").
func (v *VCPU) writeAPICBase(val uint64) bool {
	if v.ReadMSR == nil || v.WriteMSR == nil {
		return false
	}
	cur := v.ReadMSR(vmx.MSRAPICBase)
	reserved := ^uint64(vmx.APICBaseBSP | vmx.APICBaseEnable | vmx.APICBaseAddr)
	if v.hasFeature(vmx.CPUIDX2APIC) {
		reserved &^= vmx.APICBaseX2APIC
	}
	if val&reserved != 0 || (val^cur)&vmx.APICBaseAddr != 0 {
		return false
	}
	mode := func(b uint64) uint64 { return b & (vmx.APICBaseEnable | vmx.APICBaseX2APIC) }
	const xAPIC, x2APIC = vmx.APICBaseEnable, vmx.APICBaseEnable | vmx.APICBaseX2APIC
	switch o, n := mode(cur), mode(val); {
	case n == vmx.APICBaseX2APIC, // x2APIC without the APIC
		o == x2APIC && n == xAPIC,
		o == 0 && n == x2APIC:
		return false
	}
	v.WriteMSR(vmx.MSRAPICBase, val&^vmx.APICBaseBSP|cur&vmx.APICBaseBSP)
	return true
}

// X2APICICRWritable reports whether WRMSR may write val to the x2APIC's
// interrupt command register on v's processor: its local APIC is in
// x2APIC mode and no reserved bit is set. Otherwise the processor raises
// #GP (SDM Vol. 3A, "x2APIC Register Availability", "Reserved Bit
// Checking"), which tamahv's own WRMSR must not.
func (v *VCPU) X2APICICRWritable(val uint64) bool {
	if v.ReadMSR == nil || v.WriteMSR == nil {
		return false
	}
	const x2APIC = vmx.APICBaseEnable | vmx.APICBaseX2APIC
	return v.ReadMSR(vmx.MSRAPICBase)&x2APIC == x2APIC && val&vmx.X2APICICRReserved == 0
}

// writeX2APICICR sends the interrupt command of a vCPU that has no
// APICWrites in front of it: the guest's only vCPU, where its writes to
// the register exit (PassX2APICICRWrites was not applied). An INIT or
// start-up IPI reaches that vCPU's processor only: one to its own x2APIC
// ID is sent as written, a broadcast or shorthand is sent to it alone,
// one to any other destination is dropped (IPITargets with the vCPU as
// the only one). Other IPIs go out as written.
func (v *VCPU) writeX2APICICR(val uint64) bool {
	if !v.X2APICICRWritable(val) {
		return false
	}
	low, dest := uint32(val)&^vmx.ICRPending, uint32(val>>32)
	if m := low & vmx.ICRDeliveryMode; m == vmx.ICRDeliveryINIT || m == vmx.ICRDeliveryStart {
		self := uint32(v.ReadMSR(vmx.MSRX2APICID))
		targets, exact := IPITargets(low, dest, true, 0, []uint32{self})
		switch {
		case targets == 0, m == vmx.ICRDeliveryINIT && low&vmx.ICRLevelTriggered != 0 && low&vmx.ICRLevelAssert == 0:
			return true // dropped
		case !exact:
			low, dest = low&^(vmx.ICRShorthand|vmx.ICRLogical), self
		}
	}
	v.WriteMSR(vmx.MSRX2APICICR, uint64(dest)<<32|uint64(low))
	return true
}

// perfGlobalMask returns the IA32_PERF_GLOBAL_CTRL bits the processor
// has (SDM Vol. 3B, "Architectural Performance Monitoring Version 2" and
// later), or 0 when the guest has no such MSR or the VMCS does not switch
// it.
func (v *VCPU) perfGlobalMask() uint64 {
	if v.CPUID == nil || v.VMCS.Read(vmx.EntryControls)&vmx.EntryLoadPerf == 0 {
		return 0
	}
	a, _, c, d := v.CPUID(vmx.CPUIDLeafPMU, 0)
	version, gp := a&0xff, a>>8&0xff
	if version < 2 {
		return 0
	}
	m := uint64(1)<<min(gp, 32) - 1
	fixed := uint64(1)<<min(d&0x1f, 16) - 1
	if version >= 5 {
		fixed |= uint64(c & 0xffff) // fixed counters as a bitmap
	}
	m |= fixed << 32
	if v.hasFeature(vmx.CPUIDPDCM) && v.ReadMSR != nil && v.ReadMSR(vmx.MSRPerfCapabilities)&vmx.PerfCapPerfMetrics != 0 {
		m |= vmx.PerfGlobalMetrics
	}
	return m
}

// IPITargets returns the vCPUs an interrupt command reaches, as a bit
// mask over apicIDs (vCPU i has APIC ID apicIDs[i]; at most 64), from the
// ICR's low half and its destination (xAPIC: ICR bits 63:56; x2APIC: bits
// 63:32); self is the sender's index. exact reports that the command, as
// written, reaches those vCPUs and no other processor: a physical
// destination that is a vCPU's APIC ID, or the self shorthand.
// Broadcasts and the other shorthands reach every vCPU (but the sender,
// for all-excluding-self); an x2APIC logical destination the vCPUs whose
// logical IDs (derived from their x2APIC IDs) it names; an xAPIC logical
// destination, other than the broadcast, every vCPU but the sender
// (tamahv does not follow the logical IDs the guest programs).
func IPITargets(low, dest uint32, x2APIC bool, self int, apicIDs []uint32) (targets uint64, exact bool) {
	all := uint64(1)<<len(apicIDs) - 1
	switch low & vmx.ICRShorthand {
	case vmx.ICRSelf:
		return 1 << self, true
	case vmx.ICRAllIncSelf:
		return all, false
	case vmx.ICRAllExclSelf:
		return all &^ (1 << self), false
	}
	broadcast := uint32(vmx.APICBroadcast)
	if x2APIC {
		broadcast = vmx.X2APICBroadcast
	}
	switch {
	case dest == broadcast:
		return all, false
	case low&vmx.ICRLogical == 0:
		for i, id := range apicIDs {
			if id == dest {
				targets |= 1 << i
			}
		}
		return targets, targets != 0
	case x2APIC:
		for i, id := range apicIDs {
			if l := vmx.X2APICLogicalID(id); l>>16 == dest>>16 && l&dest&0xffff != 0 {
				targets |= 1 << i
			}
		}
		return targets, false
	}
	return all &^ (1 << self), false
}
