package pc

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestAssemblyLayoutMatchesGo(t *testing.T) {
	f, err := os.Open("layout_amd64.h")
	require.NoError(t, err)
	defer f.Close()
	defs := map[string]uint64{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		fs := strings.Fields(s.Text())
		if len(fs) == 3 && fs[0] == "#define" {
			v, err := strconv.ParseUint(fs[2], 0, 64)
			require.NoError(t, err, s.Text())
			defs[fs[1]] = v
		}
	}
	for name, want := range map[string]uint64{
		"RAM_START": RAMStart, "RAM_SIZE": RAMSize, "STACK_OFFSET": StackOffset, "RESERVED": Reserved,
		"EARLY_PML4": EarlyPML4, "EARLY_PDPT": EarlyPDPT, "EARLY_PD": EarlyPD, "GDT_BASE": GDT,
		"GDTR_BASE": GDTR, "TSS_BASE": TSS, "SEL_CODE": SelectorCode, "SEL_DATA": SelectorData, "SEL_TSS": SelectorTSS,
	} {
		assert.Equal(t, want, defs[name], name)
	}
	// The early structures fit below Scratch, in the reserved area.
	assert.LessOrEqual(t, uint64(EarlyPD+4*0x1000), uint64(GDT))
	assert.LessOrEqual(t, uint64(TSS+TSSLimit+1), uint64(Scratch))
	assert.Less(t, uint64(RAMEnd-StackOffset+0x1000), uint64(Reserved), "clear of the stack's start")
	assert.Zero(t, Reserved%0x1000)
}
