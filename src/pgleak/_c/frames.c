/* pgleak._speedups, part: interpreter frames, version shims, a code object's cached verdict.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

/* The hot path's code, kept together. On the asyncio paths the library's own cycle is far larger
 * than the 32 KB instruction cache, so pgleak's lines are cold at every cycle and each line its
 * common path touches costs a miss (a cache simulation: about one per ten instructions). A rare
 * case in a helper marked ``PGLEAK_COLD`` is compiled apart (GCC's ``.text.unlikely``), and the
 * branch that calls it counts as never taken, so the common path's code stays on fewer lines;
 * ``PGLEAK_UNLIKELY`` says the same of a test (an error check) without a helper. */
#if defined(__GNUC__) || defined(__clang__)
#  define PGLEAK_COLD __attribute__((cold, noinline))
#  define PGLEAK_NOINLINE __attribute__((noinline))
#  define PGLEAK_UNLIKELY(x) __builtin_expect(!!(x), 0)
#  define PGLEAK_LIKELY(x) __builtin_expect(!!(x), 1)
#else
#  define PGLEAK_COLD
#  define PGLEAK_NOINLINE
#  define PGLEAK_UNLIKELY(x) (x)
#  define PGLEAK_LIKELY(x) (x)
#endif

/* From 3.11 a frame is a _PyInterpreterFrame, and a PyFrameObject is made for it only when
 * asked for: each PyFrame_GetBack() of a walk allocates one (and its deallocation follows),
 * several hundred instructions a frame, for frames the walk mostly passes over (SQLAlchemy's
 * asyncio checkout crosses some twenty made anew every time). The asyncio walk below reads the
 * interpreter frames themselves, as PyFrame_GetBack() does (the frame it would give is the
 * first complete one in the ``previous`` chain), and makes a frame object only for a frame it
 * hands back to Python. The header is CPython's internal one, of the version built against,
 * as greenlet and the profilers use it; 3.10's frames are objects already. Only for the
 * versions whose frame layout this was checked against (3.11 to 3.13): a later one walks frame
 * objects, as 3.10 does, until it has been checked too. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000
#  define PGLEAK_IFRAMES 1
#  ifndef Py_BUILD_CORE
#    define Py_BUILD_CORE 1
#  endif
#  include <internal/pycore_frame.h>
#  undef Py_BUILD_CORE

typedef struct _PyInterpreterFrame iframe;

static inline PyCodeObject *
iframe_code(iframe *f)
{
#  if PY_VERSION_HEX >= 0x030D0000
    return _PyFrame_GetCode(f);
#  else
    return f->f_code;
#  endif
}

/* PyFrame_GetBack()'s choice, without the frame object: the first complete frame back. */
static inline iframe *
iframe_back(iframe *f)
{
    f = f->previous;
    while (f != NULL && _PyFrame_IsIncomplete(f)) {
        f = f->previous;
    }
    return f;
}

/* PyFrame_GetLasti() of the frame's object. */
static inline int
iframe_lasti(iframe *f)
{
    int lasti = _PyInterpreterFrame_LASTI(f);
    return lasti < 0 ? -1 : lasti * (int)sizeof(_Py_CODEUNIT);
}
#endif

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
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000
    return PyFrame_GetLasti(frame);
#else
    /* 3.10 counts instructions; Python's frame.f_lasti reports bytes. */
    return frame->f_lasti < 0 ? -1 : frame->f_lasti * (int)sizeof(_Py_CODEUNIT);
#endif
}

/* The cached verdict for ``code``: by its file, or for code of a pseudo-file ("<string>",
 * a library's generated wrappers) by what Python learnt of it from its frame's module
 * (``pseudo``: id(code) -> (code, verdict)). UNKNOWN when neither cache knows. */
static long file_verdict(PyObject *cache, PyObject *file);

static long
verdict_of(PyObject *cache, PyObject *pseudo, PyCodeObject *code)
{
#if PY_VERSION_HEX < 0x030E0000
    long known = file_verdict(cache, code->co_filename); /* the table below */
    if (known >= 0) {
        return known;
    }
#endif
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
