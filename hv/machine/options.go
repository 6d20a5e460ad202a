package machine

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Options are the settings of tamahv's own command line (Config.Options)
// that the machine takes; the default policy reads its own (hc.ring3=).
type Options struct {
	// SwapDeadline is the life of a swap read that sets none
	// (swap.deadline=DURATION; 0: swapmem.DefaultDeadline).
	SwapDeadline time.Duration
	// Alive is how often, in tamahv's time, vCPU 0 writes a line with the
	// guest's exits while their count grows (log.alive=DURATION; 0:
	// never): whoever watches the console sees that the guest runs while
	// it says nothing itself.
	Alive time.Duration
	// KickCheck makes every KickCheck-th VM entry of each application
	// processor's vCPU start with a kick already sent (smp.kickcheck=N;
	// 0: never): the processor's NMI arrives before its entry, which it
	// must cut short, or in the guest, where it must be taken for the
	// kick it is and never reach the guest. It proves, on the machine it
	// runs on, the path a shootdown's kick takes when it races the entry.
	KickCheck uint64
	// TrapINIT is apic.trapinit=auto|on|off: whether the guest's writes
	// to its local APIC are trapped so that tamahv sees its INIT IPIs
	// before they reach a processor (TrapINITMode.Decide).
	TrapINIT TrapINITMode
	// Native is fallback=native (fallback=halt: false, the default):
	// where tamahv cannot run the guest (no VMX, or a check before the
	// guest's start fails), it boots the same kernel natively, with the
	// boot parameters the guest would have had, so that the machine still
	// boots; else it halts.
	Native bool
}

// TrapINITMode is apic.trapinit=: where the guest's INIT IPIs are caught.
// Where INIT and start-up IPIs reach a processor in VMX non-root operation
// as VM exits (SDM Vol. 3C, "Other Causes of VM Exits"; every processor
// with VMX, KVM's nested VMX, Bochs from 2.8 on) the local APIC is passed
// through: the guest's EOIs and IPIs cause no exit. Bochs 2.7 keeps an
// INIT pending after its VM exit, so that every later entry of that
// processor exits with INIT again: there tamahv traps the guest's writes
// to its local APIC instead and applies the INITs to application
// processors' vCPUs itself, so that no INIT ever reaches them.
type TrapINITMode uint8

// The values of apic.trapinit=.
const (
	// TrapINITAuto traps where the machine is Bochs itself (Decide).
	TrapINITAuto TrapINITMode = iota
	// TrapINITOn always traps.
	TrapINITOn
	// TrapINITOff never traps: the local APIC is passed through.
	TrapINITOff
)

// String returns the option's value: auto, on or off.
func (t TrapINITMode) String() string {
	switch t {
	case TrapINITAuto:
		return "auto"
	case TrapINITOn:
		return "on"
	case TrapINITOff:
		return "off"
	}
	return fmt.Sprintf("TrapINITMode(%d)", uint8(t))
}

// BochsOEMID is the OEM ID of the ACPI tables Bochs's BIOS builds (QEMU's
// tables, which KVM guests get, reuse it).
const BochsOEMID = "BOCHS "

// Decide reports whether the guest's local APIC writes are trapped: on
// and off decide alone; auto traps where the firmware's ACPI tables have
// the OEM ID BochsOEMID and the processor says that no hypervisor runs it
// (CPUID.1:ECX bit 31 clear, hypervisor false), which is Bochs itself:
// QEMU, with KVM or not, reuses the OEM ID but sets the hypervisor bit.
// oemID is the 6-byte OEM ID of the tables found, "" where there are
// none.
func (t TrapINITMode) Decide(oemID string, hypervisor bool) bool {
	switch t {
	case TrapINITOn:
		return true
	case TrapINITOff:
		return false
	}
	return oemID == BochsOEMID && !hypervisor
}

// The command-line options ParseOptions reads.
const (
	SwapDeadlineOption = "swap.deadline"
	AliveOption        = "log.alive"
	KickCheckOption    = "smp.kickcheck"
	TrapINITOption     = "apic.trapinit"
	FallbackOption     = "fallback"
)

// The bounds of the options' durations.
const (
	MinSwapDeadline = 100 * time.Millisecond
	MaxSwapDeadline = 10 * time.Minute
	MinAlive        = time.Second
	MaxAlive        = time.Hour
	MaxKickCheck    = 1_000_000
)

// ErrOption is ParseOptions's error for an option it cannot read.
var ErrOption = errors.New("machine: bad option")

// ParseOptions reads swap.deadline=DURATION and log.alive=DURATION (Go
// durations such as 5s or 2m), smp.kickcheck=N (1 to MaxKickCheck),
// apic.trapinit=auto|on|off and fallback=native|halt from tamahv's command
// line; other words are left alone. A value that does not parse or lies
// outside its bounds is an error naming the option.
func ParseOptions(cmdline string) (Options, error) {
	var o Options
	for _, w := range strings.Fields(cmdline) {
		name, v, ok := strings.Cut(w, "=")
		if !ok {
			continue
		}
		if name == TrapINITOption {
			m, err := parseTrapINIT(v)
			if err != nil {
				return o, fmt.Errorf("%w: %s=%q: %v", ErrOption, name, v, err)
			}
			o.TrapINIT = m
			continue
		}
		if name == FallbackOption {
			native, ok := parseFallback(v)
			if !ok {
				return o, fmt.Errorf("%w: %s=%q: not native or halt", ErrOption, name, v)
			}
			o.Native = native
			continue
		}
		if name == KickCheckOption {
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil || n < 1 || n > MaxKickCheck {
				return o, fmt.Errorf("%w: %s=%q: not a count from 1 to %d", ErrOption, name, v, MaxKickCheck)
			}
			o.KickCheck = n
			continue
		}
		var dst *time.Duration
		var lo, hi time.Duration
		switch name {
		case SwapDeadlineOption:
			dst, lo, hi = &o.SwapDeadline, MinSwapDeadline, MaxSwapDeadline
		case AliveOption:
			dst, lo, hi = &o.Alive, MinAlive, MaxAlive
		default:
			continue
		}
		d, err := time.ParseDuration(v)
		if err != nil {
			return o, fmt.Errorf("%w: %s=%q: not a duration (such as 5s)", ErrOption, name, v)
		}
		if d < lo || d > hi {
			return o, fmt.Errorf("%w: %s=%v: outside %v to %v", ErrOption, name, d, lo, hi)
		}
		*dst = d
	}
	return o, nil
}

// parseTrapINIT reads apic.trapinit='s value.
func parseTrapINIT(v string) (TrapINITMode, error) {
	for _, m := range []TrapINITMode{TrapINITAuto, TrapINITOn, TrapINITOff} {
		if v == m.String() {
			return m, nil
		}
	}
	return 0, errors.New("not auto, on or off")
}

func parseFallback(v string) (native, ok bool) {
	switch v {
	case "native":
		return true, true
	case "halt":
		return false, true
	}
	return false, false
}

// NativeFallback reads fallback=native|halt alone from tamahv's command
// line (the last valid one counts; halt where there is none), whatever
// else the line holds: a machine told to boot its kernel natively where
// tamahv cannot run it still does so where another option is wrong.
func NativeFallback(cmdline string) bool {
	native := false
	for _, w := range strings.Fields(cmdline) {
		if name, v, ok := strings.Cut(w, "="); ok && name == FallbackOption {
			if n, ok := parseFallback(v); ok {
				native = n
			}
		}
	}
	return native
}
