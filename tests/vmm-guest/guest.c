/* vmm-min's test guest: a freestanding x86-64 program entered in 64-bit mode (CPL0, paging on,
 * interrupts off). It finds the virtio-mmio devices at 0xd0000000 + 4 KiB * n, drives one queue
 * of each by polling, and reports on the serial port (0x3f8), one "RESULT ..." line per check.
 * It ends by pulsing the i8042 reset line (vmm-min exits 0).
 *
 * Kept small: under PVM every guest-kernel instruction is emulated.
 *
 * Build: gcc -O2 -ffreestanding -nostdlib -static -fno-pic -no-pie -mno-red-zone
 *        -mgeneral-regs-only -fno-stack-protector -Wl,-Ttext=0x200000 -o guest.elf guest.c
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

__asm__(".section .text.start\n"
        ".global _start\n"
        "_start:\n"
        "  lea stack_top(%rip), %rsp\n"
        "  call main\n"
        "1: hlt\n"
        "  jmp 1b\n");

static u8 stack[16384] __attribute__((aligned(16), used));
__asm__(".global stack_top\n.set stack_top, stack + 16384\n");

/* ---- port I/O and serial ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static void putc(char c) { outb(0x3f8, (u8)c); }
static void puts(const char *s) { while (*s) putc(*s++); }
static void putx(u64 v) {
    char b[17];
    int i = 16;
    b[16] = 0;
    do { b[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v && i);
    puts("0x");
    puts(&b[i]);
}
static void putd(u64 v) {
    char b[21];
    int i = 20;
    b[20] = 0;
    do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v && i);
    puts(&b[i]);
}
static void result(const char *name, int ok) {
    puts("RESULT ");
    puts(name);
    puts(ok ? " ok\n" : " FAIL\n");
}
static void memset8(void *d, u8 v, u64 n) { u8 *p = d; while (n--) *p++ = v; }
static void memcpy8(void *d, const void *s, u64 n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; }
static int memeq(const void *a, const void *b, u64 n) {
    const u8 *p = a, *q = b;
    while (n--) if (*p++ != *q++) return 0;
    return 1;
}
/* The C compiler may emit calls to these for struct copies. */
void *memset(void *d, int v, u64 n) { memset8(d, (u8)v, n); return d; }
void *memcpy(void *d, const void *s, u64 n) { memcpy8(d, s, n); return d; }

/* ---- virtio-mmio ---- */
#define MMIO_BASE 0xd0000000UL
#define R(base, off) (*(volatile u32 *)((base) + (off)))
#define QSIZE 8
#define SPIN 1000000UL

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct ring {
    struct desc desc[QSIZE];
    u16 avail_flags, avail_idx, avail_ring[QSIZE], used_event;
    u8 pad[4096 - QSIZE * 16 - 6 - QSIZE * 2];
    u16 used_flags, used_idx;
    struct { u32 id, len; } used[QSIZE];
    u16 avail_event;
} __attribute__((aligned(4096)));

struct vq { struct ring *r; u64 base; u32 index; u16 last_used; };

static struct ring rings[8];
static int nrings;

static void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

/* Resets and negotiates: VERSION_1 plus `want` (low 32 bits). Returns 0 on success. */
static int dev_init(u64 base, u32 want) {
    R(base, 0x70) = 0;
    R(base, 0x70) = 1 | 2; /* ACKNOWLEDGE | DRIVER */
    R(base, 0x14) = 0;
    u32 lo = R(base, 0x10);
    R(base, 0x14) = 1;
    u32 hi = R(base, 0x10);
    if (!(hi & 1)) return -1;
    R(base, 0x24) = 0;
    R(base, 0x20) = lo & want;
    R(base, 0x24) = 1;
    R(base, 0x20) = 1;
    R(base, 0x70) = 1 | 2 | 8;
    if (!(R(base, 0x70) & 8)) return -2;
    return 0;
}

static int vq_setup(struct vq *q, u64 base, u32 index) {
    if (nrings == 8) return -1;
    q->r = &rings[nrings++];
    q->base = base;
    q->index = index;
    q->last_used = 0;
    R(base, 0x30) = index;
    if (R(base, 0x34) < QSIZE) return -1;
    R(base, 0x38) = QSIZE;
    u64 d = (u64)q->r->desc, a = (u64)&q->r->avail_flags, u = (u64)&q->r->used_flags;
    R(base, 0x80) = (u32)d; R(base, 0x84) = (u32)(d >> 32);
    R(base, 0x90) = (u32)a; R(base, 0x94) = (u32)(a >> 32);
    R(base, 0xa0) = (u32)u; R(base, 0xa4) = (u32)(u >> 32);
    R(base, 0x44) = 1;
    return 0;
}

static void dev_ready(u64 base) { R(base, 0x70) = 1 | 2 | 8 | 4; }

/* Posts a chain of n buffers (flags: 2 = device writes it) starting at descriptor `head`. */
static void vq_post(struct vq *q, u16 head, int n, void **bufs, u32 *lens, u16 *wflags) {
    for (int i = 0; i < n; i++) {
        struct desc *d = &q->r->desc[head + i];
        d->addr = (u64)bufs[i];
        d->len = lens[i];
        d->flags = (u16)((i + 1 < n ? 1 : 0) | wflags[i]);
        d->next = (u16)(head + i + 1);
    }
    q->r->avail_ring[q->r->avail_idx % QSIZE] = head;
    mb();
    q->r->avail_idx++;
    mb();
}

static void vq_kick(struct vq *q) { R(q->base, 0x50) = q->index; }

/* Waits up to `spins` polls for one used element; returns its length (its id in *id), or -1
   on timeout. */
static long vq_take(struct vq *q, u64 spins, u32 *id) {
    for (u64 i = 0; i < spins; i++) {
        if (*(volatile u16 *)&q->r->used_idx != q->last_used) {
            mb();
            u32 len = q->r->used[q->last_used % QSIZE].len;
            *id = q->r->used[q->last_used % QSIZE].id;
            q->last_used++;
            return len;
        }
    }
    return -1;
}

/* Waits for one used element; returns its length or -1 on timeout. */
static long vq_wait(struct vq *q) {
    u32 id;
    return vq_take(q, SPIN, &id);
}

/* ---- virtio-blk ---- */
struct blk_req { u32 type, reserved; u64 sector; };
static struct blk_req breq;
static u8 bstatus;
static u8 wbuf[512], rbuf[512];

static int blk_do(struct vq *q, u32 type, u64 sector, void *data, u32 len, int dev_writes) {
    breq.type = type;
    breq.reserved = 0;
    breq.sector = sector;
    bstatus = 0xff;
    void *bufs[3] = {&breq, data, &bstatus};
    u32 lens[3] = {16, len, 1};
    u16 wf[3] = {0, (u16)(dev_writes ? 2 : 0), 2};
    if (data) {
        vq_post(q, 0, 3, bufs, lens, wf);
    } else {
        bufs[1] = &bstatus; lens[1] = 1; wf[1] = 2;
        vq_post(q, 0, 2, bufs, lens, wf);
    }
    vq_kick(q);
    if (vq_wait(q) < 0) return -1;
    return bstatus;
}

static void fill_pattern(u32 round) {
    const char *tag = "VMM-MIN-GUEST-WROTE-THIS round ";
    memset8(wbuf, 0, 512);
    memcpy8(wbuf, tag, 31);
    wbuf[31] = (u8)('0' + round);
    for (int i = 32; i < 512; i++) wbuf[i] = (u8)(i * 7 + round);
}

/* A driver that misbehaves: rings outside guest memory, a queue index past the last, config
   writes far out. vmm-min must refuse to start the device (DEVICE_NEEDS_RESET) and carry on. */
static void hostile_blk(u64 base) {
    /* Features the device did not offer (bit 30: vhost-user's own, never offered to a guest). */
    R(base, 0x70) = 0;
    R(base, 0x70) = 1 | 2;
    R(base, 0x24) = 0; R(base, 0x20) = 1u << 30;
    R(base, 0x24) = 1; R(base, 0x20) = 1;
    R(base, 0x70) = 1 | 2 | 8;
    result("blk-hostile-features-refused", !(R(base, 0x70) & 8));

    if (dev_init(base, 0)) { result("blk-hostile-init", 0); return; }
    R(base, 0x30) = 0;
    R(base, 0x38) = QSIZE;
    R(base, 0x80) = 0; R(base, 0x84) = 0x100; /* descriptors at 1 TiB */
    R(base, 0x90) = 0; R(base, 0x94) = 0;
    R(base, 0xa0) = 0; R(base, 0xa4) = 0;
    R(base, 0x44) = 1;
    R(base, 0x30) = 99;
    R(base, 0x44) = 1; /* no such queue: ignored */
    int bad_queue_ignored = R(base, 0x34) == 0 && R(base, 0x44) == 0;
    R(base, 0x800) = 0xffffffff; /* config write far past the end */
    dev_ready(base);
    u32 st = R(base, 0x70);
    puts("BLK hostile status "); putx(st); puts("\n");
    result("blk-hostile-refused", (st & 0x40) != 0 && bad_queue_ignored);
}

static struct vq blk_q, net_rx, net_tx, scsi_q;
static int have_blk, have_net, have_scsi;

static void test_blk(u64 base) {
    extern int want_hostile;
    if (want_hostile) hostile_blk(base);
    /* VIRTIO_BLK_F_FLUSH (9) */
    if (dev_init(base, 1u << 9)) { result("blk-init", 0); return; }
    struct vq q;
    if (vq_setup(&q, base, 0)) { result("blk-queue", 0); return; }
    dev_ready(base);
    u64 cap = *(volatile u32 *)(base + 0x100) | ((u64)*(volatile u32 *)(base + 0x104) << 32);
    puts("BLK capacity "); putd(cap); puts("\n");
    result("blk-config", cap > 8);

    static char id[21];
    memset8(id, 0, 21);
    int st = blk_do(&q, 8, 0, id, 20, 1);
    puts("BLK id '"); puts(id); puts("'\n");
    result("blk-get-id", st == 0);

    fill_pattern(1);
    st = blk_do(&q, 1, 8, wbuf, 512, 0);
    result("blk-write", st == 0);
    memset8(rbuf, 0, 512);
    st = blk_do(&q, 0, 8, rbuf, 512, 1);
    result("blk-read", st == 0 && memeq(rbuf, wbuf, 512));
    st = blk_do(&q, 4, 0, 0, 0, 0);
    result("blk-flush", st == 0);

    /* A driver reset after the device ran (the backend's rings are stopped), then a fresh
       setup on new rings: the data written before is read back. */
    R(base, 0x70) = 0;
    int reset_ok = R(base, 0x70) == 0;
    if (dev_init(base, 1u << 9) || vq_setup(&q, base, 0)) { result("blk-reset-restart", 0); return; }
    dev_ready(base);
    memset8(rbuf, 0, 512);
    st = blk_do(&q, 0, 8, rbuf, 512, 1);
    result("blk-reset-restart", reset_ok && st == 0 && memeq(rbuf, wbuf, 512));

    /* Wait for a config-change interrupt (the host resizes the disk), when asked. */
    extern int want_resize;
    if (want_resize) {
        u32 gen = R(base, 0xfc);
        puts("WAITING-RESIZE\n");
        while (!(R(base, 0x60) & 2)) {}
        R(base, 0x64) = 2;
        u64 cap2 = R(base, 0x100) | ((u64)R(base, 0x104) << 32);
        puts("BLK resized capacity "); putd(cap2); puts("\n");
        result("blk-config-change", cap2 != cap && R(base, 0xfc) != gen && !(R(base, 0x60) & 2));
    }

    blk_q = q;
    have_blk = 1;
}

/* Second round, after the host restarted the backend. */
static void blk_round2(void) {
    fill_pattern(2);
    int st = blk_do(&blk_q, 1, 16, wbuf, 512, 0);
    memset8(rbuf, 0, 512);
    int st2 = blk_do(&blk_q, 0, 16, rbuf, 512, 1);
    result("blk-after-reconnect", st == 0 && st2 == 0 && memeq(rbuf, wbuf, 512));
}

/* In-flight tracking (vmmtest.inflight): the host froze the image's filesystem, so the write
   posted first blocks in the backend while the read posted after it completes; the host then
   kills the backend, thaws and restarts it. The write must come back (resubmitted from the
   in-flight region vmm-min hands the new backend), exactly once, with its data on disk. */
static struct blk_req ireq[2];
static u8 istatus[2];
static u8 ibuf[2][512];

static void wait_serial_byte(void) {
    while (!(inb(0x3fd) & 1)) {}
    (void)inb(0x3f8);
}

static void blk_inflight_round(void) {
    struct vq *q = &blk_q;
    fill_pattern(3);
    memcpy8(ibuf[0], wbuf, 512);
    ireq[0].type = 1; ireq[0].reserved = 0; ireq[0].sector = 24;
    ireq[1].type = 0; ireq[1].reserved = 0; ireq[1].sector = 8;
    istatus[0] = istatus[1] = 0xff;
    u32 lens[3] = {16, 512, 1};
    void *w[3] = {&ireq[0], ibuf[0], &istatus[0]};
    u16 wf[3] = {0, 0, 2};
    vq_post(q, 0, 3, w, lens, wf);
    void *r[3] = {&ireq[1], ibuf[1], &istatus[1]};
    u16 rf[3] = {0, 2, 2};
    vq_post(q, 3, 3, r, lens, rf);
    vq_kick(q);
    u32 first = 0xffff;
    vq_take(q, SPIN * 20, &first);
    puts("INFLIGHT first used "); putd(first); puts("\n");
    result("blk-inflight-read-first", first == 3 && istatus[1] == 0 && istatus[0] == 0xff);
    puts("WAITING-RESTART\n");
    wait_serial_byte();
    u32 second = 0xffff;
    vq_take(q, SPIN * 20, &second);
    puts("INFLIGHT second used "); putd(second); puts("\n");
    result("blk-inflight-write-completed", second == 0 && istatus[0] == 0);
    memset8(rbuf, 0, 512);
    int st = blk_do(q, 0, 24, rbuf, 512, 1);
    result("blk-inflight-data", st == 0 && memeq(rbuf, wbuf, 512));
}

/* ---- virtio-net ---- */
static u8 rxbuf[12 + 1518];
static u8 txbuf[12 + 64];

static u8 net_mac[6];

/* Posts a receive buffer, sends one frame, waits for both. */
static void net_exchange(const u8 *mac, const char *tx_name, const char *rx_name) {
    void *rb[1] = {rxbuf};
    u32 rl[1] = {sizeof rxbuf};
    u16 rw[1] = {2};
    vq_post(&net_rx, 0, 1, rb, rl, rw);
    vq_kick(&net_rx);

    memset8(txbuf, 0, sizeof txbuf);
    u8 *f = txbuf + 12;
    memset8(f, 0xff, 6);
    memcpy8(f + 6, mac, 6);
    f[12] = 0x88; f[13] = 0xb5; /* local experimental ethertype */
    memcpy8(f + 14, "vmm-min test frame", 18);
    void *tb[1] = {txbuf};
    u32 tl[1] = {sizeof txbuf};
    u16 tw[1] = {0};
    vq_post(&net_tx, 0, 1, tb, tl, tw);
    vq_kick(&net_tx);
    result(tx_name, vq_wait(&net_tx) >= 0);
    long n = vq_wait(&net_rx);
    puts("NET rx bytes "); putd(n < 0 ? 0 : (u64)n); puts("\n");
    result(rx_name, n > 12 + 14);
}

static void test_net(u64 base) {
    if (dev_init(base, 1u << 5)) { result("net-init", 0); return; }
    struct vq rx, tx;
    if (vq_setup(&rx, base, 0) || vq_setup(&tx, base, 1)) { result("net-queue", 0); return; }
    dev_ready(base);
    u8 mac[6];
    for (int i = 0; i < 6; i++) net_mac[i] = mac[i] = *(volatile u8 *)(base + 0x100 + i);
    puts("NET mac ");
    for (int i = 0; i < 6; i++) { putx(mac[i]); putc(i < 5 ? ':' : '\n'); }

    net_rx = rx;
    net_tx = tx;
    have_net = 1;
    net_exchange(mac, "net-tx", "net-rx");
}

/* ---- virtio-scsi ---- */
struct scsi_req { u8 lun[8]; u64 id; u8 attr, prio, crn, cdb[32]; } __attribute__((packed));
struct scsi_resp { u32 sense_len, resid; u16 qual; u8 status, response; u8 sense[96]; } __attribute__((packed));
static struct scsi_req sreq;
static struct scsi_resp sresp;
static u8 sdata[64];

static int scsi_cmd(struct vq *q, const u8 *cdb, int cdblen, u32 len) {
    memset8(&sreq, 0, sizeof sreq);
    sreq.lun[0] = 1;
    sreq.lun[2] = 0x40;
    sreq.id++;
    memcpy8(sreq.cdb, cdb, (u64)cdblen);
    memset8(&sresp, 0xee, sizeof sresp);
    memset8(sdata, 0, sizeof sdata);
    void *b[3] = {&sreq, &sresp, sdata};
    u32 l[3] = {sizeof sreq, sizeof sresp, len};
    u16 w[3] = {0, 2, 2};
    vq_post(q, 0, 3, b, l, w);
    vq_kick(q);
    if (vq_wait(q) < 0) return -1;
    return sresp.response == 0 ? sresp.status : 0x100 + sresp.response;
}

static void test_scsi(u64 base) {
    if (dev_init(base, 0)) { result("scsi-init", 0); return; }
    struct vq ctl, evt, req;
    if (vq_setup(&ctl, base, 0) || vq_setup(&evt, base, 1) || vq_setup(&req, base, 2)) {
        result("scsi-queue", 0);
        return;
    }
    dev_ready(base);
    static const u8 tur[6] = {0};
    /* The first command may report a unit attention: retry once. */
    if (scsi_cmd(&req, tur, 6, 0) != 0) (void)scsi_cmd(&req, tur, 6, 0);
    static const u8 inq[6] = {0x12, 0, 0, 0, 36, 0};
    int st = scsi_cmd(&req, inq, 6, 36);
    puts("SCSI inquiry type "); putd(sdata[0] & 0x1f); puts(" vendor '");
    sdata[32] = 0;
    puts((const char *)sdata + 8); puts("'\n");
    result("scsi-inquiry", st == 0 && (sdata[0] & 0x1f) == 5);
    static const u8 cap[10] = {0x25};
    st = scsi_cmd(&req, cap, 10, 8);
    u32 last = (u32)sdata[0] << 24 | (u32)sdata[1] << 16 | (u32)sdata[2] << 8 | sdata[3];
    u32 bs = (u32)sdata[4] << 24 | (u32)sdata[5] << 16 | (u32)sdata[6] << 8 | sdata[7];
    puts("SCSI capacity last_lba "); putd(last); puts(" block "); putd(bs); puts("\n");
    result("scsi-read-capacity", st == 0 && bs == 2048);
    scsi_q = req;
    have_scsi = 1;
}

static void scsi_round2(void) {
    static const u8 inq[6] = {0x12, 0, 0, 0, 36, 0};
    int st = scsi_cmd(&scsi_q, inq, 6, 36);
    result("scsi-after-reconnect", st == 0 && (sdata[0] & 0x1f) == 5);
}

int want_wait, want_resize, want_hostile;

/* ---- ACPI: what vmm-min described (RSDP at 0xe0000) ---- */
static u64 acpi_cpus;

static u8 sum8(const u8 *p, u32 n) { u8 s = 0; while (n--) s = (u8)(s + *p++); return s; }

static void check_acpi(void) {
    const u8 *rsdp = (const u8 *)0xe0000UL;
    if (!memeq(rsdp, "RSD PTR ", 8)) { puts("ACPI none\n"); return; }
    int ok = sum8(rsdp, 20) == 0 && sum8(rsdp, 36) == 0;
    const u8 *xsdt = (const u8 *)*(const u64 *)(rsdp + 24);
    u32 xlen = *(const u32 *)(xsdt + 4);
    ok = ok && memeq(xsdt, "XSDT", 4) && sum8(xsdt, xlen) == 0;
    u64 cpus = 0, devices = 0;
    for (u32 off = 36; ok && off + 8 <= xlen; off += 8) {
        const u8 *t = (const u8 *)*(const u64 *)(xsdt + off);
        u32 len = *(const u32 *)(t + 4);
        ok = sum8(t, len) == 0;
        if (memeq(t, "APIC", 4)) {
            for (u32 e = 44; e + 2 <= len; e += t[e + 1]) {
                if (t[e + 1] == 0) { ok = 0; break; }
                if (t[e] == 0 && (t[e + 4] & 1)) cpus++;
            }
        } else if (memeq(t, "FACP", 4)) {
            const u8 *d = (const u8 *)*(const u64 *)(t + 140);
            u32 dlen = *(const u32 *)(d + 4);
            ok = ok && memeq(d, "DSDT", 4) && sum8(d, dlen) == 0;
            for (u32 i = 36; i + 8 <= dlen; i++)
                if (memeq(d + i, "LNRO0005", 8)) devices++;
        }
    }
    puts("ACPI cpus "); putd(cpus); puts(" devices "); putd(devices); puts("\n");
    result("acpi-tables", ok);
    acpi_cpus = cpus;
}

/* Starts vCPU 1 with INIT and SIPI through the local APIC (KVM's, in the kernel); it runs a
   real-mode trampoline at 0x10000 that sets a flag and halts. */
static void start_ap(void) {
    static const u8 tramp[] = {
        0x2e, 0xc6, 0x06, 0x00, 0x01, 0x01, /* mov byte [cs:0x100], 1 */
        0xfa, 0xf4, 0xeb, 0xfd,             /* cli; hlt; jmp back to hlt */
    };
    volatile u8 *code = (volatile u8 *)0x10000UL;
    for (u32 i = 0; i < sizeof tramp; i++) code[i] = tramp[i];
    code[0x100] = 0;
    volatile u32 *icr_lo = (volatile u32 *)0xfee00300UL, *icr_hi = (volatile u32 *)0xfee00310UL;
    volatile u32 *svr = (volatile u32 *)0xfee000f0UL, *id = (volatile u32 *)0xfee00020UL;
    puts("LAPIC id "); putx(*id); puts(" version "); putx(*(volatile u32 *)0xfee00030UL);
    puts(" svr "); putx(*svr); puts("\n");
    *svr = 0x1ff; /* software-enable the local APIC, as an OS does before sending IPIs */
    *icr_hi = 1u << 24;
    *icr_lo = 0x4500;        /* INIT, assert */
    *icr_hi = 1u << 24;
    *icr_lo = 0x4600 | 0x10; /* STARTUP at 0x10000 */
    u64 i = 0;
    while (code[0x100] != 1 && i < SPIN) i++;
    puts("AP 1 "); puts(code[0x100] == 1 ? "started\n" : "did not start\n");
    result("ap-start", code[0x100] == 1);
}

/* Reads the command line from boot_params (rsi is not preserved: the pointer is fixed). */
static int cmdline_has(const char *word) {
    const char *cl = (const char *)(u64)*(volatile u32 *)(0x7000 + 0x228);
    if (!cl) return 0;
    for (; *cl; cl++) {
        const char *a = cl, *b = word;
        while (*b && *a == *b) { a++; b++; }
        if (!*b) return 1;
    }
    return 0;
}

void main(void) {
    puts("vmm-min test guest\n");
    want_wait = cmdline_has("vmmtest.wait");
    want_resize = cmdline_has("vmmtest.resize");
    want_hostile = cmdline_has("vmmtest.hostile");
    check_acpi();
    if (acpi_cpus > 1) start_ap();
    int found = 0;
    for (int i = 0; i < 11; i++) {
        u64 base = MMIO_BASE + (u64)i * 0x1000;
        if (R(base, 0) != 0x74726976) continue;
        u32 version = R(base, 4), id = R(base, 8);
        puts("DEVICE "); putd((u64)i); puts(" id "); putd(id); puts(" version "); putd(version); puts("\n");
        found++;
        if (version != 2) { result("mmio-version", 0); continue; }
        if (id == 2) test_blk(base);
        else if (id == 1) test_net(base);
        else if (id == 8) test_scsi(base);
    }
    /* Wait for a byte on the serial port (the host restarts backends meanwhile), then send
       new requests to every device. Only when the command line asks for it. */
    if (want_wait) {
        puts("WAITING for serial input\n");
        while (!(inb(0x3fd) & 1)) {}
        (void)inb(0x3f8);
        if (have_blk) blk_round2();
        if (have_net) net_exchange(net_mac, "net-tx-after-reconnect", "net-rx-after-reconnect");
        if (have_scsi) scsi_round2();
    }
    if (cmdline_has("vmmtest.inflight") && have_blk) {
        puts("WAITING-FREEZE\n");
        wait_serial_byte();
        blk_inflight_round();
    }
    puts("DEVICES "); putd((u64)found); puts("\nDONE\n");
    if (cmdline_has("vmmtest.halt")) {
        puts("HALTING\n");
        __asm__ volatile("cli; hlt");
    }
    outb(0x64, 0xfe);
}
