/* pgleak._speedups, part: the sync wrappers' calls, the Tracked type and its constructors.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

static PGLEAK_NOINLINE PyObject *
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
    if (w->tags_dict != NULL && !call_site_off(w)) {
        goto python;
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
    if (PGLEAK_UNLIKELY(conn == NULL)) {
        acquire_failed(w, pool, args, nargs, kwnames);
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

/* A failed checkin call (the error is set, and propagates as it came): unless the pool
 * refused the connection, it is back all the same, the user let go of it (the template's
 * checked_in()). */
static PGLEAK_COLD void
release_failed(Tracked *w, PyObject *lease)
{
    if (lease != NULL && !PyErr_ExceptionMatches(w->refused)) {
        saved_error e;
        error_save(&e);
        tracked_released(w, lease);
        error_restore(&e);
    }
}

static PGLEAK_NOINLINE PyObject *
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
    if (PGLEAK_UNLIKELY(result == NULL)) {
        release_failed(w, lease);
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
static PGLEAK_NOINLINE PyObject *
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
    if (!call_site_off(w)) {
        goto python;
    }
    if (observer != Py_None) {
        return observed_sa_checkout(w, args, nargsf);
    }
    PyObject *pool = args[1];
    Py_INCREF(pool);
    PyObject *fairy = PyObject_Vectorcall(w->original, args, nargsf, NULL);
    if (PGLEAK_UNLIKELY(fairy == NULL)) {
        sa_checkout_failed(w, pool);
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
static PGLEAK_NOINLINE PyObject *
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
static PGLEAK_NOINLINE PyObject *
retry_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        goto python;
    }
    if (!call_site_off(w)) {
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
static PGLEAK_NOINLINE PyObject *
aacquire_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames);
static PGLEAK_NOINLINE PyObject *
arelease_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames);
static PGLEAK_NOINLINE PyObject *
holder_release_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames);
static PGLEAK_NOINLINE PyObject *
ablock_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames);
static PGLEAK_NOINLINE PyObject *
scope_open_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames);
static PGLEAK_NOINLINE PyObject *
sblock_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames);

/* Each mode's call is a function of its own (not inlined here): a call touches only its own
 * mode's code, on lines of its own, and saves only the registers that mode needs. */
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
