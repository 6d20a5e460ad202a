package monitor_test

import (
	"crypto/sha256"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/monitor"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
)

const hogPresent = 0x0000_0000_0060_0000 // a present page of each hog

// hogRequest writes a request for len(want) bytes at va with opts at s's userReq.
func hogRequest(t *testing.T, s *swapmemtest.Space, va uint64, opts swapmem.Options, want []byte) {
	b := hcall.SwapRequest{VA: va, Len: uint64(len(want)), Options: uint64(opts), SHA256: sha256.Sum256(want)}.Encode()
	require.NoError(t, s.Write(userReq, b[:]))
}

// A process cannot make its place young again by letting its read end
// for an instant: one read that completes inside its own hypercall (a
// present page), then the pending one again. 64 processes doing that
// every 9 s do not keep every other process busy.
func TestEndedReadDoesNotMakeAPlaceYoung(t *testing.T) {
	g := newGuest(t, 0)
	hogs := g.hogs(monitor.MaxReads)
	victim := g.newProcess(swapmem.UserFault)
	served := 0
	for round := 0; round < 20; round++ {
		g.clk = g.clk.Add(5 * time.Second)
		for _, s := range hogs {
			// A read that ends at once ...
			// (busy once the victim has its place) ...
			hogRequest(t, s, hogPresent, swapmem.NoFault, []byte("here"))
			g.as(s).ask()
			// ... and the pending one again.
			hogRequest(t, s, userBuf, swapmem.NoFault, []byte("data"))
			g.as(s).ask()
		}
		g.clk = g.clk.Add(4 * time.Second) // every 9 s; the victim asks in between
		if g.as(victim).ask() == 0 {
			served++
		}
	}
	assert.NotZero(t, served, "the victim was busy in every one of 20 rounds over 180 s")
}

// The same through the byte budget: two processes, each with a 16 MiB
// NoFault read of untouched memory asked for again every 9 s after a read
// that ends at once, do not keep every other process's read busy.
func TestTwoProcessesCannotHoldTheBudget(t *testing.T) {
	g := newGuest(t, 0)
	const big = 0x0000_7e00_0000_0000
	var hogs []*swapmemtest.Space
	for i := 0; i < 2; i++ {
		s := g.m.NewSpace()
		require.NoError(t, s.MapRange(userReq, 4096, swapmemtest.UserRW))
		require.NoError(t, s.MapRange(hogPresent, 4096, swapmemtest.UserRW))
		require.NoError(t, s.Write(hogPresent, []byte("here")))
		b := hcall.SwapRequest{VA: big, Len: swapmem.MaxLen, Options: uint64(swapmem.NoFault)}.Encode()
		require.NoError(t, s.Write(userReq, b[:]))
		require.Zero(t, g.as(s).ask())
		hogs = append(hogs, s)
	}
	victim := g.newProcess(swapmem.UserFault)
	served := 0
	for round := 0; round < 20; round++ {
		g.clk = g.clk.Add(5 * time.Second)
		for _, s := range hogs {
			hogRequest(t, s, hogPresent, swapmem.NoFault, []byte("here"))
			g.as(s).ask()
			b := hcall.SwapRequest{VA: big, Len: swapmem.MaxLen, Options: uint64(swapmem.NoFault)}.Encode()
			require.NoError(t, s.Write(userReq, b[:]))
			g.as(s).ask()
		}
		assert.LessOrEqual(t, g.mon.Held(), uint64(monitor.ReadBudget))
		g.clk = g.clk.Add(4 * time.Second)
		if g.as(victim).ask() == 0 {
			served++
		}
	}
	assert.NotZero(t, served, "the victim's 4-byte read was busy in every one of 20 rounds over 180 s")
}

// A process whose read was served keeps its answer while the record
// table is full: a newcomer that needs a record takes the place of a read
// pending for Tenure or more before that of a read that just ended.
func TestAnswerSurvivesAFullRecordTable(t *testing.T) {
	g := newGuest(t, 0)
	hogs := g.hogs(monitor.MaxReads)
	g.clk = g.clk.Add(monitor.Tenure)
	// The victim's read ends in its own hypercall (a present page).
	victim := g.m.NewSpace()
	require.NoError(t, victim.MapRange(userReq, 4096, swapmemtest.UserRW))
	require.NoError(t, victim.MapRange(hogPresent, 4096, swapmemtest.UserRW))
	require.NoError(t, victim.Write(hogPresent, []byte("here")))
	hogRequest(t, victim, hogPresent, swapmem.NoFault, []byte("here"))
	require.Zero(t, g.as(victim).ask())
	require.EqualValues(t, hcall.StatusOK, g.as(victim).status())
	// Every hog asks again; the one that lost its place needs a record.
	for _, s := range hogs {
		g.as(s).ask()
	}
	assert.EqualValues(t, hcall.StatusOK, g.as(victim).status(), "the served read's answer was forgotten for a newcomer")
}
