package pc

import "errors"

// PIT facts (Intel 8254): input clock and the count used to calibrate.
const (
	PITHz         = 1193182
	pitCalibCount = 11932 // about 10 ms
)

// ErrCalibration is returned when the TSC could not be measured.
var ErrCalibration = errors.New("pc: TSC calibration failed")

// TSCHz converts a TSC delta measured over count PIT ticks into the TSC
// frequency. It fails for a zero count or a delta too small to mean
// anything (under 1 MHz).
func TSCHz(delta uint64, count uint16) (uint64, error) {
	if count == 0 {
		return 0, ErrCalibration
	}
	hz := delta * PITHz / uint64(count)
	if hz < 1_000_000 {
		return 0, ErrCalibration
	}
	return hz, nil
}

// CPUIDTSCHz derives the TSC frequency from CPUID leaf 0x15 (SDM Vol. 3B,
// "Determining the Processor Base Frequency"): EBX/EAX is the ratio of
// TSC to crystal clock, ECX the crystal in Hz. It returns 0 when the leaf
// does not give the answer.
func CPUIDTSCHz(eax, ebx, ecx uint32) uint64 {
	if eax == 0 || ebx == 0 || ecx == 0 {
		return 0
	}
	return uint64(ecx) * uint64(ebx) / uint64(eax)
}
