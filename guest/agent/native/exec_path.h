/*
 * The request loop, and a plain request's whole path, in C.
 *
 * Every fork runs its first request right after READY, and any Python code
 * of the agent's it runs writes to that code's inline caches (see
 * captures.h): agent.py's handle_request, its captures, responder and
 * results took 14 pages of a `print(1+1)`, each a copy and a shadow-paging
 * exit. So the loop is C, and a plain request runs here without any Python
 * code of the agent's:
 *
 *  - nothing streamed, no context (working directory, environment, user),
 *    and no seed for the guest to set (the host reseeds);
 *  - its code one line that is no compound statement, with `;` only where
 *    no quote or comment is on it: what agent.py's compile_cell compiles
 *    at once, and this decides on the same bytes the same way;
 *  - and that compiles.
 *
 * Any other request goes to agent.py's handle_request as it is. The choice
 * is made before any of the request's code runs, so each request runs once,
 * on one path, and both paths give the same response. What only Python
 * does well (reporting an exception, showing figures, the output of child
 * processes) this calls agent.py for, and only when there is something to
 * do.
 *
 * Call everything here with the GIL held (ctypes.PyDLL).
 */
#ifndef ZEROBOOT_EXEC_PATH_H
#define ZEROBOOT_EXEC_PATH_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "captures.h"
#include "files.h"
#include "guest.h"
#include "python_api.h"

#define ZB_EXEC_MAX_KEYWORDS 16
#define ZB_EXEC_KEYWORD_LEN 16

static struct {
    /* agent.py's module globals, and what this calls there. */
    PyObject *agent;
    PyObject *handle_request, *exit_code_of, *after_code, *displayhook, *results, *children;
    /* json's C string encoder (`_json.encode_basestring_ascii`), or NULL. */
    PyObject *json_string;
    PyObject *string_io;
    /* "matplotlib.pyplot", made once (see ZB_NAMES). */
    PyObject *pyplot;
    /* agent.py's PLAIN_OUT and PLAIN_ERR (CappedText): the stdout and
     * stderr of every plain request. */
    PyObject *out, *err;
    /* agent.py's EMPTY_STDIN: the stdin of a plain request without one. */
    PyObject *empty_stdin;
    /* agent.py's DEFAULT_ROOM, and its value. */
    PyObject *default_room;
    Py_ssize_t default_limit;
    /* compile_cell's COMPOUND_STATEMENTS. */
    char keywords[ZB_EXEC_MAX_KEYWORDS][ZB_EXEC_KEYWORD_LEN];
    size_t keyword_count;
} zb_exec;

/* The request's execute_result for a value of a plain type (int, float,
 * complex, str, bytes, bool), whose MIME bundle is its repr alone, as
 * agent.py's Results.add makes it: one JSON line, as json.dumps writes
 * it, kept if it fits the room left. Python code of the agent's would
 * write its inline caches in every fork (see captures.h). 1 when done; 0
 * to leave the value to agent.py (another type, or a repr that failed,
 * which it reports); -1 with an exception set. */
static int zb_exec_plain_result(PyObject *value)
{
    static const char head[] = "{\"type\": \"execute_result\", \"data\": {\"text/plain\": ";
    static const char tail[] = "}}\n";
    PyObject *type = PyObject_Type(value);
    int plain = type == (PyObject *)&PyLong_Type || type == (PyObject *)&PyFloat_Type ||
                type == (PyObject *)&PyComplex_Type || type == (PyObject *)&PyUnicode_Type ||
                type == (PyObject *)&PyBytes_Type || type == (PyObject *)&PyBool_Type;
    zb_py_clear(&type);
    if (!plain || zb_exec.json_string == NULL)
        return 0;
    PyObject *text = PyObject_Repr(value);
    if (text == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *quoted = PyObject_CallOneArg(zb_exec.json_string, text);
    zb_py_clear(&text);
    Py_ssize_t quoted_len = 0;
    const char *q = quoted == NULL ? NULL : PyUnicode_AsUTF8AndSize(quoted, &quoted_len);
    Py_ssize_t left = q == NULL ? -1 : zb_capture_room(zb_exec.results);
    PyObject *line = NULL;
    int rc = -1;
    if (left < 0)
        goto done;
    Py_ssize_t len = (Py_ssize_t)(sizeof head - 1) + quoted_len + (Py_ssize_t)(sizeof tail - 1);
    if (len > left) {
        rc = PyObject_SetAttr(zb_exec.results, zb_name.truncated, Py_True) == 0 ? 1 : -1;
        goto done;
    }
    line = PyBytes_FromStringAndSize(NULL, len);
    char *to = line == NULL ? NULL : PyBytes_AsString(line);
    if (to == NULL)
        goto done;
    memcpy(to, head, sizeof head - 1);
    memcpy(to + sizeof head - 1, q, (size_t)quoted_len);
    memcpy(to + sizeof head - 1 + quoted_len, tail, sizeof tail - 1);
    if (zb_capture_append(zb_exec.results, line, left - len) == 0)
        rc = 1;
done:
    if (rc < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "the request's results are not what the native half expects");
    zb_py_clear(&line);
    zb_py_clear(&quoted);
    return rc;
}

/* sys.displayhook: agent.py's `displayhook` for a value other than None
 * that zb_exec_plain_result leaves to it. "single" mode displays every
 * expression statement's value, None too (the value of `print(...)`), and
 * that is the common case. */
static PyObject *zb_exec_displayhook(PyObject *python_hook, PyObject *value)
{
    if (value == Py_None)
        return zb_new_none();
    int done = zb_exec_plain_result(value);
    if (done != 0)
        return done > 0 ? zb_new_none() : NULL;
    return PyObject_CallFunctionObjArgs(python_hook, value, NULL);
}

static PyMethodDef zb_exec_displayhook_method = {
    "displayhook", zb_exec_displayhook, METH_O, "Makes a value other than None the request's execute_result."};

static PyObject *zb_exec_global(const char *name)
{
    PyObject *o = PyDict_GetItemString(zb_exec.agent, name);
    if (o == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, name);
    if (o != NULL)
        Py_IncRef(o);
    return o;
}

static int zb_exec_is_space(char c)
{
    return c != '\0' && strchr(" \t\n\r\v\f\x1c\x1d\x1e\x1f", c) != NULL;
}

/* The bytes of [*start, *end) without the whitespace around them, as
 * str.strip() strips it; 0 where a byte above 0x7f is at either end (it
 * may be part of Unicode whitespace, which this does not know). */
static int zb_exec_strip(const char *code, size_t *start, size_t *end)
{
    while (*start < *end && zb_exec_is_space(code[*start]))
        (*start)++;
    while (*end > *start && zb_exec_is_space(code[*end - 1]))
        (*end)--;
    return *start == *end || ((unsigned char)code[*start] <= 0x7f && (unsigned char)code[*end - 1] <= 0x7f);
}

/* Compiles bytes [start, end) of `code` (compile()'s `mode`); a new code
 * object, or NULL with an exception set. */
static PyObject *zb_exec_compile_part(const char *code, size_t start, size_t end, int mode)
{
    PyObject *source = PyUnicode_DecodeUTF8(code + start, (Py_ssize_t)(end - start), NULL);
    const char *utf8 = source == NULL ? NULL : PyUnicode_AsUTF8AndSize(source, NULL);
    /* As compile(source, "<string>", mode) compiles a str. */
    PyCompilerFlags cf = {PyCF_SOURCE_IS_UTF8 | PyCF_IGNORE_COOKIE, (int)((Py_Version >> 16) & 0xFF)};
    PyObject *compiled = utf8 == NULL ? NULL : Py_CompileStringExFlags(utf8, "<string>", mode, &cf, -1);
    zb_py_clear(&source);
    return compiled;
}

/* Compiles the code as agent.py's compile_cell does where that compiles it
 * at once: one line that is no compound statement, "single" mode, or with
 * `;` and no quote or comment, the statements before the last `;` and the
 * last one as an expression (`*last`, or NULL). Returns 1 with `*body`
 * set, or 0 where compile_cell would build a syntax tree, or where either
 * compilation fails: agent.py compiles it again and says what is wrong. A
 * NUL in the code, which compile() rejects and a C string would cut short,
 * goes there too. */
static int zb_exec_compile(const char *code, size_t len, PyObject **body, PyObject **last)
{
    *body = *last = NULL;
    size_t start = 0, end = len;
    if (memchr(code, '\0', len) != NULL || !zb_exec_strip(code, &start, &end))
        return 0;
    const char *line = code + start;
    size_t line_len = end - start;
    if (memchr(line, '\n', line_len) != NULL)
        return 0;
    for (size_t i = 0; i < zb_exec.keyword_count; i++) {
        size_t n = strlen(zb_exec.keywords[i]);
        if (line_len >= n && memcmp(line, zb_exec.keywords[i], n) == 0)
            return 0;
    }
    const char *semicolon = NULL;
    for (size_t i = line_len; i > 0 && semicolon == NULL; i--)
        if (line[i - 1] == ';')
            semicolon = line + i - 1;
    if (semicolon == NULL) {
        *body = zb_exec_compile_part(code, 0, len, Py_single_input);
    } else {
        size_t tail_start = (size_t)(semicolon - code) + 1, tail_end = end;
        if (!zb_exec_strip(code, &tail_start, &tail_end) || tail_start == tail_end ||
            memchr(line, '\'', line_len) != NULL || memchr(line, '"', line_len) != NULL ||
            memchr(line, '#', line_len) != NULL)
            return 0;
        *last = zb_exec_compile_part(code, tail_start, tail_end, Py_eval_input);
        if (*last == NULL && PyErr_ExceptionMatches(PyExc_SyntaxError)) {
            PyErr_Clear();
            *body = zb_exec_compile_part(code, 0, len, Py_file_input);
        } else if (*last != NULL) {
            *body = zb_exec_compile_part(code, start, (size_t)(semicolon - code), Py_file_input);
        }
    }
    if (*body == NULL) {
        PyErr_Clear();
        zb_py_clear(last);
        return 0;
    }
    return 1;
}

/* Sets `o.name` to `value` unless it is that already: a write of the same
 * value still copies the page, and a fork's first request finds the state
 * the rehearsal left. 0, or -1 with an exception set. */
static int zb_exec_set(PyObject *o, PyObject *name, PyObject *value)
{
    PyObject *was = PyObject_GetAttr(o, name);
    int same = was == value;
    zb_py_clear(&was);
    PyErr_Clear();
    return same ? 0 : PyObject_SetAttr(o, name, value);
}

/* Sets a capture's or the results' state for a new request: nothing
 * pending, `limit` bytes of room, not truncated; writing only what
 * differs (see zb_exec_set). */
static int zb_exec_reset(PyObject *holder, Py_ssize_t limit)
{
    PyObject *pending = PyObject_GetAttr(holder, zb_name.pending);
    if (pending == NULL)
        return -1;
    Py_ssize_t n = PyList_Size(pending);
    int rc = n < 0 ? -1 : n == 0 ? 0 : PyList_SetSlice(pending, 0, n, NULL);
    Py_DecRef(pending);
    if (rc != 0)
        return -1;
    PyObject *room = PyObject_GetAttr(holder, zb_name.room);
    int same = room != NULL && PyLong_AsSsize_t(room) == limit && !PyErr_Occurred();
    zb_py_clear(&room);
    PyErr_Clear();
    if (!same) {
        if (limit == zb_exec.default_limit) {
            room = zb_exec.default_room;
            Py_IncRef(room);
        } else {
            room = PyLong_FromSsize_t(limit);
        }
        if (room == NULL)
            return -1;
        rc = PyObject_SetAttr(holder, zb_name.room, room);
        Py_DecRef(room);
        if (rc != 0)
            return -1;
    }
    return zb_exec_set(holder, zb_name.truncated, Py_False);
}

/* The attribute `name` of `o`, as a truth value; 0 where it cannot be read
 * (with the error cleared): a flag of a response, not worth failing it. */
static int zb_exec_flag(PyObject *o, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(o, name);
    int set = v == NULL ? 0 : PyObject_IsTrue(v);
    zb_py_clear(&v);
    if (set < 0 || PyErr_Occurred()) {
        PyErr_Clear();
        set = 0;
    }
    return set;
}

/* Writes the response in mailbox-sized chunks, as agent.py's Responder:
 * every chunk but the last has ZB_FLAG_MORE; the host copies each out at
 * its doorbell and resumes us. A response that fits goes over the request,
 * in the header's page, which the request wrote anyway: the response area's
 * page then stays the template's. */
static void zb_exec_respond(volatile uint8_t *mailbox, volatile uint8_t *doorbell, uint32_t seq, PyObject *streams[3],
                            int32_t exit_code, uint32_t flags)
{
    const char *at[3];
    size_t left[3];
    for (int i = 0; i < 3; i++) {
        at[i] = PyBytes_AsString(streams[i]);
        left[i] = (size_t)PyBytes_Size(streams[i]);
    }
    uint32_t response_at =
        left[0] + left[1] + left[2] <= ZB_SMALL_RESPONSE_CAPACITY ? ZB_SMALL_RESPONSE_OFFSET : ZB_RESPONSE_OFFSET;
    for (;;) {
        size_t room = ZB_RESPONSE_CAPACITY, len[3];
        uint8_t *to = (uint8_t *)mailbox + response_at;
        for (int i = 0; i < 3; i++) {
            len[i] = left[i] < room ? left[i] : room;
            memcpy(to, at[i], len[i]);
            to += len[i];
            room -= len[i];
            at[i] += len[i];
            left[i] -= len[i];
        }
        int last = left[0] == 0 && left[1] == 0 && left[2] == 0;
        zb_ring_result(mailbox, doorbell, seq, response_at, exit_code, (uint32_t)len[0], (uint32_t)len[1],
                       (uint32_t)len[2], flags | (last ? 0 : ZB_FLAG_MORE));
        if (last)
            return;
    }
}

/* Answers a request that agent.py's handle_request raised out of, past
 * its own `except` (code can take apart what it answers with: the
 * captures are the code's sys.stdout and sys.stderr): a final chunk with
 * the exception on stderr and exit code 1, so that the host is not left
 * waiting. */
static void zb_exec_answer_failure(volatile uint8_t *mailbox, volatile uint8_t *doorbell, uint32_t seq)
{
    PyObject *exception = PyErr_GetRaisedException();
    PyObject *text = exception == NULL ? NULL : PyObject_Repr(exception);
    const char *repr = text == NULL ? NULL : PyUnicode_AsUTF8AndSize(text, NULL);
    char message[512];
    snprintf(message, sizeof message, "zeroboot agent error: %s\n", repr == NULL ? "unknown" : repr);
    PyErr_Clear();
    zb_py_clear(&text);
    zb_py_clear(&exception);
    PyObject *streams[3] = {PyBytes_FromStringAndSize(NULL, 0), PyBytes_FromStringAndSize(message, strlen(message)),
                            PyBytes_FromStringAndSize(NULL, 0)};
    if (streams[0] == NULL || streams[1] == NULL || streams[2] == NULL)
        _exit(70);
    zb_exec_respond(mailbox, doorbell, seq, streams, 1, 0);
    for (int i = 0; i < 3; i++)
        zb_py_clear(&streams[i]);
}

/* Runs compiled `body`, then `last` (if not NULL) with its value displayed,
 * as agent.py's run_code does, with `stdin_io` as sys.stdin and the plain
 * captures as sys.stdout and sys.stderr; returns the exit code, clamped to
 * 32 bits. */
static int32_t zb_exec_run(PyObject *body, PyObject *last, PyObject *stdin_io, PyObject *namespace)
{
    /* Between requests sys.stdin, sys.stdout and sys.stderr are `resting`
     * (agent.py's set_up_exec_path), and a plain request without stdin
     * runs with those very objects: sys's dict is then not written, and
     * nor is the interpreter's count of dict versions. */
    static const char *streams[3] = {"stdin", "stdout", "stderr"};
    PyObject *ours[3] = {stdin_io, zb_exec.out, zb_exec.err};
    PyObject *resting[3] = {zb_exec.empty_stdin, zb_exec.out, zb_exec.err};
    for (int i = 0; i < 3; i++)
        if (PySys_GetObject(streams[i]) != ours[i])
            PySys_SetObject(streams[i], ours[i]);
    PyObject *result = PyEval_EvalCode(body, namespace, namespace);
    if (result != NULL && last != NULL) {
        zb_py_clear(&result);
        PyObject *value = PyEval_EvalCode(last, namespace, namespace);
        result = value == NULL ? NULL : zb_exec_displayhook(zb_exec.displayhook, value);
        zb_py_clear(&value);
    }
    int raised = result == NULL;
    PyObject *code = NULL;
    if (raised) {
        PyObject *exception = PyErr_GetRaisedException();
        code = PyObject_CallFunctionObjArgs(zb_exec.exit_code_of, exception, zb_exec.err, NULL);
        zb_py_clear(&exception);
    }
    zb_py_clear(&result);
    /* Figures the code left open, a stdout of its own to flush: only where
     * it imported pyplot or replaced sys.stdout. */
    PyObject *modules = PySys_GetObject("modules");
    if ((modules != NULL && PyDict_GetItemWithError(modules, zb_exec.pyplot) != NULL) ||
        PySys_GetObject("stdout") != zb_exec.out) {
        PyObject *r = PyObject_CallFunctionObjArgs(zb_exec.after_code, zb_exec.out, NULL);
        zb_py_clear(&r);
    }
    PyErr_Clear();
    for (int i = 0; i < 3; i++)
        if (PySys_GetObject(streams[i]) != resting[i])
            PySys_SetObject(streams[i], resting[i]);
    long long exit_code = 0;
    unsigned long long low_bits = 0;
    if (raised && code == NULL) {
        exit_code = low_bits = 1;
    } else if (code != NULL) {
        int overflow = 0;
        exit_code = PyLong_AsLongLongAndOverflow(code, &overflow);
        low_bits = PyLong_AsUnsignedLongLongMask(code);
        if (overflow != 0)
            exit_code = overflow > 0 ? INT32_MAX : INT32_MIN;
        zb_py_clear(&code);
        PyErr_Clear();
    }
    /* A copy of the agent forked by the code ends where `python3 -c` would
     * end, and never touches the mailbox. */
    PyObject *forked = PyDict_GetItemWithError(zb_exec.agent, zb_name.FORKED_CHILD);
    if (forked != NULL && PyObject_IsTrue(forked) == 1)
        _exit((int)(low_bits & 0xFF));
    PyErr_Clear();
    if (exit_code > INT32_MAX)
        return INT32_MAX;
    if (exit_code < INT32_MIN)
        return INT32_MIN;
    return (int32_t)exit_code;
}

/* Whether `io`, a realized StringIO (see EMPTY_STDIN in agent.py), is
 * still empty, open and at its start; 0 where that cannot be read. None of
 * these calls writes to it. */
static int zb_exec_untouched(PyObject *io)
{
    if (zb_exec_flag(io, zb_name.closed))
        return 0;
    PyObject *at = PyObject_CallMethodObjArgs(io, zb_name.tell, NULL);
    PyObject *value = PyObject_CallMethodObjArgs(io, zb_name.getvalue, NULL);
    int untouched = at != NULL && value != NULL && PyLong_AsSsize_t(at) == 0 && PyObject_Size(value) == 0;
    zb_py_clear(&at);
    zb_py_clear(&value);
    PyErr_Clear();
    return untouched;
}

/* A request's sys.stdin: for one without stdin, agent.py's EMPTY_STDIN as
 * long as no code has read, written or closed it; else a new StringIO. */
static PyObject *zb_exec_stdin(const char *bytes, uint32_t len)
{
    if (len == 0 && zb_exec_untouched(zb_exec.empty_stdin)) {
        Py_IncRef(zb_exec.empty_stdin);
        return zb_exec.empty_stdin;
    }
    PyObject *text = PyUnicode_DecodeUTF8(bytes, len, "replace");
    PyObject *io = text == NULL ? NULL : PyObject_CallFunctionObjArgs(zb_exec.string_io, text, NULL);
    zb_py_clear(&text);
    return io;
}

/* Serves the request in the mailbox if it is a plain one (see the top);
 * returns 1 when it did, 0 when it ran nothing of it. */
static int zb_exec_plain(volatile uint8_t *mailbox, volatile uint8_t *doorbell, PyObject *namespace)
{
    uint32_t flags = zb_get32(mailbox, ZB_H_REQUEST_FLAGS);
    if ((flags & ~(uint32_t)ZB_REQUEST_FRESH_FORK) != 0 || zb_get32(mailbox, ZB_H_CONTEXT_LEN) != 0)
        return 0;
    if (flags & ZB_REQUEST_FRESH_FORK) {
        PyObject *reseeds = PyDict_GetItemWithError(zb_exec.agent, zb_name.HOST_RESEEDS);
        if (reseeds == NULL || PyObject_IsTrue(reseeds) != 1) {
            PyErr_Clear();
            return 0;
        }
    }
    uint32_t seq = zb_get32(mailbox, ZB_H_REQUEST_SEQ);
    uint32_t code_len = zb_get32(mailbox, ZB_H_CODE_LEN), stdin_len = zb_get32(mailbox, ZB_H_STDIN_LEN);
    uint32_t limit = zb_get32(mailbox, ZB_H_OUTPUT_LIMIT);
    if (limit > ZB_MAX_OUTPUT_LIMIT)
        limit = ZB_MAX_OUTPUT_LIMIT;
    if ((uint64_t)ZB_REQUEST_OFFSET + code_len + stdin_len > ZB_RESPONSE_OFFSET)
        return 0;
    /* The host wrote the request before it resumed us, and writes nothing
     * to it until we ring. */
    const char *code = (const char *)mailbox + ZB_REQUEST_OFFSET;
    PyObject *body, *last;
    if (!zb_exec_compile(code, code_len, &body, &last))
        return 0;
    PyObject *stdin_io = zb_exec_stdin(code + code_len, stdin_len);
    PyObject *out_buffer = PyObject_GetAttr(zb_exec.out, zb_name.buffer);
    PyObject *err_buffer = PyObject_GetAttr(zb_exec.err, zb_name.buffer);
    int ready = stdin_io != NULL && out_buffer != NULL && err_buffer != NULL && zb_exec_reset(out_buffer, limit) == 0 &&
                zb_exec_reset(err_buffer, limit) == 0 && zb_exec_reset(zb_exec.results, limit) == 0 &&
                zb_exec_set(zb_exec.children, zb_name.out, zb_exec.out) == 0 &&
                zb_exec_set(zb_exec.children, zb_name.err, zb_exec.err) == 0 &&
                zb_exec_set(zb_exec.children, zb_name.streamer, Py_None) == 0;
    if (!ready) {
        /* Out of memory before the code ran: agent.py may do better. */
        PyErr_Clear();
        zb_py_clear(&body);
        zb_py_clear(&last);
        zb_py_clear(&stdin_io);
        zb_py_clear(&out_buffer);
        zb_py_clear(&err_buffer);
        return 0;
    }

    int32_t exit_code = zb_exec_run(body, last, stdin_io, namespace);
    zb_py_clear(&body);
    zb_py_clear(&last);
    zb_py_clear(&stdin_io);
    if (zb_exec_flag(zb_exec.children, zb_name.active)) {
        PyObject *r = PyObject_CallMethodObjArgs(zb_exec.children, zb_name.end_request, NULL);
        zb_py_clear(&r);
        PyErr_Clear();
    }
    uint32_t response_flags = (zb_exec_flag(out_buffer, zb_name.truncated) ? ZB_FLAG_STDOUT_TRUNCATED : 0) |
                              (zb_exec_flag(err_buffer, zb_name.truncated) ? ZB_FLAG_STDERR_TRUNCATED : 0) |
                              (zb_exec_flag(zb_exec.results, zb_name.truncated) ? ZB_FLAG_RESULTS_TRUNCATED : 0);
    PyObject *streams[3] = {zb_capture_take_bytes(out_buffer), zb_capture_take_bytes(err_buffer), NULL};
    PyObject *pending = PyObject_GetAttr(zb_exec.results, zb_name.pending);
    if (pending != NULL && PyList_Size(pending) > 0)
        streams[2] = PyObject_CallMethodObjArgs(zb_exec.results, zb_name.take, NULL);
    else if (pending != NULL)
        streams[2] = PyBytes_FromStringAndSize(NULL, 0);
    zb_py_clear(&pending);
    zb_py_clear(&out_buffer);
    zb_py_clear(&err_buffer);
    for (int i = 0; i < 3; i++) {
        if (streams[i] == NULL) {
            /* Out of memory, or the agent's own state broken by the code:
             * what there is goes, as an empty stream. */
            PyErr_Clear();
            streams[i] = PyBytes_FromStringAndSize(NULL, 0);
            if (streams[i] == NULL)
                _exit(70);
        }
    }
    zb_exec_respond(mailbox, doorbell, seq, streams, exit_code, response_flags);
    for (int i = 0; i < 3; i++)
        zb_py_clear(&streams[i]);
    return 1;
}

/* Serves one request: file operations first, then the code, here if it is
 * plain, else by agent.py's handle_request(mailbox_view, doorbell_view,
 * namespace). */
static void zb_exec_request(volatile uint8_t *mailbox, volatile uint8_t *doorbell, PyObject *mailbox_view,
                            PyObject *doorbell_view, PyObject *namespace)
{
    if (zb_get32(mailbox, ZB_H_REQUEST_FLAGS) & ZB_REQUEST_FILE_OP) {
        /* Without the GIL: a port's server may be a thread of this process
         * (http.server in a thread), which needs it to answer what the
         * port operations send it. */
        PyThreadState *state = PyEval_SaveThread();
        zb_serve_file_ops(mailbox, doorbell);
        PyEval_RestoreThread(state);
    }
    if (zb_exec_plain(mailbox, doorbell, namespace))
        return;
    uint32_t seq = zb_get32(mailbox, ZB_H_REQUEST_SEQ);
    PyObject *r =
        PyObject_CallFunctionObjArgs(zb_exec.handle_request, mailbox_view, doorbell_view, namespace, NULL);
    if (r == NULL)
        zb_exec_answer_failure(mailbox, doorbell, seq);
    zb_py_clear(&r);
}

/* Takes what the request path needs from agent.py's globals, and gives the
 * capture classes their C methods; 0, or -1 with an exception set. */
static int zb_exec_setup(PyObject *agent, PyObject *string_io)
{
    Py_IncRef(agent);
    Py_IncRef(string_io);
    zb_exec.agent = agent;
    zb_exec.string_io = string_io;
    /* Without it every result goes to agent.py, as before. */
    PyObject *json = PyImport_ImportModule("_json");
    zb_exec.json_string = json == NULL ? NULL : PyObject_GetAttrString(json, "encode_basestring_ascii");
    zb_py_clear(&json);
    PyErr_Clear();
    PyObject *text_class = zb_exec_global("CappedText"), *bytes_class = zb_exec_global("CappedBytes");
    zb_exec.handle_request = zb_exec_global("handle_request");
    zb_exec.exit_code_of = zb_exec_global("exit_code_of");
    zb_exec.after_code = zb_exec_global("after_code");
    zb_exec.displayhook = zb_exec_global("displayhook");
    zb_exec.results = zb_exec_global("CURRENT_RESULTS");
    zb_exec.children = zb_exec_global("CHILDREN");
    PyObject *keywords = zb_exec_global("COMPOUND_STATEMENTS");
    int rc = -1;
    if (text_class == NULL || bytes_class == NULL || zb_exec.handle_request == NULL || zb_exec.exit_code_of == NULL ||
        zb_exec.after_code == NULL || zb_exec.displayhook == NULL || zb_exec.results == NULL ||
        zb_exec.children == NULL || keywords == NULL)
        goto done;
    if (zb_captures_install(text_class, bytes_class, zb_exec.children) != 0)
        goto done;
    Py_ssize_t n = PyTuple_Size(keywords);
    if (n < 0 || n > ZB_EXEC_MAX_KEYWORDS)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len;
        const char *k = PyUnicode_AsUTF8AndSize(PyTuple_GetItem(keywords, i), &len);
        if (k == NULL || len >= ZB_EXEC_KEYWORD_LEN)
            goto done;
        memcpy(zb_exec.keywords[i], k, (size_t)len + 1);
    }
    zb_exec.keyword_count = (size_t)n;
    zb_exec.out = zb_exec_global("PLAIN_OUT");
    zb_exec.err = zb_exec_global("PLAIN_ERR");
    zb_exec.empty_stdin = zb_exec_global("EMPTY_STDIN");
    zb_exec.default_room = zb_exec_global("DEFAULT_ROOM");
    zb_exec.default_limit = zb_exec.default_room == NULL ? -1 : PyLong_AsSsize_t(zb_exec.default_room);
    zb_exec.pyplot = PyUnicode_InternFromString("matplotlib.pyplot");
    PyObject *hook = PyCFunction_NewEx(&zb_exec_displayhook_method, zb_exec.displayhook, NULL);
    if (zb_exec.out != NULL && zb_exec.err != NULL && zb_exec.empty_stdin != NULL && zb_exec.default_limit >= 0 &&
        zb_exec.pyplot != NULL && hook != NULL &&
        PySys_SetObject("displayhook", hook) == 0)
        rc = 0;
    zb_py_clear(&hook);
done:
    zb_py_clear(&text_class);
    zb_py_clear(&bytes_class);
    zb_py_clear(&keywords);
    if (rc != 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "agent.py's request path is not what the native half expects");
    return rc;
}

#endif
