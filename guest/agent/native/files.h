/*
 * File operations for the host's files API, served by the agents' native
 * halves (never by the runtime: no user namespace is touched, and every
 * runtime behaves the same). The wire format is defined in
 * crates/protocol/src/files.rs; its constants reach us as ZB_FILE_* in
 * zeroboot_mailbox.h.
 *
 * File data on the sandbox's disk never passes through this code or the
 * guest kernel's copy loops: for a write the agent has ext4 allocate the
 * blocks (one DAX fault per 2 MiB, zeroed by the host through patch 0007),
 * and for a read it only looks them up; either way it answers with the
 * blocks' places on the disk, and the host moves the bytes in guest memory
 * itself. Files elsewhere (/tmp, the root image) go through the mailbox,
 * a chunk per request.
 *
 * The same channel carries the port tunnel (ports.h).
 */
#ifndef ZEROBOOT_FILES_H
#define ZEROBOOT_FILES_H

#include <dirent.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <limits.h>

#include "guest.h"

struct zb_file_request {
    uint32_t op, uid;
    uint64_t offset, length;
    uint32_t flags;
    char path[PATH_MAX], target[PATH_MAX];
    const uint8_t *data;
    uint32_t data_len;
};

/* The reply being written into the mailbox's response area. */
struct zb_reply {
    uint8_t *at;
    uint32_t len, cap;
    char message[512];
};

static inline int zb_reply_put(struct zb_reply *r, const void *bytes, size_t n)
{
    if (n > r->cap - r->len)
        return -1;
    memcpy(r->at + r->len, bytes, n);
    r->len += (uint32_t)n;
    return 0;
}

static inline int zb_reply_u32(struct zb_reply *r, uint32_t v) { return zb_reply_put(r, &v, 4); }
static inline int zb_reply_u64(struct zb_reply *r, uint64_t v) { return zb_reply_put(r, &v, 8); }

#include "ports.h"

/* Records errno's message for `what` and returns errno. */
static inline int zb_file_error(struct zb_reply *r, const char *what, const char *path)
{
    int e = errno ? errno : EIO;
    snprintf(r->message, sizeof r->message, "%s %s: %s", what, path, strerror(e));
    return e;
}

static inline uint8_t zb_entry_kind(mode_t mode)
{
    if (S_ISREG(mode))
        return ZB_FILE_KIND_FILE;
    if (S_ISDIR(mode))
        return ZB_FILE_KIND_DIR;
    if (S_ISLNK(mode))
        return ZB_FILE_KIND_SYMLINK;
    return ZB_FILE_KIND_OTHER;
}

/* One entry: kind u8, 3 bytes of padding, mode u32, size u64, mtime in ns
 * i64, name length u32, the name. -1 when the reply has no room. */
static inline int zb_reply_entry(struct zb_reply *r, const char *name, const struct stat *st)
{
    uint32_t name_len = (uint32_t)strlen(name);
    if ((uint64_t)ZB_FILE_ENTRY_HEADER + name_len > r->cap - r->len)
        return -1;
    uint8_t head[ZB_FILE_ENTRY_HEADER] = {0};
    head[0] = zb_entry_kind(st->st_mode);
    uint32_t mode = (uint32_t)st->st_mode & 07777;
    uint64_t size = (uint64_t)st->st_size;
    int64_t mtime = (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
    memcpy(head + 4, &mode, 4);
    memcpy(head + 8, &size, 8);
    memcpy(head + 16, &mtime, 8);
    memcpy(head + 24, &name_len, 4);
    zb_reply_put(r, head, sizeof head);
    return zb_reply_put(r, name, name_len);
}

/* mkdir -p of `path`'s parent directories (and of `path` when `self`). */
static inline int zb_make_parents(char *path, int self)
{
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        int ok = mkdir(path, 0755) == 0 || errno == EEXIST;
        *p = '/';
        if (!ok)
            return -1;
    }
    if (self && mkdir(path, 0755) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

/* rm -r below directory fd `dir` (closed here). */
static inline int zb_remove_tree(int dir)
{
    DIR *d = fdopendir(dir);
    if (d == NULL) {
        close(dir);
        return -1;
    }
    int failed = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (e->d_type == DT_DIR) {
            int sub = openat(dirfd(d), e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (sub < 0 || zb_remove_tree(sub) != 0 || unlinkat(dirfd(d), e->d_name, AT_REMOVEDIR) != 0)
                failed = 1;
        } else if (unlinkat(dirfd(d), e->d_name, 0) != 0) {
            failed = 1;
        }
    }
    closedir(d);
    return failed ? -1 : 0;
}

/* Whether `fd` is a file on the sandbox's disk, where the host can reach
 * its blocks. */
static inline int zb_on_disk(int fd)
{
    struct stat file, disk;
    return fstat(fd, &file) == 0 && stat(ZB_DISK_DEVICE, &disk) == 0 && S_ISBLK(disk.st_mode) &&
           file.st_dev == disk.st_rdev;
}

/* Calls `each` for every extent of `fd` in [start, end), in order; stops
 * early when it returns nonzero (and returns that). */
static inline int zb_each_extent(int fd, uint64_t start, uint64_t end,
                                 int (*each)(const struct fiemap_extent *, void *), void *arg)
{
    enum { COUNT = 256 };
    struct fiemap *map = calloc(1, sizeof *map + COUNT * sizeof(struct fiemap_extent));
    if (map == NULL)
        return -1;
    int rc = 0;
    uint64_t at = start;
    while (at < end && rc == 0) {
        memset(map, 0, sizeof *map);
        map->fm_start = at;
        map->fm_length = end - at;
        map->fm_extent_count = COUNT;
        if (ioctl(fd, FS_IOC_FIEMAP, map) != 0) {
            rc = -1;
            break;
        }
        if (map->fm_mapped_extents == 0)
            break;
        int last = 0;
        for (uint32_t i = 0; i < map->fm_mapped_extents && rc == 0; i++) {
            const struct fiemap_extent *x = &map->fm_extents[i];
            rc = each(x, arg);
            at = x->fe_logical + x->fe_length;
            last = (x->fe_flags & FIEMAP_EXTENT_LAST) != 0;
        }
        if (last)
            break;
    }
    free(map);
    return rc;
}

/* Flags of an extent whose bytes lie, as they are, at fe_physical. */
#define ZB_PLAIN_EXTENT (FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_MERGED | FIEMAP_EXTENT_SHARED)

struct zb_map_walk {
    struct zb_reply *reply;
    uint64_t start, end;
    uint64_t covered;     /* [start, covered) is written data so far */
    uint32_t count;       /* extents put in the reply */
    int unusable;         /* an extent the host cannot reach */
    char *mapping;        /* WRITE_MAP: the file mapped at map_offset */
    uint64_t map_offset;
    uint32_t touched;     /* WRITE_MAP: pages faulted in this pass */
};

/* Faults in [from, to) of the mapping page by page (a write fault that
 * keeps the bytes), so that ext4 allocates it as written blocks. */
static inline void zb_touch(struct zb_map_walk *w, uint64_t from, uint64_t to)
{
    for (uint64_t at = from & ~4095ull; at < to; at += 4096) {
        __atomic_fetch_or((uint8_t *)(w->mapping + (at - w->map_offset)), 0, __ATOMIC_RELAXED);
        w->touched++;
    }
}

static inline int zb_map_extent(const struct fiemap_extent *x, void *arg)
{
    struct zb_map_walk *w = arg;
    uint64_t from = x->fe_logical > w->start ? x->fe_logical : w->start;
    uint64_t to = x->fe_logical + x->fe_length < w->end ? x->fe_logical + x->fe_length : w->end;
    if (from >= to)
        return 0;
    int written = (x->fe_flags & FIEMAP_EXTENT_UNWRITTEN) == 0;
    int plain = (x->fe_flags & ~(uint32_t)(ZB_PLAIN_EXTENT | FIEMAP_EXTENT_UNWRITTEN)) == 0;
    if (!plain) {
        w->unusable = 1;
        return 0;
    }
    if (w->mapping != NULL) {
        /* A hole before this extent, or the extent itself if unwritten. */
        if (from > w->covered)
            zb_touch(w, w->covered, from);
        if (!written)
            zb_touch(w, from, to);
    }
    if (written && w->reply != NULL) {
        uint8_t rec[ZB_FILE_EXTENT_LEN] = {0};
        uint64_t physical = x->fe_physical + (from - x->fe_logical), length = to - from;
        memcpy(rec, &from, 8);
        memcpy(rec + 8, &physical, 8);
        memcpy(rec + 16, &length, 8);
        if (zb_reply_put(w->reply, rec, sizeof rec) != 0) {
            errno = EFBIG;
            return -1;
        }
        w->count++;
    }
    w->covered = to;
    return 0;
}

/* The reply of READ_MAP and WRITE_MAP: file size u64, extent count u32,
 * 4 bytes of padding, then the extents (logical u64, physical u64 from the
 * disk's start, length u64, 8 bytes of padding) of written data in
 * [start, end). Ranges without one read as zeros. */
static inline int zb_reply_map(struct zb_reply *r, int fd, uint64_t start, uint64_t end, const char *path)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return zb_file_error(r, "stat", path);
    uint8_t *head = r->at + r->len;
    if (zb_reply_u64(r, (uint64_t)st.st_size) != 0 || zb_reply_u64(r, 0) != 0) {
        errno = EFBIG;
        return zb_file_error(r, "map", path);
    }
    if (end > (uint64_t)st.st_size)
        end = (uint64_t)st.st_size;
    struct zb_map_walk w = {.reply = r, .start = start, .end = end, .covered = start};
    if (start < end && zb_each_extent(fd, start, end, zb_map_extent, &w) != 0)
        return zb_file_error(r, "map", path);
    if (w.unusable) {
        errno = EXDEV;
        return zb_file_error(r, "map", path);
    }
    memcpy(head + 8, &w.count, 4);
    return 0;
}

/* WRITE_MAP: makes [offset, offset + length) of the file written blocks on
 * the disk and answers where they are. The file's size becomes at least
 * offset + length rounded up to 2 MiB, so that every 2 MiB of it can be
 * one DAX fault; SET_SIZE gives it its real size afterwards. */
static inline int zb_write_map(struct zb_reply *r, const struct zb_file_request *q)
{
    if ((q->flags & ZB_FILE_PARENTS) && zb_make_parents((char *)q->path, 0) != 0)
        return zb_file_error(r, "mkdir", q->path);
    int fd = open(q->path, O_RDWR | O_CREAT | O_CLOEXEC | ((q->flags & ZB_FILE_TRUNCATE) ? O_TRUNC : 0), 0644);
    if (fd < 0)
        return zb_file_error(r, "open", q->path);
    int rc = 0;
    char *reserved = MAP_FAILED;
    size_t span = 0;
    uint64_t end = q->offset + q->length;
    uint64_t map_offset = q->offset & ~(ZB_HUGE - 1);
    uint64_t alloc_end = (end + ZB_HUGE - 1) & ~(ZB_HUGE - 1);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = zb_file_error(r, "stat", q->path);
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        errno = EISDIR;
        rc = zb_file_error(r, "open", q->path);
        goto out;
    }
    if (!zb_on_disk(fd)) {
        errno = EXDEV;
        rc = zb_file_error(r, "map", q->path);
        goto out;
    }
    if (q->length == 0 || end < q->offset) {
        rc = zb_reply_map(r, fd, q->offset, q->offset, q->path);
        goto out;
    }
    if ((uint64_t)st.st_size > alloc_end)
        alloc_end = end;
    /* Reserve the blocks first: a full disk fails here, before any data. */
    if (fallocate(fd, 0, (off_t)q->offset, (off_t)(alloc_end - q->offset)) != 0) {
        if (errno != ENOSPC || fallocate(fd, 0, (off_t)q->offset, (off_t)q->length) != 0) {
            rc = zb_file_error(r, "allocate", q->path);
            goto out;
        }
        alloc_end = end;
    }
    span = (size_t)(((alloc_end - map_offset) + ZB_HUGE - 1) & ~(ZB_HUGE - 1));
    reserved = zb_mmap_aligned(span, PROT_NONE);
    if (reserved == MAP_FAILED ||
        mmap(reserved, (size_t)(alloc_end - map_offset), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
             (off_t)map_offset) == MAP_FAILED) {
        rc = zb_file_error(r, "mmap", q->path);
        goto out;
    }
    /* One write fault per 2 MiB: ext4 converts a whole aligned 2 MiB
     * extent and DAX maps it with one entry. Where it cannot, the walk
     * below finds what is still unwritten and faults it page by page. */
    struct zb_map_walk w = {.start = q->offset, .end = end, .mapping = reserved, .map_offset = map_offset};
    for (uint64_t at = map_offset; at < end; at += ZB_HUGE)
        __atomic_fetch_or((uint8_t *)(reserved + (at - map_offset)), 0, __ATOMIC_RELAXED);
    for (int pass = 0; pass < 3; pass++) {
        w.covered = q->offset;
        w.touched = 0;
        if (zb_each_extent(fd, q->offset, end, zb_map_extent, &w) != 0) {
            rc = zb_file_error(r, "map", q->path);
            goto out;
        }
        if (w.covered < end)
            zb_touch(&w, w.covered, end);
        if (w.touched == 0)
            break;
    }
    if (w.unusable || w.touched != 0) {
        errno = EIO;
        rc = zb_file_error(r, "allocate", q->path);
        goto out;
    }
    rc = zb_reply_map(r, fd, q->offset, end, q->path);
out:
    if (reserved != MAP_FAILED)
        munmap(reserved, span);
    close(fd);
    return rc;
}

/* One file operation from the mailbox: runs it as the request's user and
 * writes the reply (exit code 0 or an errno value; stdout the reply;
 * stderr a message). */
static inline int zb_file_run(struct zb_reply *r, const struct zb_file_request *q)
{
    struct stat st;
    switch (q->op) {
    case ZB_FILE_STAT:
        if (lstat(q->path, &st) != 0)
            return zb_file_error(r, "stat", q->path);
        {
            const char *slash = strrchr(q->path, '/');
            zb_reply_entry(r, slash && slash[1] ? slash + 1 : q->path, &st);
        }
        return 0;
    case ZB_FILE_LIST: {
        int dir = open(q->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        DIR *d = dir < 0 ? NULL : fdopendir(dir);
        if (d == NULL) {
            int rc = zb_file_error(r, "list", q->path);
            if (dir >= 0)
                close(dir);
            return rc;
        }
        /* u32: 1 if entries after these remain (ask again from offset +
         * the count), then the entries. */
        uint8_t *more = r->at + r->len;
        zb_reply_u32(r, 0);
        uint64_t index = 0;
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            if (index++ < q->offset)
                continue;
            if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
                continue;
            if (zb_reply_entry(r, e->d_name, &st) != 0) {
                uint32_t one = 1;
                memcpy(more, &one, 4);
                break;
            }
        }
        closedir(d);
        return 0;
    }
    case ZB_FILE_MAKE_DIR:
        if (q->flags & ZB_FILE_PARENTS) {
            if (zb_make_parents((char *)q->path, 1) != 0)
                return zb_file_error(r, "mkdir", q->path);
            if (stat(q->path, &st) != 0 || !S_ISDIR(st.st_mode)) {
                errno = ENOTDIR;
                return zb_file_error(r, "mkdir", q->path);
            }
        } else if (mkdir(q->path, 0755) != 0) {
            return zb_file_error(r, "mkdir", q->path);
        }
        return 0;
    case ZB_FILE_REMOVE:
        if (lstat(q->path, &st) != 0)
            return zb_file_error(r, "remove", q->path);
        if (S_ISDIR(st.st_mode)) {
            if (q->flags & ZB_FILE_RECURSIVE) {
                int dir = open(q->path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                if (dir < 0 || zb_remove_tree(dir) != 0)
                    return zb_file_error(r, "remove", q->path);
            }
            if (rmdir(q->path) != 0)
                return zb_file_error(r, "remove", q->path);
        } else if (unlink(q->path) != 0) {
            return zb_file_error(r, "remove", q->path);
        }
        return 0;
    case ZB_FILE_RENAME:
        if ((q->flags & ZB_FILE_PARENTS) && zb_make_parents((char *)q->target, 0) != 0)
            return zb_file_error(r, "mkdir", q->target);
        if (rename(q->path, q->target) != 0)
            return zb_file_error(r, "rename", q->path);
        return 0;
    case ZB_FILE_WRITE_MAP:
        return zb_write_map(r, q);
    case ZB_FILE_READ_MAP: {
        int fd = open(q->path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return zb_file_error(r, "open", q->path);
        int rc;
        if (fstat(fd, &st) != 0) {
            rc = zb_file_error(r, "stat", q->path);
        } else if (!S_ISREG(st.st_mode)) {
            errno = EISDIR;
            rc = zb_file_error(r, "open", q->path);
        } else if (!zb_on_disk(fd)) {
            errno = EXDEV;
            rc = zb_file_error(r, "map", q->path);
        } else {
            uint64_t end = q->offset + q->length < q->offset ? UINT64_MAX : q->offset + q->length;
            rc = zb_reply_map(r, fd, q->offset, end, q->path);
        }
        close(fd);
        return rc;
    }
    case ZB_FILE_SET_SIZE: {
        int fd = open(q->path, O_WRONLY | O_CLOEXEC);
        if (fd < 0)
            return zb_file_error(r, "open", q->path);
        int rc = ftruncate(fd, (off_t)q->length) == 0 ? 0 : zb_file_error(r, "truncate", q->path);
        close(fd);
        return rc;
    }
    case ZB_FILE_WRITE_DATA: {
        if ((q->flags & ZB_FILE_PARENTS) && zb_make_parents((char *)q->path, 0) != 0)
            return zb_file_error(r, "mkdir", q->path);
        int fd = open(q->path, O_WRONLY | O_CREAT | O_CLOEXEC | ((q->flags & ZB_FILE_TRUNCATE) ? O_TRUNC : 0), 0644);
        if (fd < 0)
            return zb_file_error(r, "open", q->path);
        int rc = 0;
        for (uint32_t done = 0; done < q->data_len && rc == 0;) {
            ssize_t n = pwrite(fd, q->data + done, q->data_len - done, (off_t)(q->offset + done));
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                rc = zb_file_error(r, "write", q->path);
            else
                done += (uint32_t)n;
        }
        close(fd);
        return rc;
    }
    case ZB_FILE_READ_DATA: {
        /* The file's size u64, then its bytes from offset, as many as fit. */
        int fd = open(q->path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return zb_file_error(r, "open", q->path);
        int rc = 0;
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
            if (errno == 0 || S_ISDIR(st.st_mode))
                errno = EISDIR;
            rc = zb_file_error(r, "read", q->path);
        } else {
            zb_reply_u64(r, (uint64_t)st.st_size);
            uint64_t want = q->length < r->cap - r->len ? q->length : r->cap - r->len;
            while (want > 0) {
                ssize_t n = pread(fd, r->at + r->len, want, (off_t)q->offset);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n < 0)
                    rc = zb_file_error(r, "read", q->path);
                if (n > 0)
                    r->len += (uint32_t)n;
                break;
            }
        }
        close(fd);
        return rc;
    }
    default:
        errno = EINVAL;
        return zb_file_error(r, "file operation on", q->path);
    }
}

/* Reads the request in the mailbox; EINVAL for a malformed one. */
static inline int zb_file_parse(volatile uint8_t *mailbox, struct zb_file_request *q)
{
    uint32_t code_len = zb_get32(mailbox, ZB_H_CODE_LEN);
    uint32_t stdin_len = zb_get32(mailbox, ZB_H_STDIN_LEN);
    if ((uint64_t)ZB_REQUEST_OFFSET + code_len + stdin_len > ZB_RESPONSE_OFFSET || code_len < ZB_FILE_REQUEST_HEADER)
        return EINVAL;
    const uint8_t *at = (const uint8_t *)mailbox + ZB_REQUEST_OFFSET;
    uint32_t path_len, target_len;
    memcpy(&q->op, at, 4);
    memcpy(&q->uid, at + 4, 4);
    memcpy(&q->offset, at + 8, 8);
    memcpy(&q->length, at + 16, 8);
    memcpy(&q->flags, at + 24, 4);
    memcpy(&path_len, at + 28, 4);
    memcpy(&target_len, at + 32, 4);
    if (path_len >= PATH_MAX || target_len >= PATH_MAX ||
        (uint64_t)ZB_FILE_REQUEST_HEADER + path_len + target_len != code_len)
        return EINVAL;
    memcpy(q->path, at + ZB_FILE_REQUEST_HEADER, path_len);
    q->path[path_len] = 0;
    memcpy(q->target, at + ZB_FILE_REQUEST_HEADER + path_len, target_len);
    q->target[target_len] = 0;
    if (strlen(q->path) != path_len || strlen(q->target) != target_len ||
        (q->path[0] != '/' && !zb_is_port_op(q->op)) ||
        (q->uid != 0 && q->uid != ZB_USER_UID))
        return EINVAL;
    q->data = at + code_len;
    q->data_len = stdin_len;
    return 0;
}

/* Serves file operations while the mailbox holds one, ringing the doorbell
 * after each; returns when the request there is code. */
static inline void zb_serve_file_ops(volatile uint8_t *mailbox, volatile uint8_t *doorbell)
{
    static struct zb_file_request q;
    while (zb_get32(mailbox, ZB_H_REQUEST_FLAGS) & ZB_REQUEST_FILE_OP) {
        struct zb_reply r = {.at = (uint8_t *)mailbox + ZB_RESPONSE_OFFSET, .cap = ZB_RESPONSE_CAPACITY};
        uint32_t seq = zb_get32(mailbox, ZB_H_REQUEST_SEQ);
        int rc = zb_file_parse(mailbox, &q);
        if (rc != 0) {
            snprintf(r.message, sizeof r.message, "malformed file operation");
        } else {
            uid_t before = geteuid();
            if (zb_switch_user(q.uid) != 0) {
                rc = zb_file_error(&r, "become uid for", q.path);
            } else {
                errno = 0;
                rc = zb_is_port_op(q.op) ? zb_port_run(&r, &q) : zb_file_run(&r, &q);
                if (rc != 0)
                    r.len = 0;
            }
            zb_switch_user((uint32_t)before);
        }
        uint32_t message_len = rc ? (uint32_t)strlen(r.message) : 0;
        if (message_len > r.cap - r.len)
            message_len = r.cap - r.len;
        memcpy(r.at + r.len, r.message, message_len);
        zb_ring_result(mailbox, doorbell, seq, ZB_RESPONSE_OFFSET, rc, r.len, message_len, 0, 0);
    }
}

#endif
