package monitor_test

import (
	"bytes"
	"crypto/sha256"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/monitor"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

// newProcess makes a process with a request page and a data page at
// userBuf, swapped out, and writes a request for it (opts, 4 bytes).
func (g *guest) newProcess(opts swapmem.Options) *swapmemtest.Space {
	g.t.Helper()
	s := g.m.NewSpace()
	require.NoError(g.t, s.MapRange(userReq, 4096, swapmemtest.UserRW))
	require.NoError(g.t, s.MapSwapped(userBuf, swapmemtest.UserRW, []byte("data")))
	b := hcall.SwapRequest{VA: userBuf, Len: 4, Options: uint64(opts), SHA256: sha256.Sum256([]byte("data"))}.Encode()
	require.NoError(g.t, s.Write(userReq, b[:]))
	return s
}

// as makes the next hypercall come from s at CPL 3.
func (g *guest) as(s *swapmemtest.Space) *guest {
	g.vmcs.Fields[vmx.GuestCR3] = s.CR3
	g.cpl(3)
	return g
}

// ask makes the swap-read hypercall with the request at userReq.
func (g *guest) ask() uint64 {
	ret, _ := g.call(hcall.SwapRead, userReq, hcall.SwapRequestSize)
	return ret
}

// hogs starts n processes, each with a NoFault read of a page that is
// never served pending, and with a present page at hogPresent.
func (g *guest) hogs(n int) []*swapmemtest.Space {
	g.t.Helper()
	var hogs []*swapmemtest.Space
	for i := 0; i < n; i++ {
		s := g.newProcess(swapmem.NoFault)
		require.NoError(g.t, s.MapRange(hogPresent, 4096, swapmemtest.UserRW))
		require.NoError(g.t, s.Write(hogPresent, []byte("here")))
		require.Zero(g.t, g.as(s).ask(), "hog %d", i)
		hogs = append(hogs, s)
	}
	return hogs
}

// 64 processes each keep a NoFault read that is never served pending,
// asking again before its deadline: once they have held their places for
// Tenure, another process's read takes one, and keeps it for Tenure.
func TestProcessesCannotKeepEveryoneElseBusy(t *testing.T) {
	g := newGuest(t, 0)
	hogs := g.hogs(monitor.MaxReads)
	victim := g.newProcess(swapmem.UserFault)
	assert.Equal(t, hcall.Busy, g.as(victim).ask(), "every place is young")

	// Every 29 s each hog asks again: its own read gives way, its age
	// stays. The victim asks once a round, and its read is served.
	served := 0
	for round := 0; round < 20; round++ {
		g.clk = g.clk.Add(29 * time.Second)
		for _, s := range hogs {
			g.as(s).ask()
		}
		if g.as(victim).ask() != 0 {
			continue
		}
		served++
		assert.Equal(t, uint64(hcall.StatusPending), g.status())
		// The hogs asking again cannot take the victim's place.
		g.clk = g.clk.Add(time.Second)
		for _, s := range hogs {
			g.as(s).ask()
		}
		assert.Equal(t, uint64(hcall.StatusPending), g.as(victim).status(), "round %d", round)
		require.NoError(t, victim.Touch(userBuf, false))
		assert.Equal(t, uint64(hcall.StatusOK), g.status(), "round %d", round)
		require.NoError(t, victim.SwapOut(userBuf))
	}
	assert.Equal(t, 20, served, "of the victim's 20 reads over 10 minutes")
	assert.Equal(t, monitor.MaxReads-1, g.mon.Pending(), "the hogs take turns in the other places")
}

// The bytes pending reads may hold are bounded: two 16 MiB reads take the
// budget; a third waits until one of them has held its bytes for Tenure.
func TestReadsStayWithinTheBudget(t *testing.T) {
	g := newGuest(t, 0)
	const big = 0x0000_7e00_0000_0000
	var ps []*swapmemtest.Space
	for i := 0; i < 3; i++ {
		s := g.m.NewSpace()
		require.NoError(t, s.MapRange(userReq, 4096, swapmemtest.UserRW))
		b := hcall.SwapRequest{VA: big, Len: swapmem.MaxLen, Options: uint64(swapmem.NoFault)}.Encode()
		require.NoError(t, s.Write(userReq, b[:]))
		ps = append(ps, s)
	}
	assert.Zero(t, g.as(ps[0]).ask())
	g.clk = g.clk.Add(time.Second)
	assert.Zero(t, g.as(ps[1]).ask())
	assert.EqualValues(t, monitor.ReadBudget, g.mon.Held())
	assert.Equal(t, hcall.Busy, g.as(ps[2]).ask(), "beyond the budget")
	// A process may always replace its own read.
	assert.Zero(t, g.as(ps[1]).ask())

	g.clk = g.clk.Add(monitor.Tenure)
	assert.Zero(t, g.as(ps[2]).ask())
	assert.Equal(t, uint64(hcall.StatusFailed), g.as(ps[0]).status(), "the oldest read gave way")
	assert.Equal(t, uint64(hcall.StatusPending), g.as(ps[1]).status())
	assert.EqualValues(t, monitor.ReadBudget, g.mon.Held())
	assert.Equal(t, 2, g.mon.Engine.Stats().Live, "a piece of each started in its hypercall's exit")
	for i := 0; i < 40; i++ {
		g.mon.Pump()
	}
	assert.Equal(t, 32, g.mon.Engine.Stats().Live)
	assert.Zero(t, g.mon.Engine.Stats().Held, "nothing arrived: nothing held")
}

// A process's read and status go with it: the next process given its
// top-level table (the same binary, the same addresses) neither gets its
// faults nor sees its status.
func TestStatusIsNotAnsweredToTheNextOwner(t *testing.T) {
	g := newGuest(t, 0)
	a := g.newProcess(swapmem.UserFault)
	require.NoError(t, a.Touch(userBuf, false))
	require.Zero(t, g.as(a).ask())
	require.Equal(t, uint64(hcall.StatusOK), g.status())
	require.NoError(t, a.Exit())
	b, err := a.Reuse()
	require.NoError(t, err)
	require.NoError(t, b.MapRange(userReq, 4096, swapmemtest.UserRW))
	assert.Equal(t, hcall.Invalid, g.as(b).status(), "the dead process's status")

	// The same with the read pending at the exit.
	require.NoError(t, b.MapSwapped(userBuf, swapmemtest.UserRW, []byte("data")))
	req := hcall.SwapRequest{VA: userBuf, Len: 4, Options: uint64(swapmem.UserFault), SHA256: sha256.Sum256([]byte("data"))}.Encode()
	require.NoError(t, b.Write(userReq, req[:]))
	require.Zero(t, g.as(b).ask())
	require.Equal(t, uint64(hcall.StatusPending), g.status())
	require.NoError(t, b.Exit())
	assert.Zero(t, g.mon.Engine.Stats().Live, "its read ended")
	c, err := b.Reuse()
	require.NoError(t, err)
	require.NoError(t, c.MapSwapped(userBuf, swapmemtest.UserRW, []byte("data")))
	assert.Equal(t, hcall.Invalid, g.as(c).status())
	cpu := g.m.NewVCPU(0)
	cpu.Switch(c.CR3, 3)
	require.NoError(t, g.mon.Engine.InjectPendingPF(cpu))
	assert.Empty(t, g.m.Queued(), "nothing of it injected into the next process")
	assert.Zero(t, g.mon.Held())
	assert.Zero(t, g.m.Watches())
}

// movingRequest moves the request page to another frame right after the
// monitor read it, as another vCPU (or the kernel's migration) may.
type movingRequest struct {
	*swapmemtest.Machine
	s     *swapmemtest.Space
	moved bool
}

func (m *movingRequest) ReadPhys(pa uint64, p []byte) error {
	err := m.Machine.ReadPhys(pa, p)
	if len(p) == hcall.SwapRequestSize && !m.moved {
		m.moved = true
		// The frame goes to another mapping, the page to a new frame.
		_ = m.s.Unmap(userReq)
		_ = m.s.MapRange(userReq+0x10000, 4096, swapmemtest.UserRW)
		_ = m.s.MapRange(userReq, 4096, swapmemtest.UserRW)
	}
	return err
}

// The request counts only if its page translated the same before and
// after it was read: bytes read from a frame the page left are nobody's
// request.
func TestRequestIsReadThroughAStableTranslation(t *testing.T) {
	g := newGuest(t, 0)
	mov := &movingRequest{Machine: g.m, s: g.proc}
	g.mon.Mem = mov
	want := []byte("user")
	assert.Equal(t, hcall.Invalid, g.swapRead(0, userBuf, 4, uint64(swapmem.UserFault), want))
	assert.True(t, mov.moved)
	assert.Zero(t, g.mon.Engine.Stats().Completed+g.mon.Engine.Stats().Failed, "no read started")
	assert.Equal(t, hcall.Invalid, g.status())
	assert.Zero(t, g.swapRead(0, userBuf, 4, uint64(swapmem.UserFault), want), "a page that stays put")
}

// spaceZero shows a process whose kernel PGD is the page at 0 (its user
// PGD at 0x1000): translations in address space 0 are the process's.
type spaceZero struct {
	*swapmemtest.Machine
	proc uint64
}

func (z spaceZero) Translate(cr3, va uint64) (swapmem.Translation, error) {
	if cr3 == 0 {
		cr3 = z.proc
	}
	return z.Machine.Translate(cr3, va)
}

func (z spaceZero) Watch(cr3, va uint64, f func(swapmem.Translation)) (func(), error) {
	if cr3 == 0 {
		cr3 = z.proc
	}
	return z.Machine.Watch(cr3, va, f)
}

// Address space 0 is the engine's system space: a caller whose address
// space is 0 (a user PGD at 0x1000 with page-table isolation) would read
// the kernel's instead of its own. It is refused.
func TestAddressSpaceZeroIsRefused(t *testing.T) {
	g := newGuest(t, 0)
	spaces := &guestmem.AddressSpaces{Mem: pgdPair{0}}
	spaces.Observe(guestmem.PTIUserBit, 3, true)
	require.Equal(t, guestmem.PTIOn, spaces.PTI())
	g.mon.Spaces = spaces
	g.mon.Mem = spaceZero{g.m, g.proc.CR3}
	g.vmcs.Fields[vmx.GuestCR3] = guestmem.PTIUserBit
	for _, cpl := range []int{3, 0} {
		g.cpl(cpl)
		assert.Equal(t, hcall.Invalid, g.swapRead(0, userBuf, 4, uint64(swapmem.NoFault), []byte("user")), "CPL %d", cpl)
	}
	assert.Zero(t, g.mon.Engine.Stats().Live+int(g.mon.Engine.Stats().Completed+g.mon.Engine.Stats().Failed), "no read started")
	assert.Equal(t, hcall.Invalid, g.status())
}

// countingMemory counts the bytes of guest memory read, besides
// paging-structure entries.
type countingMemory struct {
	*swapmemtest.Machine
	bytes int
}

func (c *countingMemory) ReadPhys(pa uint64, p []byte) error {
	if len(p) > 8 {
		c.bytes += len(p)
	}
	return c.Machine.ReadPhys(pa, p)
}

// A hypercall's work inside its exit is bounded: a 16 MiB read of
// present memory reads ExitBytes in the exit of its hypercall, and as
// much before each of the following entries, until it ends.
func TestSwapReadWorkPerExitIsBounded(t *testing.T) {
	m := swapmemtest.NewMachine()
	m.TopEntries = true
	mem := &countingMemory{Machine: m}
	g := newGuest(t, 0)
	g.m, g.proc = m, m.NewSpace()
	g.vmcs.Fields[vmx.GuestCR3] = g.proc.CR3
	g.mon.Mem, g.mon.Engine = mem, swapmem.New(mem, swapmem.Config{})
	const big = 0x0000_7e00_0000_0000
	require.NoError(t, g.proc.MapRange(userReq, 4096, swapmemtest.UserRW))
	require.NoError(t, g.proc.MapRange(big, swapmem.MaxLen, swapmemtest.UserRW))
	data := bytes.Repeat([]byte("0123456789abcdef"), swapmem.MaxLen/16)
	require.NoError(t, g.proc.Write(big, data))

	mem.bytes = 0
	require.Zero(t, g.swapRead(0, big, swapmem.MaxLen, uint64(swapmem.UserFault), data))
	// Besides the request, and a table page where the address space's
	// record finds a quiet place to watch.
	assert.LessOrEqual(t, mem.bytes, monitor.ExitBytes+hcall.SwapRequestSize+4096, "read in the hypercall's exit")
	entries := 0
	for ; g.status() == hcall.StatusPending && entries < 100; entries++ {
		mem.bytes = 0
		g.mon.Pump()
		assert.LessOrEqual(t, mem.bytes, monitor.ExitBytes, "read before entry %d", entries)
	}
	assert.Equal(t, uint64(hcall.StatusOK), g.status())
	assert.Equal(t, swapmem.MaxLen/monitor.ExitBytes-1, entries)
	assert.Contains(t, g.log.String(), "16777216 bytes")
	assert.Zero(t, g.mon.Held())
}

// Bytes that arrive ahead of a missing page are kept, then hashed in
// order once it arrives, ExitBytes at most before each entry.
func TestBytesAheadOfAMissingPageAreHashedInOrder(t *testing.T) {
	g := newGuest(t, 0)
	const big = 0x0000_7e00_0000_0000
	const n = 3*monitor.ExitBytes + 4096
	require.NoError(t, g.proc.MapRange(big, n, swapmemtest.UserRW))
	data := make([]byte, n)
	for i := range data {
		data[i] = byte(i * 7 / 4096)
	}
	require.NoError(t, g.proc.Write(big, data))
	require.NoError(t, g.proc.SwapOut(big))
	require.Zero(t, g.swapRead(0, big, n, uint64(swapmem.NoFault), data))
	for i := 0; i < 10; i++ {
		g.mon.Pump()
	}
	assert.Equal(t, uint64(hcall.StatusPending), g.status())
	require.NoError(t, g.proc.Touch(big, false))
	assert.Equal(t, uint64(hcall.StatusPending), g.status(), "what was kept is hashed before the next entries")
	for i := 0; i < 10 && g.status() == hcall.StatusPending; i++ {
		g.mon.Pump()
	}
	assert.Equal(t, uint64(hcall.StatusOK), g.status(), "log:\n%s", g.log.String())
}
