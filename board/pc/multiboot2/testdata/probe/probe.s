# probe: a Multiboot2 image that writes the boot information GRUB hands
# it to COM1 as hex, for the golden files of package multiboot2. It is
# linked where tamahv's image is (probe.ld) and gets tamahv's header
# (patch.go), so that GRUB places everything as it does for tamahv.
#
# Output lines, after GRUB's own:
#   mb2probe: magic MMMMMMMM info IIIIIIII
#   mb2probe: mem AAAAAAAA LLLLLLLL    then LLLLLLLL bytes in hex, 32 a line
#   mb2probe: done
# The first mem block is the boot information. On UEFI the EFI system
# table (120 bytes), its configuration table (24 bytes an entry) and the
# RSDP of each ACPI configuration entry (36 bytes) follow, so that the
# RSDP lookup is tested on what the firmware really left.

	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4           # QEMU isa-debug-exit
	.set BOOT_MAGIC, 0x36d76289
	.set MAX_INFO, 0x40000
	.set TAG_EFI64, 12
	.set SYSTAB_LEN, 120
	.set SYSTAB_NTABLES, 104
	.set SYSTAB_TABLES, 112
	.set CFG_ENTRY, 24
	.set MAX_CFG, 64
	.set ACPI20_GUID0, 0x8868e871
	.set ACPI10_GUID0, 0xeb9d2d30
	.set RSDP_LEN, 36

	.text
	.code32
	.globl start
start:
	cli
	cld
	movl	$stack_top, %esp
	movl	%eax, magic
	movl	%ebx, info
	call	serial_init

	movl	$msg_magic, %esi
	call	puts
	movl	magic, %eax
	call	puthex32
	movl	$msg_info, %esi
	call	puts
	movl	info, %eax
	call	puthex32
	call	newline

	cmpl	$BOOT_MAGIC, magic
	jne	done
	movl	info, %esi
	movl	(%esi), %ecx
	cmpl	$MAX_INFO, %ecx
	ja	done
	call	dump

	# Find the EFI64 system table tag.
	movl	info, %edi
	movl	%edi, %edx
	addl	(%edi), %edx            # end of the information
	addl	$8, %edi
1:	cmpl	%edx, %edi
	jae	done
	movl	(%edi), %eax
	testl	%eax, %eax
	jz	done
	cmpl	$TAG_EFI64, %eax
	je	2f
	movl	4(%edi), %eax
	cmpl	$8, %eax
	jb	done
	addl	$7, %eax
	andl	$~7, %eax
	addl	%eax, %edi
	jmp	1b

2:	cmpl	$0, 12(%edi)            # above 4 GiB: out of reach
	jne	done
	movl	8(%edi), %ebx           # system table
	movl	%ebx, %esi
	movl	$SYSTAB_LEN, %ecx
	call	dump
	cmpl	$0, SYSTAB_NTABLES+4(%ebx)
	jne	done
	cmpl	$0, SYSTAB_TABLES+4(%ebx)
	jne	done
	movl	SYSTAB_NTABLES(%ebx), %ebp
	cmpl	$MAX_CFG, %ebp
	jbe	3f
	movl	$MAX_CFG, %ebp
3:	movl	SYSTAB_TABLES(%ebx), %ebx # configuration table
	movl	%ebx, %esi
	imull	$CFG_ENTRY, %ebp, %ecx
	call	dump
4:	testl	%ebp, %ebp
	jz	done
	movl	(%ebx), %eax
	cmpl	$ACPI20_GUID0, %eax
	je	5f
	cmpl	$ACPI10_GUID0, %eax
	jne	6f
5:	cmpl	$0, 20(%ebx)
	jne	6f
	movl	16(%ebx), %esi
	movl	$RSDP_LEN, %ecx
	call	dump
6:	addl	$CFG_ENTRY, %ebx
	decl	%ebp
	jmp	4b

done:
	movl	$msg_done, %esi
	call	puts
	call	newline
	movw	$DEBUG_EXIT, %dx
	xorl	%eax, %eax
	outb	%al, %dx
7:	hlt
	jmp	7b

# dump writes ECX bytes from ESI: a header line, then 32 bytes a line.
dump:
	pushl	%ecx
	pushl	%esi
	movl	$msg_mem, %esi
	call	puts
	movl	(%esp), %eax
	call	puthex32
	movb	$' ', %al
	call	putc
	movl	4(%esp), %eax
	call	puthex32
	call	newline
	popl	%esi
	popl	%ecx
	xorl	%edi, %edi              # bytes on this line
1:	testl	%ecx, %ecx
	jz	3f
	lodsb
	call	puthex8
	decl	%ecx
	incl	%edi
	cmpl	$32, %edi
	jne	1b
	call	newline
	xorl	%edi, %edi
	jmp	1b
3:	testl	%edi, %edi
	jz	4f
	call	newline
4:	ret

serial_init:
	movw	$COM1+1, %dx
	xorb	%al, %al
	outb	%al, %dx                # no interrupts
	movw	$COM1+3, %dx
	movb	$0x80, %al
	outb	%al, %dx                # divisor latch
	movw	$COM1, %dx
	movb	$1, %al
	outb	%al, %dx                # 115200 baud
	movw	$COM1+1, %dx
	xorb	%al, %al
	outb	%al, %dx
	movw	$COM1+3, %dx
	movb	$3, %al
	outb	%al, %dx                # 8N1
	movw	$COM1+2, %dx
	movb	$0xc7, %al
	outb	%al, %dx                # FIFO on
	movw	$COM1+4, %dx
	movb	$0x0b, %al
	outb	%al, %dx
	ret

# putc writes AL.
putc:
	pushl	%edx
	pushl	%eax
	movw	$COM1+5, %dx
1:	inb	%dx, %al
	testb	$0x20, %al
	jz	1b
	popl	%eax
	movw	$COM1, %dx
	outb	%al, %dx
	popl	%edx
	ret

# puts writes the NUL-terminated string at ESI.
puts:
	lodsb
	testb	%al, %al
	jz	1f
	call	putc
	jmp	puts
1:	ret

newline:
	movb	$'\r', %al
	call	putc
	movb	$'\n', %al
	jmp	putc

# puthex8 writes AL as two hex digits.
puthex8:
	pushl	%eax
	shrb	$4, %al
	call	nibble
	popl	%eax
	pushl	%eax
	call	nibble
	popl	%eax
	ret

nibble:
	andb	$0xf, %al
	addb	$'0', %al
	cmpb	$'9', %al
	jbe	putc
	addb	$('a'-'0'-10), %al
	jmp	putc

# puthex32 writes EAX as eight hex digits.
puthex32:
	pushl	%ecx
	movl	$4, %ecx
1:	roll	$8, %eax
	call	puthex8
	loop	1b
	popl	%ecx
	ret

	.section .rodata
msg_magic:	.asciz "mb2probe: magic "
msg_info:	.asciz " info "
msg_mem:	.asciz "mb2probe: mem "
msg_done:	.asciz "mb2probe: done"

	.bss
	.align 16
magic:	.long 0
info:	.long 0
	.align 16
	.space 4096
stack_top:
