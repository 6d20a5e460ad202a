// Package smp holds the application processors (APs): it finds them in
// the firmware's tables (package acpi), starts each into VMX root
// operation through a real-mode trampoline, parks it there, and runs each
// held AP's VM exit loop (smp_amd64.s), which the bootstrap processor
// drives through a mailbox in the AP's parameter block (APVCPU).
package smp
