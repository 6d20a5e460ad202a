package guestmem

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// The swap-read fixture: a process's range of swapped-out pages, read by
// the swapmem engine on a Watcher, and a guest kernel whose code at ptRIP
// pages each one in by writing its PTE through the direct map (Linux's
// set_pte_at), as it does when the engine's #PF reaches it.
const (
	srBase = 0x7f00_0000_0000 // the range, 2 MiB aligned: 512 pages to a PT
	srData = 0x100_0000       // the pages' frames, one after another
	srSwap = 0x1_2345_6600    // the first page's swap entry: not present, backed
)

// swapRead is the fixture: n pages at srBase.
type swapRead struct {
	g     *testGuest
	gm    *Watcher
	eng   *swapmem.Engine
	v     *hv.VCPU
	vmcs  *hvtest.VMCS
	cpu   swapCPU
	n     int
	open  bool     // the guest's PTE writes are not emulated: they open the page
	ptes  []uint64 // each page's PTE (guest-physical)
	pages int      // pages paged in
}

// swapCPU is the vCPU in user mode as the engine sees it: it takes every
// #PF offered.
type swapCPU struct {
	cr3      uint64
	va       uint64 // the #PF injected, 0 when none
	injected int
}

func (c *swapCPU) CR3() uint64        { return c.cr3 }
func (c *swapCPU) Ring() int          { return 3 }
func (c *swapCPU) EventPending() bool { return c.va != 0 }
func (c *swapCPU) InjectPF(va uint64, _ uint32) error {
	c.va = va
	c.injected++
	return nil
}
func (c *swapCPU) InjectBPFault(uint64) error { return errors.New("no breakpoint agent") }

func newSwapRead(tb testing.TB, n int) *swapRead {
	g := newTestGuest(tb, ept.Options{})
	f := &swapRead{g: g, n: n}
	pts := map[uint64]bool{}
	for i := range n {
		va := srBase + uint64(i)<<12
		g.mapPage(va, srData+uint64(i)<<12, vmx.PTEWritable|vmx.PTEUser)
		pte := g.entry(va, 1)
		f.ptes = append(f.ptes, pte)
		pts[pte&^0xfff] = true
		*g.mem.at(srData + uint64(i)<<12) = byte(i)
	}
	kvas := []uint64{ptRIP, ptRIP + 0x1000}
	for _, va := range kvas {
		g.mapPage(va&^0xfff, va&^0xfff-kernelOff, vmx.PTEWritable)
	}
	for pt := range pts {
		g.mapPage(directMap+pt, pt, vmx.PTEWritable)
		kvas = append(kvas, directMap+pt)
	}
	for _, va := range kvas {
		g.setAD(va)
	}
	for i, b := range []byte{0x48, 0x89, 0x07} { // mov %rax,(%rdi)
		*g.mem.at(ptRIP - kernelOff + uint64(i)) = b
	}
	f.gm = NewWatcher(g.phys, g.cr3)
	f.eng = swapmem.New(f.gm, swapmem.Config{Now: func() time.Duration { return 0 }})
	f.cpu.cr3 = g.cr3
	var m *hvtest.VMCS
	f.v, m = vcputest.Scripted(&testing.T{}, nil)
	m.Fields[vmx.EntryControls] |= vmx.EntryIA32eMode
	m.Fields[vmx.GuestCSAccess] = 0xa09b // L, not D
	m.Fields[vmx.GuestCR0] |= vmx.CR0PG | vmx.CR0WP
	m.Fields[vmx.GuestCR3] = g.cr3
	m.Fields[vmx.GuestCR4] |= vmx.CR4PAE
	f.vmcs = m
	return f
}

// opening makes the guest's PTE writes open the page rather than be
// emulated (the kernel single-steps: the emulator leaves the write to
// the processor), or be emulated again.
func (f *swapRead) opening(open bool) {
	f.open = open
	f.vmcs.Fields[vmx.GuestRFLAGS] &^= vmx.RFLAGSTF
	if open {
		f.vmcs.Fields[vmx.GuestRFLAGS] |= vmx.RFLAGSTF
	}
}

// swapOut makes every page of the range a swap entry again.
func (f *swapRead) swapOut() {
	for i, pte := range f.ptes {
		f.g.mem.put64(pte, srSwap+uint64(i)<<12)
	}
}

// read reads the whole range: the engine's #PF before each entry, the
// guest kernel's PTE write that pages its page in (emulated in its exit,
// or opening the page until the next exit), and the watches' shootdown
// before the next entry. It returns the data Done was given.
func (f *swapRead) read(tb testing.TB) []byte {
	var got []byte
	_, err := f.eng.ReadData(swapmem.Request{CR3: f.g.cr3, VA: srBase, Len: f.n << 12, Options: swapmem.UserFault,
		Done: func(r swapmem.Read) {
			if r.Err != nil {
				tb.Fatal(r.Err)
			}
			got = r.Data
		}})
	if err != nil {
		tb.Fatal(err)
	}
	for got == nil {
		if err := f.eng.InjectPendingPF(&f.cpu); err != nil || f.cpu.va == 0 {
			tb.Fatalf("no #PF to inject (%v) with the read pending", err)
		}
		i := int(f.cpu.va-srBase) >> 12
		f.cpu.va = 0
		f.pageIn(tb, i)
		f.gm.Sync()
	}
	return got
}

// pageIn is the guest kernel's write of page i's PTE, present now, and
// the EPT violation it causes. Where the write is not emulated, the page
// opens, the processor makes the write and the next exit settles it.
func (f *swapRead) pageIn(tb testing.TB, i int) {
	pte := f.ptes[i]
	kva := directMap + pte
	in := srData + uint64(i)<<12 | vmx.PTEPresent | vmx.PTEWritable | vmx.PTEUser | vmx.PTEAccessed | vmx.PTEDirty
	f.v.Regs.RDI, f.v.Regs.RAX = kva, in
	f.vmcs.Fields[vmx.GuestLinearAddr] = kva
	e := &vmx.Exit{Reason: vmx.ExitEPTViolation, RIP: ptRIP, Qualification: ptWriteQual, GuestPA: pte}
	if _, err := f.gm.onViolation(f.v, e, unhandled); err != nil {
		tb.Fatal(err)
	}
	if f.open {
		f.g.mem.put64(pte, in)
		f.gm.settle(f.v, &vmx.Exit{Reason: vmx.ExitCPUID})
	}
	f.pages++
}

// TestSwapReadWalksEachWatchOncePerPage: paging in a page of a swap read
// walks again the one watch whose entry the guest wrote, not the other
// watches of the read that share its page table, whether the write was
// emulated in its exit or opened the page until the next: a read's page
// costs the same work whatever the read's size.
func TestSwapReadWalksEachWatchOncePerPage(t *testing.T) {
	for _, c := range []struct {
		n    int
		open bool
	}{{16, false}, {512, false}, {600, false}, {16, true}, {600, true}} {
		t.Run(fmt.Sprintf("pages=%d,opened=%v", c.n, c.open), func(t *testing.T) {
			n := c.n
			f := newSwapRead(t, n)
			f.opening(c.open)
			f.swapOut()
			got := f.read(t)
			require.Len(t, got, n<<12)
			for i := range n {
				require.Equal(t, byte(i), got[i<<12], "page %d", i)
			}
			assert.Equal(t, n, f.cpu.injected, "one #PF per page")
			assert.Equal(t, uint64(n), f.gm.Writes, "one write per page")
			if c.open {
				assert.Equal(t, uint64(n), f.gm.Opened, "one opened page per page")
			} else {
				assert.Equal(t, uint64(n), f.gm.Emulated, "one emulated write per page")
			}
			assert.Equal(t, uint64(n), f.gm.Rewalks, "watches walked again: one per page")
			assert.Zero(t, f.gm.Watches(), "every protection given back")
			assert.Empty(t, f.gm.entries, "no entry watched")
		})
	}
}

// BenchmarkSwapRead reads a range of swapped-out pages whose PTEs the
// guest writes back one page at a time, each write emulated in its exit
// or opening the page until the next exit: the cost per page must not
// grow with the read's size.
func BenchmarkSwapRead(b *testing.B) {
	for _, c := range []struct {
		name string
		open bool
	}{{"emulated", false}, {"opened", true}} {
		for _, n := range []int{16, 64, 512, 4096} {
			b.Run(fmt.Sprintf("%s/pages=%d", c.name, n), func(b *testing.B) {
				f := newSwapRead(b, n)
				f.opening(c.open)
				b.ReportAllocs()
				for b.Loop() {
					f.swapOut()
					f.read(b)
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(f.pages), "ns/page")
			})
		}
	}
}
