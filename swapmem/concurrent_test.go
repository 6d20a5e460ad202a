package swapmem_test

import (
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/swapmem"
	"github.com/tamahv/tamahv/swapmem/swapmemtest"
)

type atomicClock struct{ t atomic.Int64 }

func (c *atomicClock) now() time.Duration { return time.Duration(c.t.Load()) }

// TestConcurrentVCPUs runs two vCPUs, a requester, a pager and a remover
// at once (run it with -race). Callbacks re-enter the engine.
//
// Nothing it asserts depends on how the goroutines interleave. An injected
// #PF reaches the guest before the pager or the clock moves again (guest
// runs between injection and delivery with the pager and the timer shut
// out), so the one-#PF-in-flight check sees only what the engine decided;
// and after the concurrent phase every page is brought in and the engine is
// driven until no transaction is left, so every accepted read is seen to end
// exactly once, with the right bytes.
//
// Each vCPU also has a process of its own that only it runs, with a read
// of a swapped-out page waiting before the goroutines start. A vCPU, and
// the pager and timer, keep going until both those reads are done: each
// vCPU has then injected a #PF while the others ran, however they
// interleaved (or they give up after 20 times their turns, and the test
// fails).
func TestConcurrentVCPUs(t *testing.T) {
	m := swapmemtest.NewMachine()
	var procs []*swapmemtest.Space
	for i := 0; i < 3; i++ {
		p := m.NewSpace()
		require.NoError(t, p.MapRange(userBase, 16*4096, swapmemtest.UserRW))
		require.NoError(t, p.Write(userBase, patternRange(uint64(i+1), userBase, 16*4096)))
		procs = append(procs, p)
	}
	clk := &atomicClock{}
	e := swapmem.New(m, swapmem.Config{Now: clk.now})

	const vcpus = 2
	var own [vcpus]struct {
		p    *swapmemtest.Space
		done atomic.Bool
		err  error
		data []byte
	}
	for c := range own {
		o := &own[c]
		o.p = m.NewSpace()
		require.NoError(t, o.p.MapSwapped(userBase, swapmemtest.UserRW, patternRange(uint64(10+c), userBase, 4096)))
		_, err := e.ReadData(swapmem.Request{CR3: o.p.CR3, VA: userBase, Len: 4096, Options: swapmem.UserFault, Deadline: time.Hour,
			Done: func(rd swapmem.Read) {
				o.err, o.data = rd.Err, append([]byte(nil), rd.Data...)
				o.done.Store(true)
			}})
		require.NoError(t, err)
	}
	ownDone := func() bool { return own[0].done.Load() && own[1].done.Load() }

	type req struct {
		tx      *swapmem.Transaction
		calls   atomic.Int32
		removed atomic.Bool
	}
	var (
		mu       sync.Mutex
		reqs     []*req
		guest    sync.RWMutex // vCPUs: injection to delivery; pager and timer: each step
		ok       atomic.Int64
		wg       sync.WaitGroup
		iters    = 3000
		reentred atomic.Int64
	)
	if testing.Short() {
		iters = 500
	}
	var read func(rng *rand.Rand, nested bool)
	read = func(rng *rand.Rand, nested bool) {
		pi := rng.Intn(len(procs))
		off := uint64(rng.Intn(16 * 4096))
		n := 1 + rng.Intn(16*4096-int(off))
		opts := []swapmem.Options{swapmem.UserFault, 0, swapmem.NoFault, swapmem.KernelFault}[rng.Intn(4)]
		r := &req{}
		va := userBase + off
		seed := uint64(pi + 1)
		rq := swapmem.Request{CR3: procs[pi].CR3, VA: va, Len: n, Options: opts,
			Done: func(rd swapmem.Read) {
				if r.calls.Add(1) > 1 || r.removed.Load() {
					t.Errorf("read at %#x+%d: Done called twice or after removal", va, n)
				}
				if rd.Err == nil && string(rd.Data) != string(patternRange(seed, va, uint64(n))) {
					t.Errorf("read at %#x+%d (%v): wrong data", va, n, opts)
				}
				ok.Add(1)
			}}
		if !nested && rng.Intn(4) == 0 {
			// PreInject re-enters: starts another read.
			rq.PreInject = func(uint64, uint64) bool {
				reentred.Add(1)
				read(rand.New(rand.NewSource(int64(reentred.Load()))), true)
				return true
			}
		}
		tx, err := e.ReadData(rq)
		if err != nil {
			t.Errorf("ReadData: %v", err)
			return
		}
		r.tx = tx
		if tx == nil && r.calls.Load() == 0 {
			return // NoDups found a live duplicate
		}
		mu.Lock()
		reqs = append(reqs, r)
		mu.Unlock()
	}

	for c := 0; c < vcpus; c++ {
		cpu := m.NewVCPU(c)
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			for i := 0; i < iters || !ownDone() && i < 20*iters; i++ {
				if i%2 == 0 {
					cpu.Switch(own[seed].p.CR3, 3)
				} else {
					cpu.Switch(procs[rng.Intn(len(procs))].CR3, []int{0, 3}[rng.Intn(2)])
				}
				guest.RLock()
				assert.NoError(t, e.InjectPendingPF(cpu))
				m.Deliver()
				guest.RUnlock()
			}
		}(int64(c))
	}
	wg.Add(3)
	go func() { // requester
		defer wg.Done()
		rng := rand.New(rand.NewSource(10))
		for i := 0; i < iters/3; i++ {
			read(rng, false)
		}
	}()
	go func() { // pager and timer
		defer wg.Done()
		rng := rand.New(rand.NewSource(11))
		for i := 0; i < iters || !ownDone() && i < 20*iters; i++ {
			p := procs[rng.Intn(len(procs))]
			va := userBase + uint64(rng.Intn(16))*4096
			guest.Lock()
			if rng.Intn(3) == 0 {
				_ = p.Touch(va, false)
			} else {
				_ = p.SwapOut(va)
			}
			if i%50 == 0 {
				clk.t.Add(int64(time.Second))
				e.ReinjectFailedPF()
			}
			guest.Unlock()
		}
	}()
	go func() { // remover
		defer wg.Done()
		rng := rand.New(rand.NewSource(12))
		for i := 0; i < iters/10; i++ {
			mu.Lock()
			var r *req
			if len(reqs) > 0 {
				r = reqs[rng.Intn(len(reqs))]
			}
			mu.Unlock()
			if r != nil && e.RemoveTransaction(r.tx) == nil {
				r.removed.Store(true)
			}
			time.Sleep(10 * time.Microsecond)
		}
	}()
	wg.Wait()

	// The concurrent injections happened: each vCPU's own read was
	// faulted in by that vCPU, while the others ran.
	injected := map[int]int{}
	for _, f := range m.Delivered() {
		injected[f.CPU]++
	}
	for c := range own {
		require.NoError(t, own[c].err, "vCPU %d's own read", c)
		assert.Equal(t, patternRange(uint64(10+c), userBase, 4096), own[c].data, "vCPU %d's own read", c)
		assert.Positive(t, injected[c], "#PFs injected by vCPU %d", c)
	}

	// Drain: every page comes in, and the engine runs until nothing is live.
	for _, p := range procs {
		for pg := uint64(0); pg < 16; pg++ {
			require.NoError(t, p.Touch(userBase+pg*4096, false))
		}
	}
	cpu := m.NewVCPU(2)
	for i := 0; e.Stats().Live > 0 && i < 1000; i++ {
		cpu.Switch(procs[i%len(procs)].CR3, []int{0, 3}[i%2])
		require.NoError(t, e.InjectPendingPF(cpu))
		m.Deliver()
		clk.t.Add(int64(time.Second))
		e.ReinjectFailedPF()
	}
	require.Zero(t, e.Stats().Live, "transactions left after every page came in")

	assert.Empty(t, m.Violations)
	var done, removed int
	for i, r := range reqs {
		switch {
		case r.removed.Load():
			removed++
			assert.Zero(t, r.calls.Load(), "read %d: Done after removal", i)
		default:
			done++
			assert.Equal(t, int32(1), r.calls.Load(), "read %d: Done calls", i)
		}
	}
	assert.Equal(t, int64(done), ok.Load())
	assert.Greater(t, done, 0)
	st := e.Stats()
	t.Logf("completed %d, re-entered %d, injected by vCPU %v, stats %+v", ok.Load(), reentred.Load(), injected, st)
	require.NoError(t, e.Close())
	assert.Zero(t, m.Watches())
}
