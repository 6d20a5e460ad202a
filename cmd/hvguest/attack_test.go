package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// unmaskedSpin must run its CPUIDs and spin, then leave the process's
// floating-point state as it found it: an inexact division afterwards
// must not trap.
func TestUnmaskedSpinRestoresTheFloatState(t *testing.T) {
	assert.Equal(t, uint64(10), unmaskedSpin(0, 0x340, 10, 1000))
	one, three := 1.0, 3.0
	for i := 0; i < 3; i++ {
		one /= three
	}
	assert.InDelta(t, 1.0/27, one, 1e-12)
}

func TestErrNames(t *testing.T) {
	assert.Equal(t, "-13 EACCES", errName(errDenied))
	assert.Equal(t, "-22 EINVAL", errName(errInvalid))
	assert.Equal(t, "-16 EBUSY", errName(errBusy))
	assert.Equal(t, "failed", statusName(3))
}
