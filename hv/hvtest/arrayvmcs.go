package hvtest

import "github.com/tamahv/tamahv/vmx"

// ArrayVMCS is an hv.VMCS that costs what an array access costs, so that
// a benchmark of the exit path measures the path rather than a map. It
// counts the accesses, as the processor would execute VMREAD and VMWRITE.
type ArrayVMCS struct {
	Fields [0x7000]uint64
	// Reads and Writes count every access; FieldReads and FieldWrites
	// count them per field.
	Reads, Writes           uint64
	FieldReads, FieldWrites [0x7000]uint32
}

// Read implements hv.VMCS.
func (m *ArrayVMCS) Read(f vmx.Field) uint64 {
	m.Reads++
	m.FieldReads[f]++
	return m.Fields[f]
}

// Write implements hv.VMCS.
func (m *ArrayVMCS) Write(f vmx.Field, v uint64) {
	m.Writes++
	m.FieldWrites[f]++
	m.Fields[f] = v
}

// Reset forgets the counts.
func (m *ArrayVMCS) Reset() {
	m.Reads, m.Writes = 0, 0
	m.FieldReads, m.FieldWrites = [0x7000]uint32{}, [0x7000]uint32{}
}

// Err implements hv.VMCS: an array access never fails.
func (m *ArrayVMCS) Err() error { return nil }

// ClearErr implements hv.VMCS.
func (m *ArrayVMCS) ClearErr() {}
