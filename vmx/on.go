package vmx

import (
	"encoding/binary"
	"fmt"
)

// Machine is the processor state that entering VMX operation changes.
type Machine interface {
	Hardware
	WriteMSR(msr uint32, v uint64)
	CR0() uint64
	SetCR0(v uint64)
	CR4() uint64
	SetCR4(v uint64)
}

// Prepare readies the processor and a VMXON region for VMXON (SDM Vol. 3C,
// "Enabling and Entering VMX Operation"): it sets and locks
// IA32_FEATURE_CONTROL if firmware left it unlocked, applies the CR0 and CR4
// fixed bits (CR0.NE, CR4.VMXE among them) and writes the revision
// identifier at the start of region, which must be at least
// c.RegionSize() bytes. The caller then executes VMXON with the region's
// physical address, which must be 4 KiB aligned.
func Prepare(m Machine, c *Caps, region []byte) error {
	if n := c.RegionSize(); len(region) < n || n < 8 {
		return fmt.Errorf("vmx: VMXON region of %d bytes, the CPU wants %d", len(region), n)
	}
	fc := m.ReadMSR(MSRFeatureControl)
	if fc&FeatureControlLock == 0 {
		m.WriteMSR(MSRFeatureControl, fc|FeatureControlLock|FeatureControlVMXOutsideS)
		fc = m.ReadMSR(MSRFeatureControl)
	}
	if fc&FeatureControlVMXOutsideS == 0 {
		return fmt.Errorf("vmx: %w (IA32_FEATURE_CONTROL=%#x)", ErrLockedOff, fc)
	}
	c.FeatureControl = fc
	m.SetCR0(c.FixCR0(m.CR0(), false))
	m.SetCR4(c.FixCR4(m.CR4() | CR4VMXE))
	return PrepareRegion(c, region)
}

// PrepareRegion zeroes a VMXON region or VMCS (region, of at least
// c.RegionSize() bytes) and writes the processor's revision identifier at
// its start (SDM Vol. 3C, "VMXON Region" and "Format of the VMCS Region"),
// as VMXON and VMPTRLD want it.
func PrepareRegion(c *Caps, region []byte) error {
	if n := c.RegionSize(); len(region) < n || n < 8 {
		return fmt.Errorf("vmx: region of %d bytes, the CPU wants %d", len(region), n)
	}
	clear(region[:c.RegionSize()])
	binary.LittleEndian.PutUint32(region, c.Revision())
	return nil
}
