/* pgleak._speedups, part: the awaitables that stand in for pgleak's coroutines.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

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
