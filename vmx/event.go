package vmx

// Exception vectors (SDM Vol. 3A, "Exception and Interrupt Reference").
const (
	VectorDE  = 0
	VectorDB  = 1
	VectorNMI = 2
	VectorBP  = 3
	VectorOF  = 4
	VectorUD  = 6
	VectorDF  = 8
	VectorTS  = 10
	VectorNP  = 11
	VectorSS  = 12
	VectorGP  = 13
	VectorPF  = 14
	VectorAC  = 17
	VectorCP  = 21
)

// EventType is the interruption type of an event (SDM Vol. 3C, "VM-Entry
// Controls for Event Injection").
type EventType uint8

// Interruption types.
const (
	EventExternal          EventType = 0
	EventNMI               EventType = 2
	EventHardwareException EventType = 3
	EventSoftwareInterrupt EventType = 4
	EventPrivilegedSWExc   EventType = 5
	EventSoftwareException EventType = 6
	EventOther             EventType = 7
)

// Event is an interrupt or exception to deliver to the guest, or one read
// from the exit-interruption or IDT-vectoring fields.
type Event struct {
	Vector    uint8
	Type      EventType
	HasError  bool
	ErrorCode uint32
	// InstrLen is the VM-entry instruction length, needed for software
	// interrupts and exceptions.
	InstrLen uint32
}

// Bits of the interruption-information fields.
const (
	// EventValid says the field holds an event.
	EventValid = 1 << 31
	// EventErrorValid says an error code comes with the event.
	EventErrorValid = 1 << 11
)

// NMIUnblockedByIRET is bit 12 of the exit interruption information and of
// the exit qualification of EPT violations: the exiting instruction was an
// IRET that had unblocked NMIs (SDM Vol. 3C, "Information for VM Exits Due
// to Vectored Events", "Exit Qualification for EPT Violations").
const NMIUnblockedByIRET = 1 << 12

// Info encodes the VM-entry interruption-information field.
func (e Event) Info() uint32 {
	v := uint32(e.Vector) | uint32(e.Type&7)<<8 | EventValid
	if e.HasError {
		v |= EventErrorValid
	}
	return v
}

// DecodeEvent reads an interruption-information field (exit or IDT
// vectoring) and its error code; ok is false when the valid bit is clear.
func DecodeEvent(info, errorCode uint32) (e Event, ok bool) {
	if info&EventValid == 0 {
		return Event{}, false
	}
	e = Event{Vector: uint8(info), Type: EventType(info >> 8 & 7), HasError: info&EventErrorValid != 0}
	if e.HasError {
		e.ErrorCode = errorCode
	}
	return e, true
}

// ExceptionHasErrorCode reports whether the exception pushes an error code.
func ExceptionHasErrorCode(vector uint8) bool {
	switch vector {
	case VectorDF, VectorTS, VectorNP, VectorSS, VectorGP, VectorPF, VectorAC, VectorCP:
		return true
	}
	return false
}

// Exception returns the event for a processor exception. #BP and #OF are
// software exceptions and carry the instruction length; the others are
// hardware exceptions, with an error code where the vector has one.
func Exception(vector uint8, errorCode uint32, instrLen uint32) Event {
	if vector == VectorBP || vector == VectorOF {
		return Event{Vector: vector, Type: EventSoftwareException, InstrLen: instrLen}
	}
	e := Event{Vector: vector, Type: EventHardwareException}
	if ExceptionHasErrorCode(vector) {
		e.HasError, e.ErrorCode = true, errorCode
	}
	return e
}

// NeedsInstrLen reports whether injecting e needs the VM-entry instruction
// length.
func (e Event) NeedsInstrLen() bool {
	return e.Type == EventSoftwareInterrupt || e.Type == EventPrivilegedSWExc || e.Type == EventSoftwareException
}

// CRAccess is the exit qualification of a control-register access (SDM
// Vol. 3C, "Exit Qualification for Control-Register Accesses").
type CRAccess struct {
	CR     int
	Type   int // 0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW
	GPR    int // register number, RAX = 0
	LMSW   uint16
	Memory bool // LMSW with a memory operand
}

// CR access types.
const (
	CRMovTo   = 0
	CRMovFrom = 1
	CRCLTS    = 2
	CRLMSW    = 3
)

// DecodeCRAccess splits a CR-access exit qualification.
func DecodeCRAccess(q uint64) CRAccess {
	return CRAccess{CR: int(q & 15), Type: int(q >> 4 & 3), Memory: q&(1<<6) != 0, GPR: int(q >> 8 & 15), LMSW: uint16(q >> 16)}
}

// IOAccess is the exit qualification of an I/O instruction.
type IOAccess struct {
	Size      int // 1, 2 or 4 bytes
	In        bool
	String    bool
	Rep       bool
	Immediate bool
	Port      uint16
}

// DecodeIO splits an I/O-instruction exit qualification.
func DecodeIO(q uint64) IOAccess {
	return IOAccess{Size: int(q&7) + 1, In: q&8 != 0, String: q&16 != 0, Rep: q&32 != 0, Immediate: q&64 != 0, Port: uint16(q >> 16)}
}

// Guest interruptibility-state bits (SDM Vol. 3C, 24.4.2, "Guest
// Non-Register State").
const (
	BlockingSTI   = 1 << 0
	BlockingMovSS = 1 << 1
	BlockingSMI   = 1 << 2
	BlockingNMI   = 1 << 3
)
