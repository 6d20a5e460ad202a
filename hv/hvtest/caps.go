package hvtest

import "github.com/tamahv/tamahv/vmx"

// Skylake returns the VMX capabilities of Bochs's corei7_skylake_x, as the
// image read them from the processor's MSRs.
func Skylake() *vmx.Caps {
	return &vmx.Caps{
		FeatureControl: 5, Basic: 0xd810000000002b, Misc: 0x600401e0,
		Pin:       vmx.Allowed{Zero: 0x16, One: 0x7f},
		Proc:      vmx.Allowed{Zero: 0x04006172, One: 0xf7f9fffe},
		Proc2:     vmx.Allowed{Zero: 0, One: 0x02177fff},
		Exit:      vmx.Allowed{Zero: 0x00036dfb, One: 0x007fffff},
		Entry:     vmx.Allowed{Zero: 0x000011fb, One: 0x0000ffff},
		CR0Fixed0: 0x80000021, CR0Fixed1: 0xffffffff, CR4Fixed0: 0x2000, CR4Fixed1: 0x3727ff,
		EPTVPID: 0xf0106334141,
	}
}
