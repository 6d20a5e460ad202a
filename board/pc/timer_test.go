package pc

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestTSCHz(t *testing.T) {
	// A 3 GHz TSC counts 30 000 000 ticks in 10 ms (11932 PIT ticks).
	hz, err := TSCHz(29_999_990, pitCalibCount)
	require.NoError(t, err)
	assert.InDelta(t, 3e9, float64(hz), 3e9*0.0005)
	_, err = TSCHz(1000, pitCalibCount)
	assert.ErrorIs(t, err, ErrCalibration)
	_, err = TSCHz(1e9, 0)
	assert.ErrorIs(t, err, ErrCalibration)
}

func TestCPUIDTSCHz(t *testing.T) {
	// A 24 MHz crystal and a TSC/crystal ratio of 100/1: 2.4 GHz.
	assert.Equal(t, uint64(2_400_000_000), CPUIDTSCHz(1, 100, 24_000_000))
	assert.Zero(t, CPUIDTSCHz(0, 100, 24_000_000))
	assert.Zero(t, CPUIDTSCHz(2, 100, 0))
}
