package smp

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/vmx"
)

// loopAP plays the AP's exit loop as smp_amd64.s has it, on a goroutine:
// every command first carries out the queued operations (recording the
// first that fails, and then not entering the guest), CMD_RUN runs exit
// on the VMCS and takes the snapshot of its fields, and the other
// commands read and write the VMCS and MSRs. A VMCS field that is not in
// the map does not exist: VMREAD and VMWRITE of it fail.
type loopAP struct {
	mu    sync.Mutex
	vmcs  map[uint32]uint64
	msrs  map[uint32]uint64
	mmio  []uint64 // physical address<<32 | value of each MMIO write
	cmds  []uint32
	exits int
	exit  func(vmcs map[uint32]uint64)
}

func startLoopAP(t *testing.T, p *[4096]byte, ap *loopAP) *handoff {
	m := mailbox{p: p, timeout: time.Minute}
	done := make(chan struct{})
	stopped := make(chan struct{})
	t.Cleanup(func() { close(done); <-stopped })
	go func() {
		defer close(stopped)
		for {
			select {
			case <-done:
				return
			default:
			}
			cmd := atomic.LoadUint32(m.u32(apCmd))
			if cmd == 0 {
				continue
			}
			ap.mu.Lock()
			ap.command(m, cmd)
			ap.mu.Unlock()
			atomic.StoreUint32(m.u32(apCmd), 0)
		}
	}()
	return newHandoff(m)
}

func (ap *loopAP) command(m mailbox, cmd uint32) {
	ap.cmds = append(ap.cmds, cmd)
	n := int(atomic.LoadUint32(m.u32(apOpsN)))
	for i := 0; i < n; i++ {
		off := apOps + i*opSize
		kind, a, b := atomic.LoadUint64(m.u64(off)), atomic.LoadUint64(m.u64(off+8)), atomic.LoadUint64(m.u64(off+16))
		ok := true
		switch kind {
		case opVMWRITE:
			if _, ok = ap.vmcs[uint32(a)]; ok {
				ap.vmcs[uint32(a)] = b
			}
		case opWRMSR:
			ap.msrs[uint32(a)] = b
		case opMMIOWr:
			ap.mmio = append(ap.mmio, a<<32|b&0xffffffff)
		default:
			ok = false
		}
		if !ok && atomic.LoadUint32(m.u32(apOpFail)) == 0 {
			atomic.StoreUint32(m.u32(apOpFail), uint32(i+1))
			atomic.StoreUint32(m.u32(apOpFlags), 1<<6)
		}
	}
	atomic.StoreUint32(m.u32(apOpsN), 0)
	a0 := atomic.LoadUint64(m.u64(apArg0))
	var flags uint32
	switch cmd {
	case cmdVMREAD:
		v, ok := ap.vmcs[uint32(a0)]
		if !ok {
			flags = 1 << 6
		}
		atomic.StoreUint64(m.u64(apRet0), v)
	case cmdRDMSR:
		atomic.StoreUint64(m.u64(apRet0), ap.msrs[uint32(a0)])
	case cmdRun:
		if atomic.LoadUint32(m.u32(apOpFail)) != 0 {
			flags = atomic.LoadUint32(m.u32(apOpFlags))
			break
		}
		ap.exits++
		ap.exit(ap.vmcs)
		var ok uint64
		for i := 0; i < int(atomic.LoadUint32(m.u32(apSnapN))); i++ {
			f := atomic.LoadUint32(m.u32(apSnapF + 4*i))
			if v, in := ap.vmcs[f]; in {
				atomic.StoreUint64(m.u64(apSnapV+8*i), v)
				ok |= 1 << i
			}
		}
		atomic.StoreUint64(m.u64(apSnapOK), ok)
	case cmdFlush:
	default:
		flags = ^uint32(0)
	}
	atomic.StoreUint32(m.u32(apFlags), flags)
}

// run posts CMD_RUN and waits for the exit, as APVCPU.Enter does.
func run(t *testing.T, h *handoff) error {
	require.NoError(t, h.post(cmdRun, 0, 1))
	for h.mb.busy() {
	}
	h.takeFailed()
	if err := h.failed(); err != nil {
		return err
	}
	h.exited()
	return nil
}

func fields(fs ...vmx.Field) []uint32 {
	var out []uint32
	for _, f := range fs {
		out = append(out, uint32(f))
	}
	return out
}

// TestHandoffAnswersReadsFromTheSnapshot: after an exit the snapshot's
// fields are read without a command, a field outside it costs one, and
// before the first exit (or once the guest runs again) every read goes
// to the AP.
func TestHandoffAnswersReadsFromTheSnapshot(t *testing.T) {
	rip := uint64(0x1000)
	ap := &loopAP{vmcs: map[uint32]uint64{
		uint32(vmx.ExitReasonField): 0, uint32(vmx.GuestRIP): rip, uint32(vmx.GuestCR3): 0x5000,
	}, msrs: map[uint32]uint64{}, exit: func(v map[uint32]uint64) {
		rip += 2
		v[uint32(vmx.ExitReasonField)] = uint64(vmx.ExitCPUID)
		v[uint32(vmx.GuestRIP)] = rip
	}}
	h := startLoopAP(t, new([4096]byte), ap)
	// GuestRSP is in the list but not in this VMCS: VMREAD fails at the
	// exit, and the read goes to the AP, which fails it again.
	require.NoError(t, h.setSnapshot(fields(vmx.ExitReasonField, vmx.GuestRIP, vmx.GuestRSP)))
	_, ok := h.read(uint32(vmx.GuestRIP))
	assert.False(t, ok, "no exit yet")

	require.NoError(t, run(t, h))
	sent := h.cmds
	v, ok := h.read(uint32(vmx.ExitReasonField))
	assert.True(t, ok)
	assert.EqualValues(t, vmx.ExitCPUID, v)
	v, ok = h.read(uint32(vmx.GuestRIP))
	assert.True(t, ok)
	assert.EqualValues(t, 0x1002, v)
	_, ok = h.read(uint32(vmx.GuestRSP))
	assert.False(t, ok, "its VMREAD failed at the exit")
	_, ok = h.read(uint32(vmx.GuestCR3))
	assert.False(t, ok, "not in the snapshot")
	cr3, err := h.vmx("VMREAD", cmdVMREAD, uint64(vmx.GuestCR3), 0)
	require.NoError(t, err)
	assert.EqualValues(t, 0x5000, cr3)
	assert.Equal(t, sent+1, h.cmds, "one command: the read outside the snapshot")

	require.NoError(t, h.post(cmdRun, 0, 1))
	_, ok = h.read(uint32(vmx.GuestRIP))
	assert.False(t, ok, "the guest runs: the snapshot is not its state")
	for h.mb.busy() {
	}
	h.exited()
	v, _ = h.read(uint32(vmx.GuestRIP))
	assert.EqualValues(t, 0x1004, v, "the new exit's")
	assert.Equal(t, 2, ap.exits)
}

// TestHandoffQueuesOperations: writes cost no command; the AP carries
// them out, in order, before the next command, which sees their effect;
// a written snapshot field reads back its new value at once; a full
// queue is sent by itself.
func TestHandoffQueuesOperations(t *testing.T) {
	ap := &loopAP{vmcs: map[uint32]uint64{
		uint32(vmx.ExitReasonField): uint64(vmx.ExitWRMSR), uint32(vmx.GuestRIP): 0x1000, uint32(vmx.TSCOffset): 0,
		uint32(vmx.GuestInterruptibility): 0,
	}, msrs: map[uint32]uint64{}, exit: func(map[uint32]uint64) {}}
	h := startLoopAP(t, new([4096]byte), ap)
	require.NoError(t, h.setSnapshot(fields(vmx.ExitReasonField, vmx.GuestRIP, vmx.GuestInterruptibility)))
	require.NoError(t, run(t, h))
	sent := h.cmds

	require.NoError(t, h.queue(opVMWRITE, uint64(vmx.ExitReasonField), 1))
	v, _ := h.read(uint32(vmx.ExitReasonField))
	assert.EqualValues(t, vmx.ExitWRMSR, v, "a read-only field keeps its value")
	require.NoError(t, h.queue(opVMWRITE, uint64(vmx.GuestRIP), 0x1002))
	require.NoError(t, h.queue(opVMWRITE, uint64(vmx.TSCOffset), 7))
	require.NoError(t, h.queue(opWRMSR, vmx.MSRTSCAdjust, 9))
	require.NoError(t, h.queue(opMMIOWr, 0xfee000b0, 0))
	assert.Equal(t, sent, h.cmds, "queued, not sent")
	v, ok := h.read(uint32(vmx.GuestRIP))
	assert.True(t, ok)
	assert.EqualValues(t, 0x1002, v, "the snapshot takes the write")
	require.NoError(t, h.queue(opVMWRITE, uint64(vmx.GuestInterruptibility), 1<<40|3))
	v, _ = h.read(uint32(vmx.GuestInterruptibility))
	assert.EqualValues(t, 3, v, "a 32-bit field takes the low bits")
	ap.mu.Lock()
	assert.EqualValues(t, 0x1000, ap.vmcs[uint32(vmx.GuestRIP)], "not yet on the AP")
	ap.mu.Unlock()

	r, _, err := h.call(cmdRDMSR, vmx.MSRTSCAdjust, 0)
	require.NoError(t, err)
	assert.EqualValues(t, 9, r[0], "the queued WRMSR came first")
	off, err := h.vmx("VMREAD", cmdVMREAD, uint64(vmx.TSCOffset), 0)
	require.NoError(t, err)
	assert.EqualValues(t, 7, off)
	ap.mu.Lock()
	assert.EqualValues(t, 0x1002, ap.vmcs[uint32(vmx.GuestRIP)])
	assert.Equal(t, []uint64{0xfee000b0 << 32}, ap.mmio)
	ap.mu.Unlock()
	assert.Equal(t, sent+2, h.cmds)

	for i := 0; i < maxOps+1; i++ {
		require.NoError(t, h.queue(opVMWRITE, uint64(vmx.TSCOffset), uint64(i)))
	}
	assert.Equal(t, sent+3, h.cmds, "the full queue went by itself")
	require.NoError(t, run(t, h))
	ap.mu.Lock()
	assert.EqualValues(t, maxOps, ap.vmcs[uint32(vmx.TSCOffset)], "every write, in order")
	assert.Equal(t, []uint32{cmdRun, cmdRDMSR, cmdVMREAD, cmdFlush, cmdRun}, ap.cmds)
	ap.mu.Unlock()
}

// TestHandoffFailedOperationStopsTheEntry: a queued VMWRITE the AP finds
// failing is reported, naming the field and value, and the AP does not
// enter the guest with a VMCS that is not what was asked for.
func TestHandoffFailedOperationStopsTheEntry(t *testing.T) {
	ap := &loopAP{vmcs: map[uint32]uint64{uint32(vmx.GuestRIP): 0}, msrs: map[uint32]uint64{}, exit: func(map[uint32]uint64) {}}
	h := startLoopAP(t, new([4096]byte), ap)
	require.NoError(t, h.queue(opVMWRITE, 0xdead, 1))
	require.NoError(t, h.queue(opVMWRITE, uint64(vmx.GuestRIP), 5))
	err := run(t, h)
	assert.ErrorContains(t, err, "VMWRITE 0xdead = 0x1 on the application processor failed")
	ap.mu.Lock()
	assert.Zero(t, ap.exits, "not entered")
	assert.EqualValues(t, 5, ap.vmcs[uint32(vmx.GuestRIP)], "the operations after it were carried out")
	ap.mu.Unlock()
	assert.NoError(t, h.failed(), "reported once")
	assert.ErrorIs(t, h.setSnapshot(make([]uint32, maxSnap+1)), ErrSnapshotFields)
}

// TestCPUIDTablePage: the answers land in the page as the exit loop reads
// them (cpuidEntry, whose offsets TestExitLoopNumbers ties to its
// #defines); a table that answers one leaf and subleaf twice, or does not
// fit the page, is refused.
func TestCPUIDTablePage(t *testing.T) {
	p := new([4096]byte)
	n, err := cpuidTable(p, []CPUIDAnswer{
		{Leaf: 0, Regs: [4]uint32{0x1f, 1, 2, 3}},
		{Leaf: 1, Regs: [4]uint32{4, 5, 6, 7}, CR4Mask: vmx.CR4OSXSAV, ECXIfCR4: vmx.CPUIDOSXSAVEBit},
		{Leaf: 7, Subleaf: 1, Regs: [4]uint32{8, 9, 10, 11}},
	})
	require.NoError(t, err)
	assert.Equal(t, 3, n)
	le := func(off int) uint32 {
		return uint32(p[off]) | uint32(p[off+1])<<8 | uint32(p[off+2])<<16 | uint32(p[off+3])<<24
	}
	assert.Equal(t, []uint32{1, 0, 4, 5, 6, 7, vmx.CR4OSXSAV, vmx.CPUIDOSXSAVEBit}, []uint32{le(32), le(36), le(40), le(44), le(48), le(52), le(56), le(60)})
	assert.Equal(t, []uint32{7, 1, 8, 11}, []uint32{le(64), le(68), le(72), le(84)})

	_, err = cpuidTable(p, []CPUIDAnswer{{Leaf: 7, Subleaf: 1}, {Leaf: 7, Subleaf: 1}})
	assert.ErrorIs(t, err, ErrCPUIDTable)
	_, err = cpuidTable(p, make([]CPUIDAnswer, maxCPUID+1))
	assert.ErrorIs(t, err, ErrCPUIDTable)
	assert.EqualValues(t, 128, maxCPUID)
}
