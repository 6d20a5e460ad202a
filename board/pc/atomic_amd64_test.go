package pc

import (
	"debug/elf"
	"debug/gosym"
	"encoding/binary"
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/arch/x86/x86asm"

	"github.com/tamahv/tamahv/vmx"
)

// The single-instruction functions run on the host as they run on the
// board, on a page of the test's own memory.

// testPage is a 4 KiB page of host memory, pinned, and its address.
type testPage struct {
	b    []byte // the page
	addr uint64
}

func newTestPage(t *testing.T) *testPage {
	buf := make([]byte, 2*4096)
	var pin runtime.Pinner
	pin.Pin(&buf[0])
	t.Cleanup(pin.Unpin)
	base := uint64(uintptr(unsafe.Pointer(&buf[0])))
	off := (base+0xfff)&^0xfff - base
	p := &testPage{b: buf[off : off+4096], addr: base + off}
	p.fill()
	return p
}

// fill sets every byte of the page to 0xa5.
func (p *testPage) fill() {
	for i := range p.b {
		p.b[i] = 0xa5
	}
}

func (p *testPage) u64(off uint64) uint64 { return binary.LittleEndian.Uint64(p.b[off:]) }

// untouched checks that the page is 0xa5 but for size bytes at off.
func (p *testPage) untouched(t *testing.T, off uint64, size int) {
	t.Helper()
	for i, x := range p.b {
		if (uint64(i) < off || uint64(i) >= off+uint64(size)) && x != 0xa5 {
			t.Errorf("byte %#x changed to %#x outside the %d-byte operand at %#x", i, x, size, off)
			return
		}
	}
}

// bytesOf are the low size bytes of v, little-endian.
func bytesOf(v uint64, size int) []byte {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	return b[:size]
}

const pattern = 0xa5a5a5a5a5a5a5a5

// TestAtomicStoreWritesItsWidth: a store of 1, 2, 4 or 8 bytes, aligned or
// not, writes exactly its bytes.
func TestAtomicStoreWritesItsWidth(t *testing.T) {
	p := newTestPage(t)
	for _, size := range []int{1, 2, 4, 8} {
		for _, off := range []uint64{0x100, 0x203, 0x1000 - uint64(size)} {
			p.fill()
			require.NoError(t, atomicStore(p.addr+off, size, 0x1122334455667788))
			assert.Equal(t, bytesOf(0x1122334455667788, size), p.b[off:off+uint64(size)], "%d bytes at %#x", size, off)
			p.untouched(t, off, size)
		}
	}
}

// TestAtomicExchangeAndCompareExchange: XCHG and LOCK CMPXCHG of each
// width write their bytes and return the old ones; a failing compare
// leaves memory as it was.
func TestAtomicExchangeAndCompareExchange(t *testing.T) {
	p := newTestPage(t)
	for _, size := range []int{1, 2, 4, 8} {
		off := uint64(0x40)
		m := sizeMask(size)
		p.fill()
		old, err := atomicExchange(p.addr+off, size, 0x0102030405060708)
		require.NoError(t, err)
		assert.Equal(t, pattern&m, old, "xchg %d", size)
		assert.Equal(t, bytesOf(0x0102030405060708, size), p.b[off:off+uint64(size)])
		p.untouched(t, off, size)

		p.fill()
		// The bits of old above the operand do not take part.
		prev, swapped, err := atomicCompareExchange(p.addr+off, size, ^m|pattern&m, 0x1111111111111111)
		require.NoError(t, err)
		assert.Equal(t, pattern&m, prev)
		assert.True(t, swapped, "cmpxchg %d: only the operand's bytes of old compare", size)

		p.fill()
		prev, swapped, err = atomicCompareExchange(p.addr+off, size, pattern, 0x1111111111111111)
		require.NoError(t, err)
		assert.True(t, swapped, "cmpxchg %d", size)
		assert.Equal(t, pattern&m, prev)
		assert.Equal(t, bytesOf(0x1111111111111111, size), p.b[off:off+uint64(size)])
		p.untouched(t, off, size)

		p.fill()
		prev, swapped, err = atomicCompareExchange(p.addr+off, size, 0, 0x1111111111111111)
		require.NoError(t, err)
		assert.False(t, swapped, "cmpxchg %d that fails", size)
		assert.Equal(t, pattern&m, prev)
		p.untouched(t, 0, 0)
	}

	p.fill()
	prev, swapped, err := atomicCompareExchange16(p.addr+0x80, [2]uint64{pattern, pattern}, [2]uint64{1, 2})
	require.NoError(t, err)
	assert.True(t, swapped)
	assert.Equal(t, [2]uint64{pattern, pattern}, prev)
	assert.Equal(t, [2]uint64{1, 2}, [2]uint64{p.u64(0x80), p.u64(0x88)})
	p.untouched(t, 0x80, 16)
	prev, swapped, err = atomicCompareExchange16(p.addr+0x80, [2]uint64{1, 3}, [2]uint64{5, 6})
	require.NoError(t, err)
	assert.False(t, swapped)
	assert.Equal(t, [2]uint64{1, 2}, prev)
	assert.Equal(t, [2]uint64{1, 2}, [2]uint64{p.u64(0x80), p.u64(0x88)})
}

// TestAtomicLogicFlags: LOCK OR, AND and XOR of each width change their
// bytes and return the flags of the result.
func TestAtomicLogicFlags(t *testing.T) {
	p := newTestPage(t)
	const arith = vmx.RFLAGSCF | vmx.RFLAGSZF | vmx.RFLAGSSF | vmx.RFLAGSPF | vmx.RFLAGSOF
	for _, size := range []int{1, 2, 4, 8} {
		off := uint64(0x20)
		m := sizeMask(size)
		sign := uint64(1) << (8*size - 1)
		cases := []struct {
			name  string
			op    func(addr uint64, size int, v uint64) (uint64, error)
			v     uint64
			want  uint64
			flags uint64
		}{
			{"or", atomicOr, 0x5a5a5a5a5a5a5a5a, m, vmx.RFLAGSSF | vmx.RFLAGSPF},
			{"and", atomicAnd, 0x5a5a5a5a5a5a5a5a, 0, vmx.RFLAGSZF | vmx.RFLAGSPF},
			{"xor", atomicXor, pattern ^ 1, 1, 0},
			{"and to the sign bit", atomicAnd, sign, sign, vmx.RFLAGSSF | parity(sign)},
		}
		for _, c := range cases {
			p.fill()
			flags, err := c.op(p.addr+off, size, c.v)
			require.NoError(t, err)
			assert.Equal(t, bytesOf(c.want, size), p.b[off:off+uint64(size)], "%s %d", c.name, size)
			assert.Equal(t, c.flags, flags&arith, "%s %d: RFLAGS %#x", c.name, size, flags)
			p.untouched(t, off, size)
		}
	}
}

// parity is RFLAGS.PF of a result: set where its low byte has an even
// number of ones.
func parity(res uint64) uint64 {
	if bits.OnesCount8(uint8(res))%2 == 0 {
		return vmx.RFLAGSPF
	}
	return 0
}

// TestAtomicBitTestAndSetReset: LOCK BTS and BTR of 2, 4 and 8 bytes
// change one bit and report its old value.
func TestAtomicBitTestAndSetReset(t *testing.T) {
	p := newTestPage(t)
	for _, size := range []int{2, 4, 8} {
		off := uint64(0x10)
		top := uint(8*size - 1)
		p.fill()
		was, err := atomicBitTestAndSet(p.addr+off, size, top) // 0xa5...: the top bit is set
		require.NoError(t, err)
		assert.True(t, was)
		p.untouched(t, 0, 0)
		was, err = atomicBitTestAndSet(p.addr+off, size, 1)
		require.NoError(t, err)
		assert.False(t, was)
		assert.Equal(t, bytesOf(pattern|2, size), p.b[off:off+uint64(size)])
		was, err = atomicBitTestAndReset(p.addr+off, size, top)
		require.NoError(t, err)
		assert.True(t, was)
		assert.Equal(t, bytesOf((pattern|2)&^(1<<top), size), p.b[off:off+uint64(size)])
		p.untouched(t, off, size)
	}
}

// TestAtomicRefusesOperands: operands no single instruction takes, or
// that would fault in tamahv (CMPXCHG16B misaligned, a split lock), are
// refused before any instruction runs.
func TestAtomicRefusesOperands(t *testing.T) {
	p := newTestPage(t)
	a := p.addr
	cases := map[string]error{
		"store of 3 bytes":             atomicStore(a, 3, 0),
		"store of 16 bytes":            atomicStore(a, 16, 0),
		"store across the page end":    atomicStore(a+0xffc, 8, 0),
		"xchg not aligned":             func() error { _, err := atomicExchange(a+2, 4, 0); return err }(),
		"cmpxchg not aligned":          func() error { _, _, err := atomicCompareExchange(a+1, 2, 0, 0); return err }(),
		"cmpxchg of 16 bytes":          func() error { _, _, err := atomicCompareExchange(a, 16, 0, 0); return err }(),
		"cmpxchg16b not aligned":       func() error { _, _, err := atomicCompareExchange16(a+8, [2]uint64{}, [2]uint64{}); return err }(),
		"or of a line-splitting qword": func() error { _, err := atomicOr(a+0x3c, 8, 0); return err }(),
		"and not aligned":              func() error { _, err := atomicAnd(a+1, 4, 0); return err }(),
		"xor of 0 bytes":               func() error { _, err := atomicXor(a, 0, 0); return err }(),
		"bts of a byte":                func() error { _, err := atomicBitTestAndSet(a, 1, 0); return err }(),
		"bts beyond the operand":       func() error { _, err := atomicBitTestAndSet(a, 2, 16); return err }(),
		"btr not aligned":              func() error { _, err := atomicBitTestAndReset(a+4, 8, 0); return err }(),
		"btr of a negative size":       func() error { _, err := atomicBitTestAndReset(a, -8, 0); return err }(),
	}
	for name, err := range cases {
		assert.ErrorIs(t, err, errOperand, name)
	}
	p.untouched(t, 0, 0)
}

// guestOperand is an instruction's access to the operand the functions
// take, in DI: its operation, its width and whether it is locked.
type guestOperand struct {
	op     x86asm.Op
	bytes  int
	locked bool
}

func (g guestOperand) String() string {
	lock := ""
	if g.locked {
		lock = "LOCK "
	}
	return fmt.Sprintf("%s%v/%d", lock, g.op, g.bytes)
}

// TestAtomicFunctionsAreOneInstructionEach disassembles the functions in
// the test binary: every access to the operand (DI) is one instruction
// of the width its size selects, locked for the read-modify-writes. XCHG
// with memory locks without the prefix (SDM Vol. 2B, "XCHG").
func TestAtomicFunctionsAreOneInstructionEach(t *testing.T) {
	widths := func(op x86asm.Op, locked bool, sizes ...int) []guestOperand {
		var out []guestOperand
		for _, s := range sizes {
			out = append(out, guestOperand{op, s, locked})
		}
		return out
	}
	want := map[string][]guestOperand{
		"storeAt":             widths(x86asm.MOV, false, 1, 2, 4, 8),
		"exchangeAt":          widths(x86asm.XCHG, false, 1, 2, 4, 8),
		"compareExchangeAt":   widths(x86asm.CMPXCHG, true, 1, 2, 4, 8),
		"compareExchange16At": widths(x86asm.CMPXCHG16B, true, 16),
		"orAt":                widths(x86asm.OR, true, 1, 2, 4, 8),
		"andAt":               widths(x86asm.AND, true, 1, 2, 4, 8),
		"xorAt":               widths(x86asm.XOR, true, 1, 2, 4, 8),
		"btsAt":               widths(x86asm.BTS, true, 2, 4, 8),
		"btrAt":               widths(x86asm.BTR, true, 2, 4, 8),
	}
	exe, err := os.Executable()
	require.NoError(t, err)
	f, err := elf.Open(exe)
	require.NoError(t, err)
	defer f.Close()
	text, pclntab := f.Section(".text"), f.Section(".gopclntab")
	require.NotNil(t, text)
	require.NotNil(t, pclntab)
	code, err := text.Data()
	require.NoError(t, err)
	lines, err := pclntab.Data()
	require.NoError(t, err)
	// The runtime's function table names every function, symbols or not.
	tab, err := gosym.NewTable(nil, gosym.NewLineTable(lines, text.Addr))
	require.NoError(t, err)
	found := map[string]bool{}
	for _, fn := range tab.Funcs {
		name, ok := strings.CutPrefix(fn.Name, "github.com/tamahv/tamahv/board/pc.")
		if !ok || want[name] == nil {
			continue
		}
		found[name] = true
		require.True(t, fn.Entry >= text.Addr && fn.End <= text.Addr+uint64(len(code)), name)
		body := code[fn.Entry-text.Addr : fn.End-text.Addr]
		var got []guestOperand
		for len(body) > 0 {
			in, err := x86asm.Decode(body, 64)
			require.NoError(t, err, "%s at %x", name, body)
			for _, a := range in.Args {
				if m, ok := a.(x86asm.Mem); ok && m.Base == x86asm.RDI {
					locked := slices.ContainsFunc(in.Prefix[:], func(p x86asm.Prefix) bool {
						return p&0xff == x86asm.PrefixLOCK && p&(x86asm.PrefixIgnored|x86asm.PrefixInvalid) == 0
					})
					got = append(got, guestOperand{in.Op, in.MemBytes, locked})
				}
			}
			body = body[in.Len:]
		}
		assert.ElementsMatch(t, want[name], got, "%s: %v", name, got)
	}
	for name := range want {
		assert.True(t, found[name], "%s is not in the test binary", name)
	}
}
