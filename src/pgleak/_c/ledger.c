/* pgleak._speedups, part: Core.checkout and Core.checkin.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

PyDoc_STRVAR(checkout_doc,
"checkout(core, pool, conn=None, index=False, since=None) -> Lease | None\n\n"
"Core.checkout, positional arguments only (anything else goes to the Python method).");

/* Core.checkout itself, for every call the C path leaves to it (a call of another shape, the
 * bound reached, a ledger Core.__init__ did not make). */
static PGLEAK_COLD PyObject *
checkout_py(PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    return PyObject_Vectorcall(b_checkout_py, args, nargsf, kwnames);
}

/* The settings read afresh (their values kept in ``set_*``): a new reference, NULL on error.
 * Apart from the common path: only after a change, or with an observer (no answers kept). */
static PGLEAK_NOINLINE PyObject *
checkout_settings(PyObject *core)
{
    PyObject *settings = live(core, s_settings);
    if (settings != NULL && read_settings(settings) < 0) {
        Py_CLEAR(settings);
    }
    return settings;
}

/* ``_ConnRef(conn, collected)`` called as any class is: a _ConnRef with an __init__ of its own
 * (never pgleak's). A new reference, NULL on error. */
static PGLEAK_COLD PyObject *
connref_called(PyObject *conn, PyObject *collected)
{
    PyObject *cargs[2] = {conn, collected};
    return PyObject_Vectorcall((PyObject *)connref_type, cargs, 2, NULL);
}

/* ``by_conn`` already held ``stale`` under this connection's key: if the pool lent the same
 * connection again, it had it back, and that lease's checkin went unseen (a path the adapter
 * does not hook): forgotten. 0, or -1 on error. */
static PGLEAK_COLD int
checkout_stale(PyObject *core, PyObject *conn, PyObject *stale)
{
    PyObject *stale_ref = SLOT(stale, lease_off[L_REF]);
    PyObject *target = (stale_ref != NULL && PyWeakref_Check(stale_ref))
                           ? ref_target(stale_ref) : NULL;
    int failed = 0;
    if (target == conn) {
        Py_INCREF(stale);
        PyObject *gone = PyObject_CallMethodOneArg(core, s_forget, stale);
        Py_DECREF(stale);
        failed = gone == NULL ? -1 : 0;
        Py_XDECREF(gone);
    }
    Py_XDECREF(target);
    return failed;
}

/* The rest of a checkout after its lease is filed, when the answers kept do not say "nothing
 * rare" (the watchdog's first start, an observer, one waiting to wake): one attribute check
 * each decides whether Python is called. 0, or -1 on error. Apart from the common path, where
 * calm() says there is none of it. */
static PGLEAK_NOINLINE int
checkout_after(PyObject *core, PyObject *lease, PyObject *since)
{
    PyObject *value = NULL, *observed = NULL;
    int later = watchdog_idle(core);
    if (later < 0) {
        return -1;
    }
    if (!later) {
        value = live(core, s_observer);
        if (value == NULL) {
            return -1;
        }
        later = value != Py_None;
        if (later) {
            observed = value; /* the observer, told here (the watchdog is running) */
            value = NULL;
        }
        Py_CLEAR(value);
    }
    if (!later) {
        value = live(core, s_waker);
        if (value == NULL) {
            return -1;
        }
        later = value != Py_None;
        Py_CLEAR(value);
        if (later) {
            later = wake_due(core);
            if (later < 0) {
                return -1;
            }
        }
    }
    if (later && observed) {
        /* _after_checkout()'s common case: the watchdog running, an observer to tell */
        if (observe_names() < 0) {
            Py_DECREF(observed);
            return -1;
        }
        int failed = trace_checkout(observed, lease, since);
        if (failed == 0) {
            PyObject *oargs[3] = {observed, lease, since};
            failed = observe(s_checked_out, s_site_out, oargs, 3);
        }
        else {
            failed = failed < 0 ? observe_fault(s_site_out) : 0;
        }
        Py_DECREF(observed);
        return failed < 0 ? -1 : 0;
    }
    Py_XDECREF(observed);
    if (later) {
        value = PyObject_CallMethodObjArgs(core, s_after_checkout, lease, since, NULL);
        if (value == NULL) {
            return -1;
        }
        Py_DECREF(value);
    }
    else {
        calm_now(core);
    }
    return 0;
}

static PyObject *
ledger_checkout(PyObject *module, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (PGLEAK_UNLIKELY(!bound || kwnames != NULL || nargs < 2 || nargs > 5)) {
        return checkout_py(args, nargsf, kwnames);
    }
    PyObject *core = args[0], *pool = args[1];
    PyObject *conn = nargs > 2 ? args[2] : Py_None;
    int index = nargs > 3 ? PyObject_IsTrue(args[3]) : 0;
    PyObject *since = nargs > 4 ? args[4] : Py_None;
    if (PGLEAK_UNLIKELY(index < 0)) {
        return NULL;
    }
    PyObject *settings = NULL, *leases = NULL, *value = NULL, *lease = NULL, *task = Py_None;
    PyObject *loop = NULL, *result = NULL;
    Py_INCREF(task);

    int quiet = calm(core); /* the settings seen last are this core's, nothing rare to do */
    if (!quiet) {
        settings = checkout_settings(core);
        if (settings == NULL) {
            goto done;
        }
    }
    if (PGLEAK_UNLIKELY(!set_enabled)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    value = vars_used ? var_get(b_suppressed) : Py_NewRef(var_defaults[0]);
    if (value == NULL) {
        goto done;
    }
    int truth = PyObject_IsTrue(value);
    Py_CLEAR(value);
    if (PGLEAK_UNLIKELY(truth != 0)) {
        result = truth < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    leases = held(core, a_leases, s_leases);
    if (PGLEAK_UNLIKELY(leases == NULL || !PyDict_CheckExact(leases))) {
        /* not the ledger Core.__init__ made: let the Python method deal with it */
        Py_CLEAR(leases);
        PyErr_Clear();
        result = checkout_py(args, nargsf, kwnames);
        goto done;
    }
    if (PGLEAK_UNLIKELY(PyDict_GET_SIZE(leases) >= set_max_tracked)) {
        /* the bound: the Python method warns and counts */
        result = checkout_py(args, nargsf, kwnames);
        goto done;
    }
    double threshold = set_leak_threshold;
    value = vars_used ? var_get(b_allowance) : Py_NewRef(var_defaults[1]);
    if (value == NULL) {
        goto done;
    }
    double extra = PyFloat_AsDouble(value);
    Py_CLEAR(value);
    if (PGLEAK_UNLIKELY(extra == -1.0 && PyErr_Occurred())) {
        goto done;
    }
    if (extra > threshold) {
        threshold = extra;
    }
    loop = running_loop();
    if (loop == NULL) {
        goto done;
    }
    if (loop != Py_None) {
        Py_SETREF(task, current_task_of(loop));
        if (task == NULL) {
            goto done;
        }
    }
    PyObject *t0 = clock_now();
    if (t0 == NULL) {
        goto done;
    }
    double t0_d = PyFloat_AsDouble(t0);
    PyObject *thread = thread_identity();
    if (thread == NULL) {
        Py_DECREF(t0);
        goto done;
    }
    lease = lease_alloc();
    if (lease == NULL) {
        Py_DECREF(t0);
        Py_DECREF(thread);
        goto done;
    }
    /* Every slot is filled before anything else can fail, so a half-built lease is never
     * seen with an unset slot (which would raise AttributeError wherever it is read). The
     * lease is new, its slots NULL: filled without dropping what was there. */
    PyObject *generation = quiet ? calm_generation
                                 : PyDict_GetItemWithError(b_core_globals, s_generation);
    SLOT_FILL(lease, lease_off[L_GENERATION], Py_NewRef(generation ? generation : Py_None));
    SLOT_FILL(lease, lease_off[L_ID], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_POOL], Py_NewRef(pool));
    SLOT_FILL(lease, lease_off[L_T0], t0);
    SLOT_FILL(lease, lease_off[L_DEADLINE], PyFloat_FromDouble(t0_d + threshold));
    SLOT_FILL(lease, lease_off[L_THREAD], thread);
    SLOT_FILL(lease, lease_off[L_RAW], PyTuple_New(0));
    SLOT_FILL(lease, lease_off[L_TASK], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_REF], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_CONTEXT], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_PROBE], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_KEY], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_FLAGGED], Py_NewRef(Py_False));
    SLOT_FILL(lease, lease_off[L_REPORTED], Py_NewRef(Py_False));
    SLOT_FILL(lease, lease_off[L_T_IN], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_OTEL], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_SELF_RETURNING], Py_NewRef(extra == Py_HUGE_VAL ? Py_True : Py_False));
    SLOT_FILL(lease, lease_off[L_CLOSED], Py_NewRef(Py_None));
    SLOT_FILL(lease, lease_off[L_UNSEEN_CLOSE], Py_NewRef(Py_False));
    if (PGLEAK_UNLIKELY(generation == NULL || SLOT(lease, lease_off[L_DEADLINE]) == NULL
                        || SLOT(lease, lease_off[L_RAW]) == NULL)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "pgleak._core._generation is missing");
        }
        goto done;
    }
    PyObject *ids = held(core, a_ids, s_ids);
    if (ids == NULL) {
        goto done;
    }
    PyObject *lease_id = PyIter_Next(ids);
    Py_DECREF(ids);
    if (PGLEAK_UNLIKELY(lease_id == NULL)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "the lease ids ran out");
        }
        goto done;
    }
    slot_set(lease, lease_off[L_ID], lease_id);

    if (set_capture_stack) {
        PyObject *raw = checkout_stack(task);
        if (raw == NULL) {
            goto done;
        }
        slot_set(lease, lease_off[L_RAW], raw);
    }
    if (task != Py_None) {
        PyObject *pair = task_identity(task);
        if (pair == NULL) {
            goto done;
        }
        slot_set(lease, lease_off[L_TASK], pair);
    }
    value = vars_used ? var_get(b_context) : Py_NewRef(var_defaults[2]);
    if (value == NULL) {
        goto done;
    }
    slot_set(lease, lease_off[L_CONTEXT], value);
    value = NULL;

    if (conn != Py_None) {
        PyObject *collected = held(core, a_collected, s_collected);
        if (collected == NULL) {
            goto done;
        }
        /* a freed lease's reference to this connection, kept (see connref_spare): its
         * slots are set below */
        PyObject *ref = connref_plain && index ? connref_spare(conn, collected) : NULL;
        if (ref == NULL && connref_plain) {
            /* _ConnRef(conn, collected) without type_call around it: weakref's tp_init only
             * checks the arguments its tp_new has taken already. Its arguments' tuple is
             * the same one each time, emptied after the call (weakref's tp_new keeps no
             * reference to it, runs no Python code), made anew only if something kept it;
             * untracked, so that the collector never hands it, empty, to Python code. */
            static PyObject *pair = NULL;
            if (PGLEAK_UNLIKELY(pair == NULL || Py_REFCNT(pair) != 1)) {
                Py_XSETREF(pair, PyTuple_New(2));
                if (pair != NULL && PyObject_GC_IsTracked(pair)) {
                    PyObject_GC_UnTrack(pair);
                }
            }
            if (pair != NULL) {
                PyTuple_SET_ITEM(pair, 0, Py_NewRef(conn));
                PyTuple_SET_ITEM(pair, 1, Py_NewRef(collected));
                ref = connref_type->tp_new(connref_type, pair, NULL);
                PyObject *held_conn = PyTuple_GET_ITEM(pair, 0);
                PyObject *held_callback = PyTuple_GET_ITEM(pair, 1);
                PyTuple_SET_ITEM(pair, 0, NULL);
                PyTuple_SET_ITEM(pair, 1, NULL);
                Py_DECREF(held_conn);
                Py_DECREF(held_callback);
            }
        }
        else if (ref == NULL) {
            ref = connref_called(conn, collected);
        }
        Py_DECREF(collected);
        if (PGLEAK_UNLIKELY(ref == NULL)) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
                goto done;
            }
            PyErr_Clear(); /* not weak-referenceable: "collected" cannot happen to it anyway */
        }
        else if (PGLEAK_UNLIKELY(!PyObject_TypeCheck(ref, connref_type))) {
            Py_DECREF(ref);
            PyErr_SetString(PyExc_TypeError, "_ConnRef() made something else");
            goto done;
        }
        else {
            PyObject *key = conn_key(conn);
            if (key == NULL) {
                Py_DECREF(ref);
                goto done;
            }
            slot_set(ref, ref_lease_id_off, Py_NewRef(SLOT(lease, lease_off[L_ID])));
            slot_set(ref, ref_key_off, Py_NewRef(key));
            slot_set(lease, lease_off[L_REF], ref);
            if (index) {
                slot_set(lease, lease_off[L_KEY], Py_NewRef(key));
                PyObject *by_conn = held(core, a_by_conn, s_by_conn);
                if (PGLEAK_UNLIKELY(by_conn == NULL || !PyDict_Check(by_conn))) {
                    Py_XDECREF(by_conn);
                    Py_DECREF(key);
                    if (!PyErr_Occurred()) {
                        PyErr_SetString(PyExc_TypeError, "Core.by_conn is not a dict");
                    }
                    goto done;
                }
                /* Filed at once if the key is free (the common case: one lookup, not two);
                 * otherwise ``stale`` is what holds it, dealt with, then replaced. */
                PyObject *stale = PyDict_SetDefault(by_conn, key, lease); /* borrowed */
                if (stale == NULL) {
                    Py_DECREF(by_conn);
                    Py_DECREF(key);
                    goto done;
                }
                if (PGLEAK_UNLIKELY(stale != lease && Py_IS_TYPE(stale, lease_type))
                    && checkout_stale(core, conn, stale) < 0) {
                    Py_DECREF(by_conn);
                    Py_DECREF(key);
                    goto done;
                }
                int failed = stale == lease ? 0 : PyDict_SetItem(by_conn, key, lease);
                Py_DECREF(by_conn);
                if (failed < 0) {
                    Py_DECREF(key);
                    goto done;
                }
            }
            Py_DECREF(key);
        }
    }
    if (PGLEAK_UNLIKELY(PyDict_SetItem(leases, SLOT(lease, lease_off[L_ID]), lease) < 0)) {
        goto done;
    }
    /* The rest (the watchdog's first start, an observer, one waiting to wake) is Python's:
     * one attribute check each decides whether to call it; while the answers kept say there
     * is nothing (checked again: Python code may have run since), none. */
    if (!calm(core) && checkout_after(core, lease, since) < 0) {
        goto done;
    }
    result = Py_NewRef(lease);
done:
    Py_XDECREF(settings);
    Py_XDECREF(leases);
    Py_XDECREF(loop);
    Py_XDECREF(task);
    Py_XDECREF(lease);
    return result;
}

PyDoc_STRVAR(checkin_doc, "checkin(core, lease) -> None\n\nCore.checkin.");

/* ``dict.pop(key)`` in one probe: 1 and the value (a new reference) in ``*value``, 0 if the key
 * is missing, -1 on error. */
static inline int
dict_pop(PyObject *dict, PyObject *key, PyObject **value)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyDict_Pop(dict, key, value);
#else
    static PyObject *missing = NULL; /* a default no dict of pgleak's holds */
    if (PGLEAK_UNLIKELY(missing == NULL)) {
        missing = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
        if (missing == NULL) {
            *value = NULL;
            return -1;
        }
    }
    *value = _PyDict_Pop(dict, key, missing);
    if (*value == NULL) {
        return -1;
    }
    if (*value == missing) {
        Py_DECREF(missing);
        *value = NULL;
        return 0;
    }
    return 1;
#endif
}

/* The collected user-facing object's lease: Core.on_collected. */
static PGLEAK_COLD PyObject *
checkin_collected(PyObject *core, PyObject *ref)
{
    return PyObject_CallMethodOneArg(core, s_on_collected, ref);
}

/* Core.checkin itself, for every call the C path leaves to it. */
static PGLEAK_COLD PyObject *
checkin_py(PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    return PyObject_Vectorcall(b_checkin_py, args, nargsf, kwnames);
}

/* The lease was flagged (reported as held too long) before it came back: the watchdog's queue
 * is told of the return. 0, or -1 on error. */
static PGLEAK_COLD int
checkin_late(PyObject *core, PyObject *lease, PyObject *now)
{
    PyObject *pending = held(core, a_pending, s_pending);
    if (pending == NULL) {
        return -1;
    }
    PyObject *entry = PyTuple_Pack(3, b_returned, lease, now);
    PyObject *done = entry == NULL ? NULL : PyObject_CallMethodOneArg(pending, s_append, entry);
    Py_XDECREF(entry);
    Py_DECREF(pending);
    if (done == NULL) {
        return -1;
    }
    Py_DECREF(done);
    return 0;
}

/* The observer told of a checkin (_observe_checkin()), when calm() does not say there is none:
 * apart from the common path without one. 0, or -1 on error. */
static PGLEAK_NOINLINE int
checkin_observed(PyObject *core, PyObject *lease, int late)
{
    PyObject *observer = live(core, s_observer);
    if (observer == NULL) {
        return -1;
    }
    if (observer == Py_None) {
        Py_DECREF(observer);
        return 0;
    }
    if (observe_names() < 0) {
        Py_DECREF(observer);
        return -1;
    }
    PyObject *oargs[4] = {observer, lease, late ? Py_True : Py_False, Py_False};
    int fast = ts_checked_in(observer, lease, late, 0); /* the method's common case, in C */
    int failed = fast == 0 ? observe(s_checked_in, s_site_in, oargs, 4)
                           : fast < 0 ? observe_fault(s_site_in) : 0;
    Py_DECREF(observer);
    return failed < 0 ? -1 : 0;
}

static PyObject *
ledger_checkin(PyObject *module, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (PGLEAK_UNLIKELY(!bound || kwnames != NULL || nargs != 2
                        || !Py_IS_TYPE(args[1], lease_type))) {
        return checkin_py(args, nargsf, kwnames);
    }
    PyObject *core = args[0], *lease = args[1];
    PyObject *ref = SLOT(lease, lease_off[L_REF]);
    if (ref != NULL && ref != Py_None) {
        PyObject *target = PyWeakref_Check(ref) ? ref_target(ref) : NULL;
        if (PGLEAK_UNLIKELY(target == NULL)) {
            /* The pool is returning a connection whose user-facing object was collected:
             * a leak the pool papered over, not a return (see Core.checkin). */
            return checkin_collected(core, ref);
        }
        Py_DECREF(target);
    }
    int quiet = calm(core);
    PyObject *generation = quiet ? calm_generation
                                 : PyDict_GetItemWithError(b_core_globals, s_generation);
    PyObject *mine = SLOT(lease, lease_off[L_GENERATION]);
    if (PGLEAK_UNLIKELY(generation == NULL || mine == NULL)) {
        return PyErr_Occurred() ? NULL : checkin_py(args, nargsf, NULL);
    }
    if (PGLEAK_UNLIKELY(mine != generation)) {
        int same = PyObject_RichCompareBool(mine, generation, Py_EQ);
        if (same < 0) {
            return NULL;
        }
        if (!same) {
            Py_RETURN_NONE; /* checked out before a fork, in the parent */
        }
    }
    PyObject *now = clock_now();
    if (now == NULL) {
        return NULL;
    }
    slot_set(lease, lease_off[L_T_IN], Py_NewRef(now));
    PyObject *key = SLOT(lease, lease_off[L_KEY]);
    if (key != NULL && key != Py_None) {
        PyObject *by_conn = held(core, a_by_conn, s_by_conn);
        if (by_conn == NULL) {
            Py_DECREF(now);
            return NULL;
        }
        if (PyDict_Check(by_conn)) {
            /* ``if by_conn.get(key) is lease: del by_conn[key]`` in one probe: taken out, and
             * put back in the rare case it is another lease's (nothing in between runs Python
             * code: the value is held; nothing reads by_conn's order) */
            PyObject *filed = NULL;
            int found = dict_pop(by_conn, key, &filed);
            if (PGLEAK_UNLIKELY(found > 0 && filed != lease)
                && PyDict_SetItem(by_conn, key, filed) < 0) {
                found = -1;
            }
            Py_XDECREF(filed);
            if (PGLEAK_UNLIKELY(found < 0)) {
                Py_DECREF(by_conn);
                Py_DECREF(now);
                return NULL;
            }
        }
        Py_DECREF(by_conn);
    }
    PyObject *leases = held(core, a_leases, s_leases);
    if (leases == NULL) {
        Py_DECREF(now);
        return NULL;
    }
    PyObject *lease_id = SLOT(lease, lease_off[L_ID]);
    if (PyDict_Check(leases) && lease_id != NULL) {
        if (PyDict_DelItem(leases, lease_id) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                Py_DECREF(leases);
                Py_DECREF(now);
                return NULL;
            }
            PyErr_Clear();
        }
    }
    Py_DECREF(leases);
    PyObject *flagged = SLOT(lease, lease_off[L_FLAGGED]);
    int late = flagged != NULL && PyObject_IsTrue(flagged) > 0;
    if (PGLEAK_UNLIKELY(late) && checkin_late(core, lease, now) < 0) {
        Py_DECREF(now);
        return NULL;
    }
    Py_DECREF(now);
    /* no observer to tell while calm() says so (checked again: Python code may have run since) */
    if (!calm(core) && checkin_observed(core, lease, late) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}
