//go:build tamago

package main

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/board/pc/multiboot"
)

// visibleOption on tamahv's command line leaves the firmware's processor
// tables unpatched.
const visibleOption = "smp.visible"

// holdProcessors brings every application processor the firmware lists
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
func holdProcessors(info *multiboot.Info) (*pc.SMP, error) {
	procs, err := pc.FindProcessors(pc.PhysMem{})
	if err != nil {
		fmt.Printf("tamahv: processors: %v; only the bootstrap processor is known\n", err)
		return nil, nil
	}
	bsp := pc.BSPAPICID()
	start, hide := procs.Plan(bsp)
	src := pc.SourceMADT
	if procs.MADT == 0 {
		src = pc.SourceMP
	}
	fmt.Printf("tamahv: processors: %d listed (%s), bootstrap APIC ID %d\n", len(procs.List), src, bsp)
	if n := pc.LogicalProcessors(); n > len(start)+1 {
		// A processor the firmware does not list is not started, so not
		// held: a guest that guesses its APIC ID could start it.
		fmt.Printf("tamahv: CPUID counts %d logical processors in this package, the firmware lists %d enabled: the others are not held\n", n, len(start)+1)
	}

	var smp *pc.SMP
	var refused []uint32
	if len(start) > 0 {
		var avail [][2]uint64
		for _, r := range info.MemoryMap {
			if r.Type == multiboot.MemAvailable {
				avail = append(avail, [2]uint64{r.Base, r.Base + r.Length})
			}
		}
		page, err := pc.TrampolinePage(avail)
		if err != nil {
			return nil, err
		}
		if smp, err = pc.StartAPs(start, page); err != nil {
			return nil, err
		}
		for _, ap := range smp.APs {
			fmt.Printf("tamahv: AP APIC ID %d: %v (%v)\n", ap.APICID, ap.Status, ap.Took.Round(time.Microsecond))
		}
		refused = pc.Unheld(smp.APs)
	}
	// Until each AP runs as a vCPU, the guest sees the bootstrap
	// processor only. With smp.visible on tamahv's command line the
	// tables are left as they are (a test that the parked APs ignore
	// the guest's INIT and start-up IPIs).
	if slices.Contains(strings.Fields(info.Cmdline), visibleOption) {
		fmt.Printf("tamahv: %s: the guest sees every processor; the APs stay parked\n", visibleOption)
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
		fmt.Printf("tamahv: hiding APIC IDs %v: %s\n", failed[w], w)
	}
	if len(hide) > 0 {
		fmt.Printf("tamahv: hidden from the guest: APIC IDs %v\n", hide)
	}
	if len(refused) > 0 {
		return smp, fmt.Errorf("processors tamahv cannot hold, which the guest could start natively: APIC IDs %v", refused)
	}
	return smp, nil
}
