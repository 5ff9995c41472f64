/* pgleak._speedups: the checkout stack walk, in C.
 *
 * Every checkout records up to ``stack_depth`` (code, f_lasti) pairs. In Python each frame costs
 * three attribute reads, two appends and the loop's own bytecode, about 100 ns: 1.6 us of a
 * 16-frame stack, more than everything else a checkout does. Here it is a pointer walk.
 *
 * The verdicts (keep / skip / stop at the event loop / ask the frame's module) stay in Python
 * (pgleak/_stack.py): this module only reads their cache, a dict from ``co_filename`` to an
 * int, and hands the frame back to Python whenever the cache has no answer, so there is one
 * definition of which frames count. pgleak runs the same walk in Python when this module is
 * absent (no compiler at install time) or disabled (``PGLEAK_NO_SPEEDUPS=1``).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>

#if PY_VERSION_HEX < 0x030D0000
/* 3.13's PyObject_GetOptionalAttr: 1 found, 0 absent (no error set), -1 error. */
static int
PyObject_GetOptionalAttr(PyObject *obj, PyObject *name, PyObject **result)
{
    *result = PyObject_GetAttr(obj, name);
    if (*result != NULL) {
        return 1;
    }
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}
#endif

/* The verdicts of pgleak._stack (_KEEP, _SKIP, _SKIP_LOOP; anything else: ask Python). */
#define KEEP 0
#define SKIP 1
#define SKIP_LOOP 2
#define UNKNOWN -100

static int
frame_lasti(PyFrameObject *frame)
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyFrame_GetLasti(frame);
#else
    /* 3.10 counts instructions; Python's frame.f_lasti reports bytes. */
    return frame->f_lasti < 0 ? -1 : frame->f_lasti * (int)sizeof(_Py_CODEUNIT);
#endif
}

/* The cached verdict for ``code``: by its file, or for code of a pseudo-file ("<string>",
 * a library's generated wrappers) by what Python learnt of it from its frame's module
 * (``pseudo``: id(code) -> (code, verdict)). UNKNOWN when neither cache knows. */
static long
verdict_of(PyObject *cache, PyObject *pseudo, PyCodeObject *code)
{
    PyObject *hit = PyDict_GetItemWithError(cache, code->co_filename); /* borrowed */
    if (hit == NULL || !PyLong_CheckExact(hit)) {
        return UNKNOWN;
    }
    long verdict = PyLong_AsLong(hit);
    if (verdict == -1 && PyErr_Occurred()) {
        return UNKNOWN;
    }
    if (verdict >= 0) {
        return verdict;
    }
    PyObject *key = PyLong_FromVoidPtr(code);
    if (key == NULL) {
        return UNKNOWN;
    }
    PyObject *seen = PyDict_GetItemWithError(pseudo, key); /* borrowed */
    Py_DECREF(key);
    if (seen == NULL || !PyTuple_CheckExact(seen) || PyTuple_GET_SIZE(seen) != 2
        || PyTuple_GET_ITEM(seen, 0) != (PyObject *)code
        || !PyLong_CheckExact(PyTuple_GET_ITEM(seen, 1))) {
        return UNKNOWN;
    }
    verdict = PyLong_AsLong(PyTuple_GET_ITEM(seen, 1));
    return (verdict == -1 && PyErr_Occurred()) ? UNKNOWN : verdict;
}

/* Append (code, lasti) of ``frame`` to ``out``; -1 on error. */
static int
record(PyObject *out, PyFrameObject *frame, PyCodeObject *code)
{
    PyObject *lasti = PyLong_FromLong(frame_lasti(frame));
    if (lasti == NULL) {
        return -1;
    }
    int failed = PyList_Append(out, (PyObject *)code) < 0 || PyList_Append(out, lasti) < 0;
    Py_DECREF(lasti);
    return failed ? -1 : 0;
}

/* The next frame out (a new reference, or NULL at the bottom); steals ``frame``. */
static PyFrameObject *
back(PyFrameObject *frame)
{
    PyFrameObject *older = PyFrame_GetBack(frame);
    Py_DECREF(frame);
    return older;
}

PyDoc_STRVAR(capture_doc,
"capture(frame, limit, cache, pseudo) -> tuple | None\n\n"
"pgleak._stack.capture() for a thread: the frames from ``frame`` outwards whose cached\n"
"verdict is to skip are passed over, then up to ``limit`` frames are recorded as a flat\n"
"(code, lasti, ...) tuple. None when a frame to judge has no cached verdict (Python judges it\n"
"and fills the caches; the next call succeeds).");

static PyObject *
capture(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    /* METH_FASTCALL, and the pairs gathered in a buffer before one tuple is built: this runs
     * on every checkout, where argument parsing and a list would be a third of the cost. */
    if (nargs != 4 || !PyFrame_Check(args[0]) || !PyLong_Check(args[1])
        || !PyDict_Check(args[2]) || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "capture(frame, limit: int, cache: dict, pseudo: dict)");
        return NULL;
    }
    PyObject *cache = args[2], *pseudo = args[3];
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit < 0) {
        limit = 0;
    }
    PyFrameObject *frame = (PyFrameObject *)Py_NewRef(args[0]);
    while (frame != NULL) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        long verdict = verdict_of(cache, pseudo, code);
        Py_DECREF(code);
        if (verdict == UNKNOWN) {
            Py_DECREF(frame);
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        if (verdict == KEEP) {
            break;
        }
        frame = back(frame);
    }
    PyObject *small[64];
    PyObject **items = small;
    if (2 * limit > 64) {
        items = PyMem_Malloc(2 * (size_t)limit * sizeof(PyObject *));
        if (items == NULL) {
            Py_XDECREF(frame);
            return PyErr_NoMemory();
        }
    }
    Py_ssize_t n = 0;
    int failed = 0;
    while (frame != NULL && n < 2 * limit) {
        PyObject *lasti = PyLong_FromLong(frame_lasti(frame));
        if (lasti == NULL) {
            failed = 1;
            break;
        }
        items[n++] = (PyObject *)PyFrame_GetCode(frame);
        items[n++] = lasti;
        frame = back(frame);
    }
    Py_XDECREF(frame);
    PyObject *result = failed ? NULL : PyTuple_New(n);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (result != NULL) {
            PyTuple_SET_ITEM(result, i, items[i]); /* steals */
        }
        else {
            Py_DECREF(items[i]);
        }
    }
    if (items != small) {
        PyMem_Free(items);
    }
    return result;
}

PyDoc_STRVAR(walk_doc,
"walk(frame, limit, cache, pseudo, out) -> (status, frame)\n\n"
"The classifying walk of pgleak._stack._capture_in_task: from ``frame`` outwards, frames to\n"
"keep are appended to the list ``out`` as (code, lasti) until ``out`` holds ``limit`` pairs;\n"
"frames to skip are passed over. Returns why it stopped, with the frame it stopped at:\n"
"0 ``out`` is full; 1 the chain ended (frame None); 2 ``frame`` is the event loop's;\n"
"3 ``frame`` has no cached verdict (Python judges it, and goes on from the frame after it).");

static PyObject *
walk(PyObject *module, PyObject *args)
{
    PyObject *start, *cache, *pseudo, *out;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "OnO!O!O!:walk", &start, &limit, &PyDict_Type, &cache,
                          &PyDict_Type, &pseudo, &PyList_Type, &out)) {
        return NULL;
    }
    if (!PyFrame_Check(start)) {
        PyErr_SetString(PyExc_TypeError, "walk() needs a frame");
        return NULL;
    }
    PyFrameObject *frame = (PyFrameObject *)Py_NewRef(start);
    int status = 1;
    while (frame != NULL) {
        if (PyList_GET_SIZE(out) >= 2 * limit) {
            status = 0;
            break;
        }
        PyCodeObject *code = PyFrame_GetCode(frame);
        long verdict = verdict_of(cache, pseudo, code);
        if (verdict == KEEP) {
            int failed = record(out, frame, code);
            Py_DECREF(code);
            if (failed) {
                Py_DECREF(frame);
                return NULL;
            }
        }
        else {
            Py_DECREF(code);
            if (verdict == SKIP_LOOP) {
                status = 2;
                break;
            }
            if (verdict != SKIP) {
                if (PyErr_Occurred()) {
                    Py_DECREF(frame);
                    return NULL;
                }
                status = 3;
                break;
            }
        }
        frame = back(frame);
    }
    if (frame == NULL) {
        return Py_BuildValue("(iO)", status, Py_None);
    }
    return Py_BuildValue("(iN)", status, (PyObject *)frame);
}

PyDoc_STRVAR(chain_complete_doc,
"chain_complete(out, coro, cache, pseudo) -> bool\n\n"
"Whether every frame of the coroutine chain from ``coro`` (a task's coroutine, then what each\n"
"awaits, through ``cr_await`` / ``gi_yieldfrom``) that the caches say to keep is among the\n"
"codes of ``out`` already: then pgleak._stack._add_task_chain has nothing to add, which is\n"
"nearly always. False when one is missing, or a verdict is not cached: Python decides.");

static int
chain_link(PyObject *obj, PyObject *first, PyObject *second, PyObject **result)
{
    /* ``getattr(obj, first, None) or getattr(obj, second, None)``; -1 on a real error. */
    PyObject *value = NULL;
    if (PyObject_GetOptionalAttr(obj, first, &value) < 0) {
        return -1;
    }
    if (value == NULL || value == Py_None) {
        Py_XDECREF(value);
        if (PyObject_GetOptionalAttr(obj, second, &value) < 0) {
            return -1;
        }
        if (value == Py_None) {
            Py_CLEAR(value);
        }
    }
    *result = value;
    return 0;
}

static PyObject *s_cr_frame, *s_gi_frame, *s_cr_await, *s_gi_yieldfrom;

static PyObject *
chain_complete(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_Check(args[0]) || !PyDict_Check(args[2])
        || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "chain_complete(out: list, coro, cache, pseudo)");
        return NULL;
    }
    PyObject *out = args[0], *cache = args[2], *pseudo = args[3];
    PyObject *coro = Py_NewRef(args[1]);
    int complete = 1;
    for (int depth = 0; depth < 64 && coro != NULL && coro != Py_None && complete; depth++) {
        PyObject *frame = NULL, *next = NULL;
        if (chain_link(coro, s_cr_frame, s_gi_frame, &frame) < 0) {
            Py_DECREF(coro);
            return NULL;
        }
        if (frame == NULL) {
            break;
        }
        if (!PyFrame_Check(frame)) {
            Py_DECREF(frame);
            complete = 0;
            break;
        }
        PyCodeObject *code = PyFrame_GetCode((PyFrameObject *)frame);
        long verdict = verdict_of(cache, pseudo, code);
        if (verdict == UNKNOWN) {
            PyErr_Clear();
            complete = 0;
        }
        else if (verdict == KEEP) {
            int found = 0;
            Py_ssize_t n = PyList_GET_SIZE(out);
            for (Py_ssize_t i = 0; i < n; i += 2) {
                if (PyList_GET_ITEM(out, i) == (PyObject *)code) {
                    found = 1;
                    break;
                }
            }
            complete = found;
        }
        Py_DECREF(code);
        Py_DECREF(frame);
        if (chain_link(coro, s_cr_await, s_gi_yieldfrom, &next) < 0) {
            Py_DECREF(coro);
            return NULL;
        }
        Py_SETREF(coro, next);
    }
    Py_XDECREF(coro);
    return PyBool_FromLong(complete);
}

static PyMethodDef methods[] = {
    {"capture", (PyCFunction)(void (*)(void))capture, METH_FASTCALL, capture_doc},
    {"walk", walk, METH_VARARGS, walk_doc},
    {"chain_complete", (PyCFunction)(void (*)(void))chain_complete, METH_FASTCALL,
     chain_complete_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pgleak._speedups",
    .m_doc = "The checkout stack walk, in C (see pgleak/_stack.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    s_cr_frame = PyUnicode_InternFromString("cr_frame");
    s_gi_frame = PyUnicode_InternFromString("gi_frame");
    s_cr_await = PyUnicode_InternFromString("cr_await");
    s_gi_yieldfrom = PyUnicode_InternFromString("gi_yieldfrom");
    if (!s_cr_frame || !s_gi_frame || !s_cr_await || !s_gi_yieldfrom) {
        return NULL;
    }
    return PyModule_Create(&speedups);
}
