package machine_test

import (
	"crypto/sha256"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/hv/monitor"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// A static binary's process: its text at a fixed address, read-only, and
// a page for its requests, under one PGD page.
const (
	binPGD  = 0x20_0000
	binPDPT = 0x21_0000
	binPD   = 0x21_1000
	binPT   = 0x21_2000
	textVA  = 0x40_1000
	textPA  = 0x50_0000
	binReq  = textVA + 0x1000
	binReqA = 0x50_1000 // the first process's request page
	binReqB = 0x50_2000 // the next one's
)

// exec builds a process of the binary on the PGD page: its tables, its
// text and its request page.
func (b *board) exec(reqPA uint64) {
	b.put64(binPGD+8*(textVA>>39&511), binPDPT|7)
	b.put64(binPDPT+8*(textVA>>30&511), binPD|7)
	b.put64(binPD+8*(textVA>>21&511), binPT|7)
	b.put64(binPT+8*(textVA>>12&511), textPA|5) // user, read-only
	b.put64(binPT+8*(binReq>>12&511), reqPA|7)
}

// writeExit is the guest kernel storing to the page-table page pg: an EPT
// violation where tamahv protects the page, the store then done by the
// next step; elsewhere the store just happens (a CPUID exit follows).
func (b *board) writeExit(m *machine.Machine, pg uint64) {
	if _, perm, _, _, ok := m.EPT.Lookup(pg); ok && perm&ept.Write == 0 {
		b.vmcs.Fields[vmx.GuestPhysAddr] = pg
		b.vmcs.Fields[vmx.ExitQualification] = 1<<1 | 1<<3 | 1<<5 | 1<<7 | 1<<8
		b.exitWith(vmx.ExitEPTViolation)
		return
	}
	b.exitWith(vmx.ExitCPUID)
}

// A process asks for a write fault on its own read-only text, takes the
// first one (it catches SIGSEGV) and exits. Linux tears its address space
// down and gives its PGD page to the next process, which runs the same
// binary: its text at the same address, read-only. Nothing of the dead
// process's read reaches the newcomer, however long it runs: no #PF, and
// no status.
func TestReadOfADeadProcessReachesNoOneElse(t *testing.T) {
	var clk time.Duration
	b, m, log := newMachineWith(t, func(c *machine.Config) { c.Swap.Now = func() time.Duration { return clk } })
	b.exec(binReqA)
	req := hcall.SwapRequest{VA: textVA, Len: 4096, Options: uint64(swapmem.UserFault | swapmem.WriteFault)}.Encode()
	require.NoError(t, b.WritePhys(binReqA, req[:]))
	noPF := func(b *board, r *vmx.GuestRegs) {
		assert.Zero(t, b.vmcs.Fields[vmx.EntryInterruptInfo], "an event injected; log:\n%s", log)
	}
	cpuid := func(cpl int) func(b *board, r *vmx.GuestRegs) {
		return func(b *board, r *vmx.GuestRegs) {
			b.in(cpl, binPGD)
			b.exitWith(vmx.ExitCPUID)
		}
	}
	b.script = []step{
		{name: "the first process asks", exit: func(b *board, r *vmx.GuestRegs) {
			b.in(3, binPGD)
			r.RAX, r.RDI, r.RSI = hcall.SwapRead, binReq, hcall.SwapRequestSize
			b.exitWith(vmx.ExitVMCALL)
		}},
		{name: "it takes the write fault", check: func(b *board, r *vmx.GuestRegs) {
			assert.Zero(t, r.RAX, "log:\n%s", log)
			assert.Equal(t, uint64(1<<31|3<<8|1<<11|vmx.VectorPF), b.vmcs.Fields[vmx.EntryInterruptInfo])
			assert.EqualValues(t, 7, b.vmcs.Fields[vmx.EntryExceptionError], "a user write to a present page")
			assert.Equal(t, uint64(textVA), r.CR2)
		}, exit: cpuid(0)},
		{name: "exit_mmap zaps its text", check: noPF, exit: func(b *board, r *vmx.GuestRegs) { b.writeExit(m, binPT) }},
		{name: "free_pgtables clears its PGD", check: func(b *board, r *vmx.GuestRegs) {
			b.put64(binPT+8*(textVA>>12&511), 0)
			b.put64(binPT+8*(binReq>>12&511), 0)
		}, exit: func(b *board, r *vmx.GuestRegs) { b.writeExit(m, binPGD) }},
		{name: "the PGD is cleared", check: func(b *board, r *vmx.GuestRegs) {
			b.put64(binPGD+8*(textVA>>39&511), 0)
		}, exit: cpuid(0)},
		{name: "pgd_alloc gives the page to the next process", check: noPF, exit: func(b *board, r *vmx.GuestRegs) { b.writeExit(m, binPGD) }},
		{name: "its PGD entry", check: func(b *board, r *vmx.GuestRegs) {
			b.put64(binPGD+8*(textVA>>39&511), binPDPT|7)
		}, exit: cpuid(0)},
		{name: "its page table", check: noPF, exit: func(b *board, r *vmx.GuestRegs) { b.writeExit(m, binPT) }},
		{name: "the same binary's text", check: func(b *board, r *vmx.GuestRegs) {
			b.put64(binPT+8*(textVA>>12&511), textPA|5)
			b.put64(binPT+8*(binReq>>12&511), binReqB|7)
		}, exit: cpuid(3)},
		{name: "it runs", check: noPF, exit: func(b *board, r *vmx.GuestRegs) {
			clk += 1500 * time.Millisecond // past the engine's timeout
			b.in(3, binPGD)
			b.exitWith(vmx.ExitPreemptionTimer)
		}},
		{name: "and runs", check: noPF, exit: cpuid(3)},
		{name: "and runs on", check: noPF, exit: func(b *board, r *vmx.GuestRegs) {
			clk += 1500 * time.Millisecond
			b.in(3, binPGD)
			b.exitWith(vmx.ExitPreemptionTimer)
		}},
		{name: "it asks for its status", check: noPF, exit: func(b *board, r *vmx.GuestRegs) {
			b.in(3, binPGD)
			r.RAX = hcall.SwapStatus
			b.exitWith(vmx.ExitVMCALL)
		}},
		{name: "exit", check: func(b *board, r *vmx.GuestRegs) {
			noPF(b, r)
			assert.Equal(t, hcall.Invalid, r.RAX, "the dead process's status")
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.in(0, binPGD)
			r.RAX, r.RDI = hcall.Exit, 0
			b.exitWith(vmx.ExitVMCALL)
		}},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
	assert.EqualValues(t, 1, m.Engine.Stats().Injected)
	assert.Zero(t, m.Engine.Stats().Live)
	assert.Zero(t, m.Watcher.Watches(), "nothing watched any more")
	assert.Contains(t, log.String(), "went away")
}

// Processes holding large NoFault reads of memory they never touch hold
// no more than the read budget: eight 16 MiB reads, two accepted, the
// others busy, and the heap keeps no buffer of their ranges.
func TestLargePendingReadsStayWithinTheReadBudget(t *testing.T) {
	b, m, log := newMachineWith(t, func(*machine.Config) {})
	const procs = 8
	const bigVA = 0x7e00_0000_0000 // mapped, never touched: no tables yet
	pgd := func(i int) uint64 { return 0x60_0000 + uint64(i)*0x1_0000 }
	for i := 0; i < procs; i++ {
		base := pgd(i)
		b.put64(base+8*(reqVA>>39&511), (base+0x1000)|7)
		b.put64(base+0x1000+8*(reqVA>>30&511), (base+0x2000)|7)
		b.put64(base+0x2000+8*(reqVA>>21&511), (base+0x3000)|7)
		b.put64(base+0x3000+8*(reqVA>>12&511), (base+0x4000)|7)
		req := hcall.SwapRequest{VA: bigVA, Len: swapmem.MaxLen, Options: uint64(swapmem.NoFault)}.Encode()
		require.NoError(t, b.WritePhys(base+0x4000, req[:]))
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	var rets []uint64
	for i := 0; i < procs; i++ {
		st := step{name: "a process asks", exit: func(b *board, r *vmx.GuestRegs) {
			b.in(3, pgd(i))
			r.RAX, r.RDI, r.RSI = hcall.SwapRead, reqVA, hcall.SwapRequestSize
			b.exitWith(vmx.ExitVMCALL)
		}}
		if i > 0 {
			st.check = func(b *board, r *vmx.GuestRegs) { rets = append(rets, r.RAX) }
		}
		b.script = append(b.script, st)
	}
	b.script = append(b.script, step{name: "exit", check: func(b *board, r *vmx.GuestRegs) {
		rets = append(rets, r.RAX)
		runtime.GC()
		runtime.ReadMemStats(&after)
	}, exit: func(b *board, r *vmx.GuestRegs) {
		b.in(0, pgd(0))
		r.RAX, r.RDI = hcall.Exit, 0
		b.exitWith(vmx.ExitVMCALL)
	}})
	require.NoError(t, m.Run(), "log:\n%s", log)
	assert.Equal(t, []uint64{0, 0, hcall.Busy, hcall.Busy, hcall.Busy, hcall.Busy, hcall.Busy, hcall.Busy}, rets)
	assert.Equal(t, 2, m.Monitor.Pending())
	assert.EqualValues(t, monitor.ReadBudget, m.Monitor.Held())
	assert.Zero(t, m.Engine.Stats().Held, "no page came in: no byte held")
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	assert.Less(t, grown, int64(swapmem.MaxLen), "the heap grew by %d bytes", grown)
}

// A read longer than monitor.ExitBytes goes on over the entries after its
// hypercall, on whichever vCPU enters, and ends with its bytes.
func TestLongReadEndsOverTheFollowingEntries(t *testing.T) {
	b, m, log := newMachineWith(t, func(*machine.Config) {})
	b.mapProcess(nil)
	const big = 0x7f00_0020_0000 // a 2 MiB page in the process's directory
	const bigPA = 0x80_0000
	b.put64(pd+8*(big>>21&511), bigPA|0x87)
	data := make([]byte, 2<<20)
	for i := range data {
		data[i] = byte(i >> 12)
	}
	require.NoError(t, b.WritePhys(bigPA, data))
	req := hcall.SwapRequest{VA: big, Len: 2 << 20, Options: uint64(swapmem.UserFault), SHA256: sha256.Sum256(data)}.Encode()
	require.NoError(t, b.WritePhys(reqPA, req[:]))
	status := func(b *board, r *vmx.GuestRegs) {
		b.run(3)
		r.RAX = hcall.SwapStatus
		b.exitWith(vmx.ExitVMCALL)
	}
	require.Equal(t, 2, (2<<20)/monitor.ExitBytes, "two pieces")
	b.script = []step{
		{name: "swap read", exit: func(b *board, r *vmx.GuestRegs) {
			b.run(3)
			r.RAX, r.RDI, r.RSI = hcall.SwapRead, reqVA, hcall.SwapRequestSize
			b.exitWith(vmx.ExitVMCALL)
		}},
		{name: "status", check: func(b *board, r *vmx.GuestRegs) {
			assert.Zero(t, r.RAX)
			assert.EqualValues(t, 2, m.Engine.Stats().Completed, "the second MiB read at this entry")
		}, exit: status},
		{name: "exit", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, uint64(hcall.StatusOK), r.RAX, "log:\n%s", log)
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.run(0)
			r.RAX, r.RDI = hcall.Exit, 0
			b.exitWith(vmx.ExitVMCALL)
		}},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
	assert.Contains(t, log.String(), "swapmem read ok: sha256 ")
	assert.Contains(t, log.String(), "2097152 bytes")
	assert.Equal(t, 2, m.Watcher.Watches(), "the status's watch protects the PGD and one table below")
}
