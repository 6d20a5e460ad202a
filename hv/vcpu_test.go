package hv

import (
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/vmx"
)

// fakeVMCS is a VMCS in a map; reading a field never written fails, as a
// VMREAD of an unsupported field would.
type fakeVMCS = hvtest.VMCS

func newFakeVMCS() *fakeVMCS { return hvtest.NewVMCS() }

// skylake is the capability set of Bochs's corei7_skylake_x.
func skylake() *vmx.Caps { return hvtest.Skylake() }

// exitStep is one scripted VM exit.
type exitStep struct {
	reason vmx.ExitReason
	fields map[vmx.Field]uint64
	regs   func(r *vmx.GuestRegs)
	check  func(t *testing.T, v *VCPU) // runs at the next entry
}

// scripted returns a vCPU whose Enter plays the steps, then stops it with
// an hcall.Exit hypercall.
func scripted(t *testing.T, steps []exitStep) (*VCPU, *fakeVMCS) {
	m := newFakeVMCS()
	v := NewVCPU(m, skylake())
	start := &Start{RIP: 0x100000, RSI: 0x7000, GDTBase: 0x6000, GDTLimit: 31, CodeSel: 0x10, DataSel: 0x18}
	require.NoError(t, v.Init(Setup{EPTP: 0x1000 | 0x1e, VPID: 1}, start))
	v.CPUID = func(leaf, sub uint32) (uint32, uint32, uint32, uint32) {
		switch leaf {
		case 1:
			return 0x50654, 0, 0x77faf3bf, 0xbfebfbff
		case 0xd:
			return 0x7, 0, 0, 0
		}
		return leaf, sub, 0, 0
	}
	v.Hypercalls = &testCalls{}
	i := 0
	t.Cleanup(func() {
		// Step k's exit is made at entry k+1, its check run at the next.
		if i > 0 && (i < len(steps) || i == len(steps) && steps[i-1].check != nil) {
			t.Errorf("scripted: the vCPU ran %d of its %d scripted exits, the last one's check not run", i, len(steps))
		}
	})
	v.Enter = func(v *VCPU, launched bool) error {
		assert.Equal(t, i > 0, launched)
		if i > 0 && steps[i-1].check != nil {
			steps[i-1].check(t, v)
		}
		m.Fields[vmx.IDTVectoringInfo] = 0
		m.Fields[vmx.EntryInterruptInfo] = 0
		m.Fields[vmx.ExitInstructionLen] = 3
		m.Fields[vmx.ExitQualification] = 0
		if i == len(steps) {
			m.Fields[vmx.ExitReasonField] = uint64(vmx.ExitVMCALL)
			v.Regs.RAX = hcall.Exit
			i++
			return nil
		}
		s := steps[i]
		m.Fields[vmx.ExitReasonField] = uint64(s.reason)
		for f, val := range s.fields {
			m.Fields[f] = val
		}
		if s.regs != nil {
			s.regs(&v.Regs)
		}
		i++
		return nil
	}
	return v, m
}

func fv(v *VCPU) *fakeVMCS { return v.VMCS.(*fakeVMCS) }

type testCalls struct{ calls []uint64 }

func (c *testCalls) Call(v *VCPU, nr, a1, a2, a3 uint64) (uint64, bool) {
	c.calls = append(c.calls, nr)
	switch nr {
	case hcall.Identify:
		return hcall.Magic, false
	case hcall.Exit:
		return 0, true
	}
	return hcall.Unknown, false
}

func TestInitControls(t *testing.T) {
	v, _ := scripted(t, nil)
	_ = v
	assert.Equal(t, uint64(0x04006172|vmx.ProcUseMSRBitmaps|vmx.ProcUseIOBitmaps|vmx.ProcActivateSecondary|vmx.ProcTSCOffsetting), fv(v).Fields[vmx.ProcControls])
	p2 := fv(v).Fields[vmx.Proc2Controls]
	assert.NotZero(t, p2&vmx.Proc2EnableEPT)
	assert.NotZero(t, p2&vmx.Proc2Unrestricted)
	assert.NotZero(t, p2&vmx.Proc2EnableVPID)
	assert.NotZero(t, p2&vmx.Proc2RDTSCP, "RDTSCP stays usable")
	assert.Equal(t, uint64(0x31), fv(v).Fields[vmx.GuestCR0], "PE, ET and the fixed NE")
	assert.Equal(t, uint64(0x11), fv(v).Fields[vmx.CR0ReadShadow], "the guest does not see NE forced")
	assert.Equal(t, uint64(0x20), fv(v).Fields[vmx.CR0GuestHostMask])
	assert.Equal(t, uint64(0x2000), fv(v).Fields[vmx.GuestCR4])
	assert.NotZero(t, fv(v).Fields[vmx.CR4GuestHostMask]&0x2000)
	assert.Equal(t, uint64(0x7000), v.Regs.RSI)
	assert.Equal(t, uint64(0x10), fv(v).Fields[vmx.GuestCS])
	assert.Equal(t, ^uint64(0), fv(v).Fields[vmx.VMCSLinkPointer])
	assert.NotZero(t, fv(v).Fields[vmx.ExitControls]&vmx.ExitHostAddrSpaceSize)

	noEPT := skylake()
	noEPT.Proc2.One &^= vmx.Proc2EnableEPT
	assert.ErrorContains(t, NewVCPU(newFakeVMCS(), noEPT).Init(Setup{}, &Start{}), "lacks EPT")
}

func TestCPUIDHidesVMX(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitCPUID, regs: func(r *vmx.GuestRegs) { r.RAX, r.RCX = 1, 0 },
			check: func(t *testing.T, v *VCPU) {
				assert.Zero(t, v.Regs.RCX&vmx.CPUIDVMX, "VMX hidden")
				assert.NotZero(t, v.Regs.RCX&(1<<31), "hypervisor present")
				assert.Equal(t, uint64(0xbfebfbff&^(1<<21)), v.Regs.RDX, "no debug store")
			}},
		{reason: vmx.ExitCPUID, regs: func(r *vmx.GuestRegs) { r.RAX = CPUIDHypervisorBase },
			check: func(t *testing.T, v *VCPU) {
				sig := string([]byte{byte(v.Regs.RBX), byte(v.Regs.RBX >> 8), byte(v.Regs.RBX >> 16), byte(v.Regs.RBX >> 24)})
				assert.Equal(t, "tama", sig)
			}},
	})
	rip := fv(v).Fields[vmx.GuestRIP]
	require.NoError(t, v.Run())
	assert.Equal(t, rip+3*3, fv(v).Fields[vmx.GuestRIP], "three instructions of 3 bytes skipped")
	assert.Equal(t, map[vmx.ExitReason]uint64{vmx.ExitCPUID: 2, vmx.ExitVMCALL: 1}, v.Counts())
	assert.Equal(t, uint64(3), v.Total())
	var b strings.Builder
	v.Report(&b, true)
	assert.Contains(t, b.String(), "tamahv: exits CPUID                2")
	assert.Contains(t, b.String(), "recent exit VMCALL")
}

func TestVMXInstructionsRaiseUD(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitVMXON, check: func(t *testing.T, v *VCPU) {
			assert.Equal(t, uint64(0x80000306), fv(v).Fields[vmx.EntryInterruptInfo], "#UD injected")
		}},
	})
	rip := fv(v).Fields[vmx.GuestRIP]
	require.NoError(t, v.Run())
	assert.Equal(t, rip+3, fv(v).Fields[vmx.GuestRIP], "VMXON not skipped, only the final VMCALL")
}

func TestHypercalls(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitVMCALL, regs: func(r *vmx.GuestRegs) { r.RAX = hcall.Identify },
			check: func(t *testing.T, v *VCPU) { assert.Equal(t, uint64(hcall.Magic), v.Regs.RAX) }},
		{reason: vmx.ExitVMCALL, regs: func(r *vmx.GuestRegs) { r.RAX = 0xdead },
			check: func(t *testing.T, v *VCPU) { assert.Equal(t, hcall.Unknown, v.Regs.RAX) }},
	})
	require.NoError(t, v.Run())
	assert.Equal(t, []uint64{hcall.Identify, 0xdead, hcall.Exit}, v.Hypercalls.(*testCalls).calls)
}

func TestMSRAndPorts(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitRDMSR, regs: func(r *vmx.GuestRegs) { r.RCX = vmx.MSRFeatureControl },
			check: func(t *testing.T, v *VCPU) { assert.Equal(t, uint64(1), v.Regs.RAX, "locked, VMX off") }},
		{reason: vmx.ExitRDMSR, regs: func(r *vmx.GuestRegs) { r.RCX = vmx.MSRVMXBasic },
			check: func(t *testing.T, v *VCPU) { assert.Equal(t, uint64(0x80000b0d), fv(v).Fields[vmx.EntryInterruptInfo]) }},
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: 0x3fd0008}, regs: func(r *vmx.GuestRegs) { r.RAX = 0x1234 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x12ff), v.Regs.RAX, "IN AL from the console reads 0xff")
			}},
	})
	v.OwnPorts(0x3f8, 0x3ff)
	require.NoError(t, v.Run())

}

func TestCRWrites(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		// MOV CR0, RAX with NE set: the shadow follows, NE stays.
		{reason: vmx.ExitCRAccess, fields: map[vmx.Field]uint64{vmx.ExitQualification: 0x0}, regs: func(r *vmx.GuestRegs) { r.RAX = 0x31 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x31), fv(v).Fields[vmx.CR0ReadShadow])
				assert.Equal(t, uint64(0x31), fv(v).Fields[vmx.GuestCR0])
			}},
		// MOV CR4, RCX setting VMXE: #GP, the guest has no VMX.
		{reason: vmx.ExitCRAccess, fields: map[vmx.Field]uint64{vmx.ExitQualification: 0x104}, regs: func(r *vmx.GuestRegs) { r.RCX = 0x2020 },
			check: func(t *testing.T, v *VCPU) { assert.Equal(t, uint64(0x80000b0d), fv(v).Fields[vmx.EntryInterruptInfo]) }},
		// MOV CR4, RCX with PAE: shadow PAE, real PAE|VMXE.
		{reason: vmx.ExitCRAccess, fields: map[vmx.Field]uint64{vmx.ExitQualification: 0x104}, regs: func(r *vmx.GuestRegs) { r.RCX = 0x20 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x20), fv(v).Fields[vmx.CR4ReadShadow])
				assert.Equal(t, uint64(0x2020), fv(v).Fields[vmx.GuestCR4])
			}},
		// Paging on with EFER.LME: IA-32e mode.
		{reason: vmx.ExitCRAccess, fields: map[vmx.Field]uint64{vmx.ExitQualification: 0x0, vmx.GuestEFER: vmx.EFERLME}, regs: func(r *vmx.GuestRegs) { r.RAX = 0x80000011 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(vmx.EFERLME|vmx.EFERLMA), fv(v).Fields[vmx.GuestEFER])
				assert.NotZero(t, fv(v).Fields[vmx.EntryControls]&vmx.EntryIA32eMode)
			}},
	})
	require.NoError(t, v.Run())
}

func TestXSETBV(t *testing.T) {
	var loaded []uint64
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 0, 7, 0 }},
		{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 0, 5, 0 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x80000b0d), fv(v).Fields[vmx.EntryInterruptInfo], "AVX without SSE")
			}},
		{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 0, 0x1f, 0 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x80000b0d), fv(v).Fields[vmx.EntryInterruptInfo], "unsupported bits")
			}},
	})
	fv(v).Fields[vmx.GuestCR4] |= 1 << 18
	v.XSETBV = func(xcr uint32, val uint64) { loaded = append(loaded, val) }
	require.NoError(t, v.Run())
	assert.Equal(t, []uint64{7}, loaded)
}

func TestEventsWaitForAWindow(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitCPUID, check: func(t *testing.T, v *VCPU) {
			assert.Zero(t, fv(v).Fields[vmx.EntryInterruptInfo], "IF is clear: not injected")
			assert.NotZero(t, fv(v).Fields[vmx.ProcControls]&vmx.ProcInterruptWindow)
			fv(v).Fields[vmx.GuestRFLAGS] = 0x202
		}},
		{reason: vmx.ExitInterruptWindow, check: func(t *testing.T, v *VCPU) {
			assert.Equal(t, uint64(0x80000030), fv(v).Fields[vmx.EntryInterruptInfo], "vector 0x30 delivered")
			assert.Zero(t, fv(v).Fields[vmx.ProcControls]&vmx.ProcInterruptWindow)
		}},
	})
	require.NoError(t, v.Inject(vmx.Event{Vector: 0x30, Type: vmx.EventExternal}))
	require.NoError(t, v.Run())
}

func TestVectoringEventIsReinjected(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		// A #PF being delivered when an EPT violation... here a CPUID-like
		// exit stands in; the #PF must come back first.
		{reason: vmx.ExitInterruptWindow, fields: map[vmx.Field]uint64{vmx.IDTVectoringInfo: 0x80000b0e, vmx.IDTVectoringError: 6},
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x80000b0e), fv(v).Fields[vmx.EntryInterruptInfo])
				assert.Equal(t, uint64(6), fv(v).Fields[vmx.EntryExceptionError])
			}},
	})
	require.NoError(t, v.Run())
}

func TestFatalExits(t *testing.T) {
	v, _ := scripted(t, []exitStep{{reason: vmx.ExitEPTViolation, fields: map[vmx.Field]uint64{vmx.GuestPhysAddr: 0x10001000, vmx.ExitQualification: 0x182}}})
	err := v.Run()
	assert.ErrorIs(t, err, ErrFatalExit)
	assert.ErrorContains(t, err, "GPA 0x10001000")

	v, _ = scripted(t, []exitStep{{reason: vmx.ExitTripleFault}})
	assert.ErrorIs(t, v.Run(), ErrGuestTripleFault)

	v, _ = scripted(t, []exitStep{{reason: 35}})
	assert.ErrorIs(t, v.Run(), ErrUnknownExit)

	v, _ = scripted(t, []exitStep{{reason: vmx.ExitInvalidGuestState, fields: map[vmx.Field]uint64{vmx.ExitReasonField: 0x80000021}}})
	assert.ErrorIs(t, v.Run(), ErrEntryFailed)

	v, _ = scripted(t, nil)
	v.Enter = func(*VCPU, bool) error { return errors.New("VMfailValid") }
	assert.ErrorIs(t, v.Run(), ErrEntryFailed)

	assert.Error(t, v.Intercept(35, func(v *VCPU, e *vmx.Exit, next Handler) (Action, error) { return next(v, e) }))
	assert.Error(t, v.Intercept(vmx.ExitCPUID, nil))
}

// TestExtensionOrder: interceptors of a reason run last-installed first,
// each passing on to the one installed before it and finally to the
// default handler; observers see every exit first, in the order added;
// entry and tick functions run in the order added.
func TestExtensionOrder(t *testing.T) {
	var got []string
	note := func(s string) { got = append(got, s) }
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitCPUID, regs: func(r *vmx.GuestRegs) { r.RAX = 0 }},
		{reason: vmx.ExitPreemptionTimer},
		{reason: vmx.ExitVMCALL, regs: func(r *vmx.GuestRegs) { r.RAX = hcall.Exit }},
	})
	v.CPUID = func(uint32, uint32) (uint32, uint32, uint32, uint32) { note("default cpuid"); return 1, 2, 3, 4 }
	for _, name := range []string{"first", "second"} {
		require.NoError(t, v.Intercept(vmx.ExitCPUID, func(v *VCPU, e *vmx.Exit, next Handler) (Action, error) {
			note(name + " interceptor")
			return next(v, e)
		}))
		v.Observe(func(v *VCPU, e *vmx.Exit) { note(name + " observer " + e.Reason.String()) })
		v.OnEntry(func(*VCPU) { note(name + " entry") })
		v.OnTick(func(*VCPU) { note(name + " tick") })
	}
	// An interceptor that answers keeps the exit from those before it.
	require.NoError(t, v.Intercept(vmx.ExitVMCALL, func(v *VCPU, e *vmx.Exit, next Handler) (Action, error) {
		note("vmcall answered")
		return v.Stopped(nil)
	}))
	require.NoError(t, v.Run())
	assert.Equal(t, []string{
		"first entry", "second entry",
		"first observer CPUID", "second observer CPUID", "second interceptor", "first interceptor", "default cpuid",
		"first entry", "second entry",
		"first observer PreemptionTimer", "second observer PreemptionTimer", "first tick", "second tick",
		"first entry", "second entry",
		"first observer VMCALL", "second observer VMCALL", "vmcall answered",
	}, got)
}

func TestExitPathAllocatesNothing(t *testing.T) {
	m := newFakeVMCS()
	v := NewVCPU(m, skylake())
	require.NoError(t, v.Init(Setup{EPTP: 0x1e, VPID: 1}, &Start{CodeSel: 0x10, DataSel: 0x18}))
	v.CPUID = func(l, s uint32) (uint32, uint32, uint32, uint32) { return 0, 0, 0, 0 }
	m.Fields[vmx.ExitReasonField] = uint64(vmx.ExitCPUID)
	m.Fields[vmx.ExitQualification] = 0
	m.Fields[vmx.IDTVectoringInfo] = 0
	m.Fields[vmx.ExitInstructionLen] = 2
	allocs := testing.AllocsPerRun(1000, func() {
		_ = v.prepareEntry()
		if _, err := v.exit(); err != nil {
			t.Fatal(err)
		}
	})
	assert.Zero(t, allocs)
}

func TestBitmaps(t *testing.T) {
	var b [4096]byte
	GuestMSRBitmap(&b)
	assert.Equal(t, byte(1<<2|1<<3), b[0x3a/8], "IA32_FEATURE_CONTROL and IA32_TSC_ADJUST read")
	assert.Equal(t, byte(1<<2|1<<3), b[2048+0x3a/8], "and write")
	assert.Equal(t, byte(0xff), b[0x480/8])
	var a, bb [4096]byte
	IOBitmaps(&a, &bb, [2]uint16{0x3f8, 0x3ff}, [2]uint16{0xfffe, 0xffff})
	assert.Equal(t, byte(0xff), a[0x3f8/8])
	assert.Zero(t, a[0x2f8/8])
	assert.Equal(t, byte(0xc0), bb[(0xfffe-0x8000)/8], "ports 0xfffe and 0xffff in bitmap B")
}

// exitOf snapshots the fake VMCS as an exit of reason r, as the run loop
// would, for tests that call handlers directly.
func exitOf(v *VCPU, r vmx.ExitReason) *vmx.Exit {
	v.VMCS.Write(vmx.ExitReasonField, uint64(r))
	return v.snapshot()
}
