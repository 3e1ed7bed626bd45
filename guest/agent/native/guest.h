/*
 * What a zeroboot guest agent needs from the kernel and cannot get from its
 * language runtime: mounting the kernel filesystems, mapping the mailbox and
 * the doorbell (physical memory, through /dev/mem), crediting the host's boot
 * entropy, and draining the console. Shared by the Node.js addon
 * (zeroboot_node.c) and the bash builtin (zeroboot_bash.c); agent.py does
 * the same from Python.
 *
 * The mailbox layout is defined in crates/protocol/src/lib.rs; zeroboot
 * generates its ZB_* constants into zeroboot_mailbox.h, next to this file.
 */
#ifndef ZEROBOOT_GUEST_H
#define ZEROBOOT_GUEST_H

#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <grp.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>

#include "zeroboot_mailbox.h"

/* The unprivileged user code runs as by default, as in E2B's sandboxes:
 * `user`, uid and gid 1000, home /home/user (a tmpfs of its own; the root
 * image adds the account). Its saved user ID stays 0, so the agent can
 * become root again for a request that asks to run as root, and so can
 * the code itself, as with E2B's passwordless sudo: a guest is a VM, and
 * its root is no key to the host. */
#define ZB_USER_UID 1000u
#define ZB_USER_HOME "/home/user"

/* The sandbox's disk: the second persistent-memory region, which the host
 * adds (and says so with zeroboot.disk=1 on the command line) when the
 * template has one. ext4 with DAX: a file's blocks are guest-physical pages,
 * which the host reads and writes for the files API and a fork copies on
 * write. */
#define ZB_DISK_DEVICE "/dev/pmem1"
#define ZB_DISK_OPTIONS "dax=always,noinit_itable"
#define ZB_DISK_WRITE_CACHE "/sys/block/pmem1/dax/write_cache"

static inline uint64_t zb_cmdline_number(const char *key);

/* Mounts the disk at /home/user, or a tmpfs there when the template has no
 * disk; 0 on success. */
static inline int zb_mount_home(void)
{
    if (zb_cmdline_number("zeroboot.disk") == 1) {
        /* libnvdimm probes the regions asynchronously. */
        for (int tries = 0; tries < 300; tries++) {
            /* The disk is RAM, not persistent memory: no cache line needs
             * writing back for it to hold (each write-back would be an
             * emulated instruction per 64 bytes where kernel mode is). */
            int cache = open(ZB_DISK_WRITE_CACHE, O_WRONLY | O_CLOEXEC);
            if (cache >= 0) {
                if (write(cache, "0\n", 2) != 2)
                    fprintf(stderr, "zeroboot-agent: %s: %s\n", ZB_DISK_WRITE_CACHE, strerror(errno));
                close(cache);
            }
            if (mount(ZB_DISK_DEVICE, ZB_USER_HOME, "ext4", MS_NOATIME | MS_NOSUID | MS_NODEV, ZB_DISK_OPTIONS) == 0) {
                rmdir(ZB_USER_HOME "/lost+found");
                return 0;
            }
            if (errno != ENOENT && errno != ENXIO)
                break;
            usleep(100 * 1000);
        }
        fprintf(stderr, "zeroboot-agent: mount %s on %s failed: %s\n", ZB_DISK_DEVICE, ZB_USER_HOME, strerror(errno));
        return -1;
    }
    return mount("tmpfs", ZB_USER_HOME, "tmpfs", 0, "mode=755,uid=1000,gid=1000");
}

/* Mounts /proc, /sys, /dev, /tmp, /run and /home/user; returns how many
 * failed. */
static inline int zb_mount_kernel_filesystems(void)
{
    static const char *const mounts[][4] = {
        {"proc", "/proc", "proc", NULL},
        {"sysfs", "/sys", "sysfs", NULL},
        {"devtmpfs", "/dev", "devtmpfs", NULL},
        {"tmpfs", "/tmp", "tmpfs", "mode=1777"},
        {"tmpfs", "/run", "tmpfs", "mode=755"},
    };
    int failed = 0;
    for (size_t i = 0; i < sizeof mounts / sizeof mounts[0]; i++) {
        if (mount(mounts[i][0], mounts[i][1], mounts[i][2], 0, mounts[i][3]) != 0) {
            fprintf(stderr, "zeroboot-agent: mount %s failed: %s\n", mounts[i][1], strerror(errno));
            failed++;
        }
    }
    if (zb_mount_home() != 0)
        failed++;
    return failed;
}

/* Where child processes' stdout and stderr go once an agent has seen code
 * start one: files on a tmpfs of their own, sized for two streams at the
 * largest output limit, so a child that writes without end fills that and
 * not the guest's memory. */
#define ZB_CHILD_OUTPUT_DIR "/run/zeroboot-children"
#define ZB_CHILD_OUTPUT_BYTES (2ull * ZB_MAX_OUTPUT_LIMIT + (1u << 20))

/* Makes this process run as `uid` (0 or ZB_USER_UID, whose gid is the
 * same), keeping 0 as its saved user and group IDs, from root or from
 * either of those. Returns 0, or -1 with errno set. */
static inline int zb_switch_user(uint32_t uid)
{
    /* Allowed while the saved user ID is 0; gids and groups need it. */
    if (setresuid((uid_t)-1, 0, (uid_t)-1) != 0)
        return -1;
    if (setgroups(0, NULL) != 0 || setresgid(uid, uid, 0) != 0)
        return -1;
    return setresuid(uid, uid, 0);
}

/* Points this process's fds 1 and 2 at ZB_CHILD_OUTPUT_DIR/stdout and
 * /stderr (opened O_APPEND: children write at the end, however many share
 * them) and fd 0 at /dev/null, so child processes inherit them; stores
 * fds to read and empty the two files with in read_fds. Until this runs, fds 0, 1 and
 * 2 are the console, which drops what children write. The agent calls it
 * only when code starts a child, so an exec that starts none pays for no
 * system call. Returns 0, or -1 with errno set. */
static inline int zb_capture_child_output(int read_fds[2])
{
    static const char *const names[2] = {ZB_CHILD_OUTPUT_DIR "/stdout", ZB_CHILD_OUTPUT_DIR "/stderr"};
    /* Code runs as the sandbox's user, whose saved user ID is 0: mount as
     * root, a tmpfs that user owns. */
    uid_t euid = geteuid();
    char options[96];
    snprintf(options, sizeof options, "size=%llu,mode=700,uid=%u,gid=%u", (unsigned long long)ZB_CHILD_OUTPUT_BYTES,
             (unsigned)euid, (unsigned)getegid());
    if (euid != 0 && seteuid(0) != 0)
        return -1;
    int made = (mkdir(ZB_CHILD_OUTPUT_DIR, 0700) == 0 || errno == EEXIST) &&
               mount("tmpfs", ZB_CHILD_OUTPUT_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options) == 0;
    int saved_errno = errno;
    if (euid != 0 && seteuid(euid) != 0)
        return -1;
    if (!made) {
        errno = saved_errno;
        return -1;
    }
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0 || dup2(null, 0) < 0)
        return -1;
    close(null);
    for (int i = 0; i < 2; i++) {
        int fd = open(names[i], O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
        if (fd < 0 || dup2(fd, i + 1) < 0)
            return -1;
        close(fd);
        read_fds[i] = open(names[i], O_RDWR | O_CLOEXEC);
        if (read_fds[i] < 0)
            return -1;
    }
    return 0;
}

/* The value of `key=` on the kernel command line, as a number; 0 if absent. */
static inline uint64_t zb_cmdline_number(const char *key)
{
    char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    size_t klen = strlen(key);
    for (char *p = buf; (p = strstr(p, key)) != NULL; p += klen) {
        if ((p == buf || p[-1] == ' ') && p[klen] == '=')
            return strtoull(p + klen + 1, NULL, 0);
    }
    return 0;
}

#define ZB_HUGE (2ul << 20)

/* `span` bytes (a multiple of 2 MiB) of private anonymous memory at a
 * 2 MiB-aligned address; MAP_FAILED with errno set on failure. */
static inline char *zb_mmap_aligned(size_t span, int prot)
{
    char *fresh = mmap(NULL, span + ZB_HUGE, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (fresh == MAP_FAILED)
        return MAP_FAILED;
    char *at = (char *)(((unsigned long)fresh + ZB_HUGE - 1) & ~(ZB_HUGE - 1));
    if (at > fresh)
        munmap(fresh, (size_t)(at - fresh));
    munmap(at + span, (size_t)(fresh + span + ZB_HUGE - (at + span)));
    return at;
}

/* Maps `length` bytes of physical memory at `physical` (shared, uncached
 * for MMIO) at a 2 MiB-aligned address, alone in the 2 MiB ranges it spans:
 * the rest of its last range stays reserved (PROT_NONE). A shared mapping
 * keeps zb_hugify from moving any range it shares, so it gets ranges of its
 * own. NULL on failure with errno set. */
static inline void *zb_map_physical(uint64_t physical, size_t length)
{
    size_t span = (length + ZB_HUGE - 1) & ~(ZB_HUGE - 1);
    char *at = zb_mmap_aligned(span, PROT_NONE);
    if (at == MAP_FAILED)
        return NULL;
    void *p = MAP_FAILED;
    int fd = open("/dev/mem", O_RDWR | O_SYNC | O_CLOEXEC);
    if (fd >= 0) {
        p = mmap(at, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, (off_t)physical);
        int saved = errno;
        close(fd);
        errno = saved;
    }
    if (p == MAP_FAILED) {
        int saved = errno;
        munmap(at, span);
        errno = saved;
        return NULL;
    }
    return p;
}

/* Credits `len` bytes of host entropy to the kernel's CRNG. */
static inline int zb_add_entropy(const void *seed, size_t len)
{
    struct {
        int entropy_count;
        int buf_size;
        unsigned char buf[256];
    } info;
    if (len > sizeof info.buf)
        len = sizeof info.buf;
    info.entropy_count = (int)len * 8;
    info.buf_size = (int)len;
    memcpy(info.buf, seed, len);
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int r = ioctl(fd, RNDADDENTROPY, &info);
    int saved = errno;
    close(fd);
    errno = saved;
    return r;
}

/* One line of /proc/self/maps. */
struct zb_mapping {
    unsigned long start, end;
    char perms[5];
    const char *name; /* into the line: path, [heap] and so on; "" if none */
};

static inline int zb_parse_mapping(const char *line, struct zb_mapping *m)
{
    int name_at = 0;
    if (sscanf(line, "%lx-%lx %4s %*s %*s %*s %n", &m->start, &m->end, m->perms, &name_at) != 3)
        return 0;
    m->name = name_at > 0 ? line + name_at : "";
    return 1;
}

/* Maps and copies this process's pages now: reads every page of its private
 * mappings and writes back every writable one. In a fork, each page a
 * request touches for the first time would otherwise be a page fault or a
 * copy-on-write fault in the guest kernel, which is milliseconds where
 * guest kernel mode is emulated; done before READY, the snapshot holds the
 * page table entries and the copies. Shared mappings (the mailbox, the
 * doorbell) and the kernel's special ones ([vvar], [vdso]) are left alone.
 * Returns 0, or -1 if /proc/self/maps cannot be read. */
static inline int zb_prefault(void)
{
    FILE *maps = fopen("/proc/self/maps", "re");
    if (maps == NULL)
        return -1;
    char line[512];
    struct zb_mapping m;
    while (fgets(line, sizeof line, maps) != NULL) {
        if (!zb_parse_mapping(line, &m))
            continue;
        if (m.perms[0] != 'r' || m.perms[3] != 'p')
            continue;
        if (m.name[0] == '[' && strncmp(m.name, "[heap]", 6) != 0 && strncmp(m.name, "[stack]", 7) != 0)
            continue;
        int writable = m.perms[1] == 'w';
        for (unsigned long page = m.start; page < m.end; page += 4096) {
            volatile uint8_t *p = (volatile uint8_t *)page;
            uint8_t v = *p;
            if (writable)
                *p = v;
        }
    }
    fclose(maps);
    return 0;
}

/*
 * Remapping the process's hot memory onto 2 MiB pages.
 *
 * Under shadow paging each 4 KiB page a fork touches first costs a VM exit
 * (about 28 us where KVM is nested), and a fork's first request touches
 * hundreds. A guest 2 MiB page backed by a host 2 MiB page is mapped by one
 * such fault instead (docs/guest-kernel.md). So before READY the agent moves
 * every 2 MiB-aligned range of its address space that the template touched
 * enough onto a transparent huge page: a fresh anonymous 2 MiB page gets a
 * copy of the range's contents, then mremap puts it in the range's place in
 * one step. Code, read-only data, data and heap all keep their addresses and
 * contents; the range becomes one private, anonymous, read-write-execute
 * mapping (a 2 MiB page has one set of permissions).
 *
 * A range is only taken if every mapping in it is private and readable, and
 * is a file (not a device) or anonymous memory: never the stack, the
 * mailbox or doorbell (/dev/mem, shared), [vvar] or [vdso]. Gaps between
 * mappings become part of the new mapping.
 *
 * Nothing may write to a range between its copy and the mremap: the caller
 * must be single-threaded, and this code writes only to its stack and the
 * new page in between.
 */
#ifndef MREMAP_MAYMOVE
#define MREMAP_MAYMOVE 1
#endif
#ifndef MREMAP_FIXED
#define MREMAP_FIXED 2
#endif
#define ZB_MAX_VMAS 4096
/* A range moves when the template touched at least this many of its 512
 * pages: each move costs the template 2 MiB of guest memory. */
#define ZB_HUGIFY_MIN_PRESENT 8

struct zb_vma {
    unsigned long start, end;
    int ok; /* may be moved onto a huge page */
};

/* The 512 pagemap entries of the huge range at `at`; 0 if unreadable. */
static inline int zb_read_pagemap(int pagemap, unsigned long at, uint64_t entries[512])
{
    return pread(pagemap, entries, 512 * sizeof entries[0], (off_t)(at / 4096 * 8)) == (ssize_t)(512 * sizeof entries[0]);
}

/* How many of the 512 pages of the huge range at `at` are present; -1 if
 * pagemap cannot be read. */
static inline int zb_present_pages(int pagemap, unsigned long at)
{
    uint64_t entries[512];
    if (!zb_read_pagemap(pagemap, at, entries))
        return -1;
    int present = 0;
    for (int i = 0; i < 512; i++)
        present += (int)(entries[i] >> 63);
    return present;
}

/* The guest-physical address of the huge page mapped at `at`, or 0 if the
 * 2 MiB there are not one. For a range of which one byte was written in a
 * VM_HUGEPAGE mapping: that fault mapped either a huge page or the one
 * small page written, so the last page being present, physically
 * contiguous with an aligned first, means a huge page. Two pagemap entries,
 * not 512: each is a step of the kernel's page walk, emulated here. */
static inline uint64_t zb_huge_page_at(int pagemap, unsigned long at)
{
    const uint64_t pfn_mask = (1ull << 55) - 1;
    uint64_t first, last;
    if (pread(pagemap, &first, sizeof first, (off_t)(at / 4096 * 8)) != (ssize_t)sizeof first ||
        pread(pagemap, &last, sizeof last, (off_t)((at + ZB_HUGE) / 4096 * 8 - 8)) != (ssize_t)sizeof last)
        return 0;
    if (!(first >> 63) || !(last >> 63) || (first & pfn_mask) == 0 || (first & pfn_mask) % 512 != 0 ||
        (last & pfn_mask) != (first & pfn_mask) + 511)
        return 0;
    return (first & pfn_mask) * 4096;
}

static inline int zb_set_thp(const char *mode)
{
    int fd = open("/sys/kernel/mm/transparent_hugepage/enabled", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, mode, strlen(mode));
    close(fd);
    return n == (ssize_t)strlen(mode) ? 0 : -1;
}

/* zb_hugify's work, with THP on. */
static inline int zb_hugify_ranges(char *report, size_t report_len)
{
    static struct zb_vma vmas[ZB_MAX_VMAS];
    size_t count = 0;
    FILE *maps = fopen("/proc/self/maps", "re");
    if (maps == NULL)
        return -1;
    char line[512];
    struct zb_mapping m;
    while (count < ZB_MAX_VMAS && fgets(line, sizeof line, maps) != NULL) {
        if (!zb_parse_mapping(line, &m))
            continue;
        int named = m.name[0] != '\n' && m.name[0] != 0;
        int ok = m.perms[0] == 'r' && m.perms[3] == 'p' &&
                 (!named || strncmp(m.name, "[heap]", 6) == 0 || (m.name[0] == '/' && strncmp(m.name, "/dev/", 5) != 0));
        vmas[count++] = (struct zb_vma){m.start, m.end, ok};
    }
    int overflow = !feof(maps);
    fclose(maps);
    if (overflow) {
        snprintf(report, report_len, "more than %d mappings: nothing moved", ZB_MAX_VMAS);
        return 0;
    }
    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pagemap < 0)
        return -1;
    int moved = 0, candidates = 0, no_huge_page = 0, failed = 0;
    unsigned long next = 0; /* ranges below this one were considered already */
    for (size_t i = 0; i < count; i++) {
        unsigned long from = vmas[i].start & ~(ZB_HUGE - 1);
        for (unsigned long at = from > next ? from : next; at < vmas[i].end; at += ZB_HUGE) {
            next = at + ZB_HUGE;
            /* every mapping that overlaps [at, at + 2 MiB) must be movable */
            size_t first = i, j;
            while (first > 0 && vmas[first - 1].end > at)
                first--;
            int ok = 1;
            for (j = first; j < count && vmas[j].start < at + ZB_HUGE; j++)
                ok &= vmas[j].ok;
            if (!ok)
                continue;
            candidates++;
            if (zb_present_pages(pagemap, at) < ZB_HUGIFY_MIN_PRESENT)
                continue;
            char *huge = zb_mmap_aligned(ZB_HUGE, PROT_READ | PROT_WRITE | PROT_EXEC);
            if (huge == MAP_FAILED) {
                failed++;
                continue;
            }
            madvise(huge, ZB_HUGE, MADV_HUGEPAGE);
            huge[0] = 0; /* the fault allocates the whole huge page */
            if (zb_huge_page_at(pagemap, (unsigned long)huge) == 0) {
                munmap(huge, ZB_HUGE);
                no_huge_page++;
                continue;
            }
            /* From the first copy to the mremap, nothing may write to [at, at + 2 MiB). */
            for (size_t k = first; k < j; k++) {
                unsigned long lo = vmas[k].start > at ? vmas[k].start : at;
                unsigned long hi = vmas[k].end < at + ZB_HUGE ? vmas[k].end : at + ZB_HUGE;
                if (lo < hi)
                    memcpy(huge + (lo - at), (const void *)lo, hi - lo);
            }
            if (syscall(SYS_mremap, huge, ZB_HUGE, ZB_HUGE, MREMAP_MAYMOVE | MREMAP_FIXED, at) == (long)at) {
                moved++;
            } else {
                munmap(huge, ZB_HUGE);
                failed++;
            }
        }
    }
    close(pagemap);
    snprintf(report, report_len, "%d of %d eligible 2 MiB ranges moved onto huge pages (%d without a huge page, %d failed)",
             moved, candidates, no_huge_page, failed);
    return moved;
}

/* Moves each eligible 2 MiB range with at least ZB_HUGIFY_MIN_PRESENT
 * present pages onto a huge page. Returns how many ranges moved, or -1 with
 * errno set if /proc/self/maps or pagemap cannot be read. `report` gets one line.
 *
 * Transparent huge pages are switched on (madvise) only for this: the
 * kernel leaves them off below 512 MiB of RAM whatever its config, and with
 * them off again no fork runs khugepaged or zeroes a huge page in its
 * (emulated, where that is slow) kernel. */
static inline int zb_hugify(char *report, size_t report_len)
{
    if (zb_set_thp("madvise") != 0) {
        snprintf(report, report_len, "cannot switch transparent huge pages on: %s", strerror(errno));
        return 0;
    }
    int moved = zb_hugify_ranges(report, report_len);
    int saved = errno;
    zb_set_thp("never");
    errno = saved;
    return moved;
}

static inline uint32_t zb_get32(const volatile uint8_t *m, size_t at)
{
    uint32_t v;
    memcpy(&v, (const uint8_t *)m + at, 4);
    return v;
}

static inline void zb_put32(volatile uint8_t *m, size_t at, uint32_t v)
{
    memcpy((uint8_t *)m + at, &v, 4);
}

/* Hands the host the reply chunk written at `at` (ZB_RESPONSE_OFFSET or
 * ZB_SMALL_RESPONSE_OFFSET): its header, then the RESULT doorbell. The
 * host reads the chunk at that store and resumes us for the next chunk or,
 * with a new request already written, for that. */
static inline void zb_ring_result(volatile uint8_t *mailbox, volatile uint8_t *doorbell, uint32_t seq, uint32_t at,
                                  int32_t exit_code, uint32_t out_len, uint32_t err_len, uint32_t results_len,
                                  uint32_t flags)
{
    zb_put32(mailbox, ZB_H_RESPONSE_AT, at);
    zb_put32(mailbox, ZB_H_EXIT_CODE, (uint32_t)exit_code);
    zb_put32(mailbox, ZB_H_STDOUT_LEN, out_len);
    zb_put32(mailbox, ZB_H_STDERR_LEN, err_len);
    zb_put32(mailbox, ZB_H_RESULTS_LEN, results_len);
    zb_put32(mailbox, ZB_H_RESPONSE_FLAGS, flags);
    zb_put32(mailbox, ZB_H_RESPONSE_SEQ, seq);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    doorbell[0] = ZB_DOORBELL_RESULT;
}

#endif
