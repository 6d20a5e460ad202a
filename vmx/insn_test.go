package vmx

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/arch/x86/x86asm"
)

type encoding struct {
	name  string
	bytes []byte
	want  string // Intel syntax, from the header's comment
}

var defineRE = regexp.MustCompile(`^#define\s+(\w+)\s+((?:BYTE \$0x[0-9a-f]{2};?\s*)+)//\s*(.+)$`)

// encodings parses vmx_amd64.h: the bytes the assembly really uses.
func encodings(t *testing.T) []encoding {
	f, err := os.Open("vmx_amd64.h")
	require.NoError(t, err)
	defer f.Close()
	var out []encoding
	s := bufio.NewScanner(f)
	for s.Scan() {
		m := defineRE.FindStringSubmatch(s.Text())
		if m == nil {
			require.False(t, strings.HasPrefix(s.Text(), "#define"), "unparsed define: %s", s.Text())
			continue
		}
		var b []byte
		for _, f := range strings.Split(m[2], ";") {
			f = strings.TrimSpace(f)
			if f == "" {
				continue
			}
			v, err := strconv.ParseUint(strings.TrimPrefix(f, "BYTE $0x"), 16, 8)
			require.NoError(t, err)
			b = append(b, byte(v))
		}
		out = append(out, encoding{m[1], b, strings.TrimSpace(m[3])})
	}
	require.NoError(t, s.Err())
	return out
}

// TestEncodingsNamesEveryInstruction checks the header covers every VMX
// instruction the monitor needs, and that the assembly uses only it.
func TestEncodingsNamesEveryInstruction(t *testing.T) {
	var names []string
	for _, e := range encodings(t) {
		names = append(names, strings.Fields(e.want)[0])
	}
	assert.ElementsMatch(t, []string{"vmxon", "vmclear", "vmptrld", "vmread", "vmwrite", "vmlaunch",
		"vmresume", "vmxoff", "vmcall", "invept", "invvpid"}, names)
	var src string
	for _, f := range []string{"insn_amd64.s", "run_amd64.s"} {
		b, err := os.ReadFile(f)
		require.NoError(t, err)
		assert.NotContains(t, string(b), "BYTE $", "encode instructions in vmx_amd64.h only")
		src += string(b)
	}
	for _, e := range encodings(t) {
		assert.Contains(t, src, "\t"+e.name+"\n", "%s is not used", e.name)
	}
}

// TestEncodingsDecode decodes every encoding. x86asm (v0.33.0) has no VMX
// opcodes: it must at least not take the bytes for another instruction of
// the same length. GNU objdump then names the instruction and its operands.
func TestEncodingsDecode(t *testing.T) {
	encs := encodings(t)
	for _, e := range encs {
		inst, err := x86asm.Decode(e.bytes, 64)
		if err == nil && inst.Op != 0 {
			assert.NotEqual(t, len(e.bytes), inst.Len, "%s decodes as %v", e.name, x86asm.IntelSyntax(inst, 0, nil))
		}
	}
	objdump, err := exec.LookPath("objdump")
	if err != nil {
		t.Skip("objdump (Debian package binutils) is missing: VMX mnemonics not checked")
	}
	for _, e := range encs {
		bin := filepath.Join(t.TempDir(), "insn.bin")
		// A NOP after the instruction shows it was decoded whole.
		require.NoError(t, os.WriteFile(bin, append(append([]byte(nil), e.bytes...), 0x90), 0o644))
		out, err := exec.Command(objdump, "-D", "-b", "binary", "-m", "i386:x86-64", "-M", "intel", bin).CombinedOutput()
		require.NoError(t, err, "%s", out)
		got := disasm(string(out))
		require.Len(t, got, 2, "%s: %q", e.name, out)
		assert.Equal(t, norm(e.want), norm(got[0]), e.name)
		assert.Equal(t, "nop", got[1], e.name)
	}
}

var insnLine = regexp.MustCompile(`^\s*[0-9a-f]+:\s+(?:[0-9a-f]{2} )+\s*(.+)$`)

func disasm(out string) []string {
	var insns []string
	for _, l := range strings.Split(out, "\n") {
		if m := insnLine.FindStringSubmatch(l); m != nil {
			insns = append(insns, strings.TrimSpace(m[1]))
		}
	}
	return insns
}

func norm(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, ", ", ",")), " ")
}

func TestCheckRFLAGS(t *testing.T) {
	assert.NoError(t, check("VMXON", 0x2, nil))
	var ie *InsnError
	require.ErrorAs(t, check("VMPTRLD", 0x3, nil), &ie)
	assert.False(t, ie.Valid)
	assert.EqualError(t, ie, "vmx: VMPTRLD: VMfailInvalid")
	err := check("VMLAUNCH", 0x42, func() uint64 { return 7 })
	require.ErrorAs(t, err, &ie)
	assert.True(t, ie.Valid)
	assert.EqualError(t, err, "vmx: VMLAUNCH: VMfailValid, error 7 (VM entry with invalid control fields)")
	assert.Equal(t, "unknown", InsnErrorName(14))
	assert.Equal(t, "unknown", InsnErrorName(1000))
}
