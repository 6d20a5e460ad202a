package monitor_test

import (
	"bytes"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/monitor"
	"github.com/tamahv/tamahv/hv/pagein"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

// A range whose middle page was munmap'ed: no fault is injected there
// (it would be SIGSEGV), the mapped parts are read and checked, and the
// status says the read was partial.
func TestReadAcrossAnUnmappedHole(t *testing.T) {
	g := newGuest(t, 0)
	all := bytes.Repeat([]byte("user"), 4096)
	const off, end = 100, 4*4096 - 100
	rest := append(append([]byte{}, all[off:2*4096]...), all[3*4096:end]...)
	for _, p := range []uint64{0, 1, 3} {
		require.NoError(t, g.proc.SwapOut(userBuf+p*4096))
	}
	require.NoError(t, g.proc.Unmap(userBuf+2*4096))

	// The engine alone refuses the whole range for its hole (ErrNotBacked):
	// the monitor reads the parts around it.
	assert.Zero(t, g.swapRead(0, userBuf+off, end-off, uint64(swapmem.UserFault), rest))
	assert.Equal(t, uint64(hcall.StatusPending), g.status())
	assert.Contains(t, g.log.String(), "1 pages not mapped skipped (the first at 0x7f0000002000), 2 parts")
	assert.Equal(t, 3, g.mon.Engine.Stats().Pages, "the hole is not waited for")

	// Faults go to the mapped pages only.
	cpu := &pagein.SwapCPU{V: g.v}
	g.vmcs.Fields[vmx.EntryInterruptInfo] = 0
	require.NoError(t, g.mon.Engine.InjectPendingPF(cpu))
	assert.Equal(t, uint64(userBuf), g.v.Regs.CR2)
	for _, p := range []uint64{0, 1, 3} {
		require.NoError(t, g.proc.Touch(userBuf+p*4096, false))
	}
	assert.Equal(t, uint64(hcall.StatusPartial), g.status())
	assert.Contains(t, g.log.String(), "tamahv: swapmem read partial: sha256 ")
	assert.Contains(t, g.log.String(), strconv.Itoa(len(rest))+" bytes of the mapped parts, 1 pages not mapped left out")
	assert.Zero(t, g.mon.Engine.Stats().Live)

	// The same range with a hash of the whole range (hole included) fails.
	for _, p := range []uint64{0, 1, 3} {
		require.NoError(t, g.proc.SwapOut(userBuf+p*4096))
	}
	assert.Zero(t, g.swapRead(0, userBuf+off, end-off, uint64(swapmem.UserFault), all[off:end]))
	for _, p := range []uint64{0, 1, 3} {
		require.NoError(t, g.proc.Touch(userBuf+p*4096, false))
	}
	assert.Equal(t, uint64(hcall.StatusFailed), g.status())
}

// A range with nothing mapped, or cut into more than MaxParts parts, is
// refused as before.
func TestReadOfHolesOnlyOrTooManyPartsIsRefused(t *testing.T) {
	g := newGuest(t, 0)
	for p := uint64(0); p < 4; p++ {
		require.NoError(t, g.proc.Unmap(userBuf+p*4096))
	}
	assert.Equal(t, hcall.Invalid, g.swapRead(0, userBuf, 4*4096, uint64(swapmem.UserFault), nil))
	assert.Equal(t, uint64(hcall.StatusFailed), g.status())
	assert.Contains(t, g.log.String(), "4 pages of 0x7f0000000000+16384 not mapped")

	const many = 0x7f00_0020_0000
	n := 2*monitor.MaxParts + 2
	require.NoError(t, g.proc.MapRange(many, uint64(n)*4096, swapmemtest.UserRW))
	for p := 1; p < n; p += 2 {
		require.NoError(t, g.proc.Unmap(many+uint64(p)*4096))
	}
	assert.Equal(t, hcall.Invalid, g.swapRead(0, many, uint64(n)*4096, uint64(swapmem.UserFault), nil))
	assert.Zero(t, g.mon.Engine.Stats().Live)

	// NoFault reads are not cut: they wait for every page.
	assert.Zero(t, g.swapRead(0, userBuf, 4, uint64(swapmem.NoFault), nil))
	assert.Equal(t, uint64(hcall.StatusPending), g.status())
}

// When one part of a read cut at a hole fails, the read fails and the
// other parts leave the engine at once.
func TestReadAcrossAHoleFailsAsAWhole(t *testing.T) {
	g := newGuest(t, 0)
	var now time.Duration
	g.mon.Engine = swapmem.New(g.m, swapmem.Config{Now: func() time.Duration { return now }})
	for _, p := range []uint64{0, 1, 3} {
		require.NoError(t, g.proc.SwapOut(userBuf+p*4096))
	}
	require.NoError(t, g.proc.Unmap(userBuf+2*4096))
	assert.Zero(t, g.swapRead(0, userBuf, 4*4096, uint64(swapmem.UserFault), nil))
	assert.Equal(t, 2, g.mon.Engine.Stats().Live, "two parts")
	// The page of the second part is unmapped too while it waits.
	require.NoError(t, g.proc.Unmap(userBuf+3*4096))
	now += 2 * swapmem.DefaultTimeout
	g.mon.Engine.ReinjectFailedPF()
	assert.Equal(t, uint64(hcall.StatusFailed), g.status())
	assert.Zero(t, g.mon.Engine.Stats().Live, "the first part removed")
	assert.Contains(t, g.log.String(), "tamahv: swapmem read FAILED: swapmem: page is not backed")
}
