package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestSmapsRange(t *testing.T) {
	lo, hi, ok := smapsRange("7f0000200000-7f0000400000 rw-p 00000000 00:00 0 ")
	assert.True(t, ok)
	assert.Equal(t, uint64(0x7f0000200000), lo)
	assert.Equal(t, uint64(0x7f0000400000), hi)
	_, _, ok = smapsRange("AnonHugePages:      2048 kB")
	assert.False(t, ok)
}
