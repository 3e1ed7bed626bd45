/*
 * The Python agent's native half, loaded with ctypes: what agent.py cannot
 * do from Python itself because no Python code may run in the middle of it.
 */
#include "exec_path.h"
#include "files.h"
#include "fork_objects.h"
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

/* See zb_objects_reserve in fork_objects.h. */
int zeroboot_reserve_fork_objects(char *report, size_t report_len)
{
    return zb_objects_reserve(report, report_len);
}

/* See zb_objects_route in fork_objects.h; call with the GIL held
 * (ctypes.PyDLL). */
int zeroboot_route_fork_objects(char *report, size_t report_len)
{
    return zb_objects_route(report, report_len);
}

/* See zb_take_free_chunks in heap.h. */
long zeroboot_take_free_chunks(char *report, size_t report_len)
{
    return zb_take_free_chunks(report, report_len);
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

/*
 * Where a fork's small objects go. pymalloc serves each size class from the
 * first pool of a list of partly used pools; at READY those are scattered
 * over every arena the template ever used, so a fork that allocates a few
 * objects of each class writes a page in as many places. Filling every
 * partly used pool until the allocator takes an empty one leaves each
 * class's list with one pool that holds nothing but the block that took it:
 * a fork's objects then go one after the other into those pools, a few
 * pages in all. The blocks the fill takes are never freed (they were free
 * space in pools that the template's objects keep alive anyway).
 *
 * The pool header is CPython's (Include/internal/pycore_obmalloc.h), which
 * no public header has; its layout is checked on the blocks the fill takes
 * (size class, offsets within the pool), and nothing is filled unless it
 * holds. 3.13 builds with the radix tree have 16 KiB pools.
 */
extern void *PyObject_Malloc(size_t size);

struct zb_pool_header {
    union {
        void *padding;
        unsigned int count;
    } ref;
    void *freeblock;
    struct zb_pool_header *nextpool, *prevpool;
    unsigned int arenaindex, szidx, nextoffset, maxnextoffset;
};

#define ZB_POOL_SIZE (16u << 10)
#define ZB_SIZE_CLASSES 32
#define ZB_CLASS_BYTES 16u
/* Far more blocks than the free space of a template's pools holds; a class
 * that is not done by then is left as it is. */
#define ZB_FILL_LIMIT 200000

static struct zb_pool_header *zb_pool_of(void *block)
{
    return (struct zb_pool_header *)((uintptr_t)block & ~(uintptr_t)(ZB_POOL_SIZE - 1));
}

static int zb_pool_is_sane(struct zb_pool_header *pool, unsigned size_class, void *block)
{
    uintptr_t offset = (uintptr_t)block - (uintptr_t)pool;
    return pool->szidx == size_class && pool->nextoffset <= ZB_POOL_SIZE && pool->maxnextoffset < ZB_POOL_SIZE &&
           offset >= sizeof *pool && offset < ZB_POOL_SIZE && pool->ref.count >= 1;
}

/*
 * Call with the GIL held (ctypes.PyDLL), last thing before the memory
 * layout is final (before zeroboot_hugify and the fresh heap: an empty pool
 * may be carved from an arena's untouched pages, which the fill touches so
 * that a fork does not fault them in). Returns the blocks taken, or -1 when
 * the pool layout is not the one expected (nothing taken then but the
 * probe); `report` says what happened.
 */
long zeroboot_fill_object_pools(char *report, size_t report_len)
{
    void *probe = PyObject_Malloc(ZB_CLASS_BYTES);
    if (probe == NULL || !zb_pool_is_sane(zb_pool_of(probe), 0, probe)) {
        snprintf(report, report_len, "pool layout not recognized");
        return -1;
    }
    long taken = 1, pools = 0;
    for (unsigned c = 0; c < ZB_SIZE_CLASSES; c++) {
        for (long n = 0; n < ZB_FILL_LIMIT; n++) {
            void *block = PyObject_Malloc((c + 1) * ZB_CLASS_BYTES);
            if (block == NULL)
                break;
            taken++;
            struct zb_pool_header *pool = zb_pool_of(block);
            if (!zb_pool_is_sane(pool, c, block)) {
                snprintf(report, report_len, "pool layout not recognized for %u bytes", (c + 1) * ZB_CLASS_BYTES);
                return -1;
            }
            if (pool->ref.count == 1) {
                for (char *page = (char *)pool; page < (char *)pool + ZB_POOL_SIZE; page += 4096)
                    *(volatile char *)page = *(volatile char *)page;
                pools++;
                break;
            }
        }
    }
    snprintf(report, report_len, "%ld blocks taken, %ld size classes start in an empty pool", taken, pools);
    return taken;
}

/*
 * The request loop (exec_path.h). Call all three with the GIL held
 * (ctypes.PyDLL), from CPython 3.12 on.
 */

/* See zb_exec_setup; 0, or -1 with the exception raised in the caller. */
int zeroboot_exec_setup(PyObject *agent, PyObject *string_io)
{
    return zb_exec_setup(agent, string_io);
}

/* See zb_exec_request: one request, from the mailbox (and doorbell) at
 * these addresses, which the views passed on to agent.py cover. */
void zeroboot_exec_request(void *mailbox, void *doorbell, PyObject *mailbox_view, PyObject *doorbell_view,
                           PyObject *namespace)
{
    zb_exec_request(mailbox, doorbell, mailbox_view, doorbell_view, namespace);
}

/* Rings READY, and serves requests for good. The READY store is the
 * snapshot: every fork resumes right after it, in this loop, with its
 * request already in the mailbox. */
void zeroboot_exec_serve(void *mailbox, void *doorbell, PyObject *mailbox_view, PyObject *doorbell_view,
                         PyObject *namespace)
{
    volatile uint8_t *bell = doorbell;
    /* Last before READY: empties CPython's free lists (a full collection
     * does). The lists, tuples and dicts the agent freed since its last
     * collection would be a fork's first ones, in the template's arenas,
     * where the fork then writes them instead of the region. */
    PyGC_Collect();
    /* After the collection, which frees blocks into the region. */
    zb_objects_ready();
    /* The requests' stack starts 64 bytes below a page boundary: a plain
     * request uses about 7 KiB of it, which then lies in two pages of a
     * fork's memory, not in three when the stack happened to start near the
     * bottom of a page. */
    uintptr_t sp;
    __asm__ volatile("mov %%rsp, %0" : "=r"(sp));
    volatile char *pad = __builtin_alloca((sp & 4095) + 64);
    __asm__ volatile("" : : "r"(pad) : "memory");
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bell[0] = ZB_DOORBELL_READY;
    for (;;)
        zb_exec_request(mailbox, doorbell, mailbox_view, doorbell_view, namespace);
}

/* See zb_captures_install: where the request loop is not used (before
 * CPython 3.12), the captures' methods alone. */
int zeroboot_install_captures(PyObject *text_class, PyObject *bytes_class, PyObject *children)
{
    return zb_captures_install(text_class, bytes_class, children);
}
