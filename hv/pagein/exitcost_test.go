package pagein

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

// readOnly is a simulated guest's memory as host memory, read-only.
type readOnly struct{ *swapmemtest.Machine }

func (readOnly) WritePhys(uint64, []byte) error        { return errReadOnly }
func (readOnly) CopyPhys(uint64, uint64, uint64) error { return errReadOnly }

var errReadOnly = errors.New("read-only")

// cpuidGuest is a vCPU with swapmem's hands installed as hv/machine
// installs them (the breakpoint agent observing every exit, the engine's
// pre-entry injection through a SwapCPU), whose guest executes CPUID in a
// loop n times, then triple-faults.
func cpuidGuest(tb testing.TB, n int, wired bool) (*hv.VCPU, *hvtest.ArrayVMCS) {
	m := &hvtest.ArrayVMCS{}
	v := hv.NewVCPU(m, hvtest.Skylake())
	require.NoError(tb, v.Init(hv.Setup{EPTP: 0x1e, VPID: 1, Preemption: true, ExceptionBM: 1 << vmx.VectorBP},
		&hv.Start{CodeSel: 0x10, DataSel: 0x18}))
	g := guestmem.NewWatcher(&guestmem.GuestPhys{Mem: readOnly{swapmemtest.NewMachine()}}, 0)
	require.NoError(tb, g.Install(v))
	if wired {
		a := &BreakpointAgent{Phys: g.Phys, Walker: &g.Walker}
		require.NoError(tb, a.Install(v))
		eng := swapmem.New(g, swapmem.Config{})
		cpu := &SwapCPU{V: v, Agent: a}
		v.OnEntry(func(*hv.VCPU) { _ = eng.InjectPendingPF(cpu) })
	}
	v.PreemptionTicks = 100000
	v.CPUID = func(uint32, uint32) (uint32, uint32, uint32, uint32) { return 0x16, 0x756e6547, 0x6c65746e, 0x49656e69 }
	v.Enter = func(v *hv.VCPU, _ bool) error {
		r := vmx.ExitCPUID
		if n--; n < 0 {
			r = vmx.ExitTripleFault
		}
		m.Fields[vmx.ExitReasonField] = uint64(r)
		m.Fields[vmx.ExitInstructionLen] = 2
		return nil
	}
	return v, m
}

// TestWiredCPUIDExitCostsNoMore: with nothing to page in, swapmem's hands
// add no VMCS access to a CPUID exit: the same VMREADs and VMWRITEs as the
// vCPU alone.
func TestWiredCPUIDExitCostsNoMore(t *testing.T) {
	bare, mb := cpuidGuest(t, 100, false)
	require.ErrorIs(t, bare.Run(), hv.ErrGuestTripleFault)
	wired, mw := cpuidGuest(t, 100, true)
	require.ErrorIs(t, wired.Run(), hv.ErrGuestTripleFault)
	assert.Equal(t, uint64(100), wired.Count(vmx.ExitCPUID))
	assert.Equal(t, mb.Reads, mw.Reads, "VMREADs")
	assert.Equal(t, mb.Writes, mw.Writes, "VMWRITEs")
}

// BenchmarkWiredCPUIDExit is BenchmarkCPUIDExit (package hv) with
// swapmem's hands installed.
func BenchmarkWiredCPUIDExit(b *testing.B) {
	v, m := cpuidGuest(b, b.N, true)
	b.ResetTimer()
	err := v.Run()
	b.StopTimer()
	require.ErrorIs(b, err, hv.ErrGuestTripleFault)
	b.ReportMetric(float64(m.Reads)/float64(b.N), "vmreads/exit")
	b.ReportMetric(float64(m.Writes)/float64(b.N), "vmwrites/exit")
}
