// Package x86emu decodes and executes the x86 stores a monitor emulates
// on the guest's behalf: the forms Linux writes page-table entries and
// the local APIC's registers with (Decode), each carried out as one
// instruction of its width on guest memory (Execute, through an
// AtomicMemory), never a byte copy another processor could see torn.
package x86emu

import (
	"encoding/binary"

	"github.com/tamahv/tamahv/vmx"
)

// The decoder of the page-table-writing instructions (hv's ptwrite.go
// and apicwrite.go use it).
//
// Decode reads exactly the forms hv's emulateWrite handles, in 64-bit
// mode, into an Insn, and allocates nothing; any other byte string is
// refused, and the write is left to the processor. The encoding is that
// of the Intel SDM Vol. 2A, chapter 2, "Instruction Format": legacy
// prefixes, an optional REX prefix, the opcode, ModR/M, SIB,
// displacement, immediate. The forms, with the opcodes of each
// instruction's page in Vol. 2A and 2B:
//
//	MOV        88 /r, 89 /r              r/m ← r
//	           C6 /0 ib, C7 /0 iw/id     r/m ← imm (id sign-extended under REX.W)
//	           A2, A3                    moffs ← AL/AX/EAX/RAX (a 64-bit address)
//	MOVNTI     0F C3 /r                  m32/m64 ← r (no 66: "NP")
//	XCHG       86 /r, 87 /r              r/m, r
//	CMPXCHG    0F B0 /r, 0F B1 /r        r/m, r
//	CMPXCHG8B  0F C7 /1                  m64 (no 66)
//	CMPXCHG16B REX.W 0F C7 /1            m128 (no 66)
//	OR         08 /r, 09 /r, 80 /1 ib, 81 /1 iw/id, 83 /1 ib (sign-extended)
//	AND        20 /r, 21 /r, 80 /4 ib, 81 /4 iw/id, 83 /4 ib
//	XOR        30 /r, 31 /r, 80 /6 ib, 81 /6 iw/id, 83 /6 ib
//	BTS        0F AB /r, 0F BA /5 ib     r/m16/32/64
//	BTR        0F B3 /r, 0F BA /6 ib
//
// always with a memory destination (ModR/M.mod ≠ 3). Prefixes: at most
// one each of LOCK (not on MOV and MOVNTI: #UD), 66 (not with REX.W,
// which overrides it) and a segment override; FS and GS add their base,
// ES, CS, SS and DS have base 0 in 64-bit mode (SDM Vol. 3A, 3.4.4), and
// are accepted alone only, as are FS and GS; then a REX prefix right before the opcode. REP/REPNE
// (and so XACQUIRE/XRELEASE), the address-size prefix 67, VEX and EVEX
// are refused, as is a REX prefix followed by a legacy one.
//
// The tests check it against golang.org/x/arch/x86/x86asm: whenever it
// accepts a byte string, x86asm decodes the same instruction, operands,
// length and memory operand.

// Op is an emulated instruction.
type Op uint8

// The emulated instructions.
const (
	OpNone Op = iota
	OpMOV
	OpMOVNTI
	OpXCHG
	OpCMPXCHG
	OpCMPXCHG8B
	OpCMPXCHG16B
	OpOR
	OpAND
	OpXOR
	OpBTS
	OpBTR
)

// Seg is the segment override of a memory operand whose base counts in
// 64-bit mode.
type Seg uint8

// Segments.
const (
	SegNone Seg = iota // no override, or ES, CS, SS, DS: base 0
	SegFS
	SegGS
)

// Reg is a general-purpose register operand.
type Reg struct {
	Num  uint8 // RAX = 0 ... R15 = 15
	Size uint8 // 1, 2, 4 or 8 bytes; 0: no register
	High bool  // AH, CH, DH or BH: bits 15:8 of register num
}

// MemNone and MemRIP are Mem's base and index when there is no
// register, and its base for RIP-relative addressing.
const (
	MemNone = -1
	MemRIP  = 16
)

// Mem is a memory operand: seg:[base + index×scale + disp].
type Mem struct {
	Base  int8  // a 64-bit register number, memRIP or memNone
	Index int8  // a 64-bit register number or memNone
	Scale uint8 // 1, 2, 4 or 8 with a SIB byte, 0 without
	Disp  int64
	Seg   Seg
}

// Source operand kinds.
const (
	immNone     = iota
	imm8        // ib, zero-extended (BTS, BTR bit offsets; byte operands)
	imm8Signed  // ib, sign-extended to the operand size (83)
	immOperand  // iw or id (id sign-extended to 64 bits under REX.W)
	immMoffs    // no immediate: a 64-bit address (A2, A3)
	immModRMReg // none: the source is ModR/M.reg
)

// Decode decodes the instruction at the start of b (its first 15
// bytes at most) into in, when it is one of the emulated forms.
func Decode(b []byte, in *Insn) bool {
	*in = Insn{}
	if len(b) > vmx.MaxInstructionLen {
		b = b[:vmx.MaxInstructionLen]
	}
	var lock, opSize, seg bool
	i := 0
prefixes:
	for ; i < len(b); i++ {
		switch p := b[i]; p {
		case vmx.PrefixLock:
			if lock {
				return false
			}
			lock = true
		case vmx.PrefixOpSize:
			if opSize {
				return false
			}
			opSize = true
		case vmx.PrefixES, vmx.PrefixCS, vmx.PrefixSS, vmx.PrefixDS, vmx.PrefixFS, vmx.PrefixGS:
			if seg {
				return false // which wins is not the same everywhere
			}
			seg = true
			switch p {
			case vmx.PrefixFS:
				in.Mem.Seg = SegFS
			case vmx.PrefixGS:
				in.Mem.Seg = SegGS
			}
		default:
			break prefixes
		}
	}
	var rex byte
	if i < len(b) && b[i]&vmx.REXMask == vmx.REXBase {
		rex = b[i]
		i++
	}
	size := 4
	switch {
	case rex&vmx.REXW != 0:
		if opSize {
			return false // ignored under REX.W: refused like any stray prefix
		}
		size = 8
	case opSize:
		size = 2
	}
	if i >= len(b) {
		return false
	}
	opc := b[i]
	i++
	src := immModRMReg
	group := grpNone // the group whose operation ModR/M.reg selects
	if opc != vmx.OpcodeEscape {
		if opc&1 == 0 { // each one-byte form here: even is the byte form
			size = 1
		}
		switch opc {
		case 0x08, 0x09:
			in.Op = OpOR
		case 0x20, 0x21:
			in.Op = OpAND
		case 0x30, 0x31:
			in.Op = OpXOR
		case 0x86, 0x87:
			in.Op = OpXCHG
		case 0x88, 0x89:
			in.Op = OpMOV
		case 0x80:
			group, src = grp1, imm8
		case 0x81:
			group, src = grp1, immOperand
		case 0x83:
			group, src = grp1, imm8Signed
		case 0xc6:
			group, src = grp11, imm8
		case 0xc7:
			group, src = grp11, immOperand
		case 0xa2, 0xa3:
			in.Op, src = OpMOV, immMoffs
		default:
			return false
		}
	} else {
		if i >= len(b) {
			return false
		}
		opc = b[i]
		i++
		switch opc {
		case 0xb0:
			in.Op, size = OpCMPXCHG, 1
		case 0xb1:
			in.Op = OpCMPXCHG
		case 0xab:
			in.Op = OpBTS
		case 0xb3:
			in.Op = OpBTR
		case 0xba:
			group, src = grp8, imm8
		case 0xc3:
			if opSize {
				return false // NP 0F C3: #UD
			}
			in.Op = OpMOVNTI
		case 0xc7:
			if opSize {
				return false
			}
			group, src = grp9, immNone
		default:
			return false
		}
	}
	in.Size = size

	if src == immMoffs {
		// MOV moffs, rAX: no ModR/M; an address of the address size,
		// 64 bits (SDM Vol. 2A, "MOV—Move", note 3).
		if i+8 > len(b) {
			return false
		}
		in.Mem = Mem{Base: MemNone, Index: MemNone, Disp: int64(binary.LittleEndian.Uint64(b[i:])), Seg: in.Mem.Seg}
		in.Reg = Reg{Num: 0, Size: uint8(size)}
		i += 8
	} else {
		if i >= len(b) {
			return false
		}
		modrm := b[i]
		i++
		mod, reg, rm := modrm>>6, modrm>>3&7, modrm&7
		if mod == vmx.ModRMReg {
			return false
		}
		if group != grpNone {
			if !groupOp(group, reg, in) {
				return false
			}
		} else {
			in.Reg = gprOperand(reg|rexBit(rex, vmx.REXR, 3), size, rex != 0)
		}
		var ok bool
		if i, ok = in.Mem.decode(b, i, mod, rm, rex); !ok {
			return false
		}
	}

	var immLen int
	switch src {
	case imm8, imm8Signed:
		immLen = 1
	case immOperand:
		immLen = min(size, 4)
	}
	if i+immLen > len(b) {
		return false
	}
	switch src {
	case imm8:
		in.Imm, in.HasImm = uint64(b[i]), true
	case imm8Signed:
		in.Imm, in.HasImm = uint64(int64(int8(b[i])))&SizeMask(size), true
	case immOperand:
		if immLen == 2 {
			in.Imm = uint64(binary.LittleEndian.Uint16(b[i:]))
		} else {
			in.Imm = uint64(int64(int32(binary.LittleEndian.Uint32(b[i:])))) & SizeMask(size)
		}
		in.HasImm = true
	}
	i += immLen

	if lock && (in.Op == OpMOV || in.Op == OpMOVNTI) {
		return false // #UD
	}
	if size == 1 && (in.Op == OpBTS || in.Op == OpBTR) {
		return false
	}
	in.Len = i
	return true
}

// Opcode groups: ModR/M.reg selects the operation (SDM Vol. 2A, Table
// A-6, "Opcode Extensions for One- and Two-byte Opcodes by Group
// Number").
const (
	grpNone = iota
	grp1    // 80, 81, 83
	grp8    // 0F BA
	grp9    // 0F C7
	grp11   // C6, C7
)

// groupOp sets the operation of group's ModR/M.reg, and for group 9 its
// operand size.
func groupOp(group int, reg byte, in *Insn) bool {
	switch {
	case group == grp1 && reg == 1:
		in.Op = OpOR
	case group == grp1 && reg == 4:
		in.Op = OpAND
	case group == grp1 && reg == 6:
		in.Op = OpXOR
	case group == grp8 && reg == 5:
		in.Op = OpBTS
	case group == grp8 && reg == 6:
		in.Op = OpBTR
	case group == grp9 && reg == 1:
		in.Op = OpCMPXCHG8B
		if in.Size == 8 { // REX.W
			in.Op, in.Size = OpCMPXCHG16B, 16
		} else {
			in.Size = 8
		}
	case group == grp11 && reg == 0:
		in.Op = OpMOV
	default:
		return false
	}
	return true
}

// decode reads the memory operand of ModR/M mod (0, 1 or 2) and rm, its
// SIB byte and displacement, from b at i; it returns where they end.
func (m *Mem) decode(b []byte, i int, mod, rm, rex byte) (int, bool) {
	m.Base, m.Index = MemNone, MemNone
	disp := 0
	switch mod {
	case 1:
		disp = 1
	case 2:
		disp = 4
	}
	switch {
	case rm == vmx.ModRMSIB:
		if i >= len(b) {
			return 0, false
		}
		sib := b[i]
		i++
		m.Scale = 1 << (sib >> 6)
		if index := sib>>3&7 | rexBit(rex, vmx.REXX, 3); index != vmx.SIBNoIndex { // REX.X with 100 is R12
			m.Index = int8(index)
		}
		if base := sib & 7; base == vmx.SIBNoBase && mod == 0 {
			disp = 4
		} else {
			m.Base = int8(base | rexBit(rex, vmx.REXB, 3))
		}
	case rm == vmx.ModRMDisp32 && mod == 0:
		m.Base, disp = MemRIP, 4
	default:
		m.Base = int8(rm | rexBit(rex, vmx.REXB, 3))
	}
	if i+disp > len(b) {
		return 0, false
	}
	switch disp {
	case 1:
		m.Disp = int64(int8(b[i]))
	case 4:
		m.Disp = int64(int32(binary.LittleEndian.Uint32(b[i:])))
	}
	return i + disp, true
}

// rexBit is REX bit bit of rex, shifted left by shift.
func rexBit(rex, bit byte, shift uint) byte {
	if rex&bit != 0 {
		return 1 << shift
	}
	return 0
}

// gprOperand is the register numbered n (ModR/M.reg with REX.R) of size
// bytes. Without a REX prefix, byte registers 4 to 7 are AH, CH, DH and
// BH; with one, SPL, BPL, SIL and DIL (SDM Vol. 2A, 2.2.1.2, "More on REX
// Prefix Fields", and Table 3-1).
func gprOperand(n byte, size int, rex bool) Reg {
	if size == 1 && !rex && n >= 4 && n < 8 {
		return Reg{Num: n - 4, Size: 1, High: true}
	}
	return Reg{Num: n, Size: uint8(size)}
}
