package monitor_test

import (
	"bytes"
	"crypto/sha256"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/monitor"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
	"github.com/tamahv/tamahv/vmx"
)

const (
	userBuf    = 0x0000_7f00_0000_0000 // 4 pages of the process's data
	userReq    = 0x0000_7f00_0010_0000 // a page for requests
	kernelBuf  = 0xffff_8880_0000_0000 // kernel data (mapped in every process)
	secretText = "s3cr3t!!"
	secretPA   = 0x1000_7000
)

// guest is a process and a kernel in simulated memory, a vCPU running in
// the process, and a monitor.
type guest struct {
	t    *testing.T
	m    *swapmemtest.Machine
	proc *swapmemtest.Space
	vmcs *hvtest.VMCS
	v    *hv.VCPU
	mon  *monitor.Monitor
	clk  time.Time
	log  bytes.Buffer
}

func newGuest(t *testing.T, grants monitor.Ring3) *guest {
	t.Helper()
	m := swapmemtest.NewMachine()
	m.TopEntries = true
	g := &guest{t: t, m: m, proc: m.NewSpace(), vmcs: hvtest.NewVMCS(), clk: time.Unix(1e9, 0)}
	require.NoError(t, g.proc.MapRange(userBuf, 4*4096, swapmemtest.UserRW))
	require.NoError(t, g.proc.Write(userBuf, bytes.Repeat([]byte("user"), 4096)))
	require.NoError(t, g.proc.MapRange(userReq, 4096, swapmemtest.UserRW))
	require.NoError(t, m.System().MapRange(kernelBuf, 4096, swapmemtest.KernelRW))
	require.NoError(t, m.System().Write(kernelBuf, []byte(secretText)))
	g.vmcs.Fields[vmx.EntryControls] = vmx.EntryIA32eMode
	g.vmcs.Fields[vmx.GuestCR0] = 1<<31 | 1
	g.vmcs.Fields[vmx.GuestCR4] = 1 << 5
	g.vmcs.Fields[vmx.GuestCR3] = g.proc.CR3
	g.v = hv.NewVCPU(g.vmcs, nil)
	g.cpl(3)
	g.mon = &monitor.Monitor{Ring3: grants, Mem: m, Engine: swapmem.New(m, swapmem.Config{}), SecretPA: secretPA,
		Log: &g.log, Now: func() time.Time { return g.clk }}
	return g
}

// cpl sets the privilege level the next hypercall comes from.
func (g *guest) cpl(n int) { g.vmcs.Fields[vmx.GuestSSAccess] = uint64(0x93 | n<<5) }

func (g *guest) call(nr, a1, a2 uint64) (uint64, bool) { return g.mon.Call(g.v, nr, a1, a2, 0) }

// swapRead writes a request at userReq+off and makes the hypercall.
func (g *guest) swapRead(off, va, n, opts uint64, want []byte) uint64 {
	g.t.Helper()
	b := hcall.SwapRequest{VA: va, Len: n, Options: opts, SHA256: sha256.Sum256(want)}.Encode()
	require.NoError(g.t, g.proc.Write(userReq+off, b[:]))
	ret, stop := g.call(hcall.SwapRead, userReq+off, hcall.SwapRequestSize)
	assert.False(g.t, stop)
	return ret
}

func (g *guest) status() uint64 {
	ret, _ := g.call(hcall.SwapStatus, 0, 0)
	return ret
}

func TestIdentifyAtAnyCPL(t *testing.T) {
	g := newGuest(t, 0)
	for _, cpl := range []int{0, 3} {
		g.cpl(cpl)
		ret, stop := g.call(hcall.Identify, 0, 0)
		assert.Equal(t, uint64(hcall.Magic), ret)
		assert.False(t, stop)
	}
	ret, _ := g.call(0xbad0, 1, 2)
	assert.Equal(t, hcall.Unknown, ret)
}

// Finding 5: any process could end the guest and halt the machine.
func TestExitNeedsCPL0(t *testing.T) {
	g := newGuest(t, 0)
	ret, stop := g.call(hcall.Exit, 0, 0)
	assert.Equal(t, hcall.Denied, ret)
	assert.False(t, stop)

	g.cpl(0)
	ret, stop = g.call(hcall.Exit, 1000, 0)
	assert.Equal(t, hcall.Invalid, ret)
	assert.False(t, stop)
	ret, stop = g.call(hcall.Exit, 7, 0)
	assert.Zero(t, ret)
	assert.True(t, stop)
	assert.Equal(t, 7, g.mon.Status)

	g = newGuest(t, monitor.Ring3Exit)
	_, stop = g.call(hcall.Exit, 3, 0)
	assert.True(t, stop, "granted on tamahv's command line")
}

// Finding 26: the secret page's address is tamahv's; processes do not get
// it unless tamahv's command line says so.
func TestSecretNeedsCPL0OrGrant(t *testing.T) {
	g := newGuest(t, 0)
	ret, _ := g.call(hcall.Secret, 0, 0)
	assert.Equal(t, hcall.Denied, ret)
	g.cpl(0)
	ret, _ = g.call(hcall.Secret, 0, 0)
	assert.Equal(t, uint64(secretPA), ret)

	g = newGuest(t, monitor.Ring3Secret)
	ret, _ = g.call(hcall.Secret, 0, 0)
	assert.Equal(t, uint64(secretPA), ret)
}

func TestSwapReadOfOwnMemory(t *testing.T) {
	g := newGuest(t, 0)
	assert.Equal(t, hcall.Invalid, g.status(), "no read yet")
	want := bytes.Repeat([]byte("user"), 1024)
	assert.Zero(t, g.swapRead(0, userBuf, 4096, uint64(swapmem.UserFault), want))
	assert.Equal(t, uint64(hcall.StatusOK), g.status())
	assert.Zero(t, g.swapRead(0, userBuf, 4096, uint64(swapmem.UserFault), []byte("wrong")))
	assert.Equal(t, uint64(hcall.StatusFailed), g.status())
	assert.Contains(t, g.log.String(), "swapmem read ok")
}

// Finding 6: a process recovered kernel memory byte by byte through the
// digest comparison. Kernel addresses are refused from CPL 3, whatever
// the digest.
func TestRing3CannotReadKernelMemory(t *testing.T) {
	g := newGuest(t, 0)
	for i := 0; i < 256; i++ {
		assert.Equal(t, hcall.Denied, g.swapRead(0, kernelBuf, 1, uint64(swapmem.UserFault), []byte{byte(i)}))
	}
	// A range that starts in user space and runs into the kernel half.
	assert.Equal(t, hcall.Denied, g.swapRead(0, 1<<47-4096, 8192, uint64(swapmem.UserFault), nil))
	assert.Equal(t, hcall.Invalid, g.status(), "no read was started")
	assert.Zero(t, g.mon.Engine.Stats().Completed)

	g.cpl(0)
	assert.Zero(t, g.swapRead(0, kernelBuf, 8, uint64(swapmem.NoFault), []byte(secretText)))
	assert.Equal(t, uint64(hcall.StatusOK), g.status(), "the kernel may read its own memory")
	// Kernel-mode faults at an arbitrary point of the guest kernel: no
	// caller gets them.
	assert.Equal(t, hcall.Denied, g.swapRead(0, kernelBuf, 8, 0, []byte(secretText)))
	assert.Equal(t, hcall.Denied, g.swapRead(0, kernelBuf, 8, uint64(swapmem.KernelFault), []byte(secretText)))
}

// The request itself must be in the caller's memory: a process may not
// make tamahv read a kernel page as a request.
func TestRing3RequestInKernelMemory(t *testing.T) {
	g := newGuest(t, 0)
	b := hcall.SwapRequest{VA: userBuf, Len: 4, Options: uint64(swapmem.UserFault)}.Encode()
	require.NoError(t, g.m.System().Write(kernelBuf+64, b[:]))
	ret, _ := g.call(hcall.SwapRead, kernelBuf+64, hcall.SwapRequestSize)
	assert.Equal(t, hcall.Denied, ret)
	g.cpl(0)
	ret, _ = g.call(hcall.SwapRead, kernelBuf+64, hcall.SwapRequestSize)
	assert.Zero(t, ret)
}

// Finding 7: processes chose kernel-mode fault options.
func TestRing3FaultOptions(t *testing.T) {
	g := newGuest(t, 0)
	want := []byte("user")
	for _, o := range []swapmem.Options{0, swapmem.KernelFault, swapmem.BPFault, swapmem.NoDups, swapmem.WriteFault} {
		assert.Equal(t, hcall.Denied, g.swapRead(0, userBuf, 4, uint64(o), want), "options %v", o)
	}
	for _, o := range []swapmem.Options{swapmem.UserFault, swapmem.NoFault, swapmem.UserFault | swapmem.NoDups, swapmem.UserFault | swapmem.WriteFault} {
		assert.Zero(t, g.swapRead(0, userBuf, 4, uint64(o), want), "options %v", o)
	}
	assert.Zero(t, g.swapRead(0, userBuf, 4, uint64(swapmem.UserFault)|hcall.SwapVeto, want))

	g = newGuest(t, monitor.Ring3BPFault)
	assert.Zero(t, g.swapRead(0, userBuf, 4, uint64(swapmem.BPFault), want), "granted on tamahv's command line")
	assert.Equal(t, hcall.Denied, g.swapRead(0, userBuf, 4, uint64(swapmem.KernelFault), want))
}

func TestBadRequests(t *testing.T) {
	g := newGuest(t, 0)
	ret, _ := g.call(hcall.SwapRead, userReq, 55)
	assert.Equal(t, hcall.Invalid, ret, "size")
	ret, _ = g.call(hcall.SwapRead, userReq+4096-55, hcall.SwapRequestSize)
	assert.Equal(t, hcall.Invalid, ret, "request across a page end")
	ret, _ = g.call(hcall.SwapRead, 0x1000, hcall.SwapRequestSize)
	assert.Equal(t, hcall.Invalid, ret, "request not mapped")
	assert.Equal(t, hcall.Invalid, g.swapRead(0, userBuf, 0, uint64(swapmem.UserFault), nil), "empty")
	assert.Equal(t, hcall.Invalid, g.swapRead(0, userBuf, swapmem.MaxLen+1, uint64(swapmem.UserFault), nil), "too long")
	assert.Equal(t, hcall.Invalid, g.swapRead(0, ^uint64(0)-1, 4, uint64(swapmem.UserFault), nil), "wraps")
	assert.Equal(t, hcall.Invalid, g.swapRead(0, userBuf, 4, uint64(swapmem.UserFault)|1<<40, nil), "option bits")
	assert.Equal(t, hcall.Invalid, g.swapRead(0, userBuf, 4, uint64(swapmem.UserFault|swapmem.NoFault), nil), "engine refuses")
	assert.Equal(t, uint64(hcall.StatusFailed), g.status())

	// Paging off, or not IA-32e: the request cannot be found.
	g.vmcs.Fields[vmx.EntryControls] = 0
	assert.Equal(t, hcall.Invalid, g.swapRead(0, userBuf, 4, uint64(swapmem.UserFault), nil))
}

// Finding 8: one NoFault read that is never served blocked every other
// process's reads.
func TestPendingReadBlocksOnlyItsAddressSpace(t *testing.T) {
	g := newGuest(t, 0)
	require.NoError(t, g.proc.SwapOut(userBuf))
	assert.Zero(t, g.swapRead(0, userBuf, 4, uint64(swapmem.NoFault), []byte("user")))
	assert.Equal(t, uint64(hcall.StatusPending), g.status())
	// A second read of the same address space replaces the first (a
	// process that died with a read pending must not hold up the next
	// process given its page tables): the first one's end is ignored.
	require.NoError(t, g.proc.SwapOut(userBuf+4096))
	assert.Zero(t, g.swapRead(64, userBuf+4096, 4, uint64(swapmem.NoFault), []byte("user")), "same address space")
	assert.Contains(t, g.log.String(), "replaced by a new one")
	require.NoError(t, g.proc.Touch(userBuf, false))
	assert.Equal(t, uint64(hcall.StatusPending), g.status(), "the replaced read's end does not count")
	require.NoError(t, g.proc.Touch(userBuf+4096, false))
	assert.Equal(t, uint64(hcall.StatusOK), g.status())

	// A read left pending blocks nobody else.
	require.NoError(t, g.proc.SwapOut(userBuf))
	assert.Zero(t, g.swapRead(0, userBuf, 4, uint64(swapmem.NoFault), []byte("user")))
	assert.Equal(t, 1, g.mon.Pending())

	other := g.m.NewSpace()
	require.NoError(t, other.MapRange(userReq, 4096, swapmemtest.UserRW))
	require.NoError(t, other.MapRange(userBuf, 4096, swapmemtest.UserRW))
	require.NoError(t, other.Write(userBuf, []byte("mine")))
	g.vmcs.Fields[vmx.GuestCR3] = other.CR3
	assert.Equal(t, hcall.Invalid, g.status(), "another process does not see the first one's read")
	b := hcall.SwapRequest{VA: userBuf, Len: 4, Options: uint64(swapmem.UserFault), SHA256: sha256.Sum256([]byte("mine"))}.Encode()
	require.NoError(t, other.Write(userReq, b[:]))
	ret, _ := g.call(hcall.SwapRead, userReq, hcall.SwapRequestSize)
	assert.Zero(t, ret)
	assert.Equal(t, uint64(hcall.StatusOK), g.status())

	// The first read ends when its page comes in.
	g.vmcs.Fields[vmx.GuestCR3] = g.proc.CR3
	require.NoError(t, g.proc.Touch(userBuf, false))
	assert.Equal(t, uint64(hcall.StatusOK), g.status())
}

// The monitor keeps at most MaxReads address spaces' reads; beyond that a
// new address space is busy while all are pending, and takes the place of
// one that ended, once that read started Tenure ago.
func TestMaxReads(t *testing.T) {
	g := newGuest(t, 0)
	var spaces []*swapmemtest.Space
	for i := 0; i <= monitor.MaxReads; i++ {
		s := g.m.NewSpace()
		require.NoError(t, s.MapRange(userReq, 4096, swapmemtest.UserRW))
		require.NoError(t, s.MapRange(userBuf, 4096, swapmemtest.UserRW))
		require.NoError(t, s.SwapOut(userBuf))
		b := hcall.SwapRequest{VA: userBuf, Len: 4, Options: uint64(swapmem.NoFault)}.Encode()
		require.NoError(t, s.Write(userReq, b[:]))
		spaces = append(spaces, s)
	}
	for i, s := range spaces {
		g.vmcs.Fields[vmx.GuestCR3] = s.CR3
		ret, _ := g.call(hcall.SwapRead, userReq, hcall.SwapRequestSize)
		if i < monitor.MaxReads {
			assert.Zero(t, ret, "space %d", i)
		} else {
			assert.Equal(t, hcall.Busy, ret, "space %d", i)
		}
	}
	require.NoError(t, spaces[0].Touch(userBuf, false)) // its read ends (digest differs: failed)
	g.vmcs.Fields[vmx.GuestCR3] = spaces[monitor.MaxReads].CR3
	ret, _ := g.call(hcall.SwapRead, userReq, hcall.SwapRequestSize)
	assert.Equal(t, hcall.Busy, ret, "a read that just ended keeps its record: its process may ask for its status")
	g.clk = g.clk.Add(monitor.Tenure)
	ret, _ = g.call(hcall.SwapRead, userReq, hcall.SwapRequestSize)
	assert.Zero(t, ret)
	assert.Equal(t, monitor.MaxReads, g.mon.Pending())
}

// Finding 26: every request printed a line to tamahv's console; a loop of
// requests must not flood it.
func TestLogIsRateLimited(t *testing.T) {
	g := newGuest(t, 0)
	for i := 0; i < 1000; i++ {
		g.swapRead(0, userBuf, 4, uint64(swapmem.UserFault), nil)
	}
	assert.LessOrEqual(t, strings.Count(g.log.String(), "\n"), 8)
	g.clk = g.clk.Add(time.Second)
	g.swapRead(0, userBuf, 4, uint64(swapmem.UserFault), nil)
	assert.Contains(t, g.log.String(), "1992 swapmem log lines suppressed")
}

func TestWatchdog(t *testing.T) {
	g := newGuest(t, 0)
	require.NoError(t, g.proc.SwapOut(userBuf))
	assert.Zero(t, g.swapRead(0, userBuf, 4, uint64(swapmem.NoFault), nil))
	var w bytes.Buffer
	assert.False(t, g.mon.Watchdog(&w, 10*time.Second))
	g.clk = g.clk.Add(11 * time.Second)
	assert.True(t, g.mon.Watchdog(&w, 10*time.Second))
	assert.Contains(t, w.String(), "pending for 11s")
	assert.False(t, g.mon.Watchdog(&w, 10*time.Second), "once")
}

func TestParseCmdline(t *testing.T) {
	g, err := monitor.ParseCmdline("console=x hc.ring3=secret,bpfault other")
	require.NoError(t, err)
	assert.Equal(t, monitor.Ring3Secret|monitor.Ring3BPFault, g)
	assert.Equal(t, "secret,bpfault", g.String())
	g, err = monitor.ParseCmdline("")
	require.NoError(t, err)
	assert.Zero(t, g)
	assert.Equal(t, "none", g.String())
	g, err = monitor.ParseCmdline("hc.ring3=exit hc.ring3=everything")
	assert.ErrorIs(t, err, monitor.ErrOption)
	assert.Equal(t, monitor.Ring3Exit, g)
}

func TestAddedFunctions(t *testing.T) {
	g := newGuest(t, 0)
	calls := 0
	require.NoError(t, g.mon.Add(0x100, false, func(_ *hv.VCPU, a1, _, _ uint64) (uint64, bool) { calls++; return a1 + 1, false }))
	require.NoError(t, g.mon.Add(0x101, true, func(*hv.VCPU, uint64, uint64, uint64) (uint64, bool) { return 7, false }))
	assert.ErrorIs(t, g.mon.Add(0x100, true, func(*hv.VCPU, uint64, uint64, uint64) (uint64, bool) { return 0, false }), monitor.ErrTaken)
	assert.ErrorIs(t, g.mon.Add(hcall.Exit, true, func(*hv.VCPU, uint64, uint64, uint64) (uint64, bool) { return 0, false }), monitor.ErrTaken)

	ret, _ := g.call(0x100, 41, 0)
	assert.Equal(t, hcall.Denied, ret, "CPL 0 only")
	ret, _ = g.call(0x101, 0, 0)
	assert.EqualValues(t, 7, ret)
	g.cpl(0)
	ret, _ = g.call(0x100, 41, 0)
	assert.EqualValues(t, 42, ret)
	assert.Equal(t, 1, calls)
}

// TestReadFiguresCountEveryVCPU: with Exits set, a read's exit figures
// are the guest's, whichever vCPUs made them (a read may start on one
// vCPU and end on another's exit).
func TestReadFiguresCountEveryVCPU(t *testing.T) {
	g := newGuest(t, 0)
	calls := 0
	g.mon.Exits = func(v *hv.VCPU) (uint64, uint64) {
		assert.Same(t, g.v, v)
		calls++
		if calls == 1 {
			return 10, 2 // at the start
		}
		return 17, 5
	}
	want := bytes.Repeat([]byte("user"), 1024)
	assert.Zero(t, g.swapRead(0, userBuf, 4096, uint64(swapmem.UserFault), want))
	assert.Equal(t, 2, calls)
	assert.Contains(t, g.log.String(), "7 exits (3 preemption timer)")
}
