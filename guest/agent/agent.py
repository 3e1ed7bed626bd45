#!/usr/bin/python3 -I
"""zeroboot guest agent: PID 1 of every zeroboot guest.

Boot: mount the kernel filesystems, seed the CRNG with entropy the host left in
the mailbox, import and warm up numpy and the stdlib, fault in a heap, then
ring the READY doorbell. The host snapshots the VM at that store.

Every fork resumes right after that store, with a request already in the
mailbox. The agent runs it with output captured in memory, writes the response
into the mailbox and rings RESULT. The mailbox layout is defined in
crates/protocol/src/lib.rs; zeroboot generates its constants into
zeroboot_mailbox.py, next to this file.
"""

import io
import os
import struct
import sys
import time

T0 = time.monotonic()

# --- mailbox layout ----------------------------------------------------------
# Generated from crates/protocol by zeroboot and installed next to this file.
# `python3 -I` leaves this directory off sys.path; it is put there only for
# this import, so the requests' code sees the sys.path it always saw.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from zeroboot_mailbox import (
        BOOT_SEED_LEN,
        DOORBELL_READY,
        DOORBELL_RESULT,
        ENTROPY_ENTRY_LEN,
        FLAG_MORE,
        FLAG_RESULTS_TRUNCATED,
        FLAG_STDERR_TRUNCATED,
        FLAG_STDOUT_TRUNCATED,
        FRESH_ENTRY_LEN,
        H_BOOT_SEED,
        H_CODE_LEN,
        H_CONTEXT_LEN,
        H_ENTROPY_COUNT,
        H_ENTROPY_TABLE,
        H_EXIT_CODE,
        H_FRESH_COUNT,
        H_FRESH_TABLE,
        H_MAGIC,
        H_OUTPUT_LIMIT,
        H_REQUEST_FLAGS,
        H_REQUEST_SEED,
        H_REQUEST_SEQ,
        H_RESPONSE_AT,
        H_RESPONSE_FLAGS,
        H_RESPONSE_SEQ,
        H_RESULTS_LEN,
        H_STDERR_LEN,
        H_STDIN_LEN,
        H_STDOUT_LEN,
        MAGIC,
        MAILBOX_SIZE,
        MAX_ENTROPY_REGIONS,
        MAX_FRESH_RUNS,
        DEFAULT_OUTPUT_LIMIT,
        MAX_OUTPUT_LIMIT,
        REQUEST_FILE_OP,
        REQUEST_FRESH_FORK,
        REQUEST_OFFSET,
        REQUEST_SEED_LEN,
        REQUEST_STREAM,
        RESPONSE_CAPACITY,
        RESPONSE_OFFSET,
        VERSION,
    )
finally:
    del sys.path[0]


def log(msg):
    # sys.__stdout__: from set_up_exec_path on, sys.stdout is PLAIN_OUT.
    print(f"zeroboot-agent: [{time.monotonic() - T0:7.2f}s] {msg}", file=sys.__stdout__, flush=True)


def mount_kernel_filesystems():
    import ctypes

    failed = native_library().zeroboot_mount_kernel_filesystems()
    if failed:
        log(f"{failed} mounts failed")
    return ctypes.CDLL(None, use_errno=True)


def kernel_args():
    with open("/proc/cmdline") as f:
        args = {}
        for word in f.read().split():
            key, _, value = word.partition("=")
            args[key] = value
        return args


def native_library():
    """The agent's native half (native/zeroboot_python.c)."""
    import ctypes

    global NATIVE
    if NATIVE is None:
        NATIVE = ctypes.CDLL("/zeroboot/zeroboot_python.so", use_errno=True)
        NATIVE.zeroboot_map_physical.restype = ctypes.c_void_p
        NATIVE.zeroboot_map_physical.argtypes = [ctypes.c_uint64, ctypes.c_size_t]
        NATIVE.zeroboot_capture_child_output.argtypes = [ctypes.POINTER(ctypes.c_int)]
        NATIVE.zeroboot_switch_user.argtypes = [ctypes.c_uint32]
        NATIVE.zeroboot_serve_file_ops.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        NATIVE.zeroboot_map_fresh_heap.argtypes = [
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
    return NATIVE


NATIVE = None


def map_mailbox(args):
    """The mailbox and the doorbell, as writable memoryviews over /dev/mem,
    each in 2 MiB ranges of its own (zb_map_physical)."""
    import ctypes

    native = native_library()
    addresses = []

    def physical(gpa, size):
        address = native.zeroboot_map_physical(gpa, size)
        if not address:
            raise OSError(ctypes.get_errno(), f"mapping {size} bytes of /dev/mem at {gpa:#x}")
        addresses.append(address)
        return memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")

    mailbox_gpa = int(args["zeroboot.mailbox"], 0)
    doorbell_gpa = int(args["zeroboot.doorbell"], 0)
    mailbox, doorbell = physical(mailbox_gpa, MAILBOX_SIZE), physical(doorbell_gpa, 4096)
    global FILE_OPS_ARGS
    FILE_OPS_ARGS = tuple(addresses)
    return mailbox, doorbell


# The mailbox's and the doorbell's addresses, for the native half's file
# operations (files.h), which the files API sends between code requests.
FILE_OPS_ARGS = None


def seed_entropy(mailbox):
    import fcntl
    import struct

    seed = bytes(mailbox[H_BOOT_SEED : H_BOOT_SEED + BOOT_SEED_LEN])
    RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
    with open("/dev/urandom", "wb") as f:
        fcntl.ioctl(f, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
    # The bytes are credited now; nobody else needs them.
    mailbox[H_BOOT_SEED : H_BOOT_SEED + BOOT_SEED_LEN] = bytes(BOOT_SEED_LEN)


# Imported before the snapshot, so forks find them in sys.modules. An import
# in a fork reads files through the guest kernel: hundreds of milliseconds
# where guest kernel mode is emulated (`import uuid` took 0.7 s).
PRELOADED_MODULES = (
    "abc argparse array base64 bisect calendar collections collections.abc contextlib copy csv "
    "dataclasses datetime decimal enum fractions functools glob hashlib heapq hmac html io "
    "itertools json locale math operator os.path pathlib pickle pprint queue random re secrets "
    "shlex shutil signal socket statistics string struct subprocess tempfile textwrap threading "
    "time timeit traceback types typing unicodedata urllib.parse uuid warnings weakref zlib "
    # What code that talks to the network imports (email.message alone took
    # 2-3 s in a fork): urllib.request pulls in http.client, email and ssl.
    "urllib.request http.server socketserver selectors"
).split()


def read_config():
    """The template spec's part for the agent (/zeroboot/config.json, written
    by zeroboot from the spec): preload, warmup and env."""
    import json

    try:
        with open("/zeroboot/config.json") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        log(f"no template config ({e!r}): defaults")
        return {}


# Who code runs as unless a request says (zb_switch_user in native/guest.h,
# which keeps 0 as the saved user ID so that a request can ask for root),
# and the environment each user gets.
USER_UID = 1000
USER_HOME = "/home/user"
USERS = {b"user": (USER_UID, USER_HOME, "user"), b"root": (0, "/root", "root")}
CURRENT_UID = 0


def switch_user(uid):
    """Runs this process as `uid` from now on; False, errno set, if not."""
    global CURRENT_UID
    if NATIVE.zeroboot_switch_user(uid) != 0:
        return False
    CURRENT_UID = uid
    return True


def warm_up(config):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    # The kernel starts init with HOME=/.
    _, home, name = USERS[b"user"]
    os.environ.update(HOME=home, USER=name, LOGNAME=name)
    os.chdir(home)
    os.environ.update(config.get("env") or {})
    import importlib

    for name in PRELOADED_MODULES + list(config.get("preload") or []):
        importlib.import_module(name)
    import collections
    import datetime
    import decimal
    import hashlib
    import itertools
    import json
    import math
    import random
    import re
    import secrets
    import statistics
    import uuid

    import numpy

    numpy.arange(4).sum()
    numpy.random.rand(3)
    numpy.random.default_rng().random()
    numpy.dot(numpy.ones((8, 8)), numpy.ones((8, 8)))
    json.loads(json.dumps({"a": [1, 2.5, "x"]}))
    math.sqrt(2)
    random.random()
    re.compile(r"\w+").findall("warm up")
    datetime.datetime.now().isoformat()
    collections.Counter("abc")
    list(itertools.permutations(range(3)))
    statistics.mean([1, 2, 3])
    decimal.Decimal(1) / decimal.Decimal(3)
    hashlib.sha256(b"warm").hexdigest()
    str(uuid.uuid4())
    secrets.token_hex(8)
    compile("print(1 + 1)", "<code>", "exec")
    warm_network()
    warmup = config.get("warmup") or ""
    if warmup:
        # The spec's own warm-up, in a namespace of its own; a failure here
        # fails the template build, which shows this console.
        exec(compile(warmup, "<template warmup>", "exec"), fresh_namespace())


def warm_network():
    """The guest kernel initializes its networking secrets and hash
    perturbations once, on the first connection (`net_get_random_once`),
    and then patches its own code to skip the check: under emulated kernel
    mode that first connection took 3.7-6 s in every fork. Made here, once,
    in the template, to the link's gateway (from the kernel's `ip=`
    argument, which the VMM sets): the host refuses it (no backend runs at
    boot), and the name below gets NXDOMAIN, which also loads the C
    library's resolver."""
    import socket

    fields = kernel_args().get("ip", "").split(":")
    if len(fields) < 3 or not fields[2]:
        return
    gateway = fields[2]
    for family, kind in ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET, socket.SOCK_DGRAM)):
        with socket.socket(family, kind) as s:
            s.settimeout(5)
            s.connect_ex((gateway, 9))
            if kind == socket.SOCK_DGRAM:
                try:
                    s.send(b"")
                except OSError:
                    pass
    try:
        socket.getaddrinfo("warm-up.zeroboot.invalid", 80)
    except OSError:
        pass


def prefault_heap(libc):
    # Keep freed memory in the process instead of returning it to the kernel,
    # then touch a heap's worth of small objects, so the exec path rarely
    # faults. Large allocations have the fresh heap (map_fresh_heap).
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)
    libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
    junk = [str(i) * 3 for i in range(100_000)]
    del junk


def immortalize_heap():
    """Makes every object alive now immortal, as pre-fork servers do: from
    CPython 3.12 on, reference counting never writes to an immortal object,
    so a fork that only reads the template's objects (modules, functions,
    code, numpy's types and tables) leaves their pages shared, and its
    guest touches and the host copies that much less. Nothing from the
    template is freed in a fork, which costs nothing in a sandbox that lives
    for a few calls. Returns how many objects, or 0 where the interpreter
    has no immortal objects (before 3.12) or counts references another way
    (free-threaded builds)."""
    import gc

    if not has_immortal_objects():
        return 0
    seen = set()
    stack = gc.get_objects()
    stack.append(sys.modules)
    code_type = type(immortalize_heap.__code__)
    type_dict = type.__dict__["__dict__"]
    # Made during the walk; kept alive until its end, so that no address
    # in `seen` is freed and reused meanwhile.
    made = []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
        # Code objects are not the collector's, so it lists nothing they
        # hold; their constants are what LOAD_CONST counts references to.
        if type(obj) is code_type:
            stack.append(obj.co_consts)
            stack.extend(obj.co_consts)
            stack.extend(obj.co_names)
        # A built-in type's dict (its methods and descriptors, which every
        # attribute lookup counts references to) is the interpreter's, not
        # the type's, so the collector does not list it either; a proxy of
        # it does.
        elif issubclass(type(obj), type):  # not isinstance: a proxy passes that
            made.append(type_dict.__get__(obj))
            stack.append(made[-1])
            stack.append(obj.__mro__)
    del stack
    make_immortal(seen)
    return len(seen)


def has_immortal_objects():
    """Whether this interpreter has immortal objects and counts references
    in ob_refcnt (CPython 3.12 on, not free-threaded)."""
    import sysconfig

    return sys.version_info >= (3, 12) and not sysconfig.get_config_var("Py_GIL_DISABLED")


def make_immortal(addresses):
    """Makes the objects at `addresses` immortal (see immortalize_heap),
    where has_immortal_objects()."""
    import ctypes

    if not has_immortal_objects():
        return

    # _Py_IMMORTAL_REFCNT on 64-bit builds of 3.12 and 3.13: Py_INCREF sees
    # the low 32 bits overflow and leaves them, Py_DECREF tests the sign.
    for address in addresses:
        ctypes.c_ssize_t.from_address(address).value = 0xFFFFFFFF


def fill_object_pools():
    """Leaves every size class of CPython's small-object allocator starting
    in an empty pool, so a fork's objects go one after the other into a few
    pages instead of into free blocks scattered over the template's arenas
    (zeroboot_fill_object_pools in native/zeroboot_python.c)."""
    import ctypes

    native = native_library()
    report = ctypes.create_string_buffer(256)
    # With the GIL held: it calls CPython's allocator.
    fill = ctypes.PyDLL(native._name).zeroboot_fill_object_pools
    fill.restype = ctypes.c_long
    taken = fill(report, len(report))
    log(f"object pools: {report.value.decode()}" + ("" if taken >= 0 else " (left as they were)"))
    native.zeroboot_take_free_chunks.restype = ctypes.c_long
    native.zeroboot_take_free_chunks(report, len(report))
    log(f"malloc: {report.value.decode()}")
    # Before the move onto huge pages and the fresh heap, like the fill:
    # part of the template's memory from here on.
    if native.zeroboot_reserve_fork_objects(report, len(report)) == 0:
        log(f"fork objects: {report.value.decode()}")
    else:
        log(f"fork objects: none ({report.value.decode()})")


def route_fork_objects():
    """From now on a fork's objects go into the region reserved for them
    (zb_objects_route in native/fork_objects.h)."""
    import ctypes

    report = ctypes.create_string_buffer(256)
    # With the GIL held: it wraps CPython's allocator.
    if ctypes.PyDLL(native_library()._name).zeroboot_route_fork_objects(report, len(report)) == 0:
        log(f"fork objects: {report.value.decode()}")
    else:
        log(f"fork objects: left to pymalloc ({report.value.decode()})")


def move_onto_huge_pages():
    """Moves the hot 2 MiB ranges of this process onto huge pages, so that a
    fork maps each with one shadow-paging fault instead of one per 4 KiB
    page (zb_hugify in native/guest.h)."""
    import ctypes

    report = ctypes.create_string_buffer(256)
    moved = native_library().zeroboot_hugify(report, len(report))
    if moved < 0:
        log(f"huge pages: {os.strerror(ctypes.get_errno())}")
    else:
        log(f"huge pages: {report.value.decode()}")


def map_fresh_heap(mailbox, config):
    """Maps the template's heap_mib ahead for the code's allocations and
    tells the host where it is (zb_map_fresh_heap in native/heap.h); from
    then on CPython's arenas come from it too. Needs root (pagemap)."""
    import ctypes

    mib = int(config.get("heap_mib") or 0)
    runs = (ctypes.c_uint64 * (2 * MAX_FRESH_RUNS))()
    report = ctypes.create_string_buffer(256)
    native = native_library()
    count = native.zeroboot_map_fresh_heap(mib << 20, runs, MAX_FRESH_RUNS, report, len(report))
    if count < 0:
        raise SystemExit(f"zeroboot-agent: fresh heap: {report.value.decode()}: {os.strerror(ctypes.get_errno())}")
    for i in range(count):
        struct.pack_into("<QQ", mailbox, H_FRESH_TABLE + FRESH_ENTRY_LEN * i, runs[2 * i], runs[2 * i + 1])
    struct.pack_into("<I", mailbox, H_FRESH_COUNT, count)
    # With the GIL held: this swaps CPython's allocator under it.
    ctypes.PyDLL(native._name).zeroboot_route_arenas()
    log(f"fresh heap: {report.value.decode()}")


# The native request loop (native/exec_path.h), a ctypes.PyDLL; None before
# CPython 3.12, where this file serves every request.
EXEC_PATH = None
# The stdout and stderr of every request the native loop serves itself. Made
# before the snapshot and reachable from here, so that they and what they
# hold between requests are the template's, immortal (immortalize_heap).
PLAIN_OUT = PLAIN_ERR = None
# The stdin of every plain request without one, for as long as no code reads,
# writes or closes it (zb_exec_untouched).
EMPTY_STDIN = None
# The room a capture is given for a request with the default limit: this
# object, immortal, so that a fork that replaces it frees nothing of the
# template's (zb_exec_reset).
DEFAULT_ROOM = DEFAULT_OUTPUT_LIMIT


def set_up_exec_path():
    """Gives the captures their C methods (native/captures.h) and, from
    CPython 3.12 on, sets up the native request loop, which serves plain
    requests without running the agent's Python code (native/exec_path.h)."""
    import ctypes

    global EXEC_PATH, PLAIN_OUT, PLAIN_ERR, EMPTY_STDIN
    # With the GIL held: these call CPython.
    native = ctypes.PyDLL(native_library()._name)
    if sys.version_info < (3, 12):
        native.zeroboot_install_captures.argtypes = [ctypes.py_object] * 3
        native.zeroboot_install_captures(CappedText, CappedBytes, CHILDREN)
        log("request path: python")
        return
    PLAIN_OUT, PLAIN_ERR = CappedText(0), CappedText(0)
    EMPTY_STDIN = io.StringIO()
    # An empty StringIO starts out accumulating, and while it does, every
    # getvalue() writes to it (zb_exec_untouched calls that in each fork);
    # a readline() makes it a string for good.
    EMPTY_STDIN.readline()
    native.zeroboot_exec_setup.argtypes = [ctypes.py_object, ctypes.py_object]
    native.zeroboot_exec_setup(globals(), io.StringIO)
    for name in ("zeroboot_exec_request", "zeroboot_exec_serve"):
        getattr(native, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.py_object] * 3
        getattr(native, name).restype = None
    EXEC_PATH = native
    # The streams between requests, as a plain request without stdin has
    # them: such a request then writes nothing to sys (zb_exec_run).
    sys.stdin, sys.stdout, sys.stderr = EMPTY_STDIN, PLAIN_OUT, PLAIN_ERR
    log("request path: native for plain requests")


# Requests rehearsed again last thing before READY (serve): CPython's type
# attribute cache then holds what a plain request looks up, not what the
# agent's last steps did (whose names may not be immortal, and a fork that
# replaced such an entry would free its name into the template's pools).
# The last has no output: it leaves the captures as a fork's first plain
# request with the default limit sets them, and that request then writes
# nothing to those it does not write to (zb_exec_reset).
PLAIN_REHEARSAL = (("6 * 7", 0), ("print(1+1)", 0), ("pass", 0))
# The rehearsal's requests: each path the native loop and agent.py take.
REHEARSAL = (
    ("print(1+1)", REQUEST_STREAM | REQUEST_FRESH_FORK),
    ("print(1+1)", 0),
    ("import numpy; print(numpy.random.rand(3))", 0),
    ("import sys; sys.exit(3)", REQUEST_STREAM),
    ("import sys; sys.exit(3)", 0),
    ("1/0", 0),
    ("6 * 7", 0),
    ("x = 6 * 7\nx", REQUEST_STREAM),
) + PLAIN_REHEARSAL


def rehearse_exec_path(requests=REHEARSAL):
    """Serves a few requests from a scratch mailbox, through the same code as
    real ones, so that every page of code and data that path uses is mapped
    before the snapshot. A page first touched in a fork costs a guest page
    fault, which the guest kernel handles (slowly, where its kernel mode is
    emulated)."""
    import ctypes

    scratch, bell = bytearray(MAILBOX_SIZE), bytearray(1)
    # Kept while the addresses are in use.
    arrays = [(ctypes.c_char * len(b)).from_buffer(b) for b in (scratch, bell)]
    addresses = [ctypes.addressof(a) for a in arrays]
    for seq, (code, flags) in enumerate(requests, 1):
        payload = code.encode()
        scratch[REQUEST_OFFSET : REQUEST_OFFSET + len(payload)] = payload
        struct.pack_into("<III", scratch, H_REQUEST_SEQ, seq, len(payload), 0)
        struct.pack_into("<II", scratch, H_OUTPUT_LIMIT, DEFAULT_OUTPUT_LIMIT, flags)
        scratch[H_REQUEST_SEED : H_REQUEST_SEED + REQUEST_SEED_LEN] = os.urandom(REQUEST_SEED_LEN)
        if EXEC_PATH is not None:
            EXEC_PATH.zeroboot_exec_request(*addresses, scratch, bell, fresh_namespace())
        else:
            handle_request(scratch, bell, fresh_namespace())
        if struct.unpack_from("<I", scratch, H_RESPONSE_SEQ)[0] != seq:
            raise SystemExit("zeroboot-agent: the rehearsal request got no response")


class Responder:
    """Sends one request's output to the host in mailbox-sized chunks, each
    stream capped at `limit` bytes. Every chunk but the last has FLAG_MORE;
    the host copies each out at its doorbell and resumes us."""

    def __init__(self, mailbox, doorbell, seq, limit):
        self.mailbox, self.doorbell, self.seq = mailbox, doorbell, seq
        self.left = [limit, limit]
        self.flags = 0

    def _cap(self, data, stream, truncated_flag):
        if len(data) > self.left[stream]:
            data = data[: self.left[stream]]
            self.flags |= truncated_flag
        self.left[stream] -= len(data)
        return memoryview(data)

    def send(self, out_bytes, err_bytes, exit_code=0, final=False, results=b""):
        """`results` is already within the limit (Results caps it)."""
        out_v = self._cap(out_bytes, 0, FLAG_STDOUT_TRUNCATED)
        err_v = self._cap(err_bytes, 1, FLAG_STDERR_TRUNCATED)
        res_v = memoryview(results)
        while True:
            o = out_v[:RESPONSE_CAPACITY]
            e = err_v[: RESPONSE_CAPACITY - len(o)]
            r = res_v[: RESPONSE_CAPACITY - len(o) - len(e)]
            out_v, err_v, res_v = out_v[len(o) :], err_v[len(e) :], res_v[len(r) :]
            last = not out_v and not err_v and not res_v
            if last and not final and not o and not e and not r:
                return
            self._ring(o, e, r, exit_code, self.flags | (0 if last and final else FLAG_MORE))
            if last:
                return

    def _ring(self, out_b, err_b, res_b, exit_code, flags):
        mailbox = self.mailbox
        mailbox[RESPONSE_OFFSET : RESPONSE_OFFSET + len(out_b)] = out_b
        err_at = RESPONSE_OFFSET + len(out_b)
        mailbox[err_at : err_at + len(err_b)] = err_b
        if res_b:
            res_at = err_at + len(err_b)
            mailbox[res_at : res_at + len(res_b)] = res_b
        I32.pack_into(mailbox, H_EXIT_CODE, exit_code)
        U32.pack_into(mailbox, H_STDOUT_LEN, len(out_b))
        U32.pack_into(mailbox, H_STDERR_LEN, len(err_b))
        U32.pack_into(mailbox, H_RESULTS_LEN, len(res_b))
        U32.pack_into(mailbox, H_RESPONSE_FLAGS, flags)
        U32.pack_into(mailbox, H_RESPONSE_AT, RESPONSE_OFFSET)
        U32.pack_into(mailbox, H_RESPONSE_SEQ, self.seq)
        # The host reads the chunk at this store; it resumes us for the
        # next chunk or, with a new request already written, for that.
        self.doorbell[0] = DOORBELL_RESULT


def drain_console():
    """Waits until the serial console has sent everything. Bytes still queued
    at the snapshot would be sent by every fork, costing it interrupts and exits."""
    import termios

    try:
        termios.tcdrain(sys.__stdout__.fileno())
    except (OSError, termios.error, ValueError):
        pass


class CappedBytes(io.RawIOBase):
    """Captured stdout or stderr, as bytes: what `sys.stdout.buffer` is.
    Keeps the first `limit` bytes and drops the rest, so code that prints
    without end fills neither the guest's memory nor the mailbox. `on_line`
    runs when a write completes a line or code flushes (streaming)."""

    def __init__(self, limit, on_line=None, lock=None):
        super().__init__()
        self.pending = []
        self.room = limit
        self.truncated = False
        self.on_line = on_line
        # The streamer's, shared with its flusher thread; None otherwise.
        self.lock = lock

    def writable(self):
        return True

    # write(b), keep(b) (what children wrote, without the rest of a write)
    # and take() (the bytes written since the last take) are C, given to
    # this class at start-up (native/captures.h): Python code run on every
    # write would write to its own code in every fork.

    def flush(self):
        if self.on_line is not None and self.pending:
            self.on_line()

    def close(self):
        # io's finalizer closes, and close flushes: a capture collected
        # after its request must not stream.
        self.on_line = None
        super().close()


class CappedText(io.TextIOBase):
    """Captured stdout or stderr as text, encoded to UTF-8 as it is written
    into its `buffer` (a CappedBytes), where code may also write bytes."""

    encoding = "utf-8"
    errors = "surrogateescape"

    def __init__(self, limit, on_line=None, lock=None):
        super().__init__()
        self.buffer = CappedBytes(limit, on_line, lock)

    def writable(self):
        return True

    # write(s) is C, as CappedBytes.write is.

    def flush(self):
        self.buffer.flush()

    @property
    def truncated(self):
        return self.buffer.truncated

    def take(self):
        """The bytes written since the last take."""
        return self.buffer.take()


class Streamer:
    """In stream mode, sends what was written when a line completes or code
    flushes, at most once per INTERVAL (each send is a VM exit). What that
    holds back, and what child processes write, a flusher thread sends
    within PROMPT, even while the code blocks (a sleep, a child, I/O). The
    first line goes at once, and the thread starts only when something is
    held back or a child starts, so a request that prints one line pays for
    neither."""

    INTERVAL = 0.005
    PROMPT = 0.02

    def __init__(self, responder):
        import threading

        self.responder = responder
        self.out = self.err = None
        self.last = float("-inf")
        # The main thread and the flusher both take the captures and ring
        # the doorbell; one at a time.
        self.lock = threading.RLock()
        self.flusher = None
        self.stop = None
        self.finished = False

    def on_line(self):
        with self.lock:
            if self.finished:
                return
            now = time.monotonic()
            if now - self.last >= self.INTERVAL:
                self.send(now)
            else:
                self.start_flusher()

    def send(self, now):
        self.last = now
        self.responder.send(self.out.take(), self.err.take(), results=CURRENT_RESULTS.take())

    def start_flusher(self):
        if self.finished or self.flusher is not None:
            return
        import threading

        self.stop = threading.Event()
        self.flusher = threading.Thread(target=self.flush_until_stopped, name="zeroboot-flusher", daemon=True)
        self.flusher.start()

    def flush_until_stopped(self):
        while not self.stop.wait(self.PROMPT):
            with self.lock:
                if CHILDREN.active:
                    CHILDREN.collect()
                if self.out.buffer.pending or self.err.buffer.pending or CURRENT_RESULTS.pending:
                    self.send(time.monotonic())

    def stop_flusher(self):
        if self.flusher is not None:
            self.stop.set()
            self.flusher.join()
            self.flusher = None

    def finish(self):
        """Stops the flusher; the final chunk follows from the main thread."""
        with self.lock:
            self.finished = True
        self.stop_flusher()


class ChildOutput:
    """The output of child processes. The console is the agent's stdout and
    stderr, and it drops what a child writes to it; so when code first
    starts a child (`subprocess`, `os.system`, `os.posix_spawn`, `os.fork`),
    fds 1 and 2 become files (zb_capture_child_output in native/guest.h),
    and from then on this sandbox reads them into the request's captures:
    before each write of the code's own, from the flusher while streaming,
    and at the end of each request. A request that starts no child in a
    sandbox that never started one pays for none of it."""

    def __init__(self):
        self.active = False
        self.fds = None
        self.at = [0, 0]
        self.out = self.err = None
        self.streamer = None

    def capture(self):
        if not self.active:
            import ctypes

            fds = (ctypes.c_int * 2)(-1, -1)
            if NATIVE.zeroboot_capture_child_output(fds) != 0:
                # Children write to the console, as before.
                return
            self.fds = tuple(fds)
            self.active = True

    def spawning(self):
        self.capture()
        if self.active and self.streamer is not None:
            self.streamer.start_flusher()

    def before_fork(self):
        self.capture()
        # os.fork copies only the calling thread, and Python warns when
        # there are others, also after the fork in the parent: the flusher
        # starts again with the next held line or child.
        if self.streamer is not None:
            self.streamer.stop_flusher()

    def collect(self):
        """Moves what children wrote since the last call into the captures."""
        for i, capture in enumerate((self.out, self.err)):
            while True:
                data = os.pread(self.fds[i], 1 << 20, self.at[i])
                if not data:
                    break
                self.at[i] += len(data)
                if capture is not None:
                    capture.buffer.keep(data)

    def end_request(self):
        """Collects the rest and empties the files; a child still running
        goes on writing at their new end."""
        self.collect()
        self.out = self.err = self.streamer = None
        for i in (0, 1):
            os.ftruncate(self.fds[i], 0)
            self.at[i] = 0


CHILDREN = ChildOutput()


def capture_child_processes():
    """Makes every way Python starts a process capture its output first
    (see ChildOutput), and makes a forked copy of the agent write to the
    files, not to the captures it would lose, and exit at the end of the
    request's code instead of serving requests of its own."""
    import subprocess

    def wrap(function):
        def spawning(*args, **kwargs):
            CHILDREN.spawning()
            return function(*args, **kwargs)

        spawning.__name__ = function.__name__
        spawning.__qualname__ = function.__qualname__
        spawning.__doc__ = function.__doc__
        return spawning

    subprocess.Popen._execute_child = wrap(subprocess.Popen._execute_child)
    for name in ("system", "posix_spawn", "posix_spawnp"):
        setattr(os, name, wrap(getattr(os, name)))
    os.register_at_fork(before=CHILDREN.before_fork, after_in_child=became_forked_child)


FORKED_CHILD = False


def became_forked_child():
    global FORKED_CHILD
    FORKED_CHILD = True
    for name in ("stdout", "stderr"):
        if isinstance(getattr(sys, name), CappedText):
            fd = 1 if name == "stdout" else 2
            setattr(sys, name, open(fd, "w", buffering=1, encoding="utf-8", errors="surrogateescape", closefd=False))


class RequestContext:
    """A request's working directory and environment (see H_CONTEXT_LEN),
    over the sandbox's own for the length of the request."""

    def __init__(self, raw):
        records = raw.split(b"\0")
        self.cwd = records[0]
        self.user = USERS.get(records[1]) if len(records) > 2 and records[1] else None
        self.env = [record.partition(b"=") for record in records[2:-1]]
        self.saved_env = {}
        self.saved_cwd = None
        self.saved_uid = None

    def set_env(self, name, value):
        self.saved_env.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    def enter(self, err):
        """Returns False, with the reason on `err`, if the code cannot run."""
        if self.user is not None and self.user[0] != CURRENT_UID:
            uid, home, name = self.user
            previous = CURRENT_UID
            if not switch_user(uid):
                import ctypes

                err.write(f"zeroboot: user {name}: {os.strerror(ctypes.get_errno())}\n")
                return False
            self.saved_uid = previous
            for key, value in (("HOME", home), ("USER", name), ("LOGNAME", name)):
                self.set_env(key, value)
        for name, _, value in self.env:
            self.set_env(os.fsdecode(name), os.fsdecode(value))
        if self.cwd:
            try:
                self.saved_cwd = os.getcwd()
                os.chdir(self.cwd)
            except OSError as e:
                err.write(f"zeroboot: cwd {os.fsdecode(self.cwd)}: {e.strerror}\n")
                return False
        return True

    def leave(self):
        if self.saved_uid is not None:
            switch_user(self.saved_uid)
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self.saved_cwd is not None:
            try:
                os.chdir(self.saved_cwd)
            except OSError:
                pass


class Results:
    """Rich results, as Jupyter has them: the value of a request's last
    expression (`execute_result`) and whatever it passed to `display()` or
    left open as a matplotlib figure (`display_data`), each a MIME bundle
    (`text/plain` always; `text/html`, `image/png` (base64), ... where the
    object has them). One JSON object a line, whole lines up to the
    request's output limit. One object for the sandbox's life, reset per
    request."""

    def __init__(self):
        self.pending = []
        self.room = 0
        self.truncated = False

    def reset(self, limit):
        self.pending.clear()
        self.room = limit
        self.truncated = False

    def add(self, kind, obj):
        try:
            data = mime_bundle(obj)
        except Exception as e:  # a broken _repr_*_ must not fail the request
            data = {"text/plain": f"<unrepresentable {type(obj).__name__}: {e!r}>"}
        self.add_record(kind, data)

    def add_record(self, kind, data):
        import json

        line = json.dumps({"type": kind, "data": data}).encode() + b"\n"
        if len(line) > self.room:
            self.truncated = True
            return
        self.room -= len(line)
        self.pending.append(line)

    def take(self):
        data = b"".join(self.pending)
        self.pending.clear()
        return data


CURRENT_RESULTS = Results()

# Jupyter's rich representations, in the order a notebook prefers them.
REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
)


def mime_bundle(obj):
    import base64

    data = {}
    bundle = getattr(obj, "_repr_mimebundle_", None)
    if callable(bundle):
        got = bundle()
        if isinstance(got, tuple):
            got = got[0]
        if isinstance(got, dict):
            data.update(got)
    for method, mime in REPR_METHODS:
        if mime in data:
            continue
        represent = getattr(obj, method, None)
        if not callable(represent):
            continue
        value = represent()
        if isinstance(value, tuple):
            value = value[0]
        if value is not None:
            data[mime] = value
    if "image/png" not in data and is_matplotlib_figure(obj):
        buffer = io.BytesIO()
        obj.savefig(buffer, format="png", bbox_inches="tight")
        data["image/png"] = buffer.getvalue()
    for mime, value in list(data.items()):
        if isinstance(value, (bytes, bytearray)):
            data[mime] = base64.b64encode(value).decode("ascii")
    data["text/plain"] = repr(obj)
    return data


def is_matplotlib_figure(obj):
    kind = type(obj)
    return kind.__module__ == "matplotlib.figure" and hasattr(obj, "savefig")


def displayhook(value):
    """sys.displayhook, and run_code's for the last expression compiled on
    its own (see compile_cell): a value other than None is the request's
    execute_result. Where the native half serves requests, sys.displayhook
    is its own: it makes the result of an int, float, complex, str, bytes
    or bool itself, as this would, and calls this for any other value
    (native/exec_path.h, zb_exec_plain_result)."""
    if value is not None:
        CURRENT_RESULTS.add("execute_result", value)


def display(*objs, **_):
    """Jupyter's display(): each object becomes a display_data result."""
    for obj in objs:
        CURRENT_RESULTS.add("display_data", obj)


def show_open_figures():
    """Every matplotlib figure the code left open becomes a display_data
    result and is closed, as a notebook shows them at the end of a cell;
    `plt.show()` does the same at once. Nothing to do, and nothing
    imported, where the code never imported pyplot."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    show_figures_on_show(pyplot)
    for number in pyplot.get_fignums():
        CURRENT_RESULTS.add("display_data", pyplot.figure(number))
    pyplot.close("all")


def show_figures_on_show(pyplot):
    """Makes `plt.show()` show the open figures as results (the Agg
    backend's own shows nothing, with a warning)."""
    if getattr(pyplot.show, "__module__", None) != __name__:
        pyplot.show = lambda *args, **kwargs: show_open_figures()


# Statements that hold others: in "single" mode the expressions inside one
# would each be displayed, where a notebook displays none.
COMPOUND_STATEMENTS = ("if", "for", "while", "with", "try", "def", "class", "async", "match", "@")


def compile_cell(code):
    """The code as notebook cells compile it: everything, and separately the
    last statement if it is an expression, whose value is the cell's
    result. One simple statement on one line (`print(1+1)`, most requests)
    compiles at once in "single" mode, which hands an expression's value to
    sys.displayhook (displayhook, below): no syntax tree is built in Python,
    which costs time and written pages in every fork."""
    line = code.strip()
    if "\n" not in line and not line.startswith(COMPOUND_STATEMENTS):
        try:
            if ";" not in line:
                return compile(code, "<string>", "single"), None
            # "single" mode would display every expression of `1; 2`. With
            # no string or comment on the line, its last `;` ends the
            # statements before the last one.
            head, _, tail = line.rpartition(";")
            if tail.strip() and not any(c in line for c in "'\"#"):
                try:
                    last = compile(tail.strip(), "<string>", "eval")
                except SyntaxError:
                    return compile(code, "<string>", "exec"), None
                return compile(head, "<string>", "exec"), last
        except SyntaxError:
            pass  # a real error, which the parser below reports
    import ast

    tree = ast.parse(code, "<string>")
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
        return compile(tree, "<string>", "exec"), compile(last, "<string>", "eval")
    return compile(tree, "<string>", "exec"), None


def fresh_namespace():
    import builtins

    return {"__name__": "__main__", "__builtins__": builtins}


def run_code(code, stdin, out, err, namespace):
    """Runs `code` like `python3 -c` in `namespace`, which later requests to
    the same sandbox share (as cells of a notebook do), writing to the
    captures `out` and `err`; returns the exit code. A plain request takes
    the same steps in C (zb_exec_run in native/exec_path.h)."""
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    exit_code = 0
    try:
        body, last = compile_cell(code)
        exec(body, namespace)
        if last is not None:
            displayhook(eval(last, namespace))
    except BaseException as e:
        exit_code = exit_code_of(e, err)
    finally:
        after_code(out)
        sys.stdin, sys.stdout, sys.stderr = saved
    if FORKED_CHILD:
        # A copy of the agent forked by the code ends where `python3 -c`
        # would end, and never touches the mailbox.
        os._exit(exit_code & 0xFF)
    return exit_code


def exit_code_of(exception, err):
    """The exit code of code that raised `exception`, which is reported as
    `python3 -c` reports it: a SystemExit's message on `err`, a traceback
    (without the agent's frames) on sys.stderr."""
    if isinstance(exception, SystemExit):
        if exception.code is None:
            return 0
        if isinstance(exception.code, int):
            return exception.code
        print(exception.code, file=err)
        return 1
    import traceback

    tb = exception.__traceback__
    while tb is not None and tb.tb_frame.f_globals is globals():
        tb = tb.tb_next
    traceback.print_exception(type(exception), exception, tb)
    return 1


def after_code(out):
    """What follows a request's code, with its captures still in place:
    the figures it left open shown, and a stdout of its own put in place of
    `out` flushed (ours needs no flush here, the final chunk carries what
    it holds)."""
    try:
        show_open_figures()
    except Exception:
        import traceback

        traceback.print_exc()
    if sys.stdout is not out:
        try:
            sys.stdout.flush()
        except Exception:
            pass


# Namespaces of run_cell by name, made on first use.
CELL_CONTEXTS = {}


def run_cell(code, context=None):
    """Runs `code` as a notebook cell, for the host's code-interpreter API
    (which sends a one-line call of this): in the namespace named
    `context`, or with None in the sandbox's own (the caller's globals,
    which plain requests share). An exception becomes an `error` result
    (name, value and traceback, without this frame) and exit code 1,
    instead of a traceback on stderr."""
    import linecache
    import traceback

    if context is None:
        namespace = sys._getframe(1).f_globals
    else:
        namespace = CELL_CONTEXTS.setdefault(context, fresh_namespace())
    try:
        body, last = compile_cell(code)
        # The cell's own lines in its traceback, as a notebook shows them.
        linecache.cache["<string>"] = (len(code), None, code.splitlines(True), "<string>")
        exec(body, namespace)
        if last is not None:
            displayhook(eval(last, namespace))
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        lines = traceback.format_exception(type(e), e, e.__traceback__.tb_next)
        data = {"name": type(e).__name__, "value": str(e), "traceback": "".join(lines)}
        CURRENT_RESULTS.add_record("error", data)
        raise SystemExit(1) from None


def reseed_user_space(seed):
    """Gives this fork its own Python and numpy generators, in the guest.
    Only used when the host cannot do it (see generator_regions): it touches
    hundreds of pages, each a shadow-paging fault in a new fork. The kernel's
    CRNG (os.urandom, secrets, uuid4, numpy.random.default_rng) was already
    rekeyed by the host before the fork ran."""
    import random

    import numpy

    random.seed(seed)
    numpy.random.seed(numpy.frombuffer(seed, dtype=numpy.uint32))


MT_WORDS = 624  # Mersenne Twister state words, in CPython and in numpy


def generator_regions():
    """Guest memory holding the state of Python's `random` and numpy's global
    generator, as (virtual address, bytes of randomness or 0, value), for the
    host to overwrite before every request. None if a layout is not the one
    expected, in which case the agent reseeds in the guest instead.

    The objects live as long as the agent and CPython never moves objects;
    the guest has no swap device and no compaction, so their pages stay where
    they are.

    Each 2.5 KB state lies across two pages more often than not, and each page
    the host writes is copied into every fork. So the host writes only the
    part of a state in the page holding most of it (at least 312 of the 624
    words, all at one end of it), and each generator is left at the end of
    its state: its next draw regenerates all 624 words at once (the twist,
    in both CPython's and numpy's MT19937), each new word from two
    neighbours and one word 397 further on, so that every word after it
    depends on the fresh part. The position is written only where a later
    state (a session forked live) left it elsewhere."""
    import ctypes
    import random

    import numpy

    # CPython 3.11 to 3.13 Modules/_randommodule.c: {PyObject_HEAD; int index; uint32_t state[624];}
    inst = random._inst
    version, internal, gauss_next = inst.getstate()
    at = id(inst)
    if (
        gauss_next is not None
        or ctypes.string_at(at + 20, 4 * MT_WORDS) != struct.pack(f"<{MT_WORDS}I", *internal[:MT_WORDS])
        or struct.unpack("<i", ctypes.string_at(at + 16, 4))[0] != internal[MT_WORDS]
    ):
        return None
    inst.setstate((version, internal[:MT_WORDS] + (MT_WORDS,), None))
    regions = [(*larger_part_in_a_page(at + 20, 4 * MT_WORDS), 0), (at + 16, 0, MT_WORDS)]
    # numpy's MT19937 embeds {uint32_t key[624]; int pos;}; find it by content.
    legacy = numpy.random.mtrand._rand
    bit_generator = legacy._bit_generator
    state = bit_generator.state["state"]
    key = state["key"].astype("<u4").tobytes()
    body = ctypes.string_at(id(bit_generator), type(bit_generator).__basicsize__)
    offset = body.find(key)
    has_gauss = legacy.get_state()[3]
    if offset < 0 or body.find(key, offset + 1) >= 0 or has_gauss:
        return None
    pos_at = id(bit_generator) + offset + len(key)
    if struct.unpack("<i", ctypes.string_at(pos_at, 4))[0] != state["pos"]:
        return None
    bit_generator.state = {"bit_generator": "MT19937", "state": {"key": state["key"], "pos": MT_WORDS}}
    if struct.unpack("<i", ctypes.string_at(pos_at, 4))[0] != MT_WORDS:
        return None
    regions += [(*larger_part_in_a_page(id(bit_generator) + offset, len(key)), 0), (pos_at, 0, MT_WORDS)]
    return regions


def larger_part_in_a_page(at, length):
    """(address, length) of the part of `at .. at + length` (at most a page
    long) that lies in the page holding most of it."""
    split = min(at + length, (at // 4096 + 1) * 4096)
    if split - at >= at + length - split:
        return at, split - at
    return split, at + length - split


def physical_regions(regions):
    """Splits virtual regions at page boundaries and translates each piece to
    a guest-physical address through /proc/self/pagemap."""
    out = []
    with open("/proc/self/pagemap", "rb") as pagemap:

        def physical(vaddr):
            pagemap.seek(vaddr // 4096 * 8)
            entry = struct.unpack("<Q", pagemap.read(8))[0]
            if not entry >> 63 or not entry & ((1 << 55) - 1):
                raise OSError(f"page of {vaddr:#x} is not resident")
            return (entry & ((1 << 55) - 1)) * 4096 + vaddr % 4096

        for vaddr, length, value in regions:
            if length == 0:
                out.append((physical(vaddr), 0, value))
                continue
            end = vaddr + length
            while vaddr < end:
                piece = min(end, (vaddr // 4096 + 1) * 4096) - vaddr
                out.append((physical(vaddr), piece, 0))
                vaddr += piece
    return out


def register_entropy(mailbox):
    """Tells the host where the user-space generators keep their state.
    Returns whether it did; if not, requests reseed them in the guest."""
    try:
        regions = generator_regions()
        table = physical_regions(regions) if regions else []
    except (OSError, AttributeError, KeyError, ValueError) as e:
        log(f"generator state not registered ({e!r}): reseeding in the guest")
        table = []
    if not table or len(table) > MAX_ENTROPY_REGIONS:
        log("generator state not registered: reseeding in the guest")
        return False
    for i, (gpa, length, value) in enumerate(table):
        struct.pack_into("<QII", mailbox, H_ENTROPY_TABLE + ENTROPY_ENTRY_LEN * i, gpa, length, value)
    struct.pack_into("<I", mailbox, H_ENTROPY_COUNT, len(table))
    log(f"generator state registered: {len(table)} regions")
    return True


HOST_RESEEDS = False


U32 = struct.Struct("<I")
I32 = struct.Struct("<i")


def handle_request(mailbox, doorbell, namespace):
    """Runs the request in the mailbox in `namespace` and sends its output,
    ringing RESULT once per chunk."""
    flags = U32.unpack_from(mailbox, H_REQUEST_FLAGS)[0]
    if flags & REQUEST_FILE_OP:
        # Answered by the native half, until the host sends code.
        NATIVE.zeroboot_serve_file_ops(*FILE_OPS_ARGS)
        flags = U32.unpack_from(mailbox, H_REQUEST_FLAGS)[0]
    seq = U32.unpack_from(mailbox, H_REQUEST_SEQ)[0]
    code_len = U32.unpack_from(mailbox, H_CODE_LEN)[0]
    stdin_len = U32.unpack_from(mailbox, H_STDIN_LEN)[0]
    limit = min(U32.unpack_from(mailbox, H_OUTPUT_LIMIT)[0], MAX_OUTPUT_LIMIT)
    context_len = U32.unpack_from(mailbox, H_CONTEXT_LEN)[0]
    context = None
    stream = flags & REQUEST_STREAM
    responder = Responder(mailbox, doorbell, seq, limit)
    streamer = Streamer(responder) if stream else None
    on_line = streamer.on_line if streamer else None
    lock = streamer.lock if streamer else None
    out, err = CappedText(limit, on_line, lock), CappedText(limit, on_line, lock)
    if streamer:
        streamer.out, streamer.err = out, err
    CHILDREN.out, CHILDREN.err, CHILDREN.streamer = out, err, streamer
    CURRENT_RESULTS.reset(limit)
    try:
        # Only a fork's first request: a seed the code sets holds after it.
        if not HOST_RESEEDS and flags & REQUEST_FRESH_FORK:
            reseed_user_space(bytes(mailbox[H_REQUEST_SEED : H_REQUEST_SEED + REQUEST_SEED_LEN]))
        if REQUEST_OFFSET + code_len + stdin_len + context_len > RESPONSE_OFFSET:
            raise ValueError("request larger than the mailbox")
        code = bytes(mailbox[REQUEST_OFFSET : REQUEST_OFFSET + code_len]).decode("utf-8", "replace")
        stdin_at = REQUEST_OFFSET + code_len
        stdin = bytes(mailbox[stdin_at : stdin_at + stdin_len]).decode("utf-8", "replace")
        if context_len:
            context_at = stdin_at + stdin_len
            context = RequestContext(bytes(mailbox[context_at : context_at + context_len]))
        if context is not None and not context.enter(err):
            exit_code = 1
        else:
            exit_code = run_code(code, stdin, out, err, namespace)
    except BaseException as e:  # the agent must survive anything
        exit_code = 1
        err.write(f"zeroboot agent error: {e!r}\n")
    if context is not None:
        context.leave()
    exit_code = max(-(2**31), min(2**31 - 1, exit_code))
    # After the flusher stops, nothing but this thread sends; what children
    # wrote comes before the final chunk.
    if streamer:
        streamer.finish()
    if CHILDREN.active:
        CHILDREN.end_request()
    if out.truncated:
        responder.flags |= FLAG_STDOUT_TRUNCATED
    if err.truncated:
        responder.flags |= FLAG_STDERR_TRUNCATED
    if CURRENT_RESULTS.truncated:
        responder.flags |= FLAG_RESULTS_TRUNCATED
    responder.send(out.take(), err.take(), exit_code, final=True, results=CURRENT_RESULTS.take())


def serve(mailbox, doorbell):
    # The READY store is the snapshot: every fork resumes right after it, in
    # this loop (or zeroboot_exec_serve's, which never returns), with its
    # request already in the mailbox.
    namespace = fresh_namespace()
    # The response's first page written once now: the accessed and dirty
    # bits of its page-table entry are then set in the template, and a fork
    # that answers with output writes no page table for them.
    mailbox[RESPONSE_OFFSET] = 0
    if EXEC_PATH is not None:
        # Made after immortalize_heap, and every request's code runs in it:
        # without this, each fork's first request writes its count.
        make_immortal([id(namespace)])
        # Last before the loop (see PLAIN_REHEARSAL).
        rehearse_exec_path(PLAIN_REHEARSAL)
        EXEC_PATH.zeroboot_exec_serve(*FILE_OPS_ARGS, mailbox, doorbell, namespace)
    doorbell[0] = DOORBELL_READY
    while True:
        handle_request(mailbox, doorbell, namespace)


def main():
    import gc

    libc = mount_kernel_filesystems()
    log("filesystems mounted")
    mailbox, doorbell = map_mailbox(kernel_args())
    magic, version = struct.unpack_from("<II", mailbox, H_MAGIC)
    if (magic, version) != (MAGIC, VERSION):
        raise SystemExit(f"zeroboot-agent: mailbox magic/version {magic:#x}/{version}, expected {MAGIC:#x}/{VERSION}")
    seed_entropy(mailbox)
    log("entropy seeded")
    config = read_config()
    warm_up(config)
    log("numpy, stdlib and preloads warmed up")
    prefault_heap(libc)
    import builtins

    # Jupyter's display(), for code that shows rich results.
    if not hasattr(builtins, "display"):
        builtins.display = display
    sys.displayhook = displayhook
    if "matplotlib.pyplot" in sys.modules:
        show_figures_on_show(sys.modules["matplotlib.pyplot"])
    capture_child_processes()
    # After sys.displayhook is set (the native loop wraps it) and before the
    # rehearsal, which goes its way.
    set_up_exec_path()
    rehearse_exec_path()
    log("exec path rehearsed")
    gc.collect()
    gc.freeze()
    # After the rehearsal and the collection: what is alive now is the
    # template's for good.
    log(f"immortal objects: {immortalize_heap()}")
    # Empties the interpreter's free lists (a full collection does), whose
    # objects lie anywhere in the template's pools.
    gc.collect()
    # After the collection and the immortalization, which free what the
    # fill would otherwise leave scattered, and before the move onto huge
    # pages and the fresh heap (see the native half).
    fill_object_pools()
    # After the rehearsal (which decides what is hot) and before the entropy
    # registration (which records guest-physical addresses that the move
    # changes).
    move_onto_huge_pages()
    # After the move (which would copy it) and while still root.
    map_fresh_heap(mailbox, config)
    global HOST_RESEEDS
    HOST_RESEEDS = register_entropy(mailbox)
    # After everything that needs root (the entropy registration reads
    # physical addresses from pagemap).
    if not switch_user(USER_UID):
        raise SystemExit(f"zeroboot-agent: cannot become uid {USER_UID}")
    # Last: what the template allocates from here on stays in the region.
    route_fork_objects()
    log("ready")
    drain_console()
    serve(mailbox, doorbell)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback

        # fds 1 and 2 may be the child output files by now.
        with open("/dev/console", "w") as console:
            traceback.print_exc(file=console)
        # PID 1 exiting panics the kernel, which resets the VM: the host sees it.
        raise
