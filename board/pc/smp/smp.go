//go:build tamago

package smp

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/tamahv/tamahv/board/pc"
	"github.com/tamahv/tamahv/board/pc/acpi"
	"github.com/tamahv/tamahv/vmx"
)

// hw is the bootstrap processor's instructions (CPUID, MSRs, CR3).
var hw pc.Hardware

// Implemented in smp_amd64.s.
func apEntry()
func apNMI()
func apFault()
func apEntryPC() uint64
func apNMIPC() uint64
func apFaultPC() uint64
func apExitPC() uint64
func mmioRead32(pa uint64) uint32
func mmioWrite32(pa uint64, v uint32)

// Start-up timing (SDM Vol. 3A, "MP Initialization Example"): 10 ms
// after INIT, 200 µs after each start-up IPI; then the AP has up to a
// second to report.
const (
	initDelay    = 10 * time.Millisecond
	startUpDelay = 200 * time.Microsecond
	reportWait   = time.Second
)

// SMP holds the application processors and every page they use (their
// parameter blocks, stacks, VMXON regions and the IDT) for as long as
// tamahv runs: keep it reachable.
type SMP struct {
	APs   []AP
	arena *pc.PageArena
	procs *acpi.Processors // the tables the APs were hidden from
}

// BSPAPICID returns the bootstrap processor's local APIC ID: the x2APIC ID
// from CPUID leaf 0BH where the processor has it, else the initial APIC
// ID of leaf 1.
func BSPAPICID() uint32 {
	if max, _, _, _ := hw.CPUID(0, 0); max >= 0xb {
		if _, b, _, d := hw.CPUID(0xb, 0); b != 0 {
			return d
		}
	}
	_, b, _, _ := hw.CPUID(1, 0)
	return b >> 24
}

// lapic sends IPIs from the BSP's local APIC.
type lapic struct {
	x2   bool
	base uint64
}

// newLAPIC returns the BSP's local APIC, switched to x2APIC mode where an
// APIC ID above 254 needs it.
func newLAPIC(highestID uint32) (lapic, error) {
	v := hw.ReadMSR(vmx.MSRAPICBase)
	l := lapic{x2: v&vmx.APICBaseX2APIC != 0, base: v & vmx.APICBaseAddr}
	if !l.x2 && highestID > 0xfe {
		// Only the x2APIC reaches APIC IDs above 254; so could a guest
		// that enables it, so tamahv must hold those processors too.
		if _, _, c, _ := hw.CPUID(1, 0); c&vmx.CPUIDX2APIC.Mask() == 0 {
			return l, fmt.Errorf("smp: APIC ID %d needs the x2APIC, which the processor lacks", highestID)
		}
		hw.WriteMSR(vmx.MSRAPICBase, v|vmx.APICBaseX2APIC)
		l.x2 = true
	}
	return l, nil
}

// ipi sends one interrupt command and waits for its delivery.
func (l lapic) ipi(dest uint32, cmd uint32) error {
	if l.x2 {
		hw.WriteMSR(vmx.MSRX2APICICR, uint64(dest)<<32|uint64(cmd))
		return nil
	}
	mmioWrite32(l.base+vmx.APICICRHigh, dest<<24)
	mmioWrite32(l.base+vmx.APICICRLow, cmd)
	if !spin(time.Millisecond, func() bool { return mmioRead32(l.base+vmx.APICICRLow)&vmx.ICRPending == 0 }) {
		return fmt.Errorf("smp: IPI %#x to APIC %d not delivered", cmd, dest)
	}
	return nil
}

// spin polls cond until it holds or d has passed.
func spin(d time.Duration, cond func() bool) bool {
	start := time.Now()
	for {
		if cond() {
			return true
		}
		if time.Since(start) > d {
			return cond()
		}
	}
}

// status reads the status the AP writes.
func (a *AP) status() APStatus {
	return APStatus(atomic.LoadUint32((*uint32)(unsafe.Pointer(&a.params[apStatus]))))
}

// StartAPs starts the application processors with the given APIC IDs, one
// after the other (INIT, start-up IPI, a second one if the first did not
// take), through a trampoline in the page at trampoline (below 1 MiB; its
// contents are put back afterwards), and has each enter VMX root
// operation and halt there (apEntry). It returns every AP with its
// status; an error only where nothing could be tried.
func StartAPs(apicIDs []uint32, trampoline uint32) (*SMP, error) {
	highest := uint32(0)
	for _, id := range apicIDs {
		highest = max(highest, id)
	}
	l, err := newLAPIC(highest)
	if err != nil {
		return nil, err
	}
	s := &SMP{arena: pc.NewPageArena(1 + apPages*len(apicIDs))}
	idtPA, err := s.arena.Alloc()
	if err != nil {
		return nil, err
	}
	idt, _ := s.arena.Bytes(idtPA)
	ParkIDT(idt, pc.SelectorCode, apNMIPC(), apFaultPC())

	saved := make([]byte, 4096)
	if err := (pc.PhysMem{}).ReadPhys(uint64(trampoline), saved); err != nil {
		return nil, err
	}
	defer func() { _ = pc.PhysMem{}.WritePhys(uint64(trampoline), saved) }()

	for _, id := range apicIDs {
		ap := AP{APICID: id}
		var pages [apPages]uint64
		for i := range pages {
			if pages[i], err = s.arena.Alloc(); err != nil {
				return nil, err
			}
		}
		ap.params, _ = s.arena.Bytes(pages[0])
		ap.paramsPA, ap.idtPA = pages[0], idtPA
		ap.cpuid, _ = s.arena.Bytes(pages[3])
		ap.cpuidPA = pages[3]
		p := APParams(Descriptor(pc.GDT, 5*8-1), Descriptor(idtPA, 4095), pages[1]+4096, pages[2])
		copy(ap.params[:], p[:])
		// The exit loop's stack: two slots at the top, NMI frames below.
		binary.LittleEndian.PutUint64(ap.params[apExitRSP:], pages[1]+4096-64)
		code, err := Trampoline(trampoline, hw.CR3(), apEntryPC(), pages[0])
		if err != nil {
			return nil, err
		}
		if err := (pc.PhysMem{}).WritePhys(uint64(trampoline), code); err != nil {
			return nil, err
		}
		s.start(l, &ap, trampoline)
		s.APs = append(s.APs, ap)
	}
	return s, nil
}

// start sends INIT-SIPI-SIPI to one AP and waits for its report.
func (s *SMP) start(l lapic, ap *AP, trampoline uint32) {
	t0 := time.Now()
	defer func() {
		ap.Status = ap.status()
		ap.Took = time.Since(t0)
		ap.FeatureControl = *(*uint64)(unsafe.Pointer(&ap.params[apFeatCtl]))
	}()
	done := func() bool { st := ap.status(); return st != APSilent && st != APStarted }
	if l.ipi(ap.APICID, vmx.ICRDeliveryINIT|vmx.ICRLevelAssert) != nil {
		return
	}
	spin(initDelay, func() bool { return false })
	for i := 0; i < 2 && ap.status() == APSilent; i++ {
		if l.ipi(ap.APICID, vmx.ICRDeliveryStart|vmx.ICRLevelAssert|trampoline>>12) != nil {
			return
		}
		spin(startUpDelay, done)
	}
	if !spin(reportWait, done) && ap.status() == APSilent {
		// It may yet run the trampoline, which is about to go: back to
		// wait-for-SIPI with it.
		_ = l.ipi(ap.APICID, vmx.ICRDeliveryINIT|vmx.ICRLevelAssert)
	}
}

// BSPTopology returns CPUID's view of the bootstrap processor's package
// (PackageTopology); it runs on the bootstrap processor.
func BSPTopology() Topology { return PackageTopology(hw.CPUID) }
