package multiboot

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// synthELF builds a minimal x86-64 executable: ELF and program headers in
// the first page, text at base+0x1000, data after it, bss beyond.
func synthELF(base uint64, linear bool) []byte {
	img := make([]byte, 0x3000)
	copy(img, "\x7fELF")
	img[4], img[5], img[6] = 2, 1, 1 // ELF64, little endian, version
	le := binary.LittleEndian
	le.PutUint16(img[16:], 2)    // ET_EXEC
	le.PutUint16(img[18:], 0x3e) // EM_X86_64
	le.PutUint32(img[20:], 1)
	le.PutUint64(img[24:], base+0x1010) // entry
	le.PutUint64(img[32:], 64)          // phoff
	le.PutUint16(img[52:], 64)          // ehsize
	le.PutUint16(img[54:], 56)          // phentsize
	le.PutUint16(img[56:], 2)           // phnum
	ph := func(i int, off, addr, filesz, memsz uint64, flags uint32) {
		p := img[64+56*i:]
		le.PutUint32(p[0:], 1) // PT_LOAD
		le.PutUint32(p[4:], flags)
		le.PutUint64(p[8:], off)
		le.PutUint64(p[16:], addr)
		le.PutUint64(p[24:], addr)
		le.PutUint64(p[32:], filesz)
		le.PutUint64(p[40:], memsz)
		le.PutUint64(p[48:], 0x1000)
	}
	ph(0, 0, base, 0x2000, 0x2000, 5)
	dataOff := uint64(0x2000)
	if !linear {
		dataOff = 0x1800
	}
	ph(1, dataOff, base+0x2000, 0x1000, 0x5000, 6)
	for i := 0x1000; i < 0x3000; i++ {
		img[i] = byte(i*7 + 1)
	}
	return img
}

func TestPatchSynthetic(t *testing.T) {
	img := synthELF(0x1000f000, true)
	off, err := Patch(img, 0x18000000)
	require.NoError(t, err)
	assert.Equal(t, 64+2*56, off, "right after the program headers")
	h, at, err := Find(img)
	require.NoError(t, err)
	assert.Equal(t, off, at)
	assert.Equal(t, Header{
		Magic: HeaderMagic, Flags: FlagPageAlign | FlagMemInfo | FlagAddresses, Checksum: 0xe4514ffb, // -(magic+flags) mod 2^32
		HeaderAddr: 0x1000f000 + uint32(off), LoadAddr: 0x1000f000, LoadEndAddr: 0x1000f000 + 0x3000,
		BSSEndAddr: 0x18000000, EntryAddr: 0x1000f000 + 0x1010,
	}, h)
	// A second patch is refused; the reserved end never falls below the image.
	_, err = Patch(img, 0)
	assert.Error(t, err)
	img = synthELF(0x1000f000, true)
	_, err = Patch(img, 0x1000)
	require.NoError(t, err)
	h, _, _ = Find(img)
	assert.Equal(t, uint32(0x1000f000+0x2000+0x5000), h.BSSEndAddr)
}

func TestPatchRefusesBadImages(t *testing.T) {
	_, err := Patch(synthELF(0x1000f000, false), 0)
	assert.ErrorIs(t, err, ErrLayout, "file offsets not linear")
	_, err = Patch(synthELF(0xfffff000, true), 0)
	assert.ErrorIs(t, err, ErrLayout, "above 4 GiB")
	_, err = Patch([]byte("not an elf"), 0)
	assert.Error(t, err)
	img := synthELF(0x1000f000, true)
	for i := 64 + 2*56; i < 0x1000; i++ {
		img[i] = 0xff
	}
	_, err = Patch(img, 0)
	assert.ErrorIs(t, err, ErrNoRoom)
}

func TestFindRejectsDuplicatesAndNonsense(t *testing.T) {
	img := make([]byte, 0x3000)
	_, _, err := Find(img)
	assert.ErrorIs(t, err, ErrNoHeader)
	put := func(off int, h Header) { copy(img[off:], h.bytes()) }
	h := Header{Magic: HeaderMagic, Flags: FlagAddresses, HeaderAddr: 0x1100, LoadAddr: 0x1000, LoadEndAddr: 0x2000, BSSEndAddr: 0x3000, EntryAddr: 0x1800}
	h.Checksum = -(h.Magic + h.Flags)
	put(0x100, h)
	_, off, err := Find(img)
	require.NoError(t, err)
	assert.Equal(t, 0x100, off)
	put(0x200, h)
	_, _, err = Find(img)
	assert.ErrorContains(t, err, "2 headers")
	img = make([]byte, 0x3000)
	h.EntryAddr = 0x2800
	put(0x100, h)
	_, _, err = Find(img)
	assert.ErrorIs(t, err, ErrLayout)
}

// TestPatchGoBinary patches an executable from the Go linker, laid out
// the way the tamahv image is.
func TestPatchGoBinary(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "main.go"), []byte("package main\nfunc main() {}\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module m\n"), 0o644))
	out := filepath.Join(dir, "m.elf")
	cmd := exec.Command("go", "build", "-ldflags", "-T 0x10010000 -R 0x1000", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOOS=linux", "GOARCH=amd64", "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("cannot build a Go test binary: %v: %s", err, b)
	}
	img, err := os.ReadFile(out)
	require.NoError(t, err)
	before, err := elf.NewFile(bytes.NewReader(img))
	require.NoError(t, err)
	off, err := Patch(img, 0x18000000)
	require.NoError(t, err)
	assert.Less(t, off, 0x1000)
	h, _, err := Find(img)
	require.NoError(t, err)
	assert.Equal(t, uint32(0x1000f000), h.LoadAddr)
	// Nothing of the ELF file was overwritten: its sections read the same.
	after, err := elf.NewFile(bytes.NewReader(img))
	require.NoError(t, err)
	require.Equal(t, len(before.Sections), len(after.Sections))
	for i, s := range before.Sections {
		assert.Equal(t, s.SectionHeader, after.Sections[i].SectionHeader)
	}
}

// physMem is sparse physical memory for Parse.
type physMem map[uint64][]byte

func (m physMem) ReadPhys(pa uint64, p []byte) error {
	for base, b := range m {
		if pa >= base && pa+uint64(len(p)) <= base+uint64(len(b)) {
			copy(p, b[pa-base:])
			return nil
		}
	}
	return fmt.Errorf("no memory at %#x+%d", pa, len(p))
}

func infoFixture() (physMem, []byte) {
	le := binary.LittleEndian
	info := make([]byte, 88)
	le.PutUint32(info[0:], InfoMem|InfoCmdline|InfoMods|InfoMmap|InfoLoaderName)
	le.PutUint32(info[4:], 639)
	le.PutUint32(info[8:], 1047552)
	le.PutUint32(info[16:], 0x2000)
	le.PutUint32(info[20:], 2)
	le.PutUint32(info[24:], 0x3000)
	le.PutUint32(info[44:], 3*24)
	le.PutUint32(info[48:], 0x4000)
	le.PutUint32(info[64:], 0x2100)
	strs := make([]byte, 0x200)
	copy(strs, "/boot/tamahv.elf console=com1\x00")
	copy(strs[0x100:], "GRUB 2.06\x00")
	copy(strs[0x180:], "vmlinuz quiet\x00")
	mods := make([]byte, 32)
	le.PutUint32(mods[0:], 0x20000000)
	le.PutUint32(mods[4:], 0x20800000)
	le.PutUint32(mods[8:], 0x2180)
	le.PutUint32(mods[16:], 0x21000000)
	le.PutUint32(mods[20:], 0x21000000)
	mmap := make([]byte, 72)
	ent := func(i int, base, n uint64, typ uint32) {
		e := mmap[24*i:]
		le.PutUint32(e[0:], 20)
		le.PutUint64(e[4:], base)
		le.PutUint64(e[12:], n)
		le.PutUint32(e[20:], typ)
	}
	ent(0, 0, 0x9fc00, MemAvailable)
	ent(1, 0xf0000, 0x10000, MemReserved)
	ent(2, 0x100000, 0x3ff00000, MemAvailable)
	m := physMem{0x1000: info, 0x2000: strs, 0x3000: mods, 0x4000: mmap}
	return m, info
}

func TestParse(t *testing.T) {
	m, _ := infoFixture()
	in, err := Parse(m, BootMagic, 0x1000)
	require.NoError(t, err)
	assert.Equal(t, "/boot/tamahv.elf console=com1", in.Cmdline)
	assert.Equal(t, "GRUB 2.06", in.LoaderName)
	assert.Equal(t, uint32(1047552), in.MemUpper)
	assert.Equal(t, []Module{{0x20000000, 0x20800000, "vmlinuz quiet"}, {0x21000000, 0x21000000, ""}}, in.Modules)
	require.Len(t, in.MemoryMap, 3)
	assert.Equal(t, Region{0x100000, 0x3ff00000, MemAvailable}, in.MemoryMap[2])
	assert.Equal(t, uint64(0x40000000), in.MemoryMap[2].End())
}

func TestParseRejectsMalformed(t *testing.T) {
	le := binary.LittleEndian
	for name, mutate := range map[string]func(m physMem, info []byte){
		"too many modules":     func(m physMem, info []byte) { le.PutUint32(info[20:], MaxModules+1) },
		"modules unreadable":   func(m physMem, info []byte) { le.PutUint32(info[24:], 0x9000) },
		"module ends early":    func(m physMem, info []byte) { le.PutUint32(m[0x3000][4:], 0x100) },
		"mmap too long":        func(m physMem, info []byte) { le.PutUint32(info[44:], MaxMmapLength+1) },
		"mmap entry too big":   func(m physMem, info []byte) { le.PutUint32(m[0x4000][24:], 200) },
		"mmap entry too small": func(m physMem, info []byte) { le.PutUint32(m[0x4000][0:], 8) },
		"mmap truncated":       func(m physMem, info []byte) { le.PutUint32(info[44:], 3*24-2) },
		"cmdline unterminated": func(m physMem, info []byte) {
			m[0x2000] = make([]byte, 8192)
			for i := range m[0x2000] {
				m[0x2000][i] = 'a'
			}
		},
		"cmdline unreadable": func(m physMem, info []byte) { le.PutUint32(info[16:], 0xdead0000) },
	} {
		m, info := infoFixture()
		mutate(m, info)
		_, err := Parse(m, BootMagic, 0x1000)
		assert.ErrorIs(t, err, ErrBadInfo, name)
	}
	m, _ := infoFixture()
	_, err := Parse(m, 0x1234, 0x1000)
	assert.ErrorIs(t, err, ErrBadInfo)
	_, err = Parse(m, BootMagic, 0x7000)
	assert.True(t, errors.Is(err, ErrBadInfo))
	assert.Equal(t, ^uint64(0), Region{Base: ^uint64(0) - 1, Length: 10}.End())
}
