package x86emu

import (
	"math/rand"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/arch/x86/x86asm"

	"github.com/tamahv/tamahv/vmx"
)

// x86asm is the reference Decode is checked against: every byte
// string Decode accepts must decode, with x86asm, to the same
// instruction, operands, length and memory operand.

var x86Ops = map[Op]x86asm.Op{
	OpMOV: x86asm.MOV, OpMOVNTI: x86asm.MOVNTI, OpXCHG: x86asm.XCHG, OpCMPXCHG: x86asm.CMPXCHG,
	OpCMPXCHG8B: x86asm.CMPXCHG8B, OpCMPXCHG16B: x86asm.CMPXCHG16B, OpOR: x86asm.OR, OpAND: x86asm.AND,
	OpXOR: x86asm.XOR, OpBTS: x86asm.BTS, OpBTR: x86asm.BTR,
}

// x86Reg is r as x86asm names it.
func x86Reg(r Reg) x86asm.Reg {
	n := x86asm.Reg(r.Num)
	switch {
	case r.High:
		return x86asm.AH + n
	case r.Size == 1 && n < 4:
		return x86asm.AL + n
	case r.Size == 1 && n < 8:
		return x86asm.SPB + n - 4
	case r.Size == 1:
		return x86asm.R8B + n - 8
	case r.Size == 2:
		return x86asm.AX + n
	case r.Size == 4:
		return x86asm.EAX + n
	}
	return x86asm.RAX + n
}

// x86Mem is m as x86asm decodes it in 64-bit mode.
func x86Mem(m Mem) x86asm.Mem {
	x := x86asm.Mem{Scale: m.Scale, Disp: m.Disp}
	switch m.Base {
	case MemNone:
	case MemRIP:
		x.Base = x86asm.RIP
	default:
		x.Base = x86asm.RAX + x86asm.Reg(m.Base)
	}
	if m.Index != MemNone {
		x.Index = x86asm.RAX + x86asm.Reg(m.Index)
	}
	switch m.Seg {
	case SegFS:
		x.Segment = x86asm.FS
	case SegGS:
		x.Segment = x86asm.GS
	}
	return x
}

// sameAsX86asm checks in, decoded from b, against x86asm's decoding.
func sameAsX86asm(t *testing.T, b []byte, in *Insn) {
	t.Helper()
	inst, err := x86asm.Decode(b, 64)
	require.NoError(t, err, "% x", b)
	require.Equal(t, x86Ops[in.Op], inst.Op, "% x: %v", b, inst)
	assert.Equal(t, in.Len, inst.Len, "% x: %v: length", b, inst)
	assert.Equal(t, in.Size, inst.MemBytes, "% x: %v: operand size", b, inst)
	assert.Equal(t, 64, inst.AddrSize, "% x: %v", b, inst)
	a0, a1 := inst.Args[0], inst.Args[1]
	if _, ok := a1.(x86asm.Mem); ok && inst.Op == x86asm.XCHG {
		a0, a1 = a1, a0
	}
	assert.Equal(t, x86Mem(in.Mem), a0, "% x: %v: memory operand", b, inst)
	switch {
	case in.HasImm:
		imm, ok := a1.(x86asm.Imm)
		require.True(t, ok, "% x: %v: an immediate", b, inst)
		if in.Op == OpBTS || in.Op == OpBTR {
			assert.Equal(t, uint8(imm), uint8(in.Imm), "% x: %v: bit offset", b, inst)
		} else {
			assert.Equal(t, uint64(imm)&SizeMask(in.Size), in.Imm, "% x: %v: immediate", b, inst)
		}
	case in.Reg.Size != 0:
		assert.Equal(t, x86Reg(in.Reg), a1, "% x: %v: register", b, inst)
		assert.Equal(t, int(in.Reg.Size), min(in.Size, 8), "% x: %v", b, inst)
	default:
		assert.Nil(t, a1, "% x: %v", b, inst)
		assert.Contains(t, []Op{OpCMPXCHG8B, OpCMPXCHG16B}, in.Op)
	}
	assert.Nil(t, inst.Args[2])
	lock := false
	for _, p := range inst.Prefix {
		if p == 0 {
			break
		}
		assert.Zero(t, p&x86asm.PrefixInvalid, "% x: %v: an invalid prefix", b, inst)
		if p&0xff == 0xf0 {
			lock = true
		}
		switch byte(p) {
		case 0xf2, 0xf3, 0x67, 0xc4, 0xc5, 0x62:
			t.Errorf("% x: %v: prefix %v accepted", b, inst, p)
		}
	}
	assert.Equal(t, hasLock(b), lock, "% x: %v: LOCK", b, inst)
}

// hasLock reports whether b's legacy prefixes include LOCK.
func hasLock(b []byte) bool {
	for _, p := range b {
		switch p {
		case vmx.PrefixLock:
			return true
		case vmx.PrefixOpSize, vmx.PrefixES, vmx.PrefixCS, vmx.PrefixSS, vmx.PrefixDS, vmx.PrefixFS, vmx.PrefixGS:
		default:
			return false
		}
	}
	return false
}

// oldDecode is the decoding the emulator did before Decode: x86asm
// and the checks on its result. It is kept as the reference of which
// forms must still be emulated.
func oldDecode(b []byte) (Insn, bool) {
	var in Insn
	inst, err := x86asm.Decode(b, 64)
	if err != nil || inst.Mode != 64 || inst.AddrSize != 64 || inst.Len <= 0 || inst.Len > vmx.MaxInstructionLen {
		return in, false
	}
	lock, segs := false, 0
	for _, p := range inst.Prefix {
		if p == 0 {
			break
		}
		if p&(x86asm.PrefixIgnored|x86asm.PrefixInvalid) != 0 {
			return in, false
		}
		p &^= x86asm.PrefixImplicit
		switch b := byte(p); {
		case b == 0xf0:
			lock = true
		case b == 0x66:
		case b == 0x26 || b == 0x2e || b == 0x36 || b == 0x3e || b == 0x64 || b == 0x65:
			segs++
		case b&0xf0 == 0x40 && p&0xff00 == 0:
		default:
			return in, false
		}
	}
	if segs > 1 || inst.Args[2] != nil {
		return in, false
	}
	for op, x := range x86Ops {
		if x == inst.Op {
			in.Op = op
		}
	}
	in.Size, in.Len = inst.MemBytes, inst.Len
	a0, a1 := inst.Args[0], inst.Args[1]
	switch inst.Op {
	case x86asm.MOV, x86asm.MOVNTI:
		if lock {
			return in, false
		}
	case x86asm.XCHG:
		if _, ok := a1.(x86asm.Mem); ok {
			a0, a1 = a1, a0
		}
		if _, ok := a1.(x86asm.Reg); !ok {
			return in, false
		}
	case x86asm.CMPXCHG:
		if _, ok := a1.(x86asm.Reg); !ok {
			return in, false
		}
	case x86asm.CMPXCHG8B, x86asm.CMPXCHG16B:
		if a1 != nil || in.Size != 8 && inst.Op == x86asm.CMPXCHG8B || in.Size != 16 && inst.Op == x86asm.CMPXCHG16B {
			return in, false
		}
	case x86asm.OR, x86asm.AND, x86asm.XOR, x86asm.BTS, x86asm.BTR:
	default:
		return in, false
	}
	mem, ok := a0.(x86asm.Mem)
	if !ok || in.Size == 16 && inst.Op != x86asm.CMPXCHG16B || in.Size != 16 && in.Size > 8 || in.Size == 0 || in.Size == 3 {
		return in, false
	}
	switch a := a1.(type) {
	case nil:
		if in.Op != OpCMPXCHG8B && in.Op != OpCMPXCHG16B {
			return in, false
		}
	case x86asm.Reg:
		r, ok := regOf(a)
		if !ok || int(r.Size) != in.Size {
			return in, false
		}
		in.Reg = r
	case x86asm.Imm:
		if in.Op == OpMOVNTI || in.Op == OpXCHG || in.Op == OpCMPXCHG {
			return in, false
		}
		in.Imm, in.HasImm = uint64(a)&SizeMask(in.Size), true
		if in.Op == OpBTS || in.Op == OpBTR {
			in.Imm &= 0xff
		}
	default:
		return in, false
	}
	if (in.Op == OpBTS || in.Op == OpBTR) && in.Size == 1 {
		return in, false
	}
	in.Mem = Mem{Base: MemNone, Index: MemNone, Scale: mem.Scale, Disp: mem.Disp}
	switch mem.Base {
	case 0:
	case x86asm.RIP:
		in.Mem.Base = MemRIP
	default:
		r, ok := regOf(mem.Base)
		if !ok || r.Size != 8 {
			return in, false
		}
		in.Mem.Base = int8(r.Num)
	}
	if mem.Index != 0 {
		r, ok := regOf(mem.Index)
		if !ok || r.Size != 8 || r.Num == 4 {
			return in, false
		}
		in.Mem.Index = int8(r.Num)
	}
	switch mem.Segment {
	case 0, x86asm.ES, x86asm.CS, x86asm.SS, x86asm.DS:
	case x86asm.FS:
		in.Mem.Seg = SegFS
	case x86asm.GS:
		in.Mem.Seg = SegGS
	default:
		return in, false
	}
	return in, true
}

// regOf is the general-purpose register r.
func regOf(r x86asm.Reg) (Reg, bool) {
	switch {
	case r >= x86asm.AL && r <= x86asm.BL:
		return Reg{Num: uint8(r - x86asm.AL), Size: 1}, true
	case r >= x86asm.AH && r <= x86asm.BH:
		return Reg{Num: uint8(r - x86asm.AH), Size: 1, High: true}, true
	case r >= x86asm.SPB && r <= x86asm.DIB:
		return Reg{Num: uint8(r-x86asm.SPB) + 4, Size: 1}, true
	case r >= x86asm.R8B && r <= x86asm.R15B:
		return Reg{Num: uint8(r-x86asm.R8B) + 8, Size: 1}, true
	case r >= x86asm.AX && r <= x86asm.R15W:
		return Reg{Num: uint8(r - x86asm.AX), Size: 2}, true
	case r >= x86asm.EAX && r <= x86asm.R15L:
		return Reg{Num: uint8(r - x86asm.EAX), Size: 4}, true
	case r >= x86asm.RAX && r <= x86asm.R15:
		return Reg{Num: uint8(r - x86asm.RAX), Size: 8}, true
	}
	return Reg{}, false
}

// refusedOnPurpose reports whether b is a form the old decoding emulated
// and Decode refuses: an operand-size prefix where the SDM gives it
// no meaning (MOVNTI is "NP": #UD; CMPXCHG8B).
func refusedOnPurpose(b []byte) bool {
	inst, err := x86asm.Decode(b, 64)
	if err != nil {
		return false
	}
	has66 := false
	for _, p := range inst.Prefix {
		has66 = has66 || byte(p) == 0x66
	}
	return has66 && (inst.Op == x86asm.MOVNTI || inst.Op == x86asm.CMPXCHG8B)
}

// acceptedOnPurpose reports whether b is a form Decode accepts and
// the old decoding refused: one ES, CS, SS or DS override, which 64-bit
// mode ignores (x86asm marks it so).
func acceptedOnPurpose(b []byte) bool {
	for _, p := range b {
		switch p {
		case vmx.PrefixES, vmx.PrefixCS, vmx.PrefixSS, vmx.PrefixDS:
			return true
		case vmx.PrefixLock, vmx.PrefixOpSize, vmx.PrefixFS, vmx.PrefixGS:
		default:
			return false
		}
	}
	return false
}

// checkDecode decodes b with Decode and the old decoding and checks
// them against each other and x86asm; it returns Decode's result.
func checkDecode(t *testing.T, b []byte) (Insn, bool) {
	t.Helper()
	var in Insn
	ok := Decode(b, &in)
	old, oldOK := oldDecode(b)
	if ok {
		sameAsX86asm(t, b, &in)
	}
	switch {
	case ok && oldOK:
		assert.Equal(t, old, in, "% x", b)
	case oldOK:
		assert.True(t, refusedOnPurpose(b), "% x: emulated before, refused now: %+v", b, old)
	case ok:
		assert.True(t, acceptedOnPurpose(b), "% x: refused before, accepted now: %+v", b, in)
	}
	return in, ok
}

// ptForms are the forms Linux writes page-table entries with, and the
// other forms the emulator took before: each is accepted, and decoded as
// x86asm and the old decoding did.
var ptForms = [][]byte{
	{0x48, 0x89, 0x07},                                     // mov %rax,(%rdi): set_pte
	{0x4c, 0x89, 0x64, 0xcb, 0x08},                         // mov %r12,0x8(%rbx,%rcx,8)
	{0x48, 0x89, 0x05, 0x10, 0x20, 0x30, 0xf0},             // mov %rax,disp(%rip)
	{0x65, 0x48, 0x89, 0x04, 0x25, 0x10, 0, 0, 0},          // mov %rax,%gs:0x10
	{0x64, 0x48, 0x89, 0x04, 0x25, 0xf0, 0xff, 0xff, 0xff}, // mov %rax,%fs:-0x10
	{0x48, 0xc7, 0x07, 0, 0, 0, 0},                         // movq $0,(%rdi): pte_clear
	{0x48, 0xc7, 0x07, 0xfd, 0xff, 0xff, 0xff},             // movq $-3,(%rdi)
	{0x48, 0xc7, 0x47, 0x08, 0xfd, 0xff, 0xff, 0xff},       // movq $-3,8(%rdi)
	{0xc7, 0x07, 0xfd, 0xff, 0xff, 0xff},                   // movl $-3,(%rdi)
	{0x66, 0xc7, 0x07, 0x34, 0x12},                         // movw $0x1234,(%rdi)
	{0xc6, 0x07, 0x80},                                     // movb $0x80,(%rdi)
	{0x89, 0x07},                                           // mov %eax,(%rdi)
	{0x88, 0x27},                                           // mov %ah,(%rdi)
	{0x40, 0x88, 0x37},                                     // mov %sil,(%rdi)
	{0x66, 0x44, 0x89, 0x0f},                               // mov %r9w,(%rdi)
	{0x49, 0x89, 0x04, 0x24},                               // mov %rax,(%r12)
	{0x49, 0x89, 0x45, 0x00},                               // mov %rax,0x0(%r13)
	{0x48, 0x89, 0x04, 0x24},                               // mov %rax,(%rsp)
	{0x48, 0x89, 0x84, 0x24, 0x00, 0x01, 0x00, 0x00},       // mov %rax,0x100(%rsp)
	{0x4a, 0x89, 0x04, 0x25, 0x00, 0x10, 0x00, 0x00},       // mov %rax,0x1000(,%r12,1)
	{0x4b, 0x89, 0x44, 0xe5, 0xf8},                         // mov %rax,-8(%r13,%r12,8)
	{0x48, 0x89, 0x04, 0x85, 0x00, 0x10, 0x00, 0x00},       // mov %rax,0x1000(,%rax,4)
	{0x48, 0xa3, 1, 2, 3, 4, 5, 6, 7, 0x88},                // movabs %rax,0x8807060504030201
	{0x65, 0xa2, 1, 2, 3, 4, 5, 6, 7, 8},                   // movabs %al,%gs:0x0807060504030201
	{0x48, 0x0f, 0xc3, 0x07},                               // movnti %rax,(%rdi)
	{0x0f, 0xc3, 0x07},                                     // movnti %eax,(%rdi)
	{0x48, 0x87, 0x07},                                     // xchg %rax,(%rdi): ptep_get_and_clear
	{0x87, 0x17},                                           // xchg %edx,(%rdi)
	{0xf0, 0x86, 0x27},                                     // lock xchg %ah,(%rdi)
	{0xf0, 0x48, 0x0f, 0xb1, 0x17},                         // lock cmpxchg %rdx,(%rdi): try_cmpxchg
	{0x0f, 0xb1, 0x17},                                     // cmpxchg %edx,(%rdi)
	{0xf0, 0x0f, 0xb0, 0x0f},                               // lock cmpxchg %cl,(%rdi)
	{0xf0, 0x0f, 0xc7, 0x0f},                               // lock cmpxchg8b (%rdi)
	{0xf0, 0x48, 0x0f, 0xc7, 0x0f},                         // lock cmpxchg16b (%rdi)
	{0xf0, 0x80, 0x27, 0xfd},                               // lock andb $0xfd,(%rdi): ptep_set_wrprotect
	{0xf0, 0x48, 0x83, 0x27, 0xfd},                         // lock andq $-3,(%rdi)
	{0xf0, 0x48, 0x81, 0x27, 0xff, 0xff, 0xff, 0x7f},       // lock andq $0x7fffffff,(%rdi)
	{0xf0, 0x66, 0x81, 0x0f, 0x00, 0x80},                   // lock orw $0x8000,(%rdi)
	{0xf0, 0x80, 0x0f, 0x02},                               // lock orb $2,(%rdi): set_bit
	{0xf0, 0x48, 0x09, 0x07},                               // lock or %rax,(%rdi)
	{0x48, 0x31, 0x07},                                     // xor %rax,(%rdi)
	{0x30, 0x07},                                           // xor %al,(%rdi)
	{0x48, 0x21, 0x07},                                     // and %rax,(%rdi)
	{0x83, 0x37, 0x01},                                     // xorl $1,(%rdi)
	{0xf0, 0x48, 0x0f, 0xba, 0x37, 0x05},                   // lock btrq $5,(%rdi): ptep_test_and_clear_young
	{0xf0, 0x48, 0x0f, 0xba, 0x2f, 0x3f},                   // lock btsq $63,(%rdi)
	{0x66, 0x0f, 0xba, 0x2f, 0x0f},                         // btsw $15,(%rdi)
	{0xf0, 0x48, 0x0f, 0xab, 0x07},                         // lock bts %rax,(%rdi)
	{0xf0, 0x48, 0x0f, 0xb3, 0x07},                         // lock btr %rax,(%rdi)
	{0xf0, 0x0f, 0xb3, 0x07},                               // lock btr %eax,(%rdi)
	{0xf0, 0x65, 0x48, 0x0f, 0xb1, 0x54, 0x8d, 0x80},       // lock cmpxchg %rdx,%gs:-0x80(%rbp,%rcx,4)
}

// TestDecodeWriteForms: the forms the emulator takes are decoded as
// x86asm and the emulator's old decoding did, with and without a
// displacement, an index, each REX bit.
func TestDecodeWriteForms(t *testing.T) {
	for _, b := range ptForms {
		in, ok := checkDecode(t, b)
		require.True(t, ok, "% x refused", b)
		_, oldOK := oldDecode(b)
		assert.True(t, oldOK, "% x: not emulated before", b)
		assert.Equal(t, len(b), in.Len, "% x", b)
		// Any bytes after the instruction are not part of it.
		in2, ok := checkDecode(t, append(append([]byte{}, b...), 0xcc, 0xcc, 0xcc))
		assert.True(t, ok)
		assert.Equal(t, in, in2)
	}
}

// TestDecodeWriteRefuses: what the emulator does not take is refused,
// including what x86asm decodes but the processor would not run as the
// form (a LOCK MOV, NP MOVNTI with 66) and any truncation of a form.
func TestDecodeWriteRefuses(t *testing.T) {
	for _, b := range [][]byte{
		{},
		{0x48, 0x01, 0x07},                   // add %rax,(%rdi)
		{0x48, 0x8b, 0x07},                   // mov (%rdi),%rax: a load
		{0x48, 0x89, 0xc7},                   // mov %rax,%rdi: no memory
		{0x48, 0x0f, 0xc7, 0xc8},             // register form of 0F C7 /1
		{0xf0, 0x48, 0x89, 0x07},             // lock mov: #UD
		{0xf0, 0x0f, 0xc3, 0x07},             // lock movnti: #UD
		{0xf0, 0xc6, 0x07, 0x01},             // lock movb: #UD
		{0xf3, 0x48, 0x89, 0x07},             // rep mov (XRELEASE)
		{0xf2, 0xf0, 0x48, 0x0f, 0xb1, 0x17}, // xacquire lock cmpxchg
		{0x67, 0x48, 0x89, 0x07},             // address size
		{0x66, 0x48, 0x89, 0x07},             // 66 under REX.W
		{0x66, 0x66, 0x89, 0x07},             // 66 twice
		{0xf0, 0xf0, 0x48, 0x09, 0x07},       // LOCK twice
		{0x65, 0x65, 0x48, 0x89, 0x07},       // GS twice
		{0x3e, 0x65, 0x48, 0x89, 0x07},       // two segment overrides
		{0x65, 0x3e, 0x48, 0x89, 0x07},
		{0x48, 0x66, 0x89, 0x07},             // REX before a legacy prefix
		{0x48, 0x48, 0x89, 0x07},             // two REX
		{0x66, 0x0f, 0xc3, 0x07},             // NP 0F C3 with 66
		{0x66, 0x0f, 0xc7, 0x0f},             // cmpxchg8b with 66
		{0x0f, 0xc7, 0x17},                   // 0F C7 /2
		{0x82, 0x0f, 0x01},                   // 82: invalid in 64-bit mode
		{0x80, 0x07, 0x01},                   // addb $1,(%rdi)
		{0xc6, 0x0f, 0x01},                   // C6 /1
		{0x48, 0x0f, 0xba, 0x27, 0x01},       // bt $1,(%rdi): no write
		{0x48, 0x0f, 0xba, 0x3f, 0x01},       // btc $1,(%rdi)
		{0x0f, 0xc0, 0x07},                   // xadd
		{0xc4, 0xe2, 0x79, 0x18, 0x07},       // VEX
		{0x62, 0xf1, 0x7c, 0x48, 0x11, 0x07}, // EVEX
		{0xf3, 0x48, 0xab},                   // rep stosq
		{0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x48, 0x89, 0x07},
	} {
		_, ok := checkDecode(t, b)
		assert.False(t, ok, "% x accepted", b)
	}
	for _, b := range ptForms {
		for n := range len(b) {
			_, ok := checkDecode(t, b[:n])
			assert.False(t, ok, "% x: %d bytes of it accepted", b, n)
		}
	}
	// The longest form: 14 bytes; those after it are not read.
	longest := []byte{0xf0, 0x65, 0x48, 0x81, 0x8c, 0x24, 1, 2, 3, 4, 0xff, 0xff, 0xff, 0x7f, 0x90, 0x90, 0x90}
	in, ok := checkDecode(t, longest)
	require.True(t, ok)
	assert.Equal(t, 14, in.Len)
}

// TestDecodeWriteIgnoredSegments: an ES, CS, SS or DS override is
// accepted and adds nothing (64-bit mode ignores it).
func TestDecodeWriteIgnoredSegments(t *testing.T) {
	for _, p := range []byte{vmx.PrefixES, vmx.PrefixCS, vmx.PrefixSS, vmx.PrefixDS} {
		in, ok := checkDecode(t, []byte{p, 0xf0, 0x48, 0x0f, 0xb1, 0x17})
		require.True(t, ok)
		assert.Equal(t, SegNone, in.Mem.Seg)
		assert.Equal(t, 6, in.Len)
	}
}

// TestDecodeWriteSweep decodes every one- and two-byte opcode with every
// ModR/M byte, under each prefix and REX combination that matters, with
// random SIB, displacement and immediate bytes after.
func TestDecodeWriteSweep(t *testing.T) {
	prefixes := [][]byte{nil, {0xf0}, {0x66}, {0x65}, {0xf0, 0x66, 0x64}, {0x2e}}
	rexes := []byte{0, 0x40, 0x41, 0x42, 0x44, 0x48, 0x4f}
	if testing.Short() {
		prefixes, rexes = prefixes[:2], []byte{0, 0x4f}
	}
	r := rand.New(rand.NewSource(1))
	var tail [12]byte
	accepted := 0
	for _, p := range prefixes {
		for _, rex := range rexes {
			for opc := range 512 {
				for modrm := range 256 {
					b := append([]byte{}, p...)
					if rex != 0 {
						b = append(b, rex)
					}
					if opc >= 256 {
						b = append(b, 0x0f)
					}
					b = append(b, byte(opc), byte(modrm))
					r.Read(tail[:])
					b = append(b, tail[:]...)
					if _, ok := checkDecode(t, b); ok {
						accepted++
					}
					if t.Failed() {
						return
					}
				}
			}
		}
	}
	t.Logf("%d accepted", accepted)
}

// FuzzDecodeWrite: on any bytes, Decode agrees with x86asm when it
// accepts, and accepts what the emulator took before (but the forms it
// refuses on purpose).
func FuzzDecodeWrite(f *testing.F) {
	for _, b := range ptForms {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkDecode(t, b)
	})
}

// BenchmarkDecodeWrite compares Decode with x86asm.Decode on the
// forms.
func BenchmarkDecodeWrite(b *testing.B) {
	b.Run("Decode", func(b *testing.B) {
		b.ReportAllocs()
		var in Insn
		for i := 0; b.Loop(); i++ {
			Decode(ptForms[i%len(ptForms)], &in)
		}
	})
	b.Run("x86asm", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			_, _ = x86asm.Decode(ptForms[i%len(ptForms)], 64)
		}
	})
}
