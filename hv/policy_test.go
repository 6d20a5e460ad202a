package hv

import (
	"math/bits"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/vmx"
)

// hostCPUID is a processor with every feature the policy looks at: a
// version 4 PMU (8 counters, 3 fixed), the debug store, x2APIC, PDCM,
// TSC_ADJUST, SGX, INVPCID, Intel PT, WAITPKG, RDPID, PCONFIG, XSAVES and
// RDTSCP.
func hostCPUID(leaf, sub uint32) (a, b, c, d uint32) {
	switch {
	case leaf == 1:
		return 0x50654, 0, 0x77faf3bf | 1<<21 | 1<<15 | 1<<2 | 1<<4, 0xbfebfbff | 1<<21
	case leaf == 7 && sub == 0:
		return 0, 1<<1 | 1<<2 | 1<<10 | 1<<25, 1<<5 | 1<<22 | 1<<30, 1 << 18
	case leaf == 0xa:
		return 0x07300804, 0, 0, 0x603
	case leaf == 0xd && sub == 0:
		return 7, 0, 0, 0
	case leaf == 0xd && sub == 1:
		return 0xf, 0, 0, 0
	case leaf == 0x12, leaf == 0x14:
		return 1, 1, 1, 1
	case leaf == 0x80000001:
		return 0, 0, 0, 1 << 27
	case leaf == vmx.CPUIDLeafTSC: // Bochs's Skylake: no crystal, ratio 292/2
		return 2, 292, 0, 0
	case leaf == vmx.CPUIDLeafFrequency: // 3.5 GHz base, 3.5 GHz max, 100 MHz bus
		return 3500, 3500, 100, 0
	}
	return 0, 0, 0, 0
}

// fakeMSRs is the processor's MSRs for the handlers.
type fakeMSRs struct {
	m      map[uint32]uint64
	writes []uint32
}

func (f *fakeMSRs) read(msr uint32) uint64 { return f.m[msr] }
func (f *fakeMSRs) write(msr uint32, v uint64) {
	f.m[msr] = v
	f.writes = append(f.writes, msr)
}

// policyVCPU is a vCPU after Init on caps, with hostCPUID and fake MSRs.
func policyVCPU(t *testing.T, caps *vmx.Caps) (*VCPU, *fakeMSRs) {
	v := NewVCPU(newFakeVMCS(), caps)
	require.NoError(t, v.Init(Setup{EPTP: 0x1e, VPID: 1}, &Start{CodeSel: 0x10, DataSel: 0x18}))
	fv(v).Fields[vmx.ExitInstructionLen] = 2
	msrs := &fakeMSRs{m: map[uint32]uint64{
		vmx.MSRTSC: 1_000_000, vmx.MSRAPICBase: 0xfee00000 | vmx.APICBaseEnable | vmx.APICBaseBSP,
		vmx.MSRMiscEnable: 1<<0 | 1<<22 | 1<<34, 0x200: 0x6, vmx.MSRPerfCapabilities: 0,
	}}
	v.CPUID, v.ReadMSR, v.WriteMSR = hostCPUID, msrs.read, msrs.write
	return v, msrs
}

// cpuidOf runs the guest's CPUID through the handler.
func cpuidOf(t *testing.T, v *VCPU, leaf, sub uint32) [4]uint32 {
	v.Regs.RAX, v.Regs.RCX = uint64(leaf), uint64(sub)
	act, err := handleCPUID(v, &vmx.Exit{})
	require.NoError(t, err)
	require.Equal(t, Next, act)
	return [4]uint32{uint32(v.Regs.RAX), uint32(v.Regs.RBX), uint32(v.Regs.RCX), uint32(v.Regs.RDX)}
}

// Finding 20: the guest's DR7 and IA32_DEBUGCTL survive exits.
func TestDebugControlsAreSwitched(t *testing.T) {
	v, _ := policyVCPU(t, skylake())
	f := fv(v).Fields
	assert.NotZero(t, f[vmx.ExitControls]&vmx.ExitSaveDebug, "save debug controls")
	assert.NotZero(t, f[vmx.EntryControls]&vmx.EntryLoadDebug, "load debug controls")
	assert.Equal(t, uint64(0x400), f[vmx.GuestDR7], "DR7 at reset")
	assert.Zero(t, f[vmx.GuestDebugCtl], "IA32_DEBUGCTL at reset")
}

// Finding 22: every feature the guest sees has its control set, and every
// feature whose control is off is hidden.
func TestCPUIDMatchesSecondaryControls(t *testing.T) {
	for _, g := range vmx.Proc2Gates() {
		for _, allowed := range []bool{true, false} {
			caps := skylake()
			caps.Proc2.One |= vmx.Proc2UserWait | vmx.Proc2PCONFIG | vmx.Proc2XSAVES
			if !allowed {
				caps.Proc2.One &^= g.Control
			}
			v, _ := policyVCPU(t, caps)
			on := fv(v).Fields[vmx.Proc2Controls]&uint64(g.Control) != 0
			r := cpuidOf(t, v, g.Feature.Leaf, g.Feature.Subleaf)
			shown := r[g.Feature.Reg]&g.Feature.Mask() != 0
			assert.Equal(t, on, shown, "%s: control %#x on %v, feature shown %v", g.Feature.Name, g.Control, on, shown)
			if !allowed {
				assert.False(t, shown, "%s without its control", g.Feature.Name)
			}
		}
	}
	// WAITPKG: the control is set where the processor has it, so TPAUSE
	// works (Linux's udelay uses it).
	caps := skylake()
	caps.Proc2.One |= vmx.Proc2UserWait
	v, _ := policyVCPU(t, caps)
	assert.NotZero(t, fv(v).Fields[vmx.Proc2Controls]&vmx.Proc2UserWait)
	assert.NotZero(t, cpuidOf(t, v, 7, 0)[vmx.ECX]&vmx.CPUIDWAITPKG.Mask())
	// Bochs's Skylake has no such control: WAITPKG is hidden.
	v, _ = policyVCPU(t, skylake())
	assert.Zero(t, cpuidOf(t, v, 7, 0)[vmx.ECX]&vmx.CPUIDWAITPKG.Mask())
	// PCONFIG is never offered.
	assert.Zero(t, fv(v).Fields[vmx.Proc2Controls]&vmx.Proc2PCONFIG)
}

// Features tamahv never offers are hidden: the debug store, SGX, Intel PT.
func TestCPUIDHidesTracingAndSGX(t *testing.T) {
	v, _ := policyVCPU(t, skylake())
	l1 := cpuidOf(t, v, 1, 0)
	assert.Zero(t, l1[vmx.EDX]&vmx.CPUIDDS.Mask())
	assert.Zero(t, l1[vmx.ECX]&(vmx.CPUIDDTES64.Mask()|vmx.CPUIDDSCPL.Mask()))
	assert.NotZero(t, l1[vmx.ECX]&vmx.CPUIDX2APIC.Mask(), "x2APIC stays")
	l7 := cpuidOf(t, v, 7, 0)
	assert.Zero(t, l7[vmx.EBX]&(vmx.CPUIDSGX.Mask()|vmx.CPUIDPT.Mask()))
	assert.Zero(t, l7[vmx.ECX]&vmx.CPUIDSGXLC.Mask())
	assert.NotZero(t, l7[vmx.EBX]&vmx.CPUIDTSCAdj.Mask(), "TSC_ADJUST stays (emulated)")
	assert.Equal(t, [4]uint32{}, cpuidOf(t, v, 0x14, 0))
	assert.Equal(t, [4]uint32{}, cpuidOf(t, v, 0x12, 0))
	assert.Equal(t, uint32(0x07300804), cpuidOf(t, v, 0xa, 0)[vmx.EAX], "PMU shown: counters stop at exit")

	noPerf := skylake()
	noPerf.Exit.One &^= vmx.ExitLoadPerfGlobal
	v, _ = policyVCPU(t, noPerf)
	assert.Equal(t, [4]uint32{}, cpuidOf(t, v, 0xa, 0), "PMU hidden: counters would run in VMX root")
	_, ok := v.rdmsr(vmx.MSRPerfGlobalCtrl)
	assert.False(t, ok)
}

// Finding 13: TSC writes move the guest's offset, never the processor's
// TSC (tamahv's clock).
func TestTSCWritesMoveOnlyTheOffset(t *testing.T) {
	v, msrs := policyVCPU(t, skylake())
	f := fv(v).Fields
	require.NotZero(t, f[vmx.ProcControls]&vmx.ProcTSCOffsetting)
	require.True(t, v.wrmsr(vmx.MSRTSC, 5_000_000))
	assert.Equal(t, uint64(4_000_000), f[vmx.TSCOffset])
	adj, ok := v.rdmsr(vmx.MSRTSCAdjust)
	require.True(t, ok)
	assert.Equal(t, uint64(4_000_000), adj, "TSC_ADJUST follows a TSC write")

	msrs.m[vmx.MSRTSC] = 1_000_100
	tsc, ok := v.rdmsr(vmx.MSRTSC)
	require.True(t, ok)
	assert.Equal(t, uint64(5_000_100), tsc)

	// Backwards, as Linux's TSC sync may: TSC_ADJUST 0 undoes it.
	require.True(t, v.wrmsr(vmx.MSRTSCAdjust, 0))
	assert.Zero(t, f[vmx.TSCOffset])
	require.True(t, v.wrmsr(vmx.MSRTSCAdjust, ^uint64(999)))
	assert.Equal(t, ^uint64(999), f[vmx.TSCOffset], "1000 cycles back")
	assert.Empty(t, msrs.writes, "the processor's TSC and TSC_ADJUST are never written")
	assert.Equal(t, uint64(1_000_100), msrs.m[vmx.MSRTSC])

	var b [4096]byte
	GuestMSRBitmap(&b)
	for _, m := range []uint32{vmx.MSRTSC, vmx.MSRTSCAdjust} {
		assert.NotZero(t, b[2048+m/8]&(1<<(m%8)), "%#x writes exit", m)
	}
}

// The exit path: WRMSR TSC through the handler advances RIP; the value
// comes from EDX:EAX.
func TestWRMSRThroughTheHandler(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitWRMSR, regs: func(r *vmx.GuestRegs) { r.RCX, r.RDX, r.RAX = vmx.MSRTSC, 0x1, 0xffff_ffff_0000_0010 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(1<<32|0x10-100), fv(v).Fields[vmx.TSCOffset])
				assert.Zero(t, fv(v).Fields[vmx.EntryInterruptInfo], "no #GP")
			}},
		{reason: vmx.ExitRDMSR, regs: func(r *vmx.GuestRegs) { r.RCX = vmx.MSRTSC },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x10), v.Regs.RAX)
				assert.Equal(t, uint64(1), v.Regs.RDX)
			}},
	})
	v.ReadMSR = func(uint32) uint64 { return 100 }
	rip := fv(v).Fields[vmx.GuestRIP]
	require.NoError(t, v.Run())
	assert.Equal(t, rip+3*3, fv(v).Fields[vmx.GuestRIP])
}

func TestAPICBaseNeverMoves(t *testing.T) {
	v, msrs := policyVCPU(t, skylake())
	const base = 0xfee00000
	assert.False(t, v.wrmsr(vmx.MSRAPICBase, 0x10001000|vmx.APICBaseEnable), "over tamahv's region")
	assert.False(t, v.wrmsr(vmx.MSRAPICBase, base|vmx.APICBaseEnable|1<<9), "reserved bit")
	assert.False(t, v.wrmsr(vmx.MSRAPICBase, base|vmx.APICBaseX2APIC), "x2APIC without enable")
	assert.Empty(t, msrs.writes)

	require.True(t, v.wrmsr(vmx.MSRAPICBase, base|vmx.APICBaseEnable|vmx.APICBaseX2APIC), "xAPIC to x2APIC")
	assert.Equal(t, uint64(base|vmx.APICBaseEnable|vmx.APICBaseX2APIC|vmx.APICBaseBSP), msrs.m[vmx.MSRAPICBase], "BSP kept")
	assert.False(t, v.wrmsr(vmx.MSRAPICBase, base|vmx.APICBaseEnable), "x2APIC to xAPIC")
	require.True(t, v.wrmsr(vmx.MSRAPICBase, base), "disable")
	assert.False(t, v.wrmsr(vmx.MSRAPICBase, base|vmx.APICBaseEnable|vmx.APICBaseX2APIC), "disabled to x2APIC")
	require.True(t, v.wrmsr(vmx.MSRAPICBase, base|vmx.APICBaseEnable), "enable again")
	assert.Equal(t, uint64(base|vmx.APICBaseEnable|vmx.APICBaseBSP), msrs.m[vmx.MSRAPICBase])
}

// MTRRs, IA32_MISC_ENABLE and microcode updates never reach the processor;
// the debug store, PEBS and Intel PT are absent.
func TestHostStateMSRs(t *testing.T) {
	v, msrs := policyVCPU(t, skylake())
	for _, m := range []uint32{0x200, 0x20f, vmx.MSRMTRRFix64K, vmx.MSRMTRRFix4KLast, vmx.MSRMTRRDefType,
		vmx.MSRMiscEnable, vmx.MSRBIOSUpdateTrigger, vmx.MSRDebugInterface, vmx.MSRTMEActivate} {
		assert.True(t, v.wrmsr(m, 0x1234), "%#x write accepted", m)
	}
	assert.Empty(t, msrs.writes, "nothing written")

	for _, m := range []uint32{vmx.MSRDSArea, vmx.MSRPEBSEnable, vmx.MSRRTITCtl, vmx.MSRRTITOutputBase,
		vmx.MSRRTITOutputMask, vmx.MSRRTITStatus, vmx.MSRRTITAddr3B, vmx.MSRSMMMonitorCtl} {
		assert.False(t, v.wrmsr(m, 0), "%#x write #GP", m)
	}
	for _, m := range []uint32{vmx.MSRDSArea, vmx.MSRPEBSEnable, vmx.MSRRTITCtl, vmx.MSRBIOSUpdateTrigger} {
		_, ok := v.rdmsr(m)
		assert.False(t, ok, "%#x read #GP", m)
	}
	smm, ok := v.rdmsr(vmx.MSRSMMMonitorCtl)
	assert.True(t, ok)
	assert.Zero(t, smm, "no dual-monitor treatment")

	var b [4096]byte
	GuestMSRBitmap(&b)
	for _, m := range []uint32{vmx.MSRTSC, vmx.MSRTSCAdjust, vmx.MSRSMMMonitorCtl, vmx.MSRPerfGlobalCtrl,
		vmx.MSRPEBSEnable, vmx.MSRDSArea, vmx.MSRRTITCtl, vmx.MSRRTITAddr0A} {
		assert.NotZero(t, b[m/8]&(1<<(m%8)), "%#x reads exit", m)
		assert.NotZero(t, b[2048+m/8]&(1<<(m%8)), "%#x writes exit", m)
	}
	// Reads of these would touch MSRs a processor may lack (an RDMSR in
	// VMX root that faults is tamahv's end): only their writes exit.
	for _, m := range []uint32{vmx.MSRAPICBase, 0x200, 0x21f, vmx.MSRMTRRFix16KA0000, vmx.MSRMTRRDefType,
		vmx.MSRMiscEnable, vmx.MSRBIOSUpdateTrigger, vmx.MSRDebugInterface, vmx.MSRTMEActivate} {
		assert.Zero(t, b[m/8]&(1<<(m%8)), "%#x reads pass", m)
		assert.NotZero(t, b[2048+m/8]&(1<<(m%8)), "%#x writes exit", m)
	}
	for _, m := range []uint32{0xfe, 0x277, 0x186, 0x1d9} {
		assert.Zero(t, b[2048+m/8]&(1<<(m%8)), "%#x passes through", m)
	}
}

// Counters stop in VMX root: the exit loads 0 into IA32_PERF_GLOBAL_CTRL,
// the guest's value lives in the VMCS and only bits the PMU has are taken
// (a reserved bit would fail VM entry).
func TestPerfGlobalCtrlIsSwitched(t *testing.T) {
	v, msrs := policyVCPU(t, skylake())
	f := fv(v).Fields
	assert.NotZero(t, f[vmx.ExitControls]&vmx.ExitLoadPerfGlobal)
	assert.NotZero(t, f[vmx.EntryControls]&vmx.EntryLoadPerf)
	assert.Zero(t, f[vmx.HostPerfGlobal])
	require.True(t, v.wrmsr(vmx.MSRPerfGlobalCtrl, 0x7_0000_00ff))
	assert.Equal(t, uint64(0x7_0000_00ff), f[vmx.GuestPerfGlobal])
	got, ok := v.rdmsr(vmx.MSRPerfGlobalCtrl)
	require.True(t, ok)
	assert.Equal(t, uint64(0x7_0000_00ff), got)
	assert.False(t, v.wrmsr(vmx.MSRPerfGlobalCtrl, 1<<8), "no ninth counter")
	assert.False(t, v.wrmsr(vmx.MSRPerfGlobalCtrl, vmx.PerfGlobalMetrics), "no perf metrics")
	msrs.m[vmx.MSRPerfCapabilities] = vmx.PerfCapPerfMetrics
	assert.True(t, v.wrmsr(vmx.MSRPerfGlobalCtrl, vmx.PerfGlobalMetrics))
	assert.Empty(t, msrs.writes)

	assert.Zero(t, f[vmx.ExitControls]&vmx.ExitClearRTITCtl, "Bochs's Skylake has no such control")
	caps := skylake()
	caps.Exit.One |= vmx.ExitClearRTITCtl
	v, _ = policyVCPU(t, caps)
	assert.NotZero(t, fv(v).Fields[vmx.ExitControls]&vmx.ExitClearRTITCtl, "Intel PT stops at exit")
}

// The TSC frequency CPUID's leaves give, as Linux reads them.
func TestLeafTSCHz(t *testing.T) {
	for _, c := range []struct {
		name     string
		l15, l16 [4]uint32
		want     uint64
	}{
		{"crystal enumerated", [4]uint32{2, 176, 24_000_000}, [4]uint32{2000}, 2_112_000_000},
		{"no crystal: base frequency", [4]uint32{2, 292}, [4]uint32{3500}, 3_500_000_000},
		{"no ratio", [4]uint32{0, 0, 24_000_000}, [4]uint32{3500}, 0},
		{"nothing", [4]uint32{}, [4]uint32{}, 0},
	} {
		assert.Equal(t, c.want, LeafTSCHz(c.l15, c.l16), c.name)
	}
}

// Leaves 0x15 and 0x16 read as zeros where they disagree with the TSC
// tamahv measured (Bochs: 3.5 GHz in CPUID, 200 MHz counted), so that the
// guest calibrates its TSC; they pass where they agree or nothing was
// measured.
func TestCPUIDTSCLeavesFollowTheMeasuredTSC(t *testing.T) {
	for _, c := range []struct {
		hz     uint64
		hidden bool
	}{
		{200_000_000, true},
		{3_400_000_000, false}, // within 5%
		{3_600_000_000, false},
		{3_000_000_000, true},
		{0, false},
	} {
		v, _ := policyVCPU(t, skylake())
		v.TSCHz = c.hz
		l15, l16 := cpuidOf(t, v, vmx.CPUIDLeafTSC, 0), cpuidOf(t, v, vmx.CPUIDLeafFrequency, 0)
		if c.hidden {
			assert.Equal(t, [4]uint32{}, l15, "%d Hz", c.hz)
			assert.Equal(t, [4]uint32{}, l16, "%d Hz", c.hz)
		} else {
			assert.Equal(t, [4]uint32{2, 292, 0, 0}, l15, "%d Hz", c.hz)
			assert.Equal(t, [4]uint32{3500, 3500, 100, 0}, l16, "%d Hz", c.hz)
		}
	}
}

// x2APICExits returns the x2APIC MSRs (0x800-0x8ff) whose reads and whose
// writes exit in b.
func x2APICExits(b *[4096]byte) (reads, writes []uint32) {
	for m := uint32(0x800); m <= 0x8ff; m++ {
		if b[m/8]&(1<<(m%8)) != 0 {
			reads = append(reads, m)
		}
		if b[2048+m/8]&(1<<(m%8)) != 0 {
			writes = append(writes, m)
		}
	}
	return reads, writes
}

// Among the x2APIC's MSRs only writes to the interrupt command register
// exit (EOIs, the TPR, the timer pass); PassX2APICICRWrites passes those
// too and nothing else.
func TestX2APICOnlyICRWritesExit(t *testing.T) {
	var b [4096]byte
	GuestMSRBitmap(&b)
	reads, writes := x2APICExits(&b)
	assert.Empty(t, reads)
	assert.Equal(t, []uint32{vmx.MSRX2APICICR}, writes)

	before := b
	PassX2APICICRWrites(&b)
	reads, writes = x2APICExits(&b)
	assert.Empty(t, reads)
	assert.Empty(t, writes)
	changed := 0
	for i := range b {
		changed += bits.OnesCount8(b[i] ^ before[i])
	}
	assert.Equal(t, 1, changed, "every other MSR as it was")
}
