package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// allowed returns the processors this process may run on, and restores
// that set for every thread when the test ends.
func allowed(t *testing.T) []int {
	t.Helper()
	var m cpuMask
	_, _, e := syscall.RawSyscall(syscall.SYS_SCHED_GETAFFINITY, 0, unsafe.Sizeof(m), uintptr(unsafe.Pointer(&m)))
	require.Zero(t, e)
	var cpus []int
	for c := 0; c < maxCPUs; c++ {
		if m[c/64]&(1<<(c%64)) != 0 {
			cpus = append(cpus, c)
		}
	}
	t.Cleanup(func() {
		for _, tid := range threads(t) {
			syscall.RawSyscall(syscall.SYS_SCHED_SETAFFINITY, uintptr(tid), unsafe.Sizeof(m), uintptr(unsafe.Pointer(&m)))
		}
	})
	return cpus
}

func threads(t *testing.T) []int {
	t.Helper()
	d, err := os.Open("/proc/self/task")
	require.NoError(t, err)
	defer d.Close()
	names, err := d.Readdirnames(-1)
	require.NoError(t, err)
	var tids []int
	for _, n := range names {
		tid, err := strconv.Atoi(n)
		require.NoError(t, err)
		tids = append(tids, tid)
	}
	return tids
}

// cpusAllowed returns a thread's Cpus_allowed_list, or "" if it ended.
func cpusAllowed(tid int) string {
	b, err := os.ReadFile("/proc/self/task/" + strconv.Itoa(tid) + "/status")
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// TestPinProcess moves the whole process to each processor it may use in
// turn: the caller runs there once pinProcess returns, and every thread
// is allowed that processor only.
func TestPinProcess(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for _, c := range allowed(t) {
		require.NoError(t, pinProcess(c))
		now, err := currentCPU()
		require.NoError(t, err)
		assert.Equal(t, c, now)
		for _, tid := range threads(t) {
			if l := cpusAllowed(tid); l != "" {
				assert.Equal(t, strconv.Itoa(c), l, "thread %d", tid)
			}
		}
	}
}

// TestPinProcessAbsentCPU asks for a processor the machine does not have:
// an error, at once (as for an offline processor), not a wait.
func TestPinProcessAbsentCPU(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cpus := allowed(t)
	require.NotEmpty(t, cpus)
	assert.Error(t, pinProcess(maxCPUs-1))
	// The process is left where it was allowed to run.
	now, err := currentCPU()
	require.NoError(t, err)
	assert.Contains(t, cpus, now)
}

func TestSwapMigrateArgs(t *testing.T) {
	for _, args := range [][]string{
		nil, {"user", "0"}, {"nofault", "0", "1"}, {"user", "x", "1"}, {"user", "0", "-1"},
		{"bp", "0", "1024"}, {"user", "0", "1", "0"}, {"user", "0", "1", "many"},
	} {
		assert.Error(t, swapMigrate(args), "%q", args)
	}
}

// A read that ended before its process moved is made again with
// migrateGrowth times the pages, at most migrateTries runs in all and
// below swapmem.MaxLen; any other outcome is final.
func TestRetryMigrate(t *testing.T) {
	var runs []int
	early := func(ok int) func(int) error {
		return func(pages int) error {
			runs = append(runs, pages)
			if len(runs) == ok {
				return nil
			}
			return fmt.Errorf("%w (status 2)", errEndedEarly)
		}
	}
	assert.NoError(t, retryMigrate(16, early(2)))
	assert.Equal(t, []int{16, 64}, runs)

	runs = nil
	assert.ErrorIs(t, retryMigrate(16, early(0)), errEndedEarly)
	assert.Equal(t, []int{16, 64, 256}, runs)

	runs = nil
	assert.ErrorIs(t, retryMigrate(256, early(0)), errEndedEarly)
	assert.Equal(t, []int{256, 1024}, runs, "4096 pages would pass swapmem.MaxLen")

	runs = nil
	other := errors.New("answered on CPU 0, want 1")
	assert.Equal(t, other, retryMigrate(64, func(pages int) error { runs = append(runs, pages); return other }))
	assert.Equal(t, []int{64}, runs)
}
