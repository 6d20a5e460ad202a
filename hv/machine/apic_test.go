package machine_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/vmx"
)

const (
	apicPage = 0xfee00000
	// xAPICOn and x2APICOn are IA32_APIC_BASE with the local APIC in
	// xAPIC and in x2APIC mode.
	xAPICOn  = apicPage | vmx.APICBaseEnable
	x2APICOn = xAPICOn | vmx.APICBaseX2APIC
	// The lines of the decision.
	trappedLine     = "tamahv: local APIC writes trapped: INIT sticks in VMX non-root (Bochs 2.7)"
	passThroughLine = "tamahv: local APIC passed through: INIT and SIPI arrive as VM exits"
)

// apicBoard is an SMP board whose bootstrap processor has a local APIC
// (machine.LAPIC, its IA32_APIC_BASE and x2APIC MSRs) and whose CPUID
// leaf 1 may say that a hypervisor runs it.
type apicBoard struct {
	*smpBoard
	hypervisor bool
	base       uint64   // IA32_APIC_BASE
	icr        []uint64 // the x2APIC interrupt commands written
	xapic      []uint32 // the xAPIC registers written, offset then value
}

func (b *apicBoard) CPUID(leaf, sub uint32) (uint32, uint32, uint32, uint32) {
	a, bx, c, d := b.board.CPUID(leaf, sub)
	if leaf == 1 && b.hypervisor {
		c |= vmx.CPUIDHypervisorBit
	}
	return a, bx, c, d
}

func (b *apicBoard) ReadMSR(msr uint32) uint64 {
	if msr == vmx.MSRAPICBase {
		return b.base
	}
	return 0 // the x2APIC ID, 0
}

func (b *apicBoard) WriteMSR(msr uint32, v uint64) {
	if msr == vmx.MSRX2APICICR {
		b.icr = append(b.icr, v)
	}
}

func (b *apicBoard) LAPICRead(uint32) uint32 { return 0 }
func (b *apicBoard) LAPICWrite(off, val uint32) {
	b.xapic = append(b.xapic, off, val)
}

// apicAP is a fakeAP with a local APIC, as apicBoard's; its x2APIC ID is
// its APIC ID.
type apicAP struct {
	*fakeAP
	base uint64
	icr  []uint64
}

func (a *apicAP) ReadMSR(msr uint32) uint64 {
	switch msr {
	case vmx.MSRAPICBase:
		return a.base
	case vmx.MSRX2APICID:
		return uint64(a.id)
	}
	return 0
}

func (a *apicAP) WriteMSR(msr uint32, v uint64) {
	if msr == vmx.MSRX2APICICR {
		a.icr = append(a.icr, v)
	}
}

func (a *apicAP) LAPICRead(uint32) uint32   { return 0 }
func (a *apicAP) LAPICWrite(uint32, uint32) {}

// newAPICMachine builds the machine on an apicBoard with one application
// processor (APIC ID 1), both local APICs in mode base, tamahv's command
// line options and the ACPI tables' OEM ID oemID.
func newAPICMachine(t *testing.T, options, oemID string, hypervisor bool, base uint64) (*apicBoard, *machine.Machine, *lockedBuffer, *apicAP) {
	b := newBoard(t)
	b.vmcs = newVMCS()
	kernel := bzImage()
	require.NoError(t, b.WritePhys(0x100_0000, kernel))
	ap := &apicAP{fakeAP: newFakeAP(t, b, 1), base: base}
	ab := &apicBoard{smpBoard: &smpBoard{board: b, aps: []machine.AP{ap}}, hypervisor: hypervisor, base: base}
	log := &lockedBuffer{}
	c := exampleConfig(uint64(len(kernel)))
	c.Log, c.Options, c.OEMID = log, options, oemID
	m, err := machine.New(ab, c)
	require.NoError(t, err)
	return ab, m, log, ap
}

// x2APICExits returns the x2APIC MSRs (0x800-0x8ff) whose reads and whose
// writes exit under the machine's MSR bitmap.
func x2APICExits(t *testing.T, b *apicBoard) (reads, writes []uint32) {
	bm, err := b.Bytes(b.vmcs.Fields[vmx.MSRBitmap])
	require.NoError(t, err)
	for m := uint32(0x800); m <= 0x8ff; m++ {
		if bm[m/8]&(1<<(m%8)) != 0 {
			reads = append(reads, m)
		}
		if bm[2048+m/8]&(1<<(m%8)) != 0 {
			writes = append(writes, m)
		}
	}
	return reads, writes
}

// apicPerm returns the EPT's permissions on the local APIC's page.
func apicPerm(t *testing.T, m *machine.Machine) ept.Perm {
	_, p, _, _, ok := m.EPT.Lookup(apicPage)
	require.True(t, ok, "the local APIC's page is mapped")
	return p
}

// TestLocalAPICTrapDecision: apic.trapinit decides, with auto trapping on
// Bochs itself only (its ACPI OEM ID, no hypervisor bit), and one line
// says what was decided by which value. Trapped, the local APIC's page is
// read-only for the guest with the emulator of its writes in front of
// every vCPU, and the x2APIC's interrupt command register is the one
// x2APIC MSR whose writes exit; passed through, the page is writable, no
// emulator is installed, and no x2APIC MSR exits.
func TestLocalAPICTrapDecision(t *testing.T) {
	for _, c := range []struct {
		name, options, oemID string
		hypervisor, trapped  bool
	}{
		{"Bochs", "", "BOCHS ", false, true},
		{"Bochs, auto named", "apic.trapinit=auto", "BOCHS ", false, true},
		{"QEMU", "", "BOCHS ", true, false},
		{"a real machine", "", "ALASKA", false, false},
		{"no ACPI tables", "", "", false, false},
		{"on", "apic.trapinit=on", "ALASKA", true, true},
		{"off on Bochs", "apic.trapinit=off", "BOCHS ", false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			b, m, log, ap := newAPICMachine(t, c.options, c.oemID, c.hypervisor, xAPICOn)
			ap.leftover = true
			mode := "auto"
			if _, v, ok := strings.Cut(c.options, "="); ok {
				mode = v
			}
			line, other := passThroughLine, trappedLine
			if c.trapped {
				line, other = other, line
			}
			out := log.String()
			assert.Equal(t, 1, strings.Count(out, line+" (apic.trapinit="+mode+")\n"), "the decision's line, once:\n%s", out)
			assert.NotContains(t, out, other)
			assert.Equal(t, c.trapped, m.TrapsINIT())

			reads, writes := x2APICExits(t, b)
			assert.Empty(t, reads, "x2APIC reads never exit")
			p := apicPerm(t, m)
			if c.trapped {
				assert.NotNil(t, m.APIC, "the local APIC writes' emulator")
				assert.Equal(t, ept.Read, p&ept.RWX, "the local APIC's page is read-only")
				assert.Equal(t, []uint32{vmx.MSRX2APICICR}, writes, "of the x2APIC's MSRs, only ICR writes exit")
				return
			}
			assert.Nil(t, m.APIC, "no local APIC emulator")
			assert.Equal(t, ept.Read|ept.Write, p&(ept.Read|ept.Write), "the local APIC's page is writable")
			assert.Empty(t, writes, "no x2APIC write exits")
		})
	}
}

// TestLocalAPICPassedThroughINITExits: with the local APIC passed through,
// the guest's INIT and start-up IPIs reach the vCPUs as VM exits. An INIT
// puts an application processor's vCPU back in wait-for-SIPI, in its INIT
// state, and the next start-up IPI starts it at vector×4096, as the
// processor does (SDM Vol. 3A, "MP Initialization Protocol"). An INIT
// that reaches the bootstrap processor's vCPU leaves it in its INIT state
// at the reset vector, where the guest has no firmware: the guest stops.
func TestLocalAPICPassedThroughINITExits(t *testing.T) {
	b, m, log, ap := newAPICMachine(t, "apic.trapinit=off", "BOCHS ", false, xAPICOn)
	require.Nil(t, m.APIC)
	ap.script = []apStep{
		{name: "SIPI", exit: sipi},
		{name: "running", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.EqualValues(t, vmx.ActivityActive, a.vmcs.Fields[vmx.GuestActivityState])
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			a.run(0)
			r.RAX = 1
			a.exitWith(vmx.ExitCPUID)
		}},
		{name: "INIT", exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitINIT) }},
		{name: "waits for SIPI", check: func(a *fakeAP, r *vmx.GuestRegs) {
			f := a.vmcs.Fields
			assert.EqualValues(t, vmx.ActivityWaitForSIPI, f[vmx.GuestActivityState])
			assert.EqualValues(t, 0xfff0, f[vmx.GuestRIP], "its INIT state")
			assert.Zero(t, f[vmx.EntryControls]&vmx.EntryIA32eMode, "out of IA-32e mode")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			a.exitWith(vmx.ExitSIPI)
			a.vmcs.Fields[vmx.ExitQualification] = 0x42
		}},
		{name: "started at the new vector", check: func(a *fakeAP, r *vmx.GuestRegs) {
			f := a.vmcs.Fields
			assert.EqualValues(t, vmx.ActivityActive, f[vmx.GuestActivityState])
			assert.EqualValues(t, 0x42000, f[vmx.GuestCSBase])
			assert.EqualValues(t, 0x4200, f[vmx.GuestCS])
			assert.Zero(t, f[vmx.GuestRIP])
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	b.script = []step{{name: "INIT to the bootstrap processor", exit: func(b *board, r *vmx.GuestRegs) {
		<-ap.done
		b.exitWith(vmx.ExitINIT)
	}}}
	err := m.Run()
	require.ErrorIs(t, err, hv.ErrGuestINIT, "log:\n%s", log)
	f := b.vmcs.Fields
	assert.EqualValues(t, 0xfff0, f[vmx.GuestRIP], "at the reset vector")
	assert.EqualValues(t, 0xffff0000, f[vmx.GuestCSBase])
	assert.Contains(t, log.String(), "tamahv: guest INIT at RIP")
	assert.Contains(t, log.String(), "tamahv: vCPU 1 exits\ntamahv: exits INIT                 1\n")
}

// TestLocalAPICTrappedX2APICICR: with the local APIC's writes trapped and
// the guest in x2APIC mode, its WRMSRs to the interrupt command register
// go through the same checks as its xAPIC writes. An INIT to an
// application processor's vCPU is applied by tamahv (the vCPU waits for a
// start-up IPI at its next entry) and never sent; a fixed IPI is written
// to the writer's own x2APIC as it was written, on the bootstrap
// processor and on the application processor alike; a WRMSR while the
// writer's local APIC is not in x2APIC mode raises #GP(0), as the
// processor would, and sends nothing.
func TestLocalAPICTrappedX2APICICR(t *testing.T) {
	b, m, log, ap := newAPICMachine(t, "", "BOCHS ", false, x2APICOn)
	require.NotNil(t, m.APIC)
	running, sent := make(chan struct{}), make(chan struct{})
	wrmsr := func(r *vmx.GuestRegs, val uint64) {
		r.RCX, r.RAX, r.RDX = vmx.MSRX2APICICR, val&0xffffffff, val>>32
	}
	const initAssert, fixed = 0x4500, 0xfd
	ap.script = []apStep{
		{name: "SIPI", exit: sipi},
		{name: "running until vCPU 0 sent its INIT", check: func(a *fakeAP, r *vmx.GuestRegs) {
			close(running)
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			<-sent
			a.run(0)
			a.exitWith(vmx.ExitCPUID)
		}},
		{name: "INIT applied", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.EqualValues(t, vmx.ActivityWaitForSIPI, a.vmcs.Fields[vmx.GuestActivityState])
			assert.EqualValues(t, 0xfff0, a.vmcs.Fields[vmx.GuestRIP], "its INIT state")
		}, exit: sipi},
		{name: "a fixed IPI from the AP", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.EqualValues(t, vmx.ActivityActive, a.vmcs.Fields[vmx.GuestActivityState])
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			a.run(0)
			wrmsr(r, fixed)
			a.exitWith(vmx.ExitWRMSR)
		}},
		{name: "written through; then a WRMSR in xAPIC mode", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Equal(t, []uint64{fixed}, ap.icr, "the AP's own x2APIC")
			assert.Zero(t, a.vmcs.Fields[vmx.EntryInterruptInfo])
			ap.base = xAPICOn
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) {
			wrmsr(r, 0<<32|fixed)
			a.exitWith(vmx.ExitWRMSR)
		}},
		{name: "#GP", check: func(a *fakeAP, r *vmx.GuestRegs) {
			assert.Equal(t, uint64(0x80000b0d), a.vmcs.Fields[vmx.EntryInterruptInfo], "#GP(0)")
			assert.Len(t, ap.icr, 1, "nothing sent")
		}, exit: func(a *fakeAP, r *vmx.GuestRegs) { a.exitWith(vmx.ExitCPUID) }},
	}
	b.script = []step{
		{name: "INIT to the AP", exit: func(b *board, r *vmx.GuestRegs) {
			<-running
			b.run(0)
			wrmsr(r, 1<<32|initAssert)
			b.exitWith(vmx.ExitWRMSR)
		}},
		{name: "applied, not sent; a fixed IPI", check: func(bb *board, r *vmx.GuestRegs) {
			assert.Empty(t, b.icr, "the INIT was not sent")
			assert.Zero(t, bb.vmcs.Fields[vmx.EntryInterruptInfo])
			assert.EqualValues(t, 1, m.APIC.INITs)
			close(sent)
		}, exit: func(bb *board, r *vmx.GuestRegs) {
			wrmsr(r, 1<<32|fixed)
			bb.exitWith(vmx.ExitWRMSR)
		}},
		{name: "written through", check: func(bb *board, r *vmx.GuestRegs) {
			assert.Equal(t, []uint64{1<<32 | fixed}, b.icr)
			assert.Zero(t, bb.vmcs.Fields[vmx.EntryInterruptInfo])
		}, exit: func(bb *board, r *vmx.GuestRegs) {
			<-ap.done
			bb.run(0)
			r.RAX, r.RDI = hcall.Exit, 0
			bb.exitWith(vmx.ExitVMCALL)
		}},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
	assert.Empty(t, b.xapic, "nothing through the xAPIC's registers")
	assert.EqualValues(t, 1, m.APIC.INITs)
}
