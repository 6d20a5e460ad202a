package machine

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestKicksMatchOneToOne: each NMI consumes one outstanding kick, never
// more, across the counters' wrap; NMIs beyond the kicks are the guest's;
// after NMIs from VMX root are matched, kicks beyond the limit are
// forgotten, those within it stay for NMIs still to come.
func TestKicksMatchOneToOne(t *testing.T) {
	var k kicks
	k.sent.Store(math.MaxUint32 - 1)
	k.matched = math.MaxUint32 - 1
	k.sent.Add(3) // wraps
	assert.Zero(t, k.match(2), "two kicks for two NMIs")
	assert.EqualValues(t, 1, k.match(2), "one kick left for two NMIs")
	assert.EqualValues(t, 1, k.match(1), "no kick left")

	k = kicks{limit: 2}
	k.sent.Add(6)
	assert.False(t, k.fromRoot(1), "a kick's NMI")
	assert.EqualValues(t, 2, k.sent.Load()-k.matched, "five outstanding, two kept")
	assert.True(t, k.hold(2))
	assert.False(t, k.hold(0))
	assert.True(t, k.fromRoot(1), "two kicks for the three NMIs held and counted")
	assert.Zero(t, k.held)
	assert.Zero(t, k.sent.Load()-k.matched)

	k = kicks{}
	k.sent.Add(6)
	assert.False(t, k.fromRoot(1))
	assert.EqualValues(t, 5, k.sent.Load()-k.matched, "no limit: every kick stays")
}
