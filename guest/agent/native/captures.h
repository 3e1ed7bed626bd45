/*
 * A request's captured stdout and stderr: the methods of agent.py's
 * CappedText and CappedBytes that code calls on every write, in C.
 *
 * A Python method writes to its own code object in every fork that runs it
 * (3.13's inline caches: the countdown of each instruction that did not
 * specialize, the branch history of each conditional jump), and the
 * agent's code lies wherever the template allocated it: a page written,
 * a copy and a shadow-paging exit per method. In C, `print` runs no code
 * of the agent's. The state stays in the objects' attributes (`pending`,
 * `room`, `truncated`, `on_line`, `lock`), where agent.py reads it; the
 * classes get these methods once, at start-up (zeroboot_install_captures),
 * and have no others of these names.
 *
 * Call everything here with the GIL held.
 */
#ifndef ZEROBOOT_CAPTURES_H
#define ZEROBOOT_CAPTURES_H

#include <string.h>

#include "python_api.h"

/* agent.py's CHILDREN, whose output comes before each write's. */
static PyObject *zb_capture_children;

static PyObject *zb_new_none(void)
{
    Py_IncRef(Py_None);
    return Py_None;
}

/* The bytes a capture (or agent.py's Results) may still keep: its `room`,
 * 0 if below; -1 with an exception set. */
static Py_ssize_t zb_capture_room(PyObject *self)
{
    PyObject *room_o = PyObject_GetAttr(self, zb_name.room);
    if (room_o == NULL)
        return -1;
    Py_ssize_t room = PyLong_AsSsize_t(room_o);
    Py_DecRef(room_o);
    if (room == -1 && PyErr_Occurred())
        return -1;
    return room < 0 ? 0 : room;
}

/* Appends `kept` to the capture's pending chunks, which leaves it `left`
 * bytes of room; 0, or -1 with an exception set. */
static int zb_capture_append(PyObject *self, PyObject *kept, Py_ssize_t left)
{
    PyObject *left_o = PyLong_FromSsize_t(left);
    if (left_o == NULL)
        return -1;
    int rc = PyObject_SetAttr(self, zb_name.room, left_o);
    Py_DecRef(left_o);
    if (rc != 0)
        return -1;
    PyObject *pending = PyObject_GetAttr(self, zb_name.pending);
    if (pending == NULL)
        return -1;
    rc = PyList_Append(pending, kept);
    Py_DecRef(pending);
    return rc;
}

/* Appends `data` (bytes) to the capture's pending chunks, cut to its room;
 * 0, or -1 with an exception set. */
static int zb_capture_keep_bytes(PyObject *self, PyObject *data)
{
    Py_ssize_t room = zb_capture_room(self);
    if (room < 0)
        return -1;
    Py_ssize_t n = PyBytes_Size(data);
    PyObject *kept = data;
    Py_IncRef(kept);
    if (n > room) {
        zb_py_clear(&kept);
        kept = PyBytes_FromStringAndSize(PyBytes_AsString(data), room);
        if (kept == NULL || PyObject_SetAttr(self, zb_name.truncated, Py_True) != 0)
            goto fail;
        n = room;
    }
    int rc = zb_capture_append(self, kept, room - n);
    Py_DecRef(kept);
    return rc;
fail:
    zb_py_clear(&kept);
    return -1;
}

/* CappedBytes.keep(b): keeps bytes(b) without the rest of a write (what
 * children wrote, collected by ChildOutput). */
static PyObject *zb_capture_keep(PyObject *self, PyObject *b)
{
    PyObject *data = PyBytes_FromObject(b);
    if (data == NULL)
        return NULL;
    int rc = zb_capture_keep_bytes(self, data);
    Py_DecRef(data);
    return rc == 0 ? zb_new_none() : NULL;
}

/* CappedBytes.write(b), with the capture's lock (if any) held. */
static PyObject *zb_capture_write_locked(PyObject *self, PyObject *b)
{
    /* What child processes wrote before this comes before it. */
    if (zb_capture_children != NULL) {
        PyObject *active = PyObject_GetAttr(zb_capture_children, zb_name.active);
        if (active == NULL)
            return NULL;
        int is_active = PyObject_IsTrue(active);
        Py_DecRef(active);
        if (is_active < 0)
            return NULL;
        if (is_active) {
            PyObject *r = PyObject_CallMethodObjArgs(zb_capture_children, zb_name.collect, NULL);
            if (r == NULL)
                return NULL;
            Py_DecRef(r);
        }
    }
    Py_ssize_t n = PyObject_Size(b);
    if (n < 0)
        return NULL;
    PyObject *data = PyBytes_FromObject(b);
    if (data == NULL)
        return NULL;
    int line = memchr(PyBytes_AsString(data), '\n', (size_t)PyBytes_Size(data)) != NULL;
    int rc = zb_capture_keep_bytes(self, data);
    Py_DecRef(data);
    if (rc != 0)
        return NULL;
    if (line) {
        PyObject *on_line = PyObject_GetAttr(self, zb_name.on_line);
        if (on_line == NULL)
            return NULL;
        PyObject *r = on_line == Py_None ? zb_new_none() : PyObject_CallNoArgs(on_line);
        Py_DecRef(on_line);
        if (r == NULL)
            return NULL;
        Py_DecRef(r);
    }
    return PyLong_FromSsize_t(n);
}

/* CappedBytes.write(b): what `sys.stdout.buffer.write` is. */
static PyObject *zb_capture_write_bytes(PyObject *self, PyObject *b)
{
    PyObject *lock = PyObject_GetAttr(self, zb_name.lock);
    if (lock == NULL)
        return NULL;
    if (lock == Py_None) {
        Py_DecRef(lock);
        return zb_capture_write_locked(self, b);
    }
    PyObject *acquired = PyObject_CallMethodObjArgs(lock, zb_name.acquire, NULL);
    if (acquired == NULL) {
        Py_DecRef(lock);
        return NULL;
    }
    Py_DecRef(acquired);
    PyObject *written = zb_capture_write_locked(self, b);
    /* Released whatever the write did, with its exception kept. */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *released = PyObject_CallMethodObjArgs(lock, zb_name.release, NULL);
    Py_DecRef(lock);
    if (released == NULL) {
        zb_py_clear(&written);
        zb_py_clear(&type);
        zb_py_clear(&value);
        zb_py_clear(&traceback);
        return NULL;
    }
    Py_DecRef(released);
    PyErr_Restore(type, value, traceback);
    return written;
}

/* CappedText.write(s): encoded to UTF-8 into the capture's buffer; text
 * that cannot be encoded (lone surrogates) keeps its bytes through
 * `surrogateescape`, or becomes U+FFFD. */
static PyObject *zb_capture_write_text(PyObject *self, PyObject *s)
{
    int is_str = PyObject_IsInstance(s, (PyObject *)&PyUnicode_Type);
    if (is_str <= 0) {
        if (is_str == 0)
            PyErr_SetString(PyExc_TypeError, "write() argument must be str");
        return NULL;
    }
    PyObject *data = PyUnicode_AsEncodedString(s, "utf-8", "surrogateescape");
    if (data == NULL && PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        PyErr_Clear();
        data = PyUnicode_AsEncodedString(s, "utf-8", "replace");
    }
    if (data == NULL)
        return NULL;
    PyObject *buffer = PyObject_GetAttr(self, zb_name.buffer);
    PyObject *r = buffer == NULL ? NULL : PyObject_CallMethodObjArgs(buffer, zb_name.write, data, NULL);
    zb_py_clear(&buffer);
    Py_DecRef(data);
    if (r == NULL)
        return NULL;
    Py_DecRef(r);
    return PyLong_FromSsize_t(PyUnicode_GetLength(s));
}

/* The bytes kept since the last take, as one bytes object (a new
 * reference), and none kept any more; NULL with an exception set. */
static PyObject *zb_capture_take_bytes(PyObject *self)
{
    PyObject *pending = PyObject_GetAttr(self, zb_name.pending);
    if (pending == NULL)
        return NULL;
    Py_ssize_t n = PyList_Size(pending);
    PyObject *data;
    if (n == 1) {
        data = PyList_GetItem(pending, 0);
        Py_IncRef(data);
    } else {
        PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
        data = empty == NULL ? NULL : PyObject_CallMethodObjArgs(empty, zb_name.join, pending, NULL);
        zb_py_clear(&empty);
    }
    if (data != NULL && PyList_SetSlice(pending, 0, n, NULL) != 0)
        zb_py_clear(&data);
    Py_DecRef(pending);
    return data;
}

/* CappedBytes.take(): the bytes written since the last take. */
static PyObject *zb_capture_take(PyObject *self, PyObject *unused)
{
    (void)unused;
    return zb_capture_take_bytes(self);
}

static PyMethodDef zb_capture_text_methods[] = {
    {"write", zb_capture_write_text, METH_O, "Writes str to the capture, as UTF-8; returns its length."},
};
static PyMethodDef zb_capture_bytes_methods[] = {
    {"write", zb_capture_write_bytes, METH_O, "Writes bytes to the capture; returns their length."},
    {"keep", zb_capture_keep, METH_O, "Keeps bytes that child processes wrote."},
    {"take", zb_capture_take, METH_NOARGS, "The bytes written since the last take."},
};

static int zb_capture_install(PyObject *cls, PyMethodDef *methods, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        PyObject *method = PyDescr_NewMethod((PyTypeObject *)cls, &methods[i]);
        if (method == NULL)
            return -1;
        int rc = PyObject_SetAttrString(cls, methods[i].ml_name, method);
        Py_DecRef(method);
        if (rc != 0)
            return -1;
    }
    return 0;
}

/* Gives agent.py's capture classes their methods; 0, or -1 with an
 * exception set. */
static int zb_captures_install(PyObject *text_class, PyObject *bytes_class, PyObject *children)
{
    if (zb_names_init() != 0)
        return -1;
    Py_IncRef(children);
    zb_py_clear(&zb_capture_children);
    zb_capture_children = children;
    if (zb_capture_install(text_class, zb_capture_text_methods,
                           sizeof zb_capture_text_methods / sizeof zb_capture_text_methods[0]) != 0)
        return -1;
    return zb_capture_install(bytes_class, zb_capture_bytes_methods,
                              sizeof zb_capture_bytes_methods / sizeof zb_capture_bytes_methods[0]);
}

#endif
