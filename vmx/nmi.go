package vmx

import "sync/atomic"

// nmis counts the NMIs that reached tamahv's IDT while it ran in VMX root
// (between a VM exit and the next entry). It is package state because an
// NMI handler has nothing else to write to: the processor hands it no
// argument.
var nmis atomic.Uint32

// Implemented in nmi_amd64.s.
func nmiEntry()
func nmiEntryPC() uintptr

// NMIHandler returns the address of tamahv's NMI handler, for IDT vector
// 2: it counts the NMI and returns with IRETQ, using no register and no
// stack but the interrupt frame. With "NMI exiting" on, an NMI that
// arrives while the guest runs exits instead; one that arrives in VMX root
// belongs to the guest as well (its local APIC, its counters, its
// watchdog), and TakeNMI hands it over.
func NMIHandler() uintptr { return nmiEntryPC() }

// TakeNMI returns how many NMIs arrived in VMX root since the last call,
// and forgets them. The count tells tamahv's own NMIs (kicks) from the
// guest's one for one; NMIs that arrive while NMIs are blocked collapse
// into one on the processor, so it can fall short of the NMIs sent, never
// exceed them.
func TakeNMI() uint32 { return nmis.Swap(0) }

// simulateNMI (nmi_amd64.s) delivers an NMI to nmiEntry in software, for
// tests: it returns RFLAGS after the handler's IRETQ.
func simulateNMI(rflags uint64) (after uint64)

// unblockNMIs is implemented in nmi_amd64.s.
func unblockNMIs()

// UnblockNMIs ends the blocking of NMIs an NMI exit leaves on the
// executing processor (an IRETQ to itself): call it after handling an NMI
// exit, so that the next NMI (the guest's, or a kick) is delivered.
func UnblockNMIs() { unblockNMIs() }
