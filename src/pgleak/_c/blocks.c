/* pgleak._speedups, part: asyncpg's and SQLAlchemy's blocks while an observer runs.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

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
    int is = (PyObject *)Py_TYPE(proxy) == w->proxy_type
                 ? 1
                 : PyObject_IsInstance(proxy, w->proxy_type);
    if (is <= 0) {
        if (is < 0) {
            goto fault;
        }
        return 0;
    }
    /* read from its slot where the proxy's ``_con`` is still that slot (~270 instructions
     * twice a block through asyncpg's ``__getattr__`` hook), else by name, as the checkout */
    con = proxy_con(w, proxy);
    if (con == NULL) {
        goto fault;
    }
    if (con == Py_None) {
        Py_DECREF(con);
        return 0;
    }
    PyObject *key = conn_key(con); /* the ledger's own int for it: found by identity */
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
    if (PyWeakref_CheckRef(ref) && Py_TYPE(ref)->tp_call == _PyWeakref_RefType.tp_call) {
        target = ref_target(ref); /* the ledger's _ConnRef too: calling it is this (~130) */
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

/* ``AsyncConnection.sync_connection``: a slot (by name: ~100 instructions, twice a block) */
static kept_slot sync_slot;

static int
sablock_told(Tracked *w, PyObject *connection, int entering)
{
    PyObject *sync = kept_slot_get(&sync_slot, connection);
    if (sync == NULL) {
        if (sa_generic_getattribute(Py_TYPE(connection))) {
            kept_slot_learn(&sync_slot, Py_TYPE(connection), s_sync_connection);
        }
        if (PyObject_GetOptionalAttr(connection, s_sync_connection, &sync) < 0) {
            return -1;
        }
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
