package install

import (
	"strings"
	"testing"
	"testing/fstest"

	"github.com/stretchr/testify/assert"
)

const skylakeCPU = `processor	: 0
vendor_id	: GenuineIntel
flags		: fpu vme de pse tsc msr pae mce cx8 apic vmx sse2
vmx flags	: vnmi preemption_timer invvpid ept_x_only ept_ad ept_1gb flexpriority tsc_offset vtpr mtf vapic ept vpid unrestricted_guest

processor	: 1
vendor_id	: GenuineIntel
flags		: fpu
`

const iomem = `00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000a0000-000bffff : PCI Bus 0000:00
00100000-0fffffff : System RAM
  01000000-01ffffff : Kernel code
10000000-bfffffff : System RAM
c0000000-febfffff : PCI Bus 0000:00
`

func outcomes(cs []Check) map[string]Outcome {
	m := map[string]Outcome{}
	for _, c := range cs {
		m[c.Name] = c.Outcome
	}
	return m
}

func TestPreflightOnAMachineThatCanRunTamahv(t *testing.T) {
	cs := Preflight(fstest.MapFS{
		"proc/cpuinfo":     {Data: []byte(skylakeCPU)},
		"proc/iomem":       {Data: []byte(iomem)},
		"sys/firmware/efi": {Mode: 0o755 | 1<<31},
		secureBootVar:      {Data: []byte{6, 0, 0, 0, 0}},
	})
	assert.Equal(t, map[string]Outcome{"VMX": Pass, "EPT": Pass, "unrestricted guest": Pass, "firmware": Pass,
		"Secure Boot": Pass, "region 0x10000000-0x18000000": Pass}, outcomes(cs))
	assert.False(t, Failed(cs))
	assert.Contains(t, cs[3].String(), "UEFI")
}

func TestPreflightRefusals(t *testing.T) {
	for name, tc := range map[string]struct {
		files fstest.MapFS
		check string
		want  Outcome
	}{
		"AMD":            {fstest.MapFS{"proc/cpuinfo": {Data: []byte("vendor_id : AuthenticAMD\nflags : svm\n")}}, "VMX", Fail},
		"VT-x off":       {fstest.MapFS{"proc/cpuinfo": {Data: []byte("vendor_id : GenuineIntel\nflags : fpu sse2\n")}}, "VMX", Fail},
		"no EPT":         {fstest.MapFS{"proc/cpuinfo": {Data: []byte("vendor_id : GenuineIntel\nflags : vmx\nvmx flags : vnmi vpid\n")}}, "EPT", Fail},
		"old kernel":     {fstest.MapFS{"proc/cpuinfo": {Data: []byte("vendor_id : GenuineIntel\nflags : vmx\n")}}, "unrestricted guest", Unknown},
		"Secure Boot on": {fstest.MapFS{"sys/firmware/efi": {Mode: 0o755 | 1<<31}, secureBootVar: {Data: []byte{6, 0, 0, 0, 1}}}, "Secure Boot", Fail},
		"region in a hole": {fstest.MapFS{"proc/iomem": {Data: []byte("00100000-13ffffff : System RAM\n14000000-14ffffff : Reserved\n15000000-bfffffff : System RAM\n")}},
			"region 0x10000000-0x18000000", Fail},
		"not root": {fstest.MapFS{"proc/iomem": {Data: []byte("00000000-00000000 : System RAM\n00000000-00000000 : Reserved\n")}}, "region 0x10000000-0x18000000", Unknown},
	} {
		cs := Preflight(tc.files)
		got, ok := outcomes(cs)[tc.check]
		if assert.True(t, ok, "%s: no %s check in %v", name, tc.check, cs) {
			assert.Equal(t, tc.want, got, name)
		}
		assert.Equal(t, tc.want == Fail, Failed(cs), name)
		for _, c := range cs {
			assert.True(t, strings.HasPrefix(c.String(), "preflight: "), c.String())
		}
	}
}
