// tamahv's floating-point control state across VM entry and exit.
//
// The guest's MXCSR and x87 control word are live in the processor after a
// VM exit (the VMCS holds neither). tamahv's Go code must not run with them:
// a guest MXCSR with an exception unmasked turns the first inexact float
// operation in VMX root (TamaGo's clock is float64(TSC)*multiplier) into #XM
// (SDM Vol. 1, "SIMD Floating-Point Exceptions"), which panics.
//
// HOST_FP_SAVE stores tamahv's MXCSR at off(SP) and its x87 control word
// at off+4(SP) before the guest's state is loaded. HOST_FP_LOAD makes them
// current again: FNINIT clears the guest's x87 status (pending exceptions,
// tags, stack top), then FLDCW and LDMXCSR reload tamahv's controls.
#define HOST_FP_SAVE(off)	STMXCSR	off(SP); FSTCW	off+4(SP)
#define HOST_FP_LOAD(off)	FINIT; FLDCW	off+4(SP); LDMXCSR	off(SP)
