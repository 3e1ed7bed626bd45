/*
 * What a zeroboot guest agent needs from the kernel and cannot get from its
 * language runtime: mounting the kernel filesystems, mapping the mailbox and
 * the doorbell (physical memory, through /dev/mem), crediting the host's boot
 * entropy, and draining the console. Shared by the Node.js addon
 * (zeroboot_node.c) and the bash builtin (zeroboot_bash.c); agent.py does
 * the same from Python.
 *
 * The mailbox layout is defined in crates/protocol/src/lib.rs; the constants
 * below mirror it.
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
#include <sys/mount.h>
#include <termios.h>
#include <unistd.h>

#define ZB_MAILBOX_SIZE (2u << 20)
#define ZB_MAGIC 0x424d425au /* "ZBMB" little-endian */
#define ZB_VERSION 5u
#define ZB_H_MAGIC 0
#define ZB_H_VERSION 4
#define ZB_H_REQUEST_SEQ 8
#define ZB_H_CODE_LEN 12
#define ZB_H_STDIN_LEN 16
#define ZB_H_RESPONSE_SEQ 20
#define ZB_H_EXIT_CODE 24
#define ZB_H_STDOUT_LEN 28
#define ZB_H_STDERR_LEN 32
#define ZB_H_RESPONSE_FLAGS 36
#define ZB_H_OUTPUT_LIMIT 40
#define ZB_H_REQUEST_FLAGS 44
#define ZB_H_BOOT_SEED 64
#define ZB_BOOT_SEED_LEN 64
#define ZB_H_REQUEST_SEED 128
#define ZB_REQUEST_SEED_LEN 64
#define ZB_REQUEST_OFFSET 4096u
#define ZB_RESPONSE_OFFSET (1u << 20)
#define ZB_RESPONSE_CAPACITY (ZB_MAILBOX_SIZE - ZB_RESPONSE_OFFSET)
#define ZB_FLAG_STDOUT_TRUNCATED 1u
#define ZB_FLAG_STDERR_TRUNCATED 2u
#define ZB_FLAG_MORE 4u
#define ZB_DOORBELL_READY 1
#define ZB_DOORBELL_RESULT 2
#define ZB_MAX_OUTPUT_LIMIT (64u << 20)

/* Mounts /proc, /sys, /dev, /tmp and /run; returns how many failed. */
static int zb_mount_kernel_filesystems(void)
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
    return failed;
}

/* The value of `key=` on the kernel command line, as a number; 0 if absent. */
static uint64_t zb_cmdline_number(const char *key)
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

/* Maps `length` bytes of physical memory at `physical` (shared, uncached
 * for MMIO); NULL on failure with errno set. */
static void *zb_map_physical(uint64_t physical, size_t length)
{
    int fd = open("/dev/mem", O_RDWR | O_SYNC | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)physical);
    int saved = errno;
    close(fd);
    errno = saved;
    return p == MAP_FAILED ? NULL : p;
}

/* Credits `len` bytes of host entropy to the kernel's CRNG. */
static int zb_add_entropy(const void *seed, size_t len)
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

/* Maps and copies this process's pages now: reads every page of its private
 * mappings and writes back every writable one. In a fork, each page a
 * request touches for the first time would otherwise be a page fault or a
 * copy-on-write fault in the guest kernel, which is milliseconds where
 * guest kernel mode is emulated; done before READY, the snapshot holds the
 * page table entries and the copies. Shared mappings (the mailbox, the
 * doorbell) and the kernel's special ones ([vvar], [vdso]) are left alone.
 * Returns 0, or -1 if /proc/self/maps cannot be read. */
static int zb_prefault(void)
{
    FILE *maps = fopen("/proc/self/maps", "re");
    if (maps == NULL)
        return -1;
    char line[512];
    while (fgets(line, sizeof line, maps) != NULL) {
        unsigned long start, end;
        char perms[5];
        int name_at = 0;
        if (sscanf(line, "%lx-%lx %4s %*s %*s %*s %n", &start, &end, perms, &name_at) != 3)
            continue;
        const char *name = name_at > 0 ? line + name_at : "";
        if (perms[0] != 'r' || perms[3] != 'p')
            continue;
        if (name[0] == '[' && strncmp(name, "[heap]", 6) != 0 && strncmp(name, "[stack]", 7) != 0)
            continue;
        int writable = perms[1] == 'w';
        for (unsigned long page = start; page < end; page += 4096) {
            volatile uint8_t *p = (volatile uint8_t *)page;
            uint8_t v = *p;
            if (writable)
                *p = v;
        }
    }
    fclose(maps);
    return 0;
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

#endif
