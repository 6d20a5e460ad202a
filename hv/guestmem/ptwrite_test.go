package guestmem

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/arch/x86/x86asm"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// The page-table-write fixture: a guest kernel in 64-bit mode whose code
// at ptRIP writes the PTE of a watched user page through the direct map,
// as Linux does.
const (
	directMap = 0xffff888000000000
	kimgAlias = 0xffffffff82000000 // the PT page again, near the code (RIP-relative)
	ptRIP     = 0xffffffff81000ff0 // 16 bytes before a page end: fetches cross
	ptUser    = 0x7f0000000000 + 100<<12
	swapPTE   = 0x0000000123456600 // a swap entry: not present, backed
	newPTE    = 0x300000 | vmx.PTEPresent | vmx.PTEWritable | vmx.PTEUser | vmx.PTEAccessed | vmx.PTEDirty
	// ptWriteQual is an EPT violation of a write to a final translation,
	// the entry readable and executable.
	ptWriteQual = 0x2 | 0x8 | 0x20 | 0x80 | 0x100
)

type ptFixture struct {
	g     *testGuest
	gm    *Watcher
	pte   uint64 // guest-physical address of ptUser's PTE
	kva   uint64 // its direct-map address
	heard []swapmem.Translation
}

// setAD marks every entry on va's walk accessed and the leaf dirty, as
// the processor leaves them once it has written through them.
func (g *testGuest) setAD(va uint64) {
	for l := 4; l >= 1; l-- {
		ea := g.entry(va, l)
		e := g.mem.get64(ea) | vmx.PTEAccessed
		if l == 1 {
			e |= vmx.PTEDirty
		}
		g.mem.put64(ea, e)
	}
}

func newPTFixture(t testing.TB, old uint64) *ptFixture {
	g := newTestGuest(t, ept.Options{})
	f := &ptFixture{g: g}
	g.mapPage(ptUser, 0x300000, vmx.PTEWritable|vmx.PTEUser)
	f.pte = g.entry(ptUser, 1)
	pt := f.pte &^ 0xfff
	f.kva = directMap + f.pte
	g.mapPage(directMap+pt, pt, vmx.PTEWritable)
	g.mapPage(kimgAlias, pt, vmx.PTEWritable)
	for _, va := range []uint64{ptRIP, ptRIP + 0x1000} {
		g.mapPage(va&^0xfff, va&^0xfff-kernelOff, vmx.PTEWritable)
	}
	for _, va := range []uint64{ptUser, directMap + pt, kimgAlias, ptRIP, ptRIP + 0x1000} {
		g.setAD(va)
	}
	g.mem.put64(f.pte, old)
	f.gm = NewWatcher(g.phys, g.cr3)
	_, err := f.gm.Watch(g.cr3, ptUser, func(tr swapmem.Translation) { f.heard = append(f.heard, tr) })
	require.NoError(t, err)
	return f
}

// code writes the instruction bytes at ptRIP.
func (f *ptFixture) code(b ...byte) {
	for i, x := range b {
		*f.g.mem.at(ptRIP - kernelOff + uint64(i)) = x
	}
}

// vcpu is a scripted vCPU in 64-bit mode at CPL 0 on the fixture's tables
// with the steps, the fixture's Watcher installed.
func (f *ptFixture) vcpu(t *testing.T, steps []vcputest.Step) *hv.VCPU {
	v, m := vcputest.Scripted(t, steps)
	m.Fields[vmx.EntryControls] |= vmx.EntryIA32eMode
	m.Fields[vmx.GuestCSAccess] = 0xa09b // L, not D
	m.Fields[vmx.GuestCR0] |= vmx.CR0PG | vmx.CR0WP
	m.Fields[vmx.GuestCR3] = f.g.cr3
	m.Fields[vmx.GuestCR4] |= vmx.CR4PAE
	m.Fields[vmx.GuestRIP] = ptRIP
	require.NoError(t, f.gm.Install(v))
	return v
}

// write is the EPT violation of a write at kernel address la to the
// guest-physical gpa by the instruction at ptRIP.
func write(la, gpa uint64, regs func(*vmx.GuestRegs), check func(*testing.T, *hv.VCPU)) vcputest.Step {
	return vcputest.Step{Reason: vmx.ExitEPTViolation, Fields: map[vmx.Field]uint64{
		vmx.GuestPhysAddr: gpa, vmx.ExitQualification: ptWriteQual, vmx.GuestLinearAddr: la, vmx.GuestRIP: ptRIP,
	}, Regs: regs, Check: check}
}

func (f *ptFixture) protected(t *testing.T) {
	t.Helper()
	_, perm, _, _, _ := f.g.ept.Lookup(f.pte &^ 0xfff)
	assert.Equal(t, ept.Read|ept.Exec, perm, "the page table stays write-protected")
}

// TestPageTableWritesEmulated: each form Linux writes page-table entries
// with, emulated in the exit its write causes: memory, registers, flags
// and RIP as the processor leaves them, the page still protected, and the
// watch's function told of the new translation before the guest runs on
// (check runs at the next entry, before any later exit).
func TestPageTableWritesEmulated(t *testing.T) {
	present := swapmem.Translation{PA: 0x300000, PageSize: 4096, Present: true, Writable: true, User: true}
	readOnly := present
	readOnly.Writable = false
	high := present
	high.PA |= 1 << 32
	type result struct {
		mem   uint64 // the PTE after
		flags uint64 // RFLAGS after (from 0x2, or 0x2|CF|ZF|... as set by flagsIn)
		heard []swapmem.Translation
		regs  func(t *testing.T, r *vmx.GuestRegs)
	}
	cases := []struct {
		name    string
		code    []byte
		old     uint64 // the PTE before
		flagsIn uint64
		regs    func(f *ptFixture, r *vmx.GuestRegs)
		la      func(f *ptFixture) uint64 // default: the direct-map address
		fields  map[vmx.Field]uint64
		want    result
	}{
		{name: "set_pte: mov %rax,(%rdi)", code: []byte{0x48, 0x89, 0x07}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, newPTE },
			want: result{mem: newPTE, flags: 0x2, heard: []swapmem.Translation{present}}},
		{name: "mov %r12,0x8(%rbx,%rcx,8)", code: []byte{0x4c, 0x89, 0x64, 0xcb, 0x08}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RBX, r.RCX, r.R12 = f.kva-8-3*8, 3, newPTE },
			want: result{mem: newPTE, flags: 0x2, heard: []swapmem.Translation{present}}},
		{name: "RIP-relative: mov %rax,level1_pgt(%rip)", old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RAX = newPTE },
			la:   func(f *ptFixture) uint64 { return kimgAlias + f.pte&0xfff },
			want: result{mem: newPTE, flags: 0x2, heard: []swapmem.Translation{present}}},
		{name: "GS-relative: mov %rax,%gs:0x10", code: []byte{0x65, 0x48, 0x89, 0x04, 0x25, 0x10, 0, 0, 0}, old: swapPTE,
			regs:   func(f *ptFixture, r *vmx.GuestRegs) { r.RAX = newPTE },
			fields: map[vmx.Field]uint64{vmx.GuestGSBase: 0}, // set below to kva-0x10
			want:   result{mem: newPTE, flags: 0x2, heard: []swapmem.Translation{present}}},
		{name: "pte_clear: movq $0,(%rdi)", code: []byte{0x48, 0xc7, 0x07, 0, 0, 0, 0}, old: newPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva },
			want: result{mem: 0, flags: 0x2, heard: []swapmem.Translation{{}}}},
		{name: "movq $-3,(%rdi): imm32 sign-extended", code: []byte{0x48, 0xc7, 0x07, 0xfd, 0xff, 0xff, 0xff}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva - 8 }, // the neighbour entry
			la:   func(f *ptFixture) uint64 { return f.kva - 8 },
			want: result{mem: swapPTE, flags: 0x2}},
		{name: "movl $-3,(%rdi): 4 bytes", code: []byte{0xc7, 0x07, 0xfd, 0xff, 0xff, 0xff}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva + 4 },
			la:   func(f *ptFixture) uint64 { return f.kva + 4 },
			want: result{mem: 0xfffffffd_00000000 | swapPTE&0xffffffff, flags: 0x2}},
		{name: "mov %eax,(%rdi): the low half", code: []byte{0x89, 0x07}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, 0xdead_0000_0000|newPTE },
			want: result{mem: newPTE | swapPTE&^0xffffffff, flags: 0x2, heard: []swapmem.Translation{high}}},
		{name: "mov %ah,(%rdi)", code: []byte{0x88, 0x27}, old: newPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, 0x1200 },
			want: result{mem: newPTE&^0xff | 0x12, flags: 0x2, heard: []swapmem.Translation{{Backed: true}}}},
		{name: "mov %r9w,(%rdi)", code: []byte{0x66, 0x44, 0x89, 0x0f}, old: newPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.R9 = f.kva, 0xffff_0000_0000_0000 },
			want: result{mem: newPTE &^ 0xffff, flags: 0x2, heard: []swapmem.Translation{{Backed: true}}}},
		{name: "movnti %rax,(%rdi)", code: []byte{0x48, 0x0f, 0xc3, 0x07}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, newPTE },
			want: result{mem: newPTE, flags: 0x2, heard: []swapmem.Translation{present}}},
		{name: "ptep_get_and_clear: xchg %rax,(%rdi)", code: []byte{0x48, 0x87, 0x07}, old: newPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, 0 },
			want: result{mem: 0, flags: 0x2, heard: []swapmem.Translation{{}},
				regs: func(t *testing.T, r *vmx.GuestRegs) { assert.Equal(t, uint64(newPTE), r.RAX) }}},
		{name: "xchg %edx,(%rdi): zero-extends", code: []byte{0x87, 0x17}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RDX = f.kva, 0xffff_ffff_0000_0000|newPTE },
			want: result{mem: newPTE | swapPTE&^0xffffffff, flags: 0x2, heard: []swapmem.Translation{high},
				regs: func(t *testing.T, r *vmx.GuestRegs) { assert.Equal(t, uint64(swapPTE&0xffffffff), r.RDX) }}},
		{name: "try_cmpxchg: lock cmpxchg %rdx,(%rdi)", code: []byte{0xf0, 0x48, 0x0f, 0xb1, 0x17}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX, r.RDX = f.kva, swapPTE, newPTE },
			want: result{mem: newPTE, flags: 0x2 | vmx.RFLAGSZF | vmx.RFLAGSPF, heard: []swapmem.Translation{present},
				regs: func(t *testing.T, r *vmx.GuestRegs) { assert.Equal(t, uint64(swapPTE), r.RAX) }}},
		{name: "lock cmpxchg that fails: memory left, RAX loaded", code: []byte{0xf0, 0x48, 0x0f, 0xb1, 0x17}, old: swapPTE,
			flagsIn: vmx.RFLAGSZF,
			regs:    func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX, r.RDX = f.kva, swapPTE+0x100, newPTE },
			// RAX - mem = 0x100: no borrow, not zero; parity of 0x00 is even.
			want: result{mem: swapPTE, flags: 0x2 | vmx.RFLAGSPF,
				regs: func(t *testing.T, r *vmx.GuestRegs) { assert.Equal(t, uint64(swapPTE), r.RAX) }}},
		{name: "cmpxchg %edx,(%rdi) failing below: CF, SF, zero-extended EAX", code: []byte{0x0f, 0xb1, 0x17}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX, r.RDX = f.kva, 0xffff_ffff_0000_0001, 7 },
			want: result{mem: swapPTE, flags: 0x2 | vmx.RFLAGSCF | vmx.RFLAGSSF,
				regs: func(t *testing.T, r *vmx.GuestRegs) { assert.Equal(t, uint64(swapPTE&0xffffffff), r.RAX) }}},
		{name: "lock cmpxchg8b (%rdi)", code: []byte{0xf0, 0x0f, 0xc7, 0x0f}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) {
				r.RDI, r.RAX, r.RDX, r.RBX, r.RCX = f.kva, swapPTE&0xffffffff, swapPTE>>32, newPTE&0xffffffff, newPTE>>32
			},
			want: result{mem: newPTE, flags: 0x2 | vmx.RFLAGSZF, heard: []swapmem.Translation{present}}},
		{name: "lock cmpxchg8b that fails", code: []byte{0xf0, 0x0f, 0xc7, 0x0f}, old: swapPTE, flagsIn: vmx.RFLAGSZF,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX, r.RDX = f.kva, 0xffff_ffff_0000_0000, 0 },
			want: result{mem: swapPTE, flags: 0x2, regs: func(t *testing.T, r *vmx.GuestRegs) {
				assert.Equal(t, uint64(swapPTE&0xffffffff), r.RAX)
				assert.Equal(t, uint64(swapPTE>>32), r.RDX)
			}}},
		{name: "lock cmpxchg16b (%rdi)", code: []byte{0xf0, 0x48, 0x0f, 0xc7, 0x0f}, old: swapPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) {
				r.RDI, r.RAX, r.RDX, r.RBX, r.RCX = f.kva, swapPTE, 0, newPTE, 0
			},
			want: result{mem: newPTE, flags: 0x2 | vmx.RFLAGSZF, heard: []swapmem.Translation{present}}},
		{name: "ptep_set_wrprotect: lock andb $0xfd,(%rdi)", code: []byte{0xf0, 0x80, 0x27, 0xfd}, old: newPTE,
			flagsIn: vmx.RFLAGSCF | vmx.RFLAGSOF | vmx.RFLAGSZF,
			regs:    func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva },
			// 0x67 & 0xfd = 0x65: even parity, positive, not zero.
			want: result{mem: newPTE &^ vmx.PTEWritable, flags: 0x2 | vmx.RFLAGSPF, heard: []swapmem.Translation{readOnly}}},
		{name: "lock andq $-3,(%rdi)", code: []byte{0xf0, 0x48, 0x83, 0x27, 0xfd}, old: newPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva },
			want: result{mem: newPTE &^ vmx.PTEWritable, flags: 0x2 | vmx.RFLAGSPF, heard: []swapmem.Translation{readOnly}}},
		{name: "set_bit: lock orb $2,(%rdi)", code: []byte{0xf0, 0x80, 0x0f, 0x02}, old: newPTE &^ vmx.PTEWritable,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva },
			want: result{mem: newPTE, flags: 0x2, heard: []swapmem.Translation{present}}},
		{name: "lock or %rax,(%rdi)", code: []byte{0xf0, 0x48, 0x09, 0x07}, old: 0,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, newPTE },
			want: result{mem: newPTE, flags: 0x2, heard: []swapmem.Translation{present}}},
		{name: "xor %rax,(%rdi) to zero: ZF, PF", code: []byte{0x48, 0x31, 0x07}, old: newPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, newPTE },
			want: result{mem: 0, flags: 0x2 | vmx.RFLAGSZF | vmx.RFLAGSPF, heard: []swapmem.Translation{{}}}},
		{name: "ptep_test_and_clear_young: lock btrq $5,(%rdi)", code: []byte{0xf0, 0x48, 0x0f, 0xba, 0x37, 0x05}, old: newPTE,
			flagsIn: vmx.RFLAGSZF,
			regs:    func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva },
			want:    result{mem: newPTE &^ vmx.PTEAccessed, flags: 0x2 | vmx.RFLAGSCF | vmx.RFLAGSZF, heard: nil}},
		{name: "lock bts %rax,(%rdi): a bit offset past the operand", code: []byte{0xf0, 0x48, 0x0f, 0xab, 0x07}, old: newPTE &^ vmx.PTEWritable,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva-2*8, 2*64+1 },
			want: result{mem: newPTE, flags: 0x2, heard: []swapmem.Translation{present}}},
		{name: "lock btr %rax,(%rdi): a negative bit offset", code: []byte{0xf0, 0x48, 0x0f, 0xb3, 0x07}, old: newPTE,
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva+8, uint64(1<<64-64+1) },
			want: result{mem: newPTE &^ vmx.PTEWritable, flags: 0x2 | vmx.RFLAGSCF, heard: []swapmem.Translation{readOnly}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newPTFixture(t, c.old)
			code := c.code
			la := f.kva
			if c.la != nil {
				la = c.la(f)
			}
			if code == nil { // RIP-relative to la
				disp := uint32(la - (ptRIP + 7))
				code = []byte{0x48, 0x89, 0x05, byte(disp), byte(disp >> 8), byte(disp >> 16), byte(disp >> 24)}
			}
			f.code(code...)
			gpa := f.pte&^0xfff | la&0xfff
			v := f.vcpu(t, []vcputest.Step{write(la, gpa, func(r *vmx.GuestRegs) { c.regs(f, r) }, func(t *testing.T, v *hv.VCPU) {
				m := v.VMCS.(*hvtest.VMCS).Fields
				assert.Equal(t, c.want.mem, f.g.mem.get64(f.pte), "the watched entry %#x", f.g.mem.get64(f.pte))
				assert.Equal(t, c.want.flags, m[vmx.GuestRFLAGS], "RFLAGS %#x", m[vmx.GuestRFLAGS])
				assert.Equal(t, ptRIP+uint64(len(code)), m[vmx.GuestRIP], "RIP past the instruction")
				assert.Equal(t, c.want.heard, f.heard, "the watch heard within the exit")
				if c.want.regs != nil {
					c.want.regs(t, &v.Regs)
				}
				f.protected(t)
				assert.Equal(t, uint64(1), f.gm.Emulated)
				assert.Zero(t, f.gm.Opened)
			})})
			v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRFLAGS] = 0x2 | c.flagsIn
			for k, val := range c.fields {
				v.VMCS.(*hvtest.VMCS).Fields[k] = val
			}
			if c.fields != nil {
				v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestGSBase] = f.kva - 0x10
			}
			require.NoError(t, v.Run())
		})
	}
}

// TestNeighbourEntrySignExtends: a MOV of a sign-extended immediate to
// another entry of the watched page: the 8 bytes written, the watch walked
// and unchanged.
func TestNeighbourEntrySignExtends(t *testing.T) {
	f := newPTFixture(t, swapPTE)
	f.code(0x48, 0xc7, 0x47, 0x08, 0xfd, 0xff, 0xff, 0xff) // movq $-3,8(%rdi)
	v := f.vcpu(t, []vcputest.Step{write(f.kva+8, f.pte+8, func(r *vmx.GuestRegs) { r.RDI = f.kva }, nil)})
	require.NoError(t, v.Run())
	assert.Equal(t, uint64(0xffff_ffff_ffff_fffd), f.g.mem.get64(f.pte+8))
	assert.Equal(t, uint64(swapPTE), f.g.mem.get64(f.pte))
	assert.Empty(t, f.heard)
	assert.Equal(t, uint64(1), f.gm.Emulated)
	assert.Equal(t, uint64(1), f.gm.Writes)
}

// TestPageTableWriteFallbacks: writes that are not emulated open the page
// as before, counted by reason, with memory, registers and RIP left to
// the processor; none crashes tamahv. The next exit settles the page.
func TestPageTableWriteFallbacks(t *testing.T) {
	elsewhere := uint64(0xffff888040000000)
	cases := []struct {
		name  string
		code  []byte
		setup func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs)
		why   PTFallback
	}{
		{name: "add %rax,(%rdi): not emulated", code: []byte{0x48, 0x01, 0x07}, why: FallbackDecode},
		{name: "garbage", code: []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, why: FallbackDecode},
		{name: "too many prefixes", code: []byte{0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x48, 0x89, 0x07}, why: FallbackDecode},
		{name: "lock mov: #UD", code: []byte{0xf0, 0x48, 0x89, 0x07}, why: FallbackDecode},
		{name: "rep mov", code: []byte{0xf3, 0x48, 0x89, 0x07}, why: FallbackDecode},
		{name: "address size override", code: []byte{0x67, 0x48, 0x89, 0x07}, why: FallbackDecode},
		{name: "a load", code: []byte{0x48, 0x8b, 0x07}, why: FallbackDecode},
		{name: "rep stosq", code: []byte{0xf3, 0x48, 0xab}, why: FallbackDecode},
		{name: "RIP unmapped", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) { m[vmx.GuestRIP] = 0xffffffff90000000 },
			why:   FallbackFetch},
		{name: "RIP in tamahv's region", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				f.g.mapPage(0xffffffff90000000, holeStart+0x5000, vmx.PTEWritable)
				f.g.setAD(0xffffffff90000000)
				m[vmx.GuestRIP] = 0xffffffff90000000
			},
			why: FallbackFetch},
		{name: "RIP in a user page with SMEP", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				f.g.mapPage(0x7f0000400000, ptRIP&^0xfff-kernelOff, vmx.PTEWritable|vmx.PTEUser)
				f.g.setAD(0x7f0000400000)
				m[vmx.GuestRIP] = 0x7f0000400000 | ptRIP&0xfff
				m[vmx.GuestCR4] |= vmx.CR4SMEP
			},
			why: FallbackFetch},
		{name: "the operand is not the reported address", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) { r.RDI = elsewhere },
			why:   FallbackOperand},
		{name: "the operand translates elsewhere", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				f.g.mapPage(elsewhere, 0x500000, vmx.PTEWritable)
				f.g.setAD(elsewhere)
				r.RDI = elsewhere
				m[vmx.GuestLinearAddr] = elsewhere
			},
			why: FallbackAccess},
		{name: "the operand does not translate", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				r.RDI = elsewhere + 0x10000000
				m[vmx.GuestLinearAddr] = r.RDI
			},
			why: FallbackAccess},
		{name: "non-canonical", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				r.RDI = 0x8000_0000_0000_0000
				m[vmx.GuestLinearAddr] = r.RDI
			},
			why: FallbackAccess},
		{name: "a write across the page end", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				r.RDI = f.kva | 0xffc
				m[vmx.GuestLinearAddr] = r.RDI
			},
			why: FallbackOperand},
		{name: "cmpxchg16b misaligned: #GP", code: []byte{0xf0, 0x48, 0x0f, 0xc7, 0x0f},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				r.RDI = f.kva + 8
				m[vmx.GuestLinearAddr] = r.RDI
			},
			why: FallbackOperand},
		{name: "lock or not aligned: left to the processor", code: []byte{0xf0, 0x48, 0x09, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				r.RDI = f.kva + 4
				m[vmx.GuestLinearAddr] = r.RDI
			},
			why: FallbackOperand},
		{name: "xchg not aligned: left to the processor", code: []byte{0x87, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				r.RDI = f.kva + 2
				m[vmx.GuestLinearAddr] = r.RDI
			},
			why: FallbackOperand},
		{name: "memory without single-instruction stores", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				f.g.phys.Mem = struct{ hv.Memory }{f.g.mem}
			},
			why: FallbackMemory},
		{name: "a read-only mapping with CR0.WP", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				f.g.mapPage(elsewhere, f.pte&^0xfff, 0)
				f.g.setAD(elsewhere)
				r.RDI = elsewhere | f.pte&0xfff
				m[vmx.GuestLinearAddr] = r.RDI
			},
			why: FallbackAccess},
		{name: "a mapping not yet dirty", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				f.g.mapPage(elsewhere, f.pte&^0xfff, vmx.PTEWritable|vmx.PTEAccessed)
				r.RDI = elsewhere | f.pte&0xfff
				m[vmx.GuestLinearAddr] = r.RDI
			},
			why: FallbackAccess},
		{name: "protection keys for supervisor pages", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) { m[vmx.GuestCR4] |= vmx.CR4PKS },
			why:   FallbackAccess},
		{name: "a user page under SMAP", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) {
				f.g.mapPage(0x7f0000600000, f.pte&^0xfff, vmx.PTEWritable|vmx.PTEUser)
				f.g.setAD(0x7f0000600000)
				r.RDI = 0x7f0000600000 | f.pte&0xfff
				m[vmx.GuestLinearAddr] = r.RDI
				m[vmx.GuestCR4] |= vmx.CR4SMAP
			},
			why: FallbackAccess},
		{name: "CPL 3", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) { m[vmx.GuestSSAccess] |= 3 << 5 },
			why:   FallbackMode},
		{name: "compatibility mode", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) { m[vmx.GuestCSAccess] = 0xc09b },
			why:   FallbackMode},
		{name: "single-step", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) { m[vmx.GuestRFLAGS] |= vmx.RFLAGSTF },
			why:   FallbackDebug},
		{name: "a breakpoint enabled", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) { m[vmx.GuestDR7] |= 2 },
			why:   FallbackDebug},
		{name: "during event delivery", code: []byte{0x48, 0x89, 0x07},
			setup: func(f *ptFixture, m map[vmx.Field]uint64, r *vmx.GuestRegs) { m[vmx.IDTVectoringInfo] = 0x80000b0e },
			why:   FallbackEvent},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newPTFixture(t, swapPTE)
			f.code(c.code...)
			var rip uint64
			steps := []vcputest.Step{
				write(f.kva, f.pte, nil, func(t *testing.T, v *hv.VCPU) {
					assert.Equal(t, rip, v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP], "RIP left")
					_, perm, _, _, _ := f.g.ept.Lookup(f.pte &^ 0xfff)
					assert.Equal(t, ept.RWX, perm, "the page opened")
					assert.Equal(t, uint64(swapPTE), f.g.mem.get64(f.pte), "memory left to the processor")
					assert.Empty(t, f.heard)
					// The guest does the write.
					f.g.mem.put64(f.pte, newPTE)
				}),
				{Reason: vmx.ExitCPUID, Check: func(t *testing.T, v *hv.VCPU) {
					f.protected(t)
					assert.Len(t, f.heard, 1, "settled at the next exit")
				}},
			}
			v := f.vcpu(t, steps)
			m := v.VMCS.(*hvtest.VMCS).Fields
			m[vmx.GuestDR7] = 0x400
			steps[0].Regs = func(r *vmx.GuestRegs) {
				r.RDI, r.RAX = f.kva, newPTE
				if c.setup != nil {
					c.setup(f, m, r)
				}
				rip = m[vmx.GuestRIP]
			}
			delete(steps[0].Fields, vmx.GuestRIP)
			m[vmx.GuestRIP] = ptRIP
			m[vmx.IDTVectoringError] = 0
			require.NoError(t, v.Run())
			assert.Zero(t, f.gm.Emulated)
			assert.Equal(t, uint64(1), f.gm.Opened)
			assert.Equal(t, uint64(1), f.gm.Fallbacks[c.why], "%v", f.gm.Fallbacks)
		})
	}
}

// TestPTWriteAllocations measures the exit path of an emulated write: it
// allocates nothing.
func TestPTWriteAllocations(t *testing.T) {
	f := newPTFixture(t, swapPTE)
	f.code(0x48, 0x89, 0x07)
	v := f.vcpu(t, nil)
	m := v.VMCS.(*hvtest.VMCS).Fields
	m[vmx.GuestLinearAddr] = f.kva
	v.Regs.RDI = f.kva
	e := &vmx.Exit{Reason: vmx.ExitEPTViolation, RIP: ptRIP, Qualification: ptWriteQual, GuestPA: f.pte}
	next := func(*hv.VCPU, *vmx.Exit) (hv.Action, error) { t.Fatal("passed on"); return hv.Stop, nil }
	// A second watch on the same tables keeps them protected while the
	// first is walked again, as the many watches of a read do.
	_, err := f.gm.Watch(f.g.cr3, ptUser+0x1000, func(swapmem.Translation) {})
	require.NoError(t, err)
	i := 0
	allocs := testing.AllocsPerRun(200, func() {
		i++
		f.heard = f.heard[:0]
		v.Regs.RAX = newPTE
		if i%2 == 0 {
			v.Regs.RAX = swapPTE
		}
		if _, err := f.gm.onViolation(v, e, next); err != nil {
			t.Fatal(err)
		}
	})
	assert.Equal(t, uint64(201), f.gm.Emulated)
	assert.Equal(t, uint64(201), f.gm.Changes)
	assert.Zero(t, allocs, "allocations per emulated write")
}

func BenchmarkPTWrite(b *testing.B) {
	f := newPTFixture(b, swapPTE)
	f.code(0x48, 0x89, 0x07)
	v, m := vcputest.Scripted(&testing.T{}, nil)
	m.Fields[vmx.EntryControls] |= vmx.EntryIA32eMode
	m.Fields[vmx.GuestCSAccess] = 0xa09b
	m.Fields[vmx.GuestCR0] |= vmx.CR0PG | vmx.CR0WP
	m.Fields[vmx.GuestCR3] = f.g.cr3
	m.Fields[vmx.GuestLinearAddr] = f.kva
	v.Regs.RDI = f.kva
	e := &vmx.Exit{Reason: vmx.ExitEPTViolation, RIP: ptRIP, Qualification: ptWriteQual, GuestPA: f.pte}
	if _, err := f.gm.Watch(f.g.cr3, ptUser+0x1000, func(swapmem.Translation) {}); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		v.Regs.RAX = newPTE
		if i%2 == 0 {
			v.Regs.RAX = swapPTE
		}
		f.heard = f.heard[:0]
		if _, err := f.gm.onViolation(v, e, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzPTWrite runs the page-table-write emulator on random instruction
// bytes, registers, flags and reported addresses: it never panics, and
// when it emulates, it wrote inside the watched page only, moved RIP by
// the instruction's length and kept the page protected; when it does
// not, it changed nothing but opened the page.
func FuzzPTWrite(f *testing.F) {
	for _, c := range [][]byte{
		{0x48, 0x89, 0x07},                         // mov %rax,(%rdi)
		{0x48, 0xc7, 0x07, 0, 0, 0, 0},             // movq $0,(%rdi)
		{0x89, 0x07},                               // mov %eax,(%rdi)
		{0x48, 0x87, 0x07},                         // xchg %rax,(%rdi)
		{0xf0, 0x48, 0x0f, 0xb1, 0x17},             // lock cmpxchg %rdx,(%rdi)
		{0xf0, 0x0f, 0xc7, 0x0f},                   // lock cmpxchg8b (%rdi)
		{0xf0, 0x48, 0x0f, 0xc7, 0x0f},             // lock cmpxchg16b (%rdi)
		{0xf0, 0x80, 0x27, 0xfd},                   // lock andb $0xfd,(%rdi)
		{0xf0, 0x80, 0x0f, 0x02},                   // lock orb $2,(%rdi)
		{0xf0, 0x48, 0x0f, 0xba, 0x37, 0x05},       // lock btrq $5,(%rdi)
		{0xf0, 0x48, 0x0f, 0xab, 0x07},             // lock bts %rax,(%rdi)
		{0x48, 0x0f, 0xc3, 0x07},                   // movnti %rax,(%rdi)
		{0x65, 0x48, 0x89, 0x04, 0x25, 0, 0, 0, 0}, // mov %rax,%gs:0
		{0x4c, 0x89, 0x64, 0xcb, 0x08},             // mov %r12,0x8(%rbx,%rcx,8)
	} {
		f.Add(c, uint64(0), uint64(newPTE), uint64(0), uint64(0), uint64(0x2), uint64(0), true)
	}
	f.Fuzz(func(t *testing.T, code []byte, rdiOff, rax, rcx, rdx, rflags, gla uint64, glaIsRDI bool) {
		if len(code) > vmx.MaxInstructionLen {
			code = code[:vmx.MaxInstructionLen]
		}
		fx := newPTFixture(t, swapPTE)
		fx.code(code...)
		v := fx.vcpu(t, nil)
		m := v.VMCS.(*hvtest.VMCS).Fields
		v.Regs = vmx.GuestRegs{RAX: rax, RCX: rcx, RDX: rdx, RBX: fx.kva - rdiOff, RSI: fx.kva, RDI: fx.kva + rdiOff%64, R12: rax}
		m[vmx.GuestRSP] = fx.kva
		m[vmx.GuestRFLAGS] = rflags&^vmx.RFLAGSTF | 0x2
		m[vmx.GuestDR7] = 0x400
		m[vmx.GuestGSBase] = fx.kva
		m[vmx.GuestFSBase] = fx.kva - 8
		if glaIsRDI {
			gla = v.Regs.RDI
		}
		m[vmx.GuestLinearAddr] = gla
		gpa := fx.pte&^0xfff | gla&0xfff
		e := &vmx.Exit{Reason: vmx.ExitEPTViolation, RIP: ptRIP, Qualification: ptWriteQual, GuestPA: gpa}
		before := map[uint64][4096]byte{}
		for pa, frame := range fx.g.mem {
			before[pa] = *frame
		}
		regs := v.Regs
		next := func(*hv.VCPU, *vmx.Exit) (hv.Action, error) { t.Fatal("passed on"); return hv.Stop, nil }
		act, err := fx.gm.onViolation(v, e, next)
		require.NoError(t, err)
		assert.Equal(t, hv.Resume, act)
		for pa, frame := range fx.g.mem {
			if pa != fx.pte&^0xfff {
				assert.Equal(t, before[pa], *frame, "frame %#x changed", pa)
			}
		}
		_, perm, _, _, _ := fx.g.ept.Lookup(fx.pte &^ 0xfff)
		if fx.gm.Emulated == 1 {
			n := m[vmx.GuestRIP] - ptRIP
			inst, err := x86asm.Decode(fx.gm.emu.insn[:], 64)
			require.NoError(t, err)
			assert.Equal(t, uint64(inst.Len), n, "RIP moved past %v", inst)
			if fx.gm.Failed == 0 { // else the watch is gone, and its protection
				assert.Equal(t, ept.Read|ept.Exec, perm)
			}
			return
		}
		assert.Equal(t, uint64(1), fx.gm.Opened)
		assert.Equal(t, uint64(ptRIP), m[vmx.GuestRIP])
		assert.Equal(t, regs, v.Regs)
		assert.Equal(t, rflags&^vmx.RFLAGSTF|0x2, m[vmx.GuestRFLAGS])
		assert.Equal(t, before[fx.pte&^0xfff], *fx.g.mem[fx.pte&^0xfff])
		assert.Equal(t, ept.RWX, perm)
	})
}

// TestRewalkKeepsProtection: an emulated write walks the watch again; the
// watch is alone on its pages, and their protection stays through the
// walk. Before, the walk gave the four pages' protection back and took it
// again: an EPT merge, a split and an INVEPT on every write.
func TestRewalkKeepsProtection(t *testing.T) {
	f := newPTFixture(t, swapPTE)
	f.code(0x48, 0x89, 0x07)
	flushes, freed := f.g.flushes, f.g.phys.Freed
	v := f.vcpu(t, []vcputest.Step{write(f.kva, f.pte, func(r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, newPTE }, nil)})
	require.NoError(t, v.Run())
	require.Len(t, f.heard, 1)
	assert.True(t, f.heard[0].Present)
	assert.Equal(t, flushes, f.g.flushes, "no INVEPT")
	assert.Equal(t, freed, f.g.phys.Freed, "no table merged")
	assert.Equal(t, 4, f.gm.Watches())
	f.protected(t)
}

// TestPTWriteWalksTheWatchesOfItsEntry: an emulated write walks again
// every watch whose walk read the entry it wrote, and no other watch on
// the page. A PTE write walks its one watch, not its neighbour's on the
// same page table; a write of the page directory entry the two share
// walks both, and, taking the page table out of their walks, gives its
// protection back.
func TestPTWriteWalksTheWatchesOfItsEntry(t *testing.T) {
	f := newPTFixture(t, swapPTE)
	f.code(0x48, 0x89, 0x07)
	pde := f.g.entry(ptUser, 2)
	pdKVA := directMap + pde
	f.g.mapPage(pdKVA&^0xfff, pde&^0xfff, vmx.PTEWritable)
	f.g.setAD(pdKVA)
	f.g.mapPage(ptUser+0x1000, 0x301000, vmx.PTEWritable|vmx.PTEUser)
	var other []swapmem.Translation
	_, err := f.gm.Watch(f.g.cr3, ptUser+0x1000, func(tr swapmem.Translation) { other = append(other, tr) })
	require.NoError(t, err)
	require.Equal(t, 4, f.gm.Watches())
	pdWrite := write(pdKVA, pde, func(r *vmx.GuestRegs) { r.RDI, r.RAX = pdKVA, 0 }, func(t *testing.T, v *hv.VCPU) {
		assert.Equal(t, uint64(3), f.gm.Rewalks, "both watches of the directory entry walked")
		require.Len(t, f.heard, 2)
		assert.False(t, f.heard[1].Present)
		require.Len(t, other, 1)
		assert.False(t, other[0].Present)
		assert.Equal(t, 3, f.gm.Watches(), "the page table is no watch's any more")
		assert.Len(t, f.gm.entries, 3, "the PML4, PDPT and PD entries: the PTEs are no walk's any more")
	})
	v := f.vcpu(t, []vcputest.Step{
		write(f.kva, f.pte, func(r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, newPTE }, func(t *testing.T, v *hv.VCPU) {
			assert.Equal(t, uint64(1), f.gm.Rewalks, "the PTE's one watch walked")
			require.Len(t, f.heard, 1)
			assert.True(t, f.heard[0].Present)
			assert.Empty(t, other, "the neighbour's entry did not change")
			assert.Len(t, f.gm.entries, 5, "the PML4, PDPT and PD entries, and two PTEs")
		}),
		pdWrite,
	})
	require.NoError(t, v.Run())
	_, perm, _, _, _ := f.g.ept.Lookup(f.pte &^ 0xfff)
	assert.Equal(t, ept.RWX, perm, "the page table's protection given back")
}

// refusingWrites is host memory that reads but refuses every change.
type refusingWrites struct{ frameMem }

var errRefused = errors.New("refused")

func (refusingWrites) WritePhys(uint64, []byte) error          { return errRefused }
func (refusingWrites) CopyPhys(uint64, uint64, uint64) error   { return errRefused }
func (refusingWrites) Store(uint64, int, uint64) error         { return errRefused }
func (refusingWrites) Or(uint64, int, uint64) (uint64, error)  { return 0, errRefused }
func (refusingWrites) And(uint64, int, uint64) (uint64, error) { return 0, errRefused }
func (refusingWrites) Xor(uint64, int, uint64) (uint64, error) { return 0, errRefused }
func (refusingWrites) Exchange(uint64, int, uint64) (uint64, error) {
	return 0, errRefused
}
func (refusingWrites) CompareExchange(uint64, int, uint64, uint64) (uint64, bool, error) {
	return 0, false, errRefused
}
func (refusingWrites) CompareExchange16(uint64, [2]uint64, [2]uint64) ([2]uint64, bool, error) {
	return [2]uint64{}, false, errRefused
}
func (refusingWrites) BitTestAndSet(uint64, int, uint) (bool, error)   { return false, errRefused }
func (refusingWrites) BitTestAndReset(uint64, int, uint) (bool, error) { return false, errRefused }

// TestRefusedWriteLeavesRegisters: should guest RAM refuse the
// instruction's change, no register changes and the page is opened for
// the processor to run it.
func TestRefusedWriteLeavesRegisters(t *testing.T) {
	for _, c := range []struct {
		name string
		code []byte
		regs func(f *ptFixture, r *vmx.GuestRegs)
	}{
		{"xchg %rax,(%rdi)", []byte{0x48, 0x87, 0x07}, func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, newPTE }},
		{"xchg %rsp,(%rdi)", []byte{0x48, 0x87, 0x27}, func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva }},
		{"lock cmpxchg %rdx,(%rdi)", []byte{0xf0, 0x48, 0x0f, 0xb1, 0x17}, func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, 1 }},
		{"lock cmpxchg16b (%rdi)", []byte{0xf0, 0x48, 0x0f, 0xc7, 0x0f}, func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, 1 }},
		{"lock orq $1,(%rdi)", []byte{0xf0, 0x48, 0x83, 0x0f, 0x01}, func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva }},
		{"lock btsq $1,(%rdi)", []byte{0xf0, 0x48, 0x0f, 0xba, 0x2f, 0x01}, func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva }},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newPTFixture(t, swapPTE)
			f.code(c.code...)
			f.g.phys.Mem = refusingWrites{f.g.mem}
			var before vmx.GuestRegs
			v := f.vcpu(t, []vcputest.Step{write(f.kva, f.pte, func(r *vmx.GuestRegs) {
				c.regs(f, r)
				before = *r
			}, func(t *testing.T, v *hv.VCPU) {
				assert.Equal(t, before, v.Regs)
				assert.Equal(t, uint64(0x1234), v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRSP])
				assert.Equal(t, uint64(ptRIP), v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRIP])
			})})
			v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRSP] = 0x1234
			require.NoError(t, v.Run())
			assert.Equal(t, uint64(1), f.gm.Fallbacks[FallbackMemory])
		})
	}
}

// TestPTWriteNoAllocations: an emulated MOV and LOCK CMPXCHG, through
// the EPT-violation handler, allocate nothing.
func TestPTWriteNoAllocations(t *testing.T) {
	for _, c := range []struct {
		name string
		code []byte
		regs func(r *vmx.GuestRegs, old, new uint64)
	}{
		{"mov %rax,(%rdi)", []byte{0x48, 0x89, 0x07}, func(r *vmx.GuestRegs, _, new uint64) { r.RAX = new }},
		{"lock cmpxchg %rdx,(%rdi)", []byte{0xf0, 0x48, 0x0f, 0xb1, 0x17},
			func(r *vmx.GuestRegs, old, new uint64) { r.RAX, r.RDX = old, new }},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newPTFixture(t, swapPTE)
			f.code(c.code...)
			v := f.vcpu(t, nil)
			m := v.VMCS.(*hvtest.VMCS).Fields
			m[vmx.GuestLinearAddr] = f.kva
			v.Regs.RDI = f.kva
			e := &vmx.Exit{Reason: vmx.ExitEPTViolation, RIP: ptRIP, Qualification: ptWriteQual, GuestPA: f.pte}
			next := func(*hv.VCPU, *vmx.Exit) (hv.Action, error) { t.Fatal("passed on"); return hv.Stop, nil }
			// A second watch on the same tables keeps them protected
			// while the first is walked again, as a read's watches do.
			_, err := f.gm.Watch(f.g.cr3, ptUser+0x1000, func(tr swapmem.Translation) {})
			require.NoError(t, err)
			i := 0
			allocs := testing.AllocsPerRun(200, func() {
				i++
				old, new := uint64(swapPTE), uint64(newPTE)
				if i%2 == 0 {
					old, new = new, old
				}
				f.heard = f.heard[:0]
				c.regs(&v.Regs, old, new)
				if _, err := f.gm.onViolation(v, e, next); err != nil {
					t.Fatal(err)
				}
				if f.g.mem.get64(f.pte) != new {
					t.Fatalf("PTE %#x, want %#x", f.g.mem.get64(f.pte), new)
				}
			})
			assert.Equal(t, uint64(201), f.gm.Emulated)
			assert.Equal(t, uint64(201), f.gm.Changes)
			assert.Zero(t, allocs, "allocations per emulated write")
		})
	}
}
