/* pgleak._speedups, part: a traced checkout's span, started, made current and ended in C.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

/* ---- a traced checkout's span, started, made current and ended in C (issue 12) ------------
 *
 * With ``trace_checkout`` in C, a traced cycle still ran four Python frames of pgleak's,
 * ``Telemetry.enter``, ``exit``, ``checked_in`` and ``_start`` (~12,000 instructions of the
 * ~19,000 pgleak's observer added beyond the SDK's own work on asyncpg): their frames, the
 * holder's two ``repr``s, the method calls by name. Their common case is here, each step in
 * the methods' order with the same values, so a fault leaves the same state behind (and
 * reaches the same ``internal_error`` site): the API's context variable in use (``_CONTEXT``
 * still the one bound), the call site's attributes kept in ``_PoolInfo.sites``, plain values
 * (floats, tuples, str) where the methods would format or compare them. Anything else - a
 * subclass, a method replaced on the class or the instance, a site not yet kept, metrics to
 * record - runs the Python method, which stays the one definition of a span. The clocks are
 * ``pgleak._otel``'s globals, read at each call (a test's clock is honoured). Bound by
 * pgleak._otel_fast after ``trace_bind``. */

static const char *ts_method_names[TS_COUNT] = {"enter", "exit", "checked_in", "_start"};
static PyObject *ts_names[TS_COUNT], *ts_fn[TS_COUNT]; /* the names; the functions bound */
static PyObject *ts_globals;                         /* pgleak._otel's dict; NULL: not bound */
static PyTypeObject *ts_context;                     /* opentelemetry.context.Context */
static int ts_context_plain; /* Context(current, **kw) is dict's own new + init */
static PyObject *ts_span_name, *ts_internal, *ts_span_key, *ts_kwnames, *ts_one, *ts_e9;
static PyObject *s_ts_context_var, *s_ts_time_ns, *s_ts_monotonic, *s_ts_tracer,
    *s_ts_start_span, *s_ts_set_attributes, *s_ts_end, *s_ts_metering, *s_ts_checkout_id,
    *s_ts_holder, *s_ts_context, *s_ts_waited, *s_ts_held, *s_ts_outcome, *s_ts_discarded;
static Py_ssize_t ts_sites_off;
/* The last holder string made, for the (task, thread) identity pairs it was made of (both
 * names str, so their ``repr`` cannot change while the tuples are kept). */
static PyObject *ts_last_task, *ts_last_thread, *ts_last_holder;

#ifdef PGLEAK_VERDICT_TABLE
/* ts_attributes()'s: the entry of ``sites`` found last, for the (code, offset) it was found
 * by (all borrowed: compared by address only, while ``sites`` keeps its version tag). */
static struct {
    PyObject *code, *lasti, *sites, *hit;
    uint64_t tag;
} ts_site;
#endif

/* The observer's instance dict (a new reference) when the methods ``which`` and ``_start``
 * are the ones bound and ``_CONTEXT`` is still the variable bound; else NULL, no error set:
 * the Python method's case. */
static PyObject *
ts_mine(PyObject *observer, int which)
{
    if (ts_globals == NULL || Py_TYPE(observer) != tb_telemetry || ts_fn[which] == NULL
        || ts_fn[TS_START] == NULL) {
        return NULL;
    }
    PyObject *cls = tb_telemetry->tp_dict;
    if (ts_get(cls, ts_names[which], TM_CLASS + which) != ts_fn[which]
        || ts_get(cls, ts_names[TS_START], TM_CLASS + TS_START) != ts_fn[TS_START]
        || ts_get(ts_globals, s_ts_context_var, TM_CONTEXT) != tb_var) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *dict = PyObject_GenericGetDict(observer, NULL);
    if (dict == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyDict_CheckExact(dict)
        || ts_get(dict, ts_names[which], TM_OWN(TM_INSTANCE + which)) != NULL
        || ts_get(dict, ts_names[TS_START], TM_OWN(TM_INSTANCE + TS_START)) != NULL
        || PyErr_Occurred()) {
        PyErr_Clear();
        Py_DECREF(dict);
        return NULL;
    }
    return dict;
}

/* ``base + int(mono * 1e9)`` (``negate``: ``base - ...``), as the methods compute it. */
static PyObject *
ts_ns(PyObject *base, PyObject *mono, int negate)
{
    /* Nanoseconds since the epoch (~1.8e18) and the monotonic clock's in 64 bits: ``int(x)``
     * of a float truncates toward zero, as the C cast does, and the sum of two values under
     * 2**62 cannot overflow; no int made for ``int(mono * 1e9)``, none for the sum but the
     * result. Anything larger (or a NaN, which no comparison lets through) is Python's. */
    if (PyFloat_CheckExact(mono) && PyLong_CheckExact(base)) {
        double scaled = PyFloat_AS_DOUBLE(mono) * 1e9;
        int overflow;
        long long b = PyLong_AsLongLongAndOverflow(base, &overflow);
        const long long limit = (long long)1 << 62;
        if (!overflow && b > -limit && b < limit && scaled > -4.6e18 && scaled < 4.6e18) {
            long long ns = (long long)scaled;
            return PyLong_FromLongLong(negate ? b - ns : b + ns);
        }
    }
    PyObject *scaled;
    if (PyFloat_CheckExact(mono)) {
        scaled = PyLong_FromDouble(PyFloat_AS_DOUBLE(mono) * 1e9);
    }
    else {
        PyObject *product = PyNumber_Multiply(mono, ts_e9);
        scaled = product == NULL ? NULL : PyNumber_Long(product);
        Py_XDECREF(product);
    }
    if (scaled == NULL) {
        return NULL;
    }
    PyObject *sum = negate ? PyNumber_Subtract(base, scaled) : PyNumber_Add(base, scaled);
    Py_DECREF(scaled);
    return sum;
}

/* ``_otel.<name>()``: one of the clocks, as the module has it now. */
static PyObject *
ts_clock(PyObject *name)
{
    PyObject *clock = ts_get(ts_globals, name, name == s_ts_time_ns ? TM_TIME_NS : TM_MONOTONIC);
    if (clock == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_NameError, name);
        }
        return NULL;
    }
    Py_INCREF(clock);
    PyObject *now = PyObject_CallNoArgs(clock);
    Py_DECREF(clock);
    return now;
}

/* ``time.time_ns()``'s value read here (0), -1 with an error set (3.13's clock failed, as the
 * call would), or 1: not read here. CPython reads clock_gettime(CLOCK_REALTIME) on Linux
 * (_PyTime_GetSystemClock: seconds and nanoseconds to nanoseconds), PyTime_Time from 3.13. */
static inline int
ts_wall_ns(long long *ns)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    if (PyTime_Time(&t) < 0) {
        return -1;
    }
    *ns = (long long)t;
    return 0;
#elif defined(__linux__) && defined(CLOCK_REALTIME)
    struct timespec ts;
    if (PGLEAK_LIKELY(clock_gettime(CLOCK_REALTIME, &ts) == 0)) {
        *ns = (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
        return 0;
    }
    return 1;
#else
    (void)ns;
    return 1;
#endif
}

/* ``_time_ns() - int(_monotonic() * 1e9)``, the span's offset (a new reference, or NULL with an
 * error set). While pgleak._otel's clocks are time's own (``ts_clocks``, from the binding),
 * both are read here, as clock_now() reads the monotonic one: the two calls, their int and
 * float, and the arithmetic on them cost ~1,000 instructions a span. Else the calls. */
static PyObject *ts_clocks[2]; /* time.time_ns, time.monotonic */

static PyObject *
ts_offset(void)
{
    PyObject *time_ns = ts_get(ts_globals, s_ts_time_ns, TM_TIME_NS);
    PyObject *monotonic =
        time_ns == NULL ? NULL : ts_get(ts_globals, s_ts_monotonic, TM_MONOTONIC);
    if (monotonic == NULL) {
        PyErr_Clear(); /* a lookup's error: ts_clock() below looks again */
    }
    else if (time_ns == ts_clocks[0] && monotonic == ts_clocks[1]) {
        long long wall;
        double mono;
        int read = ts_wall_ns(&wall);
        if (read == 0) {
            read = clock_seconds(&mono);
        }
        if (read < 0) {
            return NULL;
        }
        if (read == 0) {
            double scaled = mono * 1e9;
            const long long limit = (long long)1 << 62;
            if (wall > -limit && wall < limit && scaled > -4.6e18 && scaled < 4.6e18) {
                return PyLong_FromLongLong(wall - (long long)scaled); /* as ts_ns() */
            }
        }
    }
    PyObject *mono = NULL, *offset = NULL;
    PyObject *ns = ts_clock(s_ts_time_ns);
    if (ns != NULL && (mono = ts_clock(s_ts_monotonic)) != NULL) {
        offset = ts_ns(ns, mono, 1);
    }
    Py_XDECREF(ns);
    Py_XDECREF(mono);
    return offset;
}

/* ``f"task {task[1]!r} (thread {thread[1]!r})"`` or ``f"thread {thread[1]!r}"``: a new
 * reference, NULL with an error set. */
static PyObject *
ts_holder_of(PyObject *task, PyObject *thread)
{
    if (task == ts_last_task && thread == ts_last_thread && ts_last_holder != NULL) {
        return Py_NewRef(ts_last_holder);
    }
    PyObject *name = PyTuple_GET_ITEM(thread, 1);
    PyObject *holder = task == Py_None
                           ? PyUnicode_FromFormat("thread %R", name)
                           : PyUnicode_FromFormat("task %R (thread %R)",
                                                  PyTuple_GET_ITEM(task, 1), name);
    if (holder != NULL && PyUnicode_CheckExact(name)
        && (task == Py_None || PyUnicode_CheckExact(PyTuple_GET_ITEM(task, 1)))) {
        Py_XSETREF(ts_last_task, Py_NewRef(task));
        Py_XSETREF(ts_last_thread, Py_NewRef(thread));
        Py_XSETREF(ts_last_holder, Py_NewRef(holder));
    }
    return holder;
}

/* ts_attributes()'s copies of the site's attributes with the keys a checkout adds already in
 * place, in the order it adds them (``pgleak.checkout_id``, ``pgleak.holder``, then
 * ``pgleak.waited_s`` for [1]; [0] without it): the copy of the site's dict had one key too
 * many for its size and grew (a new table, every key placed again) on every traced checkout;
 * the copy of one of these is the right size already, and the checkout's values replace the
 * placeholders where they stand, so the keys and their order are those the insertions gave.
 * Made for the site entry last seen (``hit``, held) while its dict is unchanged. */
static struct {
    PyObject *hit;      /* the ``sites`` entry, a (code, attrs) tuple, strong */
    uint64_t tag;       /* its attrs' version tag when the copies were made */
    PyObject *made[2];  /* strong; NULL: not made yet */
} ts_presized;

/* A new dict of the site's attributes (``hit[1]``); ``with``: 0 the plain copy, 1 with the
 * checkout's two keys in place, 2 with the wait's too. NULL with an error set. */
static PyObject *
ts_attributes_copy(PyObject *hit, int with)
{
    PyObject *base = PyTuple_GET_ITEM(hit, 1);
#ifdef PGLEAK_VERDICT_TABLE
    if (with == 0) {
        return PyDict_Copy(base);
    }
    if (ts_presized.hit != hit || ts_presized.tag != dict_version(base)) {
        Py_CLEAR(ts_presized.made[0]);
        Py_CLEAR(ts_presized.made[1]);
        Py_XSETREF(ts_presized.hit, Py_NewRef(hit));
        ts_presized.tag = dict_version(base);
    }
    PyObject *made = ts_presized.made[with - 1];
    if (made == NULL) {
        made = PyDict_Copy(base);
        if (made == NULL || PyDict_SetItem(made, s_ts_checkout_id, Py_None) < 0
            || PyDict_SetItem(made, s_ts_holder, Py_None) < 0
            || (with == 2 && PyDict_SetItem(made, s_ts_waited, Py_None) < 0)) {
            Py_XDECREF(made);
            return NULL;
        }
        ts_presized.made[with - 1] = made;
    }
    return PyDict_Copy(made);
#else
    (void)with;
    return PyDict_Copy(base);
#endif
}

/* The span's start attributes as ``Telemetry._start`` makes them from a kept site: a new
 * dict, or NULL (``*start`` untouched) with no error set where the method must run. */
static PyObject *
ts_attributes(PyObject *lease, PyObject *state, PyObject **start)
{
    PyObject *since = SLOT(state, trace_off[T_SINCE]), *t0 = SLOT(lease, lease_off[L_T0]);
    PyObject *raw = SLOT(lease, lease_off[L_RAW]), *handle = SLOT(lease, lease_off[L_POOL]);
    PyObject *id = SLOT(lease, lease_off[L_ID]), *context = SLOT(lease, lease_off[L_CONTEXT]);
    PyObject *task = SLOT(lease, lease_off[L_TASK]), *thread = SLOT(lease, lease_off[L_THREAD]);
    if (since == NULL || t0 == NULL || !PyFloat_CheckExact(t0)
        || (since != Py_None && !PyFloat_CheckExact(since)) || raw == NULL || handle == NULL
        || Py_TYPE(handle) != tb_handle || id == NULL || context == NULL
        || (context != Py_None && !PyUnicode_CheckExact(context)) || task == NULL
        || thread == NULL || !PyTuple_CheckExact(thread) || PyTuple_GET_SIZE(thread) < 2
        || (task != Py_None && (!PyTuple_CheckExact(task) || PyTuple_GET_SIZE(task) < 2))) {
        return NULL;
    }
    PyObject *info = SLOT(handle, handle_observed_off);
    if (info == NULL || Py_TYPE(info) != tb_info) {
        return NULL;
    }
    PyObject *sites = SLOT(info, ts_sites_off);
    if (sites == NULL || !PyDict_CheckExact(sites)) {
        return NULL;
    }
    /* ``info.sites.get((id(code), raw[1]) if raw else None)``, ``code = raw[0] if raw else
     * None`` */
    PyObject *code = Py_None, *hit;
    if (raw == Py_None || (PyTuple_CheckExact(raw) && PyTuple_GET_SIZE(raw) == 0)) {
        hit = PyDict_GetItemWithError(sites, Py_None);
    }
    else if (PyTuple_CheckExact(raw) && PyTuple_GET_SIZE(raw) >= 2) {
        code = PyTuple_GET_ITEM(raw, 0);
        PyObject *lasti = PyTuple_GET_ITEM(raw, 1);
#ifdef PGLEAK_VERDICT_TABLE
        /* The last line's entry, while ``sites`` is unchanged: the entry holds its code, so
         * the same address is the same code; the same offset object, the same offset. */
        if (code == ts_site.code && lasti == ts_site.lasti && sites == ts_site.sites
            && dict_version(sites) == ts_site.tag) {
            hit = ts_site.hit;
        }
        else
#endif
        {
            PyObject *key = PyLong_FromVoidPtr(code);
            PyObject *pair = key == NULL ? NULL : PyTuple_Pack(2, key, lasti);
            Py_XDECREF(key);
            if (pair == NULL) {
                return NULL;
            }
            hit = PyDict_GetItemWithError(sites, pair);
            Py_DECREF(pair);
#ifdef PGLEAK_VERDICT_TABLE
            if (hit != NULL) {
                ts_site.code = code;
                ts_site.lasti = lasti;
                ts_site.sites = sites;
                ts_site.tag = dict_version(sites);
                ts_site.hit = hit;
            }
#endif
        }
    }
    else {
        return NULL;
    }
    if (hit == NULL || !PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 2
        || PyTuple_GET_ITEM(hit, 0) != code || !PyDict_CheckExact(PyTuple_GET_ITEM(hit, 1))) {
        return NULL; /* not kept (the method's _base()), or an id reused */
    }
    int plain = context == Py_None || PyUnicode_GET_LENGTH(context) == 0;
    PyObject *attrs = ts_attributes_copy(hit, plain ? (since != Py_None) + 1 : 0);
    if (attrs == NULL) {
        return NULL;
    }
    PyObject *holder = NULL, *waited = NULL;
    if (PyDict_SetItem(attrs, s_ts_checkout_id, id) < 0) {
        goto fail;
    }
    holder = ts_holder_of(task, thread);
    if (holder == NULL) {
        goto fail;
    }
    if (!plain) {
        Py_SETREF(holder, PyUnicode_FromFormat("%U during %U", holder, context));
        if (holder == NULL || PyDict_SetItem(attrs, s_ts_holder, holder) < 0
            || PyDict_SetItem(attrs, s_ts_context, context) < 0) {
            goto fail;
        }
    }
    else if (PyDict_SetItem(attrs, s_ts_holder, holder) < 0) {
        goto fail;
    }
    Py_CLEAR(holder);
    *start = t0;
    if (since != Py_None) {
        double a = PyFloat_AS_DOUBLE(t0), b = PyFloat_AS_DOUBLE(since);
        waited = PyFloat_FromDouble(a > b ? a - b : 0.0);
        if (waited == NULL || PyDict_SetItem(attrs, s_ts_waited, waited) < 0) {
            goto fail;
        }
        Py_DECREF(waited);
        *start = since;
    }
    return attrs;
fail:
    Py_XDECREF(holder);
    Py_XDECREF(waited);
    Py_DECREF(attrs);
    return NULL;
}

/* ``self._start(lease, state, parent)`` (``dict``: the observer's, from ts_mine): the span, a
 * new reference, or NULL with an error set. */
static PyObject *
ts_start(PyObject *observer, PyObject *dict, PyObject *lease, PyObject *state, PyObject *parent)
{
    PyObject *start = NULL;
    PyObject *tracer = ts_get(dict, s_ts_tracer, TM_OWN(TM_TRACER));
    PyObject *attrs = tracer == NULL ? NULL : ts_attributes(lease, state, &start);
    if (attrs == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        PyObject *args[4] = {observer, lease, state, parent};
        return PyObject_VectorcallMethod(ts_names[TS_START], args, 4, NULL);
    }
    Py_INCREF(tracer);
    Py_INCREF(start);
    PyObject *span = NULL, *at = NULL;
    PyObject *offset = ts_offset();
    if (offset == NULL) {
        goto done;
    }
    slot_set(state, trace_off[T_OFFSET], Py_NewRef(offset));
    at = ts_ns(offset, start, 0);
    if (at == NULL) {
        goto done;
    }
    PyObject *args[7] = {tracer, ts_span_name, parent, ts_internal, attrs, Py_None, at};
    span = PyObject_VectorcallMethod(s_ts_start_span, args, 7, NULL);
    if (span != NULL) {
        slot_set(state, trace_off[T_SPAN], Py_NewRef(span));
    }
done:
    Py_XDECREF(offset);
    Py_XDECREF(at);
    Py_DECREF(attrs);
    Py_DECREF(start);
    Py_DECREF(tracer);
    return span;
}

/* ``Telemetry.enter(lease)``: 1 done as the method would, 0 the method must run, -1 an error
 * set (where the method would have raised it). */
static int
ts_enter(PyObject *observer, PyObject *lease)
{
    if (!Py_IS_TYPE(lease, lease_type)) {
        return 0;
    }
    PyObject *dict = ts_mine(observer, TS_ENTER);
    if (dict == NULL) {
        return 0;
    }
    int result = 0;
    PyObject *current = NULL, *span = NULL, *ctx = NULL;
    PyObject *state = SLOT(lease, lease_off[L_OTEL]);
    if (state == Py_None) {
        result = 1;
        goto done;
    }
    if (state == NULL || !Py_IS_TYPE(state, tb_trace)) {
        goto done;
    }
    PyObject *ended = SLOT(state, trace_off[T_ENDED]), *token = SLOT(state, trace_off[T_TOKEN]);
    if (ended == Py_True) {
        result = 1;
        goto done;
    }
    if (ended != Py_False || token == NULL || SLOT(state, trace_off[T_SPAN]) == NULL) {
        goto done;
    }
    if (token != Py_None) { /* the same connection's block, nested */
        PyObject *depth = SLOT(state, trace_off[T_DEPTH]);
        if (depth == NULL || !PyLong_CheckExact(depth)) {
            goto done;
        }
        PyObject *deeper = PyNumber_Add(depth, ts_one);
        if (deeper == NULL) {
            result = -1;
            goto done;
        }
        slot_set(state, trace_off[T_DEPTH], deeper);
        result = 1;
        goto done;
    }
    if (PyContextVar_Get(tb_var, NULL, &current) < 0) {
        result = -1;
        goto done;
    }
    if (current == NULL) {
        goto done; /* var.get() raises: the method does */
    }
    span = Py_NewRef(SLOT(state, trace_off[T_SPAN]));
    if (span == Py_None) {
        Py_SETREF(span, ts_start(observer, dict, lease, state, current));
        if (span == NULL) {
            result = -1;
            goto done;
        }
    }
    /* Context(current, **{_SPAN_KEY: span}) */
    if (ts_context_plain && (Py_IS_TYPE(current, ts_context) || PyDict_CheckExact(current))) {
        ctx = PyDict_Type.tp_new(ts_context, tb_no_args, NULL);
        if (ctx != NULL
            && (PyDict_Merge(ctx, current, 1) < 0 || PyDict_SetItem(ctx, ts_span_key, span) < 0)) {
            Py_CLEAR(ctx);
        }
    }
    else {
        PyObject *args[2] = {current, span};
        ctx = PyObject_Vectorcall((PyObject *)ts_context, args, 1, ts_kwnames);
    }
    if (ctx == NULL) {
        result = -1;
        goto done;
    }
    slot_set(state, trace_off[T_CTX], Py_NewRef(ctx));
    PyObject *set = PyContextVar_Set(tb_var, ctx);
    if (set == NULL) {
        result = -1;
        goto done;
    }
    slot_set(state, trace_off[T_TOKEN], set);
    slot_set(state, trace_off[T_DEPTH], Py_NewRef(ts_one));
    result = 1;
done:
    Py_XDECREF(current);
    Py_XDECREF(span);
    Py_XDECREF(ctx);
    Py_DECREF(dict);
    return result;
}

/* ``Telemetry.exit(lease)``, as ts_enter. */
static int
ts_exit(PyObject *observer, PyObject *lease)
{
    if (!Py_IS_TYPE(lease, lease_type)) {
        return 0;
    }
    PyObject *dict = ts_mine(observer, TS_EXIT);
    if (dict == NULL) {
        return 0;
    }
    Py_DECREF(dict); /* only the test: exit reads nothing of the observer's */
    PyObject *state = SLOT(lease, lease_off[L_OTEL]);
    if (state == Py_None) {
        return 1;
    }
    if (state == NULL || !Py_IS_TYPE(state, tb_trace)) {
        return 0;
    }
    PyObject *token = SLOT(state, trace_off[T_TOKEN]), *depth = SLOT(state, trace_off[T_DEPTH]);
    if (token == Py_None) {
        return 1;
    }
    if (token == NULL || depth == NULL || !PyLong_CheckExact(depth)
        || SLOT(state, trace_off[T_CTX]) == NULL) {
        return 0;
    }
    /* read first (it has no effect), so that an unset variable is the method's case whole */
    PyObject *current = NULL;
    if (PyContextVar_Get(tb_var, NULL, &current) < 0) {
        return -1;
    }
    if (current == NULL) {
        return 0;
    }
    Py_DECREF(current); /* compared by identity only, and still held by the variable */
    /* ``depth -= 1``, then ``depth > 0``: in C for a machine-sized int (no new int at 0) */
    int overflow, more;
    long d = PyLong_AsLongAndOverflow(depth, &overflow);
    PyObject *shallower = !overflow && d > LONG_MIN ? PyLong_FromLong(d - 1)
                                                    : PyNumber_Subtract(depth, ts_one);
    if (shallower == NULL) {
        return -1;
    }
    slot_set(state, trace_off[T_DEPTH], shallower);
    if (!overflow && d > LONG_MIN) {
        more = d - 1 > 0;
    }
    else {
        more = PyObject_RichCompareBool(shallower, tb_zero, Py_GT);
    }
    if (more != 0) {
        return more < 0 ? -1 : 1;
    }
    token = Py_NewRef(token);
    PyObject *ctx = Py_NewRef(SLOT(state, trace_off[T_CTX]));
    slot_set(state, trace_off[T_TOKEN], Py_NewRef(Py_None));
    slot_set(state, trace_off[T_CTX], Py_NewRef(Py_None));
    int result = 1;
    if (current == ctx && PyContextVar_Reset(tb_var, token) < 0) {
        if (PyErr_ExceptionMatches(PyExc_ValueError)
            || PyErr_ExceptionMatches(PyExc_RuntimeError)) {
            PyErr_Clear(); /* a token of another contextvars.Context */
        }
        else {
            result = -1;
        }
    }
    Py_DECREF(token);
    Py_DECREF(ctx);
    return result;
}

/* ``observer.enter(lease)`` / ``observer.exit(lease)`` (``name``: the caller's interned
 * "enter" / "exit"): what PyObject_CallMethodOneArg would return. */
static PyObject *
trace_told(PyObject *observer, PyObject *name, PyObject *lease, int entering)
{
    int done = entering ? ts_enter(observer, lease) : ts_exit(observer, lease);
    if (done != 0) {
        return done < 0 ? NULL : Py_NewRef(Py_None);
    }
    return PyObject_CallMethodOneArg(observer, name, lease);
}

/* NonRecordingSpan's ``set_attributes`` and ``end`` when their bodies do nothing (``pass``:
 * pgleak._otel_fast checks), from trace_span_bind; NULL: called as any other. */
static PyObject *ts_noops[2];

/* ``span.<name>`` as a method call finds it: the function found on the type (``*unbound``
 * 1: ``span`` goes first) or the attribute (0); a new reference, or NULL with an error set. */
static PyObject *
ts_method(PyObject *span, PyObject *name, int *unbound)
{
#if PY_VERSION_HEX < 0x030D0000
    PyObject *method = NULL;
    *unbound = _PyObject_GetMethod(span, name, &method);
    return method;
#else
    *unbound = 0;
    return PyObject_GetAttr(span, name);
#endif
}

/* Whether calling ``method`` (from ts_method) calls ``noop`` on ``span``. */
static inline int
ts_is_noop(PyObject *method, int unbound, PyObject *span, PyObject *noop)
{
    if (noop == NULL) {
        return 0;
    }
    if (unbound) {
        return method == noop;
    }
    return PyMethod_Check(method) && PyMethod_GET_FUNCTION(method) == noop
           && PyMethod_GET_SELF(method) == span;
}

/* ``method(arg)`` as found by ts_method for ``span``. */
static PyObject *
ts_call(PyObject *method, int unbound, PyObject *span, PyObject *arg)
{
    PyObject *args[3] = {NULL, span, arg};
    if (unbound) {
        return PyObject_Vectorcall(method, args + 1, 2, NULL);
    }
    return PyObject_Vectorcall(method, args + 2, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* ``Telemetry.checked_in(lease, late, discarded)``, as ts_enter. */
static int
ts_checked_in(PyObject *observer, PyObject *lease, int late, int discarded)
{
    if (!Py_IS_TYPE(lease, lease_type)) {
        return 0;
    }
    PyObject *dict = ts_mine(observer, TS_CHECKED_IN);
    if (dict == NULL) {
        return 0;
    }
    int result = 0;
    PyObject *end = NULL, *span = NULL, *attrs = NULL, *held = NULL, *at = NULL, *done = NULL;
    PyObject *method = NULL;
    PyObject *state = SLOT(lease, lease_off[L_OTEL]), *t0 = SLOT(lease, lease_off[L_T0]);
    PyObject *t_in = SLOT(lease, lease_off[L_T_IN]);
    if (t_in == NULL || t0 == NULL || state == NULL
        || ts_get(dict, s_ts_metering, TM_OWN(TM_METERING)) != Py_False) {
        PyErr_Clear();
        goto out; /* metrics to record: the method's */
    }
    if (state == Py_None) {
        result = 1;
        goto out;
    }
    PyObject *ended = Py_IS_TYPE(state, tb_trace) ? SLOT(state, trace_off[T_ENDED]) : NULL;
    if ((ended != Py_True && ended != Py_False) || SLOT(state, trace_off[T_SPAN]) == NULL
        || SLOT(state, trace_off[T_PARENT]) == NULL || SLOT(state, trace_off[T_OFFSET]) == NULL
        || SLOT(state, trace_off[T_OUTCOME]) == NULL) {
        goto out;
    }
    result = 1;
    if (discarded) {
        slot_set(state, trace_off[T_OUTCOME], Py_NewRef(s_ts_discarded));
    }
    if (late || ended == Py_True) {
        goto out;
    }
    slot_set(state, trace_off[T_ENDED], Py_NewRef(Py_True));
    span = Py_NewRef(SLOT(state, trace_off[T_SPAN]));
    if (span == Py_None) {
        PyObject *parent = Py_NewRef(SLOT(state, trace_off[T_PARENT]));
        Py_SETREF(span, ts_start(observer, dict, lease, state, parent));
        Py_DECREF(parent);
        if (span == NULL) {
            goto fail;
        }
    }
    slot_set(state, trace_off[T_PARENT], Py_NewRef(Py_None));
    end = t_in == Py_None ? ts_clock(s_ts_monotonic) : Py_NewRef(t_in);
    if (end == NULL) {
        goto fail;
    }
    t0 = SLOT(lease, lease_off[L_T0]);
    if (t0 == NULL) {
        PyErr_SetString(PyExc_AttributeError, "t0");
        goto fail;
    }
    /* ``span.set_attributes({...})`` then ``span.end(...)``, each method looked up first, as
     * Python does; a method that is NonRecordingSpan's own no-op (ts_noops) is not called
     * where making its argument could not raise or run code (exact floats, finite end). */
    int plain = PyFloat_CheckExact(end) && PyFloat_CheckExact(t0), unbound;
    method = ts_method(span, s_ts_set_attributes, &unbound);
    if (method == NULL) {
        goto fail;
    }
    if (!plain || !ts_is_noop(method, unbound, span, ts_noops[0])) {
        if (PyFloat_CheckExact(end) && PyFloat_CheckExact(t0)) {
            double a = PyFloat_AS_DOUBLE(end), b = PyFloat_AS_DOUBLE(t0);
            held = PyFloat_FromDouble(a > b ? a - b : 0.0);
        }
        else {
            int later = PyObject_RichCompareBool(end, t0, Py_GT);
            held = later < 0 ? NULL
                   : later   ? PyNumber_Subtract(end, t0)
                             : PyFloat_FromDouble(0.0);
        }
        attrs = held == NULL ? NULL : PyDict_New();
        if (attrs == NULL || PyDict_SetItem(attrs, s_ts_held, held) < 0
            || PyDict_SetItem(attrs, s_ts_outcome, SLOT(state, trace_off[T_OUTCOME])) < 0) {
            goto fail;
        }
        done = ts_call(method, unbound, span, attrs);
        if (done == NULL) {
            goto fail;
        }
        Py_CLEAR(done);
    }
    Py_SETREF(method, ts_method(span, s_ts_end, &unbound));
    if (method == NULL) {
        goto fail;
    }
    /* ``state.offset + int(end * 1e9)`` cannot raise (read after set_attributes ran) */
    PyObject *offset = SLOT(state, trace_off[T_OFFSET]);
    if (offset == NULL) {
        PyErr_SetString(PyExc_AttributeError, "offset");
        goto fail;
    }
    plain = PyFloat_CheckExact(end) && isfinite(PyFloat_AS_DOUBLE(end) * 1e9)
            && PyLong_CheckExact(offset);
    if (!plain || !ts_is_noop(method, unbound, span, ts_noops[1])) {
        at = ts_ns(offset, end, 0);
        if (at == NULL) {
            goto fail;
        }
        done = ts_call(method, unbound, span, at);
        if (done == NULL) {
            goto fail;
        }
    }
    goto out;
fail:
    result = -1;
out:
    Py_XDECREF(method);
    Py_XDECREF(end);
    Py_XDECREF(span);
    Py_XDECREF(attrs);
    Py_XDECREF(held);
    Py_XDECREF(at);
    Py_XDECREF(done);
    Py_DECREF(dict);
    return result;
}

PyDoc_STRVAR(trace_block_doc,
"trace_block(observer, lease, entering) -> None\n\n"
"``observer.enter(lease)`` (or ``exit``) as the C block wrappers tell it: in C where the\n"
"method's common case allows. For tests: the wrappers call it directly.");

static PyObject *
trace_block(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static PyObject *names[2];
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "trace_block(observer, lease, entering)");
        return NULL;
    }
    int entering = PyObject_IsTrue(args[2]);
    if (entering < 0) {
        return NULL;
    }
    if (names[entering] == NULL) {
        names[entering] = PyUnicode_InternFromString(entering ? "enter" : "exit");
        if (names[entering] == NULL) {
            return NULL;
        }
    }
    return trace_told(args[0], names[entering], args[1], entering);
}

PyDoc_STRVAR(trace_span_bind_doc,
"trace_span_bind(Context, otel_globals, noops=()) -> None\n\n"
"Let the C code start, enter, exit and end a traced checkout's span itself, after\n"
"``trace_bind`` (``Context``: opentelemetry.context.Context; ``otel_globals``: the dict of\n"
"pgleak._otel, whose ``_CONTEXT``, clocks and names it reads; ``noops``: NonRecordingSpan's\n"
"``set_attributes`` and ``end`` functions if their bodies do nothing, which a checkin then\n"
"does not call, or ``()``).");

static PyObject *
trace_span_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 3 || !PyType_Check(args[0])
        || !PyType_IsSubtype((PyTypeObject *)args[0], &PyDict_Type) || !PyDict_Check(args[1])
        || (nargs == 3
            && (!PyTuple_CheckExact(args[2])
                || (PyTuple_GET_SIZE(args[2]) != 0 && PyTuple_GET_SIZE(args[2]) != 2)))) {
        PyErr_SetString(PyExc_TypeError, "trace_span_bind(Context: dict type, otel_globals: dict"
                                         ", noops: () or (set_attributes, end))");
        return NULL;
    }
    PyObject *noops = nargs == 3 ? args[2] : NULL;
    if (noops != NULL && PyTuple_GET_SIZE(noops) == 0) {
        noops = NULL;
    }
    if (tb_telemetry == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "trace_span_bind(): trace_bind() first");
        return NULL;
    }
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&s_ts_context_var, "_CONTEXT"}, {&s_ts_time_ns, "_time_ns"},
        {&s_ts_monotonic, "_monotonic"}, {&s_ts_tracer, "tracer"},
        {&s_ts_start_span, "start_span"}, {&s_ts_set_attributes, "set_attributes"},
        {&s_ts_end, "end"}, {&s_ts_metering, "metering"},
        {&s_ts_checkout_id, "pgleak.checkout_id"}, {&s_ts_holder, "pgleak.holder"},
        {&s_ts_context, "pgleak.context"}, {&s_ts_waited, "pgleak.waited_s"},
        {&s_ts_held, "pgleak.held_s"}, {&s_ts_outcome, "pgleak.outcome"},
        {&s_ts_discarded, "discarded"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL) {
            *names[i].slot = PyUnicode_InternFromString(names[i].text);
            if (*names[i].slot == NULL) {
                return NULL;
            }
        }
    }
    for (int i = 0; i < TS_COUNT; i++) {
        if (ts_names[i] == NULL) {
            ts_names[i] = PyUnicode_InternFromString(ts_method_names[i]);
            if (ts_names[i] == NULL) {
                return NULL;
            }
        }
    }
    if (ts_one == NULL) {
        ts_one = PyLong_FromLong(1);
        ts_e9 = PyFloat_FromDouble(1e9);
        if (ts_one == NULL || ts_e9 == NULL) {
            return NULL;
        }
    }
    Py_CLEAR(ts_globals); /* off until bound again */
    PyObject *globals = args[1];
    /* Only the methods pgleak._otel defines: one replaced already (a test's fault) stays the
     * Python call it is now, and so does every other method it reaches when it is _start. */
    PyObject *fns[TS_COUNT];
    for (int i = 0; i < TS_COUNT; i++) {
        fns[i] = PyDict_GetItemWithError(tb_telemetry->tp_dict, ts_names[i]);
        if (fns[i] == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (fns[i] != NULL
            && (!PyFunction_Check(fns[i]) || PyFunction_GET_GLOBALS(fns[i]) != globals)) {
            fns[i] = NULL;
        }
    }
    PyObject *span_name = PyDict_GetItemString(globals, "SPAN_NAME");
    PyObject *internal = PyDict_GetItemString(globals, "_INTERNAL");
    PyObject *span_key = PyDict_GetItemString(globals, "_SPAN_KEY");
    if (span_name == NULL || internal == NULL || span_key == NULL
        || !PyUnicode_CheckExact(span_key) || PyUnicode_GET_LENGTH(span_key) == 0
        || PyDict_GetItemWithError(globals, s_ts_context_var) != tb_var) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "trace_span_bind(): not the globals of pgleak._otel "
                                             "as trace_bind() was given them");
        }
        return NULL;
    }
    Py_ssize_t sites_off;
    if (member_offset((PyObject *)tb_info, "sites", &sites_off) < 0) {
        return NULL;
    }
    PyObject *kwnames = PyTuple_Pack(1, span_key);
    if (kwnames == NULL) {
        return NULL;
    }
    PyTypeObject *context = (PyTypeObject *)args[0];
    ts_context_plain =
        context->tp_new == PyDict_Type.tp_new && context->tp_init == PyDict_Type.tp_init;
    ts_sites_off = sites_off;
    Py_XSETREF(ts_kwnames, kwnames);
    Py_XSETREF(ts_span_name, Py_NewRef(span_name));
    Py_XSETREF(ts_internal, Py_NewRef(internal));
    Py_XSETREF(ts_span_key, Py_NewRef(span_key));
    Py_XSETREF(ts_context, (PyTypeObject *)Py_NewRef(args[0]));
    for (int i = 0; i < TS_COUNT; i++) {
        Py_XSETREF(ts_fn[i], Py_XNewRef(fns[i]));
    }
    if (ts_clocks[0] == NULL) {
        PyObject *time = PyImport_ImportModule("time");
        PyObject *time_ns = time == NULL ? NULL : PyObject_GetAttrString(time, "time_ns");
        PyObject *monotonic = time_ns == NULL ? NULL : PyObject_GetAttrString(time, "monotonic");
        Py_XDECREF(time);
        if (monotonic == NULL) {
            Py_XDECREF(time_ns);
            return NULL;
        }
        ts_clocks[0] = time_ns;
        ts_clocks[1] = monotonic;
    }
    for (int i = 0; i < 2; i++) {
        Py_XSETREF(ts_noops[i], noops == NULL ? NULL : Py_NewRef(PyTuple_GET_ITEM(noops, i)));
    }
    Py_XSETREF(ts_globals, Py_NewRef(globals)); /* last: it switches it on */
    Py_RETURN_NONE;
}
