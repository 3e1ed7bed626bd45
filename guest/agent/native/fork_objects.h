/*
 * Where a fork's Python objects go: one region, carved in address order.
 *
 * pymalloc keeps each size class in pools of its own (16 KiB each in 3.13),
 * so a fork that allocates objects of twenty sizes writes twenty pages,
 * however few objects it makes, and every page it writes is a copy and a
 * shadow-paging exit. At READY the agent wraps CPython's allocator (the
 * MEM and OBJ domains, both pymalloc) with this one: requests up to
 * ZB_OBJECTS_MAX_BLOCK bytes are carved one after the other, whatever
 * their size, from a region (ZB_OBJECTS_REGION) that the template wrote
 * before the snapshot (so its pages are mapped and writable in every fork:
 * no guest page fault), and a freed block goes on a free list of its
 * class, where the next request of that class takes it. A `print(1+1)`
 * then writes the few pages its objects fill, not one per size class.
 *
 * The last block carved is also a stack's top: freed, it gives its bytes
 * back to the carving, for a block of any class, and grown, it grows in
 * place. The compiler frees most of what it allocates in the reverse
 * order, and the tokenizer and the parser grow their newest buffer, so
 * the next request reuses pages this one wrote instead of new ones.
 *
 * Blocks made before READY stay pymalloc's and go back to it. Once the
 * region is used up, requests go to pymalloc too, so a fork that allocates
 * without end loses at most the region to the split by class (a block
 * freed in one class is never reused by another, where pymalloc hands an
 * empty pool to any class).
 *
 * A block's class is one byte per 16-byte granule of the region, at the
 * granule where the block starts, in a table beside it.
 *
 * CPython calls these with the GIL held (the MEM and OBJ domains require
 * it), so nothing here locks. The declarations are CPython's
 * (Include/cpython/pymem.h).
 */
#ifndef ZEROBOOT_FORK_OBJECTS_H
#define ZEROBOOT_FORK_OBJECTS_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guest.h"

typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr);
} PyMemAllocatorEx;
enum { ZB_PYMEM_DOMAIN_MEM = 1, ZB_PYMEM_DOMAIN_OBJ = 2 };
extern void PyMem_GetAllocator(int domain, PyMemAllocatorEx *allocator);
extern void PyMem_SetAllocator(int domain, PyMemAllocatorEx *allocator);

#define ZB_OBJECTS_GRANULE 16u
/* Size classes: every 16 bytes up to pymalloc's 512, then about 1.5x
 * steps up to ZB_OBJECTS_MAX_BLOCK, which holds the tokenizer's buffers
 * and the compiler's arena blocks (8 KiB and their header: 8320). */
static const uint32_t zb_object_classes[] = {
    16,   32,   48,   64,   80,   96,   112,  128,   144,   160,   176,   192,   208,   224,   240,
    256,  272,  288,  304,  320,  336,  352,  368,   384,   400,   416,   432,   448,   464,   480,
    496,  512,  768,  1024, 1536, 2048, 3072, 4096,  6144,  8192,  8320,  12288, 16384, 24576, 32768,
};
#define ZB_OBJECT_CLASSES (sizeof zb_object_classes / sizeof zb_object_classes[0])
#define ZB_OBJECTS_MAX_BLOCK 32768u
/* In the class table: no block starts at this granule. */
#define ZB_NO_CLASS 0xff

struct zb_fork_objects {
    char *start, *next, *end;
    /* The furthest `next` has been: the region from here on is zero. */
    char *high;
    unsigned char *classes; /* one per granule of [start, end) */
    void *free_lists[ZB_OBJECT_CLASSES];
    /* pymalloc, per domain: what blocks from outside the region go back to */
    PyMemAllocatorEx wrapped[2];
};

static struct zb_fork_objects zb_objects;

static int zb_object_class(size_t size)
{
    if (size <= 512)
        return size == 0 ? 0 : (int)((size - 1) / ZB_OBJECTS_GRANULE);
    for (unsigned c = 32; c < ZB_OBJECT_CLASSES; c++)
        if (size <= zb_object_classes[c])
            return (int)c;
    return -1;
}

static int zb_in_region(void *p)
{
    return (char *)p >= zb_objects.start && (char *)p < zb_objects.end;
}

/* Carves `bytes` at `next` for a block of class `c`. */
static void *zb_region_carve(unsigned c, size_t bytes)
{
    void *block = zb_objects.next;
    zb_objects.next += bytes;
    if (zb_objects.next > zb_objects.high)
        zb_objects.high = zb_objects.next;
    zb_objects.classes[((char *)block - zb_objects.start) / ZB_OBJECTS_GRANULE] = (unsigned char)c;
    return block;
}

/* A block for `size` bytes, or NULL when the region has none; `*dirty` is
 * how many of its first bytes may not be zero (all of a reused block, none
 * of one carved past `high`). */
static void *zb_region_alloc(size_t size, size_t *dirty)
{
    int c = zb_object_class(size);
    if (c < 0)
        return NULL;
    void *block = zb_objects.free_lists[c];
    *dirty = size;
    if (block != NULL) {
        zb_objects.free_lists[c] = *(void **)block;
        return block;
    }
    size_t bytes = zb_object_classes[c];
    if ((size_t)(zb_objects.end - zb_objects.next) < bytes)
        return NULL;
    size_t below_high = (size_t)(zb_objects.high - zb_objects.next);
    if (below_high < size)
        *dirty = below_high;
    return zb_region_carve((unsigned)c, bytes);
}

/* The class of the region's block at `p`. */
static unsigned zb_region_class(void *p)
{
    unsigned char c = zb_objects.classes[((char *)p - zb_objects.start) / ZB_OBJECTS_GRANULE];
    if (c >= ZB_OBJECT_CLASSES)
        abort(); /* not a block's start: the caller's heap is corrupt */
    return c;
}

static int zb_region_is_top(void *p, unsigned c)
{
    return (char *)p + zb_object_classes[c] == zb_objects.next;
}

static void zb_region_free(void *p)
{
    unsigned c = zb_region_class(p);
    if (zb_region_is_top(p, c)) {
        /* Its class byte stays: the next block carved here writes its own. */
        zb_objects.next = p;
        return;
    }
    *(void **)p = zb_objects.free_lists[c];
    zb_objects.free_lists[c] = p;
}

static PyMemAllocatorEx *zb_wrapped(void *ctx)
{
    return &zb_objects.wrapped[(uintptr_t)ctx];
}

static void *zb_objects_malloc(void *ctx, size_t size)
{
    size_t dirty;
    void *p = zb_region_alloc(size, &dirty);
    if (p != NULL)
        return p;
    PyMemAllocatorEx *w = zb_wrapped(ctx);
    return w->malloc(w->ctx, size);
}

static void *zb_objects_calloc(void *ctx, size_t nelem, size_t elsize)
{
    if (elsize != 0 && nelem > SIZE_MAX / elsize)
        return NULL;
    size_t size = nelem * elsize;
    size_t dirty;
    void *p = zb_region_alloc(size, &dirty);
    /* Clearing a carved block would write pages that are zero already:
     * the parser's 16 KiB tables wrote 4 unchanged pages per print. */
    if (p != NULL && dirty > 0)
        memset(p, 0, dirty);
    if (p != NULL)
        return p;
    PyMemAllocatorEx *w = zb_wrapped(ctx);
    return w->calloc(w->ctx, nelem, elsize);
}

static void zb_objects_free(void *ctx, void *p)
{
    if (p == NULL)
        return;
    if (zb_in_region(p)) {
        zb_region_free(p);
        return;
    }
    PyMemAllocatorEx *w = zb_wrapped(ctx);
    w->free(w->ctx, p);
}

static void *zb_objects_realloc(void *ctx, void *p, size_t size)
{
    if (p == NULL)
        return zb_objects_malloc(ctx, size);
    if (!zb_in_region(p)) {
        PyMemAllocatorEx *w = zb_wrapped(ctx);
        return w->realloc(w->ctx, p, size);
    }
    unsigned c = zb_region_class(p);
    size_t had = zb_object_classes[c];
    /* Shrinking keeps a block of up to 512 bytes, and a larger one unless
     * less than half of it would be used: a move writes another page. */
    if (size <= had && (had <= 512 || size > had / 2))
        return p;
    int grown = zb_object_class(size);
    if (size > had && grown >= 0 && zb_region_is_top(p, c) &&
        (size_t)(zb_objects.end - (char *)p) >= zb_object_classes[grown]) {
        zb_objects.next = p;
        return zb_region_carve((unsigned)grown, zb_object_classes[grown]);
    }
    void *q = zb_objects_malloc(ctx, size);
    if (q == NULL)
        return NULL;
    memcpy(q, p, size < had ? size : had);
    zb_region_free(p);
    return q;
}

/* What one page of the class table describes: 4 KiB of granules. */
#define ZB_OBJECTS_TABLE_SPAN (4096u * ZB_OBJECTS_GRANULE)

/* Readies the region for forks; call last before READY:
 *  - forgets the blocks on the free lists, for good: blocks the template
 *    freed since routing, which a fork would take first, writing pages
 *    below the ones it carves;
 *  - clears what the template carved past `next` and gave back, so that
 *    a fork's carved blocks are zero and need no clearing (a clearing
 *    that writes zeros over zeros still copies the page);
 *  - moves `next` on to the start of the region's next 64 KiB, which one
 *    page of the class table describes: a `print`'s objects (under
 *    64 KiB) then write one page of the table, not two. */
static void zb_objects_ready(void)
{
    if (zb_objects.start == NULL)
        return;
    memset(zb_objects.free_lists, 0, sizeof zb_objects.free_lists);
    memset(zb_objects.next, 0, (size_t)(zb_objects.high - zb_objects.next));
    size_t at = (size_t)(zb_objects.next - zb_objects.start);
    size_t span_left = ZB_OBJECTS_TABLE_SPAN - at % ZB_OBJECTS_TABLE_SPAN;
    if (span_left < ZB_OBJECTS_TABLE_SPAN && span_left < (size_t)(zb_objects.end - zb_objects.next))
        zb_objects.next += span_left;
    zb_objects.high = zb_objects.next;
}

/*
 * Maps the region and its class table in one 2 MiB range of their own and
 * writes every page of both, so that a fork's writes there are
 * copy-on-write faults of the host only, and so that zb_hugify moves the
 * range onto one huge page: one page-table leaf for a fork to touch, and
 * one range for private-written-ranges to copy. Call before zb_hugify.
 * Returns 0, or -1 with `report` saying why.
 */
#define ZB_OBJECTS_REGION (1920u << 10)

static inline int zb_objects_reserve(char *report, size_t report_len)
{
    _Static_assert(ZB_OBJECTS_REGION + ZB_OBJECTS_REGION / ZB_OBJECTS_GRANULE <= ZB_HUGE, "one huge page");
    char *start = zb_mmap_aligned(ZB_HUGE, PROT_READ | PROT_WRITE);
    if (start == MAP_FAILED) {
        snprintf(report, report_len, "mmap: %s", strerror(errno));
        return -1;
    }
    memset(start, 0, ZB_HUGE);
    zb_objects.start = zb_objects.next = zb_objects.high = start;
    zb_objects.end = start + ZB_OBJECTS_REGION;
    /* Page-aligned: the blocks of a page's worth of table (64 KiB) are
     * then in one page of it. */
    zb_objects.classes = (unsigned char *)zb_objects.end;
    memset(zb_objects.classes, ZB_NO_CLASS, ZB_OBJECTS_REGION / ZB_OBJECTS_GRANULE);
    snprintf(report, report_len, "%u KiB reserved for a fork's objects", ZB_OBJECTS_REGION >> 10);
    return 0;
}

/*
 * Wraps the MEM and OBJ domains' allocators. Call with the GIL held, last
 * thing before READY: what the template allocates from then on is in the
 * region for good. The code of every path here runs once first (a block
 * of each class taken, grown, freed), so that a fork finds it mapped; the
 * region is then as it was.
 */
static inline int zb_objects_route(char *report, size_t report_len)
{
    if (zb_objects.start == NULL) {
        snprintf(report, report_len, "no region reserved");
        return -1;
    }
    static const int domains[2] = {ZB_PYMEM_DOMAIN_MEM, ZB_PYMEM_DOMAIN_OBJ};
    for (uintptr_t d = 0; d < 2; d++) {
        PyMem_GetAllocator(domains[d], &zb_objects.wrapped[d]);
        void *ctx = (void *)d;
        void *blocks[ZB_OBJECT_CLASSES];
        for (unsigned c = 0; c < ZB_OBJECT_CLASSES; c++)
            blocks[c] = zb_objects_calloc(ctx, 1, zb_object_classes[c]);
        for (unsigned c = 0; c < ZB_OBJECT_CLASSES; c++)
            blocks[c] = zb_objects_realloc(ctx, blocks[c], zb_object_classes[c] + 1);
        for (unsigned c = 0; c < ZB_OBJECT_CLASSES; c++)
            zb_objects_free(ctx, blocks[c]);
        void *outside = zb_objects_realloc(ctx, zb_objects_malloc(ctx, ZB_OBJECTS_MAX_BLOCK + 1), 1);
        zb_objects_free(ctx, outside);
        /* A small block grown to a page, then given back (the rehearsals
         * after routing run the rest of realloc's paths). */
        zb_objects_free(ctx, zb_objects_realloc(ctx, zb_objects_malloc(ctx, 16), 4096));
    }
    size_t used = (size_t)(zb_objects.high - zb_objects.start);
    memset(zb_objects.start, 0, used);
    memset(zb_objects.classes, ZB_NO_CLASS, used / ZB_OBJECTS_GRANULE);
    memset(zb_objects.free_lists, 0, sizeof zb_objects.free_lists);
    zb_objects.next = zb_objects.high = zb_objects.start;
    for (uintptr_t d = 0; d < 2; d++) {
        PyMemAllocatorEx routed = {(void *)d, zb_objects_malloc, zb_objects_calloc, zb_objects_realloc,
                                   zb_objects_free};
        PyMem_SetAllocator(domains[d], &routed);
    }
    snprintf(report, report_len, "a fork's objects up to %u bytes go into %zu KiB in address order",
             ZB_OBJECTS_MAX_BLOCK, (size_t)(zb_objects.end - zb_objects.start) >> 10);
    return 0;
}

#endif
