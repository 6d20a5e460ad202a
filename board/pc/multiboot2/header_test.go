package multiboot2

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tamahv/tamahv/board/pc/multiboot"
)

// TestTamahvHeaderBytes checks the header byte for byte against the
// layout of the Multiboot2 Specification, "3.1 OS image format".
func TestTamahvHeaderBytes(t *testing.T) {
	h := Tamahv(Address{HeaderAddr: 0x1000f098, LoadAddr: 0x1000f000, LoadEndAddr: 0x10400000, BSSEndAddr: 0x18000000}, 0x10010000)
	want := "" +
		// magic, architecture 0 (i386), header_length 136, checksum
		"d65052e8" + "00000000" + "88000000" + "a2aead17" +
		// information request, required, 8+9*4 bytes, then 4 bytes of padding
		"0100" + "0000" + "2c000000" +
		"06000000" + "01000000" + "03000000" + "0c000000" + "0e000000" +
		"0f000000" + "11000000" + "08000000" + "15000000" + "00000000" +
		// address: header_addr, load_addr, load_end_addr, bss_end_addr
		"0200" + "0000" + "18000000" + "98f00010" + "00f00010" + "00004010" + "00000018" +
		// entry address, then padding
		"0300" + "0000" + "0c000000" + "00000110" + "00000000" +
		// console flags, optional: EGA text supported
		"0400" + "0100" + "0c000000" + "02000000" + "00000000" +
		// module alignment, end
		"0600" + "0000" + "08000000" +
		"0000" + "0000" + "08000000"
	assert.Equal(t, want, hex.EncodeToString(h.Bytes()))

	b := h.Bytes()
	le := binary.LittleEndian
	assert.Zero(t, le.Uint32(b)+le.Uint32(b[4:])+le.Uint32(b[8:])+le.Uint32(b[12:]), "checksum")
	assert.Equal(t, len(b), int(le.Uint32(b[8:])))
	assert.NotContains(t, h.Requests, uint32(TagSMBIOS), "GRUB 2.06 refuses an SMBIOS request")
	assert.Nil(t, h.Framebuffer, "no framebuffer tag: the guest is not told of one")
}

func TestHeaderRoundTrip(t *testing.T) {
	img := make([]byte, 0x2000)
	h := Tamahv(Address{HeaderAddr: 0x100100, LoadAddr: 0x100000, LoadEndAddr: 0x102000, BSSEndAddr: 0x200000}, 0x101000)
	copy(img[0x100:], h.Bytes())
	got, off, err := Find(img)
	require.NoError(t, err)
	assert.Equal(t, 0x100, off)
	assert.Equal(t, h, got)
	assert.Empty(t, got.Other)
}

// synthELF builds a minimal x86-64 executable laid out like tamahv's
// image: ELF and program headers in the first page, text at base+0x1000,
// data after it, bss beyond.
func synthELF(base uint64) []byte {
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
	ph(1, 0x2000, base+0x2000, 0x1000, 0x5000, 6)
	for i := 0x1000; i < 0x3000; i++ {
		img[i] = byte(i*7 + 1)
	}
	return img
}

func TestPatchNextToMultiboot1(t *testing.T) {
	img := synthELF(0x1000f000)
	off1, err := multiboot.Patch(img, 0x18000000)
	require.NoError(t, err)
	off2, err := Patch(img, 0x18000000)
	require.NoError(t, err)
	assert.Zero(t, off2%HeaderAlign)
	assert.GreaterOrEqual(t, off2, off1+multiboot.HeaderSize, "after the Multiboot 1 header, not over it")

	h, at, err := Find(img)
	require.NoError(t, err)
	assert.Equal(t, off2, at)
	assert.Equal(t, Tamahv(Address{
		HeaderAddr: 0x1000f000 + uint32(off2), LoadAddr: 0x1000f000, LoadEndAddr: 0x1000f000 + 0x3000, BSSEndAddr: 0x18000000,
	}, 0x1000f000+0x1010), h)
	_, at1, err := multiboot.Find(img)
	require.NoError(t, err, "the Multiboot 1 header is intact")
	assert.Equal(t, off1, at1)

	_, err = Patch(img, 0x18000000)
	assert.ErrorContains(t, err, "already has a header")

	// The reserved end never falls below the image's own end.
	img = synthELF(0x1000f000)
	_, err = Patch(img, 0)
	require.NoError(t, err)
	h, _, err = Find(img)
	require.NoError(t, err)
	assert.Equal(t, uint32(0x1000f000+0x2000+0x5000), h.Address.BSSEndAddr)
}

func TestPatchRefusesBadImages(t *testing.T) {
	_, err := Patch(synthELF(0xfffff000), 0)
	assert.ErrorIs(t, err, ErrLayout, "above 4 GiB")
	_, err = Patch([]byte("not an elf"), 0)
	assert.Error(t, err)
	img := synthELF(0x1000f000)
	for i := 64 + 2*56; i < 0x1000; i++ {
		img[i] = 0xff
	}
	_, err = Patch(img, 0)
	assert.ErrorIs(t, err, ErrNoRoom)
}

func TestFindRejectsMalformed(t *testing.T) {
	le := binary.LittleEndian
	good := Tamahv(Address{HeaderAddr: 0x100100, LoadAddr: 0x100000, LoadEndAddr: 0x102000, BSSEndAddr: 0x200000}, 0x101000)
	const at = 0x100
	// fix recomputes the checksum after a mutation.
	fix := func(b []byte) { le.PutUint32(b[12:], -(le.Uint32(b) + le.Uint32(b[4:]) + le.Uint32(b[8:]))) }
	for name, c := range map[string]struct {
		mutate func(h []byte)
		want   error
	}{
		"checksum":             {func(h []byte) { h[12]++ }, ErrNoHeader},
		"architecture":         {func(h []byte) { le.PutUint32(h[4:], 4); fix(h) }, ErrHeader},
		"length past the file": {func(h []byte) { le.PutUint32(h[8:], 0x10000); fix(h) }, ErrHeader},
		"length before end":    {func(h []byte) { le.PutUint32(h[8:], 64); fix(h) }, ErrHeader},
		"tag size below 8":     {func(h []byte) { le.PutUint32(h[20:], 4) }, ErrHeader},
		"optional request":     {func(h []byte) { le.PutUint16(h[18:], TagOptional) }, ErrHeader},
		"address tag size":     {func(h []byte) { le.PutUint32(h[68:], 20) }, ErrHeader},
		"entry outside":        {func(h []byte) { le.PutUint32(h[96:], 0x300000) }, ErrLayout},
		"header_addr":          {func(h []byte) { le.PutUint32(h[72:], 0x100200) }, ErrLayout},
		"bss before load end":  {func(h []byte) { le.PutUint32(h[84:], 0x101000) }, ErrLayout},
		"twice the entry tag": {func(h []byte) {
			copy(h[104:120], h[88:104]) // over the console flags tag
		}, ErrHeader},
		"end tag size": {func(h []byte) { le.PutUint32(h[132:], 16) }, ErrHeader},
	} {
		img := make([]byte, 0x2000)
		copy(img[at:], good.Bytes())
		c.mutate(img[at:])
		_, _, err := Find(img)
		assert.ErrorIs(t, err, c.want, name)
	}

	img := make([]byte, 0x2000)
	copy(img[at:], good.Bytes())
	copy(img[0x800:], good.Bytes())
	_, _, err := Find(img)
	assert.ErrorContains(t, err, "2 headers")

	// Past 32 KiB or off 8-byte alignment a header is not one.
	img = make([]byte, 0x10000)
	copy(img[SearchSize:], good.Bytes())
	_, _, err = Find(img)
	assert.ErrorIs(t, err, ErrNoHeader)
	img = make([]byte, 0x2000)
	copy(img[at+4:], good.Bytes())
	_, _, err = Find(img)
	assert.ErrorIs(t, err, ErrNoHeader)
}

func TestFindListsOtherTags(t *testing.T) {
	le := binary.LittleEndian
	h := Header{Requests: []uint32{TagMmap}}
	b := h.Bytes()
	// Insert an EFI boot services tag before the end tag.
	end := b[len(b)-8:]
	b = append(append(b[:len(b)-8:len(b)-8], 7, 0, 0, 0, 8, 0, 0, 0), end...)
	le.PutUint32(b[8:], uint32(len(b)))
	le.PutUint32(b[12:], -(le.Uint32(b) + le.Uint32(b[4:]) + le.Uint32(b[8:])))
	got, _, err := Find(b)
	require.NoError(t, err)
	assert.Equal(t, []uint16{HeaderTagEFIBS}, got.Other)
	assert.Equal(t, []uint32{TagMmap}, got.Requests)
}

// TestPatchGoBinary patches an executable from the Go linker, laid out
// the way the tamahv image is, with both headers, and has GRUB's own
// grub-file check them where it is installed.
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
	_, err = multiboot.Patch(img, 0x18000000)
	require.NoError(t, err)
	off, err := Patch(img, 0x18000000)
	require.NoError(t, err)
	assert.Less(t, off, 0x1000)
	h, _, err := Find(img)
	require.NoError(t, err)
	assert.Equal(t, uint32(0x1000f000), h.Address.LoadAddr)
	assert.Equal(t, uint32(before.Entry), h.Entry)
	after, err := elf.NewFile(bytes.NewReader(img))
	require.NoError(t, err)
	require.Equal(t, len(before.Sections), len(after.Sections))
	for i, s := range before.Sections {
		assert.Equal(t, s.SectionHeader, after.Sections[i].SectionHeader)
	}

	grubFile, err := exec.LookPath("grub-file")
	if err != nil {
		t.Skip("grub-file not installed")
	}
	require.NoError(t, os.WriteFile(out, img, 0o644))
	for _, kind := range []string{"--is-x86-multiboot", "--is-x86-multiboot2"} {
		assert.NoError(t, exec.Command(grubFile, kind, out).Run(), kind)
	}
}
