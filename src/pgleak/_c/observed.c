/* pgleak._speedups, part: an observer's checkout, without the template's frame.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

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

/* An attribute kept in a slot (a ``__slots__`` member), read there directly while the object's
 * class is the one whose member descriptor was found and unchanged since (its version tag: any
 * attribute set on it or a base drops that), else by name: the lookup by name costs a few
 * hundred instructions and the type's lookup cache lines on the hot path. The caller checks
 * that the class reads attributes as ``object`` does before it learns the slot. */
typedef struct {
    PyTypeObject *type; /* borrowed: an address, with its version tag */
    unsigned int tag;
    Py_ssize_t offset;
} kept_slot;

/* The slot's value (a new reference) where it can be read there, else NULL, no error set. */
static inline PyObject *
kept_slot_get(const kept_slot *k, PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type == k->type && k->tag != 0 && type->tp_version_tag == k->tag
        && PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG)) {
        return Py_XNewRef(*(PyObject **)((char *)obj + k->offset));
    }
    return NULL;
}

/* Keep ``type``'s slot for ``name`` if ``name`` is a slot member there (the lookup tags the
 * type); else leave ``k`` as it was. */
static void
kept_slot_learn(kept_slot *k, PyTypeObject *type, PyObject *name)
{
    PyObject *descr = _PyType_Lookup(type, name); /* borrowed */
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
        && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX
        && PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG) && type->tp_version_tag != 0) {
        k->type = type;
        k->tag = type->tp_version_tag;
        k->offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    }
}

/* ``handle.pending`` (PoolHandle keeps it in a slot). A new reference, or NULL with an error
 * set, as PyObject_GetAttr. */
static kept_slot pending_slot;

static PyObject *
handle_pending(PyObject *handle)
{
    PyObject *pending = kept_slot_get(&pending_slot, handle);
    if (pending != NULL) {
        return pending;
    }
    if (Py_TYPE(handle)->tp_getattro == PyObject_GenericGetAttr) {
        kept_slot_learn(&pending_slot, Py_TYPE(handle), s_pending_deque);
    }
    return PyObject_GetAttr(handle, s_pending_deque);
}

/* ``pending.append(None)`` (``append``) or ``pending.pop()``: on a ``collections.deque``
 * (a builtin type: its methods cannot be replaced) its method descriptors called directly,
 * without the lookup by name; on anything else, the call by name. */
static PyTypeObject *pending_deque; /* collections.deque, once looked up */
static PyObject *pending_append, *pending_pop;

static PyObject *
pending_call(PyObject *pending, int append)
{
    if (pending_deque == NULL && strcmp(Py_TYPE(pending)->tp_name, "collections.deque") == 0) {
        PyObject *type = (PyObject *)Py_TYPE(pending);
        PyObject *add = PyObject_GetAttrString(type, "append");
        PyObject *pop = add == NULL ? NULL : PyObject_GetAttrString(type, "pop");
        if (pop != NULL && Py_IS_TYPE(add, &PyMethodDescr_Type)
            && Py_IS_TYPE(pop, &PyMethodDescr_Type)
            && PyType_HasFeature(Py_TYPE(pending), Py_TPFLAGS_IMMUTABLETYPE)) {
            pending_append = Py_NewRef(add);
            pending_pop = Py_NewRef(pop);
            pending_deque = (PyTypeObject *)Py_NewRef(type); /* last: it switches it on */
        }
        Py_XDECREF(add);
        Py_XDECREF(pop);
        PyErr_Clear();
    }
    if (pending_deque != NULL && Py_IS_TYPE(pending, pending_deque)) {
        PyObject *args[2] = {pending, Py_None};
        return PyObject_Vectorcall(append ? pending_append : pending_pop, args, append ? 2 : 1,
                                   NULL);
    }
    return append ? PyObject_CallMethodOneArg(pending, s_append, Py_None)
                  : PyObject_CallMethodNoArgs(pending, s_pop);
}

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
    PyObject *pending = handle_pending(*handle);
    PyObject *done = pending == NULL ? NULL : pending_call(pending, 1);
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
    PyObject *pending = handle_pending(handle);
    PyObject *done = pending == NULL ? NULL : pending_call(pending, 0);
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
        if (handle != NULL) {
            observed_wait_end(w, handle);
        }
        acquire_failed(w, pool, args, nargs, kwnames);
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

/* ``fairy._connection_record``: SQLAlchemy's fairy keeps it in a slot (by name: ~270
 * instructions a checkout). */
static kept_slot fairy_record;

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
    return kept_slot_get(&fairy_record, fairy);
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
        kept_slot_learn(&fairy_record, type, s_connection_record);
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
        sa_checkout_failed(w, pool);
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
