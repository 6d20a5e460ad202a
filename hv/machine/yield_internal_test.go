package machine

import (
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// pendingAP is an AP whose mailbox holds a posted exit or not.
type pendingAP struct {
	AP
	pending bool
}

func (p *pendingAP) Pending() bool { return p.pending }

// An AP's goroutine that found its exit while vCPU 0 held Serial waits for
// Serial: its exit is no longer posted, but not handled either. vCPU 0's
// entry yields until it is handled and the AP entered again; otherwise
// the AP would wait out vCPU 0's time in the guest (up to a
// preemption-timer period) for every such exit.
func TestYieldToAPsWaitsForAnExitBeingHandled(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	m := &Machine{}
	a := &apVCPU{ap: &pendingAP{}}
	m.aps = []*apVCPU{a}
	a.out.Store(true) // its Enter returned: the exit is its goroutine's
	m.serial.Lock()   // vCPU 0 prepares its entry
	handled := make(chan struct{})
	go func() {
		m.serial.Lock() // the AP's goroutine handles its exit
		a.out.Store(false)
		m.serial.Unlock()
		close(handled)
	}()
	m.yieldToAPs()
	assert.False(t, a.out.Load(), "vCPU 0 entered with the AP's exit unhandled")
	m.serial.Unlock()
	<-handled

	// A posted exit is waited for the same way.
	p := &pendingAP{pending: true}
	a.ap = p
	m.serial.Lock()
	go func() {
		m.serial.Lock()
		p.pending = false
		m.serial.Unlock()
	}()
	m.yieldToAPs()
	assert.False(t, p.pending, "vCPU 0 entered with the AP's exit posted")
	m.serial.Unlock()

	// A vCPU whose Run returned has nothing to handle; one whose
	// goroutine never comes holds vCPU 0 for maxYields yields at most.
	a.ap = &pendingAP{}
	a.out.Store(true)
	a.done.Store(true)
	assert.False(t, m.apsWaiting())
	a.done.Store(false)
	m.serial.Lock()
	m.yieldToAPs()
	m.serial.Unlock()
	assert.True(t, a.out.Load())
}

// An AP that exits again as soon as it enters (a CPUID loop) gets one
// exit handled per vCPU 0 entry: vCPU 0 and the APs take turns, and vCPU
// 0 is not held for a run of that AP's exits.
func TestYieldToAPsGivesEachAPOneTurn(t *testing.T) {
	m := &Machine{}
	p := &pendingAP{pending: true}
	a := &apVCPU{ap: p}
	m.aps = []*apVCPU{a}
	handled := 0
	// Each yield runs the AP's goroutine once: its exit handled, its
	// vCPU in the guest again, and at once its next exit posted.
	m.yield = func() {
		m.serial.Lock()
		if p.pending {
			handled++
			a.entries.Add(1)
		}
		m.serial.Unlock()
	}
	for entry := 1; entry <= 5; entry++ {
		m.serial.Lock()
		before := handled
		m.yieldToAPs()
		got := handled - before
		m.serial.Unlock()
		assert.Equal(t, 1, got, "entry %d: vCPU 0 waited for %d of the AP's exits", entry, got)
	}
}

// vCPU 0's tick work runs at least every tickPeriod while vCPU 0 keeps
// exiting: its preemption timer restarts at every entry, and with APs
// their kicks and local APIC writes make it exit more often than that, so
// the engine's deadlines and re-armed faults would otherwise wait.
func TestTickDueWithoutTimerExits(t *testing.T) {
	now := time.Unix(1000, 0)
	m := &Machine{clock: func() time.Time { return now }}
	assert.True(t, m.tickDue(), "the first entry")
	runs := 0
	for i := 0; i < 100; i++ { // an exit every millisecond for 100 ms
		now = now.Add(time.Millisecond)
		if m.tickDue() {
			runs++
		}
	}
	assert.Equal(t, 10, runs)
	// A timer exit's tick counts: the next is due a period later.
	m.lastTick = now
	now = now.Add(tickPeriod - time.Nanosecond)
	assert.False(t, m.tickDue())
	now = now.Add(time.Nanosecond)
	assert.True(t, m.tickDue())
}

// With the time-stamp counter, tickDue compares counts and never reads
// the clock on vCPU 0's entries.
func TestTickDueCountsTSCTicks(t *testing.T) {
	var now uint64 = 1 << 40
	m := &Machine{clock: func() time.Time {
		t.Error("the clock was read")
		return time.Time{}
	}, tsc: func() uint64 { return now }, tickTSC: 2_000_000}
	assert.True(t, m.tickDue(), "the first entry")
	runs := 0
	for i := 0; i < 100; i++ { // an exit every 200,000 ticks
		now += 200_000
		if m.tickDue() {
			runs++
		}
	}
	assert.Equal(t, 10, runs)
	m.ticked() // a timer exit's tick
	now += 2_000_000 - 1
	assert.False(t, m.tickDue())
	now++
	assert.True(t, m.tickDue())
}
