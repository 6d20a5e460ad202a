package fakeguest

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/vmx"
)

// PTIProcess lays out a process under page-table isolation: the kernel
// PGD at g.CR3 (8 KiB aligned) and the user PGD in the next page, whose
// user half is the kernel PGD's (the kernel copy carries NX and its own
// accessed bits) and whose kernel half maps only a trampoline entry.
func (g *Guest) PTIProcess(t testing.TB) (k, u uint64) {
	k = g.CR3
	require.Zero(t, k&(2*4096-1), "kernel PGD 8 KiB aligned")
	u = g.Frame()
	require.Equal(t, k|guestmem.PTIUserBit, u)
	rw, us := uint64(vmx.PTEWritable), uint64(vmx.PTEUser)
	g.MapPage(0x400000, 0x300000, rw|us)           // user code
	g.MapPage(0x7fff_ffff_e000, 0x301000, rw|us)   // user stack
	g.MapPage(0xffff_8880_0000_0000, 0, rw)        // direct map
	g.MapPage(0xffff_ffff_8100_0000, 0x1000000, 0) // kernel text
	for i := uint64(0); i < 256; i++ {
		e := g.Mem.Get64(k + 8*i)
		g.Mem.Put64(u+8*i, e)
		if e&vmx.PTEPresent != 0 {
			g.Mem.Put64(k+8*i, e|vmx.PTEExecuteDisable|vmx.PTEAccessed) // NX and accessed in the kernel copy
		}
	}
	g.Mem.Put64(u+8*508, g.Frame()|vmx.PTEPresent|vmx.PTEWritable) // cpu_entry_area
	return k, u
}

// TwoProcesses lays out two processes without isolation whose PGDs are
// adjacent pages: a (bit 12 clear) and b = a|bit 12, each with its own
// user tables and the same kernel half.
func (g *Guest) TwoProcesses(t testing.TB) (a, b uint64) {
	a = g.CR3
	b = g.Frame()
	require.Equal(t, a|guestmem.PTIUserBit, b)
	rw, us := uint64(vmx.PTEWritable), uint64(vmx.PTEUser)
	g.MapPage(0x400000, 0x300000, rw|us)
	g.MapPage(0xffff_8880_0000_0000, 0, rw)
	g.MapPage(0xffff_ffff_8100_0000, 0x1000000, 0)
	g.CR3 = b
	g.MapPage(0x400000, 0x310000, rw|us)
	for i := uint64(256); i < 512; i++ {
		g.Mem.Put64(b+8*i, g.Mem.Get64(a+8*i))
	}
	g.CR3 = a
	return a, b
}
