/* pgleak._speedups, part: a traced checkout's state (_Trace), made in C.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

/* ---- a traced checkout's state, made in C (issue 12) -------------------------------------
 *
 * ``Telemetry.checked_out`` (pgleak._otel) was a Python frame on every traced checkout
 * (~3,500 instructions): in its common case (awake, tracing, no wait time to record, the
 * pool's span attributes known, the API's context variable in use) it only makes the
 * checkout's ``_Trace`` and files it in ``lease.otel``. ``trace_checkout()`` does that here,
 * with the same values in every slot; anything else (a subclass, ``checked_out`` replaced on
 * the class or the instance, a provider to look for, metrics, a pool not yet described, an
 * unset context variable) is the Python method's. Bound by pgleak._otel_fast. */

/* Telemetry's methods that otel_span.c stands in for */
enum { TS_ENTER, TS_EXIT, TS_CHECKED_IN, TS_START, TS_COUNT };

/* The dict lookups trace_checkout() and otel_span.c's functions repeat on every call
 * (Telemetry's methods, the observer's own attributes, pgleak._otel's globals, the API's
 * provider globals: five to nine a call, ~100 instructions each) are
 * remembered while the dict is unchanged, by its version tag, which CPython changes on every
 * insertion, deletion and clear and gives no other dict (see the verdict table above): a
 * method replaced, an attribute set, a clock swapped shows at the next call. The value is
 * borrowed: the unchanged dict still holds it. Up to 3.13; later, the dict is asked. */
enum {
    TM_CLASS, TM_INSTANCE = TM_CLASS + TS_COUNT, TM_CONTEXT = TM_INSTANCE + TS_COUNT, TM_TIME_NS,
    TM_MONOTONIC, TM_TRACER, TM_METERING,
    /* trace_checkout()'s */
    TM_CHECKED_OUT, TM_OWN_CHECKED_OUT, TM_TRACING, TM_DORMANT, TM_WATCH_TRACER,
    TM_WATCH_METER, TM_TRACER_PROVIDER, TM_METER_PROVIDER, TM_COUNT
};
#ifdef PGLEAK_VERDICT_TABLE
static struct {
    PyObject *dict; /* borrowed, compared by address only (with the tag, never reused) */
    uint64_t tag;
    PyObject *value; /* borrowed; NULL: absent */
} ts_memo[TM_COUNT];
#endif

/* An instance's dict is remembered too up to 3.12, where the dict made for it replaces the
 * instance's inline values; from 3.13 it shares them, and an attribute set on the instance
 * does not change the dict's version tag. */
#if PY_VERSION_HEX < 0x030D0000
#  define TM_OWN(memo) (memo)
#else
#  define TM_OWN(memo) (-1)
#endif

/* ``dict.get(name)``, borrowed; NULL: absent, or an error set (``memo`` -1: not remembered). */
static inline PyObject *
ts_get(PyObject *dict, PyObject *name, int memo)
{
#ifdef PGLEAK_VERDICT_TABLE
    if (memo < 0) {
        return PyDict_GetItemWithError(dict, name);
    }
    if (ts_memo[memo].dict == dict && ts_memo[memo].tag == dict_version(dict)) {
        return ts_memo[memo].value;
    }
    PyObject *value = PyDict_GetItemWithError(dict, name);
    if (value != NULL || !PyErr_Occurred()) {
        ts_memo[memo].dict = dict;
        ts_memo[memo].tag = dict_version(dict);
        ts_memo[memo].value = value;
    }
    return value;
#else
    (void)memo;
    return PyDict_GetItemWithError(dict, name);
#endif
}

enum { T_CTX, T_DEPTH, T_ENDED, T_OFFSET, T_OUTCOME, T_PARENT, T_SINCE, T_SPAN, T_TOKEN, T_COUNT };
static const char *trace_slots[T_COUNT] = {
    "ctx", "depth", "ended", "offset", "outcome", "parent", "since", "span", "token",
};
static Py_ssize_t trace_off[T_COUNT], info_span_off, handle_observed_off;
/* trace_bind()'s: Telemetry, _Trace, _PoolInfo, PoolHandle; Telemetry.checked_out; the API's
 * context variable; () for object.__new__ */
static PyTypeObject *tb_telemetry, *tb_trace, *tb_info, *tb_handle;
static PyObject *tb_checked_out, *tb_var, *tb_no_args;
static PyObject *s_dormant, *s_tracing, *s_metering, *s_returned_outcome, *tb_zero;

/* trace_bind()'s: the ``opentelemetry.trace`` and ``opentelemetry.metrics._internal`` module
 * dicts (the providers' globals a dormant observer watches) */
static PyObject *tb_globals[2];
static PyObject *s_watch_tracer, *s_watch_meter, *s_tracer_provider, *s_meter_provider;

/* A dormant observer's test, one half (``self.<watch> and getattr(module, name, True) is not
 * None``, in ``dict``): 1 while it is false (nothing to wake), else 0 (the method wakes it). */
static int
trace_quiet(PyObject *dict, PyObject *watch, int memo, PyObject *globals, PyObject *name,
            int global_memo)
{
    PyObject *watching = ts_get(dict, watch, TM_OWN(memo));
    if (watching == Py_False) {
        return 1;
    }
    if (watching != Py_True) {
        return 0;
    }
    return ts_get(globals, name, global_memo) == Py_None;
}

/* 1: ``lease.otel`` made as ``observer.checked_out(lease, since)`` would; 0: that method must
 * run; -1: an error set. */
static int
trace_checkout(PyObject *observer, PyObject *lease, PyObject *since)
{
    if (tb_telemetry == NULL || Py_TYPE(observer) != tb_telemetry || lease_off[L_POOL] == 0) {
        return 0;
    }
    /* every lookup below remembered while its dict is unchanged (ts_get) */
    PyObject *method = ts_get(tb_telemetry->tp_dict, s_checked_out, TM_CHECKED_OUT);
    if (method != tb_checked_out) {
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *dict = PyObject_GenericGetDict(observer, NULL);
    if (dict == NULL) {
        PyErr_Clear();
        return 0;
    }
    int mine = PyDict_CheckExact(dict)
               && ts_get(dict, s_checked_out, TM_OWN(TM_OWN_CHECKED_OUT)) == NULL
               && !PyErr_Occurred() && ts_get(dict, s_tracing, TM_OWN(TM_TRACING)) == Py_True;
    if (mine && since != Py_None) {
        mine = ts_get(dict, s_metering, TM_OWN(TM_METERING)) == Py_False;
    }
    if (mine && ts_get(dict, s_dormant, TM_OWN(TM_DORMANT)) != Py_False) {
        /* the method's first test: a provider it still watches for that is now set */
        mine = trace_quiet(dict, s_watch_tracer, TM_WATCH_TRACER, tb_globals[0],
                           s_tracer_provider, TM_TRACER_PROVIDER)
               && trace_quiet(dict, s_watch_meter, TM_WATCH_METER, tb_globals[1],
                              s_meter_provider, TM_METER_PROVIDER);
    }
    Py_DECREF(dict);
    if (!mine) {
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *handle = SLOT(lease, lease_off[L_POOL]);
    if (handle == NULL || Py_TYPE(handle) != tb_handle) {
        return 0;
    }
    PyObject *info = SLOT(handle, handle_observed_off);
    if (info == NULL || Py_TYPE(info) != tb_info) {
        return 0;
    }
    PyObject *span = SLOT(info, info_span_off);
    if (span == NULL || span == Py_None) {
        return 0; /* the pool's attributes read at this checkout: the Python method's */
    }
    PyObject *parent = NULL;
    if (PyContextVar_Get(tb_var, NULL, &parent) < 0) {
        return -1;
    }
    if (parent == NULL) {
        return 0; /* var.get() raises: the Python method does, and its caller reports it */
    }
    PyObject *state = PyBaseObject_Type.tp_new(tb_trace, tb_no_args, NULL); /* _new(_Trace) */
    if (state == NULL) {
        Py_DECREF(parent);
        return -1;
    }
    /* nothing below runs Python code: the slots are filled before anyone can see the state */
    slot_set(state, trace_off[T_PARENT], parent);
    slot_set(state, trace_off[T_SINCE], Py_NewRef(since));
    slot_set(state, trace_off[T_SPAN], Py_NewRef(Py_None));
    slot_set(state, trace_off[T_TOKEN], Py_NewRef(Py_None));
    slot_set(state, trace_off[T_CTX], Py_NewRef(Py_None));
    slot_set(state, trace_off[T_DEPTH], Py_NewRef(tb_zero));
    slot_set(state, trace_off[T_OFFSET], Py_NewRef(tb_zero));
    slot_set(state, trace_off[T_OUTCOME], Py_NewRef(s_returned_outcome));
    slot_set(state, trace_off[T_ENDED], Py_NewRef(Py_False));
    slot_set(lease, lease_off[L_OTEL], state);
    return 1;
}

PyDoc_STRVAR(trace_bind_doc,
"trace_bind(Telemetry, _Trace, _PoolInfo, PoolHandle, var, trace, metrics) -> None\n\n"
"Let the C ledger make a traced checkout's ``_Trace`` itself (``var``: the API's context\n"
"variable, pgleak._otel._CONTEXT; ``trace``, ``metrics``: the modules whose provider\n"
"globals a dormant observer watches).");

static PyObject *
trace_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyType_Check(args[2])
        || !PyType_Check(args[3]) || !PyContextVar_CheckExact(args[4])
        || !PyModule_CheckExact(args[5]) || !PyModule_CheckExact(args[6])) {
        PyErr_SetString(PyExc_TypeError, "trace_bind(Telemetry, _Trace, _PoolInfo, PoolHandle, "
                                         "var: ContextVar, trace: module, metrics: module)");
        return NULL;
    }
    if (!bound) {
        PyErr_SetString(PyExc_RuntimeError, "trace_bind(): the C ledger is not bound");
        return NULL;
    }
    PyTypeObject *trace = (PyTypeObject *)args[1];
    if (trace->tp_dictoffset != 0 || trace->tp_new != PyBaseObject_Type.tp_new
        || trace->tp_init != PyBaseObject_Type.tp_init) {
        PyErr_SetString(PyExc_TypeError, "trace_bind(): _Trace is not a plain slotted class");
        return NULL;
    }
    Py_ssize_t offs[T_COUNT], span_off, observed_off;
    for (int i = 0; i < T_COUNT; i++) {
        if (member_offset(args[1], trace_slots[i], &offs[i]) < 0) {
            return NULL;
        }
    }
    if (member_offset(args[2], "span", &span_off) < 0
        || member_offset(args[3], "observed", &observed_off) < 0) {
        return NULL;
    }
    if (observe_names() < 0) {
        return NULL;
    }
    PyObject *method = PyDict_GetItemWithError(((PyTypeObject *)args[0])->tp_dict, s_checked_out);
    if (method == NULL || !PyFunction_Check(method)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "trace_bind(): no Telemetry.checked_out function");
        }
        return NULL;
    }
    /* Only the method the class's own module defines under the class's name, as
     * trace_span_bind() checks: one replaced before install() (a test's wrapper) must not be
     * taken for the original, which trace_checkout() stands in for without calling it. */
    PyObject *owner = PyObject_GetAttrString(args[0], "__module__");
    PyObject *qualname = PyObject_GetAttrString(args[0], "__qualname__");
    PyObject *expected = qualname == NULL ? NULL : PyUnicode_FromFormat("%U.checked_out", qualname);
    int own = -1;
    if (owner != NULL && expected != NULL) {
        own = PyObject_RichCompareBool(PyFunction_GET_MODULE(method), owner, Py_EQ);
        if (own == 1) {
            own = PyObject_RichCompareBool(((PyFunctionObject *)method)->func_qualname, expected,
                                           Py_EQ);
        }
    }
    Py_XDECREF(owner);
    Py_XDECREF(qualname);
    Py_XDECREF(expected);
    if (own != 1) {
        if (own == 0) {
            PyErr_SetString(PyExc_TypeError,
                            "trace_bind(): Telemetry.checked_out is not pgleak._otel's own");
        }
        return NULL;
    }
    if (s_dormant == NULL) {
        s_dormant = PyUnicode_InternFromString("dormant");
        s_tracing = PyUnicode_InternFromString("tracing");
        s_metering = PyUnicode_InternFromString("metering");
        s_returned_outcome = PyUnicode_InternFromString("returned");
        tb_zero = PyLong_FromLong(0);
        tb_no_args = PyTuple_New(0);
        s_watch_tracer = PyUnicode_InternFromString("_watch_tracer");
        s_watch_meter = PyUnicode_InternFromString("_watch_meter");
        s_tracer_provider = PyUnicode_InternFromString("_TRACER_PROVIDER");
        s_meter_provider = PyUnicode_InternFromString("_METER_PROVIDER");
        if (!s_dormant || !s_tracing || !s_metering || !s_returned_outcome || !tb_zero
            || !tb_no_args || !s_watch_tracer || !s_watch_meter || !s_tracer_provider
            || !s_meter_provider) {
            return NULL;
        }
    }
    for (int i = 0; i < 2; i++) {
        PyObject *globals = PyModule_GetDict(args[5 + i]);
        if (globals == NULL || !PyDict_Check(globals)) {
            PyErr_SetString(PyExc_TypeError, "trace_bind(): a module without its dict");
            return NULL;
        }
        Py_XSETREF(tb_globals[i], Py_NewRef(globals));
    }
    memcpy(trace_off, offs, sizeof(offs));
    info_span_off = span_off;
    handle_observed_off = observed_off;
    Py_XSETREF(tb_trace, (PyTypeObject *)Py_NewRef(args[1]));
    Py_XSETREF(tb_info, (PyTypeObject *)Py_NewRef(args[2]));
    Py_XSETREF(tb_handle, (PyTypeObject *)Py_NewRef(args[3]));
    Py_XSETREF(tb_checked_out, Py_NewRef(method));
    Py_XSETREF(tb_var, Py_NewRef(args[4]));
    Py_XSETREF(tb_telemetry, (PyTypeObject *)Py_NewRef(args[0])); /* last: it switches it on */
    Py_RETURN_NONE;
}
