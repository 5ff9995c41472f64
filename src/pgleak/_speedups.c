/* pgleak._speedups: the checkout hot path, in C - the stack walk and the ledger.
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
 * methods. pgleak runs all of it in Python when this module is absent (no compiler at install
 * time) or disabled (``PGLEAK_NO_SPEEDUPS=1``).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <structmember.h>

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
    PyFrameObject *frame = (PyFrameObject *)Py_NewRef(start);
    int status = 1;
    /* Neighbouring frames are often of one file: its verdict is not looked up again (the
     * file name is the cache's key, so the same object gives the same answer). */
    PyObject *last_file = NULL;
    long last_verdict = UNKNOWN;
    while (frame != NULL) {
        if (PyList_GET_SIZE(out) >= 2 * limit) {
            status = 0;
            break;
        }
        PyCodeObject *code = PyFrame_GetCode(frame);
        long verdict;
        if (code->co_filename == last_file) {
            verdict = last_verdict;
        }
        else {
            verdict = verdict_of(cache, pseudo, code);
            if (verdict >= 0) { /* a file's verdict, not a pseudo-file's per-code one */
                last_file = code->co_filename;
                last_verdict = verdict;
            }
            else {
                last_file = NULL;
            }
        }
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
        if (chain_link(coro, s_cr_frame, s_gi_frame, 1, &frame) < 0) {
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
        if (chain_link(coro, s_cr_await, s_gi_yieldfrom, 0, &next) < 0) {
            Py_DECREF(coro);
            return NULL;
        }
        Py_SETREF(coro, next);
    }
    Py_XDECREF(coro);
    return PyBool_FromLong(complete);
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
static PyObject *b_get_running_loop, *b_current_task, *b_monotonic;
static PyObject *b_thread_identity, *b_core_globals;
static PyObject *b_capture_from, *b_capture_in_task, *b_skip_cache, *b_pseudo;
static PyObject *b_parent_greenlet_frame, *b_add_task_chain;
static PyObject *b_checkout_py, *b_checkin_py, *b_returned;
static int bound = 0;

static PyObject *s_settings, *s_enabled, *s_max_tracked, *s_leak_threshold, *s_capture_stack,
    *s_stack_depth, *s_leases, *s_by_conn, *s_ids, *s_watchdog, *s_thread, *s_observer,
    *s_waker, *s_collected, *s_get_name, *s_generation, *s_pending,
    *s_after_checkout, *s_forget, *s_on_collected, *s_wake_gate, *s_thread_key, *s_append,
    *s_get_coro, *s_observe_checkin;

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

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
    lease_type = (PyTypeObject *)lease;
    connref_type = (PyTypeObject *)connref;
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
thread_identity(void)
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

PyDoc_STRVAR(forget_thread_doc,
"forget_thread() -> None\n\nDrop this thread's cached identity (in a forked child).");

static PyObject *
forget_thread(PyObject *module, PyObject *unused)
{
    PyObject *dict = PyThreadState_GetDict();
    if (dict != NULL && PyDict_DelItem(dict, s_thread_key) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
            return NULL;
        }
        PyErr_Clear();
    }
    Py_RETURN_NONE;
}

/* pgleak._stack._capture_in_task(frame, limit, task, False), step for step, for the common
 * case: the walk's caches know every frame (status 3, a frame to judge, hands the whole capture
 * back to Python: None), greenlet boundaries are crossed by the Python helper, and the task's
 * coroutine chain is merged by Python only when chain_complete() says the walk missed one of
 * its frames. Every asyncio checkout runs this; in Python it was ~10,000 instructions. */
static PyObject *
task_capture(PyObject *start, PyObject *depth, PyObject *task)
{
    Py_ssize_t limit = PyLong_AsSsize_t(depth);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    PyObject *greenlets = NULL;
    PyObject *frame = Py_NewRef(start);
    Py_ssize_t loop_at = -1;
    int hops = 0;
    while (frame != NULL && frame != Py_None) {
        if (!PyFrame_Check(frame)) { /* a greenlet's gr_frame that is not one: Python's turn */
            goto python;
        }
        PyObject *args[5] = {frame, depth, b_skip_cache, b_pseudo, out};
        PyObject *res = walk(NULL, args, 5);
        Py_CLEAR(frame);
        if (res == NULL) {
            goto error;
        }
        long status = PyLong_AsLong(PyTuple_GET_ITEM(res, 0));
        frame = Py_NewRef(PyTuple_GET_ITEM(res, 1));
        Py_DECREF(res);
        if (status == 0) {
            goto done;
        }
        if (status == 2) {
            loop_at = PyList_GET_SIZE(out);
            break;
        }
        if (status != 1) {
            goto python;
        }
        /* the chain ended: the suspended parent greenlet's frames come next, if any */
        Py_CLEAR(frame);
        if (PyList_GET_SIZE(out) >= 2 * limit) {
            goto done;
        }
        if (hops < 8) {
            hops++;
            if (greenlets == NULL && (greenlets = PyList_New(0)) == NULL) {
                goto error;
            }
            frame = PyObject_CallOneArg(b_parent_greenlet_frame, greenlets);
            if (frame == NULL) {
                goto error;
            }
        }
    }
    Py_CLEAR(frame);
    /* _add_task_chain(): nothing to add when the walk saw every frame of the chain */
    PyObject *coro = PyObject_CallMethodNoArgs(task, s_get_coro);
    if (coro == NULL) {
        PyErr_Clear(); /* as _add_task_chain: a best-effort completion */
        goto truncate;
    }
    PyObject *cargs[4] = {out, coro, b_skip_cache, b_pseudo};
    PyObject *complete = chain_complete(NULL, cargs, 4);
    Py_DECREF(coro);
    if (complete == NULL) {
        goto error;
    }
    int whole = complete == Py_True;
    Py_DECREF(complete);
    if (!whole) {
        PyObject *at = PyLong_FromSsize_t(loop_at);
        if (at == NULL) {
            goto error;
        }
        PyObject *added = PyObject_CallFunctionObjArgs(b_add_task_chain, out, task, at, NULL);
        Py_DECREF(at);
        if (added == NULL) {
            goto error;
        }
        Py_DECREF(added);
    }
truncate:
    if (PyList_GET_SIZE(out) > 2 * limit
        && PyList_SetSlice(out, 2 * limit, PyList_GET_SIZE(out), NULL) < 0) {
        goto error;
    }
done:
    Py_XDECREF(frame);
    Py_XDECREF(greenlets);
    PyObject *result = PyList_AsTuple(out);
    Py_DECREF(out);
    return result;
python:
    Py_XDECREF(frame);
    Py_XDECREF(greenlets);
    Py_DECREF(out);
    Py_RETURN_NONE;
error:
    Py_XDECREF(frame);
    Py_XDECREF(greenlets);
    Py_DECREF(out);
    return NULL;
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

/* The raw stack for a checkout made by the caller's caller (the adapter's wrapper). */
static PyObject *
checkout_stack(PyObject *task)
{
    PyObject *depth = set_stack_depth;
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed: the wrapper's frame */
    if (frame == NULL) {
        return PyTuple_New(0);
    }
    PyObject *raw;
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
    PyObject *loop = NULL, *result = NULL;
    Py_INCREF(task);

    settings = live(core, s_settings);
    if (settings == NULL || read_settings(settings) < 0) {
        goto done;
    }
    if (!set_enabled) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    value = var_get(b_suppressed);
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
    value = var_get(b_allowance);
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
    loop = PyObject_CallNoArgs(b_get_running_loop);
    if (loop == NULL) {
        goto done;
    }
    if (loop != Py_None) {
        Py_SETREF(task, PyObject_CallOneArg(b_current_task, loop));
        if (task == NULL) {
            goto done;
        }
    }
    PyObject *t0 = PyObject_CallNoArgs(b_monotonic);
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
     * seen with an unset slot (which would raise AttributeError wherever it is read). */
    PyObject *generation = PyDict_GetItemWithError(b_core_globals, s_generation);
    slot_set(lease, lease_off[L_GENERATION], Py_NewRef(generation ? generation : Py_None));
    slot_set(lease, lease_off[L_ID], Py_NewRef(Py_None));
    slot_set(lease, lease_off[L_POOL], Py_NewRef(pool));
    slot_set(lease, lease_off[L_T0], t0);
    slot_set(lease, lease_off[L_DEADLINE], PyFloat_FromDouble(t0_d + threshold));
    slot_set(lease, lease_off[L_THREAD], thread);
    slot_set(lease, lease_off[L_RAW], PyTuple_New(0));
    slot_set(lease, lease_off[L_TASK], Py_NewRef(Py_None));
    slot_set(lease, lease_off[L_REF], Py_NewRef(Py_None));
    slot_set(lease, lease_off[L_CONTEXT], Py_NewRef(Py_None));
    slot_set(lease, lease_off[L_PROBE], Py_NewRef(Py_None));
    slot_set(lease, lease_off[L_KEY], Py_NewRef(Py_None));
    slot_set(lease, lease_off[L_FLAGGED], Py_NewRef(Py_False));
    slot_set(lease, lease_off[L_REPORTED], Py_NewRef(Py_False));
    slot_set(lease, lease_off[L_T_IN], Py_NewRef(Py_None));
    slot_set(lease, lease_off[L_OTEL], Py_NewRef(Py_None));
    slot_set(lease, lease_off[L_SELF_RETURNING], Py_NewRef(extra == Py_HUGE_VAL ? Py_True : Py_False));
    slot_set(lease, lease_off[L_CLOSED], Py_NewRef(Py_None));
    slot_set(lease, lease_off[L_UNSEEN_CLOSE], Py_NewRef(Py_False));
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
        PyObject *name = PyObject_CallMethodNoArgs(task, s_get_name);
        if (name == NULL) {
            goto done;
        }
        PyObject *ref = PyWeakref_NewRef(task, NULL);
        if (ref == NULL) {
            Py_DECREF(name);
            goto done;
        }
        PyObject *pair = PyTuple_Pack(2, ref, name);
        Py_DECREF(ref);
        Py_DECREF(name);
        if (pair == NULL) {
            goto done;
        }
        slot_set(lease, lease_off[L_TASK], pair);
    }
    value = var_get(b_context);
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
        PyObject *cargs[2] = {conn, collected};
        PyObject *ref = PyObject_Vectorcall((PyObject *)connref_type, cargs, 2, NULL);
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
            PyObject *key = PyLong_FromVoidPtr(conn);
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
                PyObject *stale = PyDict_GetItemWithError(by_conn, key); /* borrowed */
                if (stale == NULL && PyErr_Occurred()) {
                    Py_DECREF(by_conn);
                    Py_DECREF(key);
                    goto done;
                }
                if (stale != NULL && Py_IS_TYPE(stale, lease_type)) {
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
                int failed = PyDict_SetItem(by_conn, key, lease);
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
     * one attribute check each decides whether to call it. */
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
    if (later) {
        value = PyObject_CallMethodObjArgs(core, s_after_checkout, lease, since, NULL);
        if (value == NULL) {
            goto done;
        }
        Py_CLEAR(value);
    }
    result = Py_NewRef(lease);
done:
    Py_XDECREF(settings);
    Py_XDECREF(leases);
    Py_XDECREF(loop);
    Py_XDECREF(task);
    Py_XDECREF(lease);
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
    PyObject *generation = PyDict_GetItemWithError(b_core_globals, s_generation);
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
    PyObject *now = PyObject_CallNoArgs(b_monotonic);
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
    PyObject *observer = live(core, s_observer);
    if (observer == NULL) {
        return NULL;
    }
    int observed = observer != Py_None;
    Py_DECREF(observer);
    if (observed) {
        /* Every traced checkin: the name interned, no format string to parse. */
        return PyObject_CallMethodObjArgs(core, s_observe_checkin, lease,
                                          late ? Py_True : Py_False, Py_False, NULL);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"capture", (PyCFunction)(void (*)(void))capture, METH_FASTCALL, capture_doc},
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL, walk_doc},
    {"chain_complete", (PyCFunction)(void (*)(void))chain_complete, METH_FASTCALL,
     chain_complete_doc},
    {"capture_task", (PyCFunction)(void (*)(void))capture_task, METH_FASTCALL,
     capture_task_doc},
    {"bind", bind, METH_O, bind_doc},
    {"adopt", adopt, METH_O, adopt_doc},
    {"forget_thread", forget_thread, METH_NOARGS, forget_thread_doc},
    {"checkout", (PyCFunction)(void (*)(void))ledger_checkout, METH_FASTCALL | METH_KEYWORDS,
     checkout_doc},
    {"checkin", (PyCFunction)(void (*)(void))ledger_checkin, METH_FASTCALL | METH_KEYWORDS,
     checkin_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pgleak._speedups",
    .m_doc = "The checkout stack walk and ledger, in C (see pgleak/_stack.py, pgleak/_core.py).",
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
        {&s_get_coro, "get_coro"}, {&s_observe_checkin, "_observe_checkin"},
    };
    for (size_t i = 0; i < sizeof(interned) / sizeof(interned[0]); i++) {
        *interned[i].slot = PyUnicode_InternFromString(interned[i].text);
        if (*interned[i].slot == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&speedups);
}
