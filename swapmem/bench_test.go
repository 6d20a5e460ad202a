package swapmem_test

import (
	"fmt"
	"testing"

	"github.com/tamahv/tamahv/swapmem"
)

// benchGuest is a guest whose every page is missing unless present is set;
// it keeps the watch callbacks so that a benchmark can bring pages in.
type benchGuest struct {
	present bool
	watches map[[2]uint64]func(swapmem.Translation)
}

func newBenchGuest() *benchGuest {
	return &benchGuest{watches: make(map[[2]uint64]func(swapmem.Translation))}
}

func (g *benchGuest) Translate(cr3, va uint64) (swapmem.Translation, error) {
	return swapmem.Translation{Present: g.present, Backed: !g.present, Writable: true, User: true, PA: 0x100000 + va&0xfffff, PageSize: 4096}, nil
}
func (g *benchGuest) ReadPhys(pa uint64, p []byte) error { return nil }
func (g *benchGuest) Watch(cr3, va uint64, changed func(swapmem.Translation)) (func(), error) {
	k := [2]uint64{cr3, va}
	g.watches[k] = changed
	return func() { delete(g.watches, k) }, nil
}
func (g *benchGuest) SystemCR3() uint64 { return 0x1000 }

type benchCPU struct {
	cr3      uint64
	ring     int
	injected int
	lastVA   uint64
}

func (c *benchCPU) CR3() uint64        { return c.cr3 }
func (c *benchCPU) Ring() int          { return c.ring }
func (c *benchCPU) EventPending() bool { return false }
func (c *benchCPU) InjectPF(va uint64, code uint32) error {
	c.injected++
	c.lastVA = va
	return nil
}
func (c *benchCPU) InjectBPFault(va uint64) error { return c.InjectPF(va, 0) }

const benchSpaces = 1000

func spaceCR3(i int) uint64 { return uint64(i%benchSpaces+1) << 12 }

// populate starts n one-page UserFault reads spread over benchSpaces
// address spaces.
func populate(b *testing.B, e *swapmem.Engine, n int) {
	for i := 0; i < n; i++ {
		_, err := e.ReadData(swapmem.Request{CR3: spaceCR3(i), VA: userBase + uint64(i/benchSpaces)*4096, Len: 64, Options: swapmem.UserFault})
		if err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkInjectPendingPF(b *testing.B) {
	for _, n := range []int{1, 1000, 100000} {
		b.Run(fmt.Sprintf("tx=%d/idle", n), func(b *testing.B) {
			e := swapmem.New(newBenchGuest(), swapmem.Config{})
			populate(b, e, n)
			// Right space, wrong ring: every page waits for user mode.
			cpu := &benchCPU{cr3: spaceCR3(0), ring: 0}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := e.InjectPendingPF(cpu); err != nil {
					b.Fatal(err)
				}
			}
			if cpu.injected != 0 {
				b.Fatal("injected in kernel mode")
			}
		})
		b.Run(fmt.Sprintf("tx=%d/eligible", n), func(b *testing.B) {
			e := swapmem.New(newBenchGuest(), swapmem.Config{})
			populate(b, e, n)
			cpu := &benchCPU{cr3: spaceCR3(n - 1), ring: 3}
			b.ReportAllocs()
			b.ResetTimer()
			// Each iteration injects a #PF, and the hypervisor displaces it
			// (CancelPendingPF) so that the next one can be injected.
			for i := 0; i < b.N; i++ {
				if err := e.InjectPendingPF(cpu); err != nil {
					b.Fatal(err)
				}
				e.CancelPendingPF(cpu.lastVA)
			}
			if cpu.injected != b.N {
				b.Fatalf("injected %d of %d", cpu.injected, b.N)
			}
		})
	}
}

func BenchmarkReadData(b *testing.B) {
	for _, n := range []int{4096, 64 << 10} {
		b.Run(fmt.Sprintf("present/%dKiB", n>>10), func(b *testing.B) {
			g := newBenchGuest()
			g.present = true
			e := swapmem.New(g, swapmem.Config{})
			done := 0
			r := swapmem.Request{CR3: 0x2000, VA: userBase, Len: n, Done: func(swapmem.Read) { done++ }}
			b.ReportAllocs()
			b.SetBytes(int64(n))
			for i := 0; i < b.N; i++ {
				if _, err := e.ReadData(r); err != nil {
					b.Fatal(err)
				}
			}
			if done != b.N {
				b.Fatal("not completed synchronously")
			}
		})
	}
}

// BenchmarkCompletion measures a watched page coming in: the watch callback
// reads it, completes the transaction and calls Done.
func BenchmarkCompletion(b *testing.B) {
	for _, live := range []int{0, 100000} {
		b.Run(fmt.Sprintf("others=%d", live), func(b *testing.B) {
			g := newBenchGuest()
			e := swapmem.New(g, swapmem.Config{})
			populate(b, e, live)
			done := 0
			r := swapmem.Request{CR3: 0x5000_0000, VA: kernelBase, Len: 64, Options: swapmem.KernelFault, Done: func(swapmem.Read) { done++ }}
			in := swapmem.Translation{Present: true, Writable: true, PA: 0x200000, PageSize: 4096}
			key := [2]uint64{r.CR3, r.VA}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				if _, err := e.ReadData(r); err != nil {
					b.Fatal(err)
				}
				changed := g.watches[key]
				b.StartTimer()
				changed(in)
			}
			if done != b.N {
				b.Fatalf("completed %d of %d", done, b.N)
			}
		})
	}
}

// BenchmarkReinjectFailedPF measures the timer with nothing due: its cost
// does not grow with the number of live transactions.
func BenchmarkReinjectFailedPF(b *testing.B) {
	for _, n := range []int{1, 100000} {
		b.Run(fmt.Sprintf("tx=%d/idle", n), func(b *testing.B) {
			e := swapmem.New(newBenchGuest(), swapmem.Config{})
			populate(b, e, n)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				e.ReinjectFailedPF()
			}
		})
	}
}
