package machine_test

import (
	"bytes"
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/vmx"
)

// costBoard is the test board with a VMCS that costs an array access and
// a guest that runs CPUID (leaf 0) n times, then the exit hypercall; it
// reads a time-stamp counter that moves 100 ticks a read.
type costBoard struct {
	*board
	arr *hvtest.ArrayVMCS
	n   int
	tsc uint64
}

func (c *costBoard) LoadVMCS(uint64) (hv.VMCS, error) { return c.arr, nil }
func (c *costBoard) TSC() uint64                      { c.tsc += 100; return c.tsc }
func (c *costBoard) Enter(r *vmx.GuestRegs, _ *vmx.FXArea, _ bool) error {
	f := &c.arr.Fields
	f[vmx.ExitInstructionLen], f[vmx.ExitQualification], f[vmx.IDTVectoringInfo], f[vmx.EntryInterruptInfo] = 2, 0, 0, 0
	if c.n--; c.n < 0 {
		r.RAX, r.RDI = hcall.Exit, 0
		f[vmx.ExitReasonField] = uint64(vmx.ExitVMCALL)
		return nil
	}
	r.RAX, r.RCX = 0, 0
	f[vmx.ExitReasonField] = uint64(vmx.ExitCPUID)
	return nil
}

// cpuidMachine is machine.New's vCPU 0 on costBoard, its guest running
// CPUID n times; with quiet false, vCPU 0 reads no time-stamp counter, and
// each CPUID exit takes the whole exit path.
func cpuidMachine(tb testing.TB, n int, quiet bool) (*machine.Machine, *costBoard) {
	b := newBoard(nil)
	kernel := bzImage()
	require.NoError(tb, b.WritePhys(0x100_0000, kernel))
	c := exampleConfig(uint64(len(kernel)))
	c.Log = io.Discard
	cb := &costBoard{board: b, arr: &hvtest.ArrayVMCS{}, n: n}
	var mb machine.Board = cb
	if !quiet {
		mb = noTSC{cb}
	}
	m, err := machine.New(mb, c)
	require.NoError(tb, err)
	return m, cb
}

// noTSC hides costBoard's TSC.
type noTSC struct{ *costBoard }

func (n noTSC) TSC() {}

// BenchmarkMachineCPUIDExit is a CPUID exit of vCPU 0 as machine.New
// wires it: its whole exit path, and after a quiet entry
// (hv.VCPU.QuietCPUID).
func BenchmarkMachineCPUIDExit(b *testing.B) {
	for _, quiet := range []bool{false, true} {
		name := "handled"
		if quiet {
			name = "quiet"
		}
		b.Run(name, func(b *testing.B) {
			m, cb := cpuidMachine(b, b.N, quiet)
			cb.arr.Reset()
			b.ResetTimer()
			require.NoError(b, m.Run())
			b.StopTimer()
			b.ReportMetric(float64(cb.arr.Reads)/float64(b.N), "vmreads/exit")
			b.ReportMetric(float64(m.VCPU.QuietlyAnswered())/float64(b.N), "quiet/exit")
		})
	}
}

// quietBoard is costBoard with an exit stub that answers CPUID itself
// (machine.QuietEnterer): it records what each entry armed.
type quietBoard struct {
	*costBoard
	on       []uint32
	deadline []uint64
	q        *vmx.QuietCPUID
}

func (b *quietBoard) QuietEnter(r *vmx.GuestRegs, fx *vmx.FXArea, launched bool, q *vmx.QuietCPUID) error {
	b.on, b.deadline, b.q = append(b.on, q.On), append(b.deadline, q.Deadline), q
	return b.Enter(r, fx, launched)
}

// TestVCPU0ArmsItsExitStub: vCPU 0's quiet entries arm its board's exit
// stub with its CPUID table (its own policy's answers, made at the first
// entry) and the deadline of its tick: a period (200 MHz / 100) after
// the tick last ran, which it has not in this short run.
func TestVCPU0ArmsItsExitStub(t *testing.T) {
	b := newBoard(nil)
	kernel := bzImage()
	require.NoError(t, b.WritePhys(0x100_0000, kernel))
	c := exampleConfig(uint64(len(kernel)))
	var log bytes.Buffer
	c.Log = &log
	qb := &quietBoard{costBoard: &costBoard{board: b, arr: &hvtest.ArrayVMCS{}, n: 5}}
	m, err := machine.New(qb, c)
	require.NoError(t, err)
	require.NoError(t, m.Run())
	require.NotNil(t, qb.q)
	table := m.VCPU.CPUIDTable()
	require.EqualValues(t, len(table), qb.q.N)
	for i, e := range table {
		assert.Equal(t, vmx.CPUIDAnswer{Leaf: e.Leaf, Subleaf: e.Subleaf, EAX: e.Regs[0], EBX: e.Regs[1], ECX: e.Regs[2], EDX: e.Regs[3], CR4Mask: e.CR4Mask, ECXIfCR4: e.ECXIfCR4}, qb.q.Table[i])
	}
	assert.Equal(t, []uint32{1, 1, 1, 1, 1, 1}, qb.on, "every entry after a quiet one")
	assert.Equal(t, []uint64{2e6, 2e6, 2e6, 2e6, 2e6, 2e6}, qb.deadline)
	assert.Contains(t, log.String(), "tamahv: vCPU 0's exit stub answered 0 CPUID exits itself\n")
}
