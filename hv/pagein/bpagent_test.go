package pagein

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/hvtest/fakeguest"
	"github.com/tamahv/tamahv/hv/hvtest/vcputest"
	"github.com/tamahv/tamahv/vmx"
)

// code lays out instructions at addresses in a sparse memory.
type code map[uint64]byte

func (c code) put(at uint64, b ...byte) uint64 {
	for i, x := range b {
		c[at+uint64(i)] = x
	}
	return at + uint64(len(b))
}

func (c code) read(va uint64, p []byte) error {
	for i := range p {
		b, ok := c[va+uint64(i)]
		if !ok {
			b = 0xcc
		}
		p[i] = b
	}
	return nil
}

func rel32(from, to uint64) []byte {
	d := uint32(int32(int64(to) - int64(from)))
	return []byte{byte(d), byte(d >> 8), byte(d >> 16), byte(d >> 24)}
}

// entryCode is shaped like Linux's entry_SYSCALL_64 and do_syscall_64.
func entryCode() (c code, lstar, detour uint64) { return entryCodeWith(0xffffffff81900000) }

// entryCodeWith is entryCode with do_syscall_64 at dispatcher; the detour
// is 13 bytes further.
func entryCodeWith(dispatcher uint64) (c code, lstar, detour uint64) {
	return entryCodeAt(0xffffffff81a00000, dispatcher)
}

// entryCodeAt is entryCode with entry_SYSCALL_64 at lstar.
func entryCodeAt(lstar, dispatcher uint64) (c code, _, detour uint64) {
	c = code{}
	pc := c.put(lstar, 0xf3, 0x0f, 0x1e, 0xfa)                           // endbr64
	pc = c.put(pc, 0x0f, 0x01, 0xf8)                                     // swapgs
	pc = c.put(pc, 0x65, 0x48, 0x89, 0x24, 0x25, 0x14, 0x60, 0x00, 0x00) // mov %rsp,%gs:0x6014
	pc = c.put(pc, 0xeb, 0x02)                                           // jmp over two bytes
	pc = c.put(pc, 0x90, 0x90)
	pc = c.put(pc, 0x48, 0x89, 0xe7) // mov %rsp,%rdi
	pc = c.put(pc, 0xe8)             // call do_syscall_64
	c.put(pc, rel32(pc+4, dispatcher)...)
	pc = c.put(dispatcher, 0xf3, 0x0f, 0x1e, 0xfa) // endbr64
	pc = c.put(pc, 0x55)                           // push %rbp
	pc = c.put(pc, 0x48, 0x89, 0xe5)               // mov %rsp,%rbp
	pc = c.put(pc, 0xe8)                           // call syscall_enter_from_user_mode
	pc = c.put(pc, rel32(pc+4, 0xffffffff81800000)...)
	c.put(pc, 0x89, 0xc3) // mov %eax,%ebx: the detour
	return c, lstar, pc
}

func TestFindDetour(t *testing.T) {
	c, lstar, want := entryCode()
	got, err := FindDetour(c.read, lstar)
	require.NoError(t, err)
	assert.Equal(t, fmt.Sprintf("%#x", want), fmt.Sprintf("%#x", got))

	bad := code{}
	bad.put(0x1000, 0xc3) // ret
	_, err = FindDetour(bad.read, 0x1000)
	assert.ErrorIs(t, err, ErrNoDetour)
	bad.put(0x2000, 0xff, 0xd0) // call *%rax
	_, err = FindDetour(bad.read, 0x2000)
	assert.ErrorContains(t, err, "indirect call")
}

func TestBreakpointAgentRaisesTheFaultAtTheDetour(t *testing.T) {
	g := fakeguest.New(t, ept.Options{})
	c, lstar, detour := entryCode()
	g.LoadKernel(c, nil)
	at := g.Mem.At(detour - fakeguest.KernelOff)
	v, m := vcputest.Scripted(t, nil)
	a := agent(g, lstar, false)
	const cr3, va = 0x7f0000001000, 0x7f0000001000
	swappedOut(g, va)
	require.NoError(t, a.Arm(nil, g.CR3, va))
	assert.Equal(t, detour, a.Detour())
	assert.Equal(t, byte(0xcc), *at, "int3 written")
	require.NoError(t, a.Install(v))

	bp := uint64(vmx.Exception(vmx.VectorBP, 0, 1).Info())
	m.Fields[vmx.GuestRIP] = detour
	m.Fields[vmx.ExitInterruptInfo] = bp
	// Hit in another process: passed on, rewritten later.
	m.Fields[vmx.GuestCR3] = 0x9000
	act, err := vcputest.Exit(v, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	assert.Equal(t, hv.Resume, act)
	assert.Equal(t, byte(0x89), *at, "original byte back")
	assert.False(t, v.EventPending())
	observe(t, v)
	assert.Equal(t, byte(0x89), *at, "not rewritten while the guest sits on the detour")
	m.Fields[vmx.GuestRIP] = 0x1234
	observe(t, v)
	assert.Equal(t, byte(0xcc), *at, "rewritten at a later exit")

	// Hit in the right process: the #PF replaces the #BP.
	m.Fields[vmx.GuestRIP] = detour
	m.Fields[vmx.GuestCR3] = g.CR3 | 0x3 // PCID bits do not matter
	act, err = vcputest.Exit(v, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	assert.Equal(t, hv.Resume, act)
	assert.Equal(t, byte(0x89), *at)
	assert.True(t, v.EventPending())
	e, _ := vcputest.FirstQueued(v)
	assert.Equal(t, vmx.Exception(vmx.VectorPF, 4, 0), e, "user-access #PF")
	assert.Equal(t, uint64(va), v.Regs.CR2)
	assert.Equal(t, uint64(2), a.Hits)
	assert.Equal(t, uint64(1), a.Raised)
	m.Fields[vmx.GuestRIP] = 0x1234
	observe(t, v)
	assert.Equal(t, byte(0x89), *at, "disarmed after raising")
	assert.Zero(t, g.Phys.Owners())

	// The guest's own int3 elsewhere goes back to the guest.
	m.Fields[vmx.GuestRIP] = 0x4000
	v.DropEvents()
	_, err = vcputest.Exit(v, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	e, _ = vcputest.FirstQueued(v)
	assert.Equal(t, uint8(vmx.VectorBP), e.Vector)

	// A byte the guest patched while armed stays the guest's.
	require.NoError(t, a.Arm(nil, g.CR3, va))
	*at = 0xe9
	require.NoError(t, a.Disarm())
	assert.Equal(t, byte(0xe9), *at)
}

// TestBreakpointAgentSplitView: the int3 lives in a shadow page shown to
// instruction fetches only; reads see the original byte.
func TestBreakpointAgentSplitView(t *testing.T) {
	g := fakeguest.New(t, ept.Options{ExecuteOnly: true})
	c, lstar, detour := entryCode()
	g.LoadKernel(c, nil)
	pa := detour - fakeguest.KernelOff
	a := agent(g, lstar, true)
	shadow := a.ShadowPA
	v, m := vcputest.Scripted(t, nil)
	require.NoError(t, a.Install(v))
	const va = 0x7f0000001000
	swappedOut(g, va)
	require.NoError(t, a.Arm(nil, g.CR3, va))
	assert.Equal(t, byte(0x89), *g.Mem.At(pa), "guest memory keeps its byte")
	assert.Equal(t, byte(0xcc), a.Shadow[pa&0xfff], "the shadow has the int3")
	hpa, perm, _, _, _ := g.EPT.Lookup(pa)
	assert.Equal(t, shadow+pa&0xfff, hpa)
	assert.Equal(t, ept.Exec, perm, "fetches only")
	require.NoError(t, g.Phys.Check(pa, 1), "the detour's page is still guest RAM to tamahv")

	// A read of the page: the original, readable and writable, not executable.
	m.Fields[vmx.ExitReasonField] = uint64(vmx.ExitEPTViolation)
	m.Fields[vmx.GuestPhysAddr] = pa
	m.Fields[vmx.ExitQualification] = 0x1 | 0x4<<3 // read; entry allowed execute
	_, err := vcputest.Exit(v, vmx.ExitEPTViolation)
	require.NoError(t, err)
	hpa, perm, _, _, _ = g.EPT.Lookup(pa)
	assert.Equal(t, pa, hpa)
	assert.Equal(t, ept.Read|ept.Write, perm)
	// The guest writes the page meanwhile; then a fetch: a fresh shadow.
	*g.Mem.At(pa + 1) = 0x42
	m.Fields[vmx.ExitQualification] = 0x4 | 0x3<<3 // fetch; entry allowed read/write
	_, err = vcputest.Exit(v, vmx.ExitEPTViolation)
	require.NoError(t, err)
	hpa, perm, _, _, _ = g.EPT.Lookup(pa)
	assert.Equal(t, shadow+pa&0xfff, hpa)
	assert.Equal(t, ept.Exec, perm)
	assert.Equal(t, byte(0x42), a.Shadow[pa&0xfff+1])

	// The guest reaches the detour in the right process.
	m.Fields[vmx.GuestRIP] = detour
	m.Fields[vmx.GuestCR3] = g.CR3
	m.Fields[vmx.ExitInterruptInfo] = uint64(vmx.Exception(vmx.VectorBP, 0, 1).Info())
	_, err = vcputest.Exit(v, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	hpa, perm, _, size, _ := g.EPT.Lookup(pa)
	assert.Equal(t, pa, hpa, "original page back")
	assert.Equal(t, ept.RWX, perm)
	assert.EqualValues(t, ept.Size2M, size, "and its split table freed")
	assert.True(t, v.EventPending())
	assert.Equal(t, uint64(2), a.Switches)
	assert.Greater(t, g.Flushes, 3)

	// Views chasing each other give the split view up.
	require.NoError(t, a.Arm(nil, g.CR3, va))
	for i := 0; i <= maxStreak && !a.noSplit; i++ {
		m.Fields[vmx.ExitQualification] = []uint64{0x1, 0x4}[i%2]
		_, err = vcputest.Exit(v, vmx.ExitEPTViolation)
		require.NoError(t, err)
	}
	assert.True(t, a.noSplit)
	assert.Equal(t, byte(0xcc), *g.Mem.At(pa), "the int3 went in place")
	hpa, perm, _, _, _ = g.EPT.Lookup(pa)
	assert.Equal(t, pa, hpa)
	assert.Equal(t, ept.RWX, perm)

	// A new IA32_LSTAR is followed at the next Arm.
	require.NoError(t, a.Disarm())
	c2, lstar2, detour2 := entryCodeAt(0xffffffff81b00000, 0xffffffff81700000)
	g.LoadKernel(c2, nil)
	a.LSTAR = func(*hv.VCPU) uint64 { return lstar2 }
	require.NoError(t, a.Arm(nil, g.CR3, va))
	assert.Equal(t, detour2, a.Detour())
	assert.Equal(t, byte(0xcc), *g.Mem.At(detour2 - fakeguest.KernelOff), "in place, at the new detour")
	assert.Equal(t, byte(0x89), *g.Mem.At(pa), "the old one untouched")
	require.NoError(t, a.Disarm())
	assert.Zero(t, g.Phys.Owners())
}

// TestBreakpointAgentSharedByVCPUs: two vCPUs share one agent, its int3
// and the EPT. An int3 a vCPU ran before another vCPU's exit took it out
// is run again, not given to the guest; the int3 is written back only
// once no vCPU stands at the detour to run its own instruction; the fault
// is raised on the vCPU that passes the detour in the address space
// armed, and followed by that vCPU's delivery.
func TestBreakpointAgentSharedByVCPUs(t *testing.T) {
	g := fakeguest.New(t, ept.Options{})
	c, lstar, detour := entryCode()
	g.LoadKernel(c, nil)
	at := g.Mem.At(detour - fakeguest.KernelOff)
	a := agent(g, lstar, false)
	v0, m0 := vcputest.Scripted(t, nil)
	v1, m1 := vcputest.Scripted(t, nil)
	d0, d1 := &PFDelivery{}, &PFDelivery{}
	require.NoError(t, a.InstallVCPU(v0, d0))
	require.NoError(t, a.InstallVCPU(v1, d1))
	const va = 0x7f0000001000
	swappedOut(g, va)
	require.NoError(t, a.Arm(nil, g.CR3, va))
	bp := uint64(vmx.Exception(vmx.VectorBP, 0, 1).Info())
	for _, m := range []*hvtest.VMCS{m0, m1} {
		m.Fields[vmx.GuestRIP] = detour
		m.Fields[vmx.ExitInterruptInfo] = bp
		m.Fields[vmx.GuestCR3] = 0x9000 // another process
	}

	// Both vCPUs ran the int3; vCPU 0's exit is handled first.
	act, err := vcputest.Exit(v0, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	assert.Equal(t, hv.Resume, act)
	assert.Equal(t, byte(0x89), *at, "original byte back")
	act, err = vcputest.Exit(v1, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	assert.Equal(t, hv.Resume, act)
	assert.False(t, v1.EventPending(), "vCPU 1's int3 was the agent's: not given to the guest")
	assert.EqualValues(t, 1, a.Hits)
	assert.EqualValues(t, 1, a.Passed)
	assert.EqualValues(t, 1, a.Late)

	// Not rewritten while either vCPU stands at the detour.
	m0.Fields[vmx.GuestRIP] = 0x1234
	observe(t, v0)
	assert.Equal(t, byte(0x89), *at, "vCPU 1 has yet to run the detour's instruction")
	m1.Fields[vmx.GuestRIP] = 0x1234
	observe(t, v1)
	assert.Equal(t, byte(0xcc), *at, "rewritten once both moved on")

	// vCPU 1 passes in the process armed: the fault is raised there.
	m1.Fields[vmx.GuestRIP] = detour
	m1.Fields[vmx.GuestCR3] = g.CR3
	_, err = vcputest.Exit(v1, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	assert.True(t, v1.EventPending())
	assert.False(t, v0.EventPending())
	assert.Equal(t, uint64(va), v1.Regs.CR2)
	assert.Equal(t, uint8(pfQueued), d1.state, "vCPU 1's delivery follows it")
	assert.Equal(t, uint8(pfIdle), d0.state)
	assert.EqualValues(t, 1, a.Raised)

	// The guest's own int3 at the detour, with the agent's out, is the guest's.
	*at = 0xcc
	m0.Fields[vmx.GuestRIP] = detour
	_, err = vcputest.Exit(v0, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	e, _ := vcputest.FirstQueued(v0)
	assert.Equal(t, uint8(vmx.VectorBP), e.Vector)
}

// TestBreakpointAgentStreakIsPerVCPU: one vCPU whose instruction chases
// the split views gives the split view up although another vCPU's exits
// come in between.
func TestBreakpointAgentStreakIsPerVCPU(t *testing.T) {
	g := fakeguest.New(t, ept.Options{ExecuteOnly: true})
	c, lstar, detour := entryCode()
	g.LoadKernel(c, nil)
	pa := detour - fakeguest.KernelOff
	a := agent(g, lstar, true)
	v0, m0 := vcputest.Scripted(t, nil)
	v1, _ := vcputest.Scripted(t, nil)
	require.NoError(t, a.InstallVCPU(v0, nil))
	require.NoError(t, a.InstallVCPU(v1, nil))
	require.NoError(t, a.Arm(nil, g.CR3, 0x7f0000001000))
	m0.Fields[vmx.GuestPhysAddr] = pa
	for i := 0; i <= maxStreak+1 && !a.noSplit; i++ {
		m0.Fields[vmx.ExitQualification] = []uint64{0x1, 0x4}[i%2]
		_, err := vcputest.Exit(v0, vmx.ExitEPTViolation)
		require.NoError(t, err)
		observe(t, v1) // vCPU 1 runs on
	}
	assert.True(t, a.noSplit, "vCPU 0's chase is seen")
	assert.Equal(t, byte(0xcc), *g.Mem.At(pa), "the int3 went in place")
	require.NoError(t, a.Disarm())
}

// swappedOut makes va's PTE a swap entry: not present, backed.
func swappedOut(g *fakeguest.Guest, va uint64) { g.Mem.Put64(g.Entry(va, 1), swapPTE) }

// TestBreakpointAgentDropsAnArmNoLongerBacked: a process exited with its
// BPFault read armed and its page-table root went to another process,
// where va is not backed: the int3 hit there raises nothing (a #PF from
// the system-call path would oops the kernel), the arm is dropped.
func TestBreakpointAgentDropsAnArmNoLongerBacked(t *testing.T) {
	g := fakeguest.New(t, ept.Options{})
	c, lstar, detour := entryCode()
	g.LoadKernel(c, nil)
	v, m := vcputest.Scripted(t, nil)
	a := agent(g, lstar, false)
	const va = 0x7f0000001000
	swappedOut(g, va)
	require.NoError(t, a.Arm(nil, g.CR3, va))
	require.NoError(t, a.Install(v))
	g.Mem.Put64(g.Entry(va, 1), 0) // the new owner of the root has nothing there
	m.Fields[vmx.GuestRIP] = detour
	m.Fields[vmx.ExitInterruptInfo] = uint64(vmx.Exception(vmx.VectorBP, 0, 1).Info())
	m.Fields[vmx.GuestCR3] = g.CR3
	act, err := vcputest.Exit(v, vmx.ExitExceptionOrNMI)
	require.NoError(t, err)
	assert.Equal(t, hv.Resume, act)
	assert.Zero(t, a.Raised)
	assert.EqualValues(t, 1, a.Dropped)
	assert.False(t, v.EventPending(), "no #PF raised")
}

// TestBreakpointAgentFollowsTheArmingVCPUsLSTAR: a kernel that gives each
// processor its own SYSCALL entry (two copies of the entry code). The
// detour is found from the IA32_LSTAR of the vCPU that arms the agent, so
// a fault armed from either is raised on that processor's own path.
func TestBreakpointAgentFollowsTheArmingVCPUsLSTAR(t *testing.T) {
	g := fakeguest.New(t, ept.Options{})
	c0, lstar0, detour0 := entryCode()
	c1, lstar1, detour1 := entryCodeAt(0xffffffff81b00000, 0xffffffff81700000)
	g.LoadKernel(c0, nil)
	g.LoadKernel(c1, nil)
	v0, _ := vcputest.Scripted(t, nil)
	v1, _ := vcputest.Scripted(t, nil)
	a := agent(g, 0, false)
	a.LSTAR = func(v *hv.VCPU) uint64 {
		if v == v1 {
			return lstar1
		}
		return lstar0
	}
	const va = 0x7f0000001000
	require.NoError(t, a.Arm(v1, g.CR3, va))
	assert.Equal(t, detour1, a.Detour(), "vCPU 1's entry")
	assert.Equal(t, byte(0xcc), *g.Mem.At(detour1 - fakeguest.KernelOff))
	require.NoError(t, a.Arm(v0, g.CR3, va))
	assert.Equal(t, detour0, a.Detour(), "vCPU 0's entry")
	assert.Equal(t, byte(0xcc), *g.Mem.At(detour0 - fakeguest.KernelOff))
	assert.NotEqual(t, byte(0xcc), *g.Mem.At(detour1 - fakeguest.KernelOff), "vCPU 1's detour given back")
	require.NoError(t, a.Disarm())
	assert.Zero(t, g.Phys.Owners())
}

// observe runs an exit that only the observers see (a preemption-timer
// exit: nothing of pagein's handles it).
func observe(t *testing.T, v *hv.VCPU) {
	t.Helper()
	_, err := vcputest.Exit(v, vmx.ExitPreemptionTimer)
	require.NoError(t, err)
}

// swapPTE is a swap entry: not present, backed.
const swapPTE = 0x0000000123456600
