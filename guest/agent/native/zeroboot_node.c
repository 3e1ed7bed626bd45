/*
 * zeroboot_node.node: the Node.js agent's native half (agent.js). Node has
 * no mount, no mmap of /dev/mem and no ioctl; this addon provides them
 * (through guest.h) and hands JavaScript the mailbox and the doorbell as
 * ArrayBuffers over the mappings, so a request and its result pass through
 * memory with no system call.
 *
 * It is built by the zeroboot root-image step with the host's C compiler and
 * no Node headers: the few Node-API functions it calls are declared below
 * (their ABI is stable across Node versions) and bound at load time from the
 * node binary.
 */
#include <dlfcn.h>

#include "files.h"
#include "guest.h"
#include "heap.h"

typedef struct napi_env__ *napi_env;
typedef struct napi_value__ *napi_value;
typedef struct napi_callback_info__ *napi_callback_info;
typedef int napi_status; /* napi_ok == 0 */
typedef napi_value (*napi_callback)(napi_env, napi_callback_info);
typedef void (*napi_finalize)(napi_env, void *, void *);

extern napi_status napi_get_cb_info(napi_env, napi_callback_info, size_t *, napi_value *, napi_value *, void **);
extern napi_status napi_create_function(napi_env, const char *, size_t, napi_callback, void *, napi_value *);
extern napi_status napi_set_named_property(napi_env, napi_value, const char *, napi_value);
extern napi_status napi_create_external_arraybuffer(napi_env, void *, size_t, napi_finalize, void *, napi_value *);
extern napi_status napi_get_value_string_utf8(napi_env, napi_value, char *, size_t, size_t *);
extern napi_status napi_get_value_int64(napi_env, napi_value, int64_t *);
extern napi_status napi_get_buffer_info(napi_env, napi_value, void **, size_t *);
extern napi_status napi_get_arraybuffer_info(napi_env, napi_value, void **, size_t *);
extern napi_status napi_create_int32(napi_env, int32_t, napi_value *);
extern napi_status napi_create_string_utf8(napi_env, const char *, size_t, napi_value *);
extern napi_status napi_create_double(napi_env, double, napi_value *);
extern napi_status napi_throw_error(napi_env, const char *, const char *);
extern napi_status napi_create_array_with_length(napi_env, size_t, napi_value *);
extern napi_status napi_set_element(napi_env, napi_value, uint32_t, napi_value);

#define MAX_ARGS 4

static int args(napi_env env, napi_callback_info info, size_t want, napi_value *argv)
{
    size_t argc = MAX_ARGS;
    if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != 0 || argc < want) {
        napi_throw_error(env, NULL, "zeroboot_node: missing arguments");
        return -1;
    }
    return 0;
}

static napi_value int32(napi_env env, int32_t v)
{
    napi_value out = NULL;
    napi_create_int32(env, v, &out);
    return out;
}

/* mountKernelFilesystems() -> number of mounts that failed */
static napi_value js_mount(napi_env env, napi_callback_info info)
{
    (void)info;
    return int32(env, zb_mount_kernel_filesystems());
}

/* cmdlineNumber(key) -> the number after `key=` on the kernel command line */
static napi_value js_cmdline_number(napi_env env, napi_callback_info info)
{
    napi_value argv[MAX_ARGS];
    char key[128];
    if (args(env, info, 1, argv) || napi_get_value_string_utf8(env, argv[0], key, sizeof key, NULL) != 0)
        return NULL;
    uint64_t v = zb_cmdline_number(key);
    napi_value out = NULL;
    napi_create_double(env, (double)v, &out);
    return out;
}

/* mapPhysical(address, length) -> ArrayBuffer over /dev/mem (never unmapped) */
static napi_value js_map_physical(napi_env env, napi_callback_info info)
{
    napi_value argv[MAX_ARGS];
    int64_t address, length;
    if (args(env, info, 2, argv) || napi_get_value_int64(env, argv[0], &address) != 0 ||
        napi_get_value_int64(env, argv[1], &length) != 0)
        return NULL;
    if (address < 0 || length <= 0) {
        napi_throw_error(env, NULL, "zeroboot_node: bad physical range");
        return NULL;
    }
    void *p = zb_map_physical((uint64_t)address, (size_t)length);
    if (p == NULL) {
        char msg[160];
        snprintf(msg, sizeof msg, "zeroboot_node: mapping /dev/mem at %#llx: %s", (unsigned long long)address,
                 strerror(errno));
        napi_throw_error(env, NULL, msg);
        return NULL;
    }
    napi_value out = NULL;
    if (napi_create_external_arraybuffer(env, p, (size_t)length, NULL, NULL, &out) != 0)
        napi_throw_error(env, NULL, "zeroboot_node: cannot wrap the mapping");
    return out;
}

/* serveFileOps(mailbox, doorbell): both ArrayBuffers from mapPhysical. See
 * zb_serve_file_ops in files.h. */
static napi_value js_serve_file_ops(napi_env env, napi_callback_info info)
{
    napi_value argv[MAX_ARGS];
    void *mailbox, *doorbell;
    size_t mailbox_len, doorbell_len;
    if (args(env, info, 2, argv) || napi_get_arraybuffer_info(env, argv[0], &mailbox, &mailbox_len) != 0 ||
        napi_get_arraybuffer_info(env, argv[1], &doorbell, &doorbell_len) != 0 || mailbox_len != ZB_MAILBOX_SIZE ||
        doorbell_len == 0) {
        napi_throw_error(env, NULL, "zeroboot_node: serveFileOps takes the mailbox and the doorbell");
        return NULL;
    }
    zb_serve_file_ops(mailbox, doorbell);
    return NULL;
}

static int buffer_arg(napi_env env, napi_callback_info info, void **data, size_t *len)
{
    napi_value argv[MAX_ARGS];
    if (args(env, info, 1, argv))
        return -1;
    if (napi_get_buffer_info(env, argv[0], data, len) != 0) {
        napi_throw_error(env, NULL, "zeroboot_node: expected a Buffer");
        return -1;
    }
    return 0;
}

/* addEntropy(buffer) -> 0, or errno: credits the bytes to the kernel CRNG */
static napi_value js_add_entropy(napi_env env, napi_callback_info info)
{
    void *data;
    size_t len;
    if (buffer_arg(env, info, &data, &len))
        return NULL;
    return int32(env, zb_add_entropy(data, len) == 0 ? 0 : errno);
}

/* seedOpenssl(buffer) -> whether OpenSSL took it. Mixes the bytes into
 * OpenSSL's primary generator; its children reseed from it on their next
 * use, so crypto.randomBytes in each fork differs from every other fork's. */
static napi_value js_seed_openssl(napi_env env, napi_callback_info info)
{
    void *data;
    size_t len;
    if (buffer_arg(env, info, &data, &len))
        return NULL;
    static void (*rand_seed)(const void *, int);
    if (rand_seed == NULL)
        rand_seed = (void (*)(const void *, int))dlsym(RTLD_DEFAULT, "RAND_seed");
    if (rand_seed == NULL)
        return int32(env, 0);
    rand_seed(data, (int)len);
    return int32(env, 1);
}

/* drainConsole(): waits until the console has sent everything queued */
static napi_value js_drain_console(napi_env env, napi_callback_info info)
{
    (void)info;
    return int32(env, tcdrain(1) == 0 ? 0 : errno);
}

/* hugify() -> a one-line report: moves the hot 2 MiB ranges of this
 * process onto huge pages (zb_hugify). Node runs --single-threaded, so no
 * other thread writes to them meanwhile. */
static napi_value js_hugify(napi_env env, napi_callback_info info)
{
    (void)info;
    char report[256];
    if (zb_hugify(report, sizeof report) < 0)
        snprintf(report, sizeof report, "%s", strerror(errno));
    napi_value out;
    if (napi_create_string_utf8(env, report, (size_t)-1, &out) != 0)
        return NULL;
    return out;
}

/* mapFreshHeap(mailbox, mib) -> a one-line report: maps `mib` MiB of the
 * malloc heap ahead for the code's allocations (zb_map_fresh_heap: Buffers
 * and ArrayBuffers come from malloc) and writes where they are into the
 * mailbox's fresh-memory table. Throws if it cannot. */
static napi_value js_map_fresh_heap(napi_env env, napi_callback_info info)
{
    napi_value argv[MAX_ARGS];
    void *mailbox;
    size_t length;
    int64_t mib;
    if (args(env, info, 2, argv) || napi_get_arraybuffer_info(env, argv[0], &mailbox, &length) != 0 ||
        napi_get_value_int64(env, argv[1], &mib) != 0)
        return NULL;
    if (length != ZB_MAILBOX_SIZE || mib < 0 || mib > (1 << 20)) {
        napi_throw_error(env, NULL, "zeroboot_node: mapFreshHeap(mailbox, mib)");
        return NULL;
    }
    static struct zb_fresh_run runs[ZB_MAX_FRESH_RUNS];
    char report[256];
    int count = zb_map_fresh_heap((size_t)mib << 20, runs, ZB_MAX_FRESH_RUNS, report, sizeof report);
    if (count < 0) {
        char msg[320];
        snprintf(msg, sizeof msg, "zeroboot_node: fresh heap: %s: %s", report, strerror(errno));
        napi_throw_error(env, NULL, msg);
        return NULL;
    }
    uint8_t *m = mailbox;
    for (int i = 0; i < count; i++) {
        memcpy(m + ZB_H_FRESH_TABLE + (size_t)i * ZB_FRESH_ENTRY_LEN, &runs[i].gpa, 8);
        memcpy(m + ZB_H_FRESH_TABLE + (size_t)i * ZB_FRESH_ENTRY_LEN + 8, &runs[i].len, 8);
    }
    zb_put32(m, ZB_H_FRESH_COUNT, (uint32_t)count);
    napi_value out;
    if (napi_create_string_utf8(env, report, (size_t)-1, &out) != 0)
        return NULL;
    return out;
}

/* captureChildOutput() -> [stdoutFd, stderrFd]: points fds 1 and 2 at
 * files that child processes inherit (zb_capture_child_output), and
 * returns fds to read and empty them with. */
static napi_value js_capture_child_output(napi_env env, napi_callback_info info)
{
    (void)info;
    int fds[2] = {-1, -1};
    if (zb_capture_child_output(fds) != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "zeroboot_node: capturing child output: %s", strerror(errno));
        napi_throw_error(env, NULL, msg);
        return NULL;
    }
    napi_value out = NULL;
    if (napi_create_array_with_length(env, 2, &out) != 0)
        return NULL;
    for (uint32_t i = 0; i < 2; i++)
        if (napi_set_element(env, out, i, int32(env, fds[i])) != 0)
            return NULL;
    return out;
}

/* switchUser(uid) -> 0, or errno: runs this process as uid from now on
 * (zb_switch_user). Node runs --single-threaded, so no other thread keeps
 * the old credentials. */
static napi_value js_switch_user(napi_env env, napi_callback_info info)
{
    napi_value argv[MAX_ARGS];
    int64_t uid;
    if (args(env, info, 1, argv) || napi_get_value_int64(env, argv[0], &uid) != 0)
        return NULL;
    if (uid < 0 || uid > UINT32_MAX) {
        napi_throw_error(env, NULL, "zeroboot_node: bad uid");
        return NULL;
    }
    return int32(env, zb_switch_user((uint32_t)uid) == 0 ? 0 : errno);
}

napi_value napi_register_module_v1(napi_env env, napi_value exports)
{
    static const struct {
        const char *name;
        napi_callback fn;
    } functions[] = {
        {"mountKernelFilesystems", js_mount}, {"cmdlineNumber", js_cmdline_number},
        {"mapPhysical", js_map_physical},     {"addEntropy", js_add_entropy},
        {"seedOpenssl", js_seed_openssl},     {"drainConsole", js_drain_console},
        {"hugify", js_hugify},                {"captureChildOutput", js_capture_child_output},
        {"switchUser", js_switch_user},       {"serveFileOps", js_serve_file_ops},
        {"mapFreshHeap", js_map_fresh_heap},
    };
    for (size_t i = 0; i < sizeof functions / sizeof functions[0]; i++) {
        napi_value fn;
        if (napi_create_function(env, functions[i].name, (size_t)-1, functions[i].fn, NULL, &fn) != 0 ||
            napi_set_named_property(env, exports, functions[i].name, fn) != 0)
            return NULL;
    }
    return exports;
}

int32_t node_api_module_get_api_version_v1(void)
{
    return 8;
}
