package monitor_test

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/pagein"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

// pgdPair shows an isolated process's top-level tables to
// guestmem.AddressSpaces: the kernel PGD at k, the user PGD at k|bit 12.
type pgdPair struct{ k uint64 }

func (p pgdPair) ReadPhys(pa uint64, b []byte) error {
	clear(b)
	put := func(i int, e uint64) {
		if off := 8*i - int(pa&0xfff); off >= 0 && off+8 <= len(b) {
			binary.LittleEndian.PutUint64(b[off:], e)
		}
	}
	switch pa &^ 0xfff {
	case p.k:
		put(0, 0x5000|7|1<<63) // user entry, NX in the kernel copy
		put(273, 0x6000|3)     // direct map
		put(511, 0x7000|3)     // kernel text
	case p.k | guestmem.PTIUserBit:
		put(0, 0x5000|7)
		put(508, 0x8000|3) // entry trampoline
	}
	return nil
}

// With page-table isolation a process calls from user mode with its user
// CR3 (PGD | bit 12, user PCID): its reads are its kernel PGD's address
// space, which the engine's faults, the status and the agent compare.
func TestReadsOfAnIsolatedProcessAreItsAddressSpace(t *testing.T) {
	g := newGuest(t, 0)
	for g.proc.CR3&guestmem.PTIUserBit != 0 {
		g.proc = g.m.NewSpace() // the kernel PGD of a pair: bit 12 clear
	}
	require.NoError(t, g.proc.MapRange(userBuf, 4096, swapmemtest.UserRW))
	require.NoError(t, g.proc.Write(userBuf, []byte("user")))
	require.NoError(t, g.proc.MapRange(userReq, 4096, swapmemtest.UserRW))
	k := g.proc.CR3
	user := k | guestmem.PTIUserBit | 0x801
	spaces := &guestmem.AddressSpaces{Mem: pgdPair{k}}
	require.NoError(t, g.proc.SwapOut(userBuf))
	g.vmcs.Fields[vmx.GuestCR3] = user

	// Exact comparison: the user CR3 is taken for an address space of its
	// own, which the simulated machine does not even have.
	assert.Equal(t, hcall.Invalid, g.swapRead(0, userBuf, 4, uint64(swapmem.UserFault), []byte("user")))

	spaces.Observe(user, 3, true)
	require.Equal(t, guestmem.PTIOn, spaces.PTI())
	g.mon.Spaces = spaces
	assert.Zero(t, g.swapRead(0, userBuf, 4, uint64(swapmem.UserFault), []byte("user")))
	assert.Contains(t, g.log.String(), fmt.Sprintf("in CR3 %#x ", k))
	assert.Equal(t, uint64(hcall.StatusPending), g.status())
	// Asked in kernel mode (kernel CR3, kernel PCID): the same read.
	g.vmcs.Fields[vmx.GuestCR3] = k | 1
	g.cpl(0)
	assert.Equal(t, uint64(hcall.StatusPending), g.status())
	assert.Zero(t, g.swapRead(64, userBuf, 4, uint64(swapmem.UserFault), []byte("user")))
	assert.Contains(t, g.log.String(), fmt.Sprintf("in CR3 %#x replaced", k), "one read per address space")

	// The engine injects when the process runs in user mode again.
	g.vmcs.Fields[vmx.GuestCR3] = user
	g.cpl(3)
	cpu := &pagein.SwapCPU{V: g.v, Spaces: spaces}
	assert.Equal(t, k, cpu.CR3())
	g.vmcs.Fields[vmx.EntryInterruptInfo] = 0
	require.NoError(t, g.mon.Engine.InjectPendingPF(cpu))
	assert.Equal(t, uint64(1), g.mon.Engine.Stats().Injected, "UserFault taken in user mode with the user CR3")
	require.NoError(t, g.proc.Touch(userBuf, false))
	assert.Equal(t, uint64(hcall.StatusOK), g.status())
}
