package guestmem

import (
	"fmt"
	"testing"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/vmx"
)

// BenchmarkSettleFlagUpdate: the processor's accessed-flag update opens
// the PT page that n watches share (up to 512), and the next exit closes
// it: the entries the watches read there are compared, none changed, and
// nothing is walked.
func BenchmarkSettleFlagUpdate(b *testing.B) {
	for _, n := range []int{64, 512} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			g, tg := sharedWatches(b, n)
			cr3 := tg.cr3
			var steps [5]Step
			if _, k, err := g.Walker.Walk(cr3, 0x400000, &steps); err != nil || k != 4 {
				b.Fatalf("walk: %d steps, %v", k, err)
			}
			pt := steps[3].PA &^ 0xfff
			fv := hvtest.NewVMCS()
			v := &hv.VCPU{VMCS: fv}
			fv.Fields[vmx.GuestPhysAddr] = pt
			fv.Fields[vmx.ExitQualification] = 0x2 | 0x80 | 0x8
			ev := &vmx.Exit{Reason: vmx.ExitEPTViolation, GuestPA: fv.Fields[vmx.GuestPhysAddr], Qualification: fv.Fields[vmx.ExitQualification]}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := g.onViolation(v, ev, unhandled); err != nil {
					b.Fatal(err)
				}
				g.settle(v, &vmx.Exit{Reason: vmx.ExitCPUID})
			}
			b.StopTimer()
			if g.ADWrites != uint64(b.N) || g.Writes != 0 {
				b.Fatalf("%d flag updates and %d writes settled, want %d and 0", g.ADWrites, g.Writes, b.N)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/watch")
		})
	}
}
