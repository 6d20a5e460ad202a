#!/bin/sh
# capture.sh boots the Multiboot2 probe (probe/) through GRUB 2 in QEMU,
# once with SeaBIOS and once with OVMF (UEFI), and writes what GRUB
# handed the probe into this directory:
#
#   grub-bios.mbi, grub-efi.mbi   the raw boot information structures
#   grub-efi-mem.txt              "ADDR HEX" lines: the EFI system table,
#                                 its configuration table and the ACPI
#                                 RSDPs it points to, as the probe read them
#
# Needs (Debian): qemu-system-x86 grub-pc-bin grub-efi-amd64-bin ovmf
# xorriso mtools binutils, and Go. Run from anywhere:
#
#   sh board/pc/multiboot2/testdata/capture.sh
#
# CAPTURE_LOGS=DIR keeps both serial logs in DIR; CAPTURE_TIMEOUT=S
# limits each QEMU run (default 180 s).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
limit=${CAPTURE_TIMEOUT:-180}

# The probe, with tamahv's headers.
as --64 -o "$work/probe.o" "$here/probe/probe.s"
ld -m elf_x86_64 -z max-page-size=0x1000 --no-warn-rwx-segments \
	-T "$here/probe/probe.ld" -o "$work/probe.elf" "$work/probe.o"
(cd "$root" && go run ./board/pc/multiboot2/testdata/probe/patch.go "$work/probe.elf")
grub-file --is-x86-multiboot2 "$work/probe.elf"

# An ISO as an installed system's menu entry would load it: the video
# drivers (Debian's load_video), the image, a kernel with its command
# line, an early and a main initrd.
mkdir -p "$work/iso/boot/grub"
cp "$work/probe.elf" "$work/iso/boot/probe.elf"
head -c 300000 /dev/zero | tr '\0' 'k' > "$work/iso/boot/vmlinuz"
head -c 40000 /dev/zero | tr '\0' 'u' > "$work/iso/boot/ucode.img"
head -c 1000000 /dev/zero | tr '\0' 'i' > "$work/iso/boot/initrd.img"
cat > "$work/iso/boot/grub/grub.cfg" <<'CFG'
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry "mb2probe" {
	insmod all_video
	multiboot2 /boot/probe.elf hc.ring3=secret console=com1
	module2 /boot/vmlinuz vmlinuz root=UUID=0a1b2c3d-1234-5678-9abc-def012345678 ro quiet
	module2 --nounzip /boot/ucode.img ucode
	module2 --nounzip /boot/initrd.img initrd
	boot
}
CFG
grub-mkrescue -o "$work/mb2.iso" "$work/iso" >/dev/null 2>&1

# run LOG ARGS... runs QEMU for at most $limit seconds; the probe ends it
# through isa-debug-exit. Only the QEMU started here is ever killed.
run() {
	log=$1
	shift
	qemu-system-x86_64 -machine q35 -m 1G -display none -monitor none -no-reboot \
		-device isa-debug-exit,iobase=0xf4,iosize=0x04 \
		-cdrom "$work/mb2.iso" -serial "file:$log" "$@" &
	pid=$!
	t=0
	while kill -0 "$pid" 2>/dev/null; do
		if [ "$t" -ge "$limit" ]; then
			kill "$pid"
			wait "$pid" || true
			echo "capture: QEMU ran past ${limit}s; log:" >&2
			cat "$log" >&2
			exit 1
		fi
		sleep 1
		t=$((t + 1))
	done
	wait "$pid" || true
	grep -q 'mb2probe: done' "$log" || { echo "capture: the probe did not finish; log:" >&2; cat "$log" >&2; exit 1; }
}

# decode LOG writes the memory blocks of LOG as "ADDR HEX" lines.
decode() {
	tr -d '\r' < "$1" | awk '
		function hexval(s,  i, n) {
			n = 0
			for (i = 1; i <= length(s); i++) n = n * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
			return n
		}
		/mb2probe: mem / { sub(/.*mb2probe: mem /, ""); addr = $1; left = 2 * hexval($2); hex = ""; if (left == 0) print addr " "; next }
		left > 0 { hex = hex $0; left -= length($0); if (left <= 0) print addr " " hex }
	'
}

run "$work/bios.log"
cp /usr/share/OVMF/OVMF_VARS.fd "$work/vars.fd"
run "$work/efi.log" \
	-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd \
	-drive "if=pflash,format=raw,file=$work/vars.fd"

decode "$work/bios.log" | head -n 1 | cut -d' ' -f2 | xxd -r -p > "$here/grub-bios.mbi"
decode "$work/efi.log" | head -n 1 | cut -d' ' -f2 | xxd -r -p > "$here/grub-efi.mbi"
decode "$work/efi.log" | tail -n +2 > "$here/grub-efi-mem.txt"
if [ -n "${CAPTURE_LOGS:-}" ]; then cp "$work/bios.log" "$work/efi.log" "$CAPTURE_LOGS/"; fi
grep -h 'mb2probe: magic' "$work/bios.log" "$work/efi.log" | sed 's/.*mb2probe/mb2probe/'
ls -l "$here"/grub-*.mbi "$here/grub-efi-mem.txt"
