package hv

import (
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/vmx"
)

const (
	gpNoCode = 0x8000030d // #GP, hardware exception, no error code
	gpCode   = 0x80000b0d // #GP(0)
	udInfo   = 0x80000306
)

// ioQual builds an I/O exit qualification.
func ioQual(port uint16, size int, in bool) uint64 {
	q := uint64(port)<<16 | uint64(size-1)
	if in {
		q |= 8
	}
	return q
}

type portOp struct {
	port uint16
	size int
	in   bool
	val  uint32
}

// fakePorts records real port I/O and answers reads with port-derived
// values.
type fakePorts struct{ ops []portOp }

func (f *fakePorts) io(port uint16, size int, in bool, val uint32) uint32 {
	f.ops = append(f.ops, portOp{port, size, in, val})
	if in {
		return 0x44332211 + uint32(port)
	}
	return 0
}

func TestINZeroExtendsEAXAndMergesSmallerSizes(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0x3f8, 4, true)},
			regs: func(r *vmx.GuestRegs) { r.RAX = 0xdeadbeef_00000000 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x00000000_ffffffff), v.Regs.RAX, "IN EAX zero-extends")
			}},
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0x3f8, 2, true)},
			regs: func(r *vmx.GuestRegs) { r.RAX = 0xdeadbeef_12345678 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0xdeadbeef_1234ffff), v.Regs.RAX, "IN AX merges")
			}},
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0x3f8, 1, true)},
			regs: func(r *vmx.GuestRegs) { r.RAX = 0xdeadbeef_12345678 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0xdeadbeef_123456ff), v.Regs.RAX, "IN AL merges")
			}},
	})
	v.OwnPorts(0x3f8, 0x3ff)
	require.NoError(t, v.Run())
}

func TestIOStraddlingTheConsoleIsSplit(t *testing.T) {
	ports := &fakePorts{}
	v, _ := scripted(t, []exitStep{
		// out %eax,$0x3f6: 0x3f6-0x3f7 are real, 0x3f8-0x3f9 vanish.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0x3f6, 4, false) | 64},
			regs: func(r *vmx.GuestRegs) { r.RAX = 0x99_44332211 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, []portOp{{0x3f6, 2, false, 0x2211}}, ports.ops)
				ports.ops = nil
			}},
		// in $0x3f7,%ax: 0x3f7 is real, 0x3f8 reads 0xff.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0x3f7, 2, true) | 64},
			regs: func(r *vmx.GuestRegs) { r.RAX = 0x1234_5678 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, []portOp{{0x3f7, 1, true, 0}}, ports.ops)
				assert.Equal(t, uint64(0x1234_ff08), v.Regs.RAX) // 0x44332211+0x3f7 = 0x44332608
				ports.ops = nil
			}},
		// in (%dx),%eax at 0x3fd: three console bytes, then port 0x400.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0x3fd, 4, true)},
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, []portOp{{0x400, 1, true, 0}}, ports.ops)
				assert.Equal(t, uint64(0x11ffffff), v.Regs.RAX) // 0x44332211+0x400 = 0x44332611
				ports.ops = nil
			}},
		// in (%dx),%eax at 0xfffe wraps: 0xfffe-0xffff, then 0-1.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0xfffe, 4, true)},
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, []portOp{{0xfffe, 2, true, 0}, {0, 2, true, 0}}, ports.ops)
				assert.Equal(t, uint64(0x2211_220f), v.Regs.RAX)
				ports.ops = nil
			}},
		// out %ax,(%dx) at 0xffff wraps: one byte each side.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0xffff, 2, false)},
			regs: func(r *vmx.GuestRegs) { r.RAX = 0xbbaa },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, []portOp{{0xffff, 1, false, 0xaa}, {0, 1, false, 0xbb}}, ports.ops)
				ports.ops = nil
			}},
		// An unowned port whose access exits anyway is passed through.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0x60, 1, true)},
			regs: func(r *vmx.GuestRegs) { r.RAX = 0 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, []portOp{{0x60, 1, true, 0}}, ports.ops)
				assert.Equal(t, uint64(0x71), v.Regs.RAX)
			}},
	})
	v.OwnPorts(0x3f8, 0x3ff)
	v.PortIO = ports.io
	require.NoError(t, v.Run(), "no access ends tamahv")
}

func TestPortGuardDropsTheWritesItRefuses(t *testing.T) {
	ports := &fakePorts{}
	var asked []portOp
	out := func(port uint16, size int, val uint64) exitStep {
		return exitStep{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(port, size, false)},
			regs: func(r *vmx.GuestRegs) { r.RAX = val }}
	}
	steps := []exitStep{
		out(0xb004, 2, 0x2400),      // refused: nothing reaches the port
		out(0xb004, 2, 0x2000),      // passed
		out(0xb002, 4, 0x2400_0000), // reaches into the range from below: refused whole
		out(0xb006, 1, 0x24),        // past the range: the guard is not asked
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0xb004, 2, true)}}, // reads pass
	}
	steps[4].check = func(t *testing.T, v *VCPU) {
		assert.Equal(t, []portOp{{0xb004, 2, false, 0x2000}, {0xb006, 1, false, 0x24}, {0xb004, 2, true, 0}}, ports.ops)
		assert.Equal(t, []portOp{{0xb004, 2, false, 0x2400}, {0xb004, 2, false, 0x2000}, {0xb002, 4, false, 0x2400_0000}}, asked)
		assert.Equal(t, uint64(0xd215), v.Regs.RAX&0xffff, "the device's answer (0x44332211+0xb004)")
	}
	v, _ := scripted(t, steps)
	v.PortIO = ports.io
	v.GuardPorts(PortGuard{First: 0xb004, Last: 0xb005, Refuse: func(port uint16, size int, val uint32) bool {
		asked = append(asked, portOp{port, size, false, val})
		return val&0x2400 == 0x2400 || val>>16&0x2400 == 0x2400
	}})
	require.NoError(t, v.Run())
}

func TestPortGuardRefusesAWriteThatWrapsIntoIt(t *testing.T) {
	ports := &fakePorts{}
	asked := 0
	v, _ := scripted(t, []exitStep{
		// out %eax at 0xffff: ports 0xffff, 0, 1, 2; the guard holds 1-2.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0xffff, 4, false)},
			regs: func(r *vmx.GuestRegs) { r.RAX = 0x24_2400_ff }},
		// out %ax at 0xffff: ports 0xffff and 0, clear of the guard.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0xffff, 2, false)},
			regs: func(r *vmx.GuestRegs) { r.RAX = 0x00ff },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, []portOp{{0xffff, 1, false, 0xff}, {0, 1, false, 0}}, ports.ops, "only the write clear of the guard")
				assert.Zero(t, asked, "a wrapping write is dropped without asking")
			}},
	})
	v.PortIO = ports.io
	v.GuardPorts(PortGuard{First: 1, Last: 2, Refuse: func(uint16, int, uint32) bool { asked++; return false }})
	require.NoError(t, v.Run())
}

func TestXSETBVRefusesWhatTheProcessorRefuses(t *testing.T) {
	var steps []exitStep
	bad := []uint64{0x27, 0x67, 0xe3, 0xf, 0x17, 0x20003, 0x40003, 0x2, 0x5, 0x1000003}
	for _, x := range bad {
		steps = append(steps, exitStep{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 0, x&0xffffffff, x>>32 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(gpCode), fv(v).Fields[vmx.EntryInterruptInfo], "XCR0 %#x", x)
			}})
	}
	steps = append(steps,
		exitStep{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 1, 7, 0 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(gpCode), fv(v).Fields[vmx.EntryInterruptInfo], "XCR1")
				fv(v).Fields[vmx.GuestSSAccess] = 0x60 | vmx.AccessData32
			}},
		exitStep{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 0, 7, 0 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(gpCode), fv(v).Fields[vmx.EntryInterruptInfo], "CPL 3")
				fv(v).Fields[vmx.GuestSSAccess] = vmx.AccessData32
				fv(v).Fields[vmx.GuestCR4] &^= vmx.CR4OSXSAV
			}},
		exitStep{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 0, 7, 0 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(udInfo), fv(v).Fields[vmx.EntryInterruptInfo], "CR4.OSXSAVE clear")
				fv(v).Fields[vmx.GuestCR4] |= vmx.CR4OSXSAV
			}},
		exitStep{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 0, 0x602e7, 0 }},
	)
	var loaded []uint64
	v, _ := scripted(t, steps)
	v.CPUID = func(leaf, sub uint32) (uint32, uint32, uint32, uint32) {
		if leaf == 0xd && sub == 0 {
			return 0x602ff, 0, 0, 0 // x87 to Hi16_ZMM, PKRU, AMX
		}
		return 0, 0, 0, 0
	}
	fv(v).Fields[vmx.GuestCR4] |= vmx.CR4OSXSAV
	v.XSETBV = func(xcr uint32, val uint64) { loaded = append(loaded, val) }
	require.NoError(t, v.Run())
	assert.Equal(t, []uint64{0x602e7}, loaded, "only the valid value reaches XSETBV")
}

// fakePhys is guest-physical memory at base; reads outside it fail.
type fakePhys struct {
	base uint64
	b    []byte
}

func (f *fakePhys) ReadPhys(pa uint64, p []byte) error {
	if pa < f.base || pa+uint64(len(p)) > f.base+uint64(len(f.b)) {
		return errors.New("not in the fake memory")
	}
	copy(p, f.b[pa-f.base:])
	return nil
}

func (f *fakePhys) put64(pa, v uint64) {
	for i := 0; i < 8; i++ {
		f.b[pa-f.base+uint64(i)] = byte(v >> (8 * i))
	}
}

const (
	movCR0RAX = 0x0   // exit qualification of MOV CR0, RAX
	movCR4RCX = 0x104 // MOV CR4, RCX
	csLong    = vmx.AccessCode32&^(1<<14) | vmx.SegmentL
)

// crStep is a MOV to CR exit with state set up at the exit and the
// expected injection (0: none) checked at the next entry.
func crStep(qual, val uint64, fields map[vmx.Field]uint64, inject uint64, more func(t *testing.T, v *VCPU)) exitStep {
	f := map[vmx.Field]uint64{vmx.ExitQualification: qual}
	for k, x := range fields {
		f[k] = x
	}
	return exitStep{reason: vmx.ExitCRAccess, fields: f,
		regs: func(r *vmx.GuestRegs) { r.RAX, r.RCX = val, val },
		check: func(t *testing.T, v *VCPU) {
			assert.Equal(t, inject, fv(v).Fields[vmx.EntryInterruptInfo], "MOV to CR%d of %#x", qual&15, val)
			if more != nil {
				more(t, v)
			}
		}}
}

func TestCR0WritesTheProcessorRefuses(t *testing.T) {
	const pgOn = vmx.CR0PG | vmx.CR0NE | vmx.CR0ET | vmx.CR0PE
	notIA32e := func(t *testing.T, v *VCPU) {
		assert.Zero(t, fv(v).Fields[vmx.GuestEFER]&vmx.EFERLMA)
		assert.Zero(t, fv(v).Fields[vmx.EntryControls]&vmx.EntryIA32eMode)
	}
	long := map[vmx.Field]uint64{vmx.GuestEFER: vmx.EFERLME | vmx.EFERLMA, vmx.GuestCR0: pgOn, vmx.CR0ReadShadow: pgOn,
		vmx.GuestCR4: 0x2020, vmx.CR4ReadShadow: 0x20, vmx.GuestCSAccess: csLong}
	compat := map[vmx.Field]uint64{vmx.GuestEFER: vmx.EFERLME | vmx.EFERLMA, vmx.GuestCR0: pgOn, vmx.CR0ReadShadow: pgOn,
		vmx.GuestCR4: 0x22020, vmx.CR4ReadShadow: 0x20020, vmx.GuestCSAccess: vmx.AccessCode32}
	prot := map[vmx.Field]uint64{vmx.GuestEFER: 0, vmx.GuestCR0: 0x31, vmx.CR0ReadShadow: 0x11,
		vmx.GuestCR4: 0x2000, vmx.CR4ReadShadow: 0, vmx.GuestCSAccess: vmx.AccessCode32}
	with := func(base map[vmx.Field]uint64, kv ...uint64) map[vmx.Field]uint64 {
		m := map[vmx.Field]uint64{}
		for k, x := range base {
			m[k] = x
		}
		for i := 0; i < len(kv); i += 2 {
			m[vmx.Field(kv[i])] = kv[i+1]
		}
		return m
	}
	v, _ := scripted(t, []exitStep{
		crStep(movCR0RAX, pgOn, with(prot, uint64(vmx.GuestEFER), vmx.EFERLME), gpCode, notIA32e),                                                                  // LME without PAE
		crStep(movCR0RAX, pgOn, with(prot, uint64(vmx.GuestEFER), vmx.EFERLME, uint64(vmx.GuestCR4), 0x2020, uint64(vmx.GuestCSAccess), csLong), gpCode, notIA32e), // CS.L
		crStep(movCR0RAX, 0x20000031, prot, gpCode, nil),                                                                                                           // NW without CD
		crStep(movCR0RAX, 0x80000030, prot, gpCode, nil),                                                                                                           // PG without PE
		crStep(movCR0RAX, 0x31, long, gpCode, nil),                                                                                                                 // PG off in 64-bit mode
		crStep(movCR0RAX, 0x31, compat, gpCode, nil),                                                                                                               // PG off with PCIDE
		crStep(movCR0RAX, 1<<32|pgOn, long, gpCode, nil),                                                                                                           // bits 63:32 in 64-bit mode
		crStep(movCR0RAX, pgOn&^vmx.CR0WP, with(long, uint64(vmx.GuestCR4), 0x802020, uint64(vmx.CR4ReadShadow), 0x800020), gpCode, nil),                           // WP clear with CET
		// Outside 64-bit mode the operand is EAX: RAX's upper half is not
		// looked at.
		crStep(movCR0RAX, 0xdead0000_00000031, prot, 0, func(t *testing.T, v *VCPU) {
			assert.Equal(t, uint64(0x31), fv(v).Fields[vmx.CR0ReadShadow])
		}),
		// Compatibility mode may turn paging off: IA-32e mode ends.
		crStep(movCR0RAX, 0x31, with(compat, uint64(vmx.GuestCR4), 0x2020, uint64(vmx.CR4ReadShadow), 0x20), 0, func(t *testing.T, v *VCPU) {
			notIA32e(t, v)
		}),
		// Paging on with LME and PAE from a 16-bit busy TSS: IA-32e mode,
		// and TR becomes a busy 64-bit TSS as VM entry requires.
		crStep(movCR0RAX, pgOn, with(prot, uint64(vmx.GuestEFER), vmx.EFERLME, uint64(vmx.GuestCR4), 0x2020, uint64(vmx.GuestTRAccess), 0x83), 0,
			func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(vmx.EFERLME|vmx.EFERLMA), fv(v).Fields[vmx.GuestEFER])
				assert.NotZero(t, fv(v).Fields[vmx.EntryControls]&vmx.EntryIA32eMode)
				assert.Equal(t, uint64(0x8b), fv(v).Fields[vmx.GuestTRAccess])
			}),
	})
	require.NoError(t, v.Run())
}

func TestCR4WritesTheProcessorRefuses(t *testing.T) {
	const pgOn = vmx.CR0PG | vmx.CR0NE | vmx.CR0ET | vmx.CR0PE | vmx.CR0WP
	long := map[vmx.Field]uint64{vmx.GuestEFER: vmx.EFERLME | vmx.EFERLMA, vmx.GuestCR0: pgOn, vmx.CR0ReadShadow: pgOn,
		vmx.GuestCR4: 0x2020, vmx.CR4ReadShadow: 0x20, vmx.GuestCSAccess: csLong, vmx.GuestCR3: 0x1000}
	// These writes exit only with a wider CR4 guest/host mask than
	// today's; the checks must hold for any mask.
	v, _ := scripted(t, []exitStep{
		crStep(movCR4RCX, 0, long, gpCode, nil),                                                               // PAE off in IA-32e mode
		crStep(movCR4RCX, 0x1020, long, gpCode, nil),                                                          // LA57 changed in IA-32e mode
		crStep(movCR4RCX, 0x20020, map[vmx.Field]uint64{vmx.GuestCR3: 0x1001}, gpCode, nil),                   // PCIDE with CR3[11:0] != 0
		crStep(movCR4RCX, 0x20020, map[vmx.Field]uint64{vmx.GuestEFER: 0, vmx.GuestCR3: 0x1000}, gpCode, nil), // PCIDE outside IA-32e mode
		crStep(movCR4RCX, 1<<32|0x20, long, gpCode, nil),                                                      // bits 63:32
		crStep(movCR4RCX, 0x800020, map[vmx.Field]uint64{vmx.GuestCR0: 0x80000031, vmx.CR0ReadShadow: 0x80000011, vmx.GuestEFER: vmx.EFERLME | vmx.EFERLMA}, gpCode, nil), // CET without WP
		crStep(movCR4RCX, 0x20020, long, 0, func(t *testing.T, v *VCPU) {
			assert.Equal(t, uint64(0x20020), fv(v).Fields[vmx.CR4ReadShadow])
		}),
	})
	fv(v).Fields[vmx.CR4GuestHostMask] = 0xffffffff
	require.NoError(t, v.Run())
}

func TestPAEPagingLoadsThePDPTEs(t *testing.T) {
	mem := &fakePhys{base: 0x100000, b: make([]byte, 0x1000)}
	good := []uint64{0x200001, 0x201001, 0, 0xfff_ffff_f000} // not present: not checked
	for i, e := range good {
		mem.put64(0x100020+uint64(8*i), e)
	}
	mem.put64(0x100040, 0x300001|1<<5)  // reserved bit 5
	mem.put64(0x100060, 0x300001|1<<40) // above MAXPHYADDR (39)
	prot := map[vmx.Field]uint64{vmx.GuestEFER: 0, vmx.GuestCR0: 0x31, vmx.CR0ReadShadow: 0x11,
		vmx.GuestCR4: 0x2020, vmx.CR4ReadShadow: 0x20, vmx.GuestCSAccess: vmx.AccessCode32}
	cr3 := func(c uint64) map[vmx.Field]uint64 {
		m := map[vmx.Field]uint64{vmx.GuestCR3: c}
		for k, x := range prot {
			m[k] = x
		}
		return m
	}
	const pgOn = 0x80000031
	v, _ := scripted(t, []exitStep{
		crStep(movCR0RAX, pgOn, cr3(0x100020|0x18), 0, func(t *testing.T, v *VCPU) {
			for i, e := range good {
				assert.Equal(t, e, fv(v).Fields[vmx.GuestPDPTE(i)], "PDPTE %d", i)
			}
			assert.Zero(t, fv(v).Fields[vmx.EntryControls]&vmx.EntryIA32eMode, "PAE paging, not IA-32e")
			for i := range good {
				fv(v).Fields[vmx.GuestPDPTE(i)] = 0
			}
		}),
		crStep(movCR0RAX, pgOn, cr3(0x100040), gpCode, nil),   // reserved bit
		crStep(movCR0RAX, pgOn, cr3(0x100060), gpCode, nil),   // beyond MAXPHYADDR
		crStep(movCR0RAX, pgOn, cr3(0x10000000), gpCode, nil), // unreadable (tamahv's memory)
		// MOV CR4 setting PGE in PAE paging reloads them too.
		crStep(movCR4RCX, 0xa0, map[vmx.Field]uint64{vmx.GuestCR0: pgOn, vmx.CR0ReadShadow: pgOn, vmx.GuestCR3: 0x100040}, gpCode, nil),
	})
	v.Mem = mem
	v.CPUID = func(leaf, sub uint32) (uint32, uint32, uint32, uint32) {
		switch leaf {
		case 0x80000000:
			return 0x80000008, 0, 0, 0
		case 0x80000008:
			return 39, 0, 0, 0
		}
		return 0, 0, 0, 0
	}
	fv(v).Fields[vmx.CR4GuestHostMask] = 0xffffffff
	require.NoError(t, v.Run())
}

func TestRealModeExceptionsCarryNoErrorCode(t *testing.T) {
	real := map[vmx.Field]uint64{vmx.GuestCR0: 0x30, vmx.CR0ReadShadow: 0x10}
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitWRMSR, fields: real, regs: func(r *vmx.GuestRegs) { r.RCX = vmx.MSRFeatureControl },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(gpNoCode), fv(v).Fields[vmx.EntryInterruptInfo], "#GP in real mode: no error code")
				fv(v).Fields[vmx.EntryInterruptInfo] = 0
				require.NoError(t, v.Place(vmx.Exception(vmx.VectorPF, 6, 0)))
				assert.Equal(t, uint64(0x8000030e), fv(v).Fields[vmx.EntryInterruptInfo], "#PF in real mode: no error code")
				fv(v).Fields[vmx.EntryInterruptInfo] = 0
			}},
		{reason: vmx.ExitWRMSR, fields: map[vmx.Field]uint64{vmx.GuestCR0: 0x31}, regs: func(r *vmx.GuestRegs) { r.RCX = vmx.MSRFeatureControl },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(gpCode), fv(v).Fields[vmx.EntryInterruptInfo], "#GP(0) in protected mode")
			}},
	})
	require.NoError(t, v.Run())
}

func TestTaskSwitchShutsTheGuestDown(t *testing.T) {
	v, _ := scripted(t, []exitStep{{reason: vmx.ExitTaskSwitch, fields: map[vmx.Field]uint64{vmx.ExitQualification: 0xc000_0028}}})
	var log strings.Builder
	v.Log = &log
	err := v.Run()
	assert.ErrorIs(t, err, ErrGuestTaskSwitch)
	assert.NotErrorIs(t, err, ErrFatalExit)
	assert.Contains(t, log.String(), "tamahv: guest task switch to TSS 0x28 by task gate in the IDT")
}

func TestINITResetsTheVCPUAndStopsTheGuest(t *testing.T) {
	v, _ := scripted(t, []exitStep{{reason: vmx.ExitINIT, fields: map[vmx.Field]uint64{
		vmx.GuestCR0: 0xe0000031, vmx.CR0ReadShadow: 0xe0000011, vmx.GuestEFER: vmx.EFERLME | vmx.EFERLMA,
		vmx.GuestCR4: 0x2020, vmx.CR4ReadShadow: 0x20}}})
	fv(v).Fields[vmx.EntryControls] |= vmx.EntryIA32eMode
	require.NoError(t, v.Inject(vmx.Event{Vector: 0x30, Type: vmx.EventExternal}))
	var log strings.Builder
	v.Log = &log
	err := v.Run()
	assert.ErrorIs(t, err, ErrGuestINIT)
	assert.NotErrorIs(t, err, ErrFatalExit)
	f := fv(v).Fields
	assert.Equal(t, uint64(0xfff0), f[vmx.GuestRIP])
	assert.Equal(t, uint64(0xf000), f[vmx.GuestCS])
	assert.Equal(t, uint64(0xffff0000), f[vmx.GuestCSBase])
	assert.Equal(t, uint64(0x60000010), f[vmx.CR0ReadShadow], "CD and NW kept, ET set, paging and protection off")
	assert.Zero(t, f[vmx.GuestCR0]&vmx.CR0PE)
	assert.Zero(t, f[vmx.CR4ReadShadow])
	assert.Zero(t, f[vmx.GuestEFER])
	assert.Zero(t, f[vmx.EntryControls]&vmx.EntryIA32eMode)
	assert.Equal(t, uint64(0x2), f[vmx.GuestRFLAGS])
	assert.Equal(t, uint64(0x50654), v.Regs.RDX, "EDX holds the processor signature")
	assert.False(t, v.EventPending(), "pending events are gone")
	assert.Contains(t, log.String(), "tamahv: guest INIT")
}

func TestSIPIStartsOnlyAWaitingVCPU(t *testing.T) {
	v, _ := scripted(t, []exitStep{
		{reason: vmx.ExitSIPI, fields: map[vmx.Field]uint64{vmx.ExitQualification: 0x9a},
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x10), fv(v).Fields[vmx.GuestCS], "ignored outside wait-for-SIPI")
				fv(v).Fields[vmx.GuestActivityState] = vmx.ActivityWaitForSIPI
			}},
		{reason: vmx.ExitSIPI, fields: map[vmx.Field]uint64{vmx.ExitQualification: 0x9a},
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x9a00), fv(v).Fields[vmx.GuestCS])
				assert.Equal(t, uint64(0x9a000), fv(v).Fields[vmx.GuestCSBase])
				assert.Equal(t, uint64(vmx.ActivityActive), fv(v).Fields[vmx.GuestActivityState])
				fv(v).Fields[vmx.GuestRIP] = 0x100000
			}},
	})
	require.NoError(t, v.Run())
}

func TestStringIOAtTheConsoleTransfersNothing(t *testing.T) {
	ports := &fakePorts{}
	const str, rep = 16, 32
	v, _ := scripted(t, []exitStep{
		// rep outsb at COM1, 64-bit addresses.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0x3f8, 1, false) | str | rep, vmx.ExitInstructionInfo: 2 << 7},
			regs: func(r *vmx.GuestRegs) { r.RCX, r.RSI = 5, 0x1000 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0x1005), v.Regs.RSI)
				assert.Zero(t, v.Regs.RCX)
			}},
		// rep insw straddling COM1, 16-bit addresses, backwards.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0x3f7, 2, true) | str | rep, vmx.ExitInstructionInfo: 0, vmx.GuestRFLAGS: 0x402},
			regs: func(r *vmx.GuestRegs) { r.RCX, r.RDI = 0x1_0003, 0xabcd_0001 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(0xabcd_fffb), v.Regs.RDI, "DI wraps, the rest stays")
				assert.Equal(t, uint64(0x1_0000), v.Regs.RCX, "CX is zero")
			}},
		// outsl, 32-bit addresses: ESI wraps and zero-extends.
		{reason: vmx.ExitIO, fields: map[vmx.Field]uint64{vmx.ExitQualification: ioQual(0x3f6, 4, false) | str, vmx.ExitInstructionInfo: 1 << 7, vmx.GuestRFLAGS: 0x2},
			regs: func(r *vmx.GuestRegs) { r.RCX, r.RSI = 7, 0xffff_ffff_ffff_fffe },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(2), v.Regs.RSI)
				assert.Equal(t, uint64(7), v.Regs.RCX, "no REP: RCX stays")
			}},
	})
	v.OwnPorts(0x3f8, 0x3ff)
	v.PortIO = ports.io
	rip := fv(v).Fields[vmx.GuestRIP]
	require.NoError(t, v.Run())
	assert.Empty(t, ports.ops, "no port is accessed")
	assert.Equal(t, rip+4*3, fv(v).Fields[vmx.GuestRIP], "each instruction completes")
}

func TestNewExitPathsAllocateNothing(t *testing.T) {
	mem := &fakePhys{base: 0x100000, b: make([]byte, 0x1000)}
	mem.put64(0x100000, 0x200001)
	m := newFakeVMCS()
	v := NewVCPU(m, skylake())
	require.NoError(t, v.Init(Setup{EPTP: 0x1e, VPID: 1}, &Start{CodeSel: 0x10, DataSel: 0x18}))
	v.OwnPorts(0x3f8, 0x3ff)
	ports := 0
	v.PortIO = func(uint16, int, bool, uint32) uint32 { ports++; return 0 }
	v.Mem = mem
	v.CPUID = func(l, s uint32) (uint32, uint32, uint32, uint32) { return 0x7, 0, 0, 0 }
	v.XSETBV = func(uint32, uint64) {}
	m.Fields[vmx.IDTVectoringInfo] = 0
	m.Fields[vmx.ExitInstructionLen] = 2
	m.Fields[vmx.ExitInstructionInfo] = 2 << 7
	m.Fields[vmx.GuestCR4] |= vmx.CR4OSXSAV | vmx.CR4PAE
	m.Fields[vmx.GuestCR3] = 0x100000
	exits := []struct {
		reason vmx.ExitReason
		qual   uint64
		before func()
	}{
		{vmx.ExitIO, ioQual(0x3f6, 4, true), nil},
		{vmx.ExitIO, ioQual(0x3f7, 2, false) | 16 | 32, func() { v.Regs.RCX = 3 }},
		{vmx.ExitXSETBV, 0, func() { v.Regs.RCX, v.Regs.RAX, v.Regs.RDX = 0, 7, 0 }},
		{vmx.ExitXSETBV, 0, func() { v.Regs.RCX, v.Regs.RAX, v.Regs.RDX = 0, 0x27, 0 }},
		{vmx.ExitCRAccess, movCR0RAX, func() { m.Fields[vmx.GuestCR0], m.Fields[vmx.CR0ReadShadow], v.Regs.RAX = 0x31, 0x11, 0x80000031 }},
	}
	allocs := testing.AllocsPerRun(200, func() {
		for _, x := range exits {
			m.Fields[vmx.ExitReasonField] = uint64(x.reason)
			m.Fields[vmx.ExitQualification] = x.qual
			if x.before != nil {
				x.before()
			}
			v.events = eventQueue{}
			_ = v.prepareEntry()
			if _, err := v.exit(); err != nil {
				t.Fatal(err)
			}
		}
	})
	assert.Zero(t, allocs)
	assert.NotZero(t, ports)
	assert.Equal(t, uint64(0x200001), m.Fields[vmx.GuestPDPTE(0)], "the PDPTEs were loaded")
}
