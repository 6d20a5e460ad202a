package guestmem

import (
	"fmt"

	"github.com/tamahv/tamahv/ept"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/vmx"
)

// Unmapped answers the EPT violations no other handler claims, with what
// the machine without tamahv would do:
//
//   - Guest-physical memory MapGuest left unmapped (above 4 GiB and not
//     RAM: a 64-bit PCI BAR, or nothing at all) is mapped one to one,
//     of the memory type the host's MTRRs give it (Types; uncached
//     without), on first touch, as everything below 4 GiB that is not RAM
//     already is: a device answers as on bare hardware, and where there is
//     none the platform does (reads all ones, writes dropped). The guest
//     owns the machine's devices already; tamahv's memory is below 4 GiB
//     and never mapped this way. The largest unmapped aligned region
//     around the address, up to 1 GiB, is mapped at once, so a guest
//     touching every region costs one table page per 512 GiB with 1 GiB
//     pages, per GiB without.
//   - An instruction fetch from tamahv's region (its addresses map to the
//     sink, which is not executable): the guest's e820 map has no memory
//     there, and the processor would fetch all ones from nothing, FF FF,
//     an undefined opcode (group 5, /7): the guest gets #UD at that
//     instruction.
//   - An access the EPT allows by now (a translation cached before a
//     change) is retried after a flush.
//
// What is left is tamahv's own protection with nobody to answer for it,
// a bug in tamahv, not something the guest can do: the run stops with
// ErrFatalExit. So does a violation at an address the 4-level EPT cannot
// map (at or above 2^48: only processors with a wider physical address
// let the guest form one) or when the page arena is full.
type Unmapped struct {
	EPT *ept.EPT
	// Hole is tamahv's own memory.
	Hole [2]uint64
	// Invalidate flushes EPT-derived translations (INVEPT).
	Invalidate func()
	// Types are the host's MTRRs, whose memory types the regions mapped
	// on first touch take (nil: uncached).
	Types *ept.MTRRs

	// Mapped counts the regions mapped on first touch; Fetches the
	// fetches from tamahv's region answered with #UD.
	Mapped, Fetches uint64
}

// Install makes u intercept v's EPT violations: unmapped memory and
// fetches from tamahv's region; the rest goes on to the default handler.
// Install it before the interceptors that pass on what they do not claim
// (Watcher, the breakpoint agent), so that it sees what they leave.
func (u *Unmapped) Install(v *hv.VCPU) error { return v.Intercept(vmx.ExitEPTViolation, u.onViolation) }

func (u *Unmapped) onViolation(v *hv.VCPU, e *vmx.Exit, next hv.Handler) (hv.Action, error) {
	gpa := e.GuestPA
	q := ept.DecodeViolation(e.Qualification)
	_, perm, _, size, ok := u.EPT.Lookup(gpa)
	switch {
	case !ok && size != 0:
		s := min(size, uint64(ept.Size1G))
		base := gpa &^ (s - 1)
		if base < u.Hole[1] && u.Hole[0] < base+s {
			break // never: the hole is mapped to the sink
		}
		spans, err := memTypes(u.Types, base, base+s)
		if err != nil {
			return hv.Stop, fmt.Errorf("%w: the memory types of guest-physical %#x+%#x: %v", hv.ErrFatalExit, base, s, err)
		}
		for _, sp := range spans {
			if err := u.EPT.Map(sp.Start, sp.Start, sp.End-sp.Start, ept.RWX, sp.Type); err != nil {
				return hv.Stop, fmt.Errorf("%w: mapping unbacked guest-physical %#x+%#x: %v", hv.ErrFatalExit, base, s, err)
			}
		}
		u.Mapped++
		u.flush()
		return hv.Resume, nil
	case ok && q.Fetch && gpa >= u.Hole[0] && gpa < u.Hole[1]:
		u.Fetches++
		return hv.Resume, v.InjectException(vmx.VectorUD, 0)
	case ok && permits(perm, q):
		u.flush()
		return hv.Resume, nil
	}
	return next(v, e)
}

func (u *Unmapped) flush() {
	if u.Invalidate != nil {
		u.Invalidate()
	}
}

// permits reports whether p allows every access of the violation.
func permits(p ept.Perm, q ept.Violation) bool {
	return (!q.Read || p&ept.Read != 0) && (!q.Write || p&ept.Write != 0) && (!q.Fetch || p&ept.Exec != 0)
}
