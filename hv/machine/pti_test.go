package machine_test

import (
	"bytes"
	"crypto/sha256"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// The scripted process under page-table isolation: its kernel PGD (8 KiB
// aligned) and user PGD share the user tables of mapProcess; the kernel
// PGD maps the kernel half, the user PGD only the entry trampoline.
const (
	kernelPGD = 0x50_0000
	userPGD   = kernelPGD | guestmem.PTIUserBit
	stackPA   = 0x60_0000 // a page of the guest's kernel stack
)

func (b *board) isolate() {
	e := b.u64(pml4 + 8*(dataVA>>39&511))
	b.put64(kernelPGD+8*(dataVA>>39&511), e|1<<63) // NX in the kernel copy
	b.put64(userPGD+8*(dataVA>>39&511), e)
	b.put64(kernelPGD+8*273, 0x51_0000|3) // direct map
	b.put64(kernelPGD+8*511, 0x52_0000|3) // kernel text
	b.put64(userPGD+8*508, 0x53_0000|3)   // cpu_entry_area
}

// in sets the privilege level and CR3 the guest runs with.
func (b *board) in(cpl int, cr3 uint64) {
	b.run(cpl)
	b.vmcs.Fields[vmx.GuestCR3] = cr3
	b.vmcs.Fields[vmx.GuestEFER] |= vmx.EFERNXE | 1<<10 | 1<<8 // NXE, LMA, LME: the kernel copy's NX is valid
}

// TestIsolatedGuestEndToEnd: a process of a guest with page-table
// isolation asks from user mode (user CR3, user PCID); tamahv learns the
// pair, keys the read by the kernel PGD, injects the #PF in user mode, and
// follows it: its delivery is interrupted (an EPT exit on the stack), put
// back and confirmed at the next exit. Requests with CR3 0 read through
// the kernel address space learnt.
func TestIsolatedGuestEndToEnd(t *testing.T) {
	b, m, log := newMachine(t)
	want := bytes.Repeat([]byte("isolated"), 512)
	b.mapProcess(want)
	b.isolate()
	req := hcall.SwapRequest{VA: dataVA, Len: 4096, Options: uint64(swapmem.UserFault), SHA256: sha256.Sum256(want)}.Encode()
	require.NoError(t, b.WritePhys(reqPA, req[:]))
	_, err := m.Engine.ReadData(swapmem.Request{CR3: 0, VA: reqVA, Len: 8, Options: swapmem.NoFault})
	assert.Error(t, err, "no kernel address space known yet")

	pf := uint64(1<<31 | 3<<8 | 1<<11 | vmx.VectorPF)
	var system []byte
	b.script = []step{
		{name: "kernel mode", exit: func(b *board, r *vmx.GuestRegs) {
			b.in(0, kernelPGD|1)
			r.RAX = 0x16
			b.exitWith(vmx.ExitCPUID)
		}},
		{name: "swap read from user mode", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, guestmem.PTIUnknown, m.Spaces.PTI())
			assert.Equal(t, uint64(kernelPGD), m.Spaces.System())
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.in(3, userPGD|0x801)
			r.RAX, r.RDI, r.RSI = hcall.SwapRead, reqVA, hcall.SwapRequestSize
			b.exitWith(vmx.ExitVMCALL)
		}},
		{name: "delivery interrupted", check: func(b *board, r *vmx.GuestRegs) {
			assert.Zero(t, r.RAX, "swap read accepted; log:\n%s", log)
			assert.Equal(t, guestmem.PTIOn, m.Spaces.PTI())
			assert.Equal(t, pf, b.vmcs.Fields[vmx.EntryInterruptInfo], "#PF injected in user mode")
			assert.Equal(t, uint64(dataVA), r.CR2)
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.vmcs.Fields[vmx.IDTVectoringInfo] = pf
			b.vmcs.Fields[vmx.IDTVectoringError] = 4
			b.vmcs.Fields[vmx.GuestPhysAddr] = stackPA
			b.vmcs.Fields[vmx.ExitQualification] = 1<<1 | 1<<3 | 1<<7 | 1<<8
			b.exitWith(vmx.ExitEPTViolation)
		}},
		{name: "the guest's pager writes the PTE", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, pf, b.vmcs.Fields[vmx.EntryInterruptInfo], "put back")
			assert.Equal(t, uint64(dataVA), r.CR2)
			assert.Equal(t, uint64(1), m.Delivery.Requeued)
			assert.Zero(t, m.Engine.Stats().Delivered)
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.in(0, kernelPGD|1)
			b.pagerWrite()
		}},
		{name: "the write is done; status from user mode", check: func(b *board, r *vmx.GuestRegs) {
			assert.EqualValues(t, 1, m.Engine.Stats().Delivered, "delivery confirmed")
			b.pagerDone()
			_, err := m.Engine.ReadData(swapmem.Request{CR3: 0, VA: reqVA, Len: 8, Options: swapmem.NoFault,
				Done: func(rd swapmem.Read) { system = append([]byte{}, rd.Data...) }})
			assert.NoError(t, err)
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.in(3, userPGD|0x801)
			r.RAX = hcall.SwapStatus
			b.exitWith(vmx.ExitVMCALL)
		}},
		{name: "exit", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, uint64(hcall.StatusOK), r.RAX, "log:\n%s", log)
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.in(0, kernelPGD|1)
			r.RAX, r.RDI = hcall.Exit, 0
			b.exitWith(vmx.ExitVMCALL)
		}},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
	assert.Empty(t, b.script)
	assert.Equal(t, req[:8], system, "CR3 0 read through the kernel PGD")
	assert.Contains(t, log.String(), "tamahv: swapmem read ok")
	assert.Contains(t, log.String(), "in CR3 0x500000 ")
	assert.Contains(t, log.String(), "tamahv: page-table isolation on (1 pair checks); #PF deliveries 1 confirmed, 1 interrupted and re-queued, 0 lost and cancelled")
	assert.EqualValues(t, 1, m.Engine.Stats().Injected)
}
