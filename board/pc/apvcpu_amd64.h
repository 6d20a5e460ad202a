// Instructions of the AP exit loop as bytes, where the Go assembler lacks
// a form; apvcpu_test.go decodes each and compares it with its comment.

#define LOCK_INCL_GS_NMIS	BYTE $0x65; BYTE $0xf0; BYTE $0xff; BYTE $0x04; BYTE $0x25; BYTE $0x90; BYTE $0x00; BYTE $0x00; BYTE $0x00	// lock inc dword ptr gs:[0x90]
#define XSETBV_	BYTE $0x0f; BYTE $0x01; BYTE $0xd1	// xsetbv
