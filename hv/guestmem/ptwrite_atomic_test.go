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

// TestEmulatedWriteIsOneAccessOfItsWidth: each emulated instruction
// changes guest memory exactly once, with the single instruction of its
// own width: a store is one Store, a read-modify-write (locked in the
// guest or not) one locked operation; never a copy of bytes, never a
// read, a computation and a write.
func TestEmulatedWriteIsOneAccessOfItsWidth(t *testing.T) {
	rdi := func(off uint64) func(f *ptFixture, r *vmx.GuestRegs) {
		return func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX, r.RDX = f.kva+off, swapPTE, newPTE }
	}
	cases := []struct {
		name string
		code []byte
		off  uint64 // of the operand from the PTE
		regs func(f *ptFixture, r *vmx.GuestRegs)
		op   string
		size int
	}{
		{"mov %rax,(%rdi)", []byte{0x48, 0x89, 0x07}, 0, rdi(0), "Store", 8},
		{"mov %rax,(%rdi) not aligned", []byte{0x48, 0x89, 0x07}, 3, rdi(3), "Store", 8},
		{"movl $-3,(%rdi)", []byte{0xc7, 0x07, 0xfd, 0xff, 0xff, 0xff}, 4, rdi(4), "Store", 4},
		{"mov %dx,(%rdi)", []byte{0x66, 0x89, 0x17}, 6, rdi(6), "Store", 2},
		{"mov %ah,(%rdi)", []byte{0x88, 0x27}, 1, rdi(1), "Store", 1},
		{"movnti %rax,(%rdi)", []byte{0x48, 0x0f, 0xc3, 0x07}, 0, rdi(0), "Store", 8},
		{"xchg %rax,(%rdi)", []byte{0x48, 0x87, 0x07}, 0, rdi(0), "Exchange", 8},
		{"xchg %dx,(%rdi)", []byte{0x66, 0x87, 0x17}, 2, rdi(2), "Exchange", 2},
		{"lock cmpxchg %rdx,(%rdi)", []byte{0xf0, 0x48, 0x0f, 0xb1, 0x17}, 0, rdi(0), "CompareExchange", 8},
		{"cmpxchg %dl,(%rdi), not locked", []byte{0x0f, 0xb0, 0x17}, 0, rdi(0), "CompareExchange", 1},
		{"lock cmpxchg8b (%rdi)", []byte{0xf0, 0x0f, 0xc7, 0x0f}, 0, rdi(0), "CompareExchange", 8},
		{"lock cmpxchg16b (%rdi)", []byte{0xf0, 0x48, 0x0f, 0xc7, 0x0f}, 0, rdi(0), "CompareExchange16", 16},
		{"lock andb $0xfd,(%rdi)", []byte{0xf0, 0x80, 0x27, 0xfd}, 0, rdi(0), "And", 1},
		{"lock orw $2,(%rdi)", []byte{0xf0, 0x66, 0x83, 0x0f, 0x02}, 0, rdi(0), "Or", 2},
		{"or %eax,(%rdi), not locked", []byte{0x09, 0x07}, 4, rdi(4), "Or", 4},
		{"xor %rax,(%rdi), not locked", []byte{0x48, 0x31, 0x07}, 0, rdi(0), "Xor", 8},
		{"lock btrq $5,(%rdi)", []byte{0xf0, 0x48, 0x0f, 0xba, 0x37, 0x05}, 0, rdi(0), "BitTestAndReset", 8},
		{"bts %eax,(%rdi), not locked", []byte{0x0f, 0xab, 0x07}, 0,
			func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, 1 }, "BitTestAndSet", 4},
		{"lock bts %rax,(%rdi) past the operand", []byte{0xf0, 0x48, 0x0f, 0xab, 0x07}, 0,
			func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva-16, 2*64+1 }, "BitTestAndSet", 8},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newPTFixture(t, swapPTE)
			f.code(c.code...)
			rec := &recordingMem{frameMem: f.g.mem}
			f.g.phys.Mem = rec
			v := f.vcpu(t, []vcputest.Step{write(f.kva+c.off, f.pte+c.off, func(r *vmx.GuestRegs) { c.regs(f, r) }, nil)})
			require.NoError(t, v.Run())
			require.Equal(t, uint64(1), f.gm.Emulated, "emulated: %v", f.gm.Fallbacks)
			assert.Equal(t, []memChange{{c.op, f.pte + c.off, c.size}}, rec.changes)
		})
	}
}

// TestLockedUpdateKeepsAConcurrentChange: another processor changes the
// entry (its page walker sets the dirty bit) after anything the emulator
// read and before the emulated instruction's change. The locked operation
// keeps that change and reports it, as the guest's own locked instruction
// would: ptep_get_and_clear sees the entry dirty, try_cmpxchg fails and
// retries, and no bit another processor set is lost.
func TestLockedUpdateKeepsAConcurrentChange(t *testing.T) {
	const clean = newPTE &^ vmx.PTEDirty
	cases := []struct {
		name  string
		code  []byte
		regs  func(f *ptFixture, r *vmx.GuestRegs)
		mem   uint64 // the entry after
		check func(t *testing.T, v *hv.VCPU)
	}{
		{name: "lock andb $0xfd,(%rdi)", code: []byte{0xf0, 0x80, 0x27, 0xfd},
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva },
			mem:  newPTE &^ vmx.PTEWritable},
		{name: "lock orq %rax,(%rdi)", code: []byte{0xf0, 0x48, 0x09, 0x07},
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, 1<<62 },
			mem:  newPTE | 1<<62},
		{name: "lock btrq $5,(%rdi)", code: []byte{0xf0, 0x48, 0x0f, 0xba, 0x37, 0x05},
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI = f.kva },
			mem:  newPTE &^ vmx.PTEAccessed},
		{name: "ptep_get_and_clear: xchg %rax,(%rdi)", code: []byte{0x48, 0x87, 0x07},
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX = f.kva, 0 },
			mem:  0,
			check: func(t *testing.T, v *hv.VCPU) {
				assert.Equal(t, uint64(newPTE), v.Regs.RAX, "the old entry, dirty")
			}},
		{name: "lock cmpxchg %rdx,(%rdi) fails", code: []byte{0xf0, 0x48, 0x0f, 0xb1, 0x17},
			regs: func(f *ptFixture, r *vmx.GuestRegs) { r.RDI, r.RAX, r.RDX = f.kva, clean, clean&^vmx.PTEWritable },
			mem:  newPTE,
			check: func(t *testing.T, v *hv.VCPU) {
				assert.Equal(t, uint64(newPTE), v.Regs.RAX, "the entry as it is now")
				assert.Zero(t, v.VMCS.(*hvtest.VMCS).Fields[vmx.GuestRFLAGS]&vmx.RFLAGSZF, "ZF clear: the exchange failed")
			}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newPTFixture(t, clean)
			f.code(c.code...)
			rec := &recordingMem{frameMem: f.g.mem}
			f.g.phys.Mem = rec
			dirtied := false
			rec.concurrently = func() {
				if !dirtied {
					dirtied = true
					f.g.mem.put64(f.pte, f.g.mem.get64(f.pte)|vmx.PTEDirty)
				}
			}
			v := f.vcpu(t, []vcputest.Step{write(f.kva, f.pte, func(r *vmx.GuestRegs) { c.regs(f, r) }, func(t *testing.T, v *hv.VCPU) {
				if c.check != nil {
					c.check(t, v)
				}
			})})
			require.NoError(t, v.Run())
			require.Equal(t, uint64(1), f.gm.Emulated, "emulated: %v", f.gm.Fallbacks)
			assert.True(t, dirtied)
			assert.Equal(t, c.mem, f.g.mem.get64(f.pte), "the entry %#x", f.g.mem.get64(f.pte))
		})
	}
}
