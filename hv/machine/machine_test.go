package machine_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/hv/hvtest"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// skylake is the capability set of Bochs's corei7_skylake_x.
func skylake() *vmx.Caps { return hvtest.Skylake() }

// board is a machine.Board in maps: physical memory is sparse 4 KiB
// pages (guest RAM and the arena alike), and Enter plays a script of VM
// exits against a fake VMCS.
type board struct {
	t      *testing.T
	mem    map[uint64]*[4096]byte
	next   uint64
	vmcs   *hvtest.VMCS
	script []step
	flush  int
	// idle: once the script has run out, the guest runs on, exiting at
	// each preemption-timer tick (yielding to the other goroutines first).
	idle bool
	// leftover: the test expects steps of the script not to run; else
	// it fails when it ends with any left.
	leftover bool
	// nmis are the NMIs that reached VMX root, for TakeNMI.
	nmis atomic.Uint32
}

// step is one scripted VM exit: at the entry before it, check sees the
// state tamahv left for the guest; then exit sets the exit's fields.
type step struct {
	name  string
	check func(b *board, r *vmx.GuestRegs)
	exit  func(b *board, r *vmx.GuestRegs)
}

const arenaBase = 0x1_0000_0000 // above the guest's RAM

// newBoard returns an empty board. With a test, the test fails if it
// ends with steps of the board's script that never ran (unless it set
// leftover).
func newBoard(t *testing.T) *board {
	b := &board{t: t, mem: map[uint64]*[4096]byte{}, next: arenaBase}
	if t != nil {
		t.Cleanup(func() {
			if !b.leftover {
				assert.Empty(t, stepNames(b.script), "vCPU 0's steps that never ran")
			}
		})
	}
	return b
}

// stepNames names the steps of a script.
func stepNames(s []step) []string {
	var out []string
	for _, st := range s {
		out = append(out, st.name)
	}
	return out
}

func (b *board) page(pa uint64) *[4096]byte {
	p := b.mem[pa&^0xfff]
	if p == nil {
		p = new([4096]byte)
		b.mem[pa&^0xfff] = p
	}
	return p
}

func (b *board) Alloc() (uint64, error) {
	b.next += 4096
	b.page(b.next)
	return b.next, nil
}
func (b *board) Free(pa uint64) { delete(b.mem, pa) }
func (b *board) Table(pa uint64) (*[512]uint64, error) {
	p, err := b.Bytes(pa)
	if err != nil {
		return nil, err
	}
	return (*[512]uint64)(unsafe.Pointer(p)), nil
}
func (b *board) Bytes(pa uint64) (*[4096]byte, error) {
	if p := b.mem[pa]; p != nil && pa >= arenaBase {
		return p, nil
	}
	return nil, fmt.Errorf("%#x is not an arena page", pa)
}
func (b *board) ReadPhys(pa uint64, p []byte) error {
	for len(p) > 0 {
		n := copy(p, b.page(pa)[pa&0xfff:])
		p, pa = p[n:], pa+uint64(n)
	}
	return nil
}
func (b *board) WritePhys(pa uint64, p []byte) error {
	for len(p) > 0 {
		n := copy(b.page(pa)[pa&0xfff:], p)
		p, pa = p[n:], pa+uint64(n)
	}
	return nil
}
func (b *board) CopyPhys(dst, src, n uint64) error {
	tmp := make([]byte, n)
	_ = b.ReadPhys(src, tmp)
	return b.WritePhys(dst, tmp)
}
func (b *board) u64(pa uint64) uint64 {
	var x [8]byte
	_ = b.ReadPhys(pa, x[:])
	return binary.LittleEndian.Uint64(x[:])
}
func (b *board) put64(pa, v uint64) {
	var x [8]byte
	binary.LittleEndian.PutUint64(x[:], v)
	_ = b.WritePhys(pa, x[:])
}
func (b *board) Sink() (uint64, error)   { return 0x1020_0000, nil }
func (b *board) Reach(uint64) uint64     { return 1 << 32 }
func (b *board) WriteMSR(uint32, uint64) {}
func (b *board) TakeNMI() uint32         { return b.nmis.Swap(0) }
func (b *board) CPUID(leaf, _ uint32) (uint32, uint32, uint32, uint32) {
	return leaf + 1, 0, 0, 0
}
func (b *board) XSETBV(uint32, uint64)                   {}
func (b *board) PortIO(uint16, int, bool, uint32) uint32 { return ^uint32(0) }
func (b *board) ReadMSR(uint32) uint64                   { return 0 }
func (b *board) Host() hv.HostState {
	return hv.HostState{CR0: 0x80000031, CR4: 0x2020, CS: 8, SS: 16, TR: 24}
}
func (b *board) TSCHz() uint64                    { return 200e6 }
func (b *board) InvalidateEPT(uint64)             { b.flush++ }
func (b *board) LoadVMCS(uint64) (hv.VMCS, error) { return b.vmcs, nil }

func (b *board) Enter(r *vmx.GuestRegs, _ *vmx.FXArea, _ bool) error {
	if len(b.script) == 0 && b.idle {
		runtime.Gosched()
		b.vmcs.Fields[vmx.ExitQualification], b.vmcs.Fields[vmx.IDTVectoringInfo] = 0, 0
		b.exitWith(vmx.ExitPreemptionTimer)
		return nil
	}
	if len(b.script) == 0 {
		return errors.New("the script has ended")
	}
	s := b.script[0]
	b.script = b.script[1:]
	if s.check != nil {
		s.check(b, r)
	}
	f := b.vmcs.Fields
	f[vmx.ExitQualification], f[vmx.ExitInstructionLen], f[vmx.IDTVectoringInfo] = 0, 3, 0
	f[vmx.GuestPhysAddr], f[vmx.EntryInterruptInfo] = 0, 0
	s.exit(b, r)
	return nil
}

// Guest memory for the scripted process: 4-level tables, a data page
// that is swapped out, and a page with the swap request.
const (
	pml4    = 0x20_0000
	pdpt    = 0x20_1000
	pd      = 0x20_2000
	pt      = 0x20_3000
	reqPA   = 0x30_0000
	dataPA  = 0x40_0000
	dataVA  = 0x7f00_0000_0000
	reqVA   = dataVA + 0x1000
	swapPTE = 0x1234_5000 // not present, not zero: a swap entry
)

// cpl sets the privilege level and paging mode the guest runs in.
func (b *board) run(cpl int) {
	f := b.vmcs.Fields
	f[vmx.GuestSSAccess] = uint64(0x93 | cpl<<5)
	f[vmx.GuestCR3] = pml4
	f[vmx.GuestCR0] |= 1<<31 | 1
	f[vmx.GuestCR4] |= 1 << 5
	f[vmx.EntryControls] |= vmx.EntryIA32eMode
}

func (b *board) exitWith(reason vmx.ExitReason) { b.vmcs.Fields[vmx.ExitReasonField] = uint64(reason) }

func newVMCS() *hvtest.VMCS { return hvtest.NewVMCS() }

// exampleConfig is the machine of these tests: 512 MiB of RAM with
// tamahv's region in it, COM1 kept, the kernel at 16 MiB.
func exampleConfig(kernelLen uint64) machine.Config {
	return machine.Config{
		Caps: skylake(),
		E820: []hv.E820Entry{{Addr: 0, Size: 0x9fc00, Type: hv.E820RAM},
			{Addr: 0x10_0000, Size: 0x1ff0_0000, Type: hv.E820RAM}},
		Own: [2]uint64{0x1000_0000, 0x1800_0000}, Console: [2]uint16{0x3f8, 0x3ff},
		Kernel: [2]uint64{0x100_0000, kernelLen}, Cmdline: "console=ttyS1",
	}
}

func newMachine(t *testing.T) (*board, *machine.Machine, *bytes.Buffer) {
	return newMachineWith(t, func(*machine.Config) {})
}

// newMachineWith is newMachine with the configuration changed by set.
func newMachineWith(t *testing.T, set func(*machine.Config)) (*board, *machine.Machine, *bytes.Buffer) {
	b, m, log, err := buildMachine(t, set)
	require.NoError(t, err)
	return b, m, log
}

// buildMachine builds the machine of these tests with the changes edit
// makes to its configuration, and returns machine.New's error.
func buildMachine(t *testing.T, edit func(*machine.Config)) (*board, *machine.Machine, *bytes.Buffer, error) {
	b := newBoard(t)
	b.vmcs = newVMCS()
	kernel := bzImage()
	require.NoError(t, b.WritePhys(0x100_0000, kernel))
	var log bytes.Buffer
	c := exampleConfig(uint64(len(kernel)))
	c.Log = &log
	edit(&c)
	m, err := machine.New(b, c)
	return b, m, &log, err
}

// mapProcess builds the process's page tables: its data page (holding
// data) swapped out, and a request page.
func (b *board) mapProcess(data []byte) {
	b.put64(pml4+8*(dataVA>>39&511), pdpt|7)
	b.put64(pdpt+8*(dataVA>>30&511), pd|7)
	b.put64(pd+8*(dataVA>>21&511), pt|7)
	b.put64(pt+8*(dataVA>>12&511), swapPTE)
	b.put64(pt+8*(reqVA>>12&511), reqPA|7)
	_ = b.WritePhys(dataPA, data)
}

// pagerWrite is the guest's page-fault handler writing the data page's
// PTE: the watched page table makes it an EPT violation.
func (b *board) pagerWrite() {
	b.vmcs.Fields[vmx.GuestPhysAddr] = pt + 8*(dataVA>>12&511)
	b.vmcs.Fields[vmx.ExitQualification] = 1<<1 | 1<<3 | 1<<5 | 1<<7 | 1<<8
	b.exitWith(vmx.ExitEPTViolation)
}

// pagerDone is the write done, once tamahv let it through.
func (b *board) pagerDone() { b.put64(pt+8*(dataVA>>12&511), dataPA|7) }

// bzImage is a minimal Linux bzImage: boot protocol 2.15, four setup
// sectors, then the protected-mode code.
func bzImage() []byte {
	b := make([]byte, 5*512+4096)
	le := binary.LittleEndian
	b[0x1f1] = 4                         // setup_sects
	le.PutUint16(b[0x1fe:], 0xaa55)      // boot_flag
	b[0x201] = 0x6a                      // end of the jump: the header's length
	copy(b[0x202:], "HdrS")              // header
	le.PutUint16(b[0x206:], 0x020f)      // version
	le.PutUint32(b[0x214:], 0x100000)    // code32_start
	le.PutUint32(b[0x22c:], 0x7fffffff)  // initrd_addr_max
	le.PutUint32(b[0x238:], 2047)        // cmdline_size
	le.PutUint32(b[0x260:], 0x0300_0000) // init_size
	return b
}

func TestNewRefusesWithoutCaps(t *testing.T) {
	_, err := machine.New(newBoard(t), machine.Config{})
	assert.Error(t, err)
}

// tamahv's command line sets the swap reads' deadline; a bad value stops
// the machine's assembly with an error naming the option.
func TestNewTakesOptions(t *testing.T) {
	_, _, log, err := buildMachine(t, func(c *machine.Config) { c.Options = "hc.ring3=secret swap.deadline=5s log.alive=10s" })
	require.NoError(t, err)
	assert.Contains(t, log.String(), "tamahv: swap reads end after 5s unless they set their own deadline")

	_, _, _, err = buildMachine(t, func(c *machine.Config) { c.Options = "swap.deadline=soon" })
	assert.ErrorIs(t, err, machine.ErrOption)
	assert.ErrorContains(t, err, "swap.deadline")
}

// TestGuestEndToEnd runs the composed machine on a scripted guest: CPUID,
// hypercalls from user mode, a swap read of a swapped-out page that
// tamahv faults in through the guest's own page-fault handler (the #PF
// injected, the page-table write seen through the EPT watch), its status,
// and the exit.
func TestGuestEndToEnd(t *testing.T) {
	b, m, log := newMachine(t)
	want := bytes.Repeat([]byte("swapped!"), 512)
	b.mapProcess(want)
	req := hcall.SwapRequest{VA: dataVA, Len: 4096, Options: uint64(swapmem.UserFault), SHA256: sha256.Sum256(want)}.Encode()
	require.NoError(t, b.WritePhys(reqPA, req[:]))

	b.script = []step{
		{name: "cpuid", exit: func(b *board, r *vmx.GuestRegs) {
			b.run(0)
			r.RAX = 0x16
			b.exitWith(vmx.ExitCPUID)
		}},
		{name: "identify from user mode", check: func(b *board, r *vmx.GuestRegs) {
			assert.EqualValues(t, 0x17, r.RAX, "CPUID answered")
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.run(3)
			r.RAX = hcall.Identify
			b.exitWith(vmx.ExitVMCALL)
		}},
		{name: "swap read", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, uint64(hcall.Magic), r.RAX)
		}, exit: func(b *board, r *vmx.GuestRegs) {
			r.RAX, r.RDI, r.RSI = hcall.SwapRead, reqVA, hcall.SwapRequestSize
			b.exitWith(vmx.ExitVMCALL)
		}},
		{name: "the guest's pager writes the PTE", check: func(b *board, r *vmx.GuestRegs) {
			assert.Zero(t, r.RAX, "swap read accepted")
			info := b.vmcs.Fields[vmx.EntryInterruptInfo]
			assert.Equal(t, uint64(1<<31|3<<8|1<<11|vmx.VectorPF), info, "#PF injected")
			assert.Equal(t, uint64(dataVA), r.CR2)
			assert.EqualValues(t, 4, b.vmcs.Fields[vmx.EntryExceptionError], "user-mode read of a not-present page")
			_, perm, _, _, ok := m.EPT.Lookup(pt)
			require.True(t, ok)
			assert.Zero(t, perm&ept.Write, "the page table is watched")
		}, exit: func(b *board, r *vmx.GuestRegs) { b.pagerWrite() }},
		{name: "the write is done; status", check: func(b *board, r *vmx.GuestRegs) { b.pagerDone() }, exit: func(b *board, r *vmx.GuestRegs) {
			r.RAX = hcall.SwapStatus
			b.exitWith(vmx.ExitVMCALL)
		}},
		{name: "exit from user mode", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, uint64(hcall.StatusOK), r.RAX, "log:\n%s", b.logText(log))
		}, exit: func(b *board, r *vmx.GuestRegs) {
			r.RAX, r.RDI = hcall.Exit, 0
			b.exitWith(vmx.ExitVMCALL)
		}},
		{name: "exit", check: func(b *board, r *vmx.GuestRegs) {
			assert.Equal(t, hcall.Denied, r.RAX)
		}, exit: func(b *board, r *vmx.GuestRegs) {
			b.run(0)
			r.RAX, r.RDI = hcall.Exit, 5
			b.exitWith(vmx.ExitVMCALL)
		}},
	}
	require.NoError(t, m.Run(), "log:\n%s", log)
	assert.Empty(t, b.script)
	assert.Contains(t, log.String(), "tamahv: swapmem read ok")
	assert.Contains(t, log.String(), "tamahv: guest exited (status 5) after 7 exits (vCPU 0: 7)")
	assert.Equal(t, 1, strings.Count(log.String(), "tamahv: vCPU 0 started\n"), "once, at the first entry")
	assert.EqualValues(t, 1, m.Engine.Stats().Injected)
	assert.Positive(t, b.flush, "EPT flushed after the watch changed it")
	assert.EqualValues(t, m.Shootdown.Generation(), b.flush, "one INVEPT per change, through the shootdown; the entry check finds nothing new")
}

func (b *board) logText(l *bytes.Buffer) string { return l.String() }

// The ports of Config.PortGuards exit (the I/O bitmap selects them), as
// the console's do, and no other port does.
func TestPortGuardsSelectTheirPorts(t *testing.T) {
	b, _, _ := newMachineWith(t, func(c *machine.Config) {
		c.PortGuards = []hv.PortGuard{{First: 0xb004, Last: 0xb005, Refuse: func(uint16, int, uint32) bool { return true }}}
	})
	var exits []int
	for i, f := range []vmx.Field{vmx.IOBitmapA, vmx.IOBitmapB} {
		bm, err := b.Bytes(b.vmcs.Fields[f])
		require.NoError(t, err)
		for p := 0; p < 0x8000; p++ {
			if bm[p/8]&(1<<(p%8)) != 0 {
				exits = append(exits, i*0x8000+p)
			}
		}
	}
	assert.Equal(t, []int{0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, 0xb004, 0xb005}, exits)
}
