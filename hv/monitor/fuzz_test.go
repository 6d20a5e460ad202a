package monitor_test

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/monitor"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

// FuzzHypercall drives the monitor with sequences of hypercalls: random
// privilege levels, function numbers, arguments and request contents,
// with requests placed in user pages, kernel pages, across page ends and
// nowhere, and the guest's pages coming and going between calls. Whatever
// the input, nothing panics and CPL 3 never gets more than the policy
// grants.
func FuzzHypercall(f *testing.F) {
	seed := func(cpl, nr uint8, where uint8, va, n, opts uint64) []byte {
		b := make([]byte, 32)
		b[0], b[1], b[2] = cpl, nr, where
		binary.LittleEndian.PutUint64(b[8:], va)
		binary.LittleEndian.PutUint64(b[16:], n)
		binary.LittleEndian.PutUint64(b[24:], opts)
		return b
	}
	f.Add(uint8(0), seed(3, hcall.SwapRead, 0, userBuf, 16, uint64(swapmem.UserFault)))
	f.Add(uint8(0), seed(3, hcall.SwapRead, 1, kernelBuf, 8, 0))
	f.Add(uint8(7), seed(3, hcall.Exit, 0, 0, 0, 0))
	f.Add(uint8(0), append(seed(0, hcall.SwapRead, 0, userBuf, 4096, uint64(swapmem.NoFault)), seed(3, hcall.SwapStatus, 0, 0, 0, 0)...))
	f.Add(uint8(2), seed(3, hcall.SwapRead, 2, userBuf+4000, 200, uint64(swapmem.BPFault|swapmem.NoDups)))
	f.Fuzz(func(t *testing.T, grants uint8, ops []byte) {
		g := newGuest(t, monitor.Ring3(grants&7))
		other := g.m.NewSpace()
		require.NoError(t, other.MapRange(userReq, 4096, swapmemtest.UserRW))
		cpu := g.m.NewVCPU(0)
		for len(ops) >= 32 {
			op := ops[:32]
			ops = ops[32:]
			cpl := int(op[0] & 3)
			nr := uint64(op[1] % 6)
			va := binary.LittleEndian.Uint64(op[8:])
			n := binary.LittleEndian.Uint64(op[16:])
			opts := binary.LittleEndian.Uint64(op[24:])
			space := g.proc
			if op[3]&1 != 0 {
				space = other
			}
			g.vmcs.Fields[vmx.GuestCR3] = space.CR3
			g.cpl(cpl)
			// Where the request is: a user page, a kernel page, across
			// a page end, unmapped, or a random pointer.
			req := userReq + uint64(op[4])*8%(4096-hcall.SwapRequestSize)
			switch op[2] % 5 {
			case 1:
				req = kernelBuf + 256
			case 2:
				req = userReq + 4096 - uint64(op[4]%hcall.SwapRequestSize) - 1
			case 3:
				req = 0x5000
			case 4:
				req = va
			}
			b := hcall.SwapRequest{VA: va, Len: n, Options: opts}.Encode()
			if req>>47 == 0 {
				_ = space.Write(req, b[:])
			} else {
				_ = g.m.System().Write(req, b[:])
			}
			size := uint64(hcall.SwapRequestSize)
			if op[5]&1 != 0 {
				size = uint64(op[6])
			}
			a1 := req
			if nr == hcall.Exit || nr == hcall.Secret {
				a1 = uint64(op[7])
			}
			ret, stop := g.mon.Call(g.v, nr, a1, size, 0)
			if cpl != 0 {
				switch nr {
				case hcall.Exit:
					if grants&uint8(monitor.Ring3Exit) == 0 && (stop || ret != hcall.Denied) {
						t.Fatalf("CPL %d ended the guest", cpl)
					}
				case hcall.Secret:
					if grants&uint8(monitor.Ring3Secret) == 0 && ret == secretPA {
						t.Fatalf("CPL %d got the secret page", cpl)
					}
				case hcall.SwapRead:
					if ret == 0 {
						o := swapmem.Options(opts)
						allowed := swapmem.UserFault | swapmem.NoFault | swapmem.WriteFault | swapmem.NoDups
						if grants&uint8(monitor.Ring3BPFault) != 0 {
							allowed |= swapmem.BPFault
						}
						if req>>47 != 0 || va+n > 1<<47 || va+n < va || o&^allowed != 0 || o&(swapmem.UserFault|swapmem.NoFault|swapmem.BPFault) == 0 {
							t.Fatalf("CPL %d read %#x+%#x with %v through a request at %#x", cpl, va, n, o, req)
						}
					}
				}
			}
			if nr != hcall.Exit && stop {
				t.Fatalf("function %d stopped the guest", nr)
			}
			// The guest runs a little: pages move, faults are taken.
			switch op[3] >> 1 % 4 {
			case 0:
				_ = space.SwapOut(userBuf + uint64(op[4]%4)*4096)
			case 1:
				_ = space.Touch(userBuf+uint64(op[4]%4)*4096, false)
			case 2:
				cpu.Switch(space.CR3, []int{0, 3}[op[4]&1])
				_ = g.mon.Engine.InjectPendingPF(cpu)
				g.m.Deliver()
			case 3:
				g.mon.Pump()
			}
			if g.mon.Held() > monitor.ReadBudget {
				t.Fatalf("reads hold %d bytes, above the budget", g.mon.Held())
			}
		}
	})
}
