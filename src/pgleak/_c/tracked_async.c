/* pgleak._speedups, part: the asyncio wrappers: AACQUIRE, ARELEASE, HOLDER_RELEASE.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

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
 * ``_con`` is a slot's member descriptor (asyncpg's PoolConnectionProxy: its ``__getattr__``
 * hook makes the generic read ~300 instructions), kept while the class is unchanged since it
 * was found (kept_slot, in observed.c: no type lookup a checkout); else the generic read.
 * A new reference, or NULL with an error. */
static kept_slot proxy_con_slot;

static PyObject *
proxy_con(Tracked *w, PyObject *proxy)
{
    PyTypeObject *type = Py_TYPE(proxy);
    if ((PyObject *)type == w->proxy_type) {
        PyObject *con = kept_slot_get(&proxy_con_slot, proxy);
        if (con != NULL) {
            return con;
        }
        PyObject *descr = _PyType_Lookup(type, s_con); /* borrowed */
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
            && PyType_IsSubtype(type, PyDescr_TYPE(descr))) {
            kept_slot_learn(&proxy_con_slot, type, s_con);
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
static PGLEAK_COLD void
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
    if (w->tags_dict != NULL && !call_site_off(w)) {
        goto python;
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

/* The holder's ``_in_use`` and ``_con`` slots, kept (see kept_slot, in observed.c): while the
 * holder's class is the one whose member descriptors were found, unchanged since, each read is
 * the slot's load, not optional_attr()'s type lookup (whose cache lines and, when its entry
 * was taken by another type's name, its walk of the class's MRO cost 70 to 200 instructions a
 * read, twice a checkin). */
static kept_slot holder_in_use, holder_con;

/* optional_attr() for one of the holder's kept slots: 1 with the value (a new reference), 0
 * absent, -1 on error. An empty slot is read by name (optional_attr: absent, or __getattr__). */
static inline int
holder_attr(kept_slot *k, PyObject *holder, PyObject *name, PyObject **result)
{
    *result = kept_slot_get(k, holder);
    if (*result != NULL) {
        return 1;
    }
    PyTypeObject *type = Py_TYPE(holder);
    if (type->tp_getattro == PyObject_GenericGetAttr) {
        PyObject *descr = _PyType_Lookup(type, name); /* borrowed */
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
            && PyType_IsSubtype(type, PyDescr_TYPE(descr))) {
            kept_slot_learn(k, type, name);
        }
    }
    return optional_attr(holder, name, result);
}

static PyObject *
holder_release_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) < 1) {
        return PyObject_Vectorcall(w->python, args, nargsf, kwnames);
    }
    PyObject *holder = args[0], *in_use = NULL, *con = NULL, *lease = NULL;
    /* the template's ``getattr(holder, "_in_use", None)``, ``getattr(holder, "_con", None)`` */
    if (holder_attr(&holder_in_use, holder, s_in_use, &in_use) < 0) {
        report_fault(w);
    }
    else if (in_use != NULL && in_use != Py_None) {
        if (holder_attr(&holder_con, holder, s_con, &con) < 0) {
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
