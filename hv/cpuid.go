package hv

import "github.com/tamahv/tamahv/vmx"

// filterCPUID edits the host's CPUID answer r (EAX, EBX, ECX, EDX) for
// leaf/sub into what the guest may see: no VMX, a hypervisor present,
// OSXSAVE from the guest's CR4, and no feature the guest cannot use or
// tamahv does not let it use (the MSR policy in msr.go).
func (v *VCPU) filterCPUID(leaf, sub uint32, r *[4]uint32) {
	switch leaf {
	case 1:
		// No VMX; a hypervisor is present.
		r[vmx.ECX] = r[vmx.ECX]&^vmx.CPUIDVMX | vmx.CPUIDHypervisorBit
	case vmx.CPUIDLeafPMU:
		if v.VMCS.Read(vmx.EntryControls)&vmx.EntryLoadPerf == 0 {
			// The counters could not be stopped in VMX root.
			*r = [4]uint32{}
		}
	case 0x12, 0x14: // SGX and Intel PT enumeration
		*r = [4]uint32{}
	case vmx.CPUIDLeafTSC, vmx.CPUIDLeafFrequency:
		if v.hideTSCLeaves() {
			*r = [4]uint32{}
		}
	}
	if flagLeaf(leaf) {
		v.clearFlags(leaf, sub, r)
	}
	// OSXSAVE and OSPKE follow the guest's CR4, not tamahv's.
	if mask, bit, ok := cr4Flag(leaf, sub); ok {
		r[vmx.ECX] &^= bit
		if v.VMCS.Read(vmx.GuestCR4)&uint64(mask) != 0 {
			r[vmx.ECX] |= bit
		}
	}
}

// cr4Flag returns the ECX flag of leaf/sub that follows the guest's CR4:
// set while CR4 has a bit of mask (leaf 1's OSXSAVE, CR4.OSXSAVE; leaf 7's
// OSPKE, CR4.PKE); ok is false for the other leaves.
func cr4Flag(leaf, sub uint32) (mask, bit uint32, ok bool) {
	switch {
	case leaf == 1:
		return vmx.CR4OSXSAV, vmx.CPUIDOSXSAVEBit, true
	case leaf == 7 && sub == 0:
		return vmx.CR4PKE, vmx.CPUIDOSPKEBit, true
	}
	return 0, 0, false
}

// clearFlags clears in r the flags of leaf/sub the guest may not see.
func (v *VCPU) clearFlags(leaf, sub uint32, r *[4]uint32) {
	// Features tamahv never offers.
	for _, f := range cpuidHidden() {
		if f.In(leaf, sub) {
			r[f.Reg] &^= f.Mask()
		}
	}
	// Features whose instructions #UD with their control off.
	var proc2 uint32
	read := false
	gates := vmx.Proc2Gates()
	for i := range gates {
		g := &gates[i]
		if !g.Feature.In(leaf, sub) {
			continue
		}
		if !read {
			proc2, read = uint32(v.VMCS.Read(vmx.Proc2Controls)), true
		}
		if proc2&g.Control == 0 {
			r[g.Feature.Reg] &^= g.Feature.Mask()
		}
	}
}

// filteredLeaf reports whether filterCPUID changes anything in leaf: the
// leaves its switch edits and those flagLeaf names. The CPUID handler
// skips the call for the others.
func filteredLeaf(leaf uint32) bool {
	switch leaf {
	case 1, vmx.CPUIDLeafPMU, 0x12, 0x14, vmx.CPUIDLeafTSC, vmx.CPUIDLeafFrequency:
		return true
	}
	return flagLeaf(leaf)
}

// cpuidHidden lists the features tamahv never offers: the debug store
// (BTS/PEBS write to addresses the guest picks), SGX, and Intel PT (its
// output addresses are host-physical).
func cpuidHidden() [6]*vmx.CPUIDBit {
	return [...]*vmx.CPUIDBit{&vmx.CPUIDDS, &vmx.CPUIDDTES64, &vmx.CPUIDDSCPL, &vmx.CPUIDSGX, &vmx.CPUIDSGXLC, &vmx.CPUIDPT}
}

// flagLeaf reports whether leaf holds a flag filterCPUID may clear: one
// of cpuidHidden or of vmx.Proc2Gates. The answers of other leaves (leaf 0,
// the cache and topology leaves, the brand string) pass through without
// the scans, which cost a CPUID exit more than the rest of its handling.
func flagLeaf(leaf uint32) bool {
	switch leaf {
	case 1, 7, 0xd, 0x80000001:
		return true
	}
	return false
}

// hasFeature reports whether the host's CPUID has flag f.
func (v *VCPU) hasFeature(f vmx.CPUIDBit) bool {
	if v.CPUID == nil {
		return false
	}
	var r [4]uint32
	r[0], r[1], r[2], r[3] = v.CPUID(f.Leaf, f.Subleaf)
	return r[f.Reg]&f.Mask() != 0
}

// Values of VCPU.tscLeaves.
const (
	tscLeavesUnknown = iota
	tscLeavesPass
	tscLeavesHidden
)

// hideTSCLeaves reports whether leaves 0x15 and 0x16 read as zeros: their
// TSC frequency is more than 5% from TSCHz (VCPU.TSCHz). It reads both
// leaves once.
func (v *VCPU) hideTSCLeaves() bool {
	if v.tscLeaves == tscLeavesUnknown {
		v.tscLeaves = tscLeavesPass
		if v.TSCHz != 0 && v.CPUID != nil {
			var l15, l16 [4]uint32
			l15[0], l15[1], l15[2], l15[3] = v.CPUID(vmx.CPUIDLeafTSC, 0)
			l16[0], l16[1], l16[2], l16[3] = v.CPUID(vmx.CPUIDLeafFrequency, 0)
			if hz := LeafTSCHz(l15, l16); hz != 0 && (hz > v.TSCHz+v.TSCHz/20 || hz < v.TSCHz-v.TSCHz/20) {
				v.tscLeaves = tscLeavesHidden
			}
		}
	}
	return v.tscLeaves == tscLeavesHidden
}

// LeafTSCHz returns the TSC frequency in Hz that CPUID leaves 0x15 (l15)
// and 0x16 (l16) give, as an operating system reads them: the crystal
// clock times the ratio, or, where the crystal is not enumerated, the
// base frequency of leaf 0x16. 0: not enumerated.
func LeafTSCHz(l15, l16 [4]uint32) uint64 {
	den, num, crystal := uint64(l15[vmx.EAX]), uint64(l15[vmx.EBX]), uint64(l15[vmx.ECX])
	switch {
	case den == 0 || num == 0:
		return 0
	case crystal != 0:
		return crystal * num / den
	}
	return uint64(l16[vmx.EAX]) * 1_000_000
}
