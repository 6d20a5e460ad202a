//go:build tamago

package smp

import (
	"fmt"
	"io"
	"time"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/board/pc/acpi"
)

// HoldProcessors brings every application processor the firmware lists
// under tamahv before the guest starts: each enabled or online-capable one
// is started and parked in VMX root operation (where INIT is blocked and
// start-up IPIs are ignored), and every processor but the bootstrap one
// is hidden from the guest's copy of the MADT and MP table. It returns an
// error, and the guest must not start, where tamahv cannot account for
// every processor (Census.Check: no tables while CPUID counts more than
// one logical processor, a listed processor that is not held, fewer held
// in the bootstrap processor's package than CPUID counts there): the
// guest could start such a processor natively.
//
// It prints these stable lines:
//
//	tamahv: processors: N listed (MADT|MP), bootstrap APIC ID N
//	tamahv: processors: CPUID (leaf ...) counts N logical processors in the bootstrap processor's package
//	tamahv: AP APIC ID N: parked in VMX root operation (T)
//	tamahv: AP APIC ID N: <why it is not held> (T)
//	tamahv: hidden from the guest: APIC IDs [...]
//
// avail is the memory map's available RAM, [start, end) each (the AP
// trampoline's page comes from below 640 KiB in it); rsdp is the ACPI
// RSDP's physical address where the boot path knows it (UEFI: the EFI
// configuration table), 0 to search the legacy BIOS areas for it;
// visible leaves the firmware's processor tables unpatched (a test that
// the parked APs ignore the guest's INIT and start-up IPIs). The returned
// SMP owns the parked APs' pages: keep it for as long as they are parked,
// also where the guest must not start.
func HoldProcessors(avail [][2]uint64, rsdp uint64, visible bool, log io.Writer) (*SMP, error) {
	c := Census{BSP: BSPAPICID(), Topology: BSPTopology()}
	cpuidLine := func() {
		fmt.Fprintf(log, "tamahv: processors: CPUID (%s) counts %d logical processors in the bootstrap processor's package\n",
			c.Topology.Leaf, c.Topology.Logical)
	}
	procs, err := acpi.FindProcessorsAt(pc.PhysMem{}, rsdp)
	if err != nil {
		fmt.Fprintf(log, "tamahv: processors: %v; only the bootstrap processor is known\n", err)
		cpuidLine()
		return nil, c.Check()
	}
	c.Tables, c.Listed = true, procs.All()
	start, hide := procs.Plan(c.BSP)
	src := acpi.SourceMADT
	if procs.MADT == 0 {
		src = acpi.SourceMP
	}
	fmt.Fprintf(log, "tamahv: processors: %d listed (%s), bootstrap APIC ID %d\n", len(procs.List), src, c.BSP)
	cpuidLine()

	var smp *SMP
	if len(start) > 0 {
		page, err := TrampolinePage(avail)
		if err != nil {
			return nil, err
		}
		if smp, err = StartAPs(start, page); err != nil {
			return nil, err
		}
		smp.procs = procs
		for _, ap := range smp.APs {
			fmt.Fprintf(log, "tamahv: AP APIC ID %d: %v (%v)\n", ap.APICID, ap.Status, ap.Took.Round(time.Microsecond))
		}
		c.APs = smp.APs
	}
	// Until each AP runs as a vCPU, the guest sees the bootstrap
	// processor only.
	if visible {
		fmt.Fprintf(log, "tamahv: the guest sees every processor; the APs stay parked\n")
		hide = nil
	}
	var why []string // each reason once, with the APIC IDs it held back
	failed := map[string][]uint32{}
	for _, id := range hide {
		if _, err := procs.Hide(pc.PhysMem{}, id); err != nil {
			if _, ok := failed[err.Error()]; !ok {
				why = append(why, err.Error())
			}
			failed[err.Error()] = append(failed[err.Error()], id)
		}
	}
	for _, w := range why {
		fmt.Fprintf(log, "tamahv: hiding APIC IDs %v: %s\n", failed[w], w)
	}
	if len(hide) > 0 {
		fmt.Fprintf(log, "tamahv: hidden from the guest: APIC IDs %v\n", hide)
	}
	return smp, c.Check()
}
