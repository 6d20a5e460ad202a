package vmx

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestNMIHandlerCountsAndReturns enters the NMI handler through an
// interrupt frame: it returns with IRETQ to the interrupted code with its
// flags, and TakeNMI reports each NMI once, as many as came.
func TestNMIHandlerCountsAndReturns(t *testing.T) {
	assert.Zero(t, TakeNMI())
	const flags = 0x2 | 1<<0 | 1<<2 | 1<<6 | 1<<7 | 1<<11 // CF PF ZF SF OF
	assert.Equal(t, uint64(flags), simulateNMI(flags)&0xfff&^(1<<9|1<<8), "flags restored")
	simulateNMI(0x2)
	assert.EqualValues(t, 2, TakeNMI(), "two NMIs, two counted")
	assert.Zero(t, TakeNMI(), "taken once")
	simulateNMI(0x2)
	assert.EqualValues(t, 1, TakeNMI())
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
	assert.Zero(t, TakeNMI())
}
