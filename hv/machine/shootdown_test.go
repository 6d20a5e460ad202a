package machine_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/hv/monitor"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// An unprivileged 16 MiB swap read changes the EPT in many places: it
// watches the page tables of every page of its range (ExitBytes of it per
// exit), and a read that replaces the process's earlier one ends the
// earlier one's watches, on up to 16 page-table pages. Every exit costs
// the other processors two shootdowns at most: the watches that end give
// their protections back in the one before the VM entry (Sync) or in the
// one a new watch makes anyway. A process looping on the hypercall cannot
// make every other vCPU exit once per page table it names.
func TestSwapReadsCostTwoShootdownsPerExitAtMost(t *testing.T) {
	b, m, log := newMachineWith(t, func(*machine.Config) {})
	const (
		pgd    = 0x60_0000
		pdptPA = pgd + 0x1000
		pdPA   = pgd + 0x2000
		ptPA   = pgd + 0x1_0000 // 16 page tables, one after another
		req    = pgd + 0x3000
		bigVA  = 0x7e00_0000_0000 // 32 MiB, swapped out
		tables = 16
	)
	b.put64(pgd+8*(bigVA>>39&511), pdptPA|7)
	b.put64(pdptPA+8*(bigVA>>30&511), pdPA|7)
	for i := range uint64(tables) {
		b.put64(pdPA+8*(bigVA>>21&511+i), (ptPA+i<<12)|7)
		for j := range uint64(512) {
			b.put64(ptPA+i<<12+8*j, swapPTE+(i*512+j)<<12)
		}
	}
	// The request page sits in the last table's range: a 4 KiB page of
	// its own, mapped through a second directory entry.
	reqVA := uint64(bigVA + tables<<21)
	reqPT := uint64(pgd + 0x4000)
	b.put64(pdPA+8*(reqVA>>21&511), reqPT|7)
	b.put64(reqPT+8*(reqVA>>12&511), req|7)

	ask := func(va uint64) func(b *board, r *vmx.GuestRegs) {
		return func(b *board, r *vmx.GuestRegs) {
			q := hcall.SwapRequest{VA: va, Len: swapmem.MaxLen, Options: uint64(swapmem.NoFault)}.Encode()
			require.NoError(t, b.WritePhys(req, q[:]))
			b.in(3, pgd)
			r.RAX, r.RDI, r.RSI = hcall.SwapRead, reqVA, hcall.SwapRequestSize
			b.exitWith(vmx.ExitVMCALL)
		}
	}
	var gens []uint64
	var hooked int
	mark := func(b *board, r *vmx.GuestRegs) { gens = append(gens, m.Shootdown.Generation()) }
	answered := func(b *board, r *vmx.GuestRegs) {
		assert.Zero(t, r.RAX, "the read started; log:\n%s", log)
		mark(b, r)
	}
	run := func(b *board, r *vmx.GuestRegs) {
		b.in(3, pgd)
		b.exitWith(vmx.ExitCPUID)
	}
	b.script = []step{{name: "it runs", exit: run}, {name: "it reads 16 MiB", check: mark, exit: ask(bigVA)}}
	for i := range swapmem.MaxLen / monitor.ExitBytes {
		check := mark
		if i == 0 {
			check = answered
		}
		b.script = append(b.script, step{name: "the read goes on", check: check, exit: run})
	}
	b.script = append(b.script,
		step{name: "it reads the next 16 MiB instead", check: func(b *board, r *vmx.GuestRegs) {
			hooked = m.Watcher.Watches()
			mark(b, r)
		}, exit: ask(bigVA + swapmem.MaxLen)},
		step{name: "exit", check: answered, exit: func(b *board, r *vmx.GuestRegs) {
			b.in(0, pgd)
			r.RAX, r.RDI = hcall.Exit, 0
			b.exitWith(vmx.ExitVMCALL)
		}})
	require.NoError(t, m.Run(), "log:\n%s", log)
	var most uint64
	for i := 1; i < len(gens); i++ {
		most = max(most, gens[i]-gens[i-1])
	}
	last := gens[len(gens)-1] - gens[len(gens)-2]
	t.Logf("%d shootdowns in all, at most %d in one exit; %d pages hooked, the replacing read's exit: %d", gens[len(gens)-1]-gens[0], most, hooked, last)
	assert.Greater(t, hooked, tables/2, "the first read watched its page tables")
	assert.LessOrEqual(t, most, uint64(2), "shootdowns in one exit")
}
