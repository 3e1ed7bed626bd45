/*
 * The part of CPython's C API that exec_path.h and captures.h call.
 *
 * The agent's native half is compiled on the host, where no Python headers
 * for the guest's interpreter exist, so these are declared here as CPython
 * declares them in its Include directory. All are exported functions or
 * data of CPython 3.11 and later (the captures), or 3.12 and later (the
 * request path, which agent.py uses only there). Objects stay opaque:
 * nothing here reads a field of one.
 */
#ifndef ZEROBOOT_PYTHON_API_H
#define ZEROBOOT_PYTHON_API_H

#include <sys/types.h>

typedef struct _object PyObject;
typedef struct _typeobject PyTypeObject;
typedef struct _ts PyThreadState;
typedef ssize_t Py_ssize_t;
typedef PyObject *(*PyCFunction)(PyObject *self, PyObject *arg);

/* Include/methodobject.h */
typedef struct {
    const char *ml_name;
    PyCFunction ml_meth;
    int ml_flags;
    const char *ml_doc;
} PyMethodDef;
#define METH_NOARGS 0x0004
#define METH_O 0x0008

/* Include/compile.h, Include/cpython/compile.h */
typedef struct {
    int cf_flags;
    int cf_feature_version;
} PyCompilerFlags;
#define Py_single_input 256
#define Py_file_input 257
#define Py_eval_input 258
#define PyCF_SOURCE_IS_UTF8 0x0100
#define PyCF_IGNORE_COOKIE 0x0800

extern PyObject _Py_NoneStruct, _Py_TrueStruct, _Py_FalseStruct;
#define Py_None (&_Py_NoneStruct)
#define Py_True (&_Py_TrueStruct)
#define Py_False (&_Py_FalseStruct)
extern PyTypeObject PyUnicode_Type, PyLong_Type, PyFloat_Type, PyComplex_Type, PyBytes_Type, PyBool_Type;
extern PyObject *PyExc_SyntaxError, *PyExc_TypeError, *PyExc_UnicodeEncodeError;
extern const unsigned long Py_Version;

extern void Py_IncRef(PyObject *o);
extern void Py_DecRef(PyObject *o);

extern PyObject *PyErr_Occurred(void);
extern void PyErr_Clear(void);
extern int PyErr_ExceptionMatches(PyObject *exc);
extern void PyErr_SetString(PyObject *type, const char *message);
extern PyObject *PyErr_GetRaisedException(void);
extern void PyErr_Fetch(PyObject **type, PyObject **value, PyObject **traceback);
extern void PyErr_Restore(PyObject *type, PyObject *value, PyObject *traceback);
extern void PyErr_WriteUnraisable(PyObject *obj);

extern PyThreadState *PyEval_SaveThread(void);
extern void PyEval_RestoreThread(PyThreadState *state);

extern PyObject *Py_CompileStringExFlags(const char *str, const char *filename, int start, PyCompilerFlags *flags,
                                         int optimize);
extern PyObject *PyEval_EvalCode(PyObject *code, PyObject *globals, PyObject *locals);
extern Py_ssize_t PyGC_Collect(void);

extern PyObject *PySys_GetObject(const char *name);
extern int PySys_SetObject(const char *name, PyObject *value);

extern PyObject *PyObject_GetAttr(PyObject *o, PyObject *name);
extern int PyObject_SetAttr(PyObject *o, PyObject *name, PyObject *value);
extern PyObject *PyObject_GetAttrString(PyObject *o, const char *name);
extern int PyObject_SetAttrString(PyObject *o, const char *name, PyObject *value);
extern int PyObject_IsTrue(PyObject *o);
extern PyObject *PyObject_Repr(PyObject *o);
extern int PyObject_IsInstance(PyObject *o, PyObject *cls);
extern Py_ssize_t PyObject_Size(PyObject *o);
extern PyObject *PyObject_Type(PyObject *o);
extern PyObject *PyObject_CallNoArgs(PyObject *callable);
extern PyObject *PyObject_CallOneArg(PyObject *callable, PyObject *arg);
extern PyObject *PyImport_ImportModule(const char *name);
extern PyObject *PyObject_CallFunctionObjArgs(PyObject *callable, ...);
extern PyObject *PyObject_CallMethodObjArgs(PyObject *o, PyObject *name, ...);
extern PyObject *PyDescr_NewMethod(PyTypeObject *type, PyMethodDef *method);
extern PyObject *PyCFunction_NewEx(PyMethodDef *method, PyObject *self, PyObject *module);

extern PyObject *PyLong_FromSsize_t(Py_ssize_t v);
extern Py_ssize_t PyLong_AsSsize_t(PyObject *o);
extern long long PyLong_AsLongLongAndOverflow(PyObject *o, int *overflow);
extern unsigned long long PyLong_AsUnsignedLongLongMask(PyObject *o);

extern PyObject *PyUnicode_DecodeUTF8(const char *s, Py_ssize_t size, const char *errors);
extern const char *PyUnicode_AsUTF8AndSize(PyObject *o, Py_ssize_t *size);
extern PyObject *PyUnicode_AsEncodedString(PyObject *o, const char *encoding, const char *errors);
extern Py_ssize_t PyUnicode_GetLength(PyObject *o);

extern PyObject *PyBytes_FromObject(PyObject *o);
extern PyObject *PyBytes_FromStringAndSize(const char *s, Py_ssize_t size);
extern char *PyBytes_AsString(PyObject *o);
extern Py_ssize_t PyBytes_Size(PyObject *o);

extern Py_ssize_t PyList_Size(PyObject *list);
extern PyObject *PyList_GetItem(PyObject *list, Py_ssize_t i);
extern int PyList_Append(PyObject *list, PyObject *item);
extern int PyList_SetSlice(PyObject *list, Py_ssize_t low, Py_ssize_t high, PyObject *items);
extern Py_ssize_t PyTuple_Size(PyObject *tuple);
extern PyObject *PyTuple_GetItem(PyObject *tuple, Py_ssize_t i);
extern PyObject *PyDict_GetItemString(PyObject *dict, const char *key);
extern PyObject *PyDict_GetItemWithError(PyObject *dict, PyObject *key);
extern PyObject *PyUnicode_InternFromString(const char *s);

/*
 * The attribute and key names the native half looks up, made once: a name
 * made for each lookup (PyObject_GetAttrString) is a new string, which
 * CPython's type attribute cache, keyed by the name's address, never finds,
 * so every lookup would write a new entry of that cache (96 KiB of the
 * interpreter's static data) in every fork.
 */
#define ZB_NAMES(X)                                                                                                   \
    X(FORKED_CHILD) X(HOST_RESEEDS) X(acquire) X(active) X(buffer) X(closed) X(collect) X(end_request) X(err)         \
        X(getvalue) X(join) X(lock) X(on_line) X(out) X(pending) X(release) X(room) X(streamer) X(take) X(tell)         \
        X(truncated) X(write)
#define ZB_NAME_FIELD(name) PyObject *name;
static struct {
    ZB_NAMES(ZB_NAME_FIELD)
} zb_name;

/* Makes the names; 0, or -1 with an exception set. */
static inline int zb_names_init(void)
{
#define ZB_NAME_INIT(name)                                                                                            \
    if (zb_name.name == NULL && (zb_name.name = PyUnicode_InternFromString(#name)) == NULL)                           \
        return -1;
    ZB_NAMES(ZB_NAME_INIT)
#undef ZB_NAME_INIT
    return 0;
}

/* Drops the reference `*o` holds, if any, and empties it. */
static inline void zb_py_clear(PyObject **o)
{
    if (*o != NULL) {
        Py_DecRef(*o);
        *o = NULL;
    }
}

#endif
