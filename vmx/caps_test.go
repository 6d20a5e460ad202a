package vmx

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// model replays the CPUID and MSR values of a CPU model. Reading an MSR the
// model does not have fails the test, as it would #GP on the processor.
type model struct {
	t     *testing.T
	ecx1  uint32
	msrs  map[uint32]uint64
	reads []uint32
	cr0   uint64
	cr4   uint64
}

func (m *model) CPUID(leaf, _ uint32) (uint32, uint32, uint32, uint32) {
	if leaf == 1 {
		return 0x50654, 0, m.ecx1, 0
	}
	return 0, 0, 0, 0
}

func (m *model) ReadMSR(msr uint32) uint64 {
	v, ok := m.msrs[msr]
	if !ok {
		m.t.Errorf("RDMSR %#x: not on this model (#GP)", msr)
	}
	m.reads = append(m.reads, msr)
	return v
}

func (m *model) WriteMSR(msr uint32, v uint64) {
	if msr != MSRFeatureControl || m.msrs[msr]&FeatureControlLock != 0 {
		m.t.Errorf("WRMSR %#x=%#x: #GP", msr, v)
		return
	}
	m.msrs[msr] = v
}
func (m *model) CR0() uint64     { return m.cr0 }
func (m *model) SetCR0(v uint64) { m.cr0 = v }
func (m *model) CR4() uint64     { return m.cr4 }
func (m *model) SetCR4(v uint64) { m.cr4 = v }

func split(zero, one uint32) uint64 { return uint64(one)<<32 | uint64(zero) }

// bochsModel holds the values Debian's Bochs 2.7 reports for its VMX CPU
// models, as tamahv printed them there (make e2e-models).
func bochsModel(t *testing.T, name string) *model {
	type caps struct {
		basic, proc2One, exitOne, entryOne, cr4Fixed1, misc, ept uint64
		procOne                                                  uint32
	}
	c := map[string]caps{
		"corei7_skylake_x": {0xd810000000002b, 0x02177fff, 0x007fffff, 0x0000ffff, 0x3727ff, 0x600401e0, 0xf0106334141, 0xf7f9fffe},
		"broadwell_ult":    {0xd810000000002b, 0x00057fff, 0x007fffff, 0x0000ffff, 0x3727ff, 0x200401e0, 0xf0106334141, 0xf7f9fffe},
		"corei7_icelake_u": {0xd8100000000004, 0x02977fff, 0x007fffff, 0x0000ffff, 0x772fff, 0x600401e0, 0xf0106334141, 0xfff9fffe},
		"tigerlake":        {0x1d8100000000004, 0x02977fff, 0x107fffff, 0x0010ffff, 0xf72fff, 0x600401e0, 0xf0106b34141, 0xfff9fffe},
	}[name]
	require.NotZero(t, c.basic, name)
	return &model{t: t, ecx1: 0x77faf3bf, cr0: 0x80000011, cr4: 0x6a0, msrs: map[uint32]uint64{
		MSRFeatureControl:    0x5,
		MSRVMXBasic:          c.basic,
		MSRMisc:              c.misc,
		MSRTruePinbasedCtls:  split(0x16, 0x7f),
		MSRTrueProcbasedCtls: split(0x04006172, c.procOne),
		MSRTrueExitCtls:      split(0x00036dfb, uint32(c.exitOne)),
		MSRTrueEntryCtls:     split(0x000011fb, uint32(c.entryOne)),
		MSRCR0Fixed0:         0x80000021,
		MSRCR0Fixed1:         0xffffffff,
		MSRCR4Fixed0:         0x2000,
		MSRCR4Fixed1:         c.cr4Fixed1,
		MSRProcbasedCtls2:    split(0, uint32(c.proc2One)),
		MSREPTVPIDCap:        c.ept,
	}}
}

func TestDiscoverBochsModels(t *testing.T) {
	for _, name := range []string{"corei7_skylake_x", "broadwell_ult", "corei7_icelake_u", "tigerlake"} {
		t.Run(name, func(t *testing.T) {
			m := bochsModel(t, name)
			c, err := Discover(m)
			require.NoError(t, err)
			assert.True(t, c.TrueControls())
			assert.Equal(t, 4096, c.RegionSize())
			assert.True(t, c.WriteBackVMCS())
			assert.True(t, c.EPT())
			assert.True(t, c.VPID())
			assert.True(t, c.UnrestrictedGuest())
			assert.True(t, c.EPTVPID.Has(EPTExecuteOnly|EPT2MPages|EPT1GPages|EPTInveptSingle|EPTInveptAll))
			assert.True(t, c.EPTVPID.Has(VPIDInvvpid|VPIDInvvpidSingle|VPIDInvvpidAll))
			assert.Equal(t, uint(0), c.PreemptionTimerShift())
			assert.NotContains(t, m.reads, uint32(MSRPinbasedCtls), "true controls are read instead")
			// The primary controls a monitor needs can be set.
			const hlt, useMSRBitmap, useIOBitmap = 1 << 7, 1 << 28, 1 << 25
			proc, err := c.Proc.Adjust(ProcActivateSecondary | useMSRBitmap | useIOBitmap | hlt)
			require.NoError(t, err)
			assert.Equal(t, uint32(0x04006172|ProcActivateSecondary|useMSRBitmap|useIOBitmap|hlt), proc)
			var report strings.Builder
			c.Report(&report)
			assert.Contains(t, report.String(), fmt.Sprintf("IA32_VMX_BASIC %#x: revision %#x", m.msrs[MSRVMXBasic], c.Revision()))
			assert.Equal(t, fmt.Sprintf("revision %#x, EPT yes, VPID yes, unrestricted guest yes", c.Revision()), c.Summary())
		})
	}
}

func TestDiscoverRefusals(t *testing.T) {
	m := bochsModel(t, "corei7_skylake_x")
	m.ecx1 &^= CPUIDVMX
	_, err := Discover(m)
	assert.ErrorIs(t, err, ErrNoVMX)
	assert.Empty(t, m.reads, "no MSR read without VMX")

	m = bochsModel(t, "corei7_skylake_x")
	m.msrs[MSRFeatureControl] = FeatureControlLock
	_, err = Discover(m)
	assert.ErrorIs(t, err, ErrLockedOff)
	assert.ErrorContains(t, err, "IA32_FEATURE_CONTROL=0x1")
}

func TestDiscoverWithoutSecondaryOrTrueControls(t *testing.T) {
	m := bochsModel(t, "corei7_skylake_x")
	m.msrs[MSRVMXBasic] &^= 1 << 55
	m.msrs[MSRPinbasedCtls] = split(0x16, 0x7f)
	m.msrs[MSRProcbasedCtls] = split(0x0401e172, 0x7ff9fffe) // no secondary controls
	m.msrs[MSRExitCtls] = split(0x00036dff, 0x007fffff)
	m.msrs[MSREntryCtls] = split(0x000011ff, 0x0000ffff)
	delete(m.msrs, MSRProcbasedCtls2)
	delete(m.msrs, MSREPTVPIDCap)
	c, err := Discover(m)
	require.NoError(t, err)
	assert.False(t, c.EPT())
	assert.False(t, c.UnrestrictedGuest())
	assert.Equal(t, "revision 0x2b, EPT no, VPID no, unrestricted guest no", c.Summary())
	_, err = c.Proc.Adjust(ProcActivateSecondary)
	assert.ErrorContains(t, err, "controls 0x80000000 not supported")
}

func TestFixedBits(t *testing.T) {
	c, err := Discover(bochsModel(t, "tigerlake"))
	require.NoError(t, err)
	assert.Equal(t, uint64(0x80000031), c.FixCR0(0x80000011, false), "NE forced on")
	assert.Equal(t, uint64(0x20), c.FixCR0(0, true), "PE and PG may be clear for an unrestricted guest")
	assert.Equal(t, uint64(0x26a0), c.FixCR4(0x6a0))
	assert.Equal(t, uint64(0x2000), c.FixCR4(1<<31), "bits fixed to 0 are cleared")
}

func TestPrepare(t *testing.T) {
	m := bochsModel(t, "corei7_skylake_x")
	m.msrs[MSRFeatureControl] = 0 // firmware left it unlocked
	c, err := Discover(m)
	require.NoError(t, err)
	region := make([]byte, 4096)
	for i := range region {
		region[i] = 0xee
	}
	require.NoError(t, Prepare(m, c, region))
	assert.Equal(t, uint64(FeatureControlLock|FeatureControlVMXOutsideS), m.msrs[MSRFeatureControl], "set and locked")
	assert.Equal(t, []byte{0x2b, 0, 0, 0, 0, 0, 0, 0}, region[:8])
	assert.Equal(t, byte(0), region[4095])
	assert.NotZero(t, m.cr0&CR0NE)
	assert.NotZero(t, m.cr4&CR4VMXE)

	assert.ErrorContains(t, Prepare(m, c, make([]byte, 100)), "VMXON region of 100 bytes")
	m.msrs[MSRFeatureControl] = FeatureControlLock
	assert.ErrorIs(t, Prepare(m, c, region), ErrLockedOff)

	// A VMCS region is prepared the same way, without touching the
	// processor's state.
	vmcs := make([]byte, 4096)
	vmcs[100] = 0xee
	require.NoError(t, PrepareRegion(c, vmcs))
	assert.Equal(t, []byte{0x2b, 0, 0, 0, 0, 0, 0, 0}, vmcs[:8])
	assert.Zero(t, vmcs[100])
	assert.Error(t, PrepareRegion(c, make([]byte, 8)))
}
