// Package hvtest has fakes for testing code built on package hv without a
// processor.
package hvtest

import (
	"fmt"

	"github.com/tamahv/tamahv/vmx"
)

// VMCS is an hv.VMCS kept in a map. Reading a field never written is an
// access error (as VMREAD of an unsupported field would be), reported by Err.
type VMCS struct {
	Fields map[vmx.Field]uint64
	err    error
}

// NewVMCS returns an empty VMCS.
func NewVMCS() *VMCS { return &VMCS{Fields: map[vmx.Field]uint64{}} }

// Read implements hv.VMCS.
func (m *VMCS) Read(f vmx.Field) uint64 {
	v, ok := m.Fields[f]
	if !ok && m.err == nil {
		m.err = fmt.Errorf("VMREAD %#x: unsupported field", uint32(f))
	}
	return v
}

// Write implements hv.VMCS.
func (m *VMCS) Write(f vmx.Field, v uint64) { m.Fields[f] = v }

// Err implements hv.VMCS.
func (m *VMCS) Err() error { return m.err }

// ClearErr implements hv.VMCS.
func (m *VMCS) ClearErr() { m.err = nil }
