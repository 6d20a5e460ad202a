// SPDX-License-Identifier: GPL-2.0
/*
 * tamahv_adversary: the kernel half of tamahv's guest adversary.
 *
 * Loaded into tamahv's Linux test guest, it makes, from ring 0, the
 * guest-kernel attacks of the trust-boundary review (2026-11-27): each one
 * on writing its name to /sys/module/tamahv_adversary/parameters/attack;
 * reading that file gives the outcome as one line:
 *
 *	tamahv-adversary: <name>: refused|survived|FAILED (<detail>)
 *
 * "refused": tamahv or the processor turned the action down (a fault the
 * SDM prescribes, or a hypercall error); "survived": the action completed
 * the way bare hardware would have it, tamahv still running; "FAILED":
 * tamahv answered wrongly (its memory became visible, a value the processor
 * refuses took effect). Every instruction that may fault is covered by an
 * exception-table entry, so a fault ends only the attack's own call.
 *
 * Writing N to /sys/module/tamahv_adversary/parameters/exit ends the guest
 * with status N through the exit hypercall, which tamahv serves from ring 0
 * only.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/kernel.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/mm.h>
#include <linux/mman.h>
#include <linux/uaccess.h>
#include <linux/delay.h>
#include <linux/io.h>
#include <linux/string.h>
#include <crypto/sha2.h>
#include <asm/asm.h>
#include <asm/fpu/xcr.h>
#include <asm/fpu/api.h>
#include <asm/msr.h>
#include <asm/msr-index.h>
#include <asm/processor-flags.h>
#include <asm/special_insns.h>
#include <asm/tlbflush.h>
#include <asm/pgtable.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("tamahv guest adversary: guest-kernel attacks on the hypervisor");

/* tamahv's hypercall interface (hv/hypercall.go). */
#define HC_IDENTIFY 0
#define HC_EXIT 1
#define HC_SECRET 2
#define HC_SWAP_READ 3
#define HC_SWAP_STATUS 4
#define HC_MAGIC 0x74616d6168760000ULL
#define SWAP_PENDING 1
#define SWAP_OK 2
#define SWAP_FAILED 3
#define SECRET_BYTE 0x5a
/* swapmem options (swapmem/api.go). */
#define OPT_NOFAULT 0x1
#define OPT_BPFAULT 0x10

/* tamahv's own physical region (board/pc/layout.go) and an MMIO page. */
#define TAMAHV_START 0x10000000ULL
#define TAMAHV_END 0x18000000ULL
/*
 * The VGA text buffer: MMIO that Bochs serves at any alignment (its local
 * APIC model stops the emulator on reads not aligned to 16 bytes).
 */
#define MMIO_PA 0xb8000ULL

#define NO_FAULT (~0UL)

static long hypercall(unsigned long nr, unsigned long a1, unsigned long a2)
{
	unsigned long ret;

	asm volatile("vmcall" : "=a"(ret) : "a"(nr), "D"(a1), "S"(a2), "d"(0UL) : "memory");
	return (long)ret;
}

struct swap_request {
	u64 va, len, options;
	u8 sha256[32];
};

static const char *status_name(long s)
{
	switch (s) {
	case SWAP_PENDING:
		return "pending";
	case SWAP_OK:
		return "ok";
	case SWAP_FAILED:
		return "failed";
	}
	return "none";
}

/*
 * Faulting instructions: each returns the vector of the fault the
 * instruction took (EX_TYPE_FAULT puts it in RAX), or NO_FAULT.
 */
static unsigned long try_xsetbv(u32 xcr, u64 val)
{
	unsigned long trap = (u32)val;

	asm volatile("1: xsetbv\n"
		     "   mov $-1, %%rax\n"
		     "2:\n" _ASM_EXTABLE_TYPE(1b, 2b, EX_TYPE_FAULT)
		     : "+a"(trap)
		     : "c"(xcr), "d"((u32)(val >> 32))
		     : "memory");
	return trap;
}

static unsigned long try_cr0(unsigned long val)
{
	unsigned long trap = NO_FAULT;

	asm volatile("1: mov %[v], %%cr0\n"
		     "2:\n" _ASM_EXTABLE_TYPE(1b, 2b, EX_TYPE_FAULT)
		     : "+a"(trap)
		     : [v] "r"(val)
		     : "memory");
	return trap;
}

static unsigned long try_cr4(unsigned long val)
{
	unsigned long trap = NO_FAULT;

	asm volatile("1: mov %[v], %%cr4\n"
		     "2:\n" _ASM_EXTABLE_TYPE(1b, 2b, EX_TYPE_FAULT)
		     : "+a"(trap)
		     : [v] "r"(val)
		     : "memory");
	return trap;
}

/* try_in reads size bytes from port; *val gets what came in. */
static unsigned long try_in(u16 port, int size, u32 *val)
{
	unsigned long trap = NO_FAULT;
	u32 v = 0;

	switch (size) {
	case 2:
		asm volatile("1: inw %%dx, %%ax\n"
			     "   movzwl %%ax, %[v]\n"
			     "   mov $-1, %%rax\n"
			     "2:\n" _ASM_EXTABLE_TYPE(1b, 2b, EX_TYPE_FAULT)
			     : "+a"(trap), [v] "+r"(v)
			     : "d"(port)
			     : "memory");
		break;
	default:
		asm volatile("1: inl %%dx, %%eax\n"
			     "   mov %%eax, %[v]\n"
			     "   mov $-1, %%rax\n"
			     "2:\n" _ASM_EXTABLE_TYPE(1b, 2b, EX_TYPE_FAULT)
			     : "+a"(trap), [v] "+r"(v)
			     : "d"(port)
			     : "memory");
	}
	*val = v;
	return trap;
}

static unsigned long try_read32(void __iomem *p, u32 *val)
{
	unsigned long trap = NO_FAULT;
	u32 v = 0;

	asm volatile("1: movl (%[p]), %[v]\n"
		     "2:\n" _ASM_EXTABLE_TYPE(1b, 2b, EX_TYPE_FAULT)
		     : "+a"(trap), [v] "+r"(v)
		     : [p] "r"(p)
		     : "memory");
	*val = v;
	return trap;
}

static unsigned long try_write32(void __iomem *p, u32 val)
{
	unsigned long trap = NO_FAULT;

	asm volatile("1: movl %[v], (%[p])\n"
		     "2:\n" _ASM_EXTABLE_TYPE(1b, 2b, EX_TYPE_FAULT)
		     : "+a"(trap)
		     : [p] "r"(p), [v] "r"(val)
		     : "memory");
	return trap;
}

static const char *vector_name(unsigned long v)
{
	switch (v) {
	case 6:
		return "#UD";
	case 13:
		return "#GP";
	case 14:
		return "#PF";
	case 18:
		return "#MC";
	}
	return "fault";
}

/* The outcome of the last attack, for reading the parameter back. */
static char outcome[512];

static void report(const char *name, const char *verdict, const char *fmt, ...)
{
	char detail[384];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	snprintf(outcome, sizeof(outcome), "tamahv-adversary: %s: %s (%s)", name, verdict, detail);
	printk(KERN_DEBUG "%s\n", outcome);
}

static void sha256_of(u8 fill, u8 out[32])
{
	u8 *page = kmalloc(PAGE_SIZE, GFP_KERNEL);

	if (!page) {
		memset(out, 0, 32);
		return;
	}
	memset(page, fill, PAGE_SIZE);
	sha256(page, PAGE_SIZE, out);
	kfree(page);
}

static int count_byte(const void *p, u8 b)
{
	const u8 *s = p;
	int i, n = 0;

	for (i = 0; i < PAGE_SIZE; i++)
		n += s[i] == b;
	return n;
}

/* wait_status polls HcSwapStatus while the read is pending, up to ms. */
static long wait_status(int ms)
{
	long s = hypercall(HC_SWAP_STATUS, 0, 0);

	while (s == SWAP_PENDING && ms > 0) {
		msleep(10);
		ms -= 10;
		s = hypercall(HC_SWAP_STATUS, 0, 0);
	}
	return s;
}

/*
 * table_pmd returns the page-directory entry over a page table for a in mm
 * (mmap lock held), or NULL.
 */
static pmd_t *table_pmd(struct mm_struct *mm, unsigned long a)
{
	pgd_t *pgd = pgd_offset(mm, a);
	p4d_t *p4d;
	pud_t *pud;
	pmd_t *pmd;

	if (pgd_none(*pgd))
		return NULL;
	p4d = p4d_offset(pgd, a);
	if (p4d_none(*p4d))
		return NULL;
	pud = pud_offset(p4d, a);
	if (pud_none(*pud) || pud_large(*pud))
		return NULL;
	pmd = pmd_offset(pud, a);
	if (pmd_none(*pmd) || pmd_large(*pmd))
		return NULL;
	return pmd;
}

/* user_pte returns the PTE of addr in mm (mmap lock held), or NULL. */
static pte_t *user_pte(struct mm_struct *mm, unsigned long addr)
{
	pmd_t *pmd = table_pmd(mm, addr);

	return pmd ? pte_offset_kernel(pmd, addr) : NULL;
}

/*
 * Finding 1: the breakpoint agent follows IA32_LSTAR to its detour. The
 * module points LSTAR at two crafted calls in a vmalloc'ed page: the
 * second call ends at the page's end, so the detour is the next page,
 * which the module maps (its PTE) to tamahv's secret page (HcSecret).
 * A BPFault swap read of a page of the calling process that looks swapped
 * out (its PTE holds a swap entry the module wrote; tamahv raises faults
 * only for such backed pages) makes tamahv arm the agent at once; the
 * module then reads the detour page (the split view would switch it to
 * tamahv's own memory), restores LSTAR and the PTE (empty: the read can
 * only fail), and reads the detour page again. Interrupts stay off while
 * LSTAR and the PTE are crafted: no system call runs, nothing else sees
 * the entry.
 */
static void attack_detour(const char *name)
{
	struct mm_struct *mm = current->mm;
	u8 *code, *seen;
	unsigned long uva, flags, secret;
	struct swap_request *req;
	unsigned int level;
	pte_t *ptep, saved, *uptep = NULL, usaved;
	u64 lstar;
	long r, s;
	int before, during, after;

	secret = hypercall(HC_SECRET, 0, 0);
	if (secret < TAMAHV_START || secret >= TAMAHV_END) {
		report(name, "FAILED", "HcSecret answered %#lx", secret);
		return;
	}
	code = vmalloc(2 * PAGE_SIZE);
	seen = kmalloc(PAGE_SIZE, GFP_KERNEL);
	req = kzalloc(sizeof(*req), GFP_KERNEL);
	uva = vm_mmap(NULL, 0, 2 * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, 0);
	if (!code || !seen || !req || IS_ERR_VALUE(uva) || !mm) {
		report(name, "FAILED", "no memory for the attack");
		goto out;
	}
	/* The first page brings the page table in; the second is read. */
	if (put_user(1, (char __user *)uva)) {
		report(name, "FAILED", "cannot touch %#lx", uva);
		goto out;
	}
	memset(code, 0xcc, PAGE_SIZE);
	/* entry: call t1; t1 (5 bytes before the page end): call entry+0x10. */
	code[0] = 0xe8;
	*(s32 *)(code + 1) = (PAGE_SIZE - 5) - 5;
	code[0x10] = 0xc3;
	code[PAGE_SIZE - 5] = 0xe8;
	*(s32 *)(code + PAGE_SIZE - 4) = 0x10 - (int)PAGE_SIZE;
	ptep = lookup_address((unsigned long)code + PAGE_SIZE, &level);
	if (!ptep || level != PG_LEVEL_4K) {
		report(name, "FAILED", "vmalloc page not mapped with 4 KiB pages");
		goto out;
	}
	saved = *ptep;
	set_pte(ptep, pfn_pte(secret >> PAGE_SHIFT, PAGE_KERNEL));
	__flush_tlb_all();

	req->va = uva + PAGE_SIZE;
	req->len = PAGE_SIZE;
	req->options = OPT_BPFAULT;
	sha256_of(0, req->sha256);

	memcpy(seen, code + PAGE_SIZE, PAGE_SIZE);
	before = count_byte(seen, SECRET_BYTE);
	mmap_read_lock(mm);
	uptep = user_pte(mm, uva + PAGE_SIZE);
	if (!uptep || !pte_none(*uptep)) {
		mmap_read_unlock(mm);
		set_pte(ptep, saved);
		__flush_tlb_all();
		report(name, "FAILED", "no empty page-table entry for %#lx", uva + PAGE_SIZE);
		goto out;
	}
	local_irq_save(flags);
	usaved = *uptep;
	/* A swap entry: not present, not PROT_NONE, non-zero. */
	set_pte(uptep, __swp_entry_to_pte(__swp_entry(0, 0x1234)));
	rdmsrl(MSR_LSTAR, lstar);
	wrmsrl(MSR_LSTAR, (unsigned long)code);
	r = hypercall(HC_SWAP_READ, (unsigned long)req, sizeof(*req));
	/* More exits, at which the agent (re)installs its breakpoint. */
	hypercall(HC_IDENTIFY, 0, 0);
	native_cpuid_eax(0);
	memcpy(seen, code + PAGE_SIZE, PAGE_SIZE);
	during = count_byte(seen, SECRET_BYTE);
	wrmsrl(MSR_LSTAR, lstar);
	set_pte(uptep, usaved);
	__flush_tlb_all();
	local_irq_restore(flags);
	mmap_read_unlock(mm);

	/* The page is empty again: the read fails (backed-page rule). */
	s = r ? 0 : wait_status(2000);
	memcpy(seen, code + PAGE_SIZE, PAGE_SIZE);
	after = count_byte(seen, SECRET_BYTE);

	set_pte(ptep, saved);
	__flush_tlb_all();
	if (during == PAGE_SIZE || after == PAGE_SIZE)
		report(name, "FAILED", "the detour page showed tamahv's secret page at %#lx (HcSwapRead %ld, status %s)",
		       secret, r, status_name(s));
	else
		report(name, r ? "refused" : "survived",
		       "detour on tamahv's page %#lx: HcSwapRead %ld, status %s, secret bytes seen %d/%d/%d of 4096",
		       secret, r, status_name(s), before, during, after);
out:
	if (!IS_ERR_VALUE(uva))
		vm_munmap(uva, 2 * PAGE_SIZE);
	kfree(req);
	kfree(seen);
	vfree(code);
}

/*
 * table_region maps 6 MiB of anonymous memory into mm without huge pages
 * and touches the first page at its first 2 MiB boundary, a: the page
 * table that maps a then exists. It reports a failure under name and
 * returns an error value, or the region's start.
 */
static unsigned long table_region(const char *name, struct mm_struct *mm, unsigned long *a)
{
	struct vm_area_struct *vma;
	unsigned long region;

	region = vm_mmap(NULL, 0, 6 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, 0);
	if (IS_ERR_VALUE(region) || !mm) {
		report(name, "FAILED", "no memory for the attack");
		return IS_ERR_VALUE(region) ? region : -ENOMEM;
	}
	*a = ALIGN(region, PMD_SIZE);
	mmap_write_lock(mm);
	vma = find_vma(mm, *a);
	if (vma)
		vma->vm_flags |= VM_NOHUGEPAGE;
	mmap_write_unlock(mm);
	if (put_user(1, (char __user *)*a)) {
		report(name, "FAILED", "cannot touch %#lx", *a);
		vm_munmap(region, 6 << 20);
		return -EFAULT;
	}
	return region;
}

/*
 * Finding 9: a paging-structure entry of the calling process pointed at
 * tamahv's secret page or at an MMIO page (legacy VGA memory), then a swap read
 * through it. pmd: the entry is a page-directory entry, so tamahv would
 * walk that page as a page table; otherwise a leaf PTE, so it would read
 * the page's bytes (compared with a right guess of them: 0x5a bytes for
 * the secret page, what the guest reads itself for the MMIO page).
 */
static void attack_tables(const char *name, bool pmd_level, bool mmio)
{
	struct mm_struct *mm = current->mm;
	struct swap_request *req;
	unsigned long region, a, va, flags, target;
	pmd_t *pmd, saved_pmd;
	pte_t *pte = NULL, saved_pte;
	long r, s = 0, s_after;
	int i;
	char c;

	target = mmio ? MMIO_PA : hypercall(HC_SECRET, 0, 0);
	req = kzalloc(sizeof(*req), GFP_KERNEL);
	region = table_region(name, mm, &a);
	if (!req || IS_ERR_VALUE(region))
		goto out;

	mmap_read_lock(mm);
	pmd = table_pmd(mm, a);
	if (!pmd) {
		mmap_read_unlock(mm);
		report(name, "FAILED", "no page table for %#lx", a);
		goto out;
	}
	/* The page the read names: untouched (pmd) or the touched one (pte). */
	va = pmd_level ? a + 7 * PAGE_SIZE : a;
	req->va = va;
	req->len = PAGE_SIZE;
	req->options = OPT_NOFAULT;
	sha256_of(pmd_level || mmio ? 0 : SECRET_BYTE, req->sha256);
	if (mmio && !pmd_level) {
		/* The right guess: the page as the guest itself reads it. */
		void __iomem *io = ioremap(MMIO_PA, PAGE_SIZE);
		u8 *page = kmalloc(PAGE_SIZE, GFP_KERNEL);

		if (io && page) {
			memcpy_fromio(page, io, PAGE_SIZE);
			sha256(page, PAGE_SIZE, req->sha256);
		}
		kfree(page);
		if (io)
			iounmap(io);
	}

	local_irq_save(flags);
	saved_pmd = *pmd;
	if (pmd_level) {
		set_pmd(pmd, __pmd(target | _PAGE_TABLE));
	} else {
		pte = pte_offset_kernel(pmd, a);
		saved_pte = *pte;
		set_pte(pte, pfn_pte(target >> PAGE_SHIFT, PAGE_SHARED));
	}
	__flush_tlb_all();
	r = hypercall(HC_SWAP_READ, (unsigned long)req, sizeof(*req));
	if (r == 0) {
		/* Exits for tamahv to look again; the guest never uses va. */
		for (i = 0; i < 200; i++) {
			native_cpuid_eax(0);
			s = hypercall(HC_SWAP_STATUS, 0, 0);
			if (s != SWAP_PENDING)
				break;
		}
	}
	if (pmd_level)
		set_pmd(pmd, saved_pmd);
	else
		set_pte(pte, saved_pte);
	__flush_tlb_all();
	local_irq_restore(flags);
	mmap_read_unlock(mm);

	/* Let a read left pending end: the page comes in as the guest's own. */
	s_after = s;
	if (r == 0 && s == SWAP_PENDING) {
		if (get_user(c, (char __user *)va))
			c = 0;
		s_after = wait_status(2000);
	}
	if (r == 0 && s == SWAP_OK)
		report(name, "FAILED", "tamahv read %s at %#lx through the %s entry: status ok",
		       mmio ? "MMIO" : "its own page", target, pmd_level ? "page-directory" : "page-table");
	else if (r == 0 && s == SWAP_PENDING)
		report(name, "FAILED", "tamahv walked %#lx (%s) as a page table: the read waited, then %s",
		       target, mmio ? "MMIO" : "its own page", status_name(s_after));
	else
		report(name, "refused", "%s entry to %#lx: HcSwapRead %ld, status %s",
		       pmd_level ? "page-directory" : "page-table", target, r, r ? "none" : status_name(s));
out:
	if (!IS_ERR_VALUE(region))
		vm_munmap(region, 6 << 20);
	kfree(req);
}

/*
 * Stores to a page table tamahv watches, in forms beyond the 8-byte MOV
 * Linux uses: partial widths, non-temporal, SSE, string, locked
 * read-modify-writes and the 16-byte compare-exchange. A NoFault read of an
 * untouched page makes tamahv watch the page table that maps it; each
 * store goes to an unused entry of that table (a value with the present
 * bit clear, so that no walker takes it for a mapping), is read back byte
 * for byte, and the entry is cleared again. Whatever tamahv does with a
 * store (emulate it, or let the processor make it), the table must hold
 * exactly what the instruction wrote, and the guest must go on.
 */
#define FORM_SLOT 300 /* the first of the entries the stores use (even: 16-byte aligned) */

static bool store_form(int form, u64 *e, const char **what, u64 want[2])
{
	u64 v = 0x0123456789abcd00ULL, w = 0x0fedcba987654300ULL, old, src[2];
	void *dst;
	size_t n;
	u8 ok;

	want[1] = 0;
	switch (form) {
	case 0:
		*what = "MOV 8";
		WRITE_ONCE(e[0], v);
		want[0] = v;
		break;
	case 1:
		*what = "MOV 1";
		WRITE_ONCE(e[0], v);
		WRITE_ONCE(((u8 *)e)[3], 0x5a);
		want[0] = (v & ~0xff000000ULL) | 0x5a000000ULL;
		break;
	case 2:
		*what = "MOV 2";
		WRITE_ONCE(e[0], v);
		WRITE_ONCE(((u16 *)e)[1], 0xa55a);
		want[0] = (v & ~0xffff0000ULL) | 0xa55a0000ULL;
		break;
	case 3:
		*what = "MOV 4";
		WRITE_ONCE(e[0], v);
		WRITE_ONCE(((u32 *)e)[1], 0x11223344);
		want[0] = (v & 0xffffffffULL) | 0x1122334400000000ULL;
		break;
	case 4:
		*what = "MOVNTI";
		asm volatile("movnti %1, %0\n\tsfence" : "=m"(e[0]) : "r"(v) : "memory");
		want[0] = v;
		break;
	case 5:
		*what = "SSE MOVQ";
		kernel_fpu_begin();
		asm volatile("movq %1, %%xmm0\n\tmovq %%xmm0, %0" : "=m"(e[0]) : "r"(w) : "memory"); /* xmm0 is ours between kernel_fpu_begin and _end */
		kernel_fpu_end();
		want[0] = w;
		break;
	case 6:
		*what = "REP MOVSB";
		src[0] = v;
		src[1] = w;
		dst = e;
		n = 16;
		{
			void *sp = src;

			asm volatile("rep movsb" : "+D"(dst), "+S"(sp), "+c"(n) : : "memory");
		}
		want[0] = v;
		want[1] = w;
		break;
	case 7:
		*what = "REP STOSQ";
		dst = e;
		n = 2;
		asm volatile("rep stosq" : "+D"(dst), "+c"(n) : "a"(w) : "memory");
		want[0] = w;
		want[1] = w;
		break;
	case 8:
		*what = "LOCK CMPXCHG";
		WRITE_ONCE(e[0], v);
		old = cmpxchg(&e[0], v, w);
		want[0] = old == v ? w : ~0ULL;
		break;
	case 9:
		*what = "XCHG";
		WRITE_ONCE(e[0], v);
		old = xchg(&e[0], w);
		want[0] = old == v ? w : ~0ULL;
		break;
	case 10:
		*what = "LOCK OR";
		WRITE_ONCE(e[0], v);
		asm volatile("lock orq %1, %0" : "+m"(e[0]) : "r"(0xf0ULL) : "memory");
		want[0] = v | 0xf0;
		break;
	case 11:
		*what = "LOCK BTS";
		WRITE_ONCE(e[0], v);
		asm volatile("lock btsq %1, %0" : "+m"(e[0]) : "Ir"(62L) : "memory");
		want[0] = v | (1ULL << 62);
		break;
	case 12:
		*what = "LOCK BTR";
		WRITE_ONCE(e[0], v);
		asm volatile("lock btrq %1, %0" : "+m"(e[0]) : "Ir"(8L) : "memory");
		want[0] = v & ~(1ULL << 8);
		break;
	case 13:
		*what = "LOCK XADD";
		WRITE_ONCE(e[0], v);
		old = 0x100;
		asm volatile("lock xaddq %0, %1" : "+r"(old), "+m"(e[0]) : : "memory");
		want[0] = old == v ? v + 0x100 : ~0ULL;
		break;
	case 14:
		*what = "LOCK CMPXCHG16B";
		WRITE_ONCE(e[0], v);
		WRITE_ONCE(e[1], w);
		{
			u64 lo = v, hi = w;

			asm volatile("lock cmpxchg16b %[m]\n\tsete %[ok]"
				     : [m] "+m"(*(u64(*)[2])e), "+a"(lo), "+d"(hi), [ok] "=qm"(ok)
				     : "b"(w), "c"(v)
				     : "memory");
		}
		want[0] = ok ? w : ~0ULL;
		want[1] = ok ? v : ~0ULL;
		break;
	default:
		return false;
	}
	return true;
}

static void attack_store_forms(const char *name)
{
	struct mm_struct *mm = current->mm;
	struct swap_request *req;
	unsigned long region, a, va;
	pmd_t *pmd;
	pte_t *pte;
	spinlock_t *ptl;
	u64 *e, want[2], got[2];
	const char *what = "";
	char bad[160] = "";
	long r, s;
	int form, forms = 0;
	u64 t0, t1, t2;
	char c;

	req = kzalloc(sizeof(*req), GFP_KERNEL);
	region = table_region(name, mm, &a);
	if (!req || IS_ERR_VALUE(region))
		goto out;
	/* The read that makes tamahv watch the page table: an untouched page. */
	t0 = ktime_get_ns();
	va = a + 7 * PAGE_SIZE;
	req->va = va;
	req->len = PAGE_SIZE;
	req->options = OPT_NOFAULT;
	sha256_of(0, req->sha256);
	r = hypercall(HC_SWAP_READ, (unsigned long)req, sizeof(*req));
	if (r != 0) {
		report(name, "FAILED", "HcSwapRead of an untouched page answered %ld", r);
		goto out;
	}

	mmap_read_lock(mm);
	pmd = table_pmd(mm, a);
	if (!pmd) {
		mmap_read_unlock(mm);
		report(name, "FAILED", "no page table for %#lx", a);
		goto out;
	}
	pte = pte_offset_map_lock(mm, pmd, a, &ptl);
	e = (u64 *)pte + FORM_SLOT;
	for (form = 0; store_form(form, e, &what, want); form++) {
		got[0] = READ_ONCE(e[0]);
		got[1] = READ_ONCE(e[1]);
		WRITE_ONCE(e[0], 0);
		WRITE_ONCE(e[1], 0);
		forms++;
		if ((got[0] != want[0] || got[1] != want[1]) && !bad[0])
			snprintf(bad, sizeof(bad), "%s left %#llx %#llx where %#llx %#llx belongs", what, got[0], got[1], want[0], want[1]);
	}
	pte_unmap_unlock(pte, ptl);
	mmap_read_unlock(mm);
	t1 = ktime_get_ns();

	/* The read ends: its page comes in as the guest's own. */
	if (get_user(c, (char __user *)va))
		c = 0;
	s = wait_status(2000);
	t2 = ktime_get_ns();
	if (bad[0])
		report(name, "FAILED", "%s", bad);
	else
		report(name, "survived", "%d store forms to a watched page table in %llu us, each read back exact; the read then ended %s after %llu us more",
		       forms, (t1 - t0) / 1000, status_name(s), (t2 - t1) / 1000);
out:
	if (!IS_ERR_VALUE(region))
		vm_munmap(region, 6 << 20);
	kfree(req);
}

/*
 * Finding 10: XCR0 values the processor refuses. The guest kernel may run
 * without XSAVE (Linux turns it off on Bochs, whose XSAVE sizes it finds
 * inconsistent): CR4.OSXSAVE is then set for the attack and cleared again.
 */
static void attack_xsetbv(const char *name, u64 val)
{
	unsigned int a, b, c, d;
	u64 supported, xcr0 = 0;
	unsigned long trap = NO_FAULT, flags, cr4, t;
	bool osxsave;

	cpuid_count(0xd, 0, &a, &b, &c, &d);
	supported = (u64)d << 32 | a;
	local_irq_save(flags);
	cr4 = native_read_cr4();
	osxsave = cr4 & X86_CR4_OSXSAVE;
	t = osxsave ? NO_FAULT : try_cr4(cr4 | X86_CR4_OSXSAVE);
	if (t == NO_FAULT) {
		xcr0 = xgetbv(0);
		trap = try_xsetbv(0, val);
		if (trap == NO_FAULT)
			try_xsetbv(0, xcr0);
		if (!osxsave)
			try_cr4(cr4);
	}
	local_irq_restore(flags);
	if (t != NO_FAULT)
		report(name, "refused", "setting CR4.OSXSAVE: %s", vector_name(t));
	else if (trap == NO_FAULT)
		report(name, "FAILED", "XCR0 %#llx accepted (supported %#llx); restored %#llx", val, supported, xcr0);
	else
		report(name, "refused", "XSETBV %#llx: %s; states %ssupported (CPUID.0xD %#llx)%s", val,
		       vector_name(trap), (val & ~supported) ? "not all " : "", supported,
		       osxsave ? "" : ", CR4.OSXSAVE set for it");
}

/*
 * Finding 11: CR0/CR4 values the processor refuses in 64-bit mode. CR0
 * writes also flip CR0.NE, which tamahv owns, so that the write exits.
 */
static void attack_cr(const char *name, int cr, unsigned long val)
{
	unsigned long orig, trap, flags;

	local_irq_save(flags);
	orig = cr == 0 ? native_read_cr0() : native_read_cr4();
	trap = cr == 0 ? try_cr0(val) : try_cr4(val);
	if (trap == NO_FAULT) {
		if (cr == 0)
			try_cr0(orig);
		else
			try_cr4(orig);
	}
	local_irq_restore(flags);
	if (trap == NO_FAULT)
		report(name, "FAILED", "MOV CR%d %#lx accepted (was %#lx); restored", cr, val, orig);
	else
		report(name, "refused", "MOV CR%d %#lx: %s", cr, val, vector_name(trap));
}

/* Finding 12: port I/O that overlaps tamahv's COM1 (0x3f8-0x3ff). */
static void attack_io(const char *name, u16 port, int size)
{
	unsigned long trap, flags;
	u32 v;

	local_irq_save(flags);
	trap = try_in(port, size, &v);
	local_irq_restore(flags);
	if (trap != NO_FAULT)
		report(name, "refused", "IN%s %#x: %s", size == 2 ? "W" : "L", port, vector_name(trap));
	else
		report(name, "survived", "IN%s %#x read %#x", size == 2 ? "W" : "L", port, v);
}

/* Finding 12: memory that is not RAM, above RAM or above 4 GiB. */
static void attack_mem(const char *name, u64 pa)
{
	void __iomem *p = ioremap(pa, PAGE_SIZE);
	unsigned long t1, t2;
	u32 v = 0;

	if (!p) {
		report(name, "FAILED", "ioremap %#llx failed", pa);
		return;
	}
	t1 = try_read32(p, &v);
	t2 = try_write32(p + 4, 0x7a6d6168);
	iounmap(p);
	if (t1 != NO_FAULT || t2 != NO_FAULT)
		report(name, "refused", "physical %#llx: read %s, write %s", pa,
		       t1 == NO_FAULT ? "ok" : vector_name(t1), t2 == NO_FAULT ? "ok" : vector_name(t2));
	else
		report(name, "survived", "physical %#llx read %#x, write done", pa, v);
}

/*
 * Finding 13: WRMSR to IA32_TIME_STAMP_COUNTER / IA32_TSC_ADJUST, the
 * clock tamahv keeps time with. The TSC is moved back by half its value,
 * some exits run, then the old time line is restored (through TSC_ADJUST
 * where there is one, so no drift is left).
 */
static void attack_tsc(const char *name, bool adjust)
{
	unsigned long flags;
	u64 t0, t1, t2, adj = 0;
	int err, err2 = 0, has_adj;
	long id;

	local_irq_save(flags);
	has_adj = !rdmsrl_safe(MSR_IA32_TSC_ADJUST, &adj);
	t0 = rdtsc_ordered();
	if (adjust)
		err = wrmsrl_safe(MSR_IA32_TSC_ADJUST, adj - t0 / 2);
	else
		err = wrmsrl_safe(MSR_IA32_TSC, t0 / 2);
	t1 = rdtsc_ordered();
	id = hypercall(HC_IDENTIFY, 0, 0);
	native_cpuid_eax(0);
	if (!err) {
		if (has_adj)
			err2 = wrmsrl_safe(MSR_IA32_TSC_ADJUST, adj);
		else
			err2 = wrmsrl_safe(MSR_IA32_TSC, rdtsc_ordered() + (t0 - t0 / 2));
	}
	t2 = rdtsc_ordered();
	local_irq_restore(flags);
	if ((id & ~0xffffUL) != (HC_MAGIC & ~0xffffUL))
		report(name, "FAILED", "HcIdentify answered %#lx with the clock moved", id);
	else if (err)
		report(name, "refused", "WRMSR %s: #GP", adjust ? "IA32_TSC_ADJUST" : "IA32_TIME_STAMP_COUNTER");
	else
		report(name, "survived", "guest TSC %llu -> %llu, restored to %llu%s; HcIdentify answered with the clock moved",
		       t0, t1, t2, err2 ? " (restore refused)" : "");
}

struct attack {
	const char *name;
	void (*fn)(const struct attack *);
	u64 arg;
	int arg2;
};

static void run_detour(const struct attack *a) { attack_detour(a->name); }
static void run_tables(const struct attack *a) { attack_tables(a->name, a->arg, a->arg2); }
static void run_xsetbv(const struct attack *a) { attack_xsetbv(a->name, a->arg); }
static void run_io(const struct attack *a) { attack_io(a->name, a->arg, a->arg2); }
static void run_mem(const struct attack *a) { attack_mem(a->name, a->arg); }
static void run_tsc(const struct attack *a) { attack_tsc(a->name, a->arg); }
static void run_store_forms(const struct attack *a) { attack_store_forms(a->name); }

static void run_cr(const struct attack *a)
{
	unsigned long cr0 = native_read_cr0(), cr4 = native_read_cr4(), v;

	switch (a->arg) {
	case 0: /* NW without CD */
		v = (cr0 & ~(X86_CR0_NE | X86_CR0_CD)) | X86_CR0_NW;
		break;
	case 1: /* paging off in 64-bit mode */
		v = cr0 & ~(X86_CR0_NE | X86_CR0_PG);
		break;
	case 2: /* paging without protection */
		v = cr0 & ~(X86_CR0_NE | X86_CR0_PE);
		break;
	case 3: /* reserved bit 32 */
		v = (cr0 & ~X86_CR0_NE) | (1UL << 32);
		break;
	case 4: /* CR4.PAE off in IA-32e mode */
		v = cr4 & ~X86_CR4_PAE;
		break;
	case 5: /* CR4.LA57 toggled in IA-32e mode */
		v = cr4 ^ X86_CR4_LA57;
		break;
	case 6: /* CR4.VMXE: VMX is tamahv's */
		v = cr4 | X86_CR4_VMXE;
		break;
	default: /* reserved bit 32 */
		v = cr4 | (1UL << 32);
	}
	attack_cr(a->name, a->arg < 4 ? 0 : 4, v);
}

static const struct attack attacks[] = {
	{ "detour-in-tamahv", run_detour },
	{ "pmd-to-tamahv", run_tables, 1, 0 },
	{ "pmd-to-mmio", run_tables, 1, 1 },
	{ "pte-to-tamahv", run_tables, 0, 0 },
	{ "pte-to-mmio", run_tables, 0, 1 },
	{ "xsetbv-0x27", run_xsetbv, 0x27 },
	{ "xsetbv-0xe3", run_xsetbv, 0xe3 },
	{ "xsetbv-0xf", run_xsetbv, 0xf },
	{ "xsetbv-amx-tilecfg", run_xsetbv, 0x20003 },
	{ "cr0-nw-without-cd", run_cr, 0 },
	{ "cr0-paging-off", run_cr, 1 },
	{ "cr0-pg-without-pe", run_cr, 2 },
	{ "cr0-bit32", run_cr, 3 },
	{ "cr4-pae-off", run_cr, 4 },
	{ "cr4-la57-toggle", run_cr, 5 },
	{ "cr4-vmxe", run_cr, 6 },
	{ "cr4-bit32", run_cr, 7 },
	{ "io-inw-0x3f7", run_io, 0x3f7, 2 },
	{ "io-inl-0x3f5", run_io, 0x3f5, 4 },
	{ "io-inl-0x3fe", run_io, 0x3fe, 4 },
	{ "io-inw-0xffff", run_io, 0xffff, 2 },
	{ "mem-above-ram", run_mem, 0xc0000000 },
	{ "mem-above-4g", run_mem, 0x110000000ULL },
	{ "wrmsr-tsc", run_tsc, 0 },
	{ "wrmsr-tsc-adjust", run_tsc, 1 },
	{ "pte-store-forms", run_store_forms },
};

static int set_attack(const char *val, const struct kernel_param *kp)
{
	char name[64];
	size_t i;

	strscpy(name, val, sizeof(name));
	strim(name);
	if (!strcmp(name, "list")) {
		outcome[0] = 0;
		for (i = 0; i < ARRAY_SIZE(attacks); i++) {
			strlcat(outcome, attacks[i].name, sizeof(outcome));
			strlcat(outcome, " ", sizeof(outcome));
		}
		return 0;
	}
	for (i = 0; i < ARRAY_SIZE(attacks); i++) {
		if (!strcmp(name, attacks[i].name)) {
			attacks[i].fn(&attacks[i]);
			return 0;
		}
	}
	return -EINVAL;
}

static int get_attack(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%s\n", outcome);
}

static const struct kernel_param_ops attack_ops = { .set = set_attack, .get = get_attack };
module_param_cb(attack, &attack_ops, NULL, 0644);
MODULE_PARM_DESC(attack, "write an attack's name (or list) to run it; read the outcome");

static int set_exit(const char *val, const struct kernel_param *kp)
{
	unsigned long status;
	long r;
	int err = kstrtoul(val, 0, &status);

	if (err)
		return err;
	r = hypercall(HC_EXIT, status, 0);
	snprintf(outcome, sizeof(outcome), "tamahv-adversary: exit: hypercall answered %ld", r);
	printk(KERN_INFO "%s\n", outcome);
	return -EIO;
}

static const struct kernel_param_ops exit_ops = { .set = set_exit, .get = get_attack };
module_param_cb(exit, &exit_ops, NULL, 0200);
MODULE_PARM_DESC(exit, "end the guest with this status (the exit hypercall, from ring 0)");

static int __init adversary_init(void)
{
	long id = hypercall(HC_IDENTIFY, 0, 0);

	if ((id & ~0xffffUL) != (HC_MAGIC & ~0xffffUL)) {
		pr_err("tamahv-adversary: not under tamahv (HcIdentify %#lx)\n", id);
		return -ENODEV;
	}
	snprintf(outcome, sizeof(outcome), "tamahv-adversary: loaded, %zu attacks", ARRAY_SIZE(attacks));
	return 0;
}

static void __exit adversary_exit(void)
{
}

module_init(adversary_init);
module_exit(adversary_exit);
