/* pgleak._speedups: the checkout hot path, in C - the stack walk, the ledger, the checkout
 * and checkin wrappers that call the ledger (``Tracked``: sync, and asyncio ones that return
 * an awaitable), and the awaitables that let an asyncio pool's wrappers do without a
 * coroutine of their own.
 *
 * Every checkout records up to ``stack_depth`` (code, f_lasti) pairs. In Python each frame costs
 * three attribute reads, two appends and the loop's own bytecode, about 100 ns: 1.6 us of a
 * 16-frame stack, more than everything else a checkout did. Here it is a pointer walk.
 *
 * The verdicts (keep / skip / stop at the event loop / ask the frame's module) stay in Python
 * (pgleak/_stack.py): this module only reads their cache, a dict from ``co_filename`` to an
 * int, and hands the frame back to Python whenever the cache has no answer, so there is one
 * definition of which frames count. The ledger's ``checkout``/``checkin`` (second half of this
 * file) follow the same rule: the common path here, every rare one handed to Core's Python
 * methods, and so do the wrappers and the awaitables (last parts), which hand theirs to the
 * compiled Python templates they stand in for (an observer's, a call-site tag's, ...). pgleak
 * runs all of it in Python when this module is absent (no compiler at install time) or
 * disabled (``PGLEAK_NO_SPEEDUPS=1``).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <structmember.h>
#include <time.h>

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

/* ---- The files' verdicts, remembered by file name object, while the cache is unchanged ----
 *
 * Each frame of a walk looks its file's verdict up in pgleak._stack._skip_cache (verdict_near
 * saves the lookup only for a run of frames of one file): SQLAlchemy's asyncio checkout walks
 * through seven files, ~140 instructions each. A small table keyed by the file name object
 * answers the same for a few: it holds what the dict said, and is emptied whenever the dict
 * has changed at all (its version tag, which CPython changes on every insertion, deletion
 * and clear, and gives no other dict: what Python's register_library() or a test does to the
 * cache shows at once). Only a file's own verdict (not a pseudo-file's) is kept. The version
 * tag is deprecated from 3.12 and gone in 3.14: there, the dict is asked every time. */
#if PY_VERSION_HEX < 0x030E0000
#  define PGLEAK_VERDICT_TABLE 1
#  define VERDICT_SLOTS 256
static struct {
    PyObject *file; /* a strong reference, or NULL */
    long verdict;
} verdict_table[VERDICT_SLOTS];
static PyObject *verdict_dict = NULL; /* the dict the table is of: a strong reference */
static uint64_t verdict_version = 0;

static inline uint64_t
dict_version(PyObject *dict)
{
#  if defined(__GNUC__) || defined(__clang__)
#    pragma GCC diagnostic push
#    pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#  endif
    return ((PyDictObject *)dict)->ma_version_tag;
#  if defined(__GNUC__) || defined(__clang__)
#    pragma GCC diagnostic pop
#  endif
}

/* The verdict of ``file`` (>= 0) as the dict ``cache`` has it, or -1: not a file's own
 * verdict there (absent, a pseudo-file's, not an int; nor is an error left set). */
static long
file_verdict(PyObject *cache, PyObject *file)
{
    if (!PyDict_CheckExact(cache)) {
        return -1;
    }
    uint64_t version = dict_version(cache);
    if (cache != verdict_dict || version != verdict_version) {
        for (int i = 0; i < VERDICT_SLOTS; i++) {
            Py_CLEAR(verdict_table[i].file);
        }
        Py_INCREF(cache);
        Py_XSETREF(verdict_dict, cache);
        verdict_version = version;
    }
    Py_hash_t hash = PyObject_Hash(file); /* a str's: kept in it, well spread */
    if (hash == -1) {
        PyErr_Clear();
        return -1;
    }
    size_t slot = (size_t)hash % VERDICT_SLOTS;
    if (verdict_table[slot].file == file) {
        return verdict_table[slot].verdict;
    }
    PyObject *hit = PyDict_GetItemWithError(cache, file); /* borrowed */
    if (hit == NULL || !PyLong_CheckExact(hit)) {
        PyErr_Clear();
        return -1;
    }
    long verdict = PyLong_AsLong(hit);
    if (verdict < 0) {
        PyErr_Clear();
        return -1;
    }
    Py_INCREF(file);
    Py_XSETREF(verdict_table[slot].file, file);
    verdict_table[slot].verdict = verdict;
    return verdict;
}
#endif

/* verdict_of(), remembering the last file's verdict for the next frame (neighbouring frames
 * are often of one file; the file name is the cache's key, so the same object gives the same
 * answer). Only a file's own verdict is remembered: a pseudo-file's ("<string>", shared by
 * the code of unrelated modules) is per code object. */
static inline long
verdict_near(PyObject *cache, PyObject *pseudo, PyCodeObject *code, PyObject **last_file,
             long *last_verdict)
{
    if (code->co_filename == *last_file) {
        return *last_verdict;
    }
#ifdef PGLEAK_VERDICT_TABLE
    long known = file_verdict(cache, code->co_filename);
    if (known >= 0) {
        *last_file = code->co_filename;
        *last_verdict = known;
        return known;
    }
#endif
    PyObject *hit = PyDict_GetItemWithError(cache, code->co_filename); /* borrowed */
    if (hit != NULL && PyLong_CheckExact(hit)) {
        long verdict = PyLong_AsLong(hit);
        if (verdict >= 0) {
            *last_file = code->co_filename;
            *last_verdict = verdict;
            return verdict;
        }
    }
    *last_file = NULL;
    return verdict_of(cache, pseudo, code);
}

/* ``lasti`` as an int object (a new reference). The stack records one per frame, and
 * CPython keeps ready-made ints only up to 256: beyond, each was an allocation (and its
 * deallocation when the lease goes). Offsets are even and most code is short, so the ints of
 * the first few thousand offsets are made once and shared. */
#define LASTI_CACHED 4096
static PyObject *lasti_ints[LASTI_CACHED / 2];

static PyObject *
lasti_int(int lasti)
{
    if (lasti < 0 || lasti >= LASTI_CACHED || (lasti & 1)) {
        return PyLong_FromLong(lasti);
    }
    PyObject **slot = &lasti_ints[lasti / 2];
    if (*slot == NULL) {
        *slot = PyLong_FromLong(lasti);
        if (*slot == NULL) {
            return NULL;
        }
    }
    return Py_NewRef(*slot);
}

/* Append (code, lasti) of ``frame`` to ``out``; -1 on error. */
static int
record(PyObject *out, PyFrameObject *frame, PyCodeObject *code)
{
    PyObject *lasti = lasti_int(frame_lasti(frame));
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

/* The ``n`` gathered references of ``items`` (new ones) as one tuple, or, when ``failed`` or
 * the tuple cannot be made, released (NULL). ``items`` is freed unless it is ``small``, the
 * caller's buffer on its stack. */
static PyObject *
pairs_tuple(PyObject **items, Py_ssize_t n, int failed, PyObject **small)
{
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
    return pairs_tuple(items, n, failed, small);
}

PyDoc_STRVAR(walk_doc,
"walk(frame, limit, cache, pseudo, out) -> (status, frame)\n\n"
"The classifying walk of pgleak._stack._capture_in_task: from ``frame`` outwards, frames to\n"
"keep are appended to the list ``out`` as (code, lasti) until ``out`` holds ``limit`` pairs;\n"
"frames to skip are passed over. Returns why it stopped, with the frame it stopped at:\n"
"0 ``out`` is full; 1 the chain ended (frame None); 2 ``frame`` is the event loop's;\n"
"3 ``frame`` has no cached verdict (Python judges it, and goes on from the frame after it).");

static PyObject *
walk(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    /* METH_FASTCALL: every asyncio checkout calls this once or more. */
    if (nargs != 5 || !PyFrame_Check(args[0]) || !PyLong_Check(args[1])
        || !PyDict_Check(args[2]) || !PyDict_Check(args[3]) || !PyList_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "walk(frame, limit: int, cache: dict, pseudo: dict, out: list)");
        return NULL;
    }
    PyObject *start = args[0], *cache = args[2], *pseudo = args[3], *out = args[4];
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int status = 1;
    PyObject *last_file = NULL; /* see verdict_near() */
    long last_verdict = UNKNOWN;
#ifdef PGLEAK_IFRAMES
    /* The same walk over the interpreter frames (see iframe_back), for a frame that is
     * running or suspended (its object's f_back is set only once it has finished). */
    if (((PyFrameObject *)start)->f_back == NULL) {
        iframe *f = ((PyFrameObject *)start)->f_frame;
        Py_ssize_t steps = 0;
        while (f != NULL) {
            if (PyList_GET_SIZE(out) >= 2 * limit) {
                status = 0;
                break;
            }
            PyCodeObject *code = iframe_code(f);
            long verdict = verdict_near(cache, pseudo, code, &last_file, &last_verdict);
            if (verdict == KEEP) {
                PyObject *lasti = lasti_int(iframe_lasti(f));
                if (lasti == NULL) {
                    return NULL;
                }
                int failed = PyList_Append(out, (PyObject *)code) < 0
                             || PyList_Append(out, lasti) < 0;
                Py_DECREF(lasti);
                if (failed) {
                    return NULL;
                }
            }
            else if (verdict == SKIP_LOOP) {
                status = 2;
                break;
            }
            else if (verdict != SKIP) {
                if (PyErr_Occurred()) {
                    return NULL;
                }
                status = 3;
                break;
            }
            f = iframe_back(f);
            steps++;
        }
        PyObject *frame = NULL;
        if (status == 3) {
            /* Python judges this frame: its object, the same PyFrame_GetBack() steps away
             * from ``start`` (rare: once per file or pseudo-file code never seen before) */
            PyFrameObject *at = (PyFrameObject *)Py_NewRef(start);
            for (Py_ssize_t i = 0; i < steps && at != NULL; i++) {
                at = back(at);
            }
            frame = (PyObject *)at;
        }
        PyObject *code = PyLong_FromLong(status);
        if (code == NULL) {
            Py_XDECREF(frame);
            return NULL;
        }
        PyObject *result = PyTuple_Pack(2, code, frame == NULL ? Py_None : frame);
        Py_DECREF(code);
        Py_XDECREF(frame);
        return result;
    }
#endif
    PyFrameObject *frame = (PyFrameObject *)Py_NewRef(start);
    while (frame != NULL) {
        if (PyList_GET_SIZE(out) >= 2 * limit) {
            status = 0;
            break;
        }
        PyCodeObject *code = PyFrame_GetCode(frame);
        long verdict = verdict_near(cache, pseudo, code, &last_file, &last_verdict);
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
    PyObject *code = PyLong_FromLong(status);
    if (code == NULL) {
        Py_XDECREF(frame);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, code, frame == NULL ? Py_None : (PyObject *)frame);
    Py_DECREF(code);
    Py_XDECREF(frame);
    return result;
}

PyDoc_STRVAR(chain_complete_doc,
"chain_complete(out, coro, cache, pseudo) -> bool\n\n"
"Whether every frame of the coroutine chain from ``coro`` (a task's coroutine, then what each\n"
"awaits, through ``cr_await`` / ``gi_yieldfrom``) that the caches say to keep is among the\n"
"codes of ``out`` already: then pgleak._stack._add_task_chain has nothing to add, which is\n"
"nearly always. False when one is missing, or a verdict is not cached: Python decides.");

/* The getters behind ``cr_frame``/``cr_await`` of coroutines and ``gi_frame``/``gi_yieldfrom``
 * of generators, called directly: the chain of an asyncio checkout is as long as the await
 * chain, each link takes two reads, and the generic attribute lookup costs several times the
 * getter. Other awaitables (Cython's, frameworks' own) take the generic path. */
typedef struct {
    getter get;
    void *closure;
} link_getter;
static link_getter coro_frame, coro_await, gen_frame, gen_yieldfrom;

static int
find_getter(PyTypeObject *type, const char *name, link_getter *out)
{
    PyObject *descr = PyObject_GetAttrString((PyObject *)type, name);
    if (descr == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (Py_IS_TYPE(descr, &PyGetSetDescr_Type)) {
        PyGetSetDef *def = ((PyGetSetDescrObject *)descr)->d_getset;
        out->get = def->get;
        out->closure = def->closure;
    }
    Py_DECREF(descr);
    return 0;
}

/* ``getattr(obj, first, None) or getattr(obj, second, None)``; -1 on a real error. ``frame``:
 * the pair is (cr_frame, gi_frame), else (cr_await, gi_yieldfrom). */
static int
chain_link(PyObject *obj, PyObject *first, PyObject *second, int frame, PyObject **result)
{
    link_getter *fast = NULL;
    if (PyCoro_CheckExact(obj)) {
        fast = frame ? &coro_frame : &coro_await; /* a coroutine has no gi_ pair to fall to */
    }
    else if (PyGen_CheckExact(obj)) {
        fast = frame ? &gen_frame : &gen_yieldfrom; /* nor a generator a cr_ pair */
    }
    if (fast != NULL && fast->get != NULL) {
        PyObject *value = fast->get(obj, fast->closure);
        if (value == NULL) {
            return -1;
        }
        if (value == Py_None) {
            Py_CLEAR(value);
        }
        *result = value;
        return 0;
    }
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
static PyObject *s_cr_running, *s_gi_running;
static link_getter coro_running, gen_running;

/* Whether ``obj`` (a coroutine, a generator, or an object that says so) is running: 1, 0,
 * -1 on error. On 3.11 a running coroutine is not asked for ``cr_await`` (chain_in): CPython's
 * getter reads the instruction after the running one, which after a call is the call's inline
 * cache, and when its bytes happen to read as a RESUME takes whatever is at the top of the
 * running frame's value stack for the awaited object (a crash: a sync checkout made straight
 * from a task's coroutine body hit it). At an ``await``, the one place a running 3.11
 * coroutine has something to answer, the next instruction is a YIELD_VALUE and it answers
 * None anyway. 3.10 reads real instructions (no inline caches) and answers for a coroutine
 * running an ``await``. 3.12 (3.12.1 at least) reads the same cache of a running frame at a
 * ``SEND`` into a C awaitable and crashed there as well, and answers None otherwise: not asked
 * either; 3.13 reads only a suspended frame. (pgleak._stack, the same.) */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
static int
is_running(PyObject *obj)
{
    link_getter *fast = NULL;
    if (PyCoro_CheckExact(obj)) {
        fast = &coro_running;
    }
    else if (PyGen_CheckExact(obj)) {
        fast = &gen_running;
    }
    PyObject *value = NULL;
    if (fast != NULL && fast->get != NULL) {
        value = fast->get(obj, fast->closure);
        if (value == NULL) {
            return -1;
        }
    }
    else {
        if (PyObject_GetOptionalAttr(obj, s_cr_running, &value) < 0) {
            return -1;
        }
        if (value == NULL && PyObject_GetOptionalAttr(obj, s_gi_running, &value) < 0) {
            return -1;
        }
        if (value == NULL) {
            return 0;
        }
    }
    int running = PyObject_IsTrue(value);
    Py_DECREF(value);
    return running;
}
#endif

/* chain_complete() over the pairs ``items[0:n]``: 1 complete, 0 not, -1 error. */
static int
chain_in(PyObject *const *items, Py_ssize_t n, PyObject *start, PyObject *cache,
         PyObject *pseudo)
{
    PyObject *coro = Py_NewRef(start);
    int complete = 1;
    for (int depth = 0; depth < 64 && coro != NULL && coro != Py_None && complete; depth++) {
        PyObject *frame = NULL, *next = NULL;
        if (chain_link(coro, s_cr_frame, s_gi_frame, 1, &frame) < 0) {
            Py_DECREF(coro);
            return -1;
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
            for (Py_ssize_t i = 0; i < n; i += 2) {
                if (items[i] == (PyObject *)code) {
                    found = 1;
                    break;
                }
            }
            complete = found;
        }
        Py_DECREF(code);
        Py_DECREF(frame);
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
        int running = is_running(coro);
        if (running < 0) {
            Py_DECREF(coro);
            return -1;
        }
        if (running) {
            break; /* 3.11, 3.12: not asked, and it would answer None (see is_running) */
        }
#endif
        if (chain_link(coro, s_cr_await, s_gi_yieldfrom, 0, &next) < 0) {
            Py_DECREF(coro);
            return -1;
        }
        Py_SETREF(coro, next);
    }
    Py_XDECREF(coro);
    return complete;
}

static PyObject *
chain_complete(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_Check(args[0]) || !PyDict_Check(args[2])
        || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "chain_complete(out: list, coro, cache, pseudo)");
        return NULL;
    }
    PyObject *out = args[0];
    int complete = chain_in(&PyList_GET_ITEM(out, 0), PyList_GET_SIZE(out), args[1], args[2],
                            args[3]);
    return complete < 0 ? NULL : PyBool_FromLong(complete);
}

/* ---- The ledger's hot path: Core.checkout / Core.checkin (pgleak/_core.py) -------------
 *
 * With the stack walk in C, what was left of a checkout's cost was the bookkeeping's Python
 * bytecode: ~40 attribute reads and stores, a 19-slot Lease.__init__, a weak reference with two
 * attributes, two dict inserts (and the pops at checkin), ~1.8 us a cycle. Here it is the same
 * steps, in the same order, on the same objects: the Lease and _ConnRef classes stay Python
 * classes with __slots__ (every other part of pgleak reads them as before); this code allocates
 * them and fills their slots at the offsets their member descriptors give. Whatever is rare
 * (keyword arguments, a stale entry, the tracking bound, the watchdog's first start, an
 * observer, a collected connection) is handed to Core's Python methods, so there is one
 * definition of every decision. ``bind()`` is given the names once, at import; Core binds
 * these functions to itself only when ``bind()`` succeeded. */

enum {
    L_CLOSED, L_CONTEXT, L_DEADLINE, L_FLAGGED, L_GENERATION, L_ID, L_KEY, L_OTEL, L_POOL,
    L_PROBE, L_RAW, L_REF, L_REPORTED, L_SELF_RETURNING, L_T0, L_T_IN, L_TASK, L_THREAD,
    L_UNSEEN_CLOSE, L_COUNT
};
static const char *lease_slots[L_COUNT] = {
    "closed", "context", "deadline", "flagged", "generation", "id", "key", "otel", "pool",
    "probe", "raw", "ref", "reported", "self_returning", "t0", "t_in", "task", "thread",
    "unseen_close",
};
static Py_ssize_t lease_off[L_COUNT];
static Py_ssize_t ref_key_off, ref_lease_id_off;

/* What bind() was given (strong references, kept for the life of the process). */
static PyTypeObject *lease_type, *connref_type;
static PyObject *b_suppressed, *b_allowance, *b_context;         /* ContextVars */
/* Their values at bind() (_core's import, before anything could set them): their defaults.
 * Until ``vars_set()`` is called (by every pgleak function that sets one of them, before it
 * does) none of them holds anything else in any context, and a checkout takes these instead
 * of reading them (three lookups in the context, ~170 instructions a checkout, for a process
 * that never labels, suppresses or allows a long hold). */
static PyObject *var_defaults[3];
static int vars_used = 0;
static PyObject *b_get_running_loop, *b_current_task, *b_monotonic;
static PyObject *b_thread_identity, *b_core_globals;
static PyObject *b_capture_from, *b_capture_in_task, *b_skip_cache, *b_pseudo;
static PyObject *b_parent_greenlet_frame, *b_add_task_chain;
static PyObject *b_checkout_py, *b_checkin_py, *b_returned;
static int bound = 0;
/* b_monotonic is time.monotonic itself, so clock_now() may read the clock without calling it */
static int own_clock = 0;
/* _ConnRef adds no __init__ of its own: a weak reference is made by tp_new alone */
static int connref_plain = 0;

static PyObject *s_settings, *s_enabled, *s_max_tracked, *s_leak_threshold, *s_capture_stack,
    *s_stack_depth, *s_leases, *s_by_conn, *s_ids, *s_watchdog, *s_thread, *s_observer,
    *s_waker, *s_collected, *s_get_name, *s_generation, *s_pending,
    *s_after_checkout, *s_forget, *s_on_collected, *s_wake_gate, *s_thread_key, *s_append,
    *s_get_coro, *s_greenlet, *s_getcurrent, *s_parent, *s_gr_frame, *s_observe_checkin;

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))
/* A slot of an object just allocated (NULL): stores a new reference, stealing ``value``. */
#define SLOT_FILL(obj, off, value) (SLOT(obj, off) = (value))

/* Store a new reference in a slot (stealing ``value``), dropping what was there. */
static inline void
slot_set(PyObject *obj, Py_ssize_t off, PyObject *value)
{
    PyObject *old = SLOT(obj, off);
    SLOT(obj, off) = value;
    Py_XDECREF(old);
}

/* The referent of a weak reference, as a new reference, or NULL if it is dead. */
static inline PyObject *
ref_target(PyObject *ref)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *obj = NULL;
    if (PyWeakref_GetRef(ref, &obj) < 0) {
        PyErr_Clear();
        return NULL;
    }
    return obj;
#else
    PyObject *obj = PyWeakref_GET_OBJECT(ref);
    return obj == Py_None ? NULL : Py_NewRef(obj);
#endif
}

static int
member_offset(PyObject *type, const char *name, Py_ssize_t *offset)
{
    PyObject *descr = PyObject_GetAttrString(type, name);
    if (descr == NULL) {
        return -1;
    }
    if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        Py_DECREF(descr);
        PyErr_Format(PyExc_TypeError, "%s is not a slot", name);
        return -1;
    }
    PyMemberDef *def = ((PyMemberDescrObject *)descr)->d_member;
    if (def->type != T_OBJECT_EX) {
        Py_DECREF(descr);
        PyErr_Format(PyExc_TypeError, "%s is not an object slot", name);
        return -1;
    }
    *offset = def->offset;
    Py_DECREF(descr);
    return 0;
}

static PyObject *
take(PyObject *ns, const char *name)
{
    PyObject *value = PyDict_GetItemString(ns, name); /* borrowed */
    if (value == NULL) {
        PyErr_Format(PyExc_KeyError, "bind(): %s missing", name);
        return NULL;
    }
    return Py_NewRef(value);
}

/* ``id(conn)``, the key ``by_conn`` files a lease under (a new reference). The ints made for
 * recent connections are kept, by address, and handed out again: a checkin's lookup then
 * uses the very object its checkout filed, which the dict matches by identity (no int made,
 * no int comparison: ~150 instructions a lookup). An int is immutable: any equal one would
 * do, this is only the cheapest. */
#define CONN_KEYS 8
static PyObject *conn_keys[CONN_KEYS];
static void *conn_addrs[CONN_KEYS];

static PyObject *
conn_key(PyObject *conn)
{
    size_t i = ((uintptr_t)conn >> 4) % CONN_KEYS;
    if (conn_addrs[i] == (void *)conn && conn_keys[i] != NULL) {
        return Py_NewRef(conn_keys[i]);
    }
    PyObject *key = PyLong_FromVoidPtr(conn);
    if (key != NULL) {
        Py_XSETREF(conn_keys[i], Py_NewRef(key));
        conn_addrs[i] = (void *)conn;
    }
    return key;
}

/* Lease's tp_dealloc. A slotted Python class is freed by the generic subtype_dealloc, which
 * looks for finalizers, weak references and a __dict__ the class does not have and clears the
 * slots by walking their member definitions: ~300 instructions a lease on the hot path. This
 * does what subtype_dealloc comes to for Lease (no __del__, no __weakref__, no __dict__, its
 * base ``object``): untrack, drop the 19 slots, free, drop the instance's reference to its
 * type. A subclass's instance (none in pgleak) reaches it from subtype_dealloc, which has
 * cleared the subclass's own slots and left the type's reference to the base it calls. */
static void
lease_dealloc(PyObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    for (int i = 0; i < L_COUNT; i++) {
        Py_CLEAR(SLOT(self, lease_off[i]));
    }
    type->tp_free(self);
    Py_DECREF(type);
}

/* Whether Lease is exactly what lease_dealloc() frees: slots only, its base object. */
static int
lease_plain(PyTypeObject *type)
{
    return type->tp_base == &PyBaseObject_Type && type->tp_dictoffset == 0
           && type->tp_weaklistoffset == 0 && type->tp_finalize == NULL && type->tp_del == NULL
           && (type->tp_flags & Py_TPFLAGS_HEAPTYPE) && PyType_IS_GC(type)
           && type->tp_basicsize == (Py_ssize_t)(sizeof(PyObject) + L_COUNT * sizeof(PyObject *))
           && type->tp_free == PyObject_GC_Del;
}

/* _ConnRef's tp_dealloc, for the same reason: a weak reference with two slots, freed as
 * subtype_dealloc would (the slots, then weakref's own dealloc, then the type's reference). */
static destructor ref_base_dealloc;

static void
connref_dealloc(PyObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Py_CLEAR(SLOT(self, ref_key_off));
    Py_CLEAR(SLOT(self, ref_lease_id_off));
    ref_base_dealloc(self);
    Py_DECREF(type);
}

static int
connref_plainly_slotted(PyTypeObject *type)
{
    return type->tp_base == &_PyWeakref_RefType && type->tp_dictoffset == 0
           && type->tp_weaklistoffset == 0 && type->tp_finalize == NULL && type->tp_del == NULL
           && (type->tp_flags & Py_TPFLAGS_HEAPTYPE) && PyType_IS_GC(type)
           && type->tp_basicsize
                  == (Py_ssize_t)(sizeof(PyWeakReference) + 2 * sizeof(PyObject *))
           && _PyWeakref_RefType.tp_dealloc != NULL;
}

PyDoc_STRVAR(bind_doc,
"bind(names: dict) -> None\n\n"
"Give the ledger functions the objects of pgleak._core and pgleak._stack they work with\n"
"(see pgleak._cledger.bind). Raises if anything is not as expected: Core then keeps its\n"
"Python methods.");

static PyObject *
bind(PyObject *module, PyObject *ns)
{
    if (!PyDict_Check(ns)) {
        PyErr_SetString(PyExc_TypeError, "bind(names: dict)");
        return NULL;
    }
    if (bound) {
        Py_RETURN_NONE;
    }
    PyObject *lease = take(ns, "Lease"), *connref = take(ns, "_ConnRef");
    if (lease == NULL || connref == NULL || !PyType_Check(lease) || !PyType_Check(connref)) {
        Py_XDECREF(lease);
        Py_XDECREF(connref);
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "bind(): Lease and _ConnRef must be classes");
        }
        return NULL;
    }
    if (((PyTypeObject *)lease)->tp_dictoffset != 0
        || !PyType_IsSubtype((PyTypeObject *)connref, &_PyWeakref_RefType)) {
        Py_DECREF(lease);
        Py_DECREF(connref);
        PyErr_SetString(PyExc_TypeError, "bind(): Lease must be slotted, _ConnRef a weakref");
        return NULL;
    }
    for (int i = 0; i < L_COUNT; i++) {
        if (member_offset(lease, lease_slots[i], &lease_off[i]) < 0) {
            Py_DECREF(lease);
            Py_DECREF(connref);
            return NULL;
        }
    }
    if (member_offset(connref, "key", &ref_key_off) < 0
        || member_offset(connref, "lease_id", &ref_lease_id_off) < 0) {
        Py_DECREF(lease);
        Py_DECREF(connref);
        return NULL;
    }
    PyObject **targets[] = {
        &b_suppressed, &b_allowance, &b_context, &b_get_running_loop, &b_current_task,
        &b_monotonic, &b_thread_identity, &b_core_globals,
        &b_capture_from, &b_capture_in_task, &b_skip_cache, &b_pseudo, &b_checkout_py,
        &b_checkin_py, &b_returned, &b_parent_greenlet_frame, &b_add_task_chain,
    };
    const char *names[] = {
        "suppressed", "allowance", "context", "get_running_loop", "current_task",
        "monotonic", "thread_identity", "core_globals",
        "capture_from", "capture_in_task", "skip_cache", "pseudo_codes", "checkout_py",
        "checkin_py", "RETURNED", "parent_greenlet_frame", "add_task_chain",
    };
    PyObject *got[sizeof(names) / sizeof(names[0])];
    size_t n = sizeof(names) / sizeof(names[0]);
    if (n != sizeof(targets) / sizeof(targets[0])) {
        Py_DECREF(lease);
        Py_DECREF(connref);
        PyErr_SetString(PyExc_SystemError, "bind(): names and targets differ");
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        got[i] = take(ns, names[i]);
        if (got[i] == NULL) {
            for (size_t j = 0; j < i; j++) {
                Py_DECREF(got[j]);
            }
            Py_DECREF(lease);
            Py_DECREF(connref);
            return NULL;
        }
    }
    for (size_t i = 0; i < n; i++) {
        Py_XSETREF(*targets[i], got[i]);
    }
    if (!PyContextVar_CheckExact(b_suppressed) || !PyContextVar_CheckExact(b_allowance)
        || !PyContextVar_CheckExact(b_context) || !PyDict_Check(b_core_globals)
        || !PyDict_Check(b_skip_cache) || !PyDict_Check(b_pseudo)) {
        Py_DECREF(lease);
        Py_DECREF(connref);
        PyErr_SetString(PyExc_TypeError, "bind(): unexpected types");
        return NULL; /* still unbound: nothing reads what was stored */
    }
    PyObject *vars[3] = {b_suppressed, b_allowance, b_context};
    for (int i = 0; i < 3; i++) {
        PyObject *value = NULL;
        if (PyContextVar_Get(vars[i], NULL, &value) < 0 || value == NULL) {
            Py_DECREF(lease);
            Py_DECREF(connref);
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "bind(): a context variable without a default");
            }
            return NULL; /* still unbound */
        }
        Py_XSETREF(var_defaults[i], value);
    }
    lease_type = (PyTypeObject *)lease;
    connref_type = (PyTypeObject *)connref;
    connref_plain = connref_type->tp_init == _PyWeakref_RefType.tp_init
                    && connref_type->tp_new == _PyWeakref_RefType.tp_new;
    PyObject *time = PyImport_ImportModule("time");
    PyObject *monotonic = time == NULL ? NULL : PyObject_GetAttrString(time, "monotonic");
    Py_XDECREF(time);
    if (monotonic == NULL) {
        return NULL; /* still unbound */
    }
    own_clock = monotonic == b_monotonic;
    Py_DECREF(monotonic);
    /* freed by the ledger's own deallocs, where the classes are as those expect */
    if (lease_plain(lease_type)) {
        lease_type->tp_dealloc = lease_dealloc;
    }
    if (connref_plainly_slotted(connref_type)) {
        ref_base_dealloc = _PyWeakref_RefType.tp_dealloc;
        connref_type->tp_dealloc = connref_dealloc;
    }
    bound = 1;
    Py_RETURN_NONE;
}

/* ``obj.name`` for a plain instance attribute, read from the instance's ``__dict__``: the
 * generic lookup first searches the type's MRO for a descriptor, which costs several times the
 * dict lookup, and the hot path reads a dozen such attributes (Core has no descriptors by these
 * names). Anything else is the generic lookup. A new reference. */
static PyObject *
attr(PyObject *obj, PyObject *name)
{
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL) {
        PyErr_Clear();
        return PyObject_GetAttr(obj, name);
    }
    PyObject *value = PyDict_Check(dict) ? PyDict_GetItemWithError(dict, name) : NULL;
    Py_XINCREF(value);
    Py_DECREF(dict);
    if (value == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        return PyObject_GetAttr(obj, name);
    }
    return value;
}

/* The core whose containers are read without a lookup (``adopt()``: pgleak's one process-wide
 * core). Its ledger dicts, id counter, collector callback and queue are never replaced (see
 * Core.reset_after_fork, which clears them), so they are held here; what does change (settings,
 * observer, waker, the watchdog's thread) is read from the instance dicts, kept here too. Any
 * other Core (tests make their own) goes through ``attr()``. */
static PyObject *a_core, *a_dict, *a_watchdog_dict;
/* The adopted core's rare-case answers are kept (see calm()): 1 while they are. */
static int calm_kept;
/* The adopted core's and its watchdog's attributes are stored in their dicts (see calm()). */
static int calm_possible;
static PyObject *a_leases, *a_by_conn, *a_ids, *a_collected, *a_pending;

PyDoc_STRVAR(adopt_doc,
"adopt(core) -> None\n\nHold ``core``'s containers, for its checkouts and checkins.");

static PyObject *
adopt(PyObject *module, PyObject *core)
{
    PyObject *dict = PyObject_GenericGetDict(core, NULL);
    if (dict == NULL) {
        return NULL;
    }
    PyObject *watchdog = PyDict_GetItemWithError(dict, s_watchdog);
    PyObject *watchdog_dict = watchdog ? PyObject_GenericGetDict(watchdog, NULL) : NULL;
    PyObject *leases = PyDict_GetItemWithError(dict, s_leases);
    PyObject *by_conn = PyDict_GetItemWithError(dict, s_by_conn);
    PyObject *ids = PyDict_GetItemWithError(dict, s_ids);
    PyObject *collected = PyDict_GetItemWithError(dict, s_collected);
    PyObject *pending = PyDict_GetItemWithError(dict, s_pending);
    if (!watchdog_dict || !leases || !by_conn || !ids || !collected || !pending
        || !PyDict_CheckExact(leases) || !PyDict_CheckExact(by_conn) || !PyDict_Check(watchdog_dict)) {
        Py_DECREF(dict);
        Py_XDECREF(watchdog_dict);
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "adopt(): not a Core");
        }
        return NULL;
    }
    Py_XSETREF(a_leases, Py_NewRef(leases));
    Py_XSETREF(a_by_conn, Py_NewRef(by_conn));
    Py_XSETREF(a_ids, Py_NewRef(ids));
    Py_XSETREF(a_collected, Py_NewRef(collected));
    Py_XSETREF(a_pending, Py_NewRef(pending));
    Py_XSETREF(a_watchdog_dict, watchdog_dict);
    Py_XSETREF(a_dict, dict);
    Py_XSETREF(a_core, Py_NewRef(core));
    calm_kept = 0;
#ifdef Py_TPFLAGS_INLINE_VALUES
    calm_possible = !PyType_HasFeature(Py_TYPE(core), Py_TPFLAGS_INLINE_VALUES)
                    && !PyType_HasFeature(Py_TYPE(watchdog), Py_TPFLAGS_INLINE_VALUES);
#else
    calm_possible = 1;
#endif
    Py_RETURN_NONE;
}

/* ``core.<name>`` for one of the held containers (a new reference). */
static inline PyObject *
held(PyObject *core, PyObject *kept, PyObject *name)
{
    return core == a_core ? Py_NewRef(kept) : attr(core, name);
}

/* ``core.<name>`` for an attribute that changes (a new reference). */
static inline PyObject *
live(PyObject *core, PyObject *name)
{
    if (core == a_core) {
        PyObject *value = PyDict_GetItemWithError(a_dict, name);
        if (value != NULL) {
            return Py_NewRef(value);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    return attr(core, name);
}

/* ``core.watchdog.thread is None`` (1), or not (0); -1 on error. */
static int
watchdog_idle(PyObject *core)
{
    if (core == a_core) {
        PyObject *thread = PyDict_GetItemWithError(a_watchdog_dict, s_thread);
        if (thread != NULL) {
            return thread == Py_None;
        }
        if (PyErr_Occurred()) {
            return -1;
        }
    }
    PyObject *watchdog = attr(core, s_watchdog);
    if (watchdog == NULL) {
        return -1;
    }
    PyObject *thread = attr(watchdog, s_thread);
    Py_DECREF(watchdog);
    if (thread == NULL) {
        return -1;
    }
    int idle = thread == Py_None;
    Py_DECREF(thread);
    return idle;
}

/* The settings a checkout reads, copied out of the last Settings object seen: Settings is a
 * frozen dataclass, so the same object always gives the same values. */
static PyObject *seen_settings;
static int set_enabled, set_capture_stack;
static Py_ssize_t set_max_tracked;
static double set_leak_threshold;
static PyObject *set_stack_depth;

static int
read_settings(PyObject *settings)
{
    if (settings == seen_settings) {
        return 0;
    }
    PyObject *enabled = PyObject_GetAttr(settings, s_enabled);
    PyObject *capture_stack = PyObject_GetAttr(settings, s_capture_stack);
    PyObject *max_tracked = PyObject_GetAttr(settings, s_max_tracked);
    PyObject *threshold = PyObject_GetAttr(settings, s_leak_threshold);
    PyObject *depth = PyObject_GetAttr(settings, s_stack_depth);
    int failed = !enabled || !capture_stack || !max_tracked || !threshold || !depth;
    int e = 0, c = 0;
    Py_ssize_t m = 0;
    double t = 0.0;
    if (!failed) {
        e = PyObject_IsTrue(enabled);
        c = PyObject_IsTrue(capture_stack);
        m = PyLong_AsSsize_t(max_tracked);
        t = PyFloat_AsDouble(threshold);
        failed = e < 0 || c < 0 || PyErr_Occurred() != NULL;
    }
    Py_XDECREF(enabled);
    Py_XDECREF(capture_stack);
    Py_XDECREF(max_tracked);
    Py_XDECREF(threshold);
    if (failed) {
        Py_XDECREF(depth);
        return -1;
    }
    calm_kept = 0; /* another core's settings: the kept answers were for the adopted one's */
    set_enabled = e;
    set_capture_stack = c;
    set_max_tracked = m;
    set_leak_threshold = t;
    Py_XSETREF(set_stack_depth, depth);
    Py_XSETREF(seen_settings, Py_NewRef(settings));
    return 0;
}

/* A ContextVar's value (a new reference); its default when unset. */
static inline PyObject *
var_get(PyObject *var)
{
    PyObject *value = NULL;
    if (PyContextVar_Get(var, NULL, &value) < 0) {
        return NULL;
    }
    return value;
}

/* ``thread`` for the lease: the per-thread identity tuple (see _core._thread_identity),
 * kept in the thread state's own dict (a threading.local's lookup costs several times more).
 * A forked child forgets it (forget_thread()), as it forgets the threading.local. */
static PyObject *
thread_identity_looked_up(void)
{
    PyObject *dict = PyThreadState_GetDict(); /* borrowed */
    if (dict != NULL) {
        PyObject *ident = PyDict_GetItemWithError(dict, s_thread_key);
        if (ident != NULL) {
            return Py_NewRef(ident);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *ident = PyObject_CallNoArgs(b_thread_identity);
    if (ident != NULL && dict != NULL && PyDict_SetItem(dict, s_thread_key, ident) < 0) {
        Py_DECREF(ident);
        return NULL;
    }
    return ident;
}

/* The last identity given and the thread state it is of: a thread state's id is never reused
 * (its address can be, by a later thread), so while both match it is this thread's, and the
 * dict is not read (~100 instructions a checkout). Dropped with the dict's entry. */
static PyThreadState *ident_state = NULL;
static uint64_t ident_state_id = 0;
static PyObject *ident_last = NULL;

static PyObject *
thread_identity(void)
{
    PyThreadState *state = PyThreadState_Get();
    uint64_t state_id = PyThreadState_GetID(state);
    if (ident_last != NULL && state == ident_state && state_id == ident_state_id) {
        return Py_NewRef(ident_last);
    }
    PyObject *ident = thread_identity_looked_up();
    if (ident != NULL) {
        ident_state = state;
        ident_state_id = state_id;
        Py_XSETREF(ident_last, Py_NewRef(ident));
    }
    return ident;
}

PyDoc_STRVAR(vars_set_doc,
"vars_set() -> None\n\n"
"pgleak._core's context variables (suppressed, allowance, context) may hold other values than\n"
"their defaults from now on: called before any of them is set (pgleak._cledger.vars_set).");

static PyObject *
vars_set(PyObject *module, PyObject *unused)
{
    vars_used = 1;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(vars_read_doc,
"vars_read() -> bool\n\nWhether checkouts read the context variables (vars_set() called; tests).");

static PyObject *
vars_read(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(vars_used);
}

PyDoc_STRVAR(forget_thread_doc,
"forget_thread() -> None\n\nDrop this thread's cached identity (in a forked child).");

static void forget_pid(void); /* below */

static PyObject *
forget_thread(PyObject *module, PyObject *unused)
{
    forget_pid();
    Py_CLEAR(ident_last);
    PyObject *dict = PyThreadState_GetDict();
    if (dict != NULL && PyDict_DelItem(dict, s_thread_key) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
            return NULL;
        }
        PyErr_Clear();
    }
    Py_RETURN_NONE;
}

/* ---- asyncio's running loop, without a system call (3.10 and 3.11) ------------------------
 *
 * Every checkout asks asyncio for the running loop (to name the task that holds the
 * connection). Up to 3.11 asyncio's C ``_get_running_loop`` checks the loop holder's pid
 * against ``getpid()``, a system call on every checkout of an asyncio path (~0.2 us here,
 * counted by strace: one more ``getpid`` per cycle with pgleak installed). The same check is
 * made here against the pid pgleak last read: at the first checkout, and again in a forked
 * child (forget_thread(), from pgleak's at-fork handler), so a child forked while a loop ran
 * sees no running loop, as asyncio's check makes it. The holder is asyncio's private
 * ``_RunningLoopHolder`` (Modules/_asynciomodule.c, 3.7 to 3.11: the loop, then the pid),
 * kept in the thread state's dict: it is read only once its type has been seen to be that
 * one, of that size, and the reading agreed with asyncio's own answer; anything else (the
 * pure-Python asyncio, another version, a holder not yet checked) asks asyncio. From 3.12
 * asyncio keeps the loop in the thread state and makes no system call: asyncio is asked. */
#if PY_VERSION_HEX < 0x030C0000 && !defined(MS_WINDOWS)
#  include <unistd.h>
#  define PGLEAK_LOOP_HOLDER 1
typedef struct {
    PyObject_HEAD
    PyObject *rl_loop;
    pid_t rl_pid;
} loop_holder;

static PyTypeObject *holder_type = NULL; /* checked: a strong reference */
static int holder_refused = 0;           /* the holder is not what this code reads */
static pid_t own_pid = 0;                /* getpid() as last read; 0: not yet */
static PyObject *s_holder_key = NULL;    /* "__asyncio_running_event_loop__" */
static PyObject *c_get_running_loop = NULL; /* _asyncio._get_running_loop, when asyncio's is it */

static PyObject *
running_loop(void)
{
    if (holder_refused) {
        return PyObject_CallNoArgs(b_get_running_loop);
    }
    if (s_holder_key == NULL) {
        s_holder_key = PyUnicode_InternFromString("__asyncio_running_event_loop__");
        PyObject *module = s_holder_key == NULL ? NULL : PyImport_ImportModule("_asyncio");
        if (module == NULL) {
            PyErr_Clear();
            holder_refused = 1;
            return PyObject_CallNoArgs(b_get_running_loop);
        }
        c_get_running_loop = PyObject_GetAttrString(module, "_get_running_loop");
        Py_DECREF(module);
        if (c_get_running_loop == NULL || c_get_running_loop != b_get_running_loop) {
            PyErr_Clear();
            holder_refused = 1; /* the pure-Python asyncio keeps its loop elsewhere */
            return PyObject_CallNoArgs(b_get_running_loop);
        }
    }
    /* The holder last read, while its dict is the same one with the same version tag (tags
     * are unique and change with every change to the dict): not looked up again. */
    static PyObject *seen_dict = NULL, *seen_holder = NULL; /* borrowed */
    static uint64_t seen_tag = 0;
    PyObject *dict = PyThreadState_GetDict(); /* borrowed */
    PyObject *holder;
    if (dict != NULL && dict == seen_dict && ((PyDictObject *)dict)->ma_version_tag == seen_tag) {
        holder = seen_holder;
    }
    else {
        holder = dict == NULL ? NULL : PyDict_GetItemWithError(dict, s_holder_key);
        if (holder != NULL) {
            seen_dict = dict;
            seen_tag = ((PyDictObject *)dict)->ma_version_tag;
            seen_holder = holder;
        }
    }
    if (holder == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        return PyObject_CallNoArgs(b_get_running_loop); /* no loop ever ran in this thread */
    }
    if (Py_TYPE(holder) != holder_type) {
        /* the first holder seen: read it only if it is the type this code knows and the
         * reading agrees with asyncio's own answer */
        PyObject *loop = PyObject_CallNoArgs(b_get_running_loop);
        if (loop == NULL) {
            return NULL;
        }
        PyTypeObject *type = Py_TYPE(holder);
        const char *dot = strrchr(type->tp_name, '.');
        const char *name = dot == NULL ? type->tp_name : dot + 1;
        if (holder_type == NULL && strcmp(name, "_RunningLoopHolder") == 0
            && type->tp_basicsize == (Py_ssize_t)sizeof(loop_holder) && loop != Py_None
            && ((loop_holder *)holder)->rl_loop == loop
            && ((loop_holder *)holder)->rl_pid == getpid()) {
            holder_type = (PyTypeObject *)Py_NewRef((PyObject *)type);
            own_pid = getpid();
        }
        else if (holder_type != NULL || loop != Py_None) {
            holder_refused = 1; /* a second type, or a holder that reads otherwise */
        }
        return loop;
    }
    PyObject *loop = ((loop_holder *)holder)->rl_loop;
    if (loop == Py_None || ((loop_holder *)holder)->rl_pid != own_pid) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(loop);
}

/* A forked child: its pid is read again at its next checkout's check. */
static void
forget_pid(void)
{
    if (own_pid != 0) {
        own_pid = getpid();
    }
}
#else
static PyObject *
running_loop(void)
{
    return PyObject_CallNoArgs(b_get_running_loop);
}

static void
forget_pid(void)
{
}
#endif

/* ---- An asyncio checkout's task, cheaper (SQLAlchemy's asyncio engine, asyncpg, psycopg_pool)
 *
 * Per asyncio checkout the ledger asks for the running task (``_current_task(loop)``), its
 * identity for the report (``(weakref.ref(task), task.get_name())``) and the stack from the
 * caller's frame. Counted on SQLAlchemy's asyncio cycle: the call to ``dict.get`` ~200
 * instructions, ``get_name()`` by name ~210, a new weak reference and pair each time, freed at
 * checkin, ~800, and the frame object PyEval_GetFrame() makes for the caller's frame (which the
 * walk below reads as an interpreter frame anyway) ~400 with its deallocation. The same values,
 * without those: */

/* ``_current_task(loop)``: where that is ``_current_tasks.get`` (before 3.12), the dict is
 * read directly, with the same lookup ``get`` makes. A new reference (None: no task). */
static PyObject *
current_task_of(PyObject *loop)
{
    static PyCFunction dict_get = NULL;
    if (dict_get == NULL) {
        PyObject *probe = PyDict_New();
        PyObject *get = probe == NULL ? NULL : PyObject_GetAttrString(probe, "get");
        if (get != NULL && PyCFunction_Check(get)) {
            dict_get = PyCFunction_GET_FUNCTION(get);
        }
        Py_XDECREF(get);
        Py_XDECREF(probe);
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *f = b_current_task;
    if (dict_get != NULL && PyCFunction_Check(f) && PyCFunction_GET_FUNCTION(f) == dict_get) {
        PyObject *tasks = PyCFunction_GET_SELF(f);
        if (tasks != NULL && PyDict_CheckExact(tasks)) {
            PyObject *task = PyDict_GetItemWithError(tasks, loop); /* borrowed */
            if (task != NULL) {
                return Py_NewRef(task);
            }
            return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        }
    }
    return PyObject_CallOneArg(f, loop);
}

/* ``(weakref.ref(task), task.get_name())`` for the lease. The pair is immutable and a task's
 * weak reference without a callback is one object while it lives (CPython hands out the same
 * one), so the last pair made is given again while it is still of this task and this name
 * object (``set_name()`` makes another): a loop of checkouts in one task makes none. Holds no
 * strong reference to the task. ``get_name`` of a type that cannot change (asyncio's C Task)
 * is called through its method descriptor, without a bound method. A new reference. */
static PyObject *last_task_pair = NULL;

static PyObject *
task_identity(PyObject *task)
{
    static PyTypeObject *named_type = NULL; /* a strong reference, with named_by */
    static PyObject *named_by = NULL;       /* its get_name's method descriptor, or NULL */
    PyTypeObject *type = Py_TYPE(task);
    if (type != named_type && PyType_HasFeature(type, Py_TPFLAGS_IMMUTABLETYPE)) {
        PyObject *descr = _PyType_Lookup(type, s_get_name); /* borrowed */
        Py_XSETREF(named_by,
                   descr != NULL && Py_IS_TYPE(descr, &PyMethodDescr_Type) ? Py_NewRef(descr)
                                                                           : NULL);
        Py_INCREF(type);
        Py_XSETREF(named_type, type);
    }
    PyObject *name = type == named_type && named_by != NULL
                         ? PyObject_Vectorcall(named_by, &task, 1, NULL)
                         : PyObject_CallMethodNoArgs(task, s_get_name);
    if (name == NULL) {
        return NULL;
    }
    PyObject *pair = last_task_pair;
    if (pair != NULL && PyTuple_GET_ITEM(pair, 1) == name) {
        PyObject *target = ref_target(PyTuple_GET_ITEM(pair, 0));
        Py_XDECREF(target); /* only compared */
        if (target == task) {
            Py_DECREF(name);
            return Py_NewRef(pair);
        }
    }
    PyObject *ref = PyWeakref_NewRef(task, NULL);
    if (ref == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    pair = PyTuple_Pack(2, ref, name);
    Py_DECREF(ref);
    Py_DECREF(name);
    if (pair != NULL) {
        Py_XSETREF(last_task_pair, Py_NewRef(pair));
    }
    return pair;
}

#ifdef PGLEAK_IFRAMES
/* PyEval_GetFrame()'s frame, as the interpreter frame (the first complete one), without
 * making its frame object; NULL when there is none. */
static iframe *
current_iframe(void)
{
    PyThreadState *tstate = PyThreadState_GET();
#  if PY_VERSION_HEX >= 0x030D0000
    iframe *f = tstate->current_frame;
#  else
    iframe *f = tstate->cframe->current_frame;
#  endif
    while (f != NULL && _PyFrame_IsIncomplete(f)) {
        f = f->previous;
    }
    return f;
}
#endif

/* pgleak._stack._parent_greenlet_frame(), with ``*current`` for its list: the suspended
 * frame of the greenlet that switched into ``*current`` (the running greenlet when NULL),
 * which becomes ``*current``; None when there is none. A new reference, NULL on error. */
static PyObject *
parent_greenlet_frame(PyObject **current)
{
    if (*current == NULL) {
        /* greenlet.getcurrent, kept once greenlet is imported (a module is not unloaded;
         * finding it in sys.modules costs more than the call) */
        static PyObject *getcurrent = NULL;
        if (getcurrent == NULL) {
            PyObject *module = PyImport_GetModule(s_greenlet);
            if (module == NULL || module == Py_None) { /* not imported, or blocked */
                Py_XDECREF(module);
                return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
            }
            getcurrent = PyObject_GetAttr(module, s_getcurrent);
            Py_DECREF(module);
            if (getcurrent == NULL) {
                return NULL;
            }
        }
        *current = PyObject_CallNoArgs(getcurrent);
        if (*current == NULL) {
            return NULL;
        }
    }
    PyObject *parent = NULL;
    if (PyObject_GetOptionalAttr(*current, s_parent, &parent) < 0) {
        return NULL;
    }
    if (parent == NULL || parent == Py_None) {
        Py_XDECREF(parent);
        return Py_NewRef(Py_None);
    }
    Py_SETREF(*current, parent);
    PyObject *frame = NULL;
    if (PyObject_GetOptionalAttr(parent, s_gr_frame, &frame) < 0) {
        return NULL;
    }
    return frame == NULL ? Py_NewRef(Py_None) : frame;
}

/* walk()'s walk, into ``items`` (room for 2 * ``limit``; ``*n`` in use, new references),
 * for task_capture() (``start`` NULL: from current_iframe(), 3.11 to 3.13 only): 0 full,
 * 1 the chain ended, 2 the event loop's frame, 3 a frame with no cached verdict
 * (task_capture() then hands the whole capture to Python), -1 an error. */
static int
walk_into(PyObject *start, Py_ssize_t limit, PyObject *cache, PyObject *pseudo,
          PyObject **items, Py_ssize_t *n)
{
    PyObject *last_file = NULL;
    long last_verdict = UNKNOWN;
#ifdef PGLEAK_IFRAMES
    if (start == NULL || ((PyFrameObject *)start)->f_back == NULL) {
        iframe *f = start == NULL ? current_iframe() : ((PyFrameObject *)start)->f_frame;
        for (; f != NULL; f = iframe_back(f)) {
            if (*n >= 2 * limit) {
                return 0;
            }
            PyCodeObject *code = iframe_code(f);
            long verdict = verdict_near(cache, pseudo, code, &last_file, &last_verdict);
            if (verdict == KEEP) {
                PyObject *lasti = lasti_int(iframe_lasti(f));
                if (lasti == NULL) {
                    return -1;
                }
                items[(*n)++] = Py_NewRef(code);
                items[(*n)++] = lasti;
            }
            else if (verdict == SKIP_LOOP) {
                return 2;
            }
            else if (verdict != SKIP) {
                return PyErr_Occurred() ? -1 : 3;
            }
        }
        return 1;
    }
#endif
    PyFrameObject *frame = (PyFrameObject *)Py_NewRef(start);
    for (; frame != NULL; frame = back(frame)) {
        if (*n >= 2 * limit) {
            Py_DECREF(frame);
            return 0;
        }
        PyCodeObject *code = PyFrame_GetCode(frame);
        long verdict = verdict_near(cache, pseudo, code, &last_file, &last_verdict);
        if (verdict == KEEP) {
            PyObject *lasti = lasti_int(frame_lasti(frame));
            if (lasti == NULL) {
                Py_DECREF(code);
                Py_DECREF(frame);
                return -1;
            }
            items[(*n)++] = (PyObject *)code;
            items[(*n)++] = lasti;
            continue;
        }
        Py_DECREF(code);
        if (verdict == SKIP_LOOP || verdict != SKIP) {
            Py_DECREF(frame);
            return verdict == SKIP_LOOP ? 2 : (PyErr_Occurred() ? -1 : 3);
        }
    }
    return 1;
}

/* pgleak._stack._capture_in_task(frame, limit, task, False), step for step, for the common
 * case: the walk's caches know every frame (a frame to judge hands the whole capture back to
 * Python: None), greenlet boundaries are crossed here, and the task's coroutine chain is merged
 * by Python only when chain_in() says the walk missed one of its frames. Every asyncio
 * checkout runs this; the pairs are gathered in a buffer and made a tuple once. */
static PyObject *
task_capture(PyObject *start, PyObject *depth, PyObject *task)
{
    Py_ssize_t limit = PyLong_AsSsize_t(depth);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit < 0) {
        limit = 0;
    }
    PyObject *small[64];
    PyObject **items = small;
    if (2 * limit > 64) {
        items = PyMem_Malloc(2 * (size_t)limit * sizeof(PyObject *));
        if (items == NULL) {
            return PyErr_NoMemory();
        }
    }
    Py_ssize_t n = 0;
    PyObject *greenlets = NULL, *result = NULL;
    PyObject *frame = Py_XNewRef(start);
    Py_ssize_t loop_at = -1;
    int hops = 0, status = 1;
    int here = start == NULL; /* from the current frame, with no frame object (walk_into) */
    while (here || (frame != NULL && frame != Py_None)) {
        if (!here && !PyFrame_Check(frame)) { /* a greenlet's gr_frame that is not one */
            goto python;
        }
        status = walk_into(frame, limit, b_skip_cache, b_pseudo, items, &n);
        here = 0;
        Py_CLEAR(frame);
        if (status < 0) {
            goto done;
        }
        if (status == 0) {
            goto full;
        }
        if (status == 2) {
            loop_at = n;
            break;
        }
        if (status == 3) {
            goto python;
        }
        /* the chain ended: the suspended parent greenlet's frames come next, if any */
        if (n >= 2 * limit) {
            goto full;
        }
        if (hops < 8) {
            hops++;
            frame = parent_greenlet_frame(&greenlets);
            if (frame == NULL) {
                goto done;
            }
        }
    }
    Py_CLEAR(frame);
    /* _add_task_chain(): nothing to add when the walk saw every frame of the chain */
    PyObject *coro = PyObject_CallMethodNoArgs(task, s_get_coro);
    if (coro == NULL) {
        PyErr_Clear(); /* as _add_task_chain: a best-effort completion */
        goto full;
    }
    int whole = chain_in(items, n, coro, b_skip_cache, b_pseudo);
    Py_DECREF(coro);
    if (whole < 0) {
        goto done;
    }
    if (!whole) {
        /* the merge is Python's, on a list; then cut to the limit */
        PyObject *out = PyList_New(n);
        if (out == NULL) {
            goto done;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyList_SET_ITEM(out, i, items[i]); /* the list owns them now */
        }
        n = 0;
        PyObject *added = NULL, *at = PyLong_FromSsize_t(loop_at);
        if (at != NULL) {
            added = PyObject_CallFunctionObjArgs(b_add_task_chain, out, task, at, NULL);
            Py_DECREF(at);
        }
        if (added != NULL) {
            Py_DECREF(added);
            Py_ssize_t size = PyList_GET_SIZE(out);
            if (size <= 2 * limit || PyList_SetSlice(out, 2 * limit, size, NULL) == 0) {
                result = PyList_AsTuple(out);
            }
        }
        Py_DECREF(out);
        goto done;
    }
full:
    result = PyTuple_New(n);
    if (result != NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyTuple_SET_ITEM(result, i, items[i]); /* steals */
        }
        n = 0;
    }
    goto done;
python:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(frame);
    Py_XDECREF(greenlets);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_DECREF(items[i]);
    }
    if (items != small) {
        PyMem_Free(items);
    }
    return result;
}

PyDoc_STRVAR(capture_task_doc,
"capture_task(frame, limit, task) -> tuple | None\n\n"
"pgleak._stack._capture_in_task(frame, limit, task, False) where the caches know every frame;\n"
"None when Python must judge a frame (or before bind()): the caller runs the Python walk.");

static PyObject *
capture_task(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyFrame_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "capture_task(frame, limit: int, task)");
        return NULL;
    }
    if (!bound) {
        Py_RETURN_NONE;
    }
    return task_capture(args[0], args[1], args[2]);
}

#ifdef PGLEAK_IFRAMES
/* capture()'s walk for a thread's checkout, over the interpreter frames from
 * current_iframe(): the same verdicts, the same pairs, but no frame object for any frame
 * (PyFrame_GetBack() made one for each frame stepped to: ~1,100 instructions of a 20-frame
 * checkout). None when a frame to judge has no cached verdict: the caller then hands the
 * frame objects to capture() and Python, as before. */
static PyObject *
capture_iframes(iframe *f, PyObject *depth, PyObject *cache, PyObject *pseudo)
{
    Py_ssize_t limit = PyLong_AsSsize_t(depth);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit < 0) {
        limit = 0;
    }
    PyObject *last_file = NULL; /* see verdict_near() */
    long last_verdict = UNKNOWN;
    while (f != NULL) {
        long verdict = verdict_near(cache, pseudo, iframe_code(f), &last_file, &last_verdict);
        if (verdict == UNKNOWN) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        if (verdict == KEEP) {
            break;
        }
        f = iframe_back(f);
    }
    PyObject *small[64];
    PyObject **items = small;
    if (2 * limit > 64) {
        items = PyMem_Malloc(2 * (size_t)limit * sizeof(PyObject *));
        if (items == NULL) {
            return PyErr_NoMemory();
        }
    }
    Py_ssize_t n = 0;
    int failed = 0;
    while (f != NULL && n < 2 * limit) {
        PyObject *lasti = lasti_int(iframe_lasti(f));
        if (lasti == NULL) {
            failed = 1;
            break;
        }
        items[n++] = Py_NewRef((PyObject *)iframe_code(f));
        items[n++] = lasti;
        f = iframe_back(f);
    }
    return pairs_tuple(items, n, failed, small);
}
#endif

/* The raw stack for a checkout made by the caller's caller (the adapter's wrapper). */
static PyObject *
checkout_stack(PyObject *task)
{
    PyObject *depth = set_stack_depth;
    PyObject *raw;
#ifdef PGLEAK_IFRAMES
    /* the task's walk from the interpreter frame: no frame object unless Python is asked */
    if (task != Py_None) {
        if (current_iframe() == NULL) {
            return PyTuple_New(0);
        }
        raw = task_capture(NULL, depth, task);
        if (raw != Py_None) {
            return raw; /* or NULL */
        }
        Py_DECREF(raw);
        PyFrameObject *at = PyEval_GetFrame(); /* borrowed */
        if (at == NULL) {
            return PyTuple_New(0);
        }
        return PyObject_CallFunctionObjArgs(b_capture_in_task, (PyObject *)at, depth, task,
                                            Py_False, NULL);
    }
    iframe *current = current_iframe();
    if (current == NULL) {
        return PyTuple_New(0);
    }
    raw = capture_iframes(current, depth, b_skip_cache, b_pseudo);
    if (raw != Py_None) {
        return raw; /* or NULL */
    }
    Py_DECREF(raw);
#endif
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed: the wrapper's frame */
    if (frame == NULL) {
        return PyTuple_New(0);
    }
    if (task != Py_None) {
        raw = task_capture((PyObject *)frame, depth, task);
        if (raw == Py_None) {
            Py_DECREF(raw);
            raw = PyObject_CallFunctionObjArgs(b_capture_in_task, (PyObject *)frame, depth,
                                               task, Py_False, NULL);
        }
    }
    else {
        PyObject *args[4] = {(PyObject *)frame, depth, b_skip_cache, b_pseudo};
        raw = capture(NULL, args, 4);
        if (raw == Py_None) {
            Py_DECREF(raw);
            raw = PyObject_CallFunctionObjArgs(b_capture_from, (PyObject *)frame, depth, NULL);
        }
    }
    return raw;
}

/* Whether a waiting observer must be asked (Core.wake_gate): 1 yes, 0 no, -1 error. While
 * both gate attributes are None (OpenTelemetry's global providers, no SDK) it has nothing to
 * say, and asking it would be a Python call on every checkout. */
static int
wake_due(PyObject *core)
{
    PyObject *gate = live(core, s_wake_gate);
    if (gate == NULL) {
        return -1;
    }
    if (!PyTuple_CheckExact(gate) || PyTuple_GET_SIZE(gate) != 4) {
        Py_DECREF(gate);
        return 1;
    }
    int due = 0;
    for (int i = 0; i < 4 && !due; i += 2) {
        PyObject *owner = PyTuple_GET_ITEM(gate, i), *name = PyTuple_GET_ITEM(gate, i + 1);
        PyObject *value = NULL;
        if (PyModule_CheckExact(owner) && PyUnicode_CheckExact(name)) {
            /* a module global: its dict, without the generic lookup */
            value = PyDict_GetItemWithError(PyModule_GetDict(owner), name);
            Py_XINCREF(value);
        }
        if (value == NULL && !PyErr_Occurred()) {
            value = PyObject_GetAttr(owner, name);
        }
        if (value == NULL) {
            Py_DECREF(gate);
            return -1;
        }
        due = value != Py_None;
        Py_DECREF(value);
    }
    Py_DECREF(gate);
    return due;
}

/* ---- "Anything rare?": one check instead of a dozen reads -------------------------------
 *
 * A checkout reads the settings, the fork generation, the watchdog's thread, the observer, the
 * waker and its gate's two globals, and a checkin the generation and the observer: ~10 dict
 * lookups a cycle, whose answers almost never change. For the adopted core they are read once
 * (``calm_now()``, all in one stretch that runs no Python code) and kept for as long as none
 * of the dicts they were read from changes: the core's and the watchdog's instance dicts,
 * _core's module dict, the gate's two module dicts. From 3.12 CPython tells of every change to
 * a dict one watches (``PyDict_AddWatcher``: the callback drops what was kept); before it,
 * every change gives the dict a new version tag, compared at each use. So whoever changed what
 * and however (an attribute set, monkeypatch, a fork's new generation), the next checkout goes
 * back to the reads, which keep the answers again. Only the quiet case is kept (the settings
 * seen, no observer, no waker due, the watchdog running): anything else is read every time,
 * as before. Python keeps nothing up to date for this. 3.13 stores an instance's attributes in
 * the object itself (``Py_TPFLAGS_INLINE_VALUES``) even once its __dict__ exists, and no watcher
 * hears of those stores; a class with a slot of its own keeps them in the dict, which is why
 * Core and Watchdog have one (``_in_dict``). adopt() checks both classes: with inline values
 * (a subclass that lost the slot, say), nothing is kept (``calm_possible``). */
#define CALM_KEPT 1
#if PY_VERSION_HEX >= 0x030C0000
#define CALM_WATCHED 1
static int calm_watcher = -1;

static int
calm_changed(PyDict_WatchEvent event, PyObject *dict, PyObject *key, PyObject *new_value)
{
    (void)event, (void)dict, (void)key, (void)new_value;
    calm_kept = 0;
    return 0;
}

/* Watch ``dict`` (0), or -1 (error cleared: nothing is kept). */
static int
calm_watch(PyObject *dict)
{
    if (calm_watcher < 0) {
        calm_watcher = PyDict_AddWatcher(calm_changed);
    }
    if (calm_watcher < 0 || PyDict_Watch(calm_watcher, dict) < 0) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}
#else
#define CALM_WATCHED 0
static uint64_t calm_core_tag, calm_watchdog_tag, calm_globals_tag, calm_gate_tags[2];

static inline uint64_t
dict_tag(PyObject *dict)
{
    return ((PyDictObject *)dict)->ma_version_tag;
}
#endif
static PyObject *calm_gate[2];     /* the gate's module dicts (strong), or NULL: no waker */
static PyObject *calm_generation;  /* _core._generation when kept (strong) */
/* ``core.checkout`` and ``core.checkin`` when kept (strong, or NULL): while they are the C
 * wrappers' own ledger, the wrappers call it without reading the core's dict (ledger_now). */
static PyObject *calm_ledger[2];
static PyObject *s_checkout, *s_checkin; /* defined with the awaitables' names, below */

/* Whether the kept answers still hold for ``core``: nothing rare to do, ``seen_settings`` are
 * its settings, ``calm_generation`` the generation. */
static inline int
calm(PyObject *core)
{
#if !CALM_KEPT
    (void)core;
    return 0;
#elif CALM_WATCHED
    return calm_kept && core == a_core;
#else
    return calm_kept && core == a_core && dict_tag(a_dict) == calm_core_tag
           && dict_tag(a_watchdog_dict) == calm_watchdog_tag
           && dict_tag(b_core_globals) == calm_globals_tag
           && (calm_gate[0] == NULL
               || (dict_tag(calm_gate[0]) == calm_gate_tags[0]
                   && dict_tag(calm_gate[1]) == calm_gate_tags[1]));
#endif
}

/* A borrowed dict lookup that runs no Python code: ``dict`` holds only str keys here (instance
 * and module dicts), ``name`` is an exact str. NULL if missing (or, never, on error: cleared). */
static inline PyObject *
quiet_get(PyObject *dict, PyObject *name)
{
    PyObject *value = PyDict_GetItemWithError(dict, name);
    if (value == NULL) {
        PyErr_Clear();
    }
    return value;
}

/* Read the answers afresh for the adopted core and keep them if all is quiet (see above).
 * Called where a checkout has just found nothing rare to do; the reads repeat that finding in
 * one stretch with the watches (or tags), so no change can fall between a read and its watch. */
static void
calm_now(PyObject *core)
{
    calm_kept = 0;
    if (!CALM_KEPT || !calm_possible || core != a_core || a_dict == NULL || !PyDict_CheckExact(a_dict)
        || !PyDict_CheckExact(a_watchdog_dict) || !PyDict_CheckExact(b_core_globals)) {
        return;
    }
#if CALM_WATCHED
    if (calm_watch(a_dict) < 0 || calm_watch(a_watchdog_dict) < 0
        || calm_watch(b_core_globals) < 0) {
        return;
    }
#endif
    PyObject *settings = quiet_get(a_dict, s_settings);
    PyObject *generation = quiet_get(b_core_globals, s_generation);
    PyObject *thread = quiet_get(a_watchdog_dict, s_thread);
    PyObject *observer = quiet_get(a_dict, s_observer);
    PyObject *waker = quiet_get(a_dict, s_waker);
    if (settings == NULL || settings != seen_settings || generation == NULL || thread == NULL
        || thread == Py_None || observer != Py_None || waker == NULL) {
        return;
    }
    PyObject *gate[2] = {NULL, NULL};
    if (waker != Py_None) {
        /* a waiting observer: quiet while its gate's two module globals are None */
        PyObject *pair = quiet_get(a_dict, s_wake_gate);
        if (pair == NULL || !PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 4) {
            return;
        }
        for (int i = 0; i < 2; i++) {
            PyObject *owner = PyTuple_GET_ITEM(pair, 2 * i);
            PyObject *name = PyTuple_GET_ITEM(pair, 2 * i + 1);
            if (!PyModule_CheckExact(owner) || !PyUnicode_CheckExact(name)) {
                return;
            }
            gate[i] = PyModule_GetDict(owner);
            if (gate[i] == NULL || !PyDict_CheckExact(gate[i])) {
                return;
            }
#if CALM_WATCHED
            if (calm_watch(gate[i]) < 0) {
                return;
            }
#endif
            if (quiet_get(gate[i], name) != Py_None) {
                return;
            }
        }
    }
#if !CALM_WATCHED
    calm_core_tag = dict_tag(a_dict);
    calm_watchdog_tag = dict_tag(a_watchdog_dict);
    calm_globals_tag = dict_tag(b_core_globals);
    for (int i = 0; i < 2; i++) {
        calm_gate_tags[i] = gate[i] == NULL ? 0 : dict_tag(gate[i]);
    }
#endif
    /* nothing below runs Python code (a module dict and an int outlive these references) */
    for (int i = 0; i < 2; i++) {
        Py_XINCREF(gate[i]);
        Py_XSETREF(calm_gate[i], gate[i]);
    }
    Py_INCREF(generation);
    Py_XSETREF(calm_generation, generation);
    PyObject *ledger[2] = {quiet_get(a_dict, s_checkout), quiet_get(a_dict, s_checkin)};
    PyObject *dropped[2] = {calm_ledger[0], calm_ledger[1]};
    for (int i = 0; i < 2; i++) {
        calm_ledger[i] = Py_XNewRef(ledger[i]);
    }
    calm_kept = 1;
    /* last: freeing a replaced ledger may run Python code, whose changes are then seen */
    Py_XDECREF(dropped[0]);
    Py_XDECREF(dropped[1]);
}

PyDoc_STRVAR(kept_doc,
"kept() -> bool\n\nWhether the ledger keeps its answers to \"anything rare?\" right now (tests).");

static PyObject *
kept(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(a_core != NULL && calm(a_core));
}

/* ``time.monotonic()``. Read here rather than called: the call alone cost more than the clock
 * (~190 instructions, twice a cycle). The value is the one ``time.monotonic()`` gives, computed
 * the same way (CPython's _PyTime_FromTimespec and _PyTime_AsSecondsDouble: nanoseconds, then
 * seconds as a double), so t0 and t_in compare exactly with readings taken in Python. 3.13 has
 * the public PyTime_Monotonic; before it, Linux's clock_gettime(CLOCK_MONOTONIC) is what
 * time.monotonic() reads; anywhere else, or if ``_core._monotonic`` is not time.monotonic, the
 * call. */
static PyObject *
clock_now(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    if (own_clock) {
        PyTime_t t;
        if (PyTime_Monotonic(&t) < 0) {
            return NULL;
        }
        return PyFloat_FromDouble(PyTime_AsSecondsDouble(t));
    }
#elif defined(__linux__) && defined(CLOCK_MONOTONIC)
    if (own_clock) {
        struct timespec ts;
        if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0) {
            long long ns = (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
            volatile double d; /* as CPython: no rounding changed by optimisation */
            if (ns % 1000000000LL == 0) {
                d = (double)(ns / 1000000000LL);
            }
            else {
                d = (double)ns;
                d /= 1e9;
            }
            return PyFloat_FromDouble(d);
        }
    }
#endif
    return PyObject_CallNoArgs(b_monotonic);
}

/* ---- the observer told by the ledger itself (issue 12) ---------------------------------
 *
 * Core._after_checkout / _observe_checkin were a Python frame each between the C ledger and
 * the observer's ``checked_out`` / ``checked_in`` on every traced cycle (~1,000 instructions
 * each). Their common case (an observer running; at a checkout, the watchdog started too) is
 * here: the observer's method called with the same arguments, a fault (an ``Exception``)
 * handed to _core's ``internal_error`` (looked up then, as the Python method's global) at the
 * same site, anything else propagated. The rare cases still go to the Python methods. */

static PyObject *s_checked_out, *s_checked_in, *s_internal_error, *s_site_out, *s_site_in;

static int swallow(PyObject *report, PyObject *site);
static int observe_fault(PyObject *site);

/* The names above, made on first use (0), or -1 with an error set. */
static int
observe_names(void)
{
    if (s_site_in != NULL) {
        return 0;
    }
    s_checked_out = PyUnicode_InternFromString("checked_out");
    s_checked_in = PyUnicode_InternFromString("checked_in");
    s_internal_error = PyUnicode_InternFromString("internal_error");
    s_site_out = PyUnicode_InternFromString("observer.checkout");
    if (!s_checked_out || !s_checked_in || !s_internal_error || !s_site_out) {
        return -1;
    }
    s_site_in = PyUnicode_InternFromString("observer.checkin");
    return s_site_in == NULL ? -1 : 0;
}

/* ``observer.<name>(*args)`` (``args[0]`` is the observer; observe_names() done), as
 * ``try: ... except Exception as exc: internal_error(site, exc)``: 0, or -1 with an error set
 * (not an Exception). */
static int
observe(PyObject *name, PyObject *site, PyObject *const *args, size_t nargs)
{
    PyObject *done = PyObject_VectorcallMethod(name, args, nargs, NULL);
    if (done != NULL) {
        Py_DECREF(done);
        return 0;
    }
    return observe_fault(site);
}

/* The current exception, raised where the observer was told at ``site``: an Exception handed
 * to _core's ``internal_error(site, exc)`` (0), anything else left set (-1). */
static int
observe_fault(PyObject *site)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    PyObject *report = PyDict_GetItemWithError(b_core_globals, s_internal_error);
    if (report == NULL) {
        return -1; /* _core without its internal_error: the fault stands */
    }
    Py_INCREF(report);
    int failed = swallow(report, site);
    Py_DECREF(report);
    return failed;
}

/* ---- a traced checkout's state, made in C (issue 12) -------------------------------------
 *
 * ``Telemetry.checked_out`` (pgleak._otel) was a Python frame on every traced checkout
 * (~3,500 instructions): in its common case (awake, tracing, no wait time to record, the
 * pool's span attributes known, the API's context variable in use) it only makes the
 * checkout's ``_Trace`` and files it in ``lease.otel``. ``trace_checkout()`` does that here,
 * with the same values in every slot; anything else (a subclass, ``checked_out`` replaced on
 * the class or the instance, a provider to look for, metrics, a pool not yet described, an
 * unset context variable) is the Python method's. Bound by pgleak._otel_fast. */

enum { T_CTX, T_DEPTH, T_ENDED, T_OFFSET, T_OUTCOME, T_PARENT, T_SINCE, T_SPAN, T_TOKEN, T_COUNT };
static const char *trace_slots[T_COUNT] = {
    "ctx", "depth", "ended", "offset", "outcome", "parent", "since", "span", "token",
};
static Py_ssize_t trace_off[T_COUNT], info_span_off, handle_observed_off;
/* trace_bind()'s: Telemetry, _Trace, _PoolInfo, PoolHandle; Telemetry.checked_out; the API's
 * context variable; () for object.__new__ */
static PyTypeObject *tb_telemetry, *tb_trace, *tb_info, *tb_handle;
static PyObject *tb_checked_out, *tb_var, *tb_no_args;
static PyObject *s_dormant, *s_tracing, *s_metering, *s_returned_outcome, *tb_zero;

/* trace_bind()'s: the ``opentelemetry.trace`` and ``opentelemetry.metrics._internal`` module
 * dicts (the providers' globals a dormant observer watches) */
static PyObject *tb_globals[2];
static PyObject *s_watch_tracer, *s_watch_meter, *s_tracer_provider, *s_meter_provider;

/* A dormant observer's test, one half (``self.<watch> and getattr(module, name, True) is not
 * None``, in ``dict``): 1 while it is false (nothing to wake), else 0 (the method wakes it). */
static int
trace_quiet(PyObject *dict, PyObject *watch, PyObject *globals, PyObject *name)
{
    PyObject *watching = PyDict_GetItemWithError(dict, watch);
    if (watching == Py_False) {
        return 1;
    }
    if (watching != Py_True) {
        return 0;
    }
    return PyDict_GetItemWithError(globals, name) == Py_None;
}

/* 1: ``lease.otel`` made as ``observer.checked_out(lease, since)`` would; 0: that method must
 * run; -1: an error set. */
static int
trace_checkout(PyObject *observer, PyObject *lease, PyObject *since)
{
    if (tb_telemetry == NULL || Py_TYPE(observer) != tb_telemetry || lease_off[L_POOL] == 0) {
        return 0;
    }
    PyObject *method = PyDict_GetItemWithError(tb_telemetry->tp_dict, s_checked_out);
    if (method != tb_checked_out) {
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *dict = PyObject_GenericGetDict(observer, NULL);
    if (dict == NULL) {
        PyErr_Clear();
        return 0;
    }
    int mine = PyDict_CheckExact(dict) && PyDict_GetItemWithError(dict, s_checked_out) == NULL
               && !PyErr_Occurred() && PyDict_GetItemWithError(dict, s_tracing) == Py_True;
    if (mine && since != Py_None) {
        mine = PyDict_GetItemWithError(dict, s_metering) == Py_False;
    }
    if (mine && PyDict_GetItemWithError(dict, s_dormant) != Py_False) {
        /* the method's first test: a provider it still watches for that is now set */
        mine = trace_quiet(dict, s_watch_tracer, tb_globals[0], s_tracer_provider)
               && trace_quiet(dict, s_watch_meter, tb_globals[1], s_meter_provider);
    }
    Py_DECREF(dict);
    if (!mine) {
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *handle = SLOT(lease, lease_off[L_POOL]);
    if (handle == NULL || Py_TYPE(handle) != tb_handle) {
        return 0;
    }
    PyObject *info = SLOT(handle, handle_observed_off);
    if (info == NULL || Py_TYPE(info) != tb_info) {
        return 0;
    }
    PyObject *span = SLOT(info, info_span_off);
    if (span == NULL || span == Py_None) {
        return 0; /* the pool's attributes read at this checkout: the Python method's */
    }
    PyObject *parent = NULL;
    if (PyContextVar_Get(tb_var, NULL, &parent) < 0) {
        return -1;
    }
    if (parent == NULL) {
        return 0; /* var.get() raises: the Python method does, and its caller reports it */
    }
    PyObject *state = PyBaseObject_Type.tp_new(tb_trace, tb_no_args, NULL); /* _new(_Trace) */
    if (state == NULL) {
        Py_DECREF(parent);
        return -1;
    }
    /* nothing below runs Python code: the slots are filled before anyone can see the state */
    slot_set(state, trace_off[T_PARENT], parent);
    slot_set(state, trace_off[T_SINCE], Py_NewRef(since));
    slot_set(state, trace_off[T_SPAN], Py_NewRef(Py_None));
    slot_set(state, trace_off[T_TOKEN], Py_NewRef(Py_None));
    slot_set(state, trace_off[T_CTX], Py_NewRef(Py_None));
    slot_set(state, trace_off[T_DEPTH], Py_NewRef(tb_zero));
    slot_set(state, trace_off[T_OFFSET], Py_NewRef(tb_zero));
    slot_set(state, trace_off[T_OUTCOME], Py_NewRef(s_returned_outcome));
    slot_set(state, trace_off[T_ENDED], Py_NewRef(Py_False));
    slot_set(lease, lease_off[L_OTEL], state);
    return 1;
}

PyDoc_STRVAR(trace_bind_doc,
"trace_bind(Telemetry, _Trace, _PoolInfo, PoolHandle, var, trace, metrics) -> None\n\n"
"Let the C ledger make a traced checkout's ``_Trace`` itself (``var``: the API's context\n"
"variable, pgleak._otel._CONTEXT; ``trace``, ``metrics``: the modules whose provider\n"
"globals a dormant observer watches).");

static PyObject *
trace_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyType_Check(args[2])
        || !PyType_Check(args[3]) || !PyContextVar_CheckExact(args[4])
        || !PyModule_CheckExact(args[5]) || !PyModule_CheckExact(args[6])) {
        PyErr_SetString(PyExc_TypeError, "trace_bind(Telemetry, _Trace, _PoolInfo, PoolHandle, "
                                         "var: ContextVar, trace: module, metrics: module)");
        return NULL;
    }
    if (!bound) {
        PyErr_SetString(PyExc_RuntimeError, "trace_bind(): the C ledger is not bound");
        return NULL;
    }
    PyTypeObject *trace = (PyTypeObject *)args[1];
    if (trace->tp_dictoffset != 0 || trace->tp_new != PyBaseObject_Type.tp_new
        || trace->tp_init != PyBaseObject_Type.tp_init) {
        PyErr_SetString(PyExc_TypeError, "trace_bind(): _Trace is not a plain slotted class");
        return NULL;
    }
    Py_ssize_t offs[T_COUNT], span_off, observed_off;
    for (int i = 0; i < T_COUNT; i++) {
        if (member_offset(args[1], trace_slots[i], &offs[i]) < 0) {
            return NULL;
        }
    }
    if (member_offset(args[2], "span", &span_off) < 0
        || member_offset(args[3], "observed", &observed_off) < 0) {
        return NULL;
    }
    if (observe_names() < 0) {
        return NULL;
    }
    PyObject *method = PyDict_GetItemWithError(((PyTypeObject *)args[0])->tp_dict, s_checked_out);
    if (method == NULL || !PyFunction_Check(method)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "trace_bind(): no Telemetry.checked_out function");
        }
        return NULL;
    }
    if (s_dormant == NULL) {
        s_dormant = PyUnicode_InternFromString("dormant");
        s_tracing = PyUnicode_InternFromString("tracing");
        s_metering = PyUnicode_InternFromString("metering");
        s_returned_outcome = PyUnicode_InternFromString("returned");
        tb_zero = PyLong_FromLong(0);
        tb_no_args = PyTuple_New(0);
        s_watch_tracer = PyUnicode_InternFromString("_watch_tracer");
        s_watch_meter = PyUnicode_InternFromString("_watch_meter");
        s_tracer_provider = PyUnicode_InternFromString("_TRACER_PROVIDER");
        s_meter_provider = PyUnicode_InternFromString("_METER_PROVIDER");
        if (!s_dormant || !s_tracing || !s_metering || !s_returned_outcome || !tb_zero
            || !tb_no_args || !s_watch_tracer || !s_watch_meter || !s_tracer_provider
            || !s_meter_provider) {
            return NULL;
        }
    }
    for (int i = 0; i < 2; i++) {
        PyObject *globals = PyModule_GetDict(args[5 + i]);
        if (globals == NULL || !PyDict_Check(globals)) {
            PyErr_SetString(PyExc_TypeError, "trace_bind(): a module without its dict");
            return NULL;
        }
        Py_XSETREF(tb_globals[i], Py_NewRef(globals));
    }
    memcpy(trace_off, offs, sizeof(offs));
    info_span_off = span_off;
    handle_observed_off = observed_off;
    Py_XSETREF(tb_trace, (PyTypeObject *)Py_NewRef(args[1]));
    Py_XSETREF(tb_info, (PyTypeObject *)Py_NewRef(args[2]));
    Py_XSETREF(tb_handle, (PyTypeObject *)Py_NewRef(args[3]));
    Py_XSETREF(tb_checked_out, Py_NewRef(method));
    Py_XSETREF(tb_var, Py_NewRef(args[4]));
    Py_XSETREF(tb_telemetry, (PyTypeObject *)Py_NewRef(args[0])); /* last: it switches it on */
    Py_RETURN_NONE;
}

/* ---- a traced checkout's span, started, made current and ended in C (issue 12) ------------
 *
 * With ``trace_checkout`` in C, a traced cycle still ran four Python frames of pgleak's,
 * ``Telemetry.enter``, ``exit``, ``checked_in`` and ``_start`` (~12,000 instructions of the
 * ~19,000 pgleak's observer added beyond the SDK's own work on asyncpg): their frames, the
 * holder's two ``repr``s, the method calls by name. Their common case is here, each step in
 * the methods' order with the same values, so a fault leaves the same state behind (and
 * reaches the same ``internal_error`` site): the API's context variable in use (``_CONTEXT``
 * still the one bound), the call site's attributes kept in ``_PoolInfo.sites``, plain values
 * (floats, tuples, str) where the methods would format or compare them. Anything else - a
 * subclass, a method replaced on the class or the instance, a site not yet kept, metrics to
 * record - runs the Python method, which stays the one definition of a span. The clocks are
 * ``pgleak._otel``'s globals, read at each call (a test's clock is honoured). Bound by
 * pgleak._otel_fast after ``trace_bind``. */

enum { TS_ENTER, TS_EXIT, TS_CHECKED_IN, TS_START, TS_COUNT };
static const char *ts_method_names[TS_COUNT] = {"enter", "exit", "checked_in", "_start"};
static PyObject *ts_names[TS_COUNT], *ts_fn[TS_COUNT]; /* the names; the functions bound */
static PyObject *ts_globals;                         /* pgleak._otel's dict; NULL: not bound */
static PyTypeObject *ts_context;                     /* opentelemetry.context.Context */
static int ts_context_plain; /* Context(current, **kw) is dict's own new + init */
static PyObject *ts_span_name, *ts_internal, *ts_span_key, *ts_kwnames, *ts_one, *ts_e9;
static PyObject *s_ts_context_var, *s_ts_time_ns, *s_ts_monotonic, *s_ts_tracer,
    *s_ts_start_span, *s_ts_set_attributes, *s_ts_end, *s_ts_metering, *s_ts_checkout_id,
    *s_ts_holder, *s_ts_context, *s_ts_waited, *s_ts_held, *s_ts_outcome, *s_ts_discarded;
static Py_ssize_t ts_sites_off;
/* The last holder string made, for the (task, thread) identity pairs it was made of (both
 * names str, so their ``repr`` cannot change while the tuples are kept). */
static PyObject *ts_last_task, *ts_last_thread, *ts_last_holder;

/* The dict lookups these functions repeat on every call (Telemetry's methods, the observer's
 * own attributes, pgleak._otel's globals: five to eight a call, ~100 instructions each) are
 * remembered while the dict is unchanged, by its version tag, which CPython changes on every
 * insertion, deletion and clear and gives no other dict (see the verdict table above): a
 * method replaced, an attribute set, a clock swapped shows at the next call. The value is
 * borrowed: the unchanged dict still holds it. Up to 3.13; later, the dict is asked. */
enum {
    TM_CLASS, TM_INSTANCE = TM_CLASS + TS_COUNT, TM_CONTEXT = TM_INSTANCE + TS_COUNT, TM_TIME_NS,
    TM_MONOTONIC, TM_TRACER, TM_METERING, TM_COUNT
};
#ifdef PGLEAK_VERDICT_TABLE
static struct {
    PyObject *dict; /* borrowed, compared by address only (with the tag, never reused) */
    uint64_t tag;
    PyObject *value; /* borrowed; NULL: absent */
} ts_memo[TM_COUNT];

/* ts_attributes()'s: the entry of ``sites`` found last, for the (code, offset) it was found
 * by (all borrowed: compared by address only, while ``sites`` keeps its version tag). */
static struct {
    PyObject *code, *lasti, *sites, *hit;
    uint64_t tag;
} ts_site;
#endif

/* An instance's dict is remembered too up to 3.12, where the dict made for it replaces the
 * instance's inline values; from 3.13 it shares them, and an attribute set on the instance
 * does not change the dict's version tag. */
#if PY_VERSION_HEX < 0x030D0000
#  define TM_OWN(memo) (memo)
#else
#  define TM_OWN(memo) (-1)
#endif

/* ``dict.get(name)``, borrowed; NULL: absent, or an error set (``memo`` -1: not remembered). */
static inline PyObject *
ts_get(PyObject *dict, PyObject *name, int memo)
{
#ifdef PGLEAK_VERDICT_TABLE
    if (memo < 0) {
        return PyDict_GetItemWithError(dict, name);
    }
    if (ts_memo[memo].dict == dict && ts_memo[memo].tag == dict_version(dict)) {
        return ts_memo[memo].value;
    }
    PyObject *value = PyDict_GetItemWithError(dict, name);
    if (value != NULL || !PyErr_Occurred()) {
        ts_memo[memo].dict = dict;
        ts_memo[memo].tag = dict_version(dict);
        ts_memo[memo].value = value;
    }
    return value;
#else
    (void)memo;
    return PyDict_GetItemWithError(dict, name);
#endif
}

/* The observer's instance dict (a new reference) when the methods ``which`` and ``_start``
 * are the ones bound and ``_CONTEXT`` is still the variable bound; else NULL, no error set:
 * the Python method's case. */
static PyObject *
ts_mine(PyObject *observer, int which)
{
    if (ts_globals == NULL || Py_TYPE(observer) != tb_telemetry || ts_fn[which] == NULL
        || ts_fn[TS_START] == NULL) {
        return NULL;
    }
    PyObject *cls = tb_telemetry->tp_dict;
    if (ts_get(cls, ts_names[which], TM_CLASS + which) != ts_fn[which]
        || ts_get(cls, ts_names[TS_START], TM_CLASS + TS_START) != ts_fn[TS_START]
        || ts_get(ts_globals, s_ts_context_var, TM_CONTEXT) != tb_var) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *dict = PyObject_GenericGetDict(observer, NULL);
    if (dict == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyDict_CheckExact(dict)
        || ts_get(dict, ts_names[which], TM_OWN(TM_INSTANCE + which)) != NULL
        || ts_get(dict, ts_names[TS_START], TM_OWN(TM_INSTANCE + TS_START)) != NULL
        || PyErr_Occurred()) {
        PyErr_Clear();
        Py_DECREF(dict);
        return NULL;
    }
    return dict;
}

/* ``base + int(mono * 1e9)`` (``negate``: ``base - ...``), as the methods compute it. */
static PyObject *
ts_ns(PyObject *base, PyObject *mono, int negate)
{
    PyObject *scaled;
    if (PyFloat_CheckExact(mono)) {
        scaled = PyLong_FromDouble(PyFloat_AS_DOUBLE(mono) * 1e9);
    }
    else {
        PyObject *product = PyNumber_Multiply(mono, ts_e9);
        scaled = product == NULL ? NULL : PyNumber_Long(product);
        Py_XDECREF(product);
    }
    if (scaled == NULL) {
        return NULL;
    }
    PyObject *sum = negate ? PyNumber_Subtract(base, scaled) : PyNumber_Add(base, scaled);
    Py_DECREF(scaled);
    return sum;
}

/* ``_otel.<name>()``: one of the clocks, as the module has it now. */
static PyObject *
ts_clock(PyObject *name)
{
    PyObject *clock = ts_get(ts_globals, name, name == s_ts_time_ns ? TM_TIME_NS : TM_MONOTONIC);
    if (clock == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_NameError, name);
        }
        return NULL;
    }
    Py_INCREF(clock);
    PyObject *now = PyObject_CallNoArgs(clock);
    Py_DECREF(clock);
    return now;
}

/* ``f"task {task[1]!r} (thread {thread[1]!r})"`` or ``f"thread {thread[1]!r}"``: a new
 * reference, NULL with an error set. */
static PyObject *
ts_holder_of(PyObject *task, PyObject *thread)
{
    if (task == ts_last_task && thread == ts_last_thread && ts_last_holder != NULL) {
        return Py_NewRef(ts_last_holder);
    }
    PyObject *name = PyTuple_GET_ITEM(thread, 1);
    PyObject *holder = task == Py_None
                           ? PyUnicode_FromFormat("thread %R", name)
                           : PyUnicode_FromFormat("task %R (thread %R)",
                                                  PyTuple_GET_ITEM(task, 1), name);
    if (holder != NULL && PyUnicode_CheckExact(name)
        && (task == Py_None || PyUnicode_CheckExact(PyTuple_GET_ITEM(task, 1)))) {
        Py_XSETREF(ts_last_task, Py_NewRef(task));
        Py_XSETREF(ts_last_thread, Py_NewRef(thread));
        Py_XSETREF(ts_last_holder, Py_NewRef(holder));
    }
    return holder;
}

/* The span's start attributes as ``Telemetry._start`` makes them from a kept site: a new
 * dict, or NULL (``*start`` untouched) with no error set where the method must run. */
static PyObject *
ts_attributes(PyObject *lease, PyObject *state, PyObject **start)
{
    PyObject *since = SLOT(state, trace_off[T_SINCE]), *t0 = SLOT(lease, lease_off[L_T0]);
    PyObject *raw = SLOT(lease, lease_off[L_RAW]), *handle = SLOT(lease, lease_off[L_POOL]);
    PyObject *id = SLOT(lease, lease_off[L_ID]), *context = SLOT(lease, lease_off[L_CONTEXT]);
    PyObject *task = SLOT(lease, lease_off[L_TASK]), *thread = SLOT(lease, lease_off[L_THREAD]);
    if (since == NULL || t0 == NULL || !PyFloat_CheckExact(t0)
        || (since != Py_None && !PyFloat_CheckExact(since)) || raw == NULL || handle == NULL
        || Py_TYPE(handle) != tb_handle || id == NULL || context == NULL
        || (context != Py_None && !PyUnicode_CheckExact(context)) || task == NULL
        || thread == NULL || !PyTuple_CheckExact(thread) || PyTuple_GET_SIZE(thread) < 2
        || (task != Py_None && (!PyTuple_CheckExact(task) || PyTuple_GET_SIZE(task) < 2))) {
        return NULL;
    }
    PyObject *info = SLOT(handle, handle_observed_off);
    if (info == NULL || Py_TYPE(info) != tb_info) {
        return NULL;
    }
    PyObject *sites = SLOT(info, ts_sites_off);
    if (sites == NULL || !PyDict_CheckExact(sites)) {
        return NULL;
    }
    /* ``info.sites.get((id(code), raw[1]) if raw else None)``, ``code = raw[0] if raw else
     * None`` */
    PyObject *code = Py_None, *hit;
    if (raw == Py_None || (PyTuple_CheckExact(raw) && PyTuple_GET_SIZE(raw) == 0)) {
        hit = PyDict_GetItemWithError(sites, Py_None);
    }
    else if (PyTuple_CheckExact(raw) && PyTuple_GET_SIZE(raw) >= 2) {
        code = PyTuple_GET_ITEM(raw, 0);
        PyObject *lasti = PyTuple_GET_ITEM(raw, 1);
#ifdef PGLEAK_VERDICT_TABLE
        /* The last line's entry, while ``sites`` is unchanged: the entry holds its code, so
         * the same address is the same code; the same offset object, the same offset. */
        if (code == ts_site.code && lasti == ts_site.lasti && sites == ts_site.sites
            && dict_version(sites) == ts_site.tag) {
            hit = ts_site.hit;
        }
        else
#endif
        {
            PyObject *key = PyLong_FromVoidPtr(code);
            PyObject *pair = key == NULL ? NULL : PyTuple_Pack(2, key, lasti);
            Py_XDECREF(key);
            if (pair == NULL) {
                return NULL;
            }
            hit = PyDict_GetItemWithError(sites, pair);
            Py_DECREF(pair);
#ifdef PGLEAK_VERDICT_TABLE
            if (hit != NULL) {
                ts_site.code = code;
                ts_site.lasti = lasti;
                ts_site.sites = sites;
                ts_site.tag = dict_version(sites);
                ts_site.hit = hit;
            }
#endif
        }
    }
    else {
        return NULL;
    }
    if (hit == NULL || !PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 2
        || PyTuple_GET_ITEM(hit, 0) != code || !PyDict_CheckExact(PyTuple_GET_ITEM(hit, 1))) {
        return NULL; /* not kept (the method's _base()), or an id reused */
    }
    PyObject *attrs = PyDict_Copy(PyTuple_GET_ITEM(hit, 1));
    if (attrs == NULL) {
        return NULL;
    }
    PyObject *holder = NULL, *waited = NULL;
    if (PyDict_SetItem(attrs, s_ts_checkout_id, id) < 0) {
        goto fail;
    }
    holder = ts_holder_of(task, thread);
    if (holder == NULL) {
        goto fail;
    }
    if (context != Py_None && PyUnicode_GET_LENGTH(context) > 0) {
        Py_SETREF(holder, PyUnicode_FromFormat("%U during %U", holder, context));
        if (holder == NULL || PyDict_SetItem(attrs, s_ts_holder, holder) < 0
            || PyDict_SetItem(attrs, s_ts_context, context) < 0) {
            goto fail;
        }
    }
    else if (PyDict_SetItem(attrs, s_ts_holder, holder) < 0) {
        goto fail;
    }
    Py_CLEAR(holder);
    *start = t0;
    if (since != Py_None) {
        double a = PyFloat_AS_DOUBLE(t0), b = PyFloat_AS_DOUBLE(since);
        waited = PyFloat_FromDouble(a > b ? a - b : 0.0);
        if (waited == NULL || PyDict_SetItem(attrs, s_ts_waited, waited) < 0) {
            goto fail;
        }
        Py_DECREF(waited);
        *start = since;
    }
    return attrs;
fail:
    Py_XDECREF(holder);
    Py_XDECREF(waited);
    Py_DECREF(attrs);
    return NULL;
}

/* ``self._start(lease, state, parent)`` (``dict``: the observer's, from ts_mine): the span, a
 * new reference, or NULL with an error set. */
static PyObject *
ts_start(PyObject *observer, PyObject *dict, PyObject *lease, PyObject *state, PyObject *parent)
{
    PyObject *start = NULL;
    PyObject *tracer = ts_get(dict, s_ts_tracer, TM_OWN(TM_TRACER));
    PyObject *attrs = tracer == NULL ? NULL : ts_attributes(lease, state, &start);
    if (attrs == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        PyObject *args[4] = {observer, lease, state, parent};
        return PyObject_VectorcallMethod(ts_names[TS_START], args, 4, NULL);
    }
    Py_INCREF(tracer);
    Py_INCREF(start);
    PyObject *span = NULL, *offset = NULL, *at = NULL, *mono = NULL;
    PyObject *ns = ts_clock(s_ts_time_ns);
    if (ns == NULL || (mono = ts_clock(s_ts_monotonic)) == NULL) {
        goto done;
    }
    offset = ts_ns(ns, mono, 1);
    if (offset == NULL) {
        goto done;
    }
    slot_set(state, trace_off[T_OFFSET], Py_NewRef(offset));
    at = ts_ns(offset, start, 0);
    if (at == NULL) {
        goto done;
    }
    PyObject *args[7] = {tracer, ts_span_name, parent, ts_internal, attrs, Py_None, at};
    span = PyObject_VectorcallMethod(s_ts_start_span, args, 7, NULL);
    if (span != NULL) {
        slot_set(state, trace_off[T_SPAN], Py_NewRef(span));
    }
done:
    Py_XDECREF(ns);
    Py_XDECREF(mono);
    Py_XDECREF(offset);
    Py_XDECREF(at);
    Py_DECREF(attrs);
    Py_DECREF(start);
    Py_DECREF(tracer);
    return span;
}

/* ``Telemetry.enter(lease)``: 1 done as the method would, 0 the method must run, -1 an error
 * set (where the method would have raised it). */
static int
ts_enter(PyObject *observer, PyObject *lease)
{
    if (!Py_IS_TYPE(lease, lease_type)) {
        return 0;
    }
    PyObject *dict = ts_mine(observer, TS_ENTER);
    if (dict == NULL) {
        return 0;
    }
    int result = 0;
    PyObject *current = NULL, *span = NULL, *ctx = NULL;
    PyObject *state = SLOT(lease, lease_off[L_OTEL]);
    if (state == Py_None) {
        result = 1;
        goto done;
    }
    if (state == NULL || !Py_IS_TYPE(state, tb_trace)) {
        goto done;
    }
    PyObject *ended = SLOT(state, trace_off[T_ENDED]), *token = SLOT(state, trace_off[T_TOKEN]);
    if (ended == Py_True) {
        result = 1;
        goto done;
    }
    if (ended != Py_False || token == NULL || SLOT(state, trace_off[T_SPAN]) == NULL) {
        goto done;
    }
    if (token != Py_None) { /* the same connection's block, nested */
        PyObject *depth = SLOT(state, trace_off[T_DEPTH]);
        if (depth == NULL || !PyLong_CheckExact(depth)) {
            goto done;
        }
        PyObject *deeper = PyNumber_Add(depth, ts_one);
        if (deeper == NULL) {
            result = -1;
            goto done;
        }
        slot_set(state, trace_off[T_DEPTH], deeper);
        result = 1;
        goto done;
    }
    if (PyContextVar_Get(tb_var, NULL, &current) < 0) {
        result = -1;
        goto done;
    }
    if (current == NULL) {
        goto done; /* var.get() raises: the method does */
    }
    span = Py_NewRef(SLOT(state, trace_off[T_SPAN]));
    if (span == Py_None) {
        Py_SETREF(span, ts_start(observer, dict, lease, state, current));
        if (span == NULL) {
            result = -1;
            goto done;
        }
    }
    /* Context(current, **{_SPAN_KEY: span}) */
    if (ts_context_plain && (Py_IS_TYPE(current, ts_context) || PyDict_CheckExact(current))) {
        ctx = PyDict_Type.tp_new(ts_context, tb_no_args, NULL);
        if (ctx != NULL
            && (PyDict_Merge(ctx, current, 1) < 0 || PyDict_SetItem(ctx, ts_span_key, span) < 0)) {
            Py_CLEAR(ctx);
        }
    }
    else {
        PyObject *args[2] = {current, span};
        ctx = PyObject_Vectorcall((PyObject *)ts_context, args, 1, ts_kwnames);
    }
    if (ctx == NULL) {
        result = -1;
        goto done;
    }
    slot_set(state, trace_off[T_CTX], Py_NewRef(ctx));
    PyObject *set = PyContextVar_Set(tb_var, ctx);
    if (set == NULL) {
        result = -1;
        goto done;
    }
    slot_set(state, trace_off[T_TOKEN], set);
    slot_set(state, trace_off[T_DEPTH], Py_NewRef(ts_one));
    result = 1;
done:
    Py_XDECREF(current);
    Py_XDECREF(span);
    Py_XDECREF(ctx);
    Py_DECREF(dict);
    return result;
}

/* ``Telemetry.exit(lease)``, as ts_enter. */
static int
ts_exit(PyObject *observer, PyObject *lease)
{
    if (!Py_IS_TYPE(lease, lease_type)) {
        return 0;
    }
    PyObject *dict = ts_mine(observer, TS_EXIT);
    if (dict == NULL) {
        return 0;
    }
    Py_DECREF(dict); /* only the test: exit reads nothing of the observer's */
    PyObject *state = SLOT(lease, lease_off[L_OTEL]);
    if (state == Py_None) {
        return 1;
    }
    if (state == NULL || !Py_IS_TYPE(state, tb_trace)) {
        return 0;
    }
    PyObject *token = SLOT(state, trace_off[T_TOKEN]), *depth = SLOT(state, trace_off[T_DEPTH]);
    if (token == Py_None) {
        return 1;
    }
    if (token == NULL || depth == NULL || !PyLong_CheckExact(depth)
        || SLOT(state, trace_off[T_CTX]) == NULL) {
        return 0;
    }
    /* read first (it has no effect), so that an unset variable is the method's case whole */
    PyObject *current = NULL;
    if (PyContextVar_Get(tb_var, NULL, &current) < 0) {
        return -1;
    }
    if (current == NULL) {
        return 0;
    }
    Py_DECREF(current); /* compared by identity only, and still held by the variable */
    PyObject *shallower = PyNumber_Subtract(depth, ts_one);
    if (shallower == NULL) {
        return -1;
    }
    slot_set(state, trace_off[T_DEPTH], shallower);
    int more = PyObject_RichCompareBool(shallower, tb_zero, Py_GT);
    if (more != 0) {
        return more < 0 ? -1 : 1;
    }
    token = Py_NewRef(token);
    PyObject *ctx = Py_NewRef(SLOT(state, trace_off[T_CTX]));
    slot_set(state, trace_off[T_TOKEN], Py_NewRef(Py_None));
    slot_set(state, trace_off[T_CTX], Py_NewRef(Py_None));
    int result = 1;
    if (current == ctx && PyContextVar_Reset(tb_var, token) < 0) {
        if (PyErr_ExceptionMatches(PyExc_ValueError)
            || PyErr_ExceptionMatches(PyExc_RuntimeError)) {
            PyErr_Clear(); /* a token of another contextvars.Context */
        }
        else {
            result = -1;
        }
    }
    Py_DECREF(token);
    Py_DECREF(ctx);
    return result;
}

/* ``observer.enter(lease)`` / ``observer.exit(lease)`` (``name``: the caller's interned
 * "enter" / "exit"): what PyObject_CallMethodOneArg would return. */
static PyObject *
trace_told(PyObject *observer, PyObject *name, PyObject *lease, int entering)
{
    int done = entering ? ts_enter(observer, lease) : ts_exit(observer, lease);
    if (done != 0) {
        return done < 0 ? NULL : Py_NewRef(Py_None);
    }
    return PyObject_CallMethodOneArg(observer, name, lease);
}

/* ``Telemetry.checked_in(lease, late, discarded)``, as ts_enter. */
static int
ts_checked_in(PyObject *observer, PyObject *lease, int late, int discarded)
{
    if (!Py_IS_TYPE(lease, lease_type)) {
        return 0;
    }
    PyObject *dict = ts_mine(observer, TS_CHECKED_IN);
    if (dict == NULL) {
        return 0;
    }
    int result = 0;
    PyObject *end = NULL, *span = NULL, *attrs = NULL, *held = NULL, *at = NULL, *done = NULL;
    PyObject *state = SLOT(lease, lease_off[L_OTEL]), *t0 = SLOT(lease, lease_off[L_T0]);
    PyObject *t_in = SLOT(lease, lease_off[L_T_IN]);
    if (t_in == NULL || t0 == NULL || state == NULL
        || ts_get(dict, s_ts_metering, TM_OWN(TM_METERING)) != Py_False) {
        PyErr_Clear();
        goto out; /* metrics to record: the method's */
    }
    if (state == Py_None) {
        result = 1;
        goto out;
    }
    PyObject *ended = Py_IS_TYPE(state, tb_trace) ? SLOT(state, trace_off[T_ENDED]) : NULL;
    if ((ended != Py_True && ended != Py_False) || SLOT(state, trace_off[T_SPAN]) == NULL
        || SLOT(state, trace_off[T_PARENT]) == NULL || SLOT(state, trace_off[T_OFFSET]) == NULL
        || SLOT(state, trace_off[T_OUTCOME]) == NULL) {
        goto out;
    }
    result = 1;
    if (discarded) {
        slot_set(state, trace_off[T_OUTCOME], Py_NewRef(s_ts_discarded));
    }
    if (late || ended == Py_True) {
        goto out;
    }
    slot_set(state, trace_off[T_ENDED], Py_NewRef(Py_True));
    span = Py_NewRef(SLOT(state, trace_off[T_SPAN]));
    if (span == Py_None) {
        PyObject *parent = Py_NewRef(SLOT(state, trace_off[T_PARENT]));
        Py_SETREF(span, ts_start(observer, dict, lease, state, parent));
        Py_DECREF(parent);
        if (span == NULL) {
            goto fail;
        }
    }
    slot_set(state, trace_off[T_PARENT], Py_NewRef(Py_None));
    end = t_in == Py_None ? ts_clock(s_ts_monotonic) : Py_NewRef(t_in);
    if (end == NULL) {
        goto fail;
    }
    t0 = SLOT(lease, lease_off[L_T0]);
    if (t0 == NULL) {
        PyErr_SetString(PyExc_AttributeError, "t0");
        goto fail;
    }
    if (PyFloat_CheckExact(end) && PyFloat_CheckExact(t0)) {
        double a = PyFloat_AS_DOUBLE(end), b = PyFloat_AS_DOUBLE(t0);
        held = PyFloat_FromDouble(a > b ? a - b : 0.0);
    }
    else {
        int later = PyObject_RichCompareBool(end, t0, Py_GT);
        held = later < 0 ? NULL : later ? PyNumber_Subtract(end, t0) : PyFloat_FromDouble(0.0);
    }
    attrs = held == NULL ? NULL : PyDict_New();
    if (attrs == NULL || PyDict_SetItem(attrs, s_ts_held, held) < 0
        || PyDict_SetItem(attrs, s_ts_outcome, SLOT(state, trace_off[T_OUTCOME])) < 0) {
        goto fail;
    }
    PyObject *args[2] = {span, attrs};
    done = PyObject_VectorcallMethod(s_ts_set_attributes, args, 2, NULL);
    if (done == NULL) {
        goto fail;
    }
    Py_CLEAR(done);
    at = ts_ns(SLOT(state, trace_off[T_OFFSET]), end, 0);
    if (at == NULL) {
        goto fail;
    }
    args[1] = at;
    done = PyObject_VectorcallMethod(s_ts_end, args, 2, NULL);
    if (done == NULL) {
        goto fail;
    }
    goto out;
fail:
    result = -1;
out:
    Py_XDECREF(end);
    Py_XDECREF(span);
    Py_XDECREF(attrs);
    Py_XDECREF(held);
    Py_XDECREF(at);
    Py_XDECREF(done);
    Py_DECREF(dict);
    return result;
}

PyDoc_STRVAR(trace_block_doc,
"trace_block(observer, lease, entering) -> None\n\n"
"``observer.enter(lease)`` (or ``exit``) as the C block wrappers tell it: in C where the\n"
"method's common case allows. For tests: the wrappers call it directly.");

static PyObject *
trace_block(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static PyObject *names[2];
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "trace_block(observer, lease, entering)");
        return NULL;
    }
    int entering = PyObject_IsTrue(args[2]);
    if (entering < 0) {
        return NULL;
    }
    if (names[entering] == NULL) {
        names[entering] = PyUnicode_InternFromString(entering ? "enter" : "exit");
        if (names[entering] == NULL) {
            return NULL;
        }
    }
    return trace_told(args[0], names[entering], args[1], entering);
}

PyDoc_STRVAR(trace_span_bind_doc,
"trace_span_bind(Context, otel_globals) -> None\n\n"
"Let the C code start, enter, exit and end a traced checkout's span itself, after\n"
"``trace_bind`` (``Context``: opentelemetry.context.Context; ``otel_globals``: the dict of\n"
"pgleak._otel, whose ``_CONTEXT``, clocks and names it reads).");

static PyObject *
trace_span_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyType_Check(args[0])
        || !PyType_IsSubtype((PyTypeObject *)args[0], &PyDict_Type) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "trace_span_bind(Context: dict type, otel_globals: dict)");
        return NULL;
    }
    if (tb_telemetry == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "trace_span_bind(): trace_bind() first");
        return NULL;
    }
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&s_ts_context_var, "_CONTEXT"}, {&s_ts_time_ns, "_time_ns"},
        {&s_ts_monotonic, "_monotonic"}, {&s_ts_tracer, "tracer"},
        {&s_ts_start_span, "start_span"}, {&s_ts_set_attributes, "set_attributes"},
        {&s_ts_end, "end"}, {&s_ts_metering, "metering"},
        {&s_ts_checkout_id, "pgleak.checkout_id"}, {&s_ts_holder, "pgleak.holder"},
        {&s_ts_context, "pgleak.context"}, {&s_ts_waited, "pgleak.waited_s"},
        {&s_ts_held, "pgleak.held_s"}, {&s_ts_outcome, "pgleak.outcome"},
        {&s_ts_discarded, "discarded"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL) {
            *names[i].slot = PyUnicode_InternFromString(names[i].text);
            if (*names[i].slot == NULL) {
                return NULL;
            }
        }
    }
    for (int i = 0; i < TS_COUNT; i++) {
        if (ts_names[i] == NULL) {
            ts_names[i] = PyUnicode_InternFromString(ts_method_names[i]);
            if (ts_names[i] == NULL) {
                return NULL;
            }
        }
    }
    if (ts_one == NULL) {
        ts_one = PyLong_FromLong(1);
        ts_e9 = PyFloat_FromDouble(1e9);
        if (ts_one == NULL || ts_e9 == NULL) {
            return NULL;
        }
    }
    Py_CLEAR(ts_globals); /* off until bound again */
    PyObject *globals = args[1];
    /* Only the methods pgleak._otel defines: one replaced already (a test's fault) stays the
     * Python call it is now, and so does every other method it reaches when it is _start. */
    PyObject *fns[TS_COUNT];
    for (int i = 0; i < TS_COUNT; i++) {
        fns[i] = PyDict_GetItemWithError(tb_telemetry->tp_dict, ts_names[i]);
        if (fns[i] == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (fns[i] != NULL
            && (!PyFunction_Check(fns[i]) || PyFunction_GET_GLOBALS(fns[i]) != globals)) {
            fns[i] = NULL;
        }
    }
    PyObject *span_name = PyDict_GetItemString(globals, "SPAN_NAME");
    PyObject *internal = PyDict_GetItemString(globals, "_INTERNAL");
    PyObject *span_key = PyDict_GetItemString(globals, "_SPAN_KEY");
    if (span_name == NULL || internal == NULL || span_key == NULL
        || !PyUnicode_CheckExact(span_key) || PyUnicode_GET_LENGTH(span_key) == 0
        || PyDict_GetItemWithError(globals, s_ts_context_var) != tb_var) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "trace_span_bind(): not the globals of pgleak._otel "
                                             "as trace_bind() was given them");
        }
        return NULL;
    }
    Py_ssize_t sites_off;
    if (member_offset((PyObject *)tb_info, "sites", &sites_off) < 0) {
        return NULL;
    }
    PyObject *kwnames = PyTuple_Pack(1, span_key);
    if (kwnames == NULL) {
        return NULL;
    }
    PyTypeObject *context = (PyTypeObject *)args[0];
    ts_context_plain =
        context->tp_new == PyDict_Type.tp_new && context->tp_init == PyDict_Type.tp_init;
    ts_sites_off = sites_off;
    Py_XSETREF(ts_kwnames, kwnames);
    Py_XSETREF(ts_span_name, Py_NewRef(span_name));
    Py_XSETREF(ts_internal, Py_NewRef(internal));
    Py_XSETREF(ts_span_key, Py_NewRef(span_key));
    Py_XSETREF(ts_context, (PyTypeObject *)Py_NewRef(args[0]));
    for (int i = 0; i < TS_COUNT; i++) {
        Py_XSETREF(ts_fn[i], Py_XNewRef(fns[i]));
    }
    Py_XSETREF(ts_globals, Py_NewRef(globals)); /* last: it switches it on */
    Py_RETURN_NONE;
}

PyDoc_STRVAR(checkout_doc,
"checkout(core, pool, conn=None, index=False, since=None) -> Lease | None\n\n"
"Core.checkout, positional arguments only (anything else goes to the Python method).");

static PyObject *
ledger_checkout(PyObject *module, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (!bound || kwnames != NULL || nargs < 2 || nargs > 5) {
        return PyObject_Vectorcall(b_checkout_py, args, nargsf, kwnames);
    }
    PyObject *core = args[0], *pool = args[1];
    PyObject *conn = nargs > 2 ? args[2] : Py_None;
    int index = nargs > 3 ? PyObject_IsTrue(args[3]) : 0;
    PyObject *since = nargs > 4 ? args[4] : Py_None;
    if (index < 0) {
        return NULL;
    }
    PyObject *settings = NULL, *leases = NULL, *value = NULL, *lease = NULL, *task = Py_None;
    PyObject *loop = NULL, *result = NULL, *observed = NULL;
    Py_INCREF(task);

    int quiet = calm(core); /* the settings seen last are this core's, nothing rare to do */
    if (!quiet) {
        settings = live(core, s_settings);
        if (settings == NULL || read_settings(settings) < 0) {
            goto done;
        }
    }
    if (!set_enabled) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    value = vars_used ? var_get(b_suppressed) : Py_NewRef(var_defaults[0]);
    if (value == NULL) {
        goto done;
    }
    int truth = PyObject_IsTrue(value);
    Py_CLEAR(value);
    if (truth != 0) {
        result = truth < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    leases = held(core, a_leases, s_leases);
    if (leases == NULL || !PyDict_CheckExact(leases)) {
        /* not the ledger Core.__init__ made: let the Python method deal with it */
        Py_CLEAR(leases);
        PyErr_Clear();
        result = PyObject_Vectorcall(b_checkout_py, args, nargsf, kwnames);
        goto done;
    }
    if (PyDict_GET_SIZE(leases) >= set_max_tracked) {
        /* the bound: the Python method warns and counts */
        result = PyObject_Vectorcall(b_checkout_py, args, nargsf, kwnames);
        goto done;
    }
    double threshold = set_leak_threshold;
    value = vars_used ? var_get(b_allowance) : Py_NewRef(var_defaults[1]);
    if (value == NULL) {
        goto done;
    }
    double extra = PyFloat_AsDouble(value);
    Py_CLEAR(value);
    if (extra == -1.0 && PyErr_Occurred()) {
        goto done;
    }
    if (extra > threshold) {
        threshold = extra;
    }
    loop = running_loop();
    if (loop == NULL) {
        goto done;
    }
    if (loop != Py_None) {
        Py_SETREF(task, current_task_of(loop));
        if (task == NULL) {
            goto done;
        }
    }
    PyObject *t0 = clock_now();
    if (t0 == NULL) {
        goto done;
    }
    double t0_d = PyFloat_AsDouble(t0);
    PyObject *thread = thread_identity();
    if (thread == NULL) {
        Py_DECREF(t0);
        goto done;
    }
    lease = PyType_GenericAlloc(lease_type, 0);
    if (lease == NULL) {
        Py_DECREF(t0);
        Py_DECREF(thread);
        goto done;
    }
    /* Every slot is filled before anything else can fail, so a half-built lease is never
     * seen with an unset slot (which would raise AttributeError wherever it is read). The
     * lease is new, its slots NULL: filled without dropping what was there. */
    PyObject *generation = quiet ? calm_generation
                                 : PyDict_GetItemWithError(b_core_globals, s_generation);
    SLOT_FILL(lease, lease_off[L_GENERATION], Py_NewRef(generation ? generation : Py_None));
    SLOT_FILL(lease, lease_off[L_ID], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_POOL], Py_NewRef(pool));
    SLOT_FILL(lease, lease_off[L_T0], t0);
    SLOT_FILL(lease, lease_off[L_DEADLINE], PyFloat_FromDouble(t0_d + threshold));
    SLOT_FILL(lease, lease_off[L_THREAD], thread);
    SLOT_FILL(lease, lease_off[L_RAW], PyTuple_New(0));
    SLOT_FILL(lease, lease_off[L_TASK], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_REF], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_CONTEXT], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_PROBE], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_KEY], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_FLAGGED], Py_NewRef(Py_False));
    SLOT_FILL(lease, lease_off[L_REPORTED], Py_NewRef(Py_False));
    SLOT_FILL(lease, lease_off[L_T_IN], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_OTEL], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_SELF_RETURNING], Py_NewRef(extra == Py_HUGE_VAL ? Py_True : Py_False));
    SLOT_FILL(lease, lease_off[L_CLOSED], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_UNSEEN_CLOSE], Py_NewRef(Py_False));
    if (generation == NULL || SLOT(lease, lease_off[L_DEADLINE]) == NULL
        || SLOT(lease, lease_off[L_RAW]) == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "pgleak._core._generation is missing");
        }
        goto done;
    }
    PyObject *ids = held(core, a_ids, s_ids);
    if (ids == NULL) {
        goto done;
    }
    PyObject *lease_id = PyIter_Next(ids);
    Py_DECREF(ids);
    if (lease_id == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "the lease ids ran out");
        }
        goto done;
    }
    slot_set(lease, lease_off[L_ID], lease_id);

    if (set_capture_stack) {
        PyObject *raw = checkout_stack(task);
        if (raw == NULL) {
            goto done;
        }
        slot_set(lease, lease_off[L_RAW], raw);
    }
    if (task != Py_None) {
        PyObject *pair = task_identity(task);
        if (pair == NULL) {
            goto done;
        }
        slot_set(lease, lease_off[L_TASK], pair);
    }
    value = vars_used ? var_get(b_context) : Py_NewRef(var_defaults[2]);
    if (value == NULL) {
        goto done;
    }
    slot_set(lease, lease_off[L_CONTEXT], value);
    value = NULL;

    if (conn != Py_None) {
        PyObject *collected = held(core, a_collected, s_collected);
        if (collected == NULL) {
            goto done;
        }
        PyObject *ref;
        if (connref_plain) {
            /* _ConnRef(conn, collected) without type_call around it: weakref's tp_init only
             * checks the arguments its tp_new has taken already. Its arguments' tuple is
             * the same one each time, emptied after the call (weakref's tp_new keeps no
             * reference to it, runs no Python code), made anew only if something kept it;
             * untracked, so that the collector never hands it, empty, to Python code. */
            static PyObject *pair = NULL;
            if (pair == NULL || Py_REFCNT(pair) != 1) {
                Py_XSETREF(pair, PyTuple_New(2));
                if (pair != NULL && PyObject_GC_IsTracked(pair)) {
                    PyObject_GC_UnTrack(pair);
                }
            }
            if (pair == NULL) {
                ref = NULL;
            }
            else {
                PyTuple_SET_ITEM(pair, 0, Py_NewRef(conn));
                PyTuple_SET_ITEM(pair, 1, Py_NewRef(collected));
                ref = connref_type->tp_new(connref_type, pair, NULL);
                PyObject *held_conn = PyTuple_GET_ITEM(pair, 0);
                PyObject *held_callback = PyTuple_GET_ITEM(pair, 1);
                PyTuple_SET_ITEM(pair, 0, NULL);
                PyTuple_SET_ITEM(pair, 1, NULL);
                Py_DECREF(held_conn);
                Py_DECREF(held_callback);
            }
        }
        else {
            PyObject *cargs[2] = {conn, collected};
            ref = PyObject_Vectorcall((PyObject *)connref_type, cargs, 2, NULL);
        }
        Py_DECREF(collected);
        if (ref == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
                goto done;
            }
            PyErr_Clear(); /* not weak-referenceable: "collected" cannot happen to it anyway */
        }
        else if (!PyObject_TypeCheck(ref, connref_type)) {
            Py_DECREF(ref);
            PyErr_SetString(PyExc_TypeError, "_ConnRef() made something else");
            goto done;
        }
        else {
            PyObject *key = conn_key(conn);
            if (key == NULL) {
                Py_DECREF(ref);
                goto done;
            }
            slot_set(ref, ref_lease_id_off, Py_NewRef(SLOT(lease, lease_off[L_ID])));
            slot_set(ref, ref_key_off, Py_NewRef(key));
            slot_set(lease, lease_off[L_REF], ref);
            if (index) {
                slot_set(lease, lease_off[L_KEY], Py_NewRef(key));
                PyObject *by_conn = held(core, a_by_conn, s_by_conn);
                if (by_conn == NULL || !PyDict_Check(by_conn)) {
                    Py_XDECREF(by_conn);
                    Py_DECREF(key);
                    if (!PyErr_Occurred()) {
                        PyErr_SetString(PyExc_TypeError, "Core.by_conn is not a dict");
                    }
                    goto done;
                }
                /* Filed at once if the key is free (the common case: one lookup, not two);
                 * otherwise ``stale`` is what holds it, dealt with, then replaced. */
                PyObject *stale = PyDict_SetDefault(by_conn, key, lease); /* borrowed */
                if (stale == NULL) {
                    Py_DECREF(by_conn);
                    Py_DECREF(key);
                    goto done;
                }
                if (stale != lease && Py_IS_TYPE(stale, lease_type)) {
                    PyObject *stale_ref = SLOT(stale, lease_off[L_REF]);
                    PyObject *target = (stale_ref != NULL && PyWeakref_Check(stale_ref))
                                           ? ref_target(stale_ref) : NULL;
                    if (target == conn) {
                        /* The pool lent this connection again, so it had it back; the old
                         * lease's checkin went unseen (a path the adapter does not hook). */
                        Py_INCREF(stale);
                        PyObject *gone = PyObject_CallMethodOneArg(core, s_forget, stale);
                        Py_DECREF(stale);
                        if (gone == NULL) {
                            Py_DECREF(target);
                            Py_DECREF(by_conn);
                            Py_DECREF(key);
                            goto done;
                        }
                        Py_DECREF(gone);
                    }
                    Py_XDECREF(target);
                }
                int failed = stale == lease ? 0 : PyDict_SetItem(by_conn, key, lease);
                Py_DECREF(by_conn);
                if (failed < 0) {
                    Py_DECREF(key);
                    goto done;
                }
            }
            Py_DECREF(key);
        }
    }
    if (PyDict_SetItem(leases, SLOT(lease, lease_off[L_ID]), lease) < 0) {
        goto done;
    }
    /* The rest (the watchdog's first start, an observer, one waiting to wake) is Python's:
     * one attribute check each decides whether to call it; while the answers kept say there
     * is nothing (checked again: Python code may have run since), none. */
    if (calm(core)) {
        result = Py_NewRef(lease);
        goto done;
    }
    int later = watchdog_idle(core);
    if (later < 0) {
        goto done;
    }
    if (!later) {
        value = live(core, s_observer);
        if (value == NULL) {
            goto done;
        }
        later = value != Py_None;
        if (later) {
            observed = value; /* the observer, told here (the watchdog is running) */
            value = NULL;
        }
        Py_CLEAR(value);
    }
    if (!later) {
        value = live(core, s_waker);
        if (value == NULL) {
            goto done;
        }
        later = value != Py_None;
        Py_CLEAR(value);
        if (later) {
            later = wake_due(core);
            if (later < 0) {
                goto done;
            }
        }
    }
    if (later && observed) {
        /* _after_checkout()'s common case: the watchdog running, an observer to tell */
        if (observe_names() < 0) {
            goto done;
        }
        int failed = trace_checkout(observed, lease, since);
        if (failed == 0) {
            PyObject *oargs[3] = {observed, lease, since};
            failed = observe(s_checked_out, s_site_out, oargs, 3);
        }
        else {
            failed = failed < 0 ? observe_fault(s_site_out) : 0;
        }
        Py_CLEAR(observed);
        if (failed < 0) {
            goto done;
        }
    }
    else if (later) {
        value = PyObject_CallMethodObjArgs(core, s_after_checkout, lease, since, NULL);
        if (value == NULL) {
            goto done;
        }
        Py_CLEAR(value);
    }
    else {
        calm_now(core);
    }
    result = Py_NewRef(lease);
done:
    Py_XDECREF(settings);
    Py_XDECREF(leases);
    Py_XDECREF(loop);
    Py_XDECREF(task);
    Py_XDECREF(lease);
    Py_XDECREF(observed);
    return result;
}

PyDoc_STRVAR(checkin_doc, "checkin(core, lease) -> None\n\nCore.checkin.");

static PyObject *
ledger_checkin(PyObject *module, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (!bound || kwnames != NULL || nargs != 2 || !Py_IS_TYPE(args[1], lease_type)) {
        return PyObject_Vectorcall(b_checkin_py, args, nargsf, kwnames);
    }
    PyObject *core = args[0], *lease = args[1];
    PyObject *ref = SLOT(lease, lease_off[L_REF]);
    if (ref != NULL && ref != Py_None) {
        PyObject *target = PyWeakref_Check(ref) ? ref_target(ref) : NULL;
        if (target == NULL) {
            /* The pool is returning a connection whose user-facing object was collected:
             * a leak the pool papered over, not a return (see Core.checkin). */
            return PyObject_CallMethodOneArg(core, s_on_collected, ref);
        }
        Py_DECREF(target);
    }
    int quiet = calm(core);
    PyObject *generation = quiet ? calm_generation
                                 : PyDict_GetItemWithError(b_core_globals, s_generation);
    PyObject *mine = SLOT(lease, lease_off[L_GENERATION]);
    if (generation == NULL || mine == NULL) {
        return PyErr_Occurred() ? NULL : PyObject_Vectorcall(b_checkin_py, args, nargsf, NULL);
    }
    if (mine != generation) {
        int same = PyObject_RichCompareBool(mine, generation, Py_EQ);
        if (same < 0) {
            return NULL;
        }
        if (!same) {
            Py_RETURN_NONE; /* checked out before a fork, in the parent */
        }
    }
    PyObject *now = clock_now();
    if (now == NULL) {
        return NULL;
    }
    slot_set(lease, lease_off[L_T_IN], Py_NewRef(now));
    PyObject *key = SLOT(lease, lease_off[L_KEY]);
    if (key != NULL && key != Py_None) {
        PyObject *by_conn = held(core, a_by_conn, s_by_conn);
        if (by_conn == NULL) {
            Py_DECREF(now);
            return NULL;
        }
        if (PyDict_Check(by_conn)) {
            PyObject *filed = PyDict_GetItemWithError(by_conn, key);
            if (filed == lease && PyDict_DelItem(by_conn, key) < 0) {
                PyErr_Clear(); /* another thread took it first: the same end */
            }
            else if (filed == NULL && PyErr_Occurred()) {
                Py_DECREF(by_conn);
                Py_DECREF(now);
                return NULL;
            }
        }
        Py_DECREF(by_conn);
    }
    PyObject *leases = held(core, a_leases, s_leases);
    if (leases == NULL) {
        Py_DECREF(now);
        return NULL;
    }
    PyObject *lease_id = SLOT(lease, lease_off[L_ID]);
    if (PyDict_Check(leases) && lease_id != NULL) {
        if (PyDict_DelItem(leases, lease_id) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                Py_DECREF(leases);
                Py_DECREF(now);
                return NULL;
            }
            PyErr_Clear();
        }
    }
    Py_DECREF(leases);
    PyObject *flagged = SLOT(lease, lease_off[L_FLAGGED]);
    int late = flagged != NULL && PyObject_IsTrue(flagged) > 0;
    if (late) {
        PyObject *pending = held(core, a_pending, s_pending);
        if (pending == NULL) {
            Py_DECREF(now);
            return NULL;
        }
        PyObject *entry = PyTuple_Pack(3, b_returned, lease, now);
        PyObject *done = entry == NULL ? NULL : PyObject_CallMethodOneArg(pending, s_append, entry);
        Py_XDECREF(entry);
        Py_DECREF(pending);
        if (done == NULL) {
            Py_DECREF(now);
            return NULL;
        }
        Py_DECREF(done);
    }
    Py_DECREF(now);
    if (calm(core)) {
        Py_RETURN_NONE; /* no observer (checked again: Python code may have run since) */
    }
    PyObject *observer = live(core, s_observer);
    if (observer == NULL) {
        return NULL;
    }
    if (observer == Py_None) {
        Py_DECREF(observer);
        Py_RETURN_NONE;
    }
    /* _observe_checkin(), every traced checkin */
    if (observe_names() < 0) {
        Py_DECREF(observer);
        return NULL;
    }
    PyObject *oargs[4] = {observer, lease, late ? Py_True : Py_False, Py_False};
    int fast = ts_checked_in(observer, lease, late, 0); /* the method's common case, in C */
    int failed = fast == 0 ? observe(s_checked_in, s_site_in, oargs, 4)
                           : fast < 0 ? observe_fault(s_site_in) : 0;
    Py_DECREF(observer);
    if (failed < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- asyncio checkouts and checkins without a coroutine of pgleak's -------------------
 *
 * An ``async def`` wrapper around a pool's ``getconn()`` / ``putconn()`` (or asyncpg's
 * ``Pool._acquire``) is a coroutine of its own on every checkout and checkin: its creation,
 * its frame, and a C-level ``send`` on every step of the library's coroutine under it. The
 * wrappers (pgleak._adapter, pgleak.integrations.asyncpg) hand the library's own awaitable to
 * this object instead, which forwards every ``send``/``throw``/``close`` to it and, the moment
 * it returns (or fails), does what the end of the ``async def`` did: the checkout (its
 * connection filed with the C ledger), the wait that ran out (``gave_up``, Python), the checkin.
 * It is a collections.abc.Coroutine (``__await__``, ``send``, ``throw``, ``close``), so code
 * that hands the call's result to ``create_task()`` or ``wait_for()`` still can, and its
 * ``cr_await`` leads a stack walk to the library's coroutine, as the ``async def``'s did.
 *
 * The checkout runs in the task that awaits (``send`` is called from the awaiting frame), so
 * the holder and the stack are those the ``async def`` saw. Everything rare (an observer
 * waiting for the wait's start, call-site tags) stays with the ``async def`` templates, which
 * the wrappers call instead whenever one is on; the C wrappers (Tracked, below) keep an
 * observer's checkout here too (AW_T_OBSERVED). */

enum { AW_ACQUIRE = 0, AW_RELEASE = 1 };
/* The same ends, for the C wrappers (Tracked, below): ``spec`` is the wrapper itself, ``args``
 * the call's arguments after the pool (keyword values last), ``kwargs`` their names or NULL. */
enum { AW_T_ACQUIRE = 2, AW_T_RELEASE = 3 };
/* AW_T_ACQUIRE while an observer runs, not yet started: the first ``send`` takes the wait's
 * start (``handle``, ``since``: the template's ``waiting(pool)`` at the top of its body) and
 * goes on as AW_T_ACQUIRE (see tracked_wait_start). */
enum { AW_T_OBSERVED = 4 };
/* ``Scope.__aenter__``'s (below): ``target`` the scope, entered when the library's
 * ``__aenter__`` returns (scope_awaited). */
enum { AW_SCOPE = 5 };
/* Tracked ABLOCK_ENTER's (asyncpg's ``PoolAcquireContext.__aenter__``): ``spec`` the wrapper,
 * the block entered when the library's ``__aenter__`` returns its proxy (ablock_told); for
 * SQLAlchemy's ``AsyncConnection.__aenter__``, ``target`` (the connection) then (sablock_told). */
enum { AW_T_BLOCK = 6 };

/* spec, for AW_ACQUIRE: (core, pools, kind, namer, proxy_type or None, gave_up,
 * internal_error, site); for AW_RELEASE: (core, refused, internal_error, site). */
enum { A_CORE, A_POOLS, A_KIND, A_NAMER, A_PROXY_TYPE, A_GAVE_UP, A_ERROR, A_SITE, A_COUNT };
enum { R_CORE, R_REFUSED, R_ERROR, R_SITE, R_COUNT };

typedef struct {
    PyObject_HEAD
    PyObject *it;     /* the library's awaitable's iterator; NULL once finished */
    PyObject *spec;
    PyObject *target; /* the pool (acquire) or the lease (release) */
    PyObject *args, *kwargs; /* the call's other arguments, for gave_up (acquire) */
    PyObject *handle, *since; /* AW_T_ACQUIRE after AW_T_OBSERVED: the wait's start, if taken */
    int mode;
} Awaiting;

static PyTypeObject Awaiting_Type;
static PyObject *s_pool, *s_con, *s_ref, *s_throw, *s_close, *s_checkout, *s_checkin;

static int
awaiting_traverse(Awaiting *self, visitproc visit, void *arg)
{
    Py_VISIT(self->it);
    Py_VISIT(self->spec);
    Py_VISIT(self->target);
    Py_VISIT(self->args);
    Py_VISIT(self->kwargs);
    Py_VISIT(self->handle);
    Py_VISIT(self->since);
    return 0;
}

static int
awaiting_clear(Awaiting *self)
{
    Py_CLEAR(self->it);
    Py_CLEAR(self->spec);
    Py_CLEAR(self->target);
    Py_CLEAR(self->args);
    Py_CLEAR(self->kwargs);
    Py_CLEAR(self->handle);
    Py_CLEAR(self->since);
    return 0;
}

static void tracked_wait_abandoned(Awaiting *self); /* below */

/* Dropped (or collected) in the middle of an observed wait: the ``async def`` template, closed
 * at its await, ended the wait in its ``except BaseException`` (the pool's pending count). */
static void
awaiting_finalize(Awaiting *self)
{
    if (self->handle != NULL) {
        tracked_wait_abandoned(self);
    }
}

static void
awaiting_dealloc(Awaiting *self)
{
    if (self->handle != NULL && PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected */
    }
    PyObject_GC_UnTrack(self);
    awaiting_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The iterator ``await obj`` drives: a native coroutine itself, else ``obj.__await__()``. */
static PyObject *
awaitable_iter(PyObject *obj)
{
    if (PyCoro_CheckExact(obj)) {
        return Py_NewRef(obj);
    }
    PyAsyncMethods *am = Py_TYPE(obj)->tp_as_async;
    if (am == NULL || am->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyObject *it = am->am_await(obj);
    if (it != NULL && !PyIter_Check(it)) {
        PyErr_Format(PyExc_TypeError, "__await__() returned non-iterator of type '%.100s'",
                     Py_TYPE(it)->tp_name);
        Py_CLEAR(it);
    }
    return it;
}

static PyObject *
make_awaiting(int mode, PyObject *spec, PyObject *awaitable, PyObject *target, PyObject *args,
              PyObject *kwargs)
{
    Py_ssize_t need = mode == AW_ACQUIRE ? A_COUNT : R_COUNT;
    if (!PyTuple_CheckExact(spec) || PyTuple_GET_SIZE(spec) != need) {
        PyErr_SetString(PyExc_TypeError, "pgleak: a malformed awaiting spec");
        return NULL;
    }
    PyObject *it = awaitable_iter(awaitable);
    if (it == NULL) {
        return NULL;
    }
    Awaiting *self = PyObject_GC_New(Awaiting, &Awaiting_Type);
    if (self == NULL) {
        Py_DECREF(it);
        return NULL;
    }
    self->it = it;
    self->spec = Py_NewRef(spec);
    self->target = Py_NewRef(target);
    self->args = Py_XNewRef(args);
    self->kwargs = Py_XNewRef(kwargs);
    self->handle = self->since = NULL;
    self->mode = mode;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

PyDoc_STRVAR(acquiring_doc,
"acquiring(spec, awaitable, pool, args, kwargs) -> awaitable\n\n"
"``awaitable`` (a pool's acquiring coroutine), with a checkout of its result when it returns\n"
"and ``gave_up(pool, err, args, kwargs)`` when it fails (see the comment above Awaiting).");

static PyObject *
acquiring(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "acquiring(spec, awaitable, pool, args, kwargs)");
        return NULL;
    }
    return make_awaiting(AW_ACQUIRE, args[0], args[1], args[2], args[3], args[4]);
}

PyDoc_STRVAR(releasing_doc,
"releasing(spec, awaitable, lease) -> awaitable\n\n"
"``awaitable`` (a pool's releasing coroutine), with the checkin of ``lease`` when it returns,\n"
"or fails with anything but the pool's refusal (``spec``'s ``refused`` classes).");

static PyObject *
releasing(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "releasing(spec, awaitable, lease)");
        return NULL;
    }
    return make_awaiting(AW_RELEASE, args[0], args[1], args[2], NULL, NULL);
}

/* A failure in pgleak's own bookkeeping: ``internal_error(site, exc)`` for an Exception (as
 * the templates' ``except Exception``), and carry on; anything else propagates. 0 swallowed,
 * -1 an error set. */
static int
swallow(PyObject *report, PyObject *site)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    PyObject *done = PyObject_CallFunctionObjArgs(report, site, value ? value : Py_None, NULL);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (done == NULL) {
        PyErr_Clear(); /* internal_error never raises; if it did, pgleak still must not */
    }
    Py_XDECREF(done);
    return 0;
}

/* The end of ``_ACQUIRE`` after the call returned ``result``: file the checkout. */
static int
acquired(Awaiting *self, PyObject *result)
{
    PyObject **spec = &PyTuple_GET_ITEM(self->spec, 0);
    PyObject *core = spec[A_CORE], *pool = self->target;
    PyObject *conn = NULL, *handle = NULL, *lease = NULL;
    int failed = 0;
    if (spec[A_PROXY_TYPE] != Py_None) {
        /* asyncpg: the proxy is filed under its Connection (the proxy has no weak refs) */
        if (!PyType_Check(spec[A_PROXY_TYPE])
            || !PyObject_TypeCheck(result, (PyTypeObject *)spec[A_PROXY_TYPE])) {
            return 0;
        }
        conn = PyObject_GetAttr(result, s_con);
        if (conn == NULL) {
            goto error;
        }
        if (conn == Py_None) {
            Py_DECREF(conn);
            return 0;
        }
    }
    else {
        conn = Py_NewRef(result);
    }
    /* handle = pools.get(id(pool)), unless a dead pool's id was reused: core.pool() */
    PyObject *key = PyLong_FromVoidPtr(pool);
    if (key == NULL) {
        goto error;
    }
    handle = PyDict_CheckExact(spec[A_POOLS]) ? PyDict_GetItemWithError(spec[A_POOLS], key) : NULL;
    Py_DECREF(key);
    Py_XINCREF(handle);
    if (handle == NULL && PyErr_Occurred()) {
        goto error;
    }
    if (handle != NULL) {
        PyObject *ref = PyObject_GetAttr(handle, s_ref);
        PyObject *obj = ref == NULL ? NULL : PyObject_CallNoArgs(ref);
        Py_XDECREF(ref);
        if (obj == NULL) {
            goto error;
        }
        if (obj != pool) {
            Py_CLEAR(handle);
        }
        Py_DECREF(obj);
    }
    if (handle == NULL) {
        handle = PyObject_CallMethodObjArgs(core, s_pool, pool, spec[A_KIND], spec[A_NAMER], NULL);
        if (handle == NULL) {
            goto error;
        }
    }
    PyObject *cargs[4] = {core, handle, conn, Py_True};
    /* ``core.checkout``, looked up as the template did: the C ledger's, bound to the core,
     * unless someone (a test's spy) put another there */
    lease = PyObject_VectorcallMethod(s_checkout, cargs, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (lease == NULL) {
        goto error;
    }
    goto done;
error:
    failed = swallow(spec[A_ERROR], spec[A_SITE]);
done:
    Py_XDECREF(conn);
    Py_XDECREF(handle);
    Py_XDECREF(lease);
    return failed;
}

/* The wait failed with the error set: ``gave_up(pool, err, args, kwargs)``, error kept. */
static void
gave_up(Awaiting *self)
{
    PyObject **spec = &PyTuple_GET_ITEM(self->spec, 0);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    PyObject *done = PyObject_CallFunctionObjArgs(
        spec[A_GAVE_UP], self->target, value ? value : Py_None,
        self->args ? self->args : Py_None, self->kwargs ? self->kwargs : Py_None, NULL);
    if (done == NULL) {
        PyErr_Clear(); /* gave_up guards itself; nothing of pgleak's reaches the caller */
    }
    Py_XDECREF(done);
    PyErr_Restore(type, value, tb);
}

/* The end of ``_RELEASE``: the lease is checked in, whatever ended the call (error set or
 * not) but the pool's refusal. */
static int
released(Awaiting *self, int raised)
{
    PyObject **spec = &PyTuple_GET_ITEM(self->spec, 0);
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (raised) {
        int refused = PyErr_ExceptionMatches(spec[R_REFUSED]);
        if (refused) {
            return 0;
        }
        PyErr_Fetch(&type, &value, &tb);
    }
    PyObject *cargs[2] = {spec[R_CORE], self->target};
    PyObject *done = PyObject_VectorcallMethod(s_checkin, cargs,
                                               2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    int failed = 0;
    if (done == NULL) {
        failed = swallow(spec[R_ERROR], spec[R_SITE]);
    }
    Py_XDECREF(done);
    if (raised) {
        if (failed) {
            /* a BaseException of pgleak's own over the call's: the call's goes on */
            PyErr_Clear();
        }
        PyErr_Restore(type, value, tb);
        return 0;
    }
    return failed;
}

static int tracked_ended(Awaiting *self, PyObject *result, int raised); /* below */
static int scope_awaited(PyObject *scope, PyObject *conn);              /* below */
static void tracked_wait_start(Awaiting *self);                         /* below */

/* The library's call has ended: returned ``result`` (``raised`` 0) or with the error set. */
static int
finished(Awaiting *self, PyObject *result, int raised)
{
    Py_CLEAR(self->it);
    if (self->target == NULL) {
        return 0; /* already ended (a re-entrant send that the library's coroutine refused) */
    }
    int failed = 0;
    if (self->mode == AW_SCOPE) {
        failed = raised ? 0 : scope_awaited(self->target, result);
    }
    else if (self->mode >= AW_T_ACQUIRE) {
        failed = tracked_ended(self, result, raised);
    }
    else if (self->mode == AW_ACQUIRE) {
        if (raised) {
            gave_up(self);
        }
        else {
            failed = acquired(self, result);
        }
    }
    else {
        failed = released(self, raised);
    }
    Py_CLEAR(self->target);
    Py_CLEAR(self->args);
    Py_CLEAR(self->kwargs);
    Py_CLEAR(self->handle);
    Py_CLEAR(self->since);
    return failed;
}

static PySendResult
awaiting_am_send(Awaiting *self, PyObject *arg, PyObject **presult)
{
    PyObject *it = self->it;
    if (it == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        *presult = NULL;
        return PYGEN_ERROR;
    }
    if (self->mode == AW_T_OBSERVED) {
        tracked_wait_start(self);
    }
    Py_INCREF(it);
    PyObject *result = NULL;
    PySendResult status = PyIter_Send(it, arg, &result);
    Py_DECREF(it);
    if (status == PYGEN_NEXT) {
        *presult = result;
        return PYGEN_NEXT;
    }
    if (finished(self, result, status == PYGEN_ERROR) < 0) {
        Py_XDECREF(result);
        *presult = NULL;
        return PYGEN_ERROR;
    }
    *presult = result;
    return status;
}

/* ``return value`` of a coroutine seen from Python: StopIteration(value). */
static PyObject *
stop_with(PyObject *value)
{
    if (value == Py_None) {
        Py_DECREF(value);
        PyErr_SetNone(PyExc_StopIteration);
        return NULL;
    }
    PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, value);
    Py_DECREF(value);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_StopIteration, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *
awaiting_send(Awaiting *self, PyObject *arg)
{
    PyObject *result;
    PySendResult status = awaiting_am_send(self, arg, &result);
    if (status == PYGEN_NEXT) {
        return result;
    }
    if (status == PYGEN_RETURN) {
        return stop_with(result);
    }
    return NULL;
}

static PyObject *
awaiting_iternext(Awaiting *self)
{
    return awaiting_send(self, Py_None);
}

/* ``throw(...)``: passed on to the library's iterator; its end is the call's end. */
static PyObject *
awaiting_throw(Awaiting *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *it = self->it;
    if (it == NULL) {
        /* nothing left to throw into: raise it here, as a finished coroutine does */
        if (nargs < 1) {
            PyErr_SetString(PyExc_TypeError, "throw expected at least 1 argument");
            return NULL;
        }
        PyObject *typ = args[0], *val = nargs > 1 ? args[1] : Py_None;
        if (PyExceptionInstance_Check(typ)) {
            PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
        }
        else {
            PyErr_SetObject(typ, val);
        }
        return NULL;
    }
    Py_INCREF(it);
    PyObject *callargs[4] = {it, NULL, NULL, NULL};
    for (Py_ssize_t i = 0; i < nargs && i < 3; i++) {
        callargs[i + 1] = args[i];
    }
    PyObject *result = PyObject_VectorcallMethod(
        s_throw, callargs, ((nargs > 3 ? 3 : nargs) + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(it);
    if (result != NULL) {
        return result; /* the library's coroutine caught it and awaits again */
    }
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        PyObject *ret = value ? PyObject_GetAttrString(value, "value") : Py_NewRef(Py_None);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        if (ret == NULL) {
            return NULL;
        }
        if (finished(self, ret, 0) < 0) {
            Py_DECREF(ret);
            return NULL;
        }
        return stop_with(ret);
    }
    finished(self, NULL, 1);
    return NULL;
}

static PyObject *
awaiting_close(Awaiting *self, PyObject *unused)
{
    PyObject *it = self->it;
    if (it == NULL) {
        Py_RETURN_NONE;
    }
    Py_INCREF(it);
    PyObject *close = NULL;
    if (PyObject_GetOptionalAttr(it, s_close, &close) < 0) {
        Py_DECREF(it);
        return NULL;
    }
    Py_DECREF(it);
    PyObject *result = close == NULL ? Py_NewRef(Py_None) : PyObject_CallNoArgs(close);
    Py_XDECREF(close);
    /* closed before it ended: as an ``async def`` closed at its await, nothing recorded (but
     * the end of an observed wait) */
    if (self->handle != NULL) {
        tracked_wait_abandoned(self);
    }
    Py_CLEAR(self->it);
    Py_CLEAR(self->target);
    Py_CLEAR(self->args);
    Py_CLEAR(self->kwargs);
    return result;
}

static PyObject *
awaiting_await(Awaiting *self)
{
    return Py_NewRef(self);
}

static PyObject *
awaiting_cr_await(Awaiting *self, void *closure)
{
    return Py_NewRef(self->it != NULL ? self->it : Py_None);
}

static PyAsyncMethods awaiting_as_async = {
    .am_await = (unaryfunc)awaiting_await,
    .am_send = (sendfunc)awaiting_am_send,
};

static PyMethodDef awaiting_methods[] = {
    {"send", (PyCFunction)awaiting_send, METH_O, NULL},
    {"throw", (PyCFunction)(void (*)(void))awaiting_throw, METH_FASTCALL, NULL},
    {"close", (PyCFunction)awaiting_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef awaiting_getset[] = {
    {"cr_await", (getter)awaiting_cr_await, NULL,
     "The library's awaitable this one drives (None once it ended).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Awaiting_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgleak._speedups.Awaiting",
    .tp_basicsize = sizeof(Awaiting),
    .tp_dealloc = (destructor)awaiting_dealloc,
    .tp_finalize = (destructor)awaiting_finalize,
    .tp_as_async = &awaiting_as_async,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A pool's awaitable, with pgleak's checkout or checkin at its end.",
    .tp_traverse = (traverseproc)awaiting_traverse,
    .tp_clear = (inquiry)awaiting_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)awaiting_iternext,
    .tp_methods = awaiting_methods,
    .tp_getset = awaiting_getset,
};


/* ---- The checkout and checkin wrappers, in C (pgleak._adapter.track_acquire/track_release) --
 *
 * Compiled to the method's own signature, a Python wrapper still costs a frame on every
 * checkout and every checkin (~2,500 instructions each, with the attribute reads and calls
 * in it): as much as the whole C ledger. ``Tracked`` is that wrapper as a callable object:
 * called by vectorcall, it calls the library's method by vectorcall with the same arguments
 * and the C ledger directly. Everything rare goes to the Python template it was made with
 * (``python``), whose body stays the definition: call-site tags on, a call it cannot read
 * (no pool argument, no connection argument); an observer's steps are its own (see
 * observed_acquire, below). A failed call hands the
 * error to the template's own helpers (``gave_up``, ``checked_in``) before it propagates, a
 * fault of pgleak's goes to ``internal_error``, as in the template. ``core.checkout`` and
 * ``core.checkin`` are called directly only while they are the C ledger's bound methods this
 * wrapper was made with (a test may have put a spy there). As a descriptor it binds like a
 * function (Py_TPFLAGS_METHOD_DESCRIPTOR: ``pool.getconn()`` calls it with the pool first,
 * no bound method made), and its ``__dict__`` takes what ``functools.update_wrapper`` sets. */

enum { ACQUIRE, RELEASE, SA_CHECKOUT, SA_RETURN, RETRY, AACQUIRE, ARELEASE, HOLDER_RELEASE,
       ABLOCK_ENTER, ABLOCK_EXIT, SCOPE_OPEN, SBLOCK_ENTER, SBLOCK_EXIT };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *dict;
    PyObject *weakrefs;
    int release; /* a mode: ACQUIRE, RELEASE, SA_CHECKOUT, SA_RETURN, RETRY */
    PyObject *original, *python, *core, *core_dict, *ledger, *site, *internal_error;
    PyObject *pools, *kind, *namer, *gave_up, *tags_dict;   /* acquire */
    PyObject *by_conn, *refused, *conn_name;                /* release */
    PyObject *budget_dict, *succeeded, *worth, *retried;    /* retry */
    Py_ssize_t conn_index;
    int keyed; /* acquire: a call with any argument after the pool but None is the template's */
    PyObject *proxy_type; /* AACQUIRE, ABLOCK_*: asyncpg's proxy class (the lease: its _con);
                           * SCOPE_OPEN: the Scope subclass it makes */
} Tracked;

/* s_checkout, s_checkin, s_ref and s_pool are the awaitables' (above). */
static PyObject *s_call_site, *s_connection_record, *s_tokens;

/* An exception taken out of the way while pgleak's own handling runs, then put back as it was. */
typedef struct {
    PyObject *type, *value, *tb;
} saved_error;

static inline void
error_save(saved_error *e)
{
#if PY_VERSION_HEX >= 0x030C0000
    e->type = e->tb = NULL;
    e->value = PyErr_GetRaisedException();
#else
    PyErr_Fetch(&e->type, &e->value, &e->tb);
    PyErr_NormalizeException(&e->type, &e->value, &e->tb);
    if (e->tb != NULL && e->value != NULL) {
        PyException_SetTraceback(e->value, e->tb);
    }
#endif
}

static inline void
error_restore(saved_error *e)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(e->value);
#else
    PyErr_Restore(e->type, e->value, e->tb);
#endif
}

static inline void
error_drop(saved_error *e)
{
    Py_XDECREF(e->type);
    Py_XDECREF(e->value);
    Py_XDECREF(e->tb);
}

/* The current exception, handed to ``handler(site, exc)`` (internal_error) and cleared. */
static void
report_fault(Tracked *w)
{
    saved_error e;
    error_save(&e);
    if (e.value != NULL) {
        PyObject *done = PyObject_CallFunctionObjArgs(w->internal_error, w->site, e.value, NULL);
        Py_XDECREF(done);
        PyErr_Clear(); /* internal_error never raises; if it did, the call must still go on */
    }
    error_drop(&e);
}

/* The positional arguments after the first, as a tuple, and the keywords, as a dict. */
static int
split_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **rest,
           PyObject **kwargs)
{
    *rest = PyTuple_New(nargs > 1 ? nargs - 1 : 0);
    *kwargs = PyDict_New();
    if (*rest == NULL || *kwargs == NULL) {
        Py_CLEAR(*rest);
        Py_CLEAR(*kwargs);
        return -1;
    }
    for (Py_ssize_t i = 1; i < nargs; i++) {
        PyTuple_SET_ITEM(*rest, i - 1, Py_NewRef(args[i]));
    }
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < nkw; i++) {
        if (PyDict_SetItem(*kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
            Py_CLEAR(*rest);
            Py_CLEAR(*kwargs);
            return -1;
        }
    }
    return 0;
}

/* ``core.checkout`` / ``core.checkin`` as it is now: the C ledger itself (NULL: call it
 * directly) or whatever was put there instead (a new reference). */
static int
ledger_now(Tracked *w, PyObject *name, PyObject **other)
{
    *other = NULL;
    if (calm(w->core) && w->ledger == calm_ledger[name == s_checkin] && w->ledger != NULL) {
        return 0; /* the core's dict unchanged since it held this ledger (see calm()) */
    }
    PyObject *now = PyDict_GetItemWithError(w->core_dict, name);
    if (now == w->ledger && now != NULL) {
        return 0;
    }
    if (PyErr_Occurred()) {
        return -1;
    }
    *other = PyObject_GetAttr(w->core, name);
    return *other == NULL ? -1 : 0;
}

/* The pool's handle, kept from one checkout to the next (below, with the asyncio wrappers). */
static PyObject *handle_of(Tracked *w, PyObject *pool);

/* The checkout's bookkeeping (the template's ``checked_out()`` part): the lease (a new
 * reference, maybe None), or NULL after a fault, reported. */

static PyObject *
tracked_acquired(Tracked *w, PyObject *pool, PyObject *conn, PyObject *index)
{
    PyObject *lease = NULL, *other = NULL;
    PyObject *handle = handle_of(w, pool);
    if (handle == NULL) {
        goto fault;
    }
    if (ledger_now(w, s_checkout, &other) < 0) {
        goto fault;
    }
    if (other == NULL) {
        PyObject *cargs[4] = {w->core, handle, conn, index};
        lease = ledger_checkout(NULL, cargs, 4, NULL);
    }
    else {
        PyObject *cargs[4] = {handle, conn, index, Py_None};
        lease = PyObject_Vectorcall(other, cargs, 4, NULL);
        Py_DECREF(other);
    }
    if (lease == NULL) {
        goto fault;
    }
    Py_DECREF(handle);
    return lease;
fault:
    Py_XDECREF(handle);
    report_fault(w);
    return NULL;
}

/* ---- an observer's checkout, without the template's frame (issue 12) ---------------------
 *
 * While an observer runs, the templates take the wait's start before the library's call
 * (``waiting`` / ``_wait_started``: the pool's handle, an entry on its ``pending`` deque, the
 * clock), end the wait however the call ended (``core.wait_end``: the entry popped), and hand
 * the start to ``core.checkout(handle, conn, index, since)``, which gives it to the observer.
 * Taking the template for that cost a Python frame (~2,500 instructions) on every traced
 * checkout; these are the same steps, in the templates' order (psycopg's ends the wait before
 * the checkout, SQLAlchemy's after it), faults reported at the template's site. */

static PyObject *s_pending_deque, *s_pop; /* "pending", "pop" */

/* ``waiting(pool)`` (``sa`` false) or ``_wait_started(pool)`` (true): ``*handle`` and
 * ``*since`` set to new references or left NULL (the templates' ``None``); never raises. */
static void
observed_wait(Tracked *w, PyObject *pool, int sa, PyObject **handle, PyObject **since)
{
    *handle = *since = NULL;
    *handle = handle_of(w, pool);
    if (*handle == NULL) {
        goto fault;
    }
    PyObject *observer = PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL && PyErr_Occurred()) {
        goto fault;
    }
    if (observer == NULL || observer == Py_None) { /* it stopped meanwhile */
        if (sa) {
            Py_CLEAR(*handle);
        }
        return;
    }
    PyObject *pending = PyObject_GetAttr(*handle, s_pending_deque);
    PyObject *done = pending == NULL ? NULL : PyObject_CallMethodOneArg(pending, s_append, Py_None);
    Py_XDECREF(pending);
    if (done == NULL) {
        goto fault;
    }
    Py_DECREF(done);
    *since = clock_now();
    if (*since == NULL) {
        goto fault;
    }
    return;
fault:
    Py_CLEAR(*handle);
    Py_CLEAR(*since);
    report_fault(w);
}

/* ``core.wait_end(handle)``: one entry off ``handle.pending`` (none left: nothing); a fault
 * reported, never raised; the exception being handled, if any, kept as it was. */
static void
observed_wait_end(Tracked *w, PyObject *handle)
{
    saved_error e;
    error_save(&e);
    PyObject *pending = PyObject_GetAttr(handle, s_pending_deque);
    PyObject *done = pending == NULL ? NULL : PyObject_CallMethodNoArgs(pending, s_pop);
    Py_XDECREF(pending);
    if (done != NULL) {
        Py_DECREF(done);
    }
    else if (PyErr_ExceptionMatches(PyExc_IndexError)) {
        PyErr_Clear(); /* a pop without its append: never negative */
    }
    else {
        report_fault(w);
    }
    error_restore(&e);
}

/* ``core.checkout(handle, conn, index, since)`` (the C ledger, or whatever is there now): the
 * lease (a new reference, maybe None), or NULL after a fault, reported. */
static PyObject *
observed_file(Tracked *w, PyObject *handle, PyObject *conn, PyObject *index, PyObject *since)
{
    PyObject *other = NULL, *lease = NULL;
    if (ledger_now(w, s_checkout, &other) < 0) {
        report_fault(w);
        return NULL;
    }
    if (other == NULL) {
        PyObject *cargs[5] = {w->core, handle, conn, index, since};
        lease = ledger_checkout(NULL, cargs, 5, NULL);
    }
    else {
        PyObject *cargs[4] = {handle, conn, index, since};
        lease = PyObject_Vectorcall(other, cargs, 4, NULL);
        Py_DECREF(other);
    }
    if (lease == NULL) {
        report_fault(w);
    }
    return lease;
}

/* ``_ACQUIRE`` while an observer runs, untagged (``acquire_call`` has checked). */
static PyObject *
observed_acquire(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *pool = Py_NewRef(args[0]); /* the caller's; it must outlive the call */
    PyObject *handle, *since;
    observed_wait(w, pool, 0, &handle, &since);
    PyObject *conn = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    if (conn == NULL) {
        saved_error e;
        PyObject *rest, *kwargs;
        if (handle != NULL) {
            observed_wait_end(w, handle);
        }
        error_save(&e);
        if (e.value != NULL && split_args(args, nargs, kwnames, &rest, &kwargs) == 0) {
            PyObject *done = PyObject_CallFunctionObjArgs(w->gave_up, pool, e.value, rest,
                                                          kwargs, NULL);
            Py_XDECREF(done);
            Py_DECREF(rest);
            Py_DECREF(kwargs);
        }
        PyErr_Clear();
        error_restore(&e);
        Py_XDECREF(handle);
        Py_XDECREF(since);
        Py_DECREF(pool);
        return NULL;
    }
    if (handle != NULL) {
        observed_wait_end(w, handle);
    }
    else {
        handle = handle_of(w, pool);
        if (handle == NULL) {
            report_fault(w);
        }
    }
    if (handle != NULL) {
        Py_XDECREF(observed_file(w, handle, conn, Py_True, since == NULL ? Py_None : since));
    }
    Py_XDECREF(handle);
    Py_XDECREF(since);
    Py_DECREF(pool);
    return conn;
}

/* ``fairy._connection_record``: SQLAlchemy's fairy keeps it in a slot, read there directly
 * while the fairy's class is the one whose member descriptor was found and unchanged since
 * (its version tag: any attribute set on it or a base drops that), else by name (~270
 * instructions a checkout, and the type's lookup cache lines). A new reference, or NULL with
 * an error set, as PyObject_GetAttr. */
static struct {
    PyTypeObject *type; /* borrowed: an address, with its version tag */
    unsigned int tag;
    Py_ssize_t offset;
} fairy_record;

/* Whether ``type`` reads attributes as ``object.__getattribute__`` does (a data descriptor of
 * the class first): SQLAlchemy's fairy has a ``__getattr__`` (the DBAPI connection's
 * attributes), which only runs when that fails, so a slot holding a value is read there. */
static int
sa_generic_getattribute(PyTypeObject *type)
{
    static PyObject *name = NULL;
    if (type->tp_getattro == PyObject_GenericGetAttr) {
        return 1;
    }
    if (name == NULL && (name = PyUnicode_InternFromString("__getattribute__")) == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *own = _PyType_Lookup(type, name); /* borrowed, as the next */
    return own != NULL && own == _PyType_Lookup(&PyBaseObject_Type, name);
}

/* The slot's record (a new reference) where it can be read there, else NULL, no error set. */
static inline PyObject *
sa_record_kept(PyObject *fairy)
{
    PyTypeObject *type = Py_TYPE(fairy);
    if (type == fairy_record.type && type->tp_version_tag == fairy_record.tag
        && fairy_record.tag != 0 && PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG)) {
        PyObject *record = *(PyObject **)((char *)fairy + fairy_record.offset);
        return Py_XNewRef(record);
    }
    return NULL;
}

static PyObject *
sa_record(PyObject *fairy)
{
    PyTypeObject *type = Py_TYPE(fairy);
    PyObject *record = sa_record_kept(fairy);
    if (record != NULL) {
        return record;
    }
    if (sa_generic_getattribute(type)) {
        PyObject *descr = _PyType_Lookup(type, s_connection_record); /* borrowed; tags type */
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
            && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX
            && PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG)
            && type->tp_version_tag != 0) {
            fairy_record.type = type;
            fairy_record.tag = type->tp_version_tag;
            fairy_record.offset = ((PyMemberDescrObject *)descr)->d_member->offset;
        }
    }
    return PyObject_GetAttr(fairy, s_connection_record);
}

/* SQLAlchemy's ``_checkout`` template while an observer runs, untagged, no nested fairy
 * (``sa_checkout_call`` has checked). */
static PyObject *
observed_sa_checkout(Tracked *w, PyObject *const *args, size_t nargsf)
{
    PyObject *pool = Py_NewRef(args[1]);
    PyObject *waited, *since;
    observed_wait(w, pool, 1, &waited, &since);
    PyObject *fairy = PyObject_Vectorcall(w->original, args, nargsf, NULL);
    if (fairy == NULL) {
        if (PyErr_ExceptionMatches(w->refused)) {
            saved_error e;
            error_save(&e);
            PyObject *done = PyObject_CallFunctionObjArgs(w->gave_up, pool, e.value, NULL);
            Py_XDECREF(done);
            PyErr_Clear();
            error_restore(&e);
        }
        if (waited != NULL) {
            observed_wait_end(w, waited);
        }
        Py_XDECREF(waited);
        Py_XDECREF(since);
        Py_DECREF(pool);
        return NULL;
    }
    PyObject *handle = waited != NULL ? Py_NewRef(waited) : handle_of(w, pool);
    PyObject *lease = NULL;
    if (handle == NULL) {
        report_fault(w);
    }
    else {
        lease = observed_file(w, handle, fairy, Py_False, since == NULL ? Py_None : since);
        Py_DECREF(handle);
    }
    if (lease != NULL && lease != Py_None) {
        PyObject *record = sa_record(fairy);
        PyObject *dict = record == NULL ? NULL : PyObject_GenericGetDict(record, NULL);
        if (dict == NULL || PyDict_SetItem(dict, w->conn_name, lease) < 0) {
            report_fault(w);
        }
        Py_XDECREF(dict);
        Py_XDECREF(record);
    }
    Py_XDECREF(lease);
    if (waited != NULL) {
        observed_wait_end(w, waited);
    }
    Py_XDECREF(waited);
    Py_XDECREF(since);
    Py_DECREF(pool);
    return fairy;
}

static PyObject *
acquire_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        goto python;
    }
    PyObject *observer = PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL) { /* no such attribute: the template's */
        PyErr_Clear();
        goto python;
    }
    if (w->tags_dict != NULL) {
        PyObject *call_site = PyDict_GetItemWithError(w->tags_dict, s_call_site);
        if (call_site == NULL || (call_site != Py_None && call_site != Py_False)) {
            PyErr_Clear();
            goto python;
        }
    }
    if (w->keyed) { /* psycopg2's getconn(key): a key may be a re-lend, which the template sees */
        Py_ssize_t total = nargs + (kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames));
        for (Py_ssize_t i = 1; i < total; i++) {
            if (args[i] != Py_None) {
                goto python;
            }
        }
    }
    if (observer != Py_None) {
        return observed_acquire(w, args, nargsf, kwnames);
    }
    PyObject *pool = args[0];
    Py_INCREF(pool); /* the arguments are the caller's; the pool must outlive the call */
    PyObject *conn = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    if (conn == NULL) {
        /* the template's ``except BaseException``: gave_up() says whether the wait ran out */
        saved_error e;
        PyObject *rest, *kwargs;
        error_save(&e);
        if (e.value != NULL && split_args(args, nargs, kwnames, &rest, &kwargs) == 0) {
            PyObject *done = PyObject_CallFunctionObjArgs(w->gave_up, pool, e.value, rest,
                                                          kwargs, NULL);
            Py_XDECREF(done);
            Py_DECREF(rest);
            Py_DECREF(kwargs);
        }
        PyErr_Clear();
        error_restore(&e);
        Py_DECREF(pool);
        return NULL;
    }
    Py_XDECREF(tracked_acquired(w, pool, conn, Py_True));
    Py_DECREF(pool);
    return conn;
python:
    return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
}

/* ``core.checkin(lease)``; faults reported, never raised. */
static void
tracked_released(Tracked *w, PyObject *lease)
{
    PyObject *other = NULL, *done;
    if (ledger_now(w, s_checkin, &other) < 0) {
        report_fault(w);
        return;
    }
    if (other == NULL) {
        PyObject *cargs[2] = {w->core, lease};
        done = ledger_checkin(NULL, cargs, 2, NULL);
    }
    else {
        done = PyObject_CallOneArg(other, lease);
        Py_DECREF(other);
    }
    if (done == NULL) {
        report_fault(w);
        return;
    }
    Py_DECREF(done);
}

/* The connection a checkin was called with (borrowed): the argument at ``conn_index``, or
 * the keyword of its name; NULL when neither (the compiled template then reads the call). */
static PyObject *
conn_argument(Tracked *w, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *conn = NULL;
    if (w->conn_index >= 0 && w->conn_index < nargs) {
        conn = args[w->conn_index];
    }
    else if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw && conn == NULL; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i);
            int same = name == w->conn_name ? 1 : PyUnicode_Compare(name, w->conn_name) == 0;
            if (same) {
                conn = args[nargs + i];
            }
        }
        if (PyErr_Occurred()) {
            PyErr_Clear();
            conn = NULL;
        }
    }
    return conn;
}

static PyObject *
release_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *conn = conn_argument(w, args, nargs, kwnames);
    if (conn == NULL || !bound) {
        return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
    }
    /* The lease, looked up before the call (the template's ``by_conn.get(id(conn))``): a pool
     * may lend the same connection to a waiting thread at once, whose lease is not this. */
    PyObject *lease = NULL;
    PyObject *key = conn_key(conn);
    if (key == NULL) {
        return NULL;
    }
    lease = PyDict_GetItemWithError(w->by_conn, key);
    Py_DECREF(key);
    if (lease == NULL && PyErr_Occurred()) {
        report_fault(w);
    }
    if (lease != NULL) {
        if (!Py_IS_TYPE(lease, lease_type)) {
            return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
        }
        PyObject *ref = SLOT(lease, lease_off[L_REF]);
        PyObject *target = (ref != NULL && PyWeakref_Check(ref)) ? ref_target(ref) : NULL;
        Py_XDECREF(target);
        if (target != conn) {
            lease = NULL; /* an id reused after its connection died */
        }
        Py_XINCREF(lease);
    }
    PyObject *result = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    if (result == NULL) {
        if (lease != NULL && !PyErr_ExceptionMatches(w->refused)) {
            /* back all the same: the user let go of it (the template's checked_in()) */
            saved_error e;
            error_save(&e);
            tracked_released(w, lease);
            error_restore(&e);
        }
        Py_XDECREF(lease);
        return NULL;
    }
    if (lease != NULL) {
        tracked_released(w, lease);
        Py_DECREF(lease);
    }
    return result;
}

/* SQLAlchemy's ``_ConnectionFairy._checkout(cls, pool, threadconns=None)`` (see
 * pgleak.integrations.sqlalchemy._make_checkout, the template): a nested checkout (``fairy=``),
 * an observer or call-site tags are the template's. The lease goes into the record's
 * ``__dict__`` under ``conn_name``; a ``refused`` error (TimeoutError) goes to ``gave_up``. */
static PyObject *
sa_checkout_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL || nargs < 2 || nargs > 3) {
        goto python;
    }
    /* calm(): the core's dict unchanged since it said "no observer" */
    PyObject *observer =
        calm(w->core) ? Py_None : PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL) {
        PyErr_Clear();
        goto python;
    }
    PyObject *call_site = PyDict_GetItemWithError(w->tags_dict, s_call_site);
    if (call_site == NULL || (call_site != Py_None && call_site != Py_False)) {
        PyErr_Clear();
        goto python;
    }
    if (observer != Py_None) {
        return observed_sa_checkout(w, args, nargsf);
    }
    PyObject *pool = args[1];
    Py_INCREF(pool);
    PyObject *fairy = PyObject_Vectorcall(w->original, args, nargsf, NULL);
    if (fairy == NULL) {
        if (PyErr_ExceptionMatches(w->refused)) {
            saved_error e;
            error_save(&e);
            PyObject *done = PyObject_CallFunctionObjArgs(w->gave_up, pool, e.value, NULL);
            Py_XDECREF(done);
            PyErr_Clear();
            error_restore(&e);
        }
        Py_DECREF(pool);
        return NULL;
    }
    PyObject *lease = tracked_acquired(w, pool, fairy, Py_False);
    Py_DECREF(pool);
    if (lease != NULL && lease != Py_None) {
        PyObject *record = sa_record(fairy);
        PyObject *dict = record == NULL ? NULL : PyObject_GenericGetDict(record, NULL);
        if (dict == NULL || PyDict_SetItem(dict, w->conn_name, lease) < 0) {
            report_fault(w);
        }
        Py_XDECREF(dict);
        Py_XDECREF(record);
    }
    Py_XDECREF(lease);
    return fairy;
python:
    return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
}

/* SQLAlchemy's ``Pool._return_conn(self, record)``: the record's lease, if any, is checked in
 * before the pool has the connection back (the template: _make_return_conn). */
static PyObject *
sa_return_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (kwnames != NULL || PyVectorcall_NARGS(nargsf) != 2) {
        return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
    }
    PyObject *dict = PyObject_GenericGetDict(args[1], NULL);
    if (dict == NULL || !PyDict_Check(dict)) {
        Py_XDECREF(dict);
        PyErr_Clear();
        return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
    }
    /* ``pop(conn_name, None)``: one probe, not a lookup and a deletion */
    PyObject *lease = NULL;
#if PY_VERSION_HEX >= 0x030D0000
    if (PyDict_Pop(dict, w->conn_name, &lease) < 0) {
        report_fault(w);
    }
#else
    lease = _PyDict_Pop(dict, w->conn_name, Py_None);
    if (lease == NULL) {
        report_fault(w);
    }
    else if (lease == Py_None) {
        Py_CLEAR(lease);
    }
#endif
    Py_DECREF(dict);
    if (lease != NULL) {
        if (lease != Py_None) {
            tracked_released(w, lease);
        }
        Py_DECREF(lease);
    }
    return PyObject_Vectorcall(w->original, args, nargsf, kwnames);
}

/* psycopg2's ``getconn`` with its connect retry (pgleak.integrations.psycopg2._RETRYING, the
 * template): the first attempt is the call itself; an ``Exception`` that ``worth`` says is a
 * refusal goes to ``retried(pool, exc, args, kwargs)`` (the retry loop, in Python); any other
 * propagates as it came, with no frame of pgleak's. A success makes the budget's deposit
 * (``succeeded()``) unless the budget is full, as the template's inlined test. Call-site tags
 * are the template's. */
static PyObject *
retry_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        goto python;
    }
    PyObject *call_site = PyDict_GetItemWithError(w->tags_dict, s_call_site);
    if (call_site == NULL || (call_site != Py_None && call_site != Py_False)) {
        PyErr_Clear();
        goto python;
    }
    PyObject *conn = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    if (conn == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            return NULL;
        }
        saved_error e;
        error_save(&e);
        PyObject *worth = PyObject_CallOneArg(w->worth, e.value);
        int retry = worth == NULL ? -1 : PyObject_IsTrue(worth);
        Py_XDECREF(worth);
        if (retry <= 0) {
            if (retry < 0) { /* the template's check would raise that error instead */
                error_drop(&e);
                return NULL;
            }
            error_restore(&e);
            return NULL;
        }
        PyObject *rest, *kwargs;
        if (split_args(args, nargs, kwnames, &rest, &kwargs) < 0) {
            error_drop(&e);
            return NULL;
        }
        conn = PyObject_CallFunctionObjArgs(w->retried, args[0], e.value, rest, kwargs, NULL);
        Py_DECREF(rest);
        Py_DECREF(kwargs);
        error_drop(&e);
        return conn;
    }
    PyObject *tokens = PyDict_GetItemWithError(w->budget_dict, s_tokens);
    if (tokens != Py_None) {
        PyErr_Clear();
        PyObject *done = PyObject_CallNoArgs(w->succeeded);
        if (done == NULL) {
            Py_DECREF(conn);
            return NULL;
        }
        Py_DECREF(done);
    }
    return conn;
python:
    return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
}

/* The asyncio modes' calls (below, after the constructors). */
static PyObject *aacquire_call(Tracked *w, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames);
static PyObject *arelease_call(Tracked *w, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames);
static PyObject *holder_release_call(Tracked *w, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames);
static PyObject *ablock_call(Tracked *w, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames);
static PyObject *scope_open_call(Tracked *w, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames);
static PyObject *sblock_call(Tracked *w, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames);

static PyObject *
tracked_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Tracked *w = (Tracked *)self;
    switch (w->release) {
    case RELEASE:
        return release_call(w, args, nargsf, kwnames);
    case SA_CHECKOUT:
        return sa_checkout_call(w, args, nargsf, kwnames);
    case SA_RETURN:
        return sa_return_call(w, args, nargsf, kwnames);
    case RETRY:
        return retry_call(w, args, nargsf, kwnames);
    case AACQUIRE:
        return aacquire_call(w, args, nargsf, kwnames);
    case ARELEASE:
        return arelease_call(w, args, nargsf, kwnames);
    case HOLDER_RELEASE:
        return holder_release_call(w, args, nargsf, kwnames);
    case ABLOCK_ENTER:
    case ABLOCK_EXIT:
        return ablock_call(w, args, nargsf, kwnames);
    case SCOPE_OPEN:
        return scope_open_call(w, args, nargsf, kwnames);
    case SBLOCK_ENTER:
    case SBLOCK_EXIT:
        return sblock_call(w, args, nargsf, kwnames);
    default:
        return acquire_call(w, args, nargsf, kwnames);
    }
}

static PyObject *
tracked_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static int
tracked_traverse(Tracked *w, visitproc visit, void *arg)
{
    Py_VISIT(w->dict);
    Py_VISIT(w->original);
    Py_VISIT(w->python);
    Py_VISIT(w->core);
    Py_VISIT(w->core_dict);
    Py_VISIT(w->ledger);
    Py_VISIT(w->site);
    Py_VISIT(w->internal_error);
    Py_VISIT(w->pools);
    Py_VISIT(w->kind);
    Py_VISIT(w->namer);
    Py_VISIT(w->gave_up);
    Py_VISIT(w->tags_dict);
    Py_VISIT(w->by_conn);
    Py_VISIT(w->refused);
    Py_VISIT(w->conn_name);
    Py_VISIT(w->budget_dict);
    Py_VISIT(w->succeeded);
    Py_VISIT(w->worth);
    Py_VISIT(w->retried);
    Py_VISIT(w->proxy_type);
    return 0;
}

static int
tracked_clear(Tracked *w)
{
    Py_CLEAR(w->dict);
    Py_CLEAR(w->original);
    Py_CLEAR(w->python);
    Py_CLEAR(w->core);
    Py_CLEAR(w->core_dict);
    Py_CLEAR(w->ledger);
    Py_CLEAR(w->site);
    Py_CLEAR(w->internal_error);
    Py_CLEAR(w->pools);
    Py_CLEAR(w->kind);
    Py_CLEAR(w->namer);
    Py_CLEAR(w->gave_up);
    Py_CLEAR(w->tags_dict);
    Py_CLEAR(w->by_conn);
    Py_CLEAR(w->refused);
    Py_CLEAR(w->conn_name);
    Py_CLEAR(w->budget_dict);
    Py_CLEAR(w->succeeded);
    Py_CLEAR(w->worth);
    Py_CLEAR(w->retried);
    Py_CLEAR(w->proxy_type);
    return 0;
}

static void
tracked_dealloc(Tracked *w)
{
    PyObject_GC_UnTrack(w);
    if (w->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)w);
    }
    tracked_clear(w);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *
tracked_repr(Tracked *w)
{
    int checkin = w->release == RELEASE || w->release == SA_RETURN || w->release == ARELEASE
                  || w->release == HOLDER_RELEASE;
    int block = w->release == ABLOCK_ENTER || w->release == ABLOCK_EXIT
                || w->release == SCOPE_OPEN || w->release == SBLOCK_ENTER
                || w->release == SBLOCK_EXIT;
    return PyUnicode_FromFormat("<pgleak %s wrapper of %R>",
                                block ? "block" : checkin ? "checkin" : "checkout", w->original);
}

static PyGetSetDef tracked_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyMemberDef tracked_members[] = {
    /* the compiled template it hands the rare cases to (tests read its parameters) */
    {"_pgleak_python", T_OBJECT, offsetof(Tracked, python), READONLY, NULL},
    {NULL},
};

static PyTypeObject TrackedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgleak._speedups.Tracked",
    .tp_basicsize = sizeof(Tracked),
    .tp_dealloc = (destructor)tracked_dealloc,
    .tp_free = PyObject_GC_Del,
    .tp_vectorcall_offset = offsetof(Tracked, vectorcall),
    .tp_repr = (reprfunc)tracked_repr,
    .tp_call = PyVectorcall_Call,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "A pool's checkout or checkin method, wrapped by pgleak (see track_acquire).",
    .tp_traverse = (traverseproc)tracked_traverse,
    .tp_clear = (inquiry)tracked_clear,
    .tp_weaklistoffset = offsetof(Tracked, weakrefs),
    .tp_getset = tracked_getset,
    .tp_members = tracked_members,
    .tp_descr_get = tracked_get,
    .tp_dictoffset = offsetof(Tracked, dict),
};

static Tracked *
tracked_new(int release)
{
    Tracked *w = PyObject_GC_New(Tracked, &TrackedType);
    if (w == NULL) {
        return NULL;
    }
    w->vectorcall = tracked_vectorcall;
    w->release = release;
    w->dict = w->weakrefs = NULL;
    w->original = w->python = w->core = w->core_dict = w->ledger = NULL;
    w->site = w->internal_error = w->pools = w->kind = w->namer = NULL;
    w->gave_up = w->tags_dict = w->by_conn = w->refused = w->conn_name = NULL;
    w->budget_dict = w->succeeded = w->worth = w->retried = NULL;
    w->conn_index = -1;
    w->keyed = 0;
    w->proxy_type = NULL;
    PyObject_GC_Track(w);
    return w;
}

/* ``core.__dict__`` and the C ledger's method bound to ``core`` that sits in it now. */
static int
tracked_core(Tracked *w, PyObject *core, PyObject *name)
{
    w->core = Py_NewRef(core);
    w->core_dict = PyObject_GenericGetDict(core, NULL);
    if (w->core_dict == NULL || !PyDict_Check(w->core_dict)) {
        PyErr_SetString(PyExc_TypeError, "core has no __dict__");
        return -1;
    }
    PyObject *ledger = PyDict_GetItemWithError(w->core_dict, name);
    if (ledger == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "core has no C ledger");
        }
        return -1;
    }
    w->ledger = Py_NewRef(ledger);
    return 0;
}

PyDoc_STRVAR(acquire_wrapper_doc,
"acquire_wrapper(original, python, core, pools, kind, namer, site, gave_up, internal_error,\n"
"                tags, keyed) -> Tracked\n\n"
"track_acquire's wrapper of ``original`` (sync), with ``python`` (the compiled template) for\n"
"what it does not do itself; ``tags``: the call-site tags, or None when the method does not\n"
"tag (no ``give_back``); ``keyed``: calls with an argument after the pool other than None\n"
"go to ``python``.");

static PyObject *
acquire_wrapper(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 11 || !PyDict_Check(args[3]) || !bound) {
        PyErr_SetString(PyExc_TypeError, "acquire_wrapper(): bad arguments, or not bound");
        return NULL;
    }
    Tracked *w = tracked_new(ACQUIRE);
    if (w == NULL) {
        return NULL;
    }
    w->original = Py_NewRef(args[0]);
    w->python = Py_NewRef(args[1]);
    w->pools = Py_NewRef(args[3]);
    w->kind = Py_NewRef(args[4]);
    w->namer = Py_NewRef(args[5]);
    w->site = Py_NewRef(args[6]);
    w->gave_up = Py_NewRef(args[7]);
    w->internal_error = Py_NewRef(args[8]);
    w->keyed = PyObject_IsTrue(args[10]);
    if (w->keyed < 0) {
        Py_DECREF(w);
        return NULL;
    }
    if (args[9] != Py_None) {
        w->tags_dict = PyObject_GenericGetDict(args[9], NULL);
        if (w->tags_dict == NULL) {
            Py_DECREF(w);
            return NULL;
        }
    }
    if (tracked_core(w, args[2], s_checkout) < 0) {
        Py_DECREF(w);
        return NULL;
    }
    return (PyObject *)w;
}

PyDoc_STRVAR(release_wrapper_doc,
"release_wrapper(original, python, core, by_conn, refused, conn_index, conn_name, site,\n"
"                internal_error) -> Tracked\n\n"
"track_release's wrapper of ``original`` (sync): the connection is positional argument\n"
"``conn_index`` (-1: by keyword only) or the keyword ``conn_name``.");

static PyObject *
release_wrapper(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9 || !PyDict_Check(args[3]) || !PyTuple_Check(args[4])
        || !PyLong_Check(args[5]) || !PyUnicode_Check(args[6]) || !bound) {
        PyErr_SetString(PyExc_TypeError, "release_wrapper(): bad arguments, or not bound");
        return NULL;
    }
    Py_ssize_t index = PyLong_AsSsize_t(args[5]);
    if (index == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Tracked *w = tracked_new(RELEASE);
    if (w == NULL) {
        return NULL;
    }
    w->original = Py_NewRef(args[0]);
    w->python = Py_NewRef(args[1]);
    w->by_conn = Py_NewRef(args[3]);
    w->refused = Py_NewRef(args[4]);
    w->conn_index = index;
    w->conn_name = Py_NewRef(args[6]);
    w->site = Py_NewRef(args[7]);
    w->internal_error = Py_NewRef(args[8]);
    if (tracked_core(w, args[2], s_checkin) < 0) {
        Py_DECREF(w);
        return NULL;
    }
    return (PyObject *)w;
}

PyDoc_STRVAR(sqlalchemy_wrapper_doc,
"sqlalchemy_wrapper(checkin, original, python, core, pools, kind, namer, gave_up,\n"
"                   internal_error, tags, timeout_error, key) -> Tracked\n\n"
"The wrapper of SQLAlchemy's ``_ConnectionFairy._checkout`` (``checkin`` false) or\n"
"``Pool._return_conn`` (true), with its template ``python`` (pgleak.integrations.sqlalchemy);\n"
"the lease rides in the record's ``__dict__`` under ``key``.");

static PyObject *
sqlalchemy_wrapper(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 12 || !PyDict_Check(args[4]) || !PyUnicode_Check(args[11]) || !bound) {
        PyErr_SetString(PyExc_TypeError, "sqlalchemy_wrapper(): bad arguments, or not bound");
        return NULL;
    }
    int checkin = PyObject_IsTrue(args[0]);
    if (checkin < 0) {
        return NULL;
    }
    Tracked *w = tracked_new(checkin ? SA_RETURN : SA_CHECKOUT);
    if (w == NULL) {
        return NULL;
    }
    w->original = Py_NewRef(args[1]);
    w->python = Py_NewRef(args[2]);
    w->pools = Py_NewRef(args[4]);
    w->kind = Py_NewRef(args[5]);
    w->namer = Py_NewRef(args[6]);
    w->gave_up = Py_NewRef(args[7]);
    w->internal_error = Py_NewRef(args[8]);
    w->tags_dict = PyObject_GenericGetDict(args[9], NULL);
    w->refused = Py_NewRef(args[10]);
    w->conn_name = Py_NewRef(args[11]);
    w->site = PyUnicode_FromString(checkin ? "sqlalchemy.checkin" : "sqlalchemy.checkout");
    if (w->tags_dict == NULL || w->site == NULL
        || tracked_core(w, args[3], checkin ? s_checkin : s_checkout) < 0) {
        Py_DECREF(w);
        return NULL;
    }
    return (PyObject *)w;
}

PyDoc_STRVAR(retry_wrapper_doc,
"retry_wrapper(original, python, budget, succeeded, worth, retried, tags) -> Tracked\n\n"
"psycopg2's getconn wrapper with its connect retry (pgleak.integrations.psycopg2): the\n"
"template ``python`` for call-site tags; ``retried(pool, exc, args, kwargs)`` after a refusal.");

static PyObject *
retry_wrapper(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "retry_wrapper(): bad arguments");
        return NULL;
    }
    Tracked *w = tracked_new(RETRY);
    if (w == NULL) {
        return NULL;
    }
    w->original = Py_NewRef(args[0]);
    w->python = Py_NewRef(args[1]);
    w->budget_dict = PyObject_GenericGetDict(args[2], NULL);
    w->succeeded = Py_NewRef(args[3]);
    w->worth = Py_NewRef(args[4]);
    w->retried = Py_NewRef(args[5]);
    w->tags_dict = PyObject_GenericGetDict(args[6], NULL);
    if (w->budget_dict == NULL || w->tags_dict == NULL || !PyDict_Check(w->budget_dict)
        || !PyDict_Check(w->tags_dict)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "retry_wrapper(): budget and tags need a __dict__");
        }
        Py_DECREF(w);
        return NULL;
    }
    return (PyObject *)w;
}

/* ---- The asyncio checkout and checkin wrappers, in C: Tracked's AACQUIRE, ARELEASE and
 * HOLDER_RELEASE modes --------------------------------------------------------------------
 *
 * The wrappers of an asyncio pool's checkout and checkin (pgleak._adapter's
 * ``_AACQUIRE_FAST`` / ``_ARELEASE_FAST``, asyncpg's ``_ACQUIRE_FAST`` and ``_RELEASE``) were
 * Python functions that hand the library's coroutine to an ``Awaiting`` (above): a frame of
 * pgleak's on every checkout and checkin. As Tracked objects they bind and read as the
 * function they wrap, as the sync ones do, and do the same steps: AACQUIRE calls the library's
 * method with the arguments as they came and returns its coroutine inside an Awaiting whose
 * ``spec`` is this wrapper (the checkout, when the coroutine returns, files with the C ledger
 * directly, the pool's handle read from its ``ref`` slot); call-site tags take ``python``, the
 * ``async def`` template. While an observer runs, the Awaiting also takes the wait's start at
 * its first ``send`` (where the template's body begins) and ends the wait however the call
 * ends, as the template does (AW_T_OBSERVED; issue 12). ARELEASE looks the lease up before the call, as the
 * template does, and returns the library's coroutine inside an Awaiting that checks it in
 * (untracked: the library's coroutine as it is). HOLDER_RELEASE is asyncpg's sync
 * ``PoolConnectionHolder._release``: the lease of the holder's lent connection, looked up
 * before the call, checked in after it returns. */

static PyObject *s_in_use;
/* PoolHandle (pgleak._core), once seen, and the offset of its ``ref`` slot. */
static PyObject *handle_type;
static Py_ssize_t handle_ref_off;

/* The last handle handle_of() found, with the ``pools`` dict it is in and its ``ref`` (strong
 * references); ``kept_pool``: the pool itself (strong) where ``ref`` is an
 * ``itertools.repeat(pool).__next__``, which holds it; NULL where ``ref`` is a weak reference,
 * whose referent is checked instead. Core.pool() never takes a live pool's handle out of
 * ``pools`` nor puts another in its place (only a dead pool's entry goes), so a handle whose
 * ``ref()`` is still the pool is the one ``pools.get(id(pool))`` gives: the lookup (an int
 * made, hashed, compared; ~300 instructions on a cold cycle, and asyncpg's ``ref()`` call
 * ~120 more) is skipped while the same pool comes back. */
static PyObject *kept_handle, *kept_pools, *kept_ref, *kept_pool;
static PyTypeObject *repeat_type; /* itertools.repeat, once looked up */
/* And the pools dict's tag when the kept handle was read from it: the handle is kept only
 * while the dict has not changed since (its version tag up to 3.11; from 3.12 a dict watcher,
 * as calm() does), so an entry replaced or removed by anyone is read again, whatever Core.pool
 * promises. 0: nothing kept. */
static uint64_t kept_tag;

#if PY_VERSION_HEX >= 0x030C0000
static int handles_watcher = -1;
static uint64_t handles_epoch = 1; /* moved by every change to a watched pools dict */

static int
handles_changed(PyDict_WatchEvent event, PyObject *dict, PyObject *key, PyObject *new_value)
{
    (void)event, (void)dict, (void)key, (void)new_value;
    handles_epoch++;
    return 0;
}

/* What says the pools dict is unchanged; 0 if it cannot be watched (nothing is kept). */
static uint64_t
pools_tag(PyObject *pools)
{
    if (handles_watcher < 0) {
        handles_watcher = PyDict_AddWatcher(handles_changed);
    }
    if (handles_watcher < 0 || PyDict_Watch(handles_watcher, pools) < 0) {
        PyErr_Clear();
        return 0;
    }
    return handles_epoch;
}
#define POOLS_TAG_NOW(pools) handles_epoch
#else
static uint64_t
pools_tag(PyObject *pools)
{
    return ((PyDictObject *)pools)->ma_version_tag;
}
#define POOLS_TAG_NOW(pools) (((PyDictObject *)(pools))->ma_version_tag)
#endif


/* The kept handle if it is ``pool``'s in ``w->pools`` (borrowed), else NULL. */
static inline PyObject *
handle_kept(Tracked *w, PyObject *pool)
{
    PyObject *handle = kept_handle;
    if (handle == NULL || kept_pools != w->pools || kept_tag == 0
        || POOLS_TAG_NOW(w->pools) != kept_tag || (PyObject *)Py_TYPE(handle) != handle_type
        || SLOT(handle, handle_ref_off) != kept_ref) {
        return NULL;
    }
    if (kept_pool != NULL) {
        return kept_pool == pool ? handle : NULL;
    }
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *obj = ref_target(kept_ref);
    Py_XDECREF(obj); /* only compared */
#else
    PyObject *obj = PyWeakref_GET_OBJECT(kept_ref);
#endif
    return obj == pool ? handle : NULL;
}

/* Keep ``handle`` (whose ``ref`` is ``ref`` and gave ``pool``) for handle_kept(). */
static void
handle_keep(Tracked *w, PyObject *handle, PyObject *ref, PyObject *pool, uint64_t tag)
{
    PyObject *held_pool = NULL;
    if (tag == 0 || POOLS_TAG_NOW(w->pools) != tag) {
        return; /* unwatchable, or changed since it was read */
    }
    if (!PyWeakref_CheckRefExact(ref)) {
        if (repeat_type == NULL) {
            PyObject *itertools = PyImport_ImportModule("itertools");
            PyObject *repeat = itertools == NULL ? NULL : PyObject_GetAttrString(itertools, "repeat");
            Py_XDECREF(itertools);
            if (repeat == NULL || !PyType_Check(repeat)) {
                Py_XDECREF(repeat);
                PyErr_Clear();
                return;
            }
            repeat_type = (PyTypeObject *)repeat;
        }
        /* ``repeat(pool).__next__`` (a method-wrapper) without a count gives the pool for
         * ever, and holds it; any other callable is asked every time */
        PyObject *self = PyObject_GetAttrString(ref, "__self__");
        PyObject *name = self == NULL ? NULL : PyObject_GetAttrString(ref, "__name__");
        PyObject *times = NULL;
        int endless = name != NULL && Py_IS_TYPE(self, repeat_type) && PyUnicode_Check(name)
                      && PyUnicode_CompareWithASCIIString(name, "__next__") == 0;
        if (endless) {
            times = PyObject_CallMethod(self, "__length_hint__", NULL); /* TypeError: no count */
            endless = times == NULL && PyErr_ExceptionMatches(PyExc_TypeError);
        }
        Py_XDECREF(self);
        Py_XDECREF(name);
        Py_XDECREF(times);
        PyErr_Clear();
        if (!endless) {
            return;
        }
        held_pool = Py_NewRef(pool);
    }
    PyObject *old[4] = {kept_handle, kept_pools, kept_ref, kept_pool};
    kept_handle = Py_NewRef(handle);
    kept_pools = Py_NewRef(w->pools);
    kept_ref = Py_NewRef(ref);
    kept_pool = held_pool;
    kept_tag = tag;
    for (int i = 0; i < 4; i++) {
        Py_XDECREF(old[i]);
    }
}

/* The pool's handle, a new reference: ``pools.get(id(pool))`` while its ``ref()`` is still
 * the pool, else ``core.pool(pool, kind, namer)`` (the templates' inlined core.pool()). */
static PyObject *
handle_of(Tracked *w, PyObject *pool)
{
    PyObject *kept = handle_kept(w, pool);
    if (kept != NULL) {
        return Py_NewRef(kept);
    }
    uint64_t tag = PyDict_CheckExact(w->pools) ? pools_tag(w->pools) : 0; /* before the read */
    PyObject *key = PyLong_FromVoidPtr(pool);
    if (key == NULL) {
        return NULL;
    }
    PyObject *handle = PyDict_GetItemWithError(w->pools, key);
    Py_DECREF(key);
    if (handle == NULL && PyErr_Occurred()) {
        return NULL;
    }
    if (handle != NULL) {
        Py_INCREF(handle);
        if ((PyObject *)Py_TYPE(handle) != handle_type) {
            Py_ssize_t off;
            if (member_offset((PyObject *)Py_TYPE(handle), "ref", &off) == 0) {
                Py_XSETREF(handle_type, Py_NewRef((PyObject *)Py_TYPE(handle)));
                handle_ref_off = off;
            }
            PyErr_Clear();
        }
        PyObject *ref = NULL, *obj;
        if ((PyObject *)Py_TYPE(handle) == handle_type) {
            ref = Py_XNewRef(SLOT(handle, handle_ref_off));
        }
        if (ref == NULL) {
            ref = PyObject_GetAttr(handle, s_ref);
            if (ref == NULL) {
                Py_DECREF(handle);
                return NULL;
            }
        }
        if (PyWeakref_CheckRefExact(ref)) {
            obj = ref_target(ref);
            obj = obj == NULL ? Py_NewRef(Py_None) : obj;
        }
        else {
            obj = PyObject_CallNoArgs(ref); /* asyncpg's: itertools.repeat(pool).__next__ */
        }
        if (obj == NULL) {
            Py_DECREF(ref);
            Py_DECREF(handle);
            return NULL;
        }
        Py_DECREF(obj);
        if (obj == pool) {
            if ((PyObject *)Py_TYPE(handle) == handle_type
                && SLOT(handle, handle_ref_off) == ref) {
                handle_keep(w, handle, ref, pool, tag);
            }
            Py_DECREF(ref);
            return handle;
        }
        Py_DECREF(ref);
        Py_DECREF(handle);
    }
    return PyObject_CallMethodObjArgs(w->core, s_pool, pool, w->kind, w->namer, NULL);
}

/* ``proxy._con``: read from its slot where the proxy's type is the wrapper's own and its
 * ``_con`` is still the slot's member descriptor seen before (asyncpg's PoolConnectionProxy:
 * its ``__getattr__`` hook makes the generic read ~300 instructions), else the generic read.
 * A new reference, or NULL with an error. */
static PyObject *
proxy_con(Tracked *w, PyObject *proxy)
{
    static PyObject *con_descr = NULL; /* the member descriptor whose offset is kept (strong) */
    static Py_ssize_t con_off = 0;
    PyTypeObject *type = Py_TYPE(proxy);
    if ((PyObject *)type == w->proxy_type) {
        PyObject *descr = _PyType_Lookup(type, s_con); /* borrowed */
        if (descr != NULL && descr != con_descr && Py_IS_TYPE(descr, &PyMemberDescr_Type)
            && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX
            && PyType_IsSubtype(type, PyDescr_TYPE(descr))) {
            con_off = ((PyMemberDescrObject *)descr)->d_member->offset;
            Py_XSETREF(con_descr, Py_NewRef(descr));
        }
        if (descr != NULL && descr == con_descr) {
            PyObject *con = SLOT(proxy, con_off);
            if (con != NULL) {
                return Py_NewRef(con);
            }
        }
    }
    return PyObject_GetAttr(proxy, s_con);
}

/* The end of the ``async def`` template after the call returned ``result``: the checkout,
 * with the wait's start (``since``, NULL: None) and the handle taken for it (NULL: looked up).
 * 0, or -1 with an error set (a BaseException of pgleak's own, as the template's
 * ``except Exception`` would let through). */
static int
tracked_aacquired(Tracked *w, PyObject *pool, PyObject *result, PyObject *waited,
                  PyObject *since)
{
    PyObject *conn, *handle = NULL, *lease = NULL, *other = NULL;
    if (w->proxy_type != NULL) {
        /* asyncpg: the proxy is filed under its Connection (the proxy has no weak refs) */
        if (!PyObject_TypeCheck(result, (PyTypeObject *)w->proxy_type)) {
            return 0;
        }
        conn = proxy_con(w, result);
        if (conn == NULL) {
            goto fault;
        }
        if (conn == Py_None) {
            Py_DECREF(conn);
            return 0;
        }
    }
    else {
        conn = Py_NewRef(result);
    }
    handle = waited != NULL ? Py_NewRef(waited) : handle_of(w, pool);
    if (handle == NULL || ledger_now(w, s_checkout, &other) < 0) {
        goto fault;
    }
    if (other == NULL) {
        PyObject *cargs[5] = {w->core, handle, conn, Py_True, since};
        lease = ledger_checkout(NULL, cargs, since == NULL ? 4 : 5, NULL);
    }
    else {
        PyObject *cargs[4] = {handle, conn, Py_True, since == NULL ? Py_None : since};
        lease = PyObject_Vectorcall(other, cargs, 4, NULL);
        Py_DECREF(other);
    }
    if (lease == NULL) {
        goto fault;
    }
    Py_DECREF(lease);
    Py_DECREF(handle);
    Py_DECREF(conn);
    return 0;
fault:
    Py_XDECREF(handle);
    Py_XDECREF(conn);
    return swallow(w->internal_error, w->site);
}

/* The wait failed, the error set: ``gave_up(pool, err, args, kwargs)``, the error kept. */
static void
tracked_gave_up(Awaiting *self, Tracked *w)
{
    saved_error e;
    error_save(&e);
    PyObject *all = self->args, *names = self->kwargs;
    Py_ssize_t nkw = names == NULL ? 0 : PyTuple_GET_SIZE(names);
    Py_ssize_t npos = PyTuple_GET_SIZE(all) - nkw;
    PyObject *rest = PyTuple_GetSlice(all, 0, npos), *kwargs = PyDict_New();
    int ok = rest != NULL && kwargs != NULL;
    for (Py_ssize_t i = 0; ok && i < nkw; i++) {
        ok = PyDict_SetItem(kwargs, PyTuple_GET_ITEM(names, i),
                            PyTuple_GET_ITEM(all, npos + i)) == 0;
    }
    if (ok) {
        PyObject *done = PyObject_CallFunctionObjArgs(
            w->gave_up, self->target, e.value ? e.value : Py_None, rest, kwargs, NULL);
        Py_XDECREF(done);
    }
    Py_XDECREF(rest);
    Py_XDECREF(kwargs);
    PyErr_Clear(); /* gave_up guards itself; nothing of pgleak's reaches the caller */
    error_restore(&e);
}

/* The end of the ``async def`` checkin: the lease (``self->target``) is checked in, whatever
 * ended the call (error set or not) but the pool's refusal. As ``released`` above. */
static int
tracked_areleased(Awaiting *self, Tracked *w, int raised)
{
    saved_error e = {NULL, NULL, NULL};
    if (raised) {
        if (PyErr_ExceptionMatches(w->refused)) {
            return 0;
        }
        error_save(&e);
    }
    PyObject *other = NULL, *done = NULL;
    if (ledger_now(w, s_checkin, &other) == 0) {
        if (other == NULL) {
            PyObject *cargs[2] = {w->core, self->target};
            done = ledger_checkin(NULL, cargs, 2, NULL);
        }
        else {
            done = PyObject_CallOneArg(other, self->target);
            Py_DECREF(other);
        }
    }
    int failed = 0;
    if (done == NULL) {
        failed = swallow(w->internal_error, w->site);
    }
    Py_XDECREF(done);
    if (raised) {
        if (failed) {
            PyErr_Clear(); /* a BaseException of pgleak's own over the call's: the call's goes on */
        }
        error_restore(&e);
        return 0;
    }
    return failed;
}

static int ablock_told(Tracked *w, PyObject *proxy, int entering); /* below */
static int sablock_told(Tracked *w, PyObject *connection, int entering);

static int
tracked_ended(Awaiting *self, PyObject *result, int raised)
{
    Tracked *w = (Tracked *)self->spec;
    if (self->mode == AW_T_BLOCK) {
        if (raised) {
            return 0;
        }
        return w->proxy_type == NULL ? sablock_told(w, self->target, 1)
                                     : ablock_told(w, result, 1);
    }
    if (self->mode == AW_T_ACQUIRE || self->mode == AW_T_OBSERVED) {
        /* an observed wait ends first, however the call ended (the template's order) */
        if (self->handle != NULL) {
            observed_wait_end(w, self->handle);
        }
        if (raised) {
            tracked_gave_up(self, w);
            return 0;
        }
        return tracked_aacquired(w, self->target, result, self->handle, self->since);
    }
    return tracked_areleased(self, w, raised);
}

/* An observed checkout's first ``send``: the top of the template's body, ``if core.observer is
 * not None: handle, since = waiting(pool)`` (asyncpg's ``_waiting`` is the same steps through
 * ``core.pool`` and ``core.wait_start``). Never raises. */
static void
tracked_wait_start(Awaiting *self)
{
    Tracked *w = (Tracked *)self->spec;
    self->mode = AW_T_ACQUIRE;
    if (self->target == NULL) {
        return;
    }
    PyObject *observer = PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL) {
        if (PyErr_Occurred()) {
            report_fault(w);
        }
        return;
    }
    if (observer != Py_None) {
        observed_wait(w, self->target, 0, &self->handle, &self->since);
    }
}

/* The observed wait ended with no end to the call (closed at its await, or dropped): the
 * pending entry is taken off, as the template's ``except BaseException`` did. */
static void
tracked_wait_abandoned(Awaiting *self)
{
    PyObject *handle = self->handle;
    self->handle = NULL;
    Py_CLEAR(self->since);
    if (self->spec != NULL && Py_IS_TYPE(self->spec, &TrackedType)) {
        observed_wait_end((Tracked *)self->spec, handle);
    }
    Py_DECREF(handle);
}

/* An Awaiting of ``awaitable`` whose end is this wrapper's (see tracked_ended). */
static PyObject *
tracked_awaiting(int mode, Tracked *w, PyObject *awaitable, PyObject *target, PyObject *args,
                 PyObject *kwnames)
{
    PyObject *it = awaitable_iter(awaitable);
    if (it == NULL) {
        return NULL;
    }
    Awaiting *self = PyObject_GC_New(Awaiting, &Awaiting_Type);
    if (self == NULL) {
        Py_DECREF(it);
        return NULL;
    }
    self->it = it;
    self->spec = Py_NewRef((PyObject *)w);
    self->target = Py_NewRef(target);
    self->args = Py_XNewRef(args);
    self->kwargs = Py_XNewRef(kwnames);
    self->handle = self->since = NULL;
    self->mode = mode;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
aacquire_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        goto python;
    }
    /* kept answers (calm()) say there is no observer without reading the core's dict */
    PyObject *observer = calm(w->core) ? Py_None
                                       : PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL) { /* no such attribute: the template's */
        PyErr_Clear();
        goto python;
    }
    if (w->tags_dict != NULL) {
        PyObject *call_site = PyDict_GetItemWithError(w->tags_dict, s_call_site);
        if (call_site == NULL || (call_site != Py_None && call_site != Py_False)) {
            PyErr_Clear();
            goto python;
        }
    }
    /* an observer's wait starts at the first send, where the template's body begins */
    int mode = observer == Py_None ? AW_T_ACQUIRE : AW_T_OBSERVED;
    PyObject *coro = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    if (coro == NULL) {
        return NULL;
    }
    Py_ssize_t total = nargs + (kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames));
    PyObject *rest = PyTuple_New(total - 1);
    if (rest == NULL) {
        Py_DECREF(coro);
        return NULL;
    }
    for (Py_ssize_t i = 1; i < total; i++) {
        PyTuple_SET_ITEM(rest, i - 1, Py_NewRef(args[i]));
    }
    PyObject *made = tracked_awaiting(mode, w, coro, args[0], rest, kwnames);
    Py_DECREF(rest);
    Py_DECREF(coro);
    return made;
python:
    return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
}

static PyObject *
arelease_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *conn = conn_argument(w, args, nargs, kwnames);
    if (conn == NULL) {
        goto python;
    }
    PyObject *key = conn_key(conn);
    if (key == NULL) {
        return NULL;
    }
    PyObject *lease = PyDict_GetItemWithError(w->by_conn, key);
    Py_DECREF(key);
    if (lease == NULL && PyErr_Occurred()) {
        PyErr_Clear();
        goto python;
    }
    if (lease != NULL) {
        if (!Py_IS_TYPE(lease, lease_type)) {
            goto python;
        }
        PyObject *ref = SLOT(lease, lease_off[L_REF]);
        PyObject *target = (ref != NULL && PyWeakref_Check(ref)) ? ref_target(ref) : NULL;
        Py_XDECREF(target);
        if (target != conn) {
            lease = NULL; /* an id reused after its connection died */
        }
    }
    if (lease == NULL) { /* untracked: the library's coroutine as it is */
        return PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    }
    Py_INCREF(lease);
    PyObject *coro = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    PyObject *made = NULL;
    if (coro != NULL) {
        made = tracked_awaiting(AW_T_RELEASE, w, coro, lease, NULL, NULL);
        Py_DECREF(coro);
    }
    Py_DECREF(lease);
    return made;
python:
    return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
}

/* ``getattr(obj, name, None)`` as PyObject_GetOptionalAttr (1 found, 0 absent, -1 error),
 * read straight from the instance's slot where that is what the generic lookup does: the
 * type's attribute lookup untouched (no ``__getattribute__`` or ``__getattr__`` of its own)
 * and ``name`` an object slot's member descriptor on the type (a data descriptor: it wins over
 * anything else); an empty slot is AttributeError, so absent. asyncpg's
 * PoolConnectionHolder is slotted: ~130 instructions less a read, twice a checkin. */
static int
optional_attr(PyObject *obj, PyObject *name, PyObject **result)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type->tp_getattro == PyObject_GenericGetAttr) {
        PyObject *descr = _PyType_Lookup(type, name); /* borrowed */
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
            && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX
            && (PyDescr_TYPE(descr) == type || PyType_IsSubtype(type, PyDescr_TYPE(descr)))) {
            *result = Py_XNewRef(SLOT(obj, ((PyMemberDescrObject *)descr)->d_member->offset));
            return *result != NULL;
        }
    }
    return PyObject_GetOptionalAttr(obj, name, result);
}

static PyObject *
holder_release_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) < 1) {
        return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
    }
    PyObject *holder = args[0], *in_use = NULL, *con = NULL, *lease = NULL;
    /* the template's ``getattr(holder, "_in_use", None)``, ``getattr(holder, "_con", None)`` */
    if (optional_attr(holder, s_in_use, &in_use) < 0) {
        report_fault(w);
    }
    else if (in_use != NULL && in_use != Py_None) {
        if (optional_attr(holder, s_con, &con) < 0) {
            report_fault(w);
        }
        else if (con != NULL && con != Py_None) {
            PyObject *key = conn_key(con);
            lease = key == NULL ? NULL : PyDict_GetItemWithError(w->by_conn, key);
            Py_XDECREF(key);
            if (lease == NULL && PyErr_Occurred()) {
                report_fault(w);
            }
            if (lease != NULL) {
                if (!Py_IS_TYPE(lease, lease_type)) {
                    Py_XDECREF(in_use);
                    Py_XDECREF(con);
                    return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
                }
                PyObject *ref = SLOT(lease, lease_off[L_REF]);
                PyObject *target = (ref != NULL && PyWeakref_Check(ref)) ? ref_target(ref) : NULL;
                Py_XDECREF(target);
                lease = target == con ? Py_NewRef(lease) : NULL; /* else an id reused */
            }
        }
    }
    Py_XDECREF(in_use);
    Py_XDECREF(con);
    PyObject *result = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    if (result != NULL && lease != NULL) {
        tracked_released(w, lease);
    }
    Py_XDECREF(lease);
    return result;
}

PyDoc_STRVAR(aacquire_wrapper_doc,
"aacquire_wrapper(original, python, core, pools, kind, namer, site, gave_up, internal_error,\n"
"                 tags, proxy_type) -> Tracked\n\n"
"The asyncio checkout wrapper of ``original`` (a coroutine function): its coroutine in an\n"
"awaitable that files the checkout when it returns; ``python`` (the ``async def`` template)\n"
"for call-site tags (``tags``, None: the method does not tag); ``proxy_type``:\n"
"asyncpg's proxy class, whose ``_con`` is filed (None: the result itself).");

static PyObject *
aacquire_wrapper(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 11 || (args[10] != Py_None && !PyType_Check(args[10]))) {
        PyErr_SetString(PyExc_TypeError, "aacquire_wrapper(): bad arguments");
        return NULL;
    }
    PyObject *given[11];
    for (Py_ssize_t i = 0; i < 10; i++) {
        given[i] = args[i];
    }
    given[10] = Py_False; /* not keyed */
    Tracked *w = (Tracked *)acquire_wrapper(module, given, 11);
    if (w != NULL) {
        w->release = AACQUIRE;
        w->proxy_type = args[10] == Py_None ? NULL : Py_NewRef(args[10]);
    }
    return (PyObject *)w;
}

PyDoc_STRVAR(arelease_wrapper_doc,
"arelease_wrapper(original, python, core, by_conn, refused, conn_index, conn_name, site,\n"
"                 internal_error) -> Tracked\n\n"
"The asyncio checkin wrapper of ``original`` (a coroutine function), arguments as\n"
"release_wrapper's; ``python``: the wrapper it stands in for (_ARELEASE_FAST).");

static PyObject *
arelease_wrapper(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Tracked *w = (Tracked *)release_wrapper(module, args, nargs);
    if (w != NULL) {
        w->release = ARELEASE;
    }
    return (PyObject *)w;
}

PyDoc_STRVAR(holder_release_wrapper_doc,
"holder_release_wrapper(original, python, core, by_conn, site, internal_error) -> Tracked\n\n"
"asyncpg's ``PoolConnectionHolder._release`` wrapper (pgleak.integrations.asyncpg._RELEASE,\n"
"the template ``python``).");

static PyObject *
holder_release_wrapper(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyDict_Check(args[3]) || !bound) {
        PyErr_SetString(PyExc_TypeError, "holder_release_wrapper(): bad arguments, or not bound");
        return NULL;
    }
    if (s_in_use == NULL && (s_in_use = PyUnicode_InternFromString("_in_use")) == NULL) {
        return NULL;
    }
    Tracked *w = tracked_new(HOLDER_RELEASE);
    if (w == NULL) {
        return NULL;
    }
    w->original = Py_NewRef(args[0]);
    w->python = Py_NewRef(args[1]);
    w->by_conn = Py_NewRef(args[3]);
    w->site = Py_NewRef(args[4]);
    w->internal_error = Py_NewRef(args[5]);
    if (tracked_core(w, args[2], s_checkin) < 0) {
        Py_DECREF(w);
        return NULL;
    }
    return (PyObject *)w;
}

/* ---- asyncpg's ``async with pool.acquire()`` block while an observer runs (issue 12) ----
 *
 * pgleak.integrations.asyncpg's ``__aenter__`` / ``__aexit__`` wrappers of
 * ``PoolAcquireContext``: while an observer runs, the checkout's span is made current when
 * the library's ``__aenter__`` returns its proxy (a ``traced`` coroutine of pgleak's around
 * it) and left before the library's ``__aexit__`` (``_scope``, a Python call each). As
 * Tracked objects (ABLOCK_ENTER, ABLOCK_EXIT): the library's coroutine inside an Awaiting
 * whose end is ``_scope(proxy, True)`` in C, and ``_scope(ctx.connection, False)`` in C before
 * the library's ``__aexit__`` is called; no observer: the library's call as it is. Calls of
 * another shape go to ``python``, the wrapper they stand in for. */

static PyObject *s_connection, *s_enter_m, *s_exit_m; /* "connection", "enter", "exit" */

/* ``_scope(proxy, entering)``: the lease of the proxy's connection, if tracked, handed to the
 * observer's ``enter`` / ``exit``. 0, or -1 with an error set (not an Exception: those go to
 * ``internal_error("asyncpg.scope", exc)``, as there). */
static int
ablock_told(Tracked *w, PyObject *proxy, int entering)
{
    PyObject *con = NULL, *lease = NULL, *done = NULL;
    int is = PyObject_IsInstance(proxy, w->proxy_type);
    if (is <= 0) {
        if (is < 0) {
            goto fault;
        }
        return 0;
    }
    con = PyObject_GetAttr(proxy, s_con);
    if (con == NULL) {
        goto fault;
    }
    if (con == Py_None) {
        Py_DECREF(con);
        return 0;
    }
    PyObject *key = PyLong_FromVoidPtr(con);
    if (key == NULL) {
        goto fault;
    }
    lease = PyDict_GetItemWithError(w->by_conn, key);
    Py_DECREF(key);
    if (lease == NULL) {
        if (PyErr_Occurred()) {
            goto fault;
        }
        Py_DECREF(con);
        return 0;
    }
    Py_INCREF(lease);
    /* ``lease.ref is None or lease.ref() is not con``: not tracked, or an id reused */
    PyObject *ref = Py_IS_TYPE(lease, lease_type) ? Py_XNewRef(SLOT(lease, lease_off[L_REF]))
                                                   : PyObject_GetAttr(lease, s_ref);
    if (ref == NULL) {
        if (PyErr_Occurred()) {
            goto fault;
        }
        ref = Py_NewRef(Py_None);
    }
    PyObject *target = NULL;
    if (PyWeakref_CheckRefExact(ref)) {
        target = ref_target(ref);
    }
    else if (ref != Py_None) {
        target = PyObject_CallNoArgs(ref);
        if (target == NULL) {
            Py_DECREF(ref);
            goto fault;
        }
    }
    Py_DECREF(ref);
    Py_XDECREF(target);
    if (target != con) {
        Py_DECREF(lease);
        Py_DECREF(con);
        return 0;
    }
    PyObject *observer = PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL && PyErr_Occurred()) {
        goto fault;
    }
    if (observer != NULL && observer != Py_None) {
        Py_INCREF(observer);
        done = trace_told(observer, entering ? s_enter_m : s_exit_m, lease, entering);
        Py_DECREF(observer);
        if (done == NULL) {
            goto fault;
        }
        Py_DECREF(done);
    }
    Py_DECREF(lease);
    Py_DECREF(con);
    return 0;
fault:
    Py_XDECREF(lease);
    Py_XDECREF(con);
    return swallow(w->internal_error, w->site);
}

/* SQLAlchemy's ``AsyncConnection.__aenter__`` / ``__aexit__`` (the same modes, ``proxy_type``
 * NULL, ``conn_name`` the record's attribute): pgleak.integrations.sqlalchemy's
 * ``_scope(getattr(connection, "sync_connection", None), entering)``, the getattr outside its
 * guard (``internal_error("sqlalchemy.scope", exc)``), as there. */
static PyObject *s_sync_connection, *s_dbapi_connection;

static int sa_told(Tracked *w, PyObject *sync, int entering);

static int
sablock_told(Tracked *w, PyObject *connection, int entering)
{
    PyObject *sync = NULL;
    if (PyObject_GetOptionalAttr(connection, s_sync_connection, &sync) < 0) {
        return -1;
    }
    if (sync == NULL || sync == Py_None) {
        Py_XDECREF(sync);
        return 0;
    }
    int told = sa_told(w, sync, entering);
    Py_DECREF(sync);
    return told;
}

/* The rest of ``_scope``, from the sync ``Connection`` down (the whole of the sync block's
 * lookup, integrations.sqlalchemy._make_enter / _make_exit): every step inside the guard. */
static int
sa_told(Tracked *w, PyObject *sync, int entering)
{
    PyObject *fairy = NULL, *record = NULL, *lease = NULL;
    /* getattr(x, name, None) at each step: None (or absent) the rest of the way down */
    int found = PyObject_GetOptionalAttr(sync, s_dbapi_connection, &fairy);
    if (found > 0 && fairy != Py_None) {
        record = sa_record_kept(fairy); /* as the checkouts found it: its slot */
        found = record != NULL ? 1
                               : PyObject_GetOptionalAttr(fairy, s_connection_record, &record);
        if (found > 0 && record != Py_None) {
            found = PyObject_GetOptionalAttr(record, w->conn_name, &lease);
        }
    }
    Py_XDECREF(fairy);
    Py_XDECREF(record);
    if (found < 0) {
        return swallow(w->internal_error, w->site);
    }
    if (lease == NULL || lease == Py_None) {
        Py_XDECREF(lease);
        return 0;
    }
    PyObject *observer = PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL && PyErr_Occurred()) {
        Py_DECREF(lease);
        return swallow(w->internal_error, w->site);
    }
    if (observer != NULL && observer != Py_None) {
        Py_INCREF(observer);
        PyObject *done =
            trace_told(observer, entering ? s_enter_m : s_exit_m, lease, entering);
        Py_DECREF(observer);
        if (done == NULL) {
            Py_DECREF(lease);
            return swallow(w->internal_error, w->site);
        }
        Py_DECREF(done);
    }
    Py_DECREF(lease);
    return 0;
}

static PyObject *
ablock_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL || nargs != (w->release == ABLOCK_ENTER ? 1 : 4)) {
        return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
    }
    PyObject *observer = PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL) {
        PyErr_Clear();
        return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
    }
    if (observer == Py_None) {
        return PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    }
    if (w->release == ABLOCK_EXIT && w->proxy_type == NULL) {
        if (sablock_told(w, args[0], 0) < 0) {
            return NULL;
        }
        return PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    }
    if (w->release == ABLOCK_EXIT) {
        /* ``_scope(getattr(ctx, "connection", None), False)``: the getattr outside its guard */
        PyObject *proxy = NULL;
        if (PyObject_GetOptionalAttr(args[0], s_connection, &proxy) < 0) {
            return NULL;
        }
        int failed = ablock_told(w, proxy == NULL ? Py_None : proxy, 0);
        Py_XDECREF(proxy);
        if (failed < 0) {
            return NULL;
        }
        return PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    }
    PyObject *coro = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    if (coro == NULL) {
        return NULL;
    }
    PyObject *made = tracked_awaiting(AW_T_BLOCK, w, coro, args[0], NULL, NULL);
    Py_DECREF(coro);
    return made;
}

PyDoc_STRVAR(ablock_wrapper_doc,
"ablock_wrapper(original, python, core, by_conn, proxy_type, site, internal_error, entering,\n"
"               sync=False) -> Tracked\n\n"
"asyncpg's ``PoolAcquireContext.__aenter__`` (``entering``) or ``__aexit__`` wrapper\n"
"(pgleak.integrations.asyncpg._wrap_aenter / _wrap_aexit, the function ``python``); with\n"
"``proxy_type`` None and ``by_conn`` the record's attribute name, SQLAlchemy's\n"
"``AsyncConnection.__aenter__`` / ``__aexit__`` (integrations.sqlalchemy._make_aenter /\n"
"_make_aexit), or with ``sync`` true its sync ``Connection.__enter__`` / ``__exit__``\n"
"(_make_enter / _make_exit).");

static PyObject *
ablock_wrapper(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int sqlalchemy = (nargs == 8 || nargs == 9) && args[4] == Py_None;
    int sync = nargs == 9 ? PyObject_IsTrue(args[8]) : 0;
    if (sync < 0) {
        return NULL;
    }
    if ((nargs != 8 && nargs != 9) || !bound || (sync && !sqlalchemy)
        || (sqlalchemy ? !PyUnicode_Check(args[3])
                       : !PyDict_Check(args[3]) || !PyType_Check(args[4]))) {
        PyErr_SetString(PyExc_TypeError, "ablock_wrapper(): bad arguments, or not bound");
        return NULL;
    }
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {{&s_connection, "connection"}, {&s_enter_m, "enter"}, {&s_exit_m, "exit"},
                 {&s_sync_connection, "sync_connection"},
                 {&s_dbapi_connection, "_dbapi_connection"}};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL
            && (*names[i].slot = PyUnicode_InternFromString(names[i].text)) == NULL) {
            return NULL;
        }
    }
    int entering = PyObject_IsTrue(args[7]);
    if (entering < 0) {
        return NULL;
    }
    Tracked *w = tracked_new(sync ? (entering ? SBLOCK_ENTER : SBLOCK_EXIT)
                                  : (entering ? ABLOCK_ENTER : ABLOCK_EXIT));
    if (w == NULL) {
        return NULL;
    }
    w->original = Py_NewRef(args[0]);
    w->python = Py_NewRef(args[1]);
    if (sqlalchemy) {
        w->conn_name = Py_NewRef(args[3]);
    }
    else {
        w->by_conn = Py_NewRef(args[3]);
        w->proxy_type = Py_NewRef(args[4]);
    }
    w->site = Py_NewRef(args[5]);
    w->internal_error = Py_NewRef(args[6]);
    if (tracked_core(w, args[2], s_checkout) < 0) {
        Py_DECREF(w);
        return NULL;
    }
    return (PyObject *)w;
}

/* SQLAlchemy's sync ``Connection.__enter__`` / ``__exit__`` while an observer runs
 * (integrations.sqlalchemy._make_enter / _make_exit, the function ``python``): the same steps
 * with no frame of pgleak's. The observer is read first, as there: without one, nothing is
 * looked up (so nothing can fault); ``__enter__`` tells it after the library's, ``__exit__``
 * before. */
static PyObject *
sblock_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int entering = w->release == SBLOCK_ENTER;
    if (kwnames != NULL || nargs != (entering ? 1 : 4)) {
        return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
    }
    if (!entering) {
        PyObject *observer = PyDict_GetItemWithError(w->core_dict, s_observer);
        if (observer == NULL) {
            PyErr_Clear();
            return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
        }
        if (observer != Py_None && sa_told(w, args[0], 0) < 0) {
            return NULL;
        }
        return PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    }
    PyObject *result = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    if (result == NULL) {
        return NULL;
    }
    PyObject *observer = PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL) {
        /* no such attribute: the Python function's ``core.observer`` would raise here */
        Py_DECREF(result);
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_AttributeError, s_observer);
        }
        return NULL;
    }
    if (observer != Py_None && sa_told(w, args[0], 1) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

/* ---- a checkout's ``with`` block, its sync half in C (issue 12) ------------------------
 *
 * ``Adapter.track_scope`` (psycopg_pool's ``connection()``) hands the user a ``_Scope`` around
 * the library's context manager, so that the checkout's span is current inside the block. Its
 * ``__enter__`` and ``__exit__`` were two Python frames of pgleak's on every traced block
 * (with the lease's lookup and the observer's call, ~3,000 instructions a cycle); ``Scope``
 * is the base class of its C flavour (pgleak._adapter._CScope), whose Python subclass adds the
 * class attributes (``_kind``, ``_lease_of``) and the asyncio methods. The same steps as
 * ``_Scope.__enter__`` / ``__exit__``, in the same order; a fault (an ``Exception``) goes to
 * ``internal_error("<kind>.scope", exc)``, anything else propagates, as there. */

typedef struct {
    PyObject_HEAD
    PyObject *cm;    /* _cm: the library's context manager */
    PyObject *lease; /* _lease: the checkout's lease, once entered (NULL: None) */
} Scope;

/* scope_bind()'s: pgleak._core.core, its by_conn dict, pgleak._guard.internal_error */
static PyObject *sc_core, *sc_by_conn, *sc_internal_error;
static PyObject *s_sc_enter, *s_sc_exit, *s_sc_lease_of, *s_sc_kind, *s_sc_oenter, *s_sc_oexit;
static PyObject *s_sc_aenter, *s_sc_aexit;

/* The current exception, if an Exception: handed to internal_error("<kind>.scope", exc), 0;
 * anything else: left set, -1. */
static int
scope_fault(PyObject *self)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    saved_error e;
    error_save(&e);
    PyObject *kind = PyObject_GetAttr(self, s_sc_kind);
    PyObject *site = kind == NULL ? NULL : PyUnicode_FromFormat("%S.scope", kind);
    Py_XDECREF(kind);
    if (site != NULL && e.value != NULL) {
        PyObject *done = PyObject_CallFunctionObjArgs(sc_internal_error, site, e.value, NULL);
        Py_XDECREF(done);
    }
    Py_XDECREF(site);
    PyErr_Clear(); /* internal_error never raises; if it did, the block must still go on */
    error_drop(&e);
    return 0;
}

/* ``_Scope._entered(conn)``: the lease found, kept, and the observer told. 0, or -1 with an
 * error set (not an Exception: those are reported). */
static int
scope_entered(Scope *self, PyObject *conn)
{
    PyObject *lease = NULL, *observer = NULL;
    PyObject *lease_of = PyObject_GetAttr((PyObject *)self, s_sc_lease_of);
    if (lease_of == NULL) {
        goto fault;
    }
    if (lease_of == Py_None) { /* core.lease_of(), inlined */
        Py_DECREF(lease_of);
        PyObject *key = PyLong_FromVoidPtr(conn);
        if (key == NULL) {
            goto fault;
        }
        lease = PyDict_GetItemWithError(sc_by_conn, key);
        Py_DECREF(key);
        if (lease == NULL && PyErr_Occurred()) {
            goto fault;
        }
        lease = Py_NewRef(lease == NULL ? Py_None : lease);
        if (lease != Py_None) {
            PyObject *ref = PyObject_GetAttr(lease, s_ref);
            if (ref == NULL) {
                goto fault;
            }
            int same = 0;
            if (ref != Py_None) {
                PyObject *target = PyObject_CallNoArgs(ref);
                if (target == NULL) {
                    Py_DECREF(ref);
                    goto fault;
                }
                same = target == conn;
                Py_DECREF(target);
            }
            Py_DECREF(ref);
            if (!same) {
                Py_SETREF(lease, Py_NewRef(Py_None));
            }
        }
    }
    else {
        lease = PyObject_CallOneArg(lease_of, conn);
        Py_DECREF(lease_of);
        if (lease == NULL) {
            goto fault;
        }
    }
    Py_XSETREF(self->lease, lease); /* self._lease = lease */
    lease = NULL;
    observer = PyObject_GetAttr(sc_core, s_observer);
    if (observer == NULL) {
        goto fault;
    }
    if (observer != Py_None && self->lease != NULL && self->lease != Py_None) {
        PyObject *done = trace_told(observer, s_sc_oenter, self->lease, 1);
        if (done == NULL) {
            goto fault;
        }
        Py_DECREF(done);
    }
    Py_DECREF(observer);
    return 0;
fault:
    Py_XDECREF(lease);
    Py_XDECREF(observer);
    return scope_fault((PyObject *)self);
}

static PyObject *
scope_enter(Scope *self, PyObject *Py_UNUSED(ignored))
{
    if (self->cm == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_cm");
        return NULL;
    }
    PyObject *conn = PyObject_CallMethodNoArgs(self->cm, s_sc_enter);
    if (conn == NULL) {
        return NULL;
    }
    if (scope_entered(self, conn) < 0) {
        Py_DECREF(conn);
        return NULL;
    }
    return conn;
}

/* ``exit_scope(self._lease, self._kind)``, inlined: 0, or -1 with an error set (not an
 * Exception: those are reported). */
static int
scope_exited(Scope *self)
{
    PyObject *lease = self->lease;
    if (lease != NULL && lease != Py_None) { /* exit_scope(), inlined */
        PyObject *observer = PyObject_GetAttr(sc_core, s_observer);
        PyObject *done = NULL;
        if (observer != NULL && observer != Py_None) {
            Py_INCREF(lease);
            done = trace_told(observer, s_sc_oexit, lease, 0);
            Py_DECREF(lease);
        }
        else if (observer != NULL) {
            done = Py_NewRef(Py_None);
        }
        Py_XDECREF(observer);
        if (done == NULL && scope_fault((PyObject *)self) < 0) {
            return -1;
        }
        Py_XDECREF(done);
    }
    return 0;
}

static PyObject *
scope_exit(Scope *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "__exit__(typ, value, tb)");
        return NULL;
    }
    if (self->cm == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_cm");
        return NULL;
    }
    if (scope_exited(self) < 0) {
        return NULL;
    }
    return PyObject_CallMethodObjArgs(self->cm, s_sc_exit, args[0], args[1], args[2], NULL);
}

/* The asyncio half (``_Scope.__aenter__`` / ``__aexit__``), without their two coroutines: the
 * library's ``__aenter__`` awaitable inside an Awaiting that enters the scope (``_entered``)
 * when it returns, in the awaiting task; ``__aexit__`` leaves the scope at once and hands back
 * the library's ``__aexit__`` awaitable itself. ``async with`` awaits what it gets at once, so
 * the steps run where and in the order the ``async def`` ran them. */
static int
scope_awaited(PyObject *scope, PyObject *conn)
{
    return scope_entered((Scope *)scope, conn);
}

static PyObject *
scope_aenter(Scope *self, PyObject *Py_UNUSED(ignored))
{
    if (self->cm == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_cm");
        return NULL;
    }
    PyObject *awaitable = PyObject_CallMethodNoArgs(self->cm, s_sc_aenter);
    if (awaitable == NULL) {
        return NULL;
    }
    PyObject *it = awaitable_iter(awaitable);
    Py_DECREF(awaitable);
    if (it == NULL) {
        return NULL;
    }
    Awaiting *made = PyObject_GC_New(Awaiting, &Awaiting_Type);
    if (made == NULL) {
        Py_DECREF(it);
        return NULL;
    }
    made->it = it;
    made->spec = NULL;
    made->target = Py_NewRef((PyObject *)self);
    made->args = made->kwargs = made->handle = made->since = NULL;
    made->mode = AW_SCOPE;
    PyObject_GC_Track(made);
    return (PyObject *)made;
}

static PyObject *
scope_aexit(Scope *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "__aexit__(typ, value, tb)");
        return NULL;
    }
    if (self->cm == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_cm");
        return NULL;
    }
    if (scope_exited(self) < 0) {
        return NULL;
    }
    return PyObject_CallMethodObjArgs(self->cm, s_sc_aexit, args[0], args[1], args[2], NULL);
}

/* Only ever a static base of heap subclasses: their subtype_traverse / subtype_dealloc visit
 * and release the subclass itself. */
static int
scope_traverse(Scope *self, visitproc visit, void *arg)
{
    Py_VISIT(self->cm);
    Py_VISIT(self->lease);
    return 0;
}

static int
scope_clear(Scope *self)
{
    Py_CLEAR(self->cm);
    Py_CLEAR(self->lease);
    return 0;
}

static void
scope_dealloc(Scope *self)
{
    PyObject_GC_UnTrack(self);
    scope_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef scope_methods[] = {
    {"__enter__", (PyCFunction)scope_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))scope_exit, METH_FASTCALL, NULL},
    {"__aenter__", (PyCFunction)scope_aenter, METH_NOARGS, NULL},
    {"__aexit__", (PyCFunction)(void (*)(void))scope_aexit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef scope_members[] = {
    {"_cm", T_OBJECT, offsetof(Scope, cm), 0, NULL},
    {"_lease", T_OBJECT, offsetof(Scope, lease), 0, NULL},
    {NULL},
};

static PyTypeObject ScopeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgleak._speedups.Scope",
    .tp_basicsize = sizeof(Scope),
    .tp_dealloc = (destructor)scope_dealloc,
    .tp_free = PyObject_GC_Del,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The sync half of pgleak._adapter._Scope, as a base class (see scope_bind).",
    .tp_traverse = (traverseproc)scope_traverse,
    .tp_clear = (inquiry)scope_clear,
    .tp_methods = scope_methods,
    .tp_members = scope_members,
    .tp_new = PyType_GenericNew,
};

PyDoc_STRVAR(scope_bind_doc,
"scope_bind(core, by_conn, internal_error)\n\n"
"What ``Scope`` works on: pgleak._core.core, its ``by_conn`` dict, pgleak._guard's\n"
"``internal_error``.");

static PyObject *
scope_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "scope_bind(core, by_conn: dict, internal_error)");
        return NULL;
    }
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&s_sc_enter, "__enter__"}, {&s_sc_exit, "__exit__"}, {&s_sc_lease_of, "_lease_of"},
        {&s_sc_kind, "_kind"}, {&s_sc_oenter, "enter"}, {&s_sc_oexit, "exit"},
        {&s_sc_aenter, "__aenter__"}, {&s_sc_aexit, "__aexit__"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL) {
            *names[i].slot = PyUnicode_InternFromString(names[i].text);
            if (*names[i].slot == NULL) {
                return NULL;
            }
        }
    }
    Py_XSETREF(sc_core, Py_NewRef(args[0]));
    Py_XSETREF(sc_by_conn, Py_NewRef(args[1]));
    Py_XSETREF(sc_internal_error, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

/* ``Adapter.track_scope``'s wrapper (pgleak._adapter._SCOPE) as a Tracked object (SCOPE_OPEN):
 * the library's context manager as it is without an observer, else inside a new scope of
 * the class it was made with (``_cm`` the library's, ``_lease`` None), no ``__init__`` called;
 * no frame of pgleak's around ``pool.connection()``. */
static PyObject *
scope_open_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *cm = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    if (cm == NULL) {
        return NULL;
    }
    PyObject *observer = PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL) { /* no such attribute: as the template's ``core.observer`` */
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_AttributeError, s_observer);
        }
        Py_DECREF(cm);
        return NULL;
    }
    if (observer == Py_None) {
        return cm;
    }
    PyTypeObject *type = (PyTypeObject *)w->proxy_type;
    Scope *scope = (Scope *)type->tp_alloc(type, 0);
    if (scope == NULL) {
        Py_DECREF(cm);
        return NULL;
    }
    scope->cm = cm;
    scope->lease = Py_NewRef(Py_None);
    return (PyObject *)scope;
}

PyDoc_STRVAR(scope_wrapper_doc,
"scope_wrapper(original, python, core, scope_type) -> Tracked\n\n"
"``Adapter.track_scope``'s wrapper of ``original`` (pgleak._adapter._SCOPE, compiled as\n"
"``python``): its context manager, inside a new ``scope_type`` (a subclass of ``Scope``)\n"
"while an observer runs.");

static PyObject *
scope_wrapper(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyType_Check(args[3])
        || !PyType_IsSubtype((PyTypeObject *)args[3], &ScopeType)
        || ((PyTypeObject *)args[3])->tp_basicsize != ScopeType.tp_basicsize || !bound) {
        PyErr_SetString(PyExc_TypeError, "scope_wrapper(): bad arguments, or not bound");
        return NULL;
    }
    Tracked *w = tracked_new(SCOPE_OPEN);
    if (w == NULL) {
        return NULL;
    }
    w->original = Py_NewRef(args[0]);
    w->python = Py_NewRef(args[1]);
    w->proxy_type = Py_NewRef(args[3]);
    if (tracked_core(w, args[2], s_checkout) < 0) {
        Py_DECREF(w);
        return NULL;
    }
    return (PyObject *)w;
}

static PyMethodDef methods[] = {
    {"capture", (PyCFunction)(void (*)(void))capture, METH_FASTCALL, capture_doc},
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL, walk_doc},
    {"chain_complete", (PyCFunction)(void (*)(void))chain_complete, METH_FASTCALL,
     chain_complete_doc},
    {"capture_task", (PyCFunction)(void (*)(void))capture_task, METH_FASTCALL,
     capture_task_doc},
    {"acquiring", (PyCFunction)(void (*)(void))acquiring, METH_FASTCALL, acquiring_doc},
    {"releasing", (PyCFunction)(void (*)(void))releasing, METH_FASTCALL, releasing_doc},
    {"bind", bind, METH_O, bind_doc},
    {"adopt", adopt, METH_O, adopt_doc},
    {"forget_thread", forget_thread, METH_NOARGS, forget_thread_doc},
    {"vars_set", vars_set, METH_NOARGS, vars_set_doc},
    {"vars_read", vars_read, METH_NOARGS, vars_read_doc},
    {"kept", kept, METH_NOARGS, kept_doc},
    {"checkout", (PyCFunction)(void (*)(void))ledger_checkout, METH_FASTCALL | METH_KEYWORDS,
     checkout_doc},
    {"checkin", (PyCFunction)(void (*)(void))ledger_checkin, METH_FASTCALL | METH_KEYWORDS,
     checkin_doc},
    {"trace_bind", (PyCFunction)(void (*)(void))trace_bind, METH_FASTCALL, trace_bind_doc},
    {"trace_span_bind", (PyCFunction)(void (*)(void))trace_span_bind, METH_FASTCALL,
     trace_span_bind_doc},
    {"trace_block", (PyCFunction)(void (*)(void))trace_block, METH_FASTCALL, trace_block_doc},
    {"acquire_wrapper", (PyCFunction)(void (*)(void))acquire_wrapper, METH_FASTCALL,
     acquire_wrapper_doc},
    {"release_wrapper", (PyCFunction)(void (*)(void))release_wrapper, METH_FASTCALL,
     release_wrapper_doc},
    {"sqlalchemy_wrapper", (PyCFunction)(void (*)(void))sqlalchemy_wrapper, METH_FASTCALL,
     sqlalchemy_wrapper_doc},
    {"retry_wrapper", (PyCFunction)(void (*)(void))retry_wrapper, METH_FASTCALL,
     retry_wrapper_doc},
    {"aacquire_wrapper", (PyCFunction)(void (*)(void))aacquire_wrapper, METH_FASTCALL,
     aacquire_wrapper_doc},
    {"arelease_wrapper", (PyCFunction)(void (*)(void))arelease_wrapper, METH_FASTCALL,
     arelease_wrapper_doc},
    {"holder_release_wrapper", (PyCFunction)(void (*)(void))holder_release_wrapper,
     METH_FASTCALL, holder_release_wrapper_doc},
    {"ablock_wrapper", (PyCFunction)(void (*)(void))ablock_wrapper, METH_FASTCALL,
     ablock_wrapper_doc},
    {"scope_bind", (PyCFunction)(void (*)(void))scope_bind, METH_FASTCALL, scope_bind_doc},
    {"scope_wrapper", (PyCFunction)(void (*)(void))scope_wrapper, METH_FASTCALL,
     scope_wrapper_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pgleak._speedups",
    .m_doc = "The checkout stack walk, the ledger, the checkout and checkin wrappers and\n"
             "the asyncio awaitables, in C (see pgleak/_stack.py, pgleak/_core.py,\n"
             "pgleak/_adapter.py).",
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
    s_cr_running = PyUnicode_InternFromString("cr_running");
    s_gi_running = PyUnicode_InternFromString("gi_running");
    if (!s_cr_frame || !s_gi_frame || !s_cr_await || !s_gi_yieldfrom || !s_cr_running
        || !s_gi_running) {
        return NULL;
    }
    find_getter(&PyCoro_Type, "cr_running", &coro_running);
    find_getter(&PyGen_Type, "gi_running", &gen_running);
    find_getter(&PyCoro_Type, "cr_frame", &coro_frame);
    find_getter(&PyCoro_Type, "cr_await", &coro_await);
    find_getter(&PyGen_Type, "gi_frame", &gen_frame);
    find_getter(&PyGen_Type, "gi_yieldfrom", &gen_yieldfrom);
    struct {
        PyObject **slot;
        const char *text;
    } interned[] = {
        {&s_settings, "settings"}, {&s_enabled, "enabled"}, {&s_max_tracked, "max_tracked"},
        {&s_leak_threshold, "leak_threshold"}, {&s_capture_stack, "capture_stack"},
        {&s_stack_depth, "stack_depth"}, {&s_leases, "leases"}, {&s_by_conn, "by_conn"},
        {&s_ids, "_ids"}, {&s_watchdog, "watchdog"}, {&s_thread, "thread"},
        {&s_observer, "observer"}, {&s_waker, "waker"}, {&s_collected, "_collected"},
        {&s_get_name, "get_name"}, {&s_generation, "_generation"},
        {&s_pending, "_pending"}, {&s_after_checkout, "_after_checkout"},
        {&s_forget, "_forget"}, {&s_on_collected, "_on_collected"},
        {&s_wake_gate, "wake_gate"}, {&s_thread_key, "pgleak.thread"},
        {&s_append, "append"},
        {&s_get_coro, "get_coro"}, {&s_pool, "pool"}, {&s_con, "_con"}, {&s_ref, "ref"},
        {&s_throw, "throw"}, {&s_close, "close"}, {&s_checkout, "checkout"},
        {&s_checkin, "checkin"}, {&s_greenlet, "greenlet"}, {&s_getcurrent, "getcurrent"},
        {&s_parent, "parent"}, {&s_gr_frame, "gr_frame"},
        {&s_call_site, "call_site"}, {&s_connection_record, "_connection_record"},
        {&s_tokens, "_tokens"},
        {&s_observe_checkin, "_observe_checkin"},
        {&s_pending_deque, "pending"}, {&s_pop, "pop"},
    };
    for (size_t i = 0; i < sizeof(interned) / sizeof(interned[0]); i++) {
        *interned[i].slot = PyUnicode_InternFromString(interned[i].text);
        if (*interned[i].slot == NULL) {
            return NULL;
        }
    }
    if (PyType_Ready(&Awaiting_Type) < 0 || PyType_Ready(&TrackedType) < 0
        || PyType_Ready(&ScopeType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups);
    if (module != NULL && PyModule_AddObjectRef(module, "Tracked", (PyObject *)&TrackedType) < 0) {
        Py_CLEAR(module);
    }
    if (module != NULL && PyModule_AddObjectRef(module, "Scope", (PyObject *)&ScopeType) < 0) {
        Py_CLEAR(module);
    }
    return module;
}
