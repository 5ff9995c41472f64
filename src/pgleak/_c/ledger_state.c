/* pgleak._speedups, part: the ledger's binding to pgleak._core, its settings, the thread's identity.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

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

/* The weak references of freed leases to connections still alive, kept by the connection's
 * address for its next checkout: a pool lends the same few connection objects again and
 * again (psycopg's, psycopg2's, asyncpg's Connection: the leases filed by connection), and
 * a _ConnRef made and freed each cycle cost ~480 instructions (weakref's __new__, its
 * dealloc). One is kept only when nothing but the freed lease held it (no other lease, no
 * report, no observer can read its ``lease_id`` again), and handed out only to a checkout of
 * the same connection with the same callback, with nothing else holding it; the checkout sets
 * its ``lease_id`` and ``key``. While kept, it is what it was: if the connection is collected
 * meanwhile, its callback queues its old lease id, which the watchdog finds in no ledger and
 * drops (as it drops a late one today). */
#define SPARE_REFS 8
static PyObject *spare_refs[SPARE_REFS]; /* strong, or NULL */

/* The kept reference to ``conn`` with callback ``callback`` (handed over: a new reference),
 * or NULL. */
static inline PyObject *
connref_spare(PyObject *conn, PyObject *callback)
{
    size_t i = ((uintptr_t)conn >> 4) % SPARE_REFS;
    PyObject *ref = spare_refs[i];
    if (ref != NULL && ((PyWeakReference *)ref)->wr_object == conn
        && ((PyWeakReference *)ref)->wr_callback == callback && Py_REFCNT(ref) == 1) {
        spare_refs[i] = NULL;
        return ref;
    }
    return NULL;
}

/* Keep ``ref`` (stolen), a freed lease's, if it can be handed out again; else drop it. */
static void
connref_keep(PyObject *ref)
{
    PyObject *target = ((PyWeakReference *)ref)->wr_object;
    if (Py_IS_TYPE(ref, connref_type) && connref_plain && Py_REFCNT(ref) == 1
        && target != NULL && target != Py_None) {
        Py_XSETREF(spare_refs[((uintptr_t)target >> 4) % SPARE_REFS], ref);
        return;
    }
    Py_DECREF(ref);
}

PyDoc_STRVAR(connrefs_kept_doc,
"connrefs_kept() -> list\n\nThe freed leases' weak references kept for the next checkouts (tests).");

static PyObject *
connrefs_kept(PyObject *module, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    for (int i = 0; out != NULL && i < SPARE_REFS; i++) {
        if (spare_refs[i] != NULL && PyList_Append(out, spare_refs[i]) < 0) {
            Py_CLEAR(out);
        }
    }
    return out;
}

/* Lease's tp_dealloc. A slotted Python class is freed by the generic subtype_dealloc, which
 * looks for finalizers, weak references and a __dict__ the class does not have and clears the
 * slots by walking their member definitions: ~300 instructions a lease on the hot path. This
 * does what subtype_dealloc comes to for Lease (no __del__, no __weakref__, no __dict__, its
 * base ``object``): untrack, drop the 19 slots, free, drop the instance's reference to its
 * type. A subclass's instance (none in pgleak) reaches it from subtype_dealloc, which has
 * cleared the subclass's own slots and left the type's reference to the base it calls. */
/* The last few Leases freed, kept for the next checkouts (lease_alloc()): a lease lives one
 * checkout, so each cycle freed one block and allocated another of the same size (obmalloc's
 * free and malloc, the object's zeroing, the collector's link and unlink: ~170 instructions a
 * cycle). A kept lease is untracked, its slots all NULL, and keeps the reference to its type
 * an instance holds (Lease itself only: never a subclass's instance). */
#define LEASE_FREE_MAX 4
static PyObject *lease_free[LEASE_FREE_MAX];
static int lease_nfree = 0;

static void
lease_dealloc(PyObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    PyObject *ref = SLOT(self, lease_off[L_REF]);
    PyObject *key = SLOT(self, lease_off[L_KEY]);
    if (ref != NULL && Py_REFCNT(ref) == 1 && key != NULL && key != Py_None) {
        SLOT(self, lease_off[L_REF]) = NULL;
        connref_keep(ref); /* a lease filed by its connection: the connection comes back */
    }
    for (int i = 0; i < L_COUNT; i++) {
        Py_CLEAR(SLOT(self, lease_off[i]));
    }
    if (type == lease_type && lease_nfree < LEASE_FREE_MAX) {
        lease_free[lease_nfree++] = self; /* kept, with its reference to Lease */
        return;
    }
    type->tp_free(self);
    Py_DECREF(type);
}

/* A new Lease, its slots NULL, tracked by the collector: a kept one, or a fresh one. */
static inline PyObject *
lease_alloc(void)
{
    if (PGLEAK_LIKELY(lease_nfree > 0)) {
        PyObject *lease = lease_free[--lease_nfree];
        _Py_NewReference(lease);
        PyObject_GC_Track(lease);
        return lease;
    }
    return PyType_GenericAlloc(lease_type, 0);
}

PyDoc_STRVAR(leases_kept_doc,
"leases_kept() -> int\n\nHow many freed Leases are kept for the next checkouts (tests).");

static PyObject *
leases_kept(PyObject *module, PyObject *unused)
{
    return PyLong_FromLong(lease_nfree);
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
