package smp

import (
	"bufio"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/arch/x86/x86asm"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/vmx"
)

// fakeAP plays an AP's exit loop on a goroutine: it answers commands from
// a map of handlers until the test ends.
func fakeAP(t *testing.T, p *[4096]byte, answer func(cmd uint32, a0, a1 uint64) ([4]uint64, uint32)) {
	m := mailbox{p: p}
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
			r, flags := answer(cmd, atomic.LoadUint64(m.u64(apArg0)), atomic.LoadUint64(m.u64(apArg1)))
			for i, off := range []int{apRet0, apRet1, apRet2, apRet3} {
				atomic.StoreUint64(m.u64(off), r[i])
			}
			atomic.StoreUint32(m.u32(apFlags), flags)
			atomic.StoreUint32(m.u32(apCmd), 0)
		}
	}()
}

func TestMailboxCall(t *testing.T) {
	p := new([4096]byte)
	vmcs := map[uint64]uint64{}
	fakeAP(t, p, func(cmd uint32, a0, a1 uint64) ([4]uint64, uint32) {
		switch cmd {
		case cmdVMWRITE:
			if a0 == 0xdead {
				return [4]uint64{}, 1 << 6 // VMfailValid
			}
			vmcs[a0] = a1
		case cmdVMREAD:
			return [4]uint64{vmcs[a0]}, 0
		case cmdCPUID:
			return [4]uint64{a0, a1, 3, 4}, 0
		}
		return [4]uint64{}, 0
	})
	m := newHandoff(mailbox{p: p, timeout: time.Minute})
	_, err := m.vmx("VMWRITE", cmdVMWRITE, uint64(vmx.GuestRIP), 0x1234)
	require.NoError(t, err)
	got, err := m.vmx("VMREAD", cmdVMREAD, uint64(vmx.GuestRIP), 0)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x1234), got)
	_, err = m.vmx("VMWRITE", cmdVMWRITE, 0xdead, 1)
	assert.ErrorContains(t, err, "VMWRITE 0xdead on the application processor failed")
	r, _, err := m.call(cmdCPUID, 7, 1)
	require.NoError(t, err)
	assert.Equal(t, [4]uint64{7, 1, 3, 4}, r)
}

func TestMailboxSilentAP(t *testing.T) {
	m := mailbox{p: new([4096]byte), timeout: time.Millisecond}
	_, _, err := m.call(cmdCPUID, 0, 0)
	assert.ErrorIs(t, err, ErrAPSilent)
	assert.ErrorIs(t, m.post(cmdRun, 0, 0), ErrAPBusy, "the command it never answered is still there")
}

// asmDefines reads every #define of an assembly file: each must be a
// number (decimal, hexadecimal or (1<<n)), or the test fails.
func asmDefines(t *testing.T, name string) map[string]uint64 {
	f, err := os.Open(name)
	require.NoError(t, err)
	defer f.Close()
	re := regexp.MustCompile(`^#define\s+(\w+)\s+(0x[0-9a-f]+|\d+|\(1<<\d+\))\s*(//.*)?$`)
	out := map[string]uint64{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		if !strings.HasPrefix(line, "#define") {
			continue
		}
		m := re.FindStringSubmatch(line)
		if !assert.NotNil(t, m, "%s: a #define that is not a number: %s", name, line) {
			continue
		}
		var v uint64
		if n, ok := strings.CutPrefix(m[2], "(1<<"); ok {
			shift, err := strconv.ParseUint(strings.TrimSuffix(n, ")"), 10, 6)
			require.NoError(t, err)
			v = 1 << shift
		} else {
			v, err = strconv.ParseUint(m[2], 0, 64)
			require.NoError(t, err)
		}
		out[m[1]] = v
	}
	return out
}

// TestExitLoopNumbers ties every number smp_amd64.s defines to the Go
// side's: the parameter block and mailbox offsets and commands,
// vmx.GuestRegs, the VMCS fields, exit reason, MSRs and control-register
// bits of vmx, and board/pc's GDT selectors. A #define it does not know
// fails it.
func TestExitLoopNumbers(t *testing.T) {
	d := asmDefines(t, "smp_amd64.s")
	var r vmx.GuestRegs
	var ce cpuidEntry
	want := map[string]uint64{
		"AP_CMD": apCmd, "AP_FLAGS": apFlags, "AP_ARG0": apArg0, "AP_ARG1": apArg1,
		"AP_RET0": apRet0, "AP_RET1": apRet1, "AP_RET2": apRet2, "AP_RET3": apRet3,
		"AP_GEN": apGen, "AP_SEEN": apSeen, "AP_INGUEST": apInGuest, "AP_NMIS": apNMIs,
		"AP_STOP": apStop, "AP_TICKS": apTicks, "AP_EPTDESC": apEPTDesc, "AP_LAUNCH": apLaunch,
		"AP_EXITRSP": apExitRSP, "AP_ENTRIES": apEntries, "AP_REGS": apRegs,
		"AP_BSPINGUEST": apBSPIn, "AP_BSPKICKS": apBSPKicks, "AP_BSPAPIC": apBSPAPIC,
		"AP_WINDOW": apWindow, "AP_CUT": apCut, "AP_TIMER": apTimer, "AP_CUTS": apCuts,
		"AP_SNAPN": apSnapN, "AP_OPSN": apOpsN, "AP_OPFAIL": apOpFail, "AP_OPFLAGS": apOpFlags,
		"AP_SNAPOK": apSnapOK, "AP_SNAPF": apSnapF, "AP_SNAPV": apSnapV, "AP_OPS": apOps, "OP_SIZE": opSize,
		"AP_FASTOK": apFastOK, "AP_CPUIDN": apCPUIDN, "AP_CPUIDTAB": apCPUIDTab, "AP_ANSWERED": apAnswered,
		"CE_LEAF": uint64(unsafe.Offsetof(ce.leaf)), "CE_SUB": uint64(unsafe.Offsetof(ce.sub)),
		"CE_EAX": uint64(unsafe.Offsetof(ce.eax)), "CE_EBX": uint64(unsafe.Offsetof(ce.ebx)),
		"CE_ECX": uint64(unsafe.Offsetof(ce.ecx)), "CE_EDX": uint64(unsafe.Offsetof(ce.edx)),
		"CE_CR4MASK": uint64(unsafe.Offsetof(ce.cr4Mask)), "CE_ECXIFCR4": uint64(unsafe.Offsetof(ce.ecxIfCR4)),
		"CE_SIZE":    uint64(unsafe.Sizeof(ce)),
		"EXIT_CPUID": uint64(vmx.ExitCPUID), "F_RFLAGS": uint64(vmx.GuestRFLAGS), "F_GUEST_CR4": uint64(vmx.GuestCR4),
		"F_GUEST_RIP": uint64(vmx.GuestRIP), "F_INSN_LEN": uint64(vmx.ExitInstructionLen), "RFLAGS_TF": vmx.RFLAGSTF,
		"BLOCKING_STI_MOVSS": uint64(vmx.BlockingSTI | vmx.BlockingMovSS),
		"OP_VMWRITE":         opVMWRITE, "OP_WRMSR": opWRMSR, "OP_XSETBV": opXSETBV, "OP_MMIOWRITE": opMMIOWr, "CMD_FLUSH": cmdFlush,
		"F_TIMER_VALUE": uint64(vmx.PreemptionTimerValue),
		"MSR_APIC_BASE": vmx.MSRAPICBase, "APIC_BASE_EXTD": vmx.APICBaseX2APIC, "MSR_X2APIC_ICR": vmx.MSRX2APICICR,
		"LAPIC_ICR_LOW": vmx.APICICRLow, "LAPIC_ICR_HIGH": vmx.APICICRHigh, "ICR_PENDING": vmx.ICRPending,
		"ICR_NMI": vmx.ICRDeliveryNMI | vmx.ICRLevelAssert, "APIC_BASE_EN": vmx.APICBaseEnable,
		"AP_STATUS": apStatus, "AP_APICID": apAPICID, "AP_FEATCTL": apFeatCtl,
		"CMD_VMPTRLD": cmdVMPTRLD, "CMD_VMREAD": cmdVMREAD, "CMD_VMWRITE": cmdVMWRITE,
		"CMD_CPUID": cmdCPUID, "CMD_RDMSR": cmdRDMSR, "CMD_WRMSR": cmdWRMSR,
		"CMD_XSETBV": cmdXSETBV, "CMD_RUN": cmdRun, "CMD_PARK": cmdPark, "CMD_REGS": cmdRegs, "CMD_MMIOREAD": cmdMMIORd, "CMD_MMIOWRITE": cmdMMIOWr,
		"R_RAX": uint64(unsafe.Offsetof(r.RAX)), "R_RCX": uint64(unsafe.Offsetof(r.RCX)),
		"R_RDX": uint64(unsafe.Offsetof(r.RDX)), "R_RBX": uint64(unsafe.Offsetof(r.RBX)),
		"R_RBP": uint64(unsafe.Offsetof(r.RBP)), "R_RSI": uint64(unsafe.Offsetof(r.RSI)),
		"R_RDI": uint64(unsafe.Offsetof(r.RDI)), "R_R8": uint64(unsafe.Offsetof(r.R8)),
		"R_R9": uint64(unsafe.Offsetof(r.R9)), "R_R10": uint64(unsafe.Offsetof(r.R10)),
		"R_R11": uint64(unsafe.Offsetof(r.R11)), "R_R12": uint64(unsafe.Offsetof(r.R12)),
		"R_R13": uint64(unsafe.Offsetof(r.R13)), "R_R14": uint64(unsafe.Offsetof(r.R14)),
		"R_R15": uint64(unsafe.Offsetof(r.R15)), "R_CR2": uint64(unsafe.Offsetof(r.CR2)),
		"F_EXIT_REASON": uint64(vmx.ExitReasonField), "F_IDT_VECTORING": uint64(vmx.IDTVectoringInfo),
		"F_ACTIVITY": uint64(vmx.GuestActivityState), "EXIT_PREEMPTION": uint64(vmx.ExitPreemptionTimer),
		"ACTIVITY_SIPI": uint64(vmx.ActivityWaitForSIPI), "F_INTERRUPTIBILITY": uint64(vmx.GuestInterruptibility),
		"BLOCKING_SMI": uint64(vmx.BlockingSMI),
		"AP_GDTR":      apGDTR, "AP_IDTR": apIDTR, "AP_STACK": apStack, "AP_VMXON": apVMXON,
		"SEL_CODE": pc.SelectorCode, "SEL_DATA": pc.SelectorData,
		"MSR_GS_BASE": vmx.MSRGSBase, "MSR_FEATURE_CONTROL": vmx.MSRFeatureControl, "MSR_VMX_BASIC": vmx.MSRVMXBasic,
		"MSR_VMX_CR0_FIXED0": vmx.MSRCR0Fixed0, "MSR_VMX_CR0_FIXED1": vmx.MSRCR0Fixed1,
		"MSR_VMX_CR4_FIXED0": vmx.MSRCR4Fixed0, "MSR_VMX_CR4_FIXED1": vmx.MSRCR4Fixed1, "CR4_VMXE": vmx.CR4VMXE,
	}
	for name, v := range want {
		got, ok := d[name]
		if assert.True(t, ok, "%s not defined", name) {
			assert.Equal(t, v, got, name)
		}
	}
	for name := range d {
		_, ok := want[name]
		assert.True(t, ok, "smp_amd64.s defines %s, which no Go name is tied to", name)
	}
	assert.LessOrEqual(t, apCuts+8, apBlockEnd)
	assert.LessOrEqual(t, apBlockEnd, apSnapN)
	assert.LessOrEqual(t, apAnswered+8, apSnapF)
	assert.LessOrEqual(t, apSnapF+4*maxSnap, apSnapV)
	assert.LessOrEqual(t, apSnapV+8*maxSnap, apOps)
	assert.LessOrEqual(t, apOpsEnd, 4096, "the queue fits the block")
	assert.LessOrEqual(t, maxSnap, 64, "AP_SNAPOK has a bit a field")
	assert.Less(t, apParamLen-1, apCmd, "the mailbox follows the start-up fields")
}

// TestExitLoopEncodings decodes each instruction apvcpu_amd64.h gives as
// bytes and compares it with its comment.
func TestExitLoopEncodings(t *testing.T) {
	f, err := os.Open("apvcpu_amd64.h")
	require.NoError(t, err)
	defer f.Close()
	re := regexp.MustCompile(`^#define\s+(\w+)\s+((?:BYTE \$0x[0-9a-f]{2};?\s*)+)//\s*(.+)$`)
	n := 0
	s := bufio.NewScanner(f)
	for s.Scan() {
		m := re.FindStringSubmatch(s.Text())
		if m == nil {
			require.False(t, strings.HasPrefix(s.Text(), "#define"), "unparsed define: %s", s.Text())
			continue
		}
		var b []byte
		for _, f := range strings.Split(m[2], ";") {
			if f = strings.TrimSpace(f); f != "" {
				v, err := strconv.ParseUint(strings.TrimPrefix(f, "BYTE $0x"), 16, 8)
				require.NoError(t, err)
				b = append(b, byte(v))
			}
		}
		in, err := x86asm.Decode(b, 64)
		require.NoError(t, err, m[1])
		assert.Equal(t, len(b), in.Len, m[1])
		assert.Equal(t, strings.TrimSpace(m[3]), strings.ToLower(x86asm.IntelSyntax(in, 0, nil)), m[1])
		n++
	}
	assert.Equal(t, 4, n)
	assert.Equal(t, uint64(apNMIs), uint64(0x90), "LOCK_INCL_GS_NMIS's displacement")
	assert.Equal(t, uint64(apWindow), uint64(0xe8), "CMPL_GS_WINDOW_0's displacement")
	assert.Equal(t, uint64(apCut), uint64(0xec), "MOVL_1_GS_CUT's displacement")
}

// TestMailboxTakeNMIsCountsEach: the AP's NMI handler counts NMIs in the
// mailbox while the bootstrap processor takes them; every NMI is taken
// exactly once, however the two interleave, and a take with none waiting
// returns 0.
func TestMailboxTakeNMIsCountsEach(t *testing.T) {
	m := mailbox{p: new([4096]byte)}
	assert.Zero(t, m.takeNMIs())
	atomic.AddUint32(m.u32(apNMIs), 1)
	atomic.AddUint32(m.u32(apNMIs), 1)
	assert.EqualValues(t, 2, m.takeNMIs(), "two NMIs, two counted")
	assert.Zero(t, m.takeNMIs())

	const n = 100000
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < n; i++ {
			atomic.AddUint32(m.u32(apNMIs), 1) // the handler's LOCK INCL
		}
	}()
	var taken uint64
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
		}
		taken += uint64(m.takeNMIs())
	}
	assert.EqualValues(t, n, taken)
}
