package install

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeGrubLib stands in for GRUB's grub-mkconfig_lib: /boot is the root
// of its own file system (a separate /boot partition), and the device is
// reached with one search line.
const fakeGrubLib = `
make_system_path_relative_to_its_root () { echo "$1" | sed -e "s,^$TAMAHV_BOOT,," ; }
prepare_grub_to_access_device () { echo "search --no-floppy --fs-uuid --set=root b00t" ; }
version_sort () { sort -V "$@" ; }
`

// grubd runs 42_tamahv against a fake /boot holding files, with env set,
// and returns what it writes to GRUB's configuration.
func grubd(t *testing.T, files []string, settings string, env ...string) string {
	t.Helper()
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	dir := t.TempDir()
	boot := filepath.Join(dir, "boot")
	for _, f := range files {
		p := filepath.Join(boot, f)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(f), 0o644))
	}
	lib := filepath.Join(dir, "grub-mkconfig_lib")
	require.NoError(t, os.WriteFile(lib, []byte(fakeGrubLib), 0o644))
	conf := filepath.Join(dir, "tamahv")
	require.NoError(t, os.WriteFile(conf, []byte(settings), 0o644))
	cmd := exec.Command(sh, "42_tamahv")
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "TAMAHV_BOOT=" + boot, "TAMAHV_GRUB_LIB=" + lib, "TAMAHV_SETTINGS=" + conf,
		"GRUB_DEVICE=/dev/sda2", "GRUB_DEVICE_BOOT=/dev/sda1", "GRUB_DISTRIBUTOR=Debian"}, env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "stderr: %s", stderr.String())
	return string(out)
}

// TestGrubScriptMakesAnEntryPerKernel: the newest kernel first, each with
// its initramfs, tamahv with multiboot2 and the guest's files with
// module2 --nounzip, the system's kernel command line and root device.
func TestGrubScriptMakesAnEntryPerKernel(t *testing.T) {
	out := grubd(t, []string{"tamahv/tamahv.elf", "vmlinuz-6.1.0-13-amd64", "initrd.img-6.1.0-13-amd64",
		"vmlinuz-6.1.0-57-amd64", "initrd.img-6.1.0-57-amd64", "vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-9-amd64.dpkg-tmp"},
		`TAMAHV_OPTIONS="log.alive=60s hc.ring3=secret"`+"\n",
		"GRUB_DEVICE_UUID=1234-abcd", "GRUB_CMDLINE_LINUX_DEFAULT=quiet")
	want := `menuentry 'Debian GNU/Linux, with Linux 6.1.0-57-amd64 under tamahv' --class tamahv --class gnu-linux --id 'tamahv-6.1.0-57-amd64' {
	search --no-floppy --fs-uuid --set=root b00t
	if [ "${grub_platform}" = efi ]; then insmod all_video; fi
	echo 'Loading tamahv and Linux 6.1.0-57-amd64 ...'
	multiboot2 /tamahv/tamahv.elf log.alive=60s hc.ring3=secret
	module2 --nounzip /vmlinuz-6.1.0-57-amd64 vmlinuz root=UUID=1234-abcd ro  quiet 
	module2 --nounzip /initrd.img-6.1.0-57-amd64 initrd
}
`
	assert.True(t, strings.HasPrefix(out, want), "got:\n%s", out)
	assert.Equal(t, 3, strings.Count(out, "menuentry "), "one entry a kernel, none for a dpkg temporary:\n%s", out)
	i57, i13, i9 := strings.Index(out, "Linux 6.1.0-57"), strings.Index(out, "Linux 6.1.0-13"), strings.Index(out, "Linux 6.1.0-9")
	assert.True(t, i57 < i13 && i13 < i9, "newest first:\n%s", out)
	nine := out[i9:]
	assert.NotContains(t, nine, "initrd", "a kernel without an initramfs gets none")
	assert.NotContains(t, out, "multiboot ", "never Multiboot 1")
}

// TestGrubScriptWithoutTamahvOrDisabled: no image installed, or
// TAMAHV_DISABLE=true, and the script adds nothing.
func TestGrubScriptWithoutTamahvOrDisabled(t *testing.T) {
	assert.Empty(t, grubd(t, []string{"vmlinuz-6.1.0-57-amd64"}, ""))
	assert.Empty(t, grubd(t, []string{"tamahv/tamahv.elf", "vmlinuz-6.1.0-57-amd64"}, "TAMAHV_DISABLE=true\n"))
	out := grubd(t, []string{"tamahv/tamahv.elf", "vmlinuz-6.1.0-57-amd64"}, "", "GRUB_DISABLE_LINUX_UUID=true", "GRUB_DEVICE_UUID=1234")
	assert.Contains(t, out, "root=/dev/sda2 ro", "the device name where UUIDs are off")
}

// TestDefaultSettingsAreValidShell: the settings file installed as
// /etc/default/tamahv is what the script reads.
func TestDefaultSettingsAreValidShell(t *testing.T) {
	b, err := os.ReadFile("default")
	require.NoError(t, err)
	out := grubd(t, []string{"tamahv/tamahv.elf", "vmlinuz-6.1.0-57-amd64"}, string(b))
	assert.Contains(t, out, "multiboot2 /tamahv/tamahv.elf log.alive=60s fallback=native\n", "installed entries boot the kernel natively where tamahv cannot run it")
}
