package qemu

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// TamagoGoroot is where the tamago module's cmd/tamago keeps the TamaGo Go
// distribution matching version (the tamago module's version, v1.26.0 for
// example): tamago-go/tamago-go1.26.0 in the user cache directory.
func TamagoGoroot(version string) (string, error) {
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(cache, "tamago-go", "tamago-go"+strings.TrimPrefix(version, "v")), nil
}

// TamagoVersion reads the tamago module's version from a go.mod file.
func TamagoVersion(gomod string) (string, error) {
	f, err := os.Open(gomod)
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fs := strings.Fields(strings.TrimPrefix(strings.TrimSpace(s.Text()), "require"))
		if len(fs) >= 2 && fs[0] == "github.com/usbarmory/tamago" {
			return fs[1], nil
		}
	}
	return "", fmt.Errorf("%s does not require github.com/usbarmory/tamago", gomod)
}

// ImagePrerequisites returns why the image cannot be built here, or "" if
// it can: the TamaGo distribution and GRUB's ISO tools must be present.
func ImagePrerequisites(gomod string) string {
	v, err := TamagoVersion(gomod)
	if err != nil {
		return err.Error()
	}
	root, err := TamagoGoroot(v)
	if err != nil {
		return err.Error()
	}
	if _, err := os.Stat(filepath.Join(root, "bin", "go")); err != nil {
		return fmt.Sprintf("no TamaGo Go distribution at %s (see README.md, \"The TamaGo distribution\")", root)
	}
	for _, tool := range []string{"grub-mkrescue", "xorriso"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Sprintf("%s is not installed (Debian packages grub-pc-bin, xorriso, mtools)", tool)
		}
	}
	return ""
}

// EmulatorPrerequisite returns why e cannot run here, or "".
func EmulatorPrerequisite(e Emulator) string {
	prog := "qemu-system-x86_64"
	if e == Bochs {
		prog = "bochs"
	}
	if _, err := exec.LookPath(prog); err != nil {
		return fmt.Sprintf("%s is not installed (Debian packages bochs bochsbios vgabios bochs-term, or qemu-system-x86)", prog)
	}
	if e == KVM {
		if err := KVMStatus(); err != nil {
			return "KVM with nested VMX is not available: " + err.Error()
		}
	}
	return ""
}
