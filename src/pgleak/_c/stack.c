/* pgleak._speedups, part: the files' verdicts and the stack walks (capture, walk, chain_complete).
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

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
