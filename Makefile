# tamahv: build the image and ISO, boot it, test it.
#
#   make            build build/tamahv.elf and build/tamahv.iso
#   make run        boot the ISO in Bochs (VMX with EPT); EMU=tcg or EMU=kvm for QEMU
#   make test       vet, format check, host tests (-race), emulator tests
#   make e2e-models boot every supported Bochs CPU model with the guest
#   make e2e-smp    the 2-processor guest (parked and as vCPUs), 4 processors on each guest model
#   make e2e-swapmem the further swapmem cases on the Linux guest
#   make e2e-overhead the guest without and with tamahv
#   make fuzz       run the swapmem, hypercall, page-table-write and Multiboot2 fuzzers for FUZZTIME each (default 60s)

GO       ?= go
BUILD    := build
TAMAGO   := $(BUILD)/tamago
IMAGE    := $(BUILD)/tamahv.elf
ISO      := $(BUILD)/tamahv.iso
EMU      ?= bochs
MODEL    ?= corei7_skylake_x
TIMEOUT  ?= 10m
CPUS     ?= 1
FUZZTIME ?= 60s
VERSION  := $(shell git describe --always --dirty 2>/dev/null || echo dev)

# Must match board/pc/layout.go: the image is linked at TEXT and GRUB keeps
# everything up to RAM_END for it.
TEXT     := 0x10010000
RAM_END  := 0x18000000

TAMAGO_VERSION := $(shell awk '$$1 == "github.com/usbarmory/tamago" {print $$2}' go.mod)
TAMAGO_GOROOT  := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tamago-go/tamago-go$(TAMAGO_VERSION:v%=%)

PAYLOAD  := $(BUILD)/payload

# Debian packages each part needs.
PKGS_ISO   := grub-pc-bin grub-common xorriso mtools cpio busybox-static
PKGS_BOCHS := bochs bochsbios vgabios bochs-term
PKGS_QEMU  := qemu-system-x86
PKGS_TEST  := binutils
# UEFI: GRUB's EFI platform (grub-mkrescue then makes the ISOs boot on
# UEFI as well) and the OVMF firmware the UEFI tests boot with.
PKGS_UEFI  := grub-efi-amd64-bin ovmf fdisk e2fsprogs

.PHONY: kmod e2e-smp iso-smp iso-mb2 iso-fallback iso-console deps-uefi disk preflight install uninstall try iso-park iso-cases e2e-swapmem iso-native e2e-overhead payload all image iso run test check host-test e2e-models fuzz deps-iso deps-bochs deps-qemu deps-test tamago-dist clean

all: iso

# install-packages installs the Debian packages in $(1) that are missing,
# without the packages they only recommend (qemu-system-x86's GUI among
# them).
define install-packages
	@missing=""; for p in $(1); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "tamahv: installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

deps-iso:
	$(call install-packages,$(PKGS_ISO))
deps-bochs:
	$(call install-packages,$(PKGS_BOCHS))
deps-qemu:
	$(call install-packages,$(PKGS_QEMU))
deps-test:
	$(call install-packages,$(PKGS_TEST))
deps-uefi:
	$(call install-packages,$(PKGS_UEFI))

$(TAMAGO): go.mod go.sum
	@mkdir -p $(BUILD)
	@echo "tamahv: building the tamago command (runs the TamaGo Go distribution)"
	$(GO) build -o $@ github.com/usbarmory/tamago/cmd/tamago

# cmd/tamago installs the TamaGo distribution into $(TAMAGO_GOROOT) from the
# network when it is missing; say what to do where there is none.
tamago-dist: $(TAMAGO)
	@if [ ! -x "$(TAMAGO_GOROOT)/bin/go" ]; then \
		echo "tamahv: no TamaGo Go distribution at $(TAMAGO_GOROOT); the tamago command will try to install it (needs network)."; \
		echo "tamahv: without network, see README.md, \"The TamaGo distribution\"."; \
	fi

image: tamago-dist
	@echo "tamahv: building $(IMAGE) ($(VERSION))"
	GOOS=tamago GOOSPKG=github.com/usbarmory/tamago GOARCH=amd64 $(TAMAGO) build \
		-tags linkcpuinit -trimpath \
		-ldflags "-T $(TEXT) -R 0x1000 -X main.Version=$(VERSION)" \
		-o $(IMAGE) ./cmd/tamahv
	$(GO) run ./cmd/mbpatch -reserve-end $(RAM_END) $(IMAGE)

# The guest: Debian's kernel (the package linux-image-amd64 depends on,
# downloaded and unpacked, not installed) and an initramfs of busybox, the
# init script and hvguest.
payload: deps-iso
	@mkdir -p $(PAYLOAD)/deb $(PAYLOAD)/root/bin $(PAYLOAD)/root/proc $(PAYLOAD)/root/sys $(PAYLOAD)/root/dev $(PAYLOAD)/root/tmp
	@if [ ! -s $(PAYLOAD)/vmlinuz ]; then \
		[ -n "$$(apt-cache depends linux-image-amd64 2>/dev/null)" ] || apt-get update -qq; \
		pkg=$$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $$2; exit}'); \
		echo "tamahv: downloading the guest kernel ($$pkg)"; \
		(cd $(PAYLOAD)/deb && rm -f *.deb && apt-get download $$pkg 2>&1 | grep -v '^W:' ; true); \
		dpkg-deb -x $(PAYLOAD)/deb/$$pkg*.deb $(PAYLOAD)/deb/x && \
		cp $(PAYLOAD)/deb/x/boot/vmlinuz-* $(PAYLOAD)/vmlinuz && \
		echo "$$pkg" > $(PAYLOAD)/kernel.version; \
	fi
	@test -s $(PAYLOAD)/vmlinuz || { echo "tamahv: no guest kernel"; exit 1; }
	@echo "tamahv: building the guest initramfs"
	cp /bin/busybox $(PAYLOAD)/root/bin/busybox
	@mkdir -p $(PAYLOAD)/root/lib/modules
	find $(PAYLOAD)/deb/x/lib/modules \( -name zsmalloc.ko -o -name zram.ko -o -name efivarfs.ko \) -exec cp {} $(PAYLOAD)/root/lib/modules/ \;
	@# The drivers an installed system's initramfs has to mount its root
	@# file system from a disk (SATA, IDE, ext4), for root= boots.
	sh qemu/guest/modules.sh $(PAYLOAD)/deb/x/lib/modules $(PAYLOAD)/root/lib/modules/$$(ls $(PAYLOAD)/deb/x/lib/modules) \
		ata_piix ahci ata_generic sd_mod ext4 crc32c_generic crct10dif_generic crc64_rocksoft_generic
	cp qemu/guest/init $(PAYLOAD)/root/init
	@$(MAKE) --no-print-directory kmod
	GOOS=linux GOARCH=amd64 CGO_ENABLED=0 $(GO) build -trimpath -o $(PAYLOAD)/root/bin/hvguest ./cmd/hvguest
	cd $(PAYLOAD)/root && find . | sort | cpio -o -H newc --quiet | gzip -9 > ../initrd.gz

# The guest adversary's kernel module, built against the guest kernel's
# headers: Debian's linux-headers-<abi>-amd64, linux-headers-<abi>-common
# and linux-kbuild-<major.minor> of exactly the guest kernel's version,
# downloaded and unpacked under $(KHDR) (not installed). Offline, put those
# three .deb files in $(KHDR)/deb. Without them the module is left out and
# the end-to-end test skips the kernel attacks, saying so.
KHDR := $(PAYLOAD)/headers
KMOD := $(PAYLOAD)/kmod
kmod:
	@rm -f $(PAYLOAD)/root/lib/modules/tamahv_adversary.ko
	@img=$$(cat $(PAYLOAD)/kernel.version); abi=$${img#linux-image-}; abi=$${abi%-amd64}; \
	ver=$$(dpkg-deb -f $(PAYLOAD)/deb/$$img*.deb Version); mm=$$(echo $$abi | cut -d. -f1,2); \
	hdr=$(KHDR)/x/usr/src/linux-headers-$$abi-amd64; \
	pkgs="linux-headers-$$abi-amd64 linux-headers-$$abi-common linux-kbuild-$$mm"; \
	if [ ! -f $$hdr/Makefile ]; then \
		mkdir -p $(KHDR)/deb; \
		for p in $$pkgs; do ls $(KHDR)/deb/$${p}_$$ver*.deb >/dev/null 2>&1 || \
			(cd $(KHDR)/deb && apt-get download $$p=$$ver 2>&1 | grep -v '^W:'; true); done; \
		for p in $$pkgs; do ls $(KHDR)/deb/$${p}_$$ver*.deb >/dev/null 2>&1 || { \
			echo "tamahv: no $${p}_$$ver .deb for the guest adversary's kernel module: kernel attacks left out (see README)"; exit 0; }; done; \
		rm -rf $(KHDR)/x; for p in $$pkgs; do dpkg-deb -x $(KHDR)/deb/$${p}_$$ver*.deb $(KHDR)/x || exit 1; done; \
		sed -i "s|/usr/src/linux-headers-$$abi-common|$(abspath $(KHDR))/x/usr/src/linux-headers-$$abi-common|" $$hdr/Makefile; \
	fi; \
	cc=$$(grep -o 'gcc-[0-9]*$$' $$hdr/.kernelvariables); \
	command -v $$cc >/dev/null || { \
		echo "tamahv: no $$cc, which the guest kernel's headers ask for: the guest adversary's kernel attacks left out (see README)"; exit 0; }; \
	rm -rf $(KMOD) && mkdir -p $(KMOD) && cp qemu/guest/kmod/Kbuild qemu/guest/kmod/*.c $(KMOD)/ && \
	echo "tamahv: building the guest adversary's kernel module against $$abi ($$ver)" && \
	$(MAKE) --no-print-directory -s -C $$hdr M=$(abspath $(KMOD)) modules >$(KMOD)/build.log 2>&1 || { cat $(KMOD)/build.log; exit 1; }; \
	strip --strip-debug -o $(PAYLOAD)/root/lib/modules/tamahv_adversary.ko $(KMOD)/tamahv_adversary.ko

iso: image payload deps-iso deps-uefi
	@echo "tamahv: building $(ISO)"
	@rm -rf $(BUILD)/iso && mkdir -p $(BUILD)/iso/boot/grub
	cp $(IMAGE) $(BUILD)/iso/boot/tamahv.elf
	cp $(PAYLOAD)/vmlinuz $(PAYLOAD)/initrd.gz $(BUILD)/iso/boot/
	cp qemu/grub.cfg $(BUILD)/iso/boot/grub/grub.cfg
	grub-mkrescue -o $(ISO) $(BUILD)/iso 2>$(BUILD)/grub-mkrescue.log || { cat $(BUILD)/grub-mkrescue.log; exit 1; }
	@ls -l $(IMAGE) $(ISO)

# The same guest without tamahv, to measure what tamahv costs.
iso-native: payload deps-iso
	@rm -rf $(BUILD)/iso-native && mkdir -p $(BUILD)/iso-native/boot/grub
	cp $(PAYLOAD)/vmlinuz $(PAYLOAD)/initrd.gz $(BUILD)/iso-native/boot/
	cp qemu/grub-native.cfg $(BUILD)/iso-native/boot/grub/grub.cfg
	grub-mkrescue -o $(BUILD)/native.iso $(BUILD)/iso-native 2>$(BUILD)/grub-mkrescue.log || { cat $(BUILD)/grub-mkrescue.log; exit 1; }

# The tamahv ISO with a guest command line that asks for the further
# swapmem cases (NoFault, PreInject veto, WriteFault on copy-on-write,
# a process exiting mid-read, a former transparent huge page, two processes
# reading at once, a process killed mid-read, 16 MiB, dropped pages of a
# private file mapping, a buffer rewritten during the read).
iso-cases: iso
	@rm -rf $(BUILD)/iso-cases && cp -r $(BUILD)/iso $(BUILD)/iso-cases
	cp qemu/grub-cases.cfg $(BUILD)/iso-cases/boot/grub/grub.cfg
	grub-mkrescue -o $(BUILD)/cases.iso $(BUILD)/iso-cases 2>$(BUILD)/grub-mkrescue.log || { cat $(BUILD)/grub-mkrescue.log; exit 1; }

# The tamahv ISO the 2-processor test boots: its guest leaves out the
# ring-3 attacks the one-processor test makes on memory and read slots.
iso-smp: iso
	@rm -rf $(BUILD)/iso-smp && cp -r $(BUILD)/iso $(BUILD)/iso-smp
	cp qemu/grub-smp.cfg $(BUILD)/iso-smp/boot/grub/grub.cfg
	grub-mkrescue -o $(BUILD)/smp.iso $(BUILD)/iso-smp 2>$(BUILD)/grub-mkrescue.log || { cat $(BUILD)/grub-mkrescue.log; exit 1; }

# The tamahv ISO that boots it through Multiboot2 (GRUB's multiboot2 and
# module2 --nounzip), on BIOS and on UEFI.
iso-mb2: iso
	@rm -rf $(BUILD)/iso-mb2 && cp -r $(BUILD)/iso $(BUILD)/iso-mb2
	cp qemu/grub-mb2.cfg $(BUILD)/iso-mb2/boot/grub/grub.cfg
	@# The initramfs's second part, a cpio archive of one large file
	@# (200 MiB of zeros and a marker) the guest's init checks and drops.
	@rm -rf $(BUILD)/part2 && mkdir -p $(BUILD)/part2/large
	truncate -s 200M $(BUILD)/part2/large/part2 && printf 'tamahv-initrd-part2-end\n' >> $(BUILD)/part2/large/part2
	cd $(BUILD)/part2 && printf 'large\nlarge/part2\n' | cpio -o -H newc --quiet > ../iso-mb2/boot/initrd-part2.cpio
	grub-mkrescue -o $(BUILD)/mb2.iso $(BUILD)/iso-mb2 2>$(BUILD)/grub-mkrescue.log || { cat $(BUILD)/grub-mkrescue.log; exit 1; }

# A disk image laid out as an installed Debian that boots on UEFI through
# the entry install/42_tamahv makes (qemu/cmd/tamahv-disk; no root needed).
# Boot it: go run ./qemu/cmd/tamahv-run -uefi -disk build/disk.img
disk: iso deps-uefi
	$(GO) run ./qemu/cmd/tamahv-disk -version $$(sed 's/^linux-image-//' $(PAYLOAD)/kernel.version) $(BUILD)/disk.img

# The Multiboot2 ISO whose tamahv boots the kernel natively where it
# cannot run it as its guest (fallback=native): under QEMU TCG, which has
# no VMX, the kernel's init reports what it was handed (tamahv.check=handover).
iso-fallback: iso
	@rm -rf $(BUILD)/iso-fallback && cp -r $(BUILD)/iso $(BUILD)/iso-fallback
	cp qemu/grub-fallback.cfg $(BUILD)/iso-fallback/boot/grub/grub.cfg
	grub-mkrescue -o $(BUILD)/fallback.iso $(BUILD)/iso-fallback 2>$(BUILD)/grub-mkrescue.log || { cat $(BUILD)/grub-mkrescue.log; exit 1; }

# The Multiboot2 ISO whose tamahv keeps COM2 for its console (console=com2):
# the guest's kernel, booted natively under QEMU TCG, gets COM1.
iso-console: iso
	@rm -rf $(BUILD)/iso-console && cp -r $(BUILD)/iso $(BUILD)/iso-console
	cp qemu/grub-console.cfg $(BUILD)/iso-console/boot/grub/grub.cfg
	grub-mkrescue -o $(BUILD)/console.iso $(BUILD)/iso-console 2>$(BUILD)/grub-mkrescue.log || { cat $(BUILD)/grub-mkrescue.log; exit 1; }

# The tamahv ISO that keeps the application processors parked and hidden
# (smp.park on tamahv's command line).
iso-park: iso
	@rm -rf $(BUILD)/iso-park && cp -r $(BUILD)/iso $(BUILD)/iso-park
	cp qemu/grub-park.cfg $(BUILD)/iso-park/boot/grub/grub.cfg
	grub-mkrescue -o $(BUILD)/park.iso $(BUILD)/iso-park 2>$(BUILD)/grub-mkrescue.log || { cat $(BUILD)/grub-mkrescue.log; exit 1; }

e2e-swapmem: iso-cases deps-bochs
	TAMAHV_E2E_SWAPMEM=1 $(GO) test -count=1 -v -run 'TestBochsSwapmemCases' -timeout 30m ./qemu/

e2e-overhead: iso iso-native deps-bochs
	TAMAHV_E2E_OVERHEAD=1 $(GO) test -count=1 -v -run 'TestBochsOverhead' -timeout 30m ./qemu/

run: iso $(if $(filter bochs,$(EMU)),deps-bochs,deps-qemu)
	$(GO) run ./qemu/cmd/tamahv-run -emu $(EMU) -model $(MODEL) -cpus $(CPUS) -timeout $(TIMEOUT) $(ISO)

# Installing tamahv under this machine's own system: the image in
# /boot/tamahv, a GRUB script that adds an entry per installed kernel after
# the system's own (install/42_tamahv), its settings (/etc/default/tamahv,
# kept if present). The preflight runs first; FORCE=1 installs anyway.
# DESTDIR installs into a tree and leaves GRUB alone.
preflight:
	$(GO) run ./cmd/tamahv-preflight

install: image
	@$(GO) run ./cmd/tamahv-preflight || [ -n "$(FORCE)" ] || { echo "tamahv: not installed: the preflight failed (FORCE=1 installs anyway)"; exit 1; }
	install -D -m 0644 $(IMAGE) $(DESTDIR)/boot/tamahv/tamahv.elf
	install -D -m 0755 install/42_tamahv $(DESTDIR)/etc/grub.d/42_tamahv
	@[ -e $(DESTDIR)/etc/default/tamahv ] || install -D -m 0644 install/default $(DESTDIR)/etc/default/tamahv
	@if [ -z "$(DESTDIR)" ]; then update-grub; else echo "tamahv: installed into $(DESTDIR); run update-grub there"; fi

uninstall:
	rm -f $(DESTDIR)/boot/tamahv/tamahv.elf $(DESTDIR)/etc/grub.d/42_tamahv
	-rmdir $(DESTDIR)/boot/tamahv 2>/dev/null
	@echo "tamahv: $(DESTDIR)/etc/default/tamahv kept"
	@if [ -z "$(DESTDIR)" ]; then update-grub; fi

# Boot the newest kernel under tamahv once, at the next reboot; the boot
# after it is the system's default again. GRUB needs GRUB_DEFAULT=saved in
# /etc/default/grub for that (then update-grub).
try:
	@grep -q '^GRUB_DEFAULT=saved' /etc/default/grub || { echo "tamahv: make try needs GRUB_DEFAULT=saved in /etc/default/grub (then update-grub)"; exit 1; }
	@id=$$(sed -n "s/.*--id '\(tamahv-[^']*\)'.*/\1/p" /boot/grub/grub.cfg | head -n 1); \
	[ -n "$$id" ] || { echo "tamahv: no tamahv entry in /boot/grub/grub.cfg (make install)"; exit 1; }; \
	grub-reboot "$$id" && echo "tamahv: the next boot is $$id; reboot when ready"

check: $(TAMAGO)
	@echo "tamahv: go vet and gofmt"
	$(GO) vet ./...
	@if [ -x "$(TAMAGO_GOROOT)/bin/go" ]; then \
		echo "GOOS=tamago go vet ./board/... ./cmd/tamahv ./vmx"; \
		GOOS=tamago GOOSPKG=github.com/usbarmory/tamago GOARCH=amd64 $(TAMAGO) vet -tags linkcpuinit ./board/... ./cmd/tamahv ./vmx; \
	fi
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

host-test:
	$(GO) test -race -count=1 ./swapmem/... ./vmx/... ./board/... ./cmd/... ./qemu/...

# The emulator tests build the image themselves (make iso) when the TamaGo
# distribution is here, and skip with one line saying why when it is not.
test: deps-test deps-iso deps-uefi deps-bochs deps-qemu check
	@why=$$($(GO) run ./qemu/cmd/tamahv-prereq); if [ -n "$$why" ]; then echo "tamahv: image tests skipped: $$why"; fi
	@start=$$(date +%s); rc=0; $(GO) test -race -count=1 -timeout 60m ./... || rc=$$?; \
	if [ -s $(PAYLOAD)/kernel.version ]; then echo "tamahv: the guest kernel the emulator tests booted: $$(cat $(PAYLOAD)/kernel.version) ($$(dpkg-deb -f $(PAYLOAD)/deb/$$(cat $(PAYLOAD)/kernel.version)*.deb Version 2>/dev/null))"; fi; \
	echo "tamahv: go test took $$(( $$(date +%s) - start )) s"; exit $$rc

e2e-smp: iso-park deps-bochs
	TAMAHV_E2E_SMP=1 $(GO) test -count=1 -v -run 'TestBochsSMP' -timeout 50m ./qemu/

e2e-models: deps-bochs deps-iso
	TAMAHV_E2E_MODELS=1 $(GO) test -count=1 -v -run TestBochsModels -timeout 40m ./qemu/

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzOperations -fuzztime $(FUZZTIME) ./swapmem/
	$(GO) test -run '^$$' -fuzz FuzzHypercall -fuzztime $(FUZZTIME) ./hv/monitor/
	$(GO) test -run '^$$' -fuzz FuzzPTWrite -fuzztime $(FUZZTIME) ./hv/guestmem/
	$(GO) test -run '^$$' -fuzz FuzzDecodeWrite -fuzztime $(FUZZTIME) ./hv/x86emu/
	$(GO) test -run '^$$' -fuzz FuzzMultiboot2 -fuzztime $(FUZZTIME) ./board/pc/multiboot2/

clean:
	rm -rf $(BUILD)
