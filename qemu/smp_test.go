package qemu

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCPUCount(t *testing.T) {
	dir := t.TempDir()
	c := Config{Emulator: Bochs, ISO: fakeISO(t), CPUs: 2}
	require.NoError(t, c.fill())
	assert.Contains(t, bochsrc(&c, dir), "cpu: model=corei7_skylake_x, count=2,")
	c = Config{Emulator: TCG, ISO: c.ISO, CPUs: 4}
	require.NoError(t, c.fill())
	_, args, err := command(&c, dir)
	require.NoError(t, err)
	assert.Contains(t, strings.Join(args, " "), "-smp 4")
	c = Config{ISO: c.ISO}
	require.NoError(t, c.fill())
	assert.Equal(t, 1, c.CPUs)
	for _, n := range []int{-1, MaxCPUs + 1} {
		c = Config{ISO: c.ISO, CPUs: n}
		assert.Error(t, c.fill(), "%d processors", n)
	}
}

// TestBochsSMP boots the Linux guest under tamahv on a two-processor
// Bochs (corei7_skylake_x), tamahv's default: tamahv finds the second
// processor in the MADT and runs it as vCPU 1, which Linux brings up
// itself through INIT-SIPI-SIPI. The guest's init (qemu/guest/init) then
// runs hvguest identify, devmem and both swapmem reads (UserFault,
// BPFault) pinned to each processor in turn, a read whose process moves
// from one processor to the other between its request and its wait (each
// way: hvguest swapmigrate), and takes CPU 1 offline and online again;
// tamahv's final line counts both vCPUs' exits. It logs the figures of
// issue 8: the boot to the guest's init, the exits per vCPU, the swap read
// with the reader on CPU 1.
func TestBochsSMP(t *testing.T) {
	iso := isoForSMP(t)
	needEmulator(t, Bochs)
	res := bootUntilHalted(t, Config{Emulator: Bochs, ISO: iso, CPUs: 2, Timeout: 40 * time.Minute})
	checkSMP(t, res, 2)
	// The guest's ring-3 attacks, less those the one-processor test
	// makes: the exit storm needs a second processor.
	made := 0
	for _, a := range ring3Attacks {
		if slices.Contains(smpSkipped, a) {
			continue
		}
		l, _, ok := res.GuestLine("hvguest: attack " + a + ":")
		if assert.True(t, ok, "no outcome for %s", a) {
			assert.Regexp(t, outcomeRE, l)
			made++
		}
	}
	checkKicksBeforeEntry(t, res)
	checkHandoff(t, res, 2)
	if l, _ := lineWith(res.Lines, "tamahv: local APIC writes emulated "); l != "" {
		t.Logf("figures: %s", l)
	}
	checkStorm(t, res)
	t.Run("S3 refused", func(t *testing.T) { checkS3Refused(t, res) })
	_, _, ok := res.GuestLine(fmt.Sprintf("hvguest: %d ring-3 attacks made, tamahv still answers", made))
	assert.True(t, ok, "hvguest did not finish its %d ring-3 attacks", made)
}

// checkStorm: a CPUID loop on one processor slows a swap read on
// another by a quarter at most (the exit-storm attack): its exits never
// reach the bootstrap processor.
func checkStorm(t *testing.T, res *Result) {
	t.Helper()
	storm, _, _ := res.GuestLine("hvguest: attack exit-storm:")
	assert.Contains(t, storm, "served in", "the read during the exit storm")
	t.Logf("figures: %s", storm)
	if i := strings.Index(storm, "without: "); assert.GreaterOrEqual(t, i, 0, "no read without the storm: %q", storm) {
		var times float64
		_, err := fmt.Sscanf(storm[i:], "without: %g times as long", &times)
		if assert.NoError(t, err, storm) {
			assert.LessOrEqual(t, times, 1.25, "the storm slowed the read on CPU 0")
		}
	}
}

// checkHandoff: an AP's exit reaches its handler on the bootstrap
// processor with the fields it reads taken at the exit, and its writes
// travel with the command that resumes the guest; on average an exit
// costs at most two commands to the AP (the resuming one, and a CPUID or
// RDMSR it executes there). A CPUID exit, from a process pinned to each
// processor in turn, costs at most 500 TSC ticks.
func checkHandoff(t *testing.T, res *Result, cpus int) {
	t.Helper()
	for i := 1; i < cpus; i++ {
		var cmds, exits int
		var l string
		for _, x := range res.Lines {
			if strings.HasPrefix(x, fmt.Sprintf("tamahv: vCPU %d: ", i)) && strings.Contains(x, " commands to its processor for ") {
				l = x
			}
		}
		if _, err := fmt.Sscanf(l, fmt.Sprintf("tamahv: vCPU %d: ", i)+"%d commands to its processor for %d exits handed over", &cmds, &exits); err != nil {
			t.Errorf("no count of vCPU %d's commands: %q", i, l)
			continue
		}
		t.Logf("figures: vCPU %d: %d commands to its processor for %d exits handed over (%.2f an exit)", i, cmds, exits, float64(cmds)/float64(exits))
		assert.Greater(t, exits, 0)
		assert.LessOrEqual(t, float64(cmds)/float64(exits), 2.0, "vCPU %d's exits cost more than two commands each", i)
	}
	for c := 0; c < cpus; c++ {
		cost, call := "", ""
		for _, l := range res.Guest {
			if strings.HasPrefix(l, "hvguest: CPUID costs ") {
				cost = l
			}
			if strings.HasPrefix(l, "hvguest: a hypercall costs ") {
				call = l
			}
			if l == fmt.Sprintf("guest: smp cpu %d call-cost ok", c) {
				t.Logf("figures: pinned to CPU %d: %s", c, call)
			}
			if l == fmt.Sprintf("guest: smp cpu %d cpuid-cost ok", c) {
				t.Logf("figures: pinned to CPU %d: %s", c, cost)
				var ticks int
				if _, err := fmt.Sscanf(cost, "hvguest: CPUID costs %d TSC ticks", &ticks); assert.NoError(t, err, "CPU %d: %q", c, cost) {
					assert.LessOrEqual(t, ticks, 500, "a CPUID exit on CPU %d", c)
				}
			}
		}
	}
}

// checkKicksBeforeEntry: the 2-processor ISO has tamahv send vCPU 1's
// processor a kick just before every 64th entry (smp.kickcheck=64, as a
// shootdown's kick that races the entry). Such an NMI reaches the AP in
// VMX root before its entry, which its exit loop then cuts short, or in
// the guest; either way the guest never receives it.
func checkKicksBeforeEntry(t *testing.T, res *Result) {
	t.Helper()
	var kicks, cuts int
	l, _ := lineWith(res.Lines, "tamahv: vCPU 1: ")
	if _, err := fmt.Sscanf(l, "tamahv: vCPU 1: %d kicks sent just before an entry", &kicks); err != nil {
		t.Errorf("no count of the kicks sent before an entry: %q", l)
	}
	l, _ = lineWith(res.Lines, "tamahv: vCPU 1 entered the guest ")
	if i := strings.Index(l, "and cut "); i < 0 {
		t.Errorf("no count of the entries cut short: %q", l)
	} else if _, err := fmt.Sscanf(l[i:], "and cut %d entries short", &cuts); err != nil {
		t.Errorf("no count of the entries cut short: %q: %v", l, err)
	}
	t.Logf("figures: %d kicks sent just before vCPU 1's entries; %d entries cut short", kicks, cuts)
	assert.Greater(t, kicks, 0, "no kick was sent before an entry")
	assert.Greater(t, cuts, 0, "no entry was cut short")
	assert.NotContains(t, res.GuestSerial(), "NMI received for unknown reason", "a kick reached the guest")
}

// TestBochsSMPParked boots the Linux guest under tamahv on a
// two-processor Bochs with smp.park on tamahv's command line: tamahv
// parks the second processor in VMX root operation before the guest
// starts and hides it from the guest's MADT, so the guest runs on the one
// processor tamahv virtualizes and no processor runs natively (make
// e2e-smp, or TAMAHV_E2E_SMP=1 after make iso-park).
func TestBochsSMPParked(t *testing.T) {
	if os.Getenv("TAMAHV_E2E_SMP") == "" {
		t.Skip("on demand: make e2e-smp (TAMAHV_E2E_SMP=1)")
	}
	iso := isoForPark(t)
	needEmulator(t, Bochs)
	res := bootUntilHalted(t, Config{Emulator: Bochs, ISO: iso, CPUs: 2, Timeout: 8 * time.Minute})
	t.Logf("tamahv:\n%s", res.Serial())
	for _, want := range []string{
		"tamahv: processors: 2 listed (MADT), bootstrap APIC ID 0",
		"tamahv: AP APIC ID 1: parked in VMX root operation",
		"tamahv: hidden from the guest: APIC IDs [1]",
		"tamahv: guest started",
	} {
		l, _ := lineWith(res.Lines, want)
		assert.NotEmpty(t, l, "tamahv did not print %q", want)
	}
	exited, _ := lineWith(res.Lines, "tamahv: guest exited")
	require.Equal(t, "tamahv: guest exited (status 0)", strings.SplitN(exited, " after", 2)[0], "tamahv:\n%s", res.Serial())
	for _, want := range []string{"guest: kernel log clean", "hvguest: running under tamahv"} {
		l, _, ok := res.GuestLine(want)
		assert.True(t, ok, "the guest did not print %q", want)
		assert.NotContains(t, l, "FAILED")
	}
	assert.True(t, guestContains(res, "smp: Brought up 1 node, 1 CPU"), "the guest runs on one processor")
	assert.True(t, guestContains(res, "smpboot: Total of 1 processors activated"))
	assert.False(t, guestContains(res, "Brought up 1 node, 2 CPUs"), "the guest brought up a processor tamahv does not virtualize")
}

// checkSMP checks a boot of the Linux guest on cpus processors under
// tamahv, and logs its figures.
func checkSMP(t *testing.T, res *Result, cpus int) {
	t.Helper()
	t.Logf("tamahv:\n%s", res.Serial())
	t.Logf("guest console (tail):\n%s", tail(res.GuestSerial(), 80))
	logMilestones(t, res)
	for _, want := range []string{
		fmt.Sprintf("tamahv: processors: %d listed (MADT)", cpus),
		// Bochs 2.7 keeps an INIT pending in VMX non-root: its BIOS's
		// tables and its processor without the hypervisor bit keep the
		// local APIC's writes trapped.
		bochsAPICLine,
		"tamahv: guest started",
	} {
		l, _ := lineWith(res.Lines, want)
		assert.NotEmpty(t, l, "tamahv did not print %q", want)
	}
	for i := 0; i < cpus; i++ {
		l, _ := lineWith(res.Lines, fmt.Sprintf("tamahv: vCPU %d started", i))
		assert.NotEmpty(t, l, "tamahv did not start vCPU %d", i)
	}
	// tamahv hides each AP until its vCPU waits for the guest's start-up
	// IPI, then lists it again.
	for i := 1; i < cpus; i++ {
		shown := false
		for _, l := range res.Lines {
			shown = shown || strings.HasPrefix(l, "tamahv: AP APIC ID ") && strings.HasSuffix(l, fmt.Sprintf(": vCPU %d waits for start-up", i))
		}
		assert.True(t, shown, "tamahv did not give vCPU %d to the guest", i)
	}
	for _, l := range res.Lines {
		// The vCPUs' start (the SIPI's), their exits by reason.
		if strings.HasPrefix(l, "tamahv: vCPU") || strings.Contains(l, "SIPI") || strings.HasPrefix(l, "tamahv: exits") {
			t.Log(l)
		}
	}
	if l, at, ok := res.GuestLine("guest: init started"); ok {
		t.Logf("figures: boot to the guest's init: %v of wall time (%s)", at.Round(time.Millisecond), l)
	}
	exited, _ := lineWith(res.Lines, "tamahv: guest exited")
	status, total, per, err := vcpuExits(exited)
	if assert.NoError(t, err, "tamahv:\n%s", res.Serial()) {
		assert.Equal(t, 0, status, exited)
		if assert.Len(t, per, cpus, "exits for each vCPU: %s", exited) {
			var sum uint64
			for i, n := range per {
				assert.NotZero(t, n, "vCPU %d made no exit: %s", i, exited)
				sum += n
			}
			assert.Equal(t, total, sum, "the vCPUs' exits add up to the total: %s", exited)
		}
		t.Logf("figures: exits per vCPU: %v (%d in all)", per, total)
	}

	// The guest: Linux brought every processor up, and the checks pinned
	// to each passed.
	brought := fmt.Sprintf("smp: Brought up 1 node, %d CPUs", cpus)
	assert.True(t, guestContains(res, brought), "the guest did not print %q (it runs on fewer processors):\n%s", brought, smpLines(res))
	assert.False(t, guestContains(res, "smp: Brought up 1 node, 1 CPU"), "the guest runs on one processor")
	assert.True(t, guestContains(res, fmt.Sprintf("smpboot: Total of %d processors activated", cpus)))
	for _, want := range []string{"guest: kernel log clean", "hvguest: running under tamahv"} {
		l, _, ok := res.GuestLine(want)
		assert.True(t, ok, "the guest did not print %q:\n%s", want, tail(res.GuestSerial(), 40))
		assert.NotContains(t, l, "FAILED")
	}
	// The guest's init makes its SMP checks only with several
	// processors online: one failure, not one a check, when it has one.
	online, _, ok := res.GuestLine("guest: smp: ")
	if !assert.True(t, ok, "the guest's init made no SMP checks: it has one processor online") {
		return
	}
	t.Log(online)
	assert.Equal(t, fmt.Sprintf("guest: smp: %d processors online (0-%d)", cpus, cpus-1), online)
	checks := smpChecks(res.Guest)
	for _, name := range wantSMPChecks(cpus) {
		v, ok := checks[name]
		if assert.True(t, ok, "the guest did not check %q (no \"guest: smp %s ok\")", name, name) {
			assert.Equal(t, "ok", v, "guest: smp %s", name)
		}
	}
	for name, v := range checks {
		assert.Equal(t, "ok", v, "guest: smp %s", name)
	}
	_, _, done := res.GuestLine("guest: smp done")
	assert.True(t, done, "the guest did not finish its SMP checks (\"guest: smp done\")")
	// The BPFault read stays pending across its reader's move; a
	// UserFault read may end first, served by the process's other threads
	// (hvguest swapmigrate).
	_, _, ok = res.GuestLine("swapread: migrate ok: sent on CPU 1, answered on CPU 0")
	assert.True(t, ok, "the guest did not print the BPFault migration's answer")
	moved, _, ok := res.GuestLine("swapread: migrate ok: sent on CPU 0, answered on CPU 1")
	if !ok {
		moved, _, ok = res.GuestLine("swapread: migrate: the read was no longer pending after the move (status 2): the process's threads on CPU 0 served it")
	}
	assert.True(t, ok, "the guest did not print the UserFault migration's outcome")
	t.Logf("UserFault migration: %s", moved)
	// The swap reads with the reader on CPU 1.
	for _, name := range []string{"cpu 1 swapread-user", "cpu 1 swapread-bp", "migrate user cpu 0 to 1"} {
		t.Logf("figures: %s: %s", name, pinnedRead(res, name))
	}
}

// smpLines returns the guest's lines about its processors.
func smpLines(res *Result) string {
	var out []string
	for _, l := range res.Guest {
		if strings.Contains(l, "smp") || strings.Contains(l, "CPU") || strings.Contains(l, "APIC") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// exitedRE matches tamahv's last line: its status and the exits of each
// vCPU.
var exitedRE = regexp.MustCompile(`^tamahv: guest exited \(status (-?\d+)\) after (\d+) exits \(((?:vCPU \d+: \d+, )*vCPU \d+: \d+)\)$`)

// vcpuExits reads "tamahv: guest exited (status S) after N exits (vCPU 0:
// a, vCPU 1: b, ...)": the status, the total and the exits of each vCPU,
// in vCPU order.
func vcpuExits(l string) (status int, total uint64, per []uint64, err error) {
	m := exitedRE.FindStringSubmatch(l)
	if m == nil {
		return 0, 0, nil, fmt.Errorf("not tamahv's exit line with each vCPU's exits: %q", l)
	}
	status, _ = strconv.Atoi(m[1])
	total, _ = strconv.ParseUint(m[2], 10, 64)
	for i, f := range strings.Split(m[3], ", ") {
		var id int
		var n uint64
		if _, err := fmt.Sscanf(f, "vCPU %d: %d", &id, &n); err != nil || id != i {
			return 0, 0, nil, fmt.Errorf("vCPU %d's exits out of place in %q", i, l)
		}
		per = append(per, n)
	}
	return status, total, per, nil
}

// smpCheckRE matches the guest init's lines "guest: smp NAME ok|FAILED".
var smpCheckRE = regexp.MustCompile(`^guest: smp (.+) (ok|FAILED)$`)

// smpChecks returns the verdict of each of the guest's SMP checks by name.
func smpChecks(guest []string) map[string]string {
	checks := map[string]string{}
	for _, l := range guest {
		if m := smpCheckRE.FindStringSubmatch(l); m != nil {
			checks[m[1]] = m[2]
		}
	}
	return checks
}

// wantSMPChecks returns the checks the guest's init makes on cpus
// processors (qemu/guest/init).
func wantSMPChecks(cpus int) []string {
	var want []string
	for c := 0; c < cpus; c++ {
		for _, n := range []string{"identify", "devmem", "swapread-user", "swapread-bp"} {
			want = append(want, fmt.Sprintf("cpu %d %s", c, n))
		}
	}
	return append(want, "migrate user cpu 0 to 1", "migrate bp cpu 1 to 0",
		"cpu 1 offline", "cpu 0 identify-while-cpu1-offline", "cpu 1 online", "cpu 1 identify-after-online")
}

// swapBytesRE matches hvguest's line about the range it pushed to swap.
var swapBytesRE = regexp.MustCompile(`^swapread: \d+ bytes at 0x[0-9a-f]+, sha256 ([0-9a-f]+), `)

// pinnedRead returns the figures of the guest's swap read whose check is
// name: the wall time from its range's line to its check's line, the
// guest's own time for it, and tamahv's line about it (matched by the
// range's SHA-256: each of the guest's SMP reads has its own page count)
// with its figures per page.
func pinnedRead(res *Result, name string) string {
	end := -1
	for i, l := range res.Guest {
		if l == "guest: smp "+name+" ok" || l == "guest: smp "+name+" FAILED" {
			end = i
			break
		}
	}
	if end < 0 {
		return "none (no check line)"
	}
	begin, hash, took := -1, "", ""
	for i := end - 1; i >= 0 && !strings.HasPrefix(res.Guest[i], "guest: smp "); i-- {
		if m := swapBytesRE.FindStringSubmatch(res.Guest[i]); m != nil && begin < 0 {
			begin, hash = i, m[1]
		}
		if strings.HasPrefix(res.Guest[i], "swapread: tamahv read the range in ") && took == "" {
			took = strings.TrimPrefix(res.Guest[i], "swapread: ")
		}
	}
	if begin < 0 {
		return "none (no range line before " + res.Guest[end] + ")"
	}
	out := fmt.Sprintf("%v of wall time from the request to the answer; %s", (res.GuestAt[end] - res.GuestAt[begin]).Round(time.Millisecond), took)
	for _, l := range res.Lines {
		if strings.HasPrefix(l, "tamahv: swapmem read ok: sha256 "+hash) || strings.HasPrefix(l, "tamahv: swapmem read FAILED") && strings.Contains(l, hash) {
			return out + "; " + l + "; " + perPage(l)
		}
	}
	return out + "; no tamahv line with sha256 " + hash
}

// guestContains reports whether a guest line contains s (kernel lines
// start with a timestamp).
func guestContains(res *Result, s string) bool {
	for _, l := range res.Guest {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}

// TestBochsSMPModels boots the Linux guest under tamahv with 4
// processors on each Bochs model the guest runs on: Linux brings all 4 up
// and the guest's init makes its checks pinned to each, with the
// hand-off's and the exit storm's figures held as TestBochsSMP holds them
// (make e2e-smp, or TAMAHV_E2E_SMP=1).
func TestBochsSMPModels(t *testing.T) {
	if os.Getenv("TAMAHV_E2E_SMP") == "" {
		t.Skip("on demand: make e2e-smp (TAMAHV_E2E_SMP=1)")
	}
	iso := isoForTest(t)
	needEmulator(t, Bochs)
	for _, model := range []string{"corei7_skylake_x", "broadwell_ult"} {
		t.Run(model, func(t *testing.T) {
			res := bootUntilHalted(t, Config{Emulator: Bochs, ISO: iso, Model: model, CPUs: 4, Timeout: 20 * time.Minute})
			checkSMP(t, res, 4)
			checkHandoff(t, res, 4)
			checkStorm(t, res)
		})
	}
}

func TestVCPUExits(t *testing.T) {
	status, total, per, err := vcpuExits("tamahv: guest exited (status 0) after 1234 exits (vCPU 0: 1000, vCPU 1: 234)")
	require.NoError(t, err)
	assert.Equal(t, 0, status)
	assert.Equal(t, uint64(1234), total)
	assert.Equal(t, []uint64{1000, 234}, per)
	_, _, per, err = vcpuExits("tamahv: guest exited (status 3) after 7 exits (vCPU 0: 7)")
	require.NoError(t, err)
	assert.Equal(t, []uint64{7}, per)
	for _, l := range []string{
		"",
		"tamahv: guest exited (status 0)",
		"tamahv: guest exited (status 0) after 7 exits",
		"tamahv: guest exited (status 0) after 7 exits (vCPU 1: 7)",
		"tamahv: guest exited (status 0) after 7 exits (vCPU 0: 3, vCPU 2: 4)",
	} {
		_, _, _, err := vcpuExits(l)
		assert.Error(t, err, "%q", l)
	}
}

func TestSMPChecks(t *testing.T) {
	guest := []string{
		"guest: smp: 2 processors online (0-1)",
		"hvguest: running under tamahv, hypercall interface version 1",
		"guest: smp cpu 0 identify ok",
		"guest: smp cpu 1 swapread-user FAILED",
		"guest: smp migrate user cpu 0 to 1 ok",
		"guest: smp: online 0",
		"guest: smp done",
	}
	assert.Equal(t, map[string]string{"cpu 0 identify": "ok", "cpu 1 swapread-user": "FAILED", "migrate user cpu 0 to 1": "ok"}, smpChecks(guest))
	want := wantSMPChecks(2)
	assert.Len(t, want, 14)
	assert.Contains(t, want, "cpu 1 swapread-bp")
	assert.Contains(t, want, "cpu 1 identify-after-online")
	assert.Len(t, wantSMPChecks(4), 22)
}

func TestPinnedRead(t *testing.T) {
	res := &Result{
		Guest: []string{
			"guest: smp cpu 1 swapread-user ok",
			"swapread: 73528 bytes at 0x7f0000000064, sha256 ab12, 19 of 19 pages swapped out",
			"[   12.000000] a kernel line",
			"swapread: tamahv read the range in 120ms of guest time; 19 of 19 pages present again",
			"guest: smp cpu 1 swapread-bp ok",
		},
		GuestAt: []time.Duration{0, 2 * time.Second, 3 * time.Second, 4 * time.Second, 5 * time.Second},
		Lines: []string{
			"tamahv: swapmem read ok: sha256 cd34, 1 bytes, 1 pages faulted in, 1 #PFs injected, 0 vetoed, 2 exits (0 preemption timer), 1ms (flags 0)",
			"tamahv: swapmem read ok: sha256 ab12, 73528 bytes, 19 pages faulted in, 19 #PFs injected, 0 vetoed, 38 exits (1 preemption timer), 95ms (flags 0)",
		},
	}
	got := pinnedRead(res, "cpu 1 swapread-bp")
	assert.Contains(t, got, "3s of wall time")
	assert.Contains(t, got, "tamahv read the range in 120ms of guest time")
	assert.Contains(t, got, "sha256 ab12, 73528 bytes")
	assert.Contains(t, got, "figures: 19 pages (19 faulted in, 19 #PFs): 2.00 exits a page, 5ms a page, 1 preemption-timer exits")
	assert.Contains(t, pinnedRead(res, "cpu 0 swapread-bp"), "none")
	assert.Contains(t, pinnedRead(res, "cpu 1 swapread-user"), "none")
}

// isoForPark is the ISO make iso-park builds: tamahv with smp.park, the
// application processors parked and hidden.
func isoForPark(t *testing.T) string {
	iso, err := filepath.Abs("../build/park.iso")
	require.NoError(t, err)
	if _, err := os.Stat(iso); err != nil {
		t.Skip("no build/park.iso: make iso-park builds it")
	}
	return iso
}
