//go:build tamago && !linkcpuinit

package pc

// The board supplies cpuinit; build with -tags linkcpuinit.
var _ = buildTagLinkcpuinitIsRequired
