/*
 * The port tunnel behind the host's /v1/sandboxes/{id}/ports/{port}: TCP
 * connections from the agent to a port on the guest's loopback, driven by
 * the host one exchange at a time. The guest runs only while the host
 * calls it, so each exchange sends what the client sent and then waits, a
 * bounded time, for what the server in the guest answers; meanwhile that
 * server runs. Served on the file operations' channel (files.h includes
 * this after its request and reply types); the wire format is in
 * crates/protocol/src/files.rs.
 */
#ifndef ZEROBOOT_PORTS_H
#define ZEROBOOT_PORTS_H

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

/* Connections open at once; a handle is an index here. */
#define ZB_PORT_SLOTS 64
/* How long a connect or a send may take before it is an error. */
#define ZB_PORT_IO_MS 10000

/* Descriptor + 1 of each connection; 0: free. */
static int zb_port_fds[ZB_PORT_SLOTS];

static inline int zb_is_port_op(uint32_t op)
{
    return op == ZB_FILE_PORT_CONNECT || op == ZB_FILE_PORT_EXCHANGE || op == ZB_FILE_PORT_CLOSE;
}

static inline int zb_port_error(struct zb_reply *r, const char *what, uint64_t which)
{
    int e = errno ? errno : EIO;
    snprintf(r->message, sizeof r->message, "%s %llu: %s", what, (unsigned long long)which, strerror(e));
    return e;
}

/* Waits up to `ms` for `events` on `fd`: 1 ready, 0 timed out, -1 error. */
static inline int zb_port_wait(int fd, short events, int ms)
{
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        int n = poll(&p, 1, ms);
        if (n < 0 && errno == EINTR)
            continue;
        return n < 0 ? -1 : n;
    }
}

static inline int zb_port_connect(struct zb_reply *r, uint64_t port)
{
    if (port == 0 || port > 65535) {
        errno = EINVAL;
        return zb_port_error(r, "connect to port", port);
    }
    int slot = 0;
    while (slot < ZB_PORT_SLOTS && zb_port_fds[slot] != 0)
        slot++;
    if (slot == ZB_PORT_SLOTS) {
        errno = EMFILE;
        return zb_port_error(r, "connect to port", port);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return zb_port_error(r, "socket for port", port);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&to, sizeof to) != 0) {
        int failed = errno != EINPROGRESS;
        if (!failed) {
            int error = 0;
            socklen_t len = sizeof error;
            if (zb_port_wait(fd, POLLOUT, ZB_PORT_IO_MS) != 1) {
                errno = ETIMEDOUT;
                failed = 1;
            } else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0 || error != 0) {
                errno = error ? error : errno;
                failed = 1;
            }
        }
        if (failed) {
            int rc = zb_port_error(r, "connect to port", port);
            close(fd);
            return rc;
        }
    }
    zb_port_fds[slot] = fd + 1;
    return zb_reply_u32(r, (uint32_t)slot) == 0 ? 0 : EIO;
}

/* Sends the request's data, waits up to `wait_ms` for an answer, and
 * replies u32 (1 once the server closed its side), then what it read, at
 * most `want` bytes. */
static inline int zb_port_exchange(struct zb_reply *r, const struct zb_file_request *q)
{
    uint64_t slot = q->offset;
    if (slot >= ZB_PORT_SLOTS || zb_port_fds[slot] == 0) {
        errno = EBADF;
        return zb_port_error(r, "connection", slot);
    }
    int fd = zb_port_fds[slot] - 1;
    for (uint32_t done = 0; done < q->data_len;) {
        ssize_t n = send(fd, q->data + done, q->data_len - done, MSG_NOSIGNAL);
        if (n > 0) {
            done += (uint32_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            if (zb_port_wait(fd, POLLOUT, ZB_PORT_IO_MS) != 1) {
                errno = ETIMEDOUT;
                return zb_port_error(r, "send on connection", slot);
            }
        } else {
            return zb_port_error(r, "send on connection", slot);
        }
    }
    uint32_t closed = 0;
    uint32_t at = r->len;
    if (zb_reply_u32(r, 0) != 0)
        return EIO;
    uint64_t room = r->cap - r->len;
    uint64_t want = q->length < room ? q->length : room;
    int ms = q->flags > 60000 ? 60000 : (int)q->flags;
    if (zb_port_wait(fd, POLLIN, ms) < 0)
        return zb_port_error(r, "wait on connection", slot);
    while (want > 0) {
        ssize_t n = recv(fd, r->at + r->len, want, 0);
        if (n > 0) {
            r->len += (uint32_t)n;
            want -= (uint64_t)n;
        } else if (n == 0) {
            closed = 1;
            break;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN) {
            break;
        } else if (errno == ECONNRESET) {
            closed = 1;
            break;
        } else {
            return zb_port_error(r, "receive on connection", slot);
        }
    }
    memcpy(r->at + at, &closed, 4);
    return 0;
}

static inline int zb_port_run(struct zb_reply *r, const struct zb_file_request *q)
{
    switch (q->op) {
    case ZB_FILE_PORT_CONNECT:
        return zb_port_connect(r, q->offset);
    case ZB_FILE_PORT_EXCHANGE:
        return zb_port_exchange(r, q);
    default:
        if (q->offset < ZB_PORT_SLOTS && zb_port_fds[q->offset] != 0) {
            close(zb_port_fds[q->offset] - 1);
            zb_port_fds[q->offset] = 0;
        }
        return 0;
    }
}

#endif
