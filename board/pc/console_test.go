package pc

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConsolePort(t *testing.T) {
	for line, want := range map[string]uint16{
		"":                             COM1,
		"log.alive=10s":                COM1,
		"console=com2":                 COM2,
		"console=COM3 hc.ring3=secret": COM3,
		"console=com4":                 COM4,
		"console=0x3e8":                0x3e8,
		"console=com2 console=com1":    COM1,
		"console":                      COM1,
	} {
		p, err := ConsolePort(line)
		require.NoError(t, err, line)
		assert.Equal(t, want, p, line)
	}
	for _, bad := range []string{"console=", "console=com5", "console=0x3e9", "console=0x60", "console=1016", "console=0xfffa", "console=0x10000"} {
		p, err := ConsolePort(bad)
		assert.ErrorIs(t, err, ErrConsole, bad)
		assert.ErrorContains(t, err, "console=", bad)
		assert.Equal(t, uint16(COM1), p, "the default where the option is bad")
	}
}

func TestSerialName(t *testing.T) {
	assert.Equal(t, "ttyS0", SerialName(COM1))
	assert.Equal(t, "ttyS1", SerialName(COM2))
	assert.Equal(t, "ttyS3", SerialName(COM4))
	assert.Empty(t, SerialName(0x5000))
}
