// Package vcputest is a vCPU for tests of packages built on hv, without a
// processor: its VM exits are scripted, or made one at a time (Exit).
package vcputest

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/vmx"
)

// Step is one scripted VM exit: its reason, the VMCS fields and registers
// it sets, and a check that runs at the entry after it was handled.
type Step struct {
	Reason vmx.ExitReason
	Fields map[vmx.Field]uint64
	Regs   func(r *vmx.GuestRegs)
	Check  func(t *testing.T, v *hv.VCPU)
}

// Calls is a policy that answers hcall.Identify and ends the guest at
// hcall.Exit, and records every hypercall's number.
type Calls struct{ Numbers []uint64 }

// Call implements hv.Hypercalls.
func (c *Calls) Call(v *hv.VCPU, nr, a1, a2, a3 uint64) (uint64, bool) {
	c.Numbers = append(c.Numbers, nr)
	switch nr {
	case hcall.Identify:
		return hcall.Magic, false
	case hcall.Exit:
		return 0, true
	}
	return hcall.Unknown, false
}

// Scripted returns a vCPU on a fake VMCS (Skylake's capabilities) whose
// Enter plays the steps, then ends the guest with an hcall.Exit
// hypercall. The test fails if it ran the vCPU and not every step ran.
func Scripted(t *testing.T, steps []Step) (*hv.VCPU, *hvtest.VMCS) {
	m := hvtest.NewVMCS()
	v := hv.NewVCPU(m, hvtest.Skylake())
	start := &hv.Start{RIP: 0x100000, RSI: 0x7000, GDTBase: 0x6000, GDTLimit: 31, CodeSel: 0x10, DataSel: 0x18}
	require.NoError(t, v.Init(hv.Setup{EPTP: 0x1000 | 0x1e, VPID: 1}, start))
	v.CPUID = func(leaf, sub uint32) (uint32, uint32, uint32, uint32) {
		switch leaf {
		case 1:
			return 0x50654, 0, 0x77faf3bf, 0xbfebfbff
		case 0xd:
			return 0x7, 0, 0, 0
		}
		return leaf, sub, 0, 0
	}
	v.Hypercalls = &Calls{}
	i := 0
	t.Cleanup(func() {
		// Step k's exit is made at entry k+1, its check run at the next.
		if i > 0 && (i < len(steps) || i == len(steps) && steps[i-1].Check != nil) {
			t.Errorf("vcputest: the vCPU ran %d of its %d scripted exits, the last one's check not run", i, len(steps))
		}
	})
	v.Enter = func(v *hv.VCPU, launched bool) error {
		assert.Equal(t, i > 0, launched)
		if i > 0 && steps[i-1].Check != nil {
			steps[i-1].Check(t, v)
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
		m.Fields[vmx.ExitReasonField] = uint64(s.Reason)
		for f, val := range s.Fields {
			m.Fields[f] = val
		}
		if s.Regs != nil {
			s.Regs(&v.Regs)
		}
		i++
		return nil
	}
	return v, m
}

// Exit makes the VMCS of v hold an exit of reason r and handles it as the
// run loop would (hv.VCPU.HandleExit). On a fake VMCS the exit fields the
// test did not set read as an entry with nothing to deliver would leave
// them: no event, no qualification, a 3-byte instruction.
func Exit(v *hv.VCPU, r vmx.ExitReason) (hv.Action, error) {
	if m, ok := v.VMCS.(*hvtest.VMCS); ok {
		for f, val := range map[vmx.Field]uint64{vmx.IDTVectoringInfo: 0, vmx.EntryInterruptInfo: 0, vmx.ExitInstructionLen: 3, vmx.ExitQualification: 0} {
			if _, set := m.Fields[f]; !set {
				m.Fields[f] = val
			}
		}
	}
	v.VMCS.Write(vmx.ExitReasonField, uint64(r))
	return v.HandleExit()
}

// FirstQueued returns the first event in v's queue.
func FirstQueued(v *hv.VCPU) (e vmx.Event, ok bool) {
	v.Queued(func(x vmx.Event) bool { e, ok = x, true; return true })
	return e, ok
}
