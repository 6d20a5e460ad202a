package guestmem

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

// sharedWatches watches n consecutive pages of one process: the n watches
// share the PML4, PDPT and PD pages, and 512 share each PT (a 16 MiB swap
// read holds 4096 such watches). It returns the PML4 page.
func sharedWatches(tb testing.TB, n int) (*Watcher, uint64) {
	m := swapmemtest.NewMachine()
	p := m.NewSpace()
	const va = 0x400000
	require.NoError(tb, p.MapRange(va, uint64(n)*4096, swapmemtest.UserRW))
	e, err := ept.New(&mapTables{pages: map[uint64]*[512]uint64{}, next: 0x40000000}, ept.Options{})
	require.NoError(tb, err)
	require.NoError(tb, e.Map(0, 0, 0x10000000, ept.RWX, ept.WriteBack))
	g := NewWatcher(&GuestPhys{Mem: machineMem{m}, EPT: e, Hole: [2]uint64{0x10000000, 0x18000000}}, 0)
	for i := 0; i < n; i++ {
		_, err := g.Watch(p.CR3, va+uint64(i)*4096, func(swapmem.Translation) {})
		require.NoError(tb, err)
	}
	return g, p.CR3 & CR3Mask
}

// BenchmarkSettleSharedPages: one guest write to the PML4 page that n
// watches share, and the exit that settles it (every watch walked again).
// The cost per watch must not grow with n.
func BenchmarkSettleSharedPages(b *testing.B) {
	for _, n := range []int{512, 1024, 2048, 4096} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			g, pml4 := sharedWatches(b, n)
			fv := hvtest.NewVMCS()
			v := &hv.VCPU{VMCS: fv}
			fv.Fields[vmx.GuestPhysAddr] = pml4
			fv.Fields[vmx.ExitQualification] = 0x2 | 0x80 | 0x100 | 0x8 | 0x20
			ev := &vmx.Exit{Reason: vmx.ExitEPTViolation, GuestPA: fv.Fields[vmx.GuestPhysAddr], Qualification: fv.Fields[vmx.ExitQualification]}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := g.onViolation(v, ev, unhandled); err != nil {
					b.Fatal(err)
				}
				g.settle(v, &vmx.Exit{Reason: vmx.ExitCPUID})
			}
			b.StopTimer()
			if g.Writes != uint64(b.N) {
				b.Fatalf("%d writes settled, want %d", g.Writes, b.N)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/watch")
		})
	}
}
