/* pgleak._speedups, part: the checkout and checkin wrappers (Tracked): shared parts.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

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
static PGLEAK_COLD void
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

/* ---- "Call-site tags off?", kept ---------------------------------------------------------
 *
 * Every checkout wrapper reads ``tags.call_site`` (on: the template tags the connection with
 * its line): a dict lookup of the tags' instance dict per checkout, whose answer changes only
 * when pgleak is configured. The answer "off" (None or False) is kept for that dict while it is
 * unchanged: up to 3.11 while its version tag is (tags are unique and change with every change
 * to the dict), on 3.12 until a dict watcher hears of any change to it. Not from 3.13, where
 * the instance's attributes are stored in the object itself (its type has no slot for its
 * dict; see calm.c) and no watcher hears of those stores: read every time, as before. */
/* the dict whose call_site was off (borrowed: only compared), or NULL */
static PyObject *tags_kept;
#if PY_VERSION_HEX < 0x030C0000
static uint64_t tags_kept_tag;
#elif PY_VERSION_HEX < 0x030D0000
static int tags_watcher = -1;

static int
tags_changed(PyDict_WatchEvent event, PyObject *dict, PyObject *key, PyObject *new_value)
{
    (void)event, (void)key, (void)new_value;
    if (dict == tags_kept) {
        tags_kept = NULL;
    }
    return 0;
}
#endif

/* Whether ``w``'s call-site tags are off: 1, or 0 (on, or not readable: the template's). */
static inline int
call_site_off(Tracked *w)
{
    PyObject *dict = w->tags_dict;
#if PY_VERSION_HEX < 0x030C0000
    if (dict == tags_kept && ((PyDictObject *)dict)->ma_version_tag == tags_kept_tag) {
        return 1;
    }
#elif PY_VERSION_HEX < 0x030D0000
    if (dict == tags_kept) {
        return 1;
    }
#endif
    PyObject *call_site = PyDict_GetItemWithError(dict, s_call_site);
    if (call_site == NULL || (call_site != Py_None && call_site != Py_False)) {
        PyErr_Clear();
        return 0;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyDict_CheckExact(dict)) {
        tags_kept = dict;
        tags_kept_tag = ((PyDictObject *)dict)->ma_version_tag;
    }
#elif PY_VERSION_HEX < 0x030D0000
    if (PyDict_CheckExact(dict)) {
        if (tags_watcher < 0) {
            tags_watcher = PyDict_AddWatcher(tags_changed);
        }
        if (tags_watcher >= 0 && PyDict_Watch(tags_watcher, dict) == 0) {
            tags_kept = dict;
        }
        PyErr_Clear();
    }
#endif
    return 1;
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

/* The template's ``except BaseException`` after a failed checkout call (the error is set):
 * gave_up() says whether the wait ran out; the error propagates as it came. */
static PGLEAK_COLD void
acquire_failed(Tracked *w, PyObject *pool, PyObject *const *args, Py_ssize_t nargs,
               PyObject *kwnames)
{
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
}

/* SQLAlchemy's ``_checkout`` failed (the error is set, and propagates as it came): a
 * ``refused`` error (TimeoutError) goes to ``gave_up``. */
static PGLEAK_COLD void
sa_checkout_failed(Tracked *w, PyObject *pool)
{
    if (PyErr_ExceptionMatches(w->refused)) {
        saved_error e;
        error_save(&e);
        PyObject *done = PyObject_CallFunctionObjArgs(w->gave_up, pool, e.value, NULL);
        Py_XDECREF(done);
        PyErr_Clear();
        error_restore(&e);
    }
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
