package hv

import (
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

func TestXSETBVRefusesWhatTheProcessorRefuses(t *testing.T) {
	var steps []exitStep
	bad := []uint64{0x27, 0x67, 0xe3, 0xf, 0x17, 0x20003, 0x40003, 0x2, 0x5, 0x1000003}
	for _, x := range bad {
		steps = append(steps, exitStep{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 0, x&0xffffffff, x >> 32 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(gpCode), fv(v).f[vmx.EntryInterruptInfo], "XCR0 %#x", x)
			}})
	}
	steps = append(steps,
		exitStep{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 1, 7, 0 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(gpCode), fv(v).f[vmx.EntryInterruptInfo], "XCR1")
				fv(v).f[vmx.GuestSSAccess] = 0x60 | arData32
			}},
		exitStep{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 0, 7, 0 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(gpCode), fv(v).f[vmx.EntryInterruptInfo], "CPL 3")
				fv(v).f[vmx.GuestSSAccess] = arData32
				fv(v).f[vmx.GuestCR4] &^= guestCR4X
			}},
		exitStep{reason: vmx.ExitXSETBV, regs: func(r *vmx.GuestRegs) { r.RCX, r.RAX, r.RDX = 0, 7, 0 },
			check: func(t *testing.T, v *VCPU) {
				assert.Equal(t, uint64(udInfo), fv(v).f[vmx.EntryInterruptInfo], "CR4.OSXSAVE clear")
				fv(v).f[vmx.GuestCR4] |= guestCR4X
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
	fv(v).f[vmx.GuestCR4] |= guestCR4X
	v.XSETBV = func(xcr uint32, val uint64) { loaded = append(loaded, val) }
	require.NoError(t, v.Run())
	assert.Equal(t, []uint64{0x602e7}, loaded, "only the valid value reaches XSETBV")
}
