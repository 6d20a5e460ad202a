package vmx

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestNMIHandlerCountsAndReturns enters the NMI handler through an
// interrupt frame: it returns with IRETQ to the interrupted code with its
// flags, and TakeNMI reports the NMI once.
func TestNMIHandlerCountsAndReturns(t *testing.T) {
	assert.False(t, TakeNMI())
	const flags = 0x2 | 1<<0 | 1<<2 | 1<<6 | 1<<7 | 1<<11 // CF PF ZF SF OF
	assert.Equal(t, uint64(flags), simulateNMI(flags)&0xfff&^(1<<9|1<<8), "flags restored")
	simulateNMI(0x2)
	assert.True(t, TakeNMI())
	assert.False(t, TakeNMI(), "taken once")
	assert.NotZero(t, NMIHandler())
}

// TestUnblockNMIsKeepsTheStack: the IRETQ returns to the caller with the
// stack as it was, time after time (an unbalanced frame would crash long
// before the end), and counts no NMI.
func TestUnblockNMIsKeepsTheStack(t *testing.T) {
	TakeNMI()
	for i := 0; i < 100000; i++ {
		UnblockNMIs()
	}
	assert.False(t, TakeNMI())
}
