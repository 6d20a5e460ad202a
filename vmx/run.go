package vmx

// GuestRegs are the guest registers the VMCS does not hold: the general
// purpose registers but RSP, and CR2. Run loads them before VM entry and
// stores them after VM exit.
type GuestRegs struct {
	RAX, RCX, RDX, RBX, RBP, RSI, RDI    uint64
	R8, R9, R10, R11, R12, R13, R14, R15 uint64
	CR2                                  uint64
}

// GPR returns the register with the number VM-exit qualifications use
// (RAX = 0, RCX = 1, ..., R15 = 15; 4 is RSP, which lives in the VMCS and
// reads as 0 here).
func (r *GuestRegs) GPR(n int) uint64 {
	switch n {
	case 0:
		return r.RAX
	case 1:
		return r.RCX
	case 2:
		return r.RDX
	case 3:
		return r.RBX
	case 5:
		return r.RBP
	case 6:
		return r.RSI
	case 7:
		return r.RDI
	case 8:
		return r.R8
	case 9:
		return r.R9
	case 10:
		return r.R10
	case 11:
		return r.R11
	case 12:
		return r.R12
	case 13:
		return r.R13
	case 14:
		return r.R14
	case 15:
		return r.R15
	}
	return 0
}

// SetGPR sets register n (see GPR); n = 4 (RSP) is ignored.
func (r *GuestRegs) SetGPR(n int, v uint64) {
	p := [...]*uint64{&r.RAX, &r.RCX, &r.RDX, &r.RBX, nil, &r.RBP, &r.RSI, &r.RDI,
		&r.R8, &r.R9, &r.R10, &r.R11, &r.R12, &r.R13, &r.R14, &r.R15}
	if n >= 0 && n < len(p) && p[n] != nil {
		*p[n] = v
	}
}

// FXArea is the 512-byte FXSAVE area holding the guest's x87 and SSE state
// across exits; Run needs it 16-byte aligned.
type FXArea [512]byte

// vmrun is implemented in run_amd64.s; q may be nil.
func vmrun(r *GuestRegs, fx *byte, launched uint64, q *QuietCPUID) (rflags uint64)

// fpSwitch (fpu_amd64.s) runs vmexit's floating-point switch on controls a
// guest chose and returns the controls in force afterwards: tamahv's.
func fpSwitch(mxcsr uint32, fcw uint16) (gotMXCSR uint32, gotFCW uint16)

// Run enters the guest of the current VMCS with VMLAUNCH (launched false)
// or VMRESUME, and returns at its next VM exit (nil) or when VM entry fails
// (an *InsnError). The VMCS's HOST_RSP and HOST_RIP are written here: the
// stub returns to Go like a function call, and Go stacks move (HOST_RSP is
// written at every entry, HOST_RIP, a constant, with VMLAUNCH). fx must be
// 16-byte aligned.
func Run(r *GuestRegs, fx *FXArea, launched bool) error {
	return RunQuiet(r, fx, launched, nil)
}

// RunQuiet is Run whose exit stub answers CPUID itself from q's table
// while q.On is 1, the time-stamp counter is below q.Deadline, no NMI
// reached VMX root since TakeNMI, and the guest does not single-step: the
// guest's EAX, EBX, ECX and EDX get the answer for its EAX and ECX (ECX
// gains ECXIfCR4 while the guest's CR4 has a bit of CR4Mask), RIP moves
// past the instruction, blocking by STI and MOV SS ends, and the guest
// runs on without a return to Go. Every other exit returns as Run's do. q
// must not move while the guest runs (a heap object).
func RunQuiet(r *GuestRegs, fx *FXArea, launched bool, q *QuietCPUID) error {
	l := uint64(0)
	if launched {
		l = 1
	}
	if rflags := vmrun(r, &fx[0], l, q); rflags&(rflagsCF|rflagsZF) != 0 {
		return entryFailed(launched, rflags)
	}
	return nil
}

// CPUIDAnswer is one answer of a table that assembly looks CPUID up in
// (QuietCPUID, an application processor's exit loop): for EAX = Leaf and
// ECX = Subleaf exactly, the four registers, with ECXIfCR4 added to ECX
// while the guest's CR4 has a bit of CR4Mask set.
type CPUIDAnswer struct {
	Leaf, Subleaf      uint32
	EAX, EBX, ECX, EDX uint32
	CR4Mask, ECXIfCR4  uint32
}

// MaxCPUIDAnswers is the number of answers a table holds.
const MaxCPUIDAnswers = 126

// QuietCPUID is what RunQuiet's exit stub reads to answer CPUID itself.
type QuietCPUID struct {
	// On is 1 while the stub may answer.
	On uint32
	// N is the number of answers in Table.
	N uint32
	// Deadline is the time-stamp count from which CPUID exits return to
	// Go (its periodic work is due).
	Deadline uint64
	// Answered counts the CPUID exits the stub answered.
	Answered uint64
	Table    [MaxCPUIDAnswers]CPUIDAnswer
}

// entryFailed is the error of a VM entry that failed as rflags says.
func entryFailed(launched bool, rflags uint64) error {
	if launched {
		return check("VMRESUME", rflags, readInsnError)
	}
	return check("VMLAUNCH", rflags, readInsnError)
}
