package pagein

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/hv/hvtest/fakeguest"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

func agent(g *fakeguest.Guest, lstar uint64, split bool) *BreakpointAgent {
	a := &BreakpointAgent{Phys: g.Phys, Walker: &guestmem.Walker{Mem: g.Phys}, LSTAR: func(*hv.VCPU) uint64 { return lstar }}
	if split {
		// The shadow is a page of tamahv's, outside the guest's reach.
		a.Shadow, a.ShadowPA = new([4096]byte), fakeguest.HoleStart+0x7f000
	}
	return a
}

// TestBreakpointAgentRefusesADetourOutsideGuestRAM: the guest kernel maps
// the detour's page into tamahv's region (the EPT root's page, say), onto
// MMIO or beyond RAM. Before, the agent retargeted guest-physical X to
// host-physical X (tamahv's memory, read/write, later RWX) or wrote 0xcc
// there. Now Arm fails and neither the EPT nor tamahv's memory changes;
// and a detour moved there after a good Arm is refused at the next Arm.
func TestBreakpointAgentRefusesADetourOutsideGuestRAM(t *testing.T) {
	tamahv := bytes.Repeat([]byte{0x5a}, 4096)
	for _, split := range []bool{true, false} {
		for _, c := range []struct {
			pa  uint64
			err error
		}{{fakeguest.HoleStart + 0x5000, guestmem.ErrHole}, {fakeguest.SinkPA + 0x5000, guestmem.ErrHole}, {0xfee00000, guestmem.ErrNotRAM}, {0x140000000, guestmem.ErrNotRAM}} {
			g := fakeguest.New(t, ept.Options{ExecuteOnly: true})
			c1, lstar, detour := entryCodeWith(0xffffffff81900ff3)
			require.Zero(t, detour&0xfff, "the detour starts a page")
			g.LoadKernel(c1, map[uint64]uint64{detour: c.pa})
			require.NoError(t, g.Mem.WritePhys(fakeguest.HoleStart+0x5000, tamahv))
			require.NoError(t, g.Mem.WritePhys(fakeguest.SinkPA+0x5000, tamahv))
			a := agent(g, lstar, split)
			err := a.Arm(nil, g.CR3, 0x7f0000001000)
			require.ErrorIs(t, err, ErrNoDetour, "split %v, %#x", split, c.pa)
			assert.ErrorIs(t, err, c.err)
			hpa, perm, _, _, _ := g.EPT.Lookup(fakeguest.HoleStart + 0x5000)
			assert.Equal(t, uint64(fakeguest.SinkPA+0x5000), hpa, "the guest still sees the sink there")
			assert.Equal(t, ept.Read|ept.Write, perm)
			var got [4096]byte
			_ = g.Mem.ReadPhys(fakeguest.HoleStart+0x5000, got[:])
			assert.Equal(t, tamahv, got[:], "tamahv's memory untouched")
			_ = g.Mem.ReadPhys(fakeguest.SinkPA+0x5000, got[:])
			assert.Equal(t, tamahv, got[:], "the sink untouched")
			assert.Zero(t, g.Phys.Owners())
		}

		// Armed once on guest RAM, then moved into tamahv's region.
		g := fakeguest.New(t, ept.Options{ExecuteOnly: true})
		c1, lstar, detour := entryCode()
		g.LoadKernel(c1, nil)
		a := agent(g, lstar, split)
		require.NoError(t, a.Arm(nil, g.CR3, 0x7f0000001000))
		assert.Equal(t, 1, g.Phys.Owners())
		require.NoError(t, a.Disarm())
		assert.Zero(t, g.Phys.Owners())
		g.MapPage(detour&^0xfff, fakeguest.HoleStart+0x5000, vmx.PTEWritable)
		err := a.Arm(nil, g.CR3, 0x7f0000001000)
		assert.ErrorIs(t, err, guestmem.ErrHole, "split %v", split)
		hpa, perm, _, _, _ := g.EPT.Lookup(fakeguest.HoleStart + 0x5000)
		assert.Equal(t, uint64(fakeguest.SinkPA+0x5000), hpa)
		assert.Equal(t, ept.Read|ept.Write, perm)
		assert.Zero(t, g.Phys.Owners())
	}
}

// TestAgentAndWatchesKeepTheirPermissions: the detour's page is also a
// watched page table. Before, the agent's views replaced the watch's
// write protection (PTE writes there went unseen; remove left the page
// RWX while the watch counted it protected) and unhook restored
// permissions captured under the agent's view. Now each refuses the
// other's page, and each gets its own permissions back.
func TestAgentAndWatchesKeepTheirPermissions(t *testing.T) {
	for _, split := range []bool{true, false} {
		g := fakeguest.New(t, ept.Options{ExecuteOnly: true})
		gm := guestmem.NewWatcher(g.Phys, g.CR3)
		const user = 0x7f0000000000 + 100<<12 // PTE index 100: clear of the code bytes
		g.MapPage(user, 0x300000, vmx.PTEWritable|vmx.PTEUser)
		pt := g.Entry(user, 1) &^ 0xfff
		c, lstar, detour := entryCode()
		g.LoadKernel(c, map[uint64]uint64{detour &^ 0xfff: pt})
		a := agent(g, lstar, split)

		// The watch first: the agent is refused, the protection stays.
		cancel, err := gm.Watch(g.CR3, user, func(swapmem.Translation) {})
		require.NoError(t, err)
		err = a.Arm(nil, g.CR3, 0x7f0000001000)
		assert.ErrorIs(t, err, guestmem.ErrPageInUse, "split %v", split)
		hpa, perm, _, _, _ := g.EPT.Lookup(pt)
		assert.Equal(t, pt, hpa)
		assert.Equal(t, ept.Read|ept.Exec, perm, "still write-protected")
		assert.NotEqual(t, byte(0xcc), *g.Mem.At(pt + detour&0xfff), "no int3 in the page table")
		cancel()
		_, perm, _, _, _ = g.EPT.Lookup(pt)
		assert.Equal(t, ept.RWX, perm)

		// The agent first: the watch is refused, the agent's view stays,
		// and both leave the page as it was.
		require.NoError(t, a.Arm(nil, g.CR3, 0x7f0000001000))
		_, before, _, _, _ := g.EPT.Lookup(pt)
		_, err = gm.Watch(g.CR3, user, func(swapmem.Translation) {})
		assert.ErrorIs(t, err, guestmem.ErrPageInUse)
		_, after, _, _, _ := g.EPT.Lookup(pt)
		assert.Equal(t, before, after, "the agent's view untouched")
		assert.Zero(t, gm.Watches())
		require.NoError(t, a.Disarm())
		hpa, perm, _, _, _ = g.EPT.Lookup(pt)
		assert.Equal(t, pt, hpa)
		assert.Equal(t, ept.RWX, perm)
		assert.Zero(t, g.Phys.Owners())
		cancel, err = gm.Watch(g.CR3, user, func(swapmem.Translation) {})
		require.NoError(t, err)
		cancel()
	}
}
