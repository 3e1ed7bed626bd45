/*
 * The fresh heap: memory mapped before the snapshot for the code's own
 * allocations.
 *
 * A page a fork's code touches for the first time outside what its process
 * has mapped is a guest page fault, which the guest kernel handles; where
 * guest kernel mode is emulated that is about 2.6 ms per 4 KiB page, so a
 * 64 MiB bytearray took a minute. So before READY the agent grows its
 * malloc heap by the template's `heap_mib` of transparent huge pages, lets
 * the guest kernel zero them, and gives them back to malloc: a fork's
 * allocations come out of memory that its page tables already map, and
 * cost no guest fault at all. Every large allocation is routed there
 * (malloc never mmaps, and never trims).
 *
 * The pages are zero, so the snapshot stores them as holes, and on disk
 * and in the host they cost nothing. The agent tells the host where they
 * are (the fresh-memory table in the mailbox, as guest-physical runs); a
 * fork maps those runs with anonymous host memory of its own, so that the
 * first write to each 2 MiB is one shadow-paging fault and one host huge
 * page instead of 512 copy-on-write faults (docs/guest-kernel.md).
 *
 * The range is then given to the kernel with MADV_FREE: it stays mapped,
 * and what a fork writes stays, but the guest kernel may take back pages
 * nothing has written when a child process or the page cache needs them.
 */
#ifndef ZEROBOOT_HEAP_H
#define ZEROBOOT_HEAP_H

#include <malloc.h>

#include "guest.h"

/* Bytes at the start of the fresh heap left out of the fresh-memory table. */
#define ZB_FRESH_SHARED_HEAD (2ul << 20)

struct zb_fresh_run {
    uint64_t gpa, len;
};

/* Appends the huge page at guest-physical `gpa` to `runs`, merging it with
 * the last run when they touch; returns the new count, or `count` when the
 * table is full and the page starts a run of its own. */
static inline int zb_add_fresh_page(struct zb_fresh_run *runs, int count, int max_runs, uint64_t gpa)
{
    if (count > 0 && runs[count - 1].gpa + runs[count - 1].len == gpa) {
        runs[count - 1].len += ZB_HUGE;
        return count;
    }
    if (count == max_runs)
        return count;
    runs[count] = (struct zb_fresh_run){gpa, ZB_HUGE};
    return count + 1;
}

/*
 * Maps `bytes` of the malloc heap ahead (see above) and writes where they
 * are into `runs` (at most `max_runs`; huge pages past that are still in
 * the heap, only not announced). Returns how many runs, or -1 with errno
 * set; `report` says what happened. Call once, single-threaded, as root
 * (pagemap hides physical addresses from others), after zb_hugify.
 */
static inline int zb_map_fresh_heap(size_t bytes, struct zb_fresh_run *runs, int max_runs, char *report,
                                    size_t report_len)
{
    /* Every allocation from the one heap, none given back: mmap'd chunks,
     * and the arenas malloc makes for other threads, are fresh pages, and
     * a trimmed heap would be too. */
    if (!mallopt(M_MMAP_MAX, 0) || !mallopt(M_TRIM_THRESHOLD, INT32_MAX) || !mallopt(M_ARENA_MAX, 1)) {
        snprintf(report, report_len, "mallopt refused");
        errno = EINVAL;
        return -1;
    }
    if (bytes < 2 * ZB_HUGE) {
        snprintf(report, report_len, "no fresh heap");
        return 0;
    }
    if (zb_set_thp("madvise") != 0) {
        snprintf(report, report_len, "cannot switch transparent huge pages on: %s", strerror(errno));
        return -1;
    }
    int count = -1, huge = 0, small = 0;
    char *block = malloc(bytes);
    if (block == NULL) {
        snprintf(report, report_len, "malloc(%zu) failed", bytes);
        goto out;
    }
    char *lo = (char *)(((unsigned long)block + ZB_HUGE - 1) & ~(ZB_HUGE - 1));
    char *hi = (char *)(((unsigned long)block + bytes) & ~(ZB_HUGE - 1));
    size_t span = (size_t)(hi - lo);
    madvise(lo, span, MADV_HUGEPAGE);
    /* One write fault per 2 MiB: the kernel allocates and zeroes a huge
     * page, and the zero stored keeps it zero (holes in the memory file).
     * The zeroing is most of the cost where guest kernel mode is emulated:
     * about 0.8 s per huge page with `rep stosb`, 0.14 s with `rep stosq`
     * (the command line's clearcpuid=erms; docs/guest-kernel.md). */
    for (char *p = lo; p < hi; p += ZB_HUGE)
        *(volatile char *)p = 0;
    /* The block's unaligned ends are small pages; malloc hands out the
     * first of them first, so they are faulted in too (at most 2 MiB each). */
    for (char *p = (char *)((unsigned long)block & ~4095ul); p < lo; p += 4096)
        *(volatile char *)p = *(volatile char *)p;
    for (char *p = hi; p < block + bytes; p += 4096)
        *(volatile char *)p = *(volatile char *)p;
    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pagemap < 0) {
        snprintf(report, report_len, "pagemap: %s", strerror(errno));
        free(block);
        goto out;
    }
    count = 0;
    for (char *p = lo; p < hi; p += ZB_HUGE) {
        uint64_t gpa = zb_huge_page_at(pagemap, (unsigned long)p);
        if (gpa == 0) {
            /* The guest kernel had no huge page for this range (its memory
             * was too fragmented): its small pages are faulted in now, so
             * that a fork's allocations here cost it no guest page fault
             * either, only the host's copies. */
            for (char *q = p; q < p + ZB_HUGE; q += 4096)
                *(volatile char *)q = 0;
            small++;
            continue;
        }
        /* malloc hands out the start of the heap first, to small objects
         * too: those pages stay the template's, copied 4 KiB at a time, so
         * that code which allocates a little costs its fork a few small
         * pages, not a host huge page (2 MiB each). */
        if (p >= lo + ZB_FRESH_SHARED_HEAD)
            count = zb_add_fresh_page(runs, count, max_runs, gpa);
        huge++;
    }
    close(pagemap);
    /* Into the top chunk, which is never trimmed (above). */
    free(block);
    /* Only whole huge pages: a partial range would split one. */
    madvise(lo, span, MADV_FREE);
    snprintf(report, report_len, "%d MiB in %d huge pages (%d runs announced), %d ranges without one", huge * 2,
             huge, count, small);
out:;
    int saved = errno;
    zb_set_thp("never");
    errno = saved;
    return count;
}

/*
 * Takes every free chunk malloc holds, and keeps it: at READY those are
 * scattered over the template's heap, and a fork that reuses a few of them
 * writes a page in as many places, while allocations from the top chunk
 * come one after the other. Each request size is asked for until one comes
 * from the top chunk (malloc grew into it: its size, mallinfo2's keepcost,
 * changed), which is given back. Large sizes first, so that a large free
 * chunk goes in a few pieces; then every size that tcache and the small
 * bins keep apart (chunks of 32 to 1040 bytes). Call before zb_map_fresh_heap,
 * whose block must come from the top chunk. Returns the chunks taken;
 * `report` says how many free chunks are left (the top chunk is one).
 */
#define ZB_TAKE_LIMIT 1000000l

static inline long zb_take_free_chunks(char *report, size_t report_len)
{
    long taken = 0;
    size_t top = mallinfo2().keepcost;
    for (size_t size = 1ul << 20, step = 0; size >= 24; size = size > 2048 ? size / 2 : 1032 - 16 * step++) {
        for (long n = 0; n < ZB_TAKE_LIMIT; n++) {
            void *chunk = malloc(size);
            if (chunk == NULL)
                break;
            size_t now = mallinfo2().keepcost;
            if (now != top) {
                free(chunk);
                top = mallinfo2().keepcost;
                break;
            }
            taken++;
        }
    }
    struct mallinfo2 info = mallinfo2();
    snprintf(report, report_len, "%ld free chunks taken, %zu left (%zu in fast bins)", taken, info.ordblks,
             info.smblks);
    return taken;
}

#endif
