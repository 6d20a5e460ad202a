package x86emu

import (
	"math/bits"

	"github.com/tamahv/tamahv/vmx"
)

// Insn is a decoded write to emulate.
type Insn struct {
	Op     Op
	Size   int    // bytes written
	Mem    Mem    // the memory operand
	LA     uint64 // its linear address
	Reg    Reg    // the register operand (size 0: none)
	Imm    uint64 // the immediate, zero-extended from size (BTS, BTR: from 8 bits)
	HasImm bool
	Bit    uint // BTS, BTR: the bit in the operand
	Len    int  // instruction length
}

// locked reports whether the instruction reads and writes its memory
// operand: it is emulated with one locked instruction, which must be
// naturally aligned (AtomicMemory). A form the guest did not lock is
// locked too: every outcome of the locked instruction is one the
// unlocked instruction allows.
func (in *Insn) Locked() bool { return in.Op != OpMOV && in.Op != OpMOVNTI }

// execute does the instruction's work: its one access to the memory
// operand at pa, through m, and the registers it sets. It returns the new
// RFLAGS and whether the operand was written; on an error nothing
// changed.
func Execute(m AtomicMemory, pa uint64, r Registers, in *Insn, rflags uint64) (uint64, bool, error) {
	src := in.Imm
	if !in.HasImm && in.Reg.Size != 0 {
		src = RegValue(r, in.Reg)
	}
	switch in.Op {
	case OpMOV, OpMOVNTI:
		return rflags, true, m.Store(pa, in.Size, src)
	case OpXCHG:
		old, err := m.Exchange(pa, in.Size, src)
		if err != nil {
			return rflags, false, err
		}
		setReg(r, in.Reg, old)
		return rflags, true, nil
	case OpCMPXCHG:
		acc := r.GPR(0) & SizeMask(in.Size)
		old, swapped, err := m.CompareExchange(pa, in.Size, acc, src)
		if err != nil {
			return rflags, false, err
		}
		rflags = subFlags(rflags, acc, old, in.Size)
		if !swapped {
			// The accumulator is loaded with the operand (the processor
			// writes the operand back unchanged).
			setGPR(r, 0, in.Size, old)
		}
		return rflags, swapped, nil
	case OpCMPXCHG8B:
		cmp := r.GPR(2)<<32 | r.GPR(0)&0xffffffff
		val := r.GPR(1)<<32 | r.GPR(3)&0xffffffff
		old, swapped, err := m.CompareExchange(pa, 8, cmp, val)
		if err != nil {
			return rflags, false, err
		}
		if !swapped {
			r.SetGPR(0, old&0xffffffff)
			r.SetGPR(2, old>>32)
			return rflags &^ vmx.RFLAGSZF, false, nil
		}
		return rflags | vmx.RFLAGSZF, true, nil
	case OpCMPXCHG16B:
		old, swapped, err := m.CompareExchange16(pa, [2]uint64{r.GPR(0), r.GPR(2)}, [2]uint64{r.GPR(3), r.GPR(1)})
		if err != nil {
			return rflags, false, err
		}
		if !swapped {
			r.SetGPR(0, old[0])
			r.SetGPR(2, old[1])
			return rflags &^ vmx.RFLAGSZF, false, nil
		}
		return rflags | vmx.RFLAGSZF, true, nil
	case OpOR, OpAND, OpXOR:
		var f uint64
		var err error
		switch in.Op {
		case OpOR:
			f, err = m.Or(pa, in.Size, src)
		case OpAND:
			f, err = m.And(pa, in.Size, src)
		default:
			f, err = m.Xor(pa, in.Size, src)
		}
		if err != nil {
			return rflags, false, err
		}
		// CF and OF clear, SF, ZF and PF from the result, AF
		// (undefined) clear.
		return rflags&^vmx.RFLAGSArith | f&(vmx.RFLAGSSF|vmx.RFLAGSZF|vmx.RFLAGSPF), true, nil
	case OpBTS, OpBTR:
		var was bool
		var err error
		if in.Op == OpBTS {
			was, err = m.BitTestAndSet(pa, in.Size, in.Bit)
		} else {
			was, err = m.BitTestAndReset(pa, in.Size, in.Bit)
		}
		if err != nil {
			return rflags, false, err
		}
		// CF is the bit; OF, SF, AF and PF are undefined and left alone;
		// ZF is unaffected.
		rflags &^= vmx.RFLAGSCF
		if was {
			rflags |= vmx.RFLAGSCF
		}
		return rflags, true, nil
	}
	return rflags, false, ErrOperand
}

// subFlags are the flags of CMP a, b (a - b), as CMPXCHG sets them.
func subFlags(rflags, a, b uint64, size int) uint64 {
	mask := SizeMask(size)
	res := (a - b) & mask
	sign := uint64(1) << (8*size - 1)
	rflags &^= vmx.RFLAGSArith
	rflags |= ResultFlags(res, size)
	if a < b {
		rflags |= vmx.RFLAGSCF
	}
	if (a^b)&(a^res)&sign != 0 {
		rflags |= vmx.RFLAGSOF
	}
	if (a^b^res)&0x10 != 0 {
		rflags |= vmx.RFLAGSAF
	}
	return rflags
}

// resultFlags are SF, ZF and PF of a result of size bytes.
func ResultFlags(res uint64, size int) uint64 {
	var f uint64
	if res&SizeMask(size) == 0 {
		f |= vmx.RFLAGSZF
	}
	if res>>(8*size-1)&1 != 0 {
		f |= vmx.RFLAGSSF
	}
	if bits.OnesCount8(uint8(res))%2 == 0 {
		f |= vmx.RFLAGSPF
	}
	return f
}

func SizeMask(size int) uint64 {
	if size >= 8 {
		return ^uint64(0)
	}
	return 1<<(8*size) - 1
}

func SignExtend(v uint64, size int) int64 {
	s := 64 - 8*uint(size)
	return int64(v<<s) >> s
}

// Registers are the general-purpose registers an instruction reads and
// writes: n is 0 (RAX) to 15 (R15), in the instruction encoding's order.
type Registers interface {
	GPR(n int) uint64
	SetGPR(n int, v uint64)
}

// RegValue reads a register operand, zero-extended.
func RegValue(rs Registers, r Reg) uint64 {
	full := rs.GPR(int(r.Num))
	if r.High {
		return full >> 8 & 0xff
	}
	return full & SizeMask(int(r.Size))
}

// setReg writes a register operand as the processor does: 8 and 16 bits
// merge into the register, 32 bits zero the upper half.
func setReg(rs Registers, r Reg, val uint64) {
	n := int(r.Num)
	if r.High {
		full := rs.GPR(n)
		rs.SetGPR(n, full&^0xff00|(val&0xff)<<8)
		return
	}
	setGPR(rs, n, int(r.Size), val)
}

func setGPR(rs Registers, n, size int, val uint64) {
	switch size {
	case 1, 2:
		m := SizeMask(size)
		rs.SetGPR(n, rs.GPR(n)&^m|val&m)
	case 4:
		rs.SetGPR(n, val&0xffffffff)
	default:
		rs.SetGPR(n, val)
	}
}
