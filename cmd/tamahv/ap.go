//go:build tamago

package main

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/tamahv/tamahv/board/pc/smp"
	"github.com/tamahv/tamahv/hv"
	"github.com/tamahv/tamahv/hv/guestmem"
	"github.com/tamahv/tamahv/hv/machine"
	"github.com/tamahv/tamahv/vmx"
)

// smpBoard is the PC with its held application processors, each a vCPU's
// processor.
type smpBoard struct {
	*board
	aps []machine.AP
}

// APs implements machine.SMPBoard.
func (b *smpBoard) APs() []machine.AP { return b.aps }

// apCPU is one held AP as machine.AP sees it.
type apCPU struct{ *smp.APVCPU }

func (a apCPU) LoadVMCS(pa uint64) (hv.VMCS, error) {
	if err := a.APVCPU.LoadVMCS(pa); err != nil {
		return nil, err
	}
	var fields []uint32
	for _, f := range hv.ExitFields() {
		fields = append(fields, uint32(f))
	}
	if err := a.SetSnapshot(fields); err != nil {
		return nil, err
	}
	return &apVMCS{ap: a.APVCPU}, nil
}

// SetCPUID implements machine.CPUIDAnswerer.
func (a apCPU) SetCPUID(t []hv.CPUIDEntry) error {
	answers := make([]smp.CPUIDAnswer, len(t))
	for i, e := range t {
		answers[i] = smp.CPUIDAnswer{Leaf: e.Leaf, Subleaf: e.Subleaf, Regs: e.Regs, CR4Mask: e.CR4Mask, ECXIfCR4: e.ECXIfCR4}
	}
	return a.APVCPU.SetCPUID(answers)
}

func (a apCPU) Host() hv.HostState { return hostState(a.APVCPU.Host()) }

func (a apCPU) Bind(w guestmem.ShootdownWords) error {
	if w.Generation == nil || w.Seen == nil || w.InGuest == nil {
		return errors.New("tamahv: incomplete shootdown words")
	}
	a.APVCPU.Bind(w.Generation, w.Seen, w.InGuest)
	return nil
}

func (a apCPU) Enter(r *vmx.GuestRegs, launched bool) error {
	err := a.APVCPU.Enter(r, launched)
	if errors.Is(err, smp.ErrAPStopped) {
		return hv.ErrStopped
	}
	if err == nil {
		err = a.Err()
	}
	return err
}

// apVMCS is an AP's current VMCS, reached through its exit loop.
type apVMCS struct {
	ap  *smp.APVCPU
	err error
}

func (v *apVMCS) Read(f vmx.Field) uint64 {
	x, err := v.ap.VMRead(uint32(f))
	if err != nil && v.err == nil {
		v.err = fmt.Errorf("field %#x: %w", uint32(f), err)
	}
	return x
}

func (v *apVMCS) Write(f vmx.Field, x uint64) {
	if err := v.ap.VMWrite(uint32(f), x); err != nil && v.err == nil {
		v.err = fmt.Errorf("field %#x = %#x: %w", uint32(f), x, err)
	}
}

func (v *apVMCS) Err() error { return v.err }

func (v *apVMCS) ClearErr() { v.err = nil }

// KickBSP implements machine.Kicker.
func (a apCPU) KickBSP(inGuest, kicks *atomic.Uint32) {
	a.APVCPU.KickBSP(inGuest, kicks, smp.BSPAPICID())
}
