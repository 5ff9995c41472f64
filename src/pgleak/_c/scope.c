/* pgleak._speedups, part: a checkout's with block (Scope).
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

/* ---- a checkout's ``with`` block, its sync half in C (issue 12) ------------------------
 *
 * ``Adapter.track_scope`` (psycopg_pool's ``connection()``) hands the user a ``_Scope`` around
 * the library's context manager, so that the checkout's span is current inside the block. Its
 * ``__enter__`` and ``__exit__`` were two Python frames of pgleak's on every traced block
 * (with the lease's lookup and the observer's call, ~3,000 instructions a cycle); ``Scope``
 * is the base class of its C flavour (pgleak._adapter._CScope), whose Python subclass adds the
 * class attributes (``_kind``, ``_lease_of``) and the asyncio methods. The same steps as
 * ``_Scope.__enter__`` / ``__exit__``, in the same order; a fault (an ``Exception``) goes to
 * ``internal_error("<kind>.scope", exc)``, anything else propagates, as there. */

typedef struct {
    PyObject_HEAD
    PyObject *cm;    /* _cm: the library's context manager */
    PyObject *lease; /* _lease: the checkout's lease, once entered (NULL: None) */
} Scope;

/* scope_bind()'s: pgleak._core.core, its by_conn dict, pgleak._guard.internal_error */
static PyObject *sc_core, *sc_by_conn, *sc_internal_error;
static PyObject *s_sc_enter, *s_sc_exit, *s_sc_lease_of, *s_sc_kind, *s_sc_oenter, *s_sc_oexit;
static PyObject *s_sc_aenter, *s_sc_aexit;

/* The current exception, if an Exception: handed to internal_error("<kind>.scope", exc), 0;
 * anything else: left set, -1. */
static int
scope_fault(PyObject *self)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    saved_error e;
    error_save(&e);
    PyObject *kind = PyObject_GetAttr(self, s_sc_kind);
    PyObject *site = kind == NULL ? NULL : PyUnicode_FromFormat("%S.scope", kind);
    Py_XDECREF(kind);
    if (site != NULL && e.value != NULL) {
        PyObject *done = PyObject_CallFunctionObjArgs(sc_internal_error, site, e.value, NULL);
        Py_XDECREF(done);
    }
    Py_XDECREF(site);
    PyErr_Clear(); /* internal_error never raises; if it did, the block must still go on */
    error_drop(&e);
    return 0;
}

/* ``_Scope._entered(conn)``: the lease found, kept, and the observer told. 0, or -1 with an
 * error set (not an Exception: those are reported). */
static int
scope_entered(Scope *self, PyObject *conn)
{
    PyObject *lease = NULL, *observer = NULL;
    PyObject *lease_of = PyObject_GetAttr((PyObject *)self, s_sc_lease_of);
    if (lease_of == NULL) {
        goto fault;
    }
    if (lease_of == Py_None) { /* core.lease_of(), inlined */
        Py_DECREF(lease_of);
        PyObject *key = PyLong_FromVoidPtr(conn);
        if (key == NULL) {
            goto fault;
        }
        lease = PyDict_GetItemWithError(sc_by_conn, key);
        Py_DECREF(key);
        if (lease == NULL && PyErr_Occurred()) {
            goto fault;
        }
        lease = Py_NewRef(lease == NULL ? Py_None : lease);
        if (lease != Py_None) {
            PyObject *ref = PyObject_GetAttr(lease, s_ref);
            if (ref == NULL) {
                goto fault;
            }
            int same = 0;
            if (ref != Py_None) {
                PyObject *target = PyObject_CallNoArgs(ref);
                if (target == NULL) {
                    Py_DECREF(ref);
                    goto fault;
                }
                same = target == conn;
                Py_DECREF(target);
            }
            Py_DECREF(ref);
            if (!same) {
                Py_SETREF(lease, Py_NewRef(Py_None));
            }
        }
    }
    else {
        lease = PyObject_CallOneArg(lease_of, conn);
        Py_DECREF(lease_of);
        if (lease == NULL) {
            goto fault;
        }
    }
    Py_XSETREF(self->lease, lease); /* self._lease = lease */
    lease = NULL;
    observer = PyObject_GetAttr(sc_core, s_observer);
    if (observer == NULL) {
        goto fault;
    }
    if (observer != Py_None && self->lease != NULL && self->lease != Py_None) {
        PyObject *done = trace_told(observer, s_sc_oenter, self->lease, 1);
        if (done == NULL) {
            goto fault;
        }
        Py_DECREF(done);
    }
    Py_DECREF(observer);
    return 0;
fault:
    Py_XDECREF(lease);
    Py_XDECREF(observer);
    return scope_fault((PyObject *)self);
}

static PyObject *
scope_enter(Scope *self, PyObject *Py_UNUSED(ignored))
{
    if (self->cm == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_cm");
        return NULL;
    }
    PyObject *conn = PyObject_CallMethodNoArgs(self->cm, s_sc_enter);
    if (conn == NULL) {
        return NULL;
    }
    if (scope_entered(self, conn) < 0) {
        Py_DECREF(conn);
        return NULL;
    }
    return conn;
}

/* ``exit_scope(self._lease, self._kind)``, inlined: 0, or -1 with an error set (not an
 * Exception: those are reported). */
static int
scope_exited(Scope *self)
{
    PyObject *lease = self->lease;
    if (lease != NULL && lease != Py_None) { /* exit_scope(), inlined */
        PyObject *observer = PyObject_GetAttr(sc_core, s_observer);
        PyObject *done = NULL;
        if (observer != NULL && observer != Py_None) {
            Py_INCREF(lease);
            done = trace_told(observer, s_sc_oexit, lease, 0);
            Py_DECREF(lease);
        }
        else if (observer != NULL) {
            done = Py_NewRef(Py_None);
        }
        Py_XDECREF(observer);
        if (done == NULL && scope_fault((PyObject *)self) < 0) {
            return -1;
        }
        Py_XDECREF(done);
    }
    return 0;
}

static PyObject *
scope_exit(Scope *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "__exit__(typ, value, tb)");
        return NULL;
    }
    if (self->cm == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_cm");
        return NULL;
    }
    if (scope_exited(self) < 0) {
        return NULL;
    }
    return PyObject_CallMethodObjArgs(self->cm, s_sc_exit, args[0], args[1], args[2], NULL);
}

/* The asyncio half (``_Scope.__aenter__`` / ``__aexit__``), without their two coroutines: the
 * library's ``__aenter__`` awaitable inside an Awaiting that enters the scope (``_entered``)
 * when it returns, in the awaiting task; ``__aexit__`` leaves the scope at once and hands back
 * the library's ``__aexit__`` awaitable itself. ``async with`` awaits what it gets at once, so
 * the steps run where and in the order the ``async def`` ran them. */
static int
scope_awaited(PyObject *scope, PyObject *conn)
{
    return scope_entered((Scope *)scope, conn);
}

static PyObject *
scope_aenter(Scope *self, PyObject *Py_UNUSED(ignored))
{
    if (self->cm == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_cm");
        return NULL;
    }
    PyObject *awaitable = PyObject_CallMethodNoArgs(self->cm, s_sc_aenter);
    if (awaitable == NULL) {
        return NULL;
    }
    PyObject *it = awaitable_iter(awaitable);
    Py_DECREF(awaitable);
    if (it == NULL) {
        return NULL;
    }
    Awaiting *made = PyObject_GC_New(Awaiting, &Awaiting_Type);
    if (made == NULL) {
        Py_DECREF(it);
        return NULL;
    }
    made->it = it;
    made->spec = NULL;
    made->target = Py_NewRef((PyObject *)self);
    made->args = made->kwargs = made->handle = made->since = NULL;
    made->mode = AW_SCOPE;
    PyObject_GC_Track(made);
    return (PyObject *)made;
}

static PyObject *
scope_aexit(Scope *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "__aexit__(typ, value, tb)");
        return NULL;
    }
    if (self->cm == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_cm");
        return NULL;
    }
    if (scope_exited(self) < 0) {
        return NULL;
    }
    return PyObject_CallMethodObjArgs(self->cm, s_sc_aexit, args[0], args[1], args[2], NULL);
}

/* Only ever a static base of heap subclasses: their subtype_traverse / subtype_dealloc visit
 * and release the subclass itself. */
static int
scope_traverse(Scope *self, visitproc visit, void *arg)
{
    Py_VISIT(self->cm);
    Py_VISIT(self->lease);
    return 0;
}

static int
scope_clear(Scope *self)
{
    Py_CLEAR(self->cm);
    Py_CLEAR(self->lease);
    return 0;
}

static void
scope_dealloc(Scope *self)
{
    PyObject_GC_UnTrack(self);
    scope_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef scope_methods[] = {
    {"__enter__", (PyCFunction)scope_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))scope_exit, METH_FASTCALL, NULL},
    {"__aenter__", (PyCFunction)scope_aenter, METH_NOARGS, NULL},
    {"__aexit__", (PyCFunction)(void (*)(void))scope_aexit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef scope_members[] = {
    {"_cm", T_OBJECT, offsetof(Scope, cm), 0, NULL},
    {"_lease", T_OBJECT, offsetof(Scope, lease), 0, NULL},
    {NULL},
};

static PyTypeObject ScopeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgleak._speedups.Scope",
    .tp_basicsize = sizeof(Scope),
    .tp_dealloc = (destructor)scope_dealloc,
    .tp_free = PyObject_GC_Del,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The sync half of pgleak._adapter._Scope, as a base class (see scope_bind).",
    .tp_traverse = (traverseproc)scope_traverse,
    .tp_clear = (inquiry)scope_clear,
    .tp_methods = scope_methods,
    .tp_members = scope_members,
    .tp_new = PyType_GenericNew,
};

PyDoc_STRVAR(scope_bind_doc,
"scope_bind(core, by_conn, internal_error)\n\n"
"What ``Scope`` works on: pgleak._core.core, its ``by_conn`` dict, pgleak._guard's\n"
"``internal_error``.");

static PyObject *
scope_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "scope_bind(core, by_conn: dict, internal_error)");
        return NULL;
    }
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&s_sc_enter, "__enter__"}, {&s_sc_exit, "__exit__"}, {&s_sc_lease_of, "_lease_of"},
        {&s_sc_kind, "_kind"}, {&s_sc_oenter, "enter"}, {&s_sc_oexit, "exit"},
        {&s_sc_aenter, "__aenter__"}, {&s_sc_aexit, "__aexit__"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL) {
            *names[i].slot = PyUnicode_InternFromString(names[i].text);
            if (*names[i].slot == NULL) {
                return NULL;
            }
        }
    }
    Py_XSETREF(sc_core, Py_NewRef(args[0]));
    Py_XSETREF(sc_by_conn, Py_NewRef(args[1]));
    Py_XSETREF(sc_internal_error, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

/* ``Adapter.track_scope``'s wrapper (pgleak._adapter._SCOPE) as a Tracked object (SCOPE_OPEN):
 * the library's context manager as it is without an observer, else inside a new scope of
 * the class it was made with (``_cm`` the library's, ``_lease`` None), no ``__init__`` called;
 * no frame of pgleak's around ``pool.connection()``. */
static PyObject *
scope_open_call(Tracked *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *cm = PyObject_Vectorcall(w->original, args, nargsf, kwnames);
    if (cm == NULL) {
        return NULL;
    }
    PyObject *observer = PyDict_GetItemWithError(w->core_dict, s_observer);
    if (observer == NULL) { /* no such attribute: as the template's ``core.observer`` */
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_AttributeError, s_observer);
        }
        Py_DECREF(cm);
        return NULL;
    }
    if (observer == Py_None) {
        return cm;
    }
    PyTypeObject *type = (PyTypeObject *)w->proxy_type;
    Scope *scope = (Scope *)type->tp_alloc(type, 0);
    if (scope == NULL) {
        Py_DECREF(cm);
        return NULL;
    }
    scope->cm = cm;
    scope->lease = Py_NewRef(Py_None);
    return (PyObject *)scope;
}

PyDoc_STRVAR(scope_wrapper_doc,
"scope_wrapper(original, python, core, scope_type) -> Tracked\n\n"
"``Adapter.track_scope``'s wrapper of ``original`` (pgleak._adapter._SCOPE, compiled as\n"
"``python``): its context manager, inside a new ``scope_type`` (a subclass of ``Scope``)\n"
"while an observer runs.");

static PyObject *
scope_wrapper(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyType_Check(args[3])
        || !PyType_IsSubtype((PyTypeObject *)args[3], &ScopeType)
        || ((PyTypeObject *)args[3])->tp_basicsize != ScopeType.tp_basicsize || !bound) {
        PyErr_SetString(PyExc_TypeError, "scope_wrapper(): bad arguments, or not bound");
        return NULL;
    }
    Tracked *w = tracked_new(SCOPE_OPEN);
    if (w == NULL) {
        return NULL;
    }
    w->original = Py_NewRef(args[0]);
    w->python = Py_NewRef(args[1]);
    w->proxy_type = Py_NewRef(args[3]);
    if (tracked_core(w, args[2], s_checkout) < 0) {
        Py_DECREF(w);
        return NULL;
    }
    return (PyObject *)w;
}
