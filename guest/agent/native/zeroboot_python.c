/*
 * The Python agent's native half, loaded with ctypes: what agent.py cannot
 * do from Python itself because no Python code may run in the middle of it.
 */
#include "files.h"
#include "guest.h"
#include "heap.h"

/* See zb_mount_kernel_filesystems in guest.h. */
int zeroboot_mount_kernel_filesystems(void)
{
    return zb_mount_kernel_filesystems();
}

/* See zb_map_physical in guest.h. */
void *zeroboot_map_physical(uint64_t physical, size_t length)
{
    return zb_map_physical(physical, length);
}

/* See zb_hugify in guest.h. */
int zeroboot_hugify(char *report, size_t report_len)
{
    return zb_hugify(report, report_len);
}

/* See zb_capture_child_output in guest.h. */
int zeroboot_capture_child_output(int read_fds[2])
{
    return zb_capture_child_output(read_fds);
}

/* See zb_switch_user in guest.h. */
int zeroboot_switch_user(uint32_t uid)
{
    return zb_switch_user(uid);
}

/* See zb_serve_file_ops in files.h. */
void zeroboot_serve_file_ops(void *mailbox, void *doorbell)
{
    zb_serve_file_ops(mailbox, doorbell);
}

/* See zb_map_fresh_heap in heap.h. */
int zeroboot_map_fresh_heap(size_t bytes, struct zb_fresh_run *runs, int max_runs, char *report, size_t report_len)
{
    return zb_map_fresh_heap(bytes, runs, max_runs, report, report_len);
}

/*
 * CPython's small objects live in 1 MiB arenas that it maps itself, each
 * one fresh pages; routed through malloc, new arenas come out of the fresh
 * heap. Arenas made before the switch were mmap'd and go back the same way,
 * so the arenas malloc gave are remembered (a set of addresses: CPython
 * frees an arena only whole, and holds at most one per MiB of guest RAM).
 * The declarations are CPython's (Include/cpython/objimpl.h).
 */
typedef struct {
    void *ctx;
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *ptr, size_t size);
} PyObjectArenaAllocator;
extern void PyObject_GetArenaAllocator(PyObjectArenaAllocator *allocator);
extern void PyObject_SetArenaAllocator(PyObjectArenaAllocator *allocator);

static PyObjectArenaAllocator zb_mapped_arenas;

/* Open addressing; a slot is empty (NULL), a tombstone, or an arena. */
#define ZB_ARENA_SLOTS (1u << 16)
#define ZB_TOMBSTONE ((void *)1)
static void *zb_arena_set[ZB_ARENA_SLOTS];
static unsigned zb_arena_used; /* arenas plus tombstones */

static unsigned zb_arena_slot(void *p)
{
    return (unsigned)(((uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ull >> 48) & (ZB_ARENA_SLOTS - 1);
}

static void *zb_arena_alloc(void *ctx, size_t size)
{
    (void)ctx;
    /* A full set (far more arenas than guest RAM holds) falls back to
     * CPython's own mapping, which this set need not know about. */
    if (zb_arena_used >= ZB_ARENA_SLOTS / 2)
        return zb_mapped_arenas.alloc(zb_mapped_arenas.ctx, size);
    void *p = malloc(size);
    if (p == NULL)
        return zb_mapped_arenas.alloc(zb_mapped_arenas.ctx, size);
    unsigned i = zb_arena_slot(p);
    while (zb_arena_set[i] != NULL && zb_arena_set[i] != ZB_TOMBSTONE)
        i = (i + 1) & (ZB_ARENA_SLOTS - 1);
    if (zb_arena_set[i] == NULL)
        zb_arena_used++;
    zb_arena_set[i] = p;
    return p;
}

static void zb_arena_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    for (unsigned i = zb_arena_slot(ptr); zb_arena_set[i] != NULL; i = (i + 1) & (ZB_ARENA_SLOTS - 1)) {
        if (zb_arena_set[i] == ptr) {
            zb_arena_set[i] = ZB_TOMBSTONE;
            free(ptr);
            return;
        }
    }
    zb_mapped_arenas.free(zb_mapped_arenas.ctx, ptr, size);
}

/* Call with the GIL held (ctypes.PyDLL), after zeroboot_map_fresh_heap. */
void zeroboot_route_arenas(void)
{
    PyObject_GetArenaAllocator(&zb_mapped_arenas);
    PyObjectArenaAllocator routed = {NULL, zb_arena_alloc, zb_arena_free};
    PyObject_SetArenaAllocator(&routed);
}
