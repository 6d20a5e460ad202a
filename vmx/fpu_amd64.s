#include "textflag.h"
#include "fpu_amd64.h"

// func fpSwitch(mxcsr uint32, fcw uint16) (gotMXCSR uint32, gotFCW uint16)
//
// fpSwitch does with the given controls what VM entry and exit do with the
// guest's: it saves the caller's controls (HOST_FP_SAVE), loads mxcsr and
// fcw as a guest would, then runs vmexit's HOST_FP_LOAD and reports the
// controls now in force. No Go code runs between the load and the restore.
TEXT ·fpSwitch(SB),NOSPLIT,$8-14
	HOST_FP_SAVE(0)
	LDMXCSR	mxcsr+0(FP)
	FLDCW	fcw+4(FP)
	HOST_FP_LOAD(0)
	STMXCSR	gotMXCSR+8(FP)
	FSTCW	gotFCW+12(FP)
	RET
