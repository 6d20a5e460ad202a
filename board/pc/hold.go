//go:build tamago

package pc

import (
	"fmt"
	"io"
	"time"
)

// HoldProcessors brings every application processor the firmware lists
// under tamahv before the guest starts: each is started and parked in VMX
// root operation (where INIT is blocked and start-up IPIs are ignored),
// and every processor but the bootstrap one is hidden from the guest's
// copy of the MADT and MP table. It returns an error, and the guest must
// not start, where an enabled processor answered but could not be held:
// the guest could start that one natively.
//
// It prints these stable lines:
//
//	tamahv: processors: N listed (MADT|MP), bootstrap APIC ID N
//	tamahv: AP APIC ID N: parked in VMX root operation (T)
//	tamahv: AP APIC ID N: <why it is not held> (T)
//	tamahv: hidden from the guest: APIC IDs [...]
//
// avail is the memory map's available RAM, [start, end) each (the AP
// trampoline's page comes from below 640 KiB in it); visible leaves the
// firmware's processor tables unpatched (a test that the parked APs
// ignore the guest's INIT and start-up IPIs). The returned SMP owns the
// parked APs' pages: keep it for as long as they are parked.
func HoldProcessors(avail [][2]uint64, visible bool, log io.Writer) (*SMP, error) {
	procs, err := FindProcessors(PhysMem{})
	if err != nil {
		fmt.Fprintf(log, "tamahv: processors: %v; only the bootstrap processor is known\n", err)
		return nil, nil
	}
	bsp := BSPAPICID()
	start, hide := procs.Plan(bsp)
	src := SourceMADT
	if procs.MADT == 0 {
		src = SourceMP
	}
	fmt.Fprintf(log, "tamahv: processors: %d listed (%s), bootstrap APIC ID %d\n", len(procs.List), src, bsp)
	if n := LogicalProcessors(); n > len(start)+1 {
		// A processor the firmware does not list is not started, so not
		// held: a guest that guesses its APIC ID could start it.
		fmt.Fprintf(log, "tamahv: CPUID counts %d logical processors in this package, the firmware lists %d enabled: the others are not held\n", n, len(start)+1)
	}

	var smp *SMP
	var refused []uint32
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
		refused = Unheld(smp.APs)
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
		if _, err := procs.Hide(PhysMem{}, id); err != nil {
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
	if len(refused) > 0 {
		return smp, fmt.Errorf("processors tamahv cannot hold, which the guest could start natively: APIC IDs %v", refused)
	}
	return smp, nil
}
