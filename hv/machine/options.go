package machine

import (
	"errors"
	"fmt"
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
}

// The command-line options ParseOptions reads.
const (
	SwapDeadlineOption = "swap.deadline"
	AliveOption        = "log.alive"
)

// The bounds of the options' durations.
const (
	MinSwapDeadline = 100 * time.Millisecond
	MaxSwapDeadline = 10 * time.Minute
	MinAlive        = time.Second
	MaxAlive        = time.Hour
)

// ErrOption is ParseOptions's error for an option it cannot read.
var ErrOption = errors.New("machine: bad option")

// ParseOptions reads swap.deadline=DURATION and log.alive=DURATION (Go
// durations such as 5s or 2m) from tamahv's command line; other words are
// left alone. A value that does not parse or lies outside its bounds is an
// error naming the option.
func ParseOptions(cmdline string) (Options, error) {
	var o Options
	for _, w := range strings.Fields(cmdline) {
		name, v, ok := strings.Cut(w, "=")
		if !ok {
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
