package monitor_test

import (
	"bytes"
	"crypto/sha256"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
)

// BenchmarkSwapReadHypercall16MiB is one CPL-3 hypercall asking for 16
// MiB of present memory: "exit" is what the exit of the hypercall costs,
// "whole" the read to its end, over the entries that follow (Pump).
func BenchmarkSwapReadHypercall16MiB(b *testing.B) {
	for _, c := range []struct {
		name        string
		ok, pumpAll bool
	}{{"exit", true, false}, {"whole", true, true}, {"whole-digest-wrong", false, true}} {
		b.Run(c.name, func(b *testing.B) {
			g := newGuest(&testing.T{}, 0)
			const big = 0x0000_7e00_0000_0000
			require.NoError(b, g.proc.MapRange(big, swapmem.MaxLen, swapmemtest.UserRW))
			data := bytes.Repeat([]byte("0123456789abcdef"), swapmem.MaxLen/16)
			require.NoError(b, g.proc.Write(big, data))
			sum := sha256.Sum256(data)
			if !c.ok {
				sum[0]++
			}
			req := hcall.SwapRequest{VA: big, Len: swapmem.MaxLen, Options: uint64(swapmem.UserFault), SHA256: sum}.Encode()
			require.NoError(b, g.proc.Write(userReq, req[:]))
			b.SetBytes(swapmem.MaxLen)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if ret, _ := g.call(hcall.SwapRead, userReq, hcall.SwapRequestSize); ret != 0 {
					b.Fatalf("swap read: %#x", ret)
				}
				for c.pumpAll && g.status() == hcall.StatusPending {
					g.mon.Pump()
				}
			}
			b.StopTimer()
			if c.pumpAll {
				want := uint64(hcall.StatusOK)
				if !c.ok {
					want = hcall.StatusFailed
				}
				require.Equal(b, want, g.status())
			}
		})
	}
}
