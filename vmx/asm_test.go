package vmx

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestAssemblyFieldEncodings ties the VMCS field encodings the assembly
// uses (it cannot import Go constants) to the ones in fields.go.
func TestAssemblyFieldEncodings(t *testing.T) {
	fields := map[string]Field{"HOST_RSP": HostRSP, "HOST_RIP": HostRIP}
	define := regexp.MustCompile(`(?m)^#define\s+(HOST_\w+)\s+(0x[0-9a-fA-F]+)\s*$`)
	files, err := filepath.Glob("*.s")
	require.NoError(t, err)
	seen := map[string]bool{}
	for _, f := range files {
		src, err := os.ReadFile(f)
		require.NoError(t, err)
		for _, m := range define.FindAllStringSubmatch(string(src), -1) {
			want, ok := fields[m[1]]
			if !assert.True(t, ok, "%s defines %s, which this test does not know", f, m[1]) {
				continue
			}
			got, err := strconv.ParseUint(m[2], 0, 32)
			require.NoError(t, err)
			assert.Equal(t, uint64(want), got, "%s: %s", f, m[1])
			seen[m[1]] = true
		}
	}
	for name := range fields {
		assert.True(t, seen[name], "no assembly file defines %s", name)
	}
}
