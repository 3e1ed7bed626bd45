/*
 * zeroboot_bash.so: a bash loadable builtin (`enable -f`), the native half of
 * the shell agent (agent.sh). Bash cannot map memory; this builtin maps the
 * mailbox and the doorbell (through guest.h) and moves requests and results
 * between them and files on /run, so the shell itself never deals in bytes.
 *
 *   zeroboot boot           mount filesystems, map the mailbox, credit entropy
 *   zeroboot ready          drain the console, ring READY (the snapshot);
 *                           returns in each fork
 *   zeroboot attach DIR     open DIR/stdin, DIR/stdout and DIR/stderr as this
 *                           shell's fds 0, 1 and 2 (and keep fds of its own)
 *   zeroboot request        the request: code in $ZB_CODE, 31 random bits in
 *                           $ZB_SEED, stdin in fd 0; empties fds 1 and 2
 *   zeroboot respond STATUS send what was written to stdout and stderr,
 *                           capped at the request's limit, then ring RESULT
 *   zeroboot reap STATUS DIR
 *                           respond from DIR's files, unless the request was
 *                           answered already
 *   zeroboot become-user    run this subshell as the sandbox's user (uid
 *                           1000), as every request does unless it asks
 *                           for root
 *   zeroboot prefault       map every page of this process's private
 *                           mappings, and copy the writable ones
 *   zeroboot hugify         move this process's hot 2 MiB ranges onto huge
 *                           pages (zb_hugify), and say so on the console
 *
 * The agent serves each request in a subshell (see agent.sh), which may
 * answer or die without answering; which request is being served and which
 * was answered live in a page shared by every process the agent forks.
 *
 * Built by the zeroboot root-image step with the host's C compiler. Bash's
 * headers are not needed: the builtin ABI below (struct builtin, WORD_LIST)
 * has been stable since bash 4, and bind_variable is bound from the bash
 * binary at load time.
 */
#include "files.h"
#include "guest.h"

typedef struct word_desc {
    char *word;
    int flags;
} WORD_DESC;

typedef struct word_list {
    struct word_list *next;
    WORD_DESC *word;
} WORD_LIST;

struct builtin {
    char *name;
    int (*function)(WORD_LIST *);
    int flags;
    char *const *long_doc;
    const char *short_doc;
    char *handle;
};

extern void *bind_variable(const char *, char *, int);

#define EXECUTION_SUCCESS 0
#define EXECUTION_FAILURE 1
#define EX_USAGE 258
#define BUILTIN_ENABLED 0x01

static volatile uint8_t *mailbox;
static volatile uint8_t *doorbell;

/* Shared between the agent and its subshells (MAP_SHARED, inherited). */
struct progress {
    uint32_t serving;  /* sequence number of the request being served */
    uint32_t answered; /* the last one whose final chunk was sent */
};
static volatile struct progress *progress;

static int fail(const char *what)
{
    fprintf(stderr, "zeroboot: %s: %s\n", what, strerror(errno));
    return EXECUTION_FAILURE;
}

static int boot(void)
{
    zb_mount_kernel_filesystems();
    uint64_t mailbox_gpa = zb_cmdline_number("zeroboot.mailbox");
    uint64_t doorbell_gpa = zb_cmdline_number("zeroboot.doorbell");
    progress = mmap(NULL, sizeof *progress, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (progress == MAP_FAILED) {
        progress = NULL;
        return fail("mapping the progress page");
    }
    mailbox = zb_map_physical(mailbox_gpa, ZB_MAILBOX_SIZE);
    if (mailbox == NULL)
        return fail("mapping the mailbox");
    doorbell = zb_map_physical(doorbell_gpa, 4096);
    if (doorbell == NULL)
        return fail("mapping the doorbell");
    uint32_t magic = zb_get32(mailbox, ZB_H_MAGIC), version = zb_get32(mailbox, ZB_H_VERSION);
    if (magic != ZB_MAGIC || version != ZB_VERSION) {
        fprintf(stderr, "zeroboot: mailbox magic/version %#x/%u, expected %#x/%u\n", magic, version, ZB_MAGIC,
                ZB_VERSION);
        return EXECUTION_FAILURE;
    }
    if (zb_add_entropy((const uint8_t *)mailbox + ZB_H_BOOT_SEED, ZB_BOOT_SEED_LEN) != 0)
        return fail("crediting boot entropy");
    memset((uint8_t *)mailbox + ZB_H_BOOT_SEED, 0, ZB_BOOT_SEED_LEN);
    return EXECUTION_SUCCESS;
}

/* This shell's own fds on the request's stdin, stdout and stderr files,
 * above where code is likely to look, so that code that closes or
 * redirects 0, 1 or 2 does not stop the answer. */
enum { FD_BASE = 1000 };
static int io_fds[3] = {-1, -1, -1};

static int attach(const char *dir)
{
    static const char *const names[3] = {"stdin", "stdout", "stderr"};
    for (int i = 0; i < 3; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        int fd = open(path, O_RDWR | O_CREAT, 0600);
        if (fd < 0)
            return fail(path);
        if (dup2(fd, i) < 0)
            return fail("dup2");
        io_fds[i] = fcntl(fd, F_DUPFD_CLOEXEC, FD_BASE + i);
        if (io_fds[i] < 0)
            return fail("fcntl");
        close(fd);
    }
    return EXECUTION_SUCCESS;
}

/* The uid this process runs as: the agent's is root, and each subshell
 * switches to the request's user (zb_switch_user), the first one before
 * the snapshot, so that a request as the default user in a fresh fork
 * makes no system call for it. */
static uint32_t current_uid;

/* Runs this subshell as `name` (empty: the default user), with its HOME,
 * USER and LOGNAME (exported by agent.sh). */
static int become(const char *name)
{
    uint32_t uid = strcmp(name, "root") == 0 ? 0 : ZB_USER_UID;
    if (uid != current_uid) {
        if (zb_switch_user(uid) != 0)
            return -1;
        current_uid = uid;
    }
    /* Also without a switch: a subshell the root agent forks is already
     * root, with the user's HOME it inherited. */
    const char *home = uid == 0 ? "/root" : ZB_USER_HOME;
    const char *user = uid == 0 ? "root" : "user";
    bind_variable("HOME", (char *)home, 0);
    bind_variable("USER", (char *)user, 0);
    bind_variable("LOGNAME", (char *)user, 0);
    return 0;
}

/* The request's context (ZB_H_CONTEXT_LEN): its user, which this subshell
 * becomes, its working directory in $ZB_CWD and its variables bound in
 * this subshell, their names in $ZB_ENV_NAMES for agent.sh to export. For
 * no context, the default user, and both stay empty. */
static int bind_context(const uint8_t *at, uint32_t len)
{
    bind_variable("ZB_CWD", "", 0);
    bind_variable("ZB_ENV_NAMES", "", 0);
    if (len == 0)
        return become("");
    char *records = malloc((size_t)len + 1);
    char *names = malloc((size_t)len + 1);
    if (records == NULL || names == NULL) {
        free(records);
        free(names);
        return -1;
    }
    memcpy(records, at, len);
    records[len] = 0;
    names[0] = 0;
    size_t names_len = 0;
    char *end = records + len;
    bind_variable("ZB_CWD", records, 0);
    char *user = records + strlen(records) + 1;
    if (user >= end || become(user) != 0) {
        free(records);
        free(names);
        return -1;
    }
    for (char *record = user + strlen(user) + 1; record < end; record += strlen(record) + 1) {
        char *equals = strchr(record, '=');
        if (equals == NULL)
            continue;
        *equals = 0;
        bind_variable(record, equals + 1, 0);
        size_t n = strlen(record);
        memcpy(names + names_len, record, n);
        names_len += n;
        names[names_len++] = ' ';
        names[names_len] = 0;
    }
    bind_variable("ZB_ENV_NAMES", names, 0);
    free(records);
    free(names);
    return 0;
}

static int request(void)
{
    if (io_fds[0] < 0) {
        fprintf(stderr, "zeroboot: run `zeroboot attach DIR` first\n");
        return EXECUTION_FAILURE;
    }
    /* The files API's requests are answered here and never reach bash. */
    zb_serve_file_ops(mailbox, doorbell);
    progress->serving = zb_get32(mailbox, ZB_H_REQUEST_SEQ);
    uint32_t code_len = zb_get32(mailbox, ZB_H_CODE_LEN);
    uint32_t stdin_len = zb_get32(mailbox, ZB_H_STDIN_LEN);
    uint32_t context_len = zb_get32(mailbox, ZB_H_CONTEXT_LEN);
    if ((uint64_t)ZB_REQUEST_OFFSET + code_len + stdin_len + context_len > ZB_RESPONSE_OFFSET)
        code_len = stdin_len = context_len = 0;
    /* Shell variables end at a NUL, as the arguments of `bash -c` do. */
    char *code = malloc((size_t)code_len + 1);
    if (code == NULL)
        return fail("allocating the code");
    memcpy(code, (const uint8_t *)mailbox + ZB_REQUEST_OFFSET, code_len);
    code[code_len] = 0;
    bind_variable("ZB_CODE", code, 0);
    free(code);
    uint32_t seed;
    memcpy(&seed, (const uint8_t *)mailbox + ZB_H_REQUEST_SEED, 4);
    char seed_text[16];
    snprintf(seed_text, sizeof seed_text, "%u", seed & 0x7fffffffu);
    bind_variable("ZB_SEED", seed_text, 0);
    if (bind_context((const uint8_t *)mailbox + ZB_REQUEST_OFFSET + code_len + stdin_len, context_len) != 0)
        return fail("reading the request's context");
    /* The files are empty in a subshell forked before the snapshot; a
     * truncation of an empty file costs next to nothing. */
    for (int i = 0; i < 3; i++)
        if (ftruncate(io_fds[i], 0) != 0)
            return fail("emptying the request's files");
    const uint8_t *stdin_bytes = (const uint8_t *)mailbox + ZB_REQUEST_OFFSET + code_len;
    for (uint32_t done = 0; done < stdin_len;) {
        ssize_t n = pwrite(io_fds[0], stdin_bytes + done, stdin_len - done, done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return fail("writing stdin");
        done += (uint32_t)n;
    }
    return EXECUTION_SUCCESS;
}

struct output {
    int fd;
    off_t at;      /* where the next read starts */
    uint32_t left; /* bytes still allowed under the limit */
    int at_end;
    int truncated;
};


/* Reads up to `room` bytes of `o` into `to`; returns how many. */
static uint32_t fill(struct output *o, uint8_t *to, uint32_t room)
{
    uint32_t got = 0;
    if (room > o->left)
        room = o->left;
    while (!o->at_end && got < room) {
        ssize_t n = pread(o->fd, to + got, room - got, o->at);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            o->at_end = 1;
            break;
        }
        got += (uint32_t)n;
        o->at += n;
    }
    o->left -= got;
    if (o->left == 0 && !o->at_end) {
        /* At the limit: anything more is dropped, and flagged. */
        char probe;
        o->at_end = 1;
        o->truncated = pread(o->fd, &probe, 1, o->at) == 1;
    }
    return got;
}

/* Sends the answer to the request being served, reading stdout and stderr
 * from `fds`. The request's header stays in the mailbox until the host has
 * the final chunk, so any process of the agent can answer it. */
static int respond(int32_t status, const int fds[2])
{
    uint32_t seq = progress->serving;
    uint32_t output_limit = zb_get32(mailbox, ZB_H_OUTPUT_LIMIT);
    if (output_limit > ZB_MAX_OUTPUT_LIMIT)
        output_limit = ZB_MAX_OUTPUT_LIMIT;
    struct output streams[2];
    for (int i = 0; i < 2; i++) {
        streams[i].fd = fds[i];
        streams[i].at = 0;
        streams[i].left = output_limit;
        streams[i].at_end = fds[i] < 0;
        streams[i].truncated = 0;
    }
    uint8_t *area = (uint8_t *)mailbox + ZB_RESPONSE_OFFSET;
    uint32_t flags = 0;
    for (;;) {
        uint32_t out_len = fill(&streams[0], area, ZB_RESPONSE_CAPACITY);
        uint32_t err_len = fill(&streams[1], area + out_len, ZB_RESPONSE_CAPACITY - out_len);
        flags |= (streams[0].truncated ? ZB_FLAG_STDOUT_TRUNCATED : 0) |
                 (streams[1].truncated ? ZB_FLAG_STDERR_TRUNCATED : 0);
        int last = streams[0].at_end && streams[1].at_end;
        if (last)
            progress->answered = seq;
        zb_ring_result(mailbox, doorbell, seq, ZB_RESPONSE_OFFSET, status, out_len, err_len, 0,
                       flags | (last ? 0 : ZB_FLAG_MORE));
        if (last)
            break;
    }
    return EXECUTION_SUCCESS;
}

/* Answers for a subshell that ended without answering, from DIR's files. */
static int reap(int32_t status, const char *dir)
{
    if (progress->answered == progress->serving)
        return EXECUTION_SUCCESS;
    int fds[2];
    const char *names[2] = {"stdout", "stderr"};
    for (int i = 0; i < 2; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        fds[i] = open(path, O_RDONLY | O_CLOEXEC);
    }
    int r = respond(status, fds);
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    return r;
}

/* A subshell forked before the snapshot shares its writable pages with the
 * agent, and fork gave it no page table entries for file mappings (bash's
 * and libc's code): see zb_prefault. */
static int prefault(void)
{
    return zb_prefault() == 0 ? EXECUTION_SUCCESS : fail("reading /proc/self/maps");
}

static int hugify(void)
{
    char report[256];
    if (zb_hugify(report, sizeof report) < 0)
        return fail("reading /proc/self/maps or pagemap");
    /* fd 2 is the request's stderr file by now */
    FILE *console = fopen("/dev/console", "we");
    if (console != NULL) {
        fprintf(console, "zeroboot-agent: huge pages: %s\n", report);
        fclose(console);
    }
    return EXECUTION_SUCCESS;
}

static int zeroboot_builtin(WORD_LIST *list)
{
    const char *argv[4] = {0};
    int argc = 0;
    for (; list != NULL && argc < 4; list = list->next)
        argv[argc++] = list->word->word;
    if (argc == 0)
        return EX_USAGE;
    if (strcmp(argv[0], "boot") == 0)
        return boot();
    if (strcmp(argv[0], "prefault") == 0)
        return prefault();
    if (strcmp(argv[0], "hugify") == 0)
        return hugify();
    if (mailbox == NULL) {
        fprintf(stderr, "zeroboot: run `zeroboot boot` first\n");
        return EXECUTION_FAILURE;
    }
    if (strcmp(argv[0], "ready") == 0) {
        /* Console bytes still queued at the snapshot would be sent again
         * by every fork. */
        tcdrain(1);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        doorbell[0] = ZB_DOORBELL_READY;
        return EXECUTION_SUCCESS;
    }
    if (strcmp(argv[0], "become-user") == 0 && argc == 1)
        return become("") == 0 ? EXECUTION_SUCCESS : fail("switching to the sandbox's user");
    if (strcmp(argv[0], "attach") == 0 && argc == 2)
        return attach(argv[1]);
    if (strcmp(argv[0], "request") == 0 && argc == 1)
        return request();
    if (strcmp(argv[0], "respond") == 0 && argc == 2)
        return respond((int32_t)strtol(argv[1], NULL, 10), io_fds + 1);
    if (strcmp(argv[0], "reap") == 0 && argc == 3)
        return reap((int32_t)strtol(argv[1], NULL, 10), argv[2]);
    return EX_USAGE;
}

static char *const zeroboot_doc[] = {
    "Moves zeroboot requests and results between the mailbox and files.",
    NULL,
};

struct builtin zeroboot_struct = {
    "zeroboot", zeroboot_builtin, BUILTIN_ENABLED, zeroboot_doc, "zeroboot boot|ready|prefault|hugify|become-user|attach DIR|request|respond STATUS|reap STATUS DIR",
    NULL,
};
