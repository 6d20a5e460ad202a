package guestmem

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/vmx"
)

const (
	apicBase = 0xfee00000
	apicVA   = 0xffffffffff5fb000 // Linux's fixmap of the local APIC
	// A user process that maps the local APIC (root, through /dev/mem)
	// and runs code of its own.
	userAPICVA = 0x7f0000200000
	userRIP    = 0x401000
	userCodePA = 0x3000000
)

// apicRegWrite is one register write on the local APIC.
type apicRegWrite struct{ off, val uint32 }

// fakeAPIC is the local APIC of the processor that runs the vCPU, in a
// guest whose vCPUs have the APIC IDs ids; the vCPU under test is
// vCPU self.
type fakeAPIC struct {
	regs   map[uint32]uint32
	writes []apicRegWrite
	inits  []uint64 // the targets INIT was asked to apply
	take   bool     // INIT takes the IPI
	ids    []uint32
	self   int
}

func newFakeAPIC() *fakeAPIC {
	return &fakeAPIC{regs: map[uint32]uint32{}, ids: []uint32{0, 1, 4}, take: true}
}

func (f *fakeAPIC) emulator(gm *Watcher) *APICWrites {
	return &APICWrites{Mem: gm, Base: apicBase, IDs: f.ids,
		Index: func(*hv.VCPU) int { return f.self },
		Read: func(_ *hv.VCPU, off uint32) uint32 {
			if off%16 != 0 {
				panic("a read off a register")
			}
			return f.regs[off]
		},
		Write: func(_ *hv.VCPU, off, val uint32) {
			if off%16 != 0 {
				panic("a write off a register")
			}
			f.regs[off] = val
			f.writes = append(f.writes, apicRegWrite{off, val})
		},
		INIT: func(_ *hv.VCPU, targets uint64) bool {
			f.inits = append(f.inits, targets)
			return f.take
		},
	}
}

// sends are the interrupt commands written: (ICR high, ICR low) at each
// write of the low half; high is the ICR's high half before the first.
func (f *fakeAPIC) sends(high uint32) [][2]uint32 {
	var out [][2]uint32
	for _, w := range f.writes {
		switch w.off {
		case vmx.APICICRHigh:
			high = w.val
		case vmx.APICICRLow:
			out = append(out, [2]uint32{high, w.val})
		}
	}
	return out
}

// apicWrite is the EPT violation of the instruction at ptRIP writing the
// local APIC's page at off.
func apicWrite(off uint64, regs func(*vmx.GuestRegs), check func(*testing.T, *hv.VCPU)) vcputest.Step {
	return write(apicVA+off, apicBase+off, regs, check)
}

// apicFixture is the page-table fixture with the local APIC mapped at
// apicVA for the kernel and at userAPICVA for a user process whose code
// is at userRIP.
func apicFixture(t *testing.T) *ptFixture {
	f := newPTFixture(t, swapPTE)
	f.g.mapPage(apicVA, apicBase, vmx.PTEWritable)
	f.g.mapPage(userAPICVA, apicBase, vmx.PTEWritable|vmx.PTEUser)
	f.g.mapPage(userRIP, userCodePA, vmx.PTEUser)
	for _, va := range []uint64{apicVA, userAPICVA, userRIP} {
		f.g.setAD(va)
	}
	return f
}

// absolute is the ModRM and SIB of a 32-bit absolute address (sign
// extended) and the address's low 32 bits, for a kernel address.
func absolute(reg byte, va uint64) []byte {
	d := uint32(va)
	return []byte{reg<<3 | 4, 0x25, byte(d), byte(d >> 8), byte(d >> 16), byte(d >> 24)}
}

func insn(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// TestAPICWritesEmulated: Linux's writes of its local APIC (MOV from a
// register to the fixmap) are made on the writer's local APIC, RIP moves
// past them; an INIT IPI to an application processor's vCPU goes to INIT,
// which keeps it from the local APIC; a start-up IPI to a vCPU goes out
// as written.
func TestAPICWritesEmulated(t *testing.T) {
	f := apicFixture(t)
	f.code(insn([]byte{0x89}, absolute(0, apicVA+vmx.APICICRLow))...) // mov %eax, ICR low
	lapic := newFakeAPIC()
	lapic.regs[vmx.APICICRHigh] = 1 << 24
	a := lapic.emulator(f.gm)
	eax := func(x uint64) func(*vmx.GuestRegs) { return func(r *vmx.GuestRegs) { r.RAX = x } }
	next := func(t *testing.T, v *hv.VCPU) {
		assert.Equal(t, uint64(ptRIP+7), v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP], "past the MOV")
		assert.Zero(t, v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo], "no exception")
	}
	v := f.vcpu(t, []vcputest.Step{
		apicWrite(vmx.APICICRLow, eax(0x4500), func(t *testing.T, v *hv.VCPU) { // INIT, assert, to APIC ID 1
			next(t, v)
			assert.Equal(t, []uint64{0b010}, lapic.inits)
			assert.Empty(t, lapic.writes, "the INIT did not go out")
		}),
		apicWrite(vmx.APICICRLow, eax(0x0699), func(t *testing.T, v *hv.VCPU) { // SIPI, vector 0x99, to APIC ID 1
			next(t, v)
			assert.Equal(t, []apicRegWrite{{vmx.APICICRLow, 0x699}}, lapic.writes, "as written")
		}),
	})
	require.NoError(t, a.Install(v))
	require.NoError(t, v.Run())
	assert.EqualValues(t, 2, a.Emulated)
	assert.EqualValues(t, 1, a.INITs)
	assert.Zero(t, a.Refused)
}

// TestAPICStoreForms: every store form to the local APIC's page gets its
// documented answer and never stops the guest. A store the decoder knows,
// in 64-bit mode at the reported address, is made on the registers it
// covers (a register covered in part is merged, reserved bytes are
// dropped and read as zeros) with the instruction's registers and flags;
// the interrupt command register takes a 32-bit store at its offset only;
// everything else raises #GP(0) with nothing written; a fetch raises #UD.
func TestAPICStoreForms(t *testing.T) {
	const gp = 0x80000b0d // #GP, hardware exception, error code
	const ud = 0x80000306
	const flagsIn = 0x2
	cases := []struct {
		name   string
		code   []byte
		off    uint64 // the exit's offset into the page
		qual   uint64 // 0: ptWriteQual
		regs   func(r *vmx.GuestRegs)
		fields map[vmx.Field]uint64
		// want
		writes []apicRegWrite
		exc    uint32 // the entry's interruption information
		len    int    // RIP's advance
		check  func(t *testing.T, v *hv.VCPU)
	}{
		{name: "32-bit MOV to EOI", code: insn([]byte{0x89}, absolute(0, apicVA+0xb0)), off: 0xb0,
			writes: []apicRegWrite{{0xb0, 0x12345678}}, len: 7},
		{name: "byte MOV to EOI: merged", code: insn([]byte{0x88}, absolute(0, apicVA+0xb0)), off: 0xb0,
			writes: []apicRegWrite{{0xb0, 0x78}}, len: 7},
		{name: "byte MOV into the TPR's second byte: merged", code: insn([]byte{0x88}, absolute(0, apicVA+0x81)), off: 0x81,
			writes: []apicRegWrite{{0x80, 0xa1a278a4}}, len: 7},
		{name: "64-bit MOV to EOI: the reserved half dropped", code: insn([]byte{0x48, 0x89}, absolute(0, apicVA+0xb0)), off: 0xb0,
			writes: []apicRegWrite{{0xb0, 0x12345678}}, len: 8},
		{name: "32-bit MOV to reserved bytes: dropped", code: insn([]byte{0x89}, absolute(0, apicVA+0xb4)), off: 0xb4,
			len: 7},
		{name: "XCHG with the TPR", code: insn([]byte{0x87}, absolute(0, apicVA+0x80)), off: 0x80,
			writes: []apicRegWrite{{0x80, 0x12345678}}, len: 7, check: func(t *testing.T, v *hv.VCPU) {
				assert.Equal(t, uint64(0xa1a2a3a4), v.Regs.RAX, "the old TPR")
			}},
		{name: "LOCK OR into the SVR", code: insn([]byte{0xf0, 0x81}, absolute(1, apicVA+0xf0), []byte{0, 1, 0, 0}), off: 0xf0,
			writes: []apicRegWrite{{0xf0, 0x1ff}}, len: 12, check: func(t *testing.T, v *hv.VCPU) {
				assert.Equal(t, uint64(flagsIn|vmx.RFLAGSPF), v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRFLAGS], "OR's flags")
			}},
		{name: "byte MOV to the ICR: #GP", code: insn([]byte{0x88}, absolute(0, apicVA+vmx.APICICRLow)), off: vmx.APICICRLow, exc: gp},
		{name: "64-bit MOV to the ICR: #GP", code: insn([]byte{0x48, 0x89}, absolute(0, apicVA+vmx.APICICRLow)), off: vmx.APICICRLow, exc: gp},
		{name: "32-bit MOV into the ICR's reserved bytes: #GP", code: insn([]byte{0x89}, absolute(0, apicVA+vmx.APICICRLow+8)),
			off: vmx.APICICRLow + 8, exc: gp},
		{name: "an instruction the decoder does not know (MOVDQA): #GP", code: insn([]byte{0x66, 0x0f, 0x7f}, absolute(0, apicVA+0xb0)),
			off: 0xb0, exc: gp},
		{name: "an operand that is not the exiting address: #GP", code: insn([]byte{0x89}, absolute(0, apicVA+0xb0)), off: 0xc0, exc: gp},
		{name: "outside 64-bit mode: #GP", code: insn([]byte{0x89}, absolute(0, apicVA+0xb0)), off: 0xb0, exc: gp,
			fields: map[vmx.Field]uint64{vmx.GuestCSAccess: 0xc09b}},
		{name: "a page walk's write: #GP", code: insn([]byte{0x89}, absolute(0, apicVA+0xb0)), off: 0xb0, exc: gp,
			qual: 0x2 | 0x8 | 0x20 | 0x80},
		{name: "a fetch: #UD", code: insn([]byte{0x89}, absolute(0, apicVA+0xb0)), off: 0xb0, exc: ud,
			qual: 0x4 | 0x8 | 0x80 | 0x100},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := apicFixture(t)
			f.code(c.code...)
			lapic := newFakeAPIC()
			lapic.regs[0x80] = 0xa1a2a3a4 // the TPR (not as hardware has it: every byte shows)
			lapic.regs[0xf0] = 0xff
			lapic.regs[0xb4&^0xf] = 0 // EOI reads as 0
			a := lapic.emulator(f.gm)
			step := apicWrite(c.off, func(r *vmx.GuestRegs) { r.RAX = 0x12345678 }, func(t *testing.T, v *hv.VCPU) {
				m := v.VMCS.(*hvtest.VMCS).Fields
				assert.Equal(t, c.writes, lapic.writes)
				assert.Equal(t, ptRIP+uint64(c.len), m[vmx.GuestRIP])
				assert.Equal(t, uint64(c.exc), m[vmx.EntryInterruptInfo])
				if c.exc == gp {
					assert.Zero(t, m[vmx.EntryExceptionError], "#GP(0)")
				}
				if c.check != nil {
					c.check(t, v)
				}
			})
			if c.qual != 0 {
				step.Fields[vmx.ExitQualification] = c.qual
			}
			for k, x := range c.fields {
				step.Fields[k] = x
			}
			v := f.vcpu(t, []vcputest.Step{step})
			v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRFLAGS] = flagsIn
			require.NoError(t, a.Install(v))
			require.NoError(t, v.Run(), "the guest runs on")
			if c.exc != 0 {
				assert.EqualValues(t, 1, a.Refused)
			} else {
				assert.EqualValues(t, 1, a.Emulated)
			}
		})
	}
}

// TestAPICStoreFromUserMode: a store from CPL 3 reached the local APIC's
// page because the guest's paging lets the process write it (the kernel
// mapped it user-writable): it is emulated as from CPL 0, its IPIs
// checked alike. Code the process could not have run is not emulated.
func TestAPICStoreFromUserMode(t *testing.T) {
	f := apicFixture(t)
	code := insn([]byte{0x89, 0x04, 0x25}, []byte{0xb0, 0x00, 0x20, 0x00}) // mov %eax, 0x2000b0
	for i, b := range code {
		*f.g.mem.at(userCodePA + uint64(i)) = b
	}
	const va = 0x2000b0
	f.g.mapPage(va&^0xfff, apicBase, vmx.PTEWritable|vmx.PTEUser)
	f.g.setAD(va)
	lapic := newFakeAPIC()
	a := lapic.emulator(f.gm)
	user := func(s vcputest.Step) vcputest.Step {
		s.Fields[vmx.GuestRIP] = userRIP
		s.Fields[vmx.GuestSSAccess] = 0xf3 // DPL 3
		return s
	}
	v := f.vcpu(t, []vcputest.Step{
		user(write(va, apicBase+0xb0, func(r *vmx.GuestRegs) { r.RAX = 7 }, func(t *testing.T, v *hv.VCPU) {
			assert.Equal(t, []apicRegWrite{{0xb0, 7}}, lapic.writes)
			assert.Equal(t, uint64(userRIP+7), v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP])
			assert.Zero(t, v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo])
		})),
	})
	require.NoError(t, a.Install(v))
	require.NoError(t, v.Run())

	// The same exit with RIP on a supervisor page: not the process's
	// code, so not emulated.
	lapic.writes = nil
	v = f.vcpu(t, []vcputest.Step{
		func() vcputest.Step {
			s := write(va, apicBase+0xb0, nil, func(t *testing.T, v *hv.VCPU) {
				assert.Empty(t, lapic.writes)
				assert.Equal(t, uint64(0x80000b0d), v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo], "#GP(0)")
			})
			s.Fields[vmx.GuestSSAccess] = 0xf3
			return s
		}(),
	})
	require.NoError(t, a.Install(v))
	require.NoError(t, v.Run())
}

// TestAPICStoreDuringEventDelivery: a store to the local APIC's page made
// by an event's delivery (its stack in the page) raises #GP(0) combined
// with the event as the processor combines them.
func TestAPICStoreDuringEventDelivery(t *testing.T) {
	const gp, df = 0x80000b0d, 0x80000b08
	cases := []struct {
		name    string
		vector  uint64 // IDT-vectoring information
		want    uint32 // the entry's event
		pending bool   // an event still queued behind it
		stopped error
	}{
		{name: "a page fault: #DF", vector: 0x80000b0e, want: df},
		{name: "a #GP: #DF", vector: 0x80000b0d, want: df},
		{name: "an external interrupt: #GP, the interrupt after it", vector: 0x80000030, want: gp, pending: true},
		{name: "a software interrupt: #GP (INT comes again)", vector: 0x80000480, want: gp},
		{name: "#DF: a triple fault", vector: 0x80000b08, stopped: hv.ErrGuestTripleFault},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := apicFixture(t)
			lapic := newFakeAPIC()
			a := lapic.emulator(f.gm)
			step := apicWrite(0xff8, nil, func(t *testing.T, v *hv.VCPU) {
				assert.Empty(t, lapic.writes)
				assert.Equal(t, uint64(c.want), v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo])
				assert.Equal(t, c.pending, v.EventPending())
			})
			step.Fields[vmx.IDTVectoringInfo] = c.vector
			step.Fields[vmx.IDTVectoringError] = 0
			if c.stopped != nil {
				step.Check = nil // the guest stops at this exit: no entry after it
			}
			v := f.vcpu(t, []vcputest.Step{step})
			require.NoError(t, a.Install(v))
			err := v.Run()
			if c.stopped != nil {
				assert.ErrorIs(t, err, c.stopped)
				return
			}
			require.NoError(t, err)
		})
	}
}

// TestStartUpAndINITReachVCPUsOnly: the INIT and start-up IPIs a vCPU
// writes to its xAPIC reach vCPUs (APIC IDs 0, 1 and 4) and no other
// processor, whatever the destination: physical, logical, broadcast,
// shorthands.
func TestStartUpAndINITReachVCPUsOnly(t *testing.T) {
	const sipi, init = 0x0699, 0x4500
	cases := []struct {
		name  string
		low   uint32
		dest  uint32 // the ICR high's destination field
		self  int
		take  bool // INIT applies the INIT
		sends [][2]uint32
		inits []uint64
	}{
		{name: "SIPI to a vCPU: as written", low: sipi, dest: 4, sends: [][2]uint32{{4 << 24, sipi}}},
		{name: "SIPI to another processor: dropped", low: sipi, dest: 2},
		{name: "SIPI to all excluding self: to each other vCPU", low: sipi | vmx.ICRAllExclSelf, dest: 2,
			sends: [][2]uint32{{1 << 24, sipi}, {4 << 24, sipi}}},
		{name: "SIPI to all including self: to each vCPU", low: sipi | vmx.ICRAllIncSelf, self: 1,
			sends: [][2]uint32{{0, sipi}, {1 << 24, sipi}, {4 << 24, sipi}}},
		{name: "SIPI broadcast: to each vCPU", low: sipi, dest: 0xff,
			sends: [][2]uint32{{0, sipi}, {1 << 24, sipi}, {4 << 24, sipi}}},
		{name: "SIPI to a logical destination: to each other vCPU", low: sipi | vmx.ICRLogical, dest: 0x0f,
			sends: [][2]uint32{{1 << 24, sipi}, {4 << 24, sipi}}},
		{name: "INIT to another processor: dropped", low: init, dest: 2},
		{name: "INIT level de-assert: dropped", low: 0x8500 | vmx.ICRAllIncSelf},
		{name: "INIT to all excluding self: applied to the vCPUs", low: init | vmx.ICRAllExclSelf, dest: 2, take: true,
			inits: []uint64{0b110}},
		{name: "INIT to a logical broadcast, the BSP's vCPU among them: sent to each", low: init | vmx.ICRLogical, dest: 0xff, self: 1,
			inits: []uint64{0b111}, sends: [][2]uint32{{0, init}, {1 << 24, init}, {4 << 24, init}}},
		{name: "a fixed IPI to all excluding self: as written", low: 0xc00fd, dest: 2, sends: [][2]uint32{{2 << 24, 0xc00fd}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := apicFixture(t)
			f.code(insn([]byte{0x89}, absolute(0, apicVA+vmx.APICICRLow))...)
			lapic := newFakeAPIC()
			lapic.self, lapic.take = c.self, c.take
			high := c.dest << 24
			lapic.regs[vmx.APICICRHigh] = high // as the guest wrote it
			a := lapic.emulator(f.gm)
			v := f.vcpu(t, []vcputest.Step{
				apicWrite(vmx.APICICRLow, func(r *vmx.GuestRegs) { r.RAX = uint64(c.low) }, func(t *testing.T, v *hv.VCPU) {
					assert.Equal(t, c.sends, lapic.sends(high))
					assert.Equal(t, c.inits, lapic.inits)
					assert.Equal(t, high, lapic.regs[vmx.APICICRHigh], "the guest's destination stays")
					assert.Equal(t, uint64(ptRIP+7), v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP])
					assert.Zero(t, v.VMCS.(*hvtest.VMCS).Fields[vmx.EntryInterruptInfo])
				}),
			})
			require.NoError(t, a.Install(v))
			require.NoError(t, v.Run())
		})
	}
}

// TestIPITargets: which vCPUs an interrupt command reaches, and whether
// it reaches them alone as written.
func TestIPITargets(t *testing.T) {
	ids := []uint32{0, 1, 4, 0x21}
	cases := []struct {
		name    string
		low     uint32
		dest    uint32
		x2APIC  bool
		self    int
		targets uint64
		exact   bool
	}{
		{"physical: APIC ID 4 is vCPU 2", 0x4500, 4, false, 0, 0b0100, true},
		{"physical: nobody has APIC ID 9", 0x4500, 9, false, 0, 0, false},
		{"xAPIC broadcast", 0x0600, 0xff, false, 0, 0b1111, false},
		{"x2APIC broadcast", 0x0600, 0xffffffff, true, 0, 0b1111, false},
		{"x2APIC physical 0xff is an APIC ID", 0x0600, 0xff, true, 0, 0, false},
		{"all but self", 0xc4500, 0, false, 1, 0b1101, false},
		{"all", 0x84500, 0, false, 1, 0b1111, false},
		{"self", 0x44500, 0, false, 1, 0b0010, true},
		{"xAPIC logical: every other vCPU", 0x4d00, 1, false, 0, 0b1110, false},
		{"x2APIC logical, cluster 0, IDs 1 and 2", 0x4d00, 0x0006, true, 0, 0b0010, false},
		{"x2APIC logical, cluster 2, ID 0x21", 0x4d00, 0x20002, true, 0, 0b1000, false},
		{"x2APIC logical, cluster 1: none", 0x4d00, 0x1ffff, true, 0, 0, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			targets, exact := hv.IPITargets(c.low, c.dest, c.x2APIC, c.self, ids)
			assert.Equal(t, c.targets, targets)
			assert.Equal(t, c.exact, exact)
		})
	}
}
