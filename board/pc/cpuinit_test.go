package pc

import (
	"os"
	"regexp"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestCPUInitClearsOSXSAVE: the Go runtime probes AVX (internal/cpu) after
// cpuinit; with CR4.OSXSAVE clear it finds none, so no Go code in tamahv
// runs VEX instructions, whose #UD would follow the XCR0 the guest chose.
func TestCPUInitClearsOSXSAVE(t *testing.T) {
	b, err := os.ReadFile("cpuinit_amd64.s")
	require.NoError(t, err)
	re := regexp.MustCompile(`MOVL\tCR4, AX\n(?:\t[^\n]*\n)*?\tANDL\t\$~\(1<<18\), AX\n(?:\t[^\n]*\n)*?\tMOVL\tAX, CR4\n`)
	assert.Regexp(t, re, string(b))
}
