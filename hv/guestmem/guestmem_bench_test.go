package guestmem

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// sharedWatches watches n consecutive pages of one process: the n watches
// share the PML4, PDPT and PD pages, and 512 share each PT (a 16 MiB swap
// read holds 4096 such watches).
func sharedWatches(tb testing.TB, n int) (*Watcher, *testGuest) {
	g := newTestGuest(tb, ept.Options{})
	const va = 0x400000
	for i := range uint64(n) {
		g.mapPage(va+i<<12, 0x1000000+i<<12, vmx.PTEWritable|vmx.PTEUser)
	}
	w := NewWatcher(g.phys, g.cr3)
	for i := range uint64(n) {
		_, err := w.Watch(g.cr3, va+i<<12, func(swapmem.Translation) {})
		require.NoError(tb, err)
	}
	return w, g
}

// BenchmarkSettleSharedPages: one guest write to the PML4 entry that n
// watches share, and the exit that settles it (every watch walked again).
// The cost per watch must not grow with n.
func BenchmarkSettleSharedPages(b *testing.B) {
	for _, n := range []int{512, 1024, 2048, 4096} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			g, tg := sharedWatches(b, n)
			pml4 := tg.cr3
			ent := tg.entry(0x400000, 4)
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
				tg.mem.put64(ent, tg.mem.get64(ent)^vmx.PTEWritable)
				g.settle(v, &vmx.Exit{Reason: vmx.ExitCPUID})
			}
			b.StopTimer()
			if g.Writes != uint64(b.N) || g.Rewalks != uint64(b.N*n) {
				b.Fatalf("%d writes settled and %d watches walked, want %d and %d", g.Writes, g.Rewalks, b.N, b.N*n)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/watch")
		})
	}
}
