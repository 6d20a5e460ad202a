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
}

// The command-line options ParseOptions reads.
const (
	SwapDeadlineOption = "swap.deadline"
	AliveOption        = "log.alive"
	KickCheckOption    = "smp.kickcheck"
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
// durations such as 5s or 2m) and smp.kickcheck=N (1 to MaxKickCheck) from
// tamahv's command line; other words are left alone. A value that does not
// parse or lies outside its bounds is an error naming the option.
func ParseOptions(cmdline string) (Options, error) {
	var o Options
	for _, w := range strings.Fields(cmdline) {
		name, v, ok := strings.Cut(w, "=")
		if !ok {
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
