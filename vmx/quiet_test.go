package vmx

import (
	"os"
	"regexp"
	"strconv"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestQuietCPUIDNumbers ties the numbers quiet_amd64.h defines to vmx's
// own, and checks that a QuietCPUID fits a page (an application
// processor's table page holds one).
func TestQuietCPUIDNumbers(t *testing.T) {
	src, err := os.ReadFile("quiet_amd64.h")
	require.NoError(t, err)
	want := map[string]uint64{
		"Q_EXIT_REASON": uint64(ExitReasonField), "Q_GUEST_RFLAGS": uint64(GuestRFLAGS),
		"Q_GUEST_CR4": uint64(GuestCR4), "Q_GUEST_RIP": uint64(GuestRIP),
		"Q_INSN_LEN": uint64(ExitInstructionLen), "Q_INTERRUPTIBILITY": uint64(GuestInterruptibility),
		"Q_EXIT_CPUID": uint64(ExitCPUID), "Q_RFLAGS_TF": RFLAGSTF,
		"Q_BLOCKING_STI_MOVSS": uint64(BlockingSTI | BlockingMovSS),
	}
	define := regexp.MustCompile(`(?m)^#define\s+(Q_\w+)\s+(\S+)\s*$`)
	seen := 0
	for _, m := range define.FindAllStringSubmatch(string(src), -1) {
		w, ok := want[m[1]]
		if !assert.True(t, ok, "quiet_amd64.h defines %s, which this test does not know", m[1]) {
			continue
		}
		got, err := strconv.ParseUint(m[2], 0, 64)
		require.NoError(t, err, m[1])
		assert.Equal(t, w, got, m[1])
		seen++
	}
	assert.Equal(t, len(want), seen)
	assert.LessOrEqual(t, unsafe.Sizeof(QuietCPUID{}), uintptr(4096))
	var n atomic.Uint32
	n.Store(0x5a5a)
	assert.EqualValues(t, 0x5a5a, *(*uint32)(unsafe.Pointer(&n)), "the stub reads the NMI count at nmis+0")
}
