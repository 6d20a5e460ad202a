// Package monitor is tamahv's default policy: which hypercalls the guest
// may make at which privilege level, and the swap reads they start.
//
// The guest is not trusted. Unprivileged guest code (CPL 3) gets only what
// is safe for any process: HcIdentify, and swap reads of its own memory
// (the lower, user half of its address space) that inject nothing but
// user-mode faults, with their status. Everything else needs CPL 0, unless
// tamahv's own command line (never the guest) grants it to CPL 3 through
// Ring3, as a test guest needs.
package monitor

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/hv/hcall"
	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/vmx"
)

// Ring3 is a set of functions granted to CPL 3 beyond the default.
type Ring3 uint8

// Grants.
const (
	// Ring3Secret lets CPL 3 ask for the secret page (hcall.Secret).
	Ring3Secret Ring3 = 1 << iota
	// Ring3BPFault lets CPL 3 ask for swap reads with swapmem.BPFault:
	// a kernel-mode fault raised from the guest kernel's system-call path.
	Ring3BPFault
	// Ring3Exit lets CPL 3 end the guest (hcall.Exit).
	Ring3Exit
)

var ring3Names = []struct {
	name string
	g    Ring3
}{{"secret", Ring3Secret}, {"bpfault", Ring3BPFault}, {"exit", Ring3Exit}}

// String lists the grants as the command line spells them.
func (g Ring3) String() string {
	var s []string
	for _, n := range ring3Names {
		if g&n.g != 0 {
			s = append(s, n.name)
		}
	}
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ",")
}

// Ring3Option is the name of the command-line option that grants
// functions to CPL 3: hc.ring3=secret,bpfault,exit (any subset).
const Ring3Option = "hc.ring3"

// ErrOption is ParseCmdline's error for an option it cannot read.
var ErrOption = errors.New("monitor: bad option")

// ParseCmdline reads the grants from tamahv's command line: the words
// hc.ring3=NAME[,NAME...]; other words are not the monitor's and are left
// alone. An unknown name is an error; the grants read so far are returned
// with it.
func ParseCmdline(cmdline string) (Ring3, error) {
	var g Ring3
	for _, w := range strings.Fields(cmdline) {
		v, ok := strings.CutPrefix(w, Ring3Option+"=")
		if !ok {
			continue
		}
	names:
		for _, name := range strings.Split(v, ",") {
			for _, n := range ring3Names {
				if name == n.name {
					g |= n.g
					continue names
				}
			}
			return g, fmt.Errorf("%w: %s: unknown function %q (secret, bpfault, exit)", ErrOption, Ring3Option, name)
		}
	}
	return g, nil
}

// Memory is the guest memory the monitor reads hypercall arguments from:
// guest-physical reads that refuse tamahv's own memory, and page-table
// watches (swapmem.Guest's). Its translations should carry
// swapmem.Translation.Top: the monitor learns from it that an address
// space was torn down.
type Memory interface {
	Translate(cr3, va uint64) (swapmem.Translation, error)
	ReadPhys(pa uint64, p []byte) error
	Watch(cr3, va uint64, changed func(swapmem.Translation)) (cancel func(), err error)
}

// Log lines are limited to logBurst a second; the rest are counted.
const logBurst = 8

// Monitor answers the guest's hypercalls (hv.Hypercalls).
type Monitor struct {
	// Ring3 are the functions granted to CPL 3 beyond the default.
	Ring3 Ring3
	// Mem reads the guest's requests.
	Mem Memory
	// Engine serves swap reads (nil: none).
	Engine *swapmem.Engine
	// Spaces names address spaces: reads are kept per address space, the
	// user and kernel CR3 of an isolated process being one (nil: page-table
	// bases compared exactly).
	Spaces *guestmem.AddressSpaces
	// SecretPA is the page hcall.Secret reports (0: none).
	SecretPA uint64
	// Log receives one line per swap read (nil: discarded), at most a
	// few a second whatever the guest does.
	Log io.Writer
	// Now is the clock (nil: time.Now).
	Now func() time.Time
	// Exits returns the guest's VM exits so far and the
	// VMX-preemption-timer exits among them, for a read's figures: with
	// several vCPUs, a read may start on one and end on another (nil: v's
	// own counts).
	Exits func(v *hv.VCPU) (total, timer uint64)

	// Status is the exit status the guest gave with hcall.Exit.
	Status int

	extra map[uint64]extra // functions an embedder added
	gen   uint64           // reads started
	reads map[uint64]*read // by address space (Spaces.Of)
	held  uint64           // bytes the live reads reserved (ReadBudget)
	// work are the reads with bytes kept to hash or pieces to start
	// (Pump), in turn.
	work       []*read
	logSecond  time.Time
	logLines   int
	suppressed int
}

// Func is a hypercall function an embedder adds: it gets the arguments
// (RDI, RSI, RDX) and returns RAX; stop ends the run loop.
type Func func(v *hv.VCPU, a1, a2, a3 uint64) (ret uint64, stop bool)

type extra struct {
	f     Func
	ring3 bool
}

// ErrTaken is Add's error for a function number already in use.
var ErrTaken = errors.New("monitor: hypercall number taken")

// Add adds hypercall nr, for CPL 0 only or (ring3) for every privilege
// level. The numbers of package hcall are taken.
func (m *Monitor) Add(nr uint64, ring3 bool, f Func) error {
	if nr <= hcall.SwapStatus || m.extra[nr].f != nil || f == nil {
		return fmt.Errorf("%w: %d", ErrTaken, nr)
	}
	if m.extra == nil {
		m.extra = make(map[uint64]extra)
	}
	m.extra[nr] = extra{f, ring3}
	return nil
}

// Call implements hv.Hypercalls.
func (m *Monitor) Call(v *hv.VCPU, nr, a1, a2, a3 uint64) (uint64, bool) {
	cpl := v.CPL()
	switch nr {
	case hcall.Identify:
		return hcall.Magic, false
	case hcall.Exit:
		if cpl != 0 && m.Ring3&Ring3Exit == 0 {
			return hcall.Denied, false
		}
		if a1 > 255 {
			return hcall.Invalid, false
		}
		m.Status = int(a1)
		return 0, true
	case hcall.Secret:
		if cpl != 0 && m.Ring3&Ring3Secret == 0 {
			return hcall.Denied, false
		}
		if m.SecretPA == 0 {
			return hcall.Unknown, false
		}
		return m.SecretPA, false
	case hcall.SwapRead:
		if m.Engine == nil {
			return hcall.Unknown, false
		}
		return m.swapRead(v, cpl, a1, a2), false
	case hcall.SwapStatus:
		if m.Engine == nil {
			return hcall.Unknown, false
		}
		r := m.reads[m.Spaces.Of(v.VMCS.Read(vmx.GuestCR3))]
		if r == nil {
			return hcall.Invalid, false
		}
		return r.state, false
	}
	if x := m.extra[nr]; x.f != nil {
		if cpl != 0 && !x.ring3 {
			return hcall.Denied, false
		}
		return x.f(v, a1, a2, a3)
	}
	return hcall.Unknown, false
}

// Options CPL 3 may use in a swap read: faults taken in user mode, or
// none; BPFault only when granted. Option 0 (a fault in whatever ring the
// guest is in) and KernelFault are kernel-mode faults injected at whatever
// point the kernel happens to run (atomic context, SMAP): their safety on
// Linux is not shown, so no caller gets them; CPL 0 may use every other
// option.
const (
	ring3Options  = swapmem.UserFault | swapmem.NoFault | swapmem.WriteFault | swapmem.NoDups
	faultOptions  = swapmem.UserFault | swapmem.NoFault | swapmem.BPFault
	requestInPage = 4096 - hcall.SwapRequestSize
)

func (m *Monitor) now() time.Time {
	if m.Now != nil {
		return m.Now()
	}
	return time.Now()
}

// logf writes a line to Log, at most logBurst a second: a guest that asks
// for reads in a loop must not be able to fill tamahv's console.
func (m *Monitor) logf(format string, args ...any) {
	if m.Log == nil {
		return
	}
	now := m.now()
	if now.Sub(m.logSecond) >= time.Second {
		if m.suppressed > 0 {
			fmt.Fprintf(m.Log, "tamahv: %d swapmem log lines suppressed\n", m.suppressed)
		}
		m.logSecond, m.logLines, m.suppressed = now, 0, 0
	}
	if m.logLines >= logBurst {
		m.suppressed++
		return
	}
	m.logLines++
	fmt.Fprintf(m.Log, format, args...)
}
