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
