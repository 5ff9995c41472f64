/* pgleak._speedups, part: Core.checkout and Core.checkin.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

PyDoc_STRVAR(checkout_doc,
"checkout(core, pool, conn=None, index=False, since=None) -> Lease | None\n\n"
"Core.checkout, positional arguments only (anything else goes to the Python method).");

static PyObject *
ledger_checkout(PyObject *module, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (!bound || kwnames != NULL || nargs < 2 || nargs > 5) {
        return PyObject_Vectorcall(b_checkout_py, args, nargsf, kwnames);
    }
    PyObject *core = args[0], *pool = args[1];
    PyObject *conn = nargs > 2 ? args[2] : Py_None;
    int index = nargs > 3 ? PyObject_IsTrue(args[3]) : 0;
    PyObject *since = nargs > 4 ? args[4] : Py_None;
    if (index < 0) {
        return NULL;
    }
    PyObject *settings = NULL, *leases = NULL, *value = NULL, *lease = NULL, *task = Py_None;
    PyObject *loop = NULL, *result = NULL, *observed = NULL;
    Py_INCREF(task);

    int quiet = calm(core); /* the settings seen last are this core's, nothing rare to do */
    if (!quiet) {
        settings = live(core, s_settings);
        if (settings == NULL || read_settings(settings) < 0) {
            goto done;
        }
    }
    if (!set_enabled) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    value = vars_used ? var_get(b_suppressed) : Py_NewRef(var_defaults[0]);
    if (value == NULL) {
        goto done;
    }
    int truth = PyObject_IsTrue(value);
    Py_CLEAR(value);
    if (truth != 0) {
        result = truth < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    leases = held(core, a_leases, s_leases);
    if (leases == NULL || !PyDict_CheckExact(leases)) {
        /* not the ledger Core.__init__ made: let the Python method deal with it */
        Py_CLEAR(leases);
        PyErr_Clear();
        result = PyObject_Vectorcall(b_checkout_py, args, nargsf, kwnames);
        goto done;
    }
    if (PyDict_GET_SIZE(leases) >= set_max_tracked) {
        /* the bound: the Python method warns and counts */
        result = PyObject_Vectorcall(b_checkout_py, args, nargsf, kwnames);
        goto done;
    }
    double threshold = set_leak_threshold;
    value = vars_used ? var_get(b_allowance) : Py_NewRef(var_defaults[1]);
    if (value == NULL) {
        goto done;
    }
    double extra = PyFloat_AsDouble(value);
    Py_CLEAR(value);
    if (extra == -1.0 && PyErr_Occurred()) {
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
    lease = PyType_GenericAlloc(lease_type, 0);
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
    if (generation == NULL || SLOT(lease, lease_off[L_DEADLINE]) == NULL
        || SLOT(lease, lease_off[L_RAW]) == NULL) {
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
    if (lease_id == NULL) {
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
        PyObject *ref;
        if (connref_plain) {
            /* _ConnRef(conn, collected) without type_call around it: weakref's tp_init only
             * checks the arguments its tp_new has taken already. Its arguments' tuple is
             * the same one each time, emptied after the call (weakref's tp_new keeps no
             * reference to it, runs no Python code), made anew only if something kept it;
             * untracked, so that the collector never hands it, empty, to Python code. */
            static PyObject *pair = NULL;
            if (pair == NULL || Py_REFCNT(pair) != 1) {
                Py_XSETREF(pair, PyTuple_New(2));
                if (pair != NULL && PyObject_GC_IsTracked(pair)) {
                    PyObject_GC_UnTrack(pair);
                }
            }
            if (pair == NULL) {
                ref = NULL;
            }
            else {
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
        else {
            PyObject *cargs[2] = {conn, collected};
            ref = PyObject_Vectorcall((PyObject *)connref_type, cargs, 2, NULL);
        }
        Py_DECREF(collected);
        if (ref == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
                goto done;
            }
            PyErr_Clear(); /* not weak-referenceable: "collected" cannot happen to it anyway */
        }
        else if (!PyObject_TypeCheck(ref, connref_type)) {
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
                if (by_conn == NULL || !PyDict_Check(by_conn)) {
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
                if (stale != lease && Py_IS_TYPE(stale, lease_type)) {
                    PyObject *stale_ref = SLOT(stale, lease_off[L_REF]);
                    PyObject *target = (stale_ref != NULL && PyWeakref_Check(stale_ref))
                                           ? ref_target(stale_ref) : NULL;
                    if (target == conn) {
                        /* The pool lent this connection again, so it had it back; the old
                         * lease's checkin went unseen (a path the adapter does not hook). */
                        Py_INCREF(stale);
                        PyObject *gone = PyObject_CallMethodOneArg(core, s_forget, stale);
                        Py_DECREF(stale);
                        if (gone == NULL) {
                            Py_DECREF(target);
                            Py_DECREF(by_conn);
                            Py_DECREF(key);
                            goto done;
                        }
                        Py_DECREF(gone);
                    }
                    Py_XDECREF(target);
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
    if (PyDict_SetItem(leases, SLOT(lease, lease_off[L_ID]), lease) < 0) {
        goto done;
    }
    /* The rest (the watchdog's first start, an observer, one waiting to wake) is Python's:
     * one attribute check each decides whether to call it; while the answers kept say there
     * is nothing (checked again: Python code may have run since), none. */
    if (calm(core)) {
        result = Py_NewRef(lease);
        goto done;
    }
    int later = watchdog_idle(core);
    if (later < 0) {
        goto done;
    }
    if (!later) {
        value = live(core, s_observer);
        if (value == NULL) {
            goto done;
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
            goto done;
        }
        later = value != Py_None;
        Py_CLEAR(value);
        if (later) {
            later = wake_due(core);
            if (later < 0) {
                goto done;
            }
        }
    }
    if (later && observed) {
        /* _after_checkout()'s common case: the watchdog running, an observer to tell */
        if (observe_names() < 0) {
            goto done;
        }
        int failed = trace_checkout(observed, lease, since);
        if (failed == 0) {
            PyObject *oargs[3] = {observed, lease, since};
            failed = observe(s_checked_out, s_site_out, oargs, 3);
        }
        else {
            failed = failed < 0 ? observe_fault(s_site_out) : 0;
        }
        Py_CLEAR(observed);
        if (failed < 0) {
            goto done;
        }
    }
    else if (later) {
        value = PyObject_CallMethodObjArgs(core, s_after_checkout, lease, since, NULL);
        if (value == NULL) {
            goto done;
        }
        Py_CLEAR(value);
    }
    else {
        calm_now(core);
    }
    result = Py_NewRef(lease);
done:
    Py_XDECREF(settings);
    Py_XDECREF(leases);
    Py_XDECREF(loop);
    Py_XDECREF(task);
    Py_XDECREF(lease);
    Py_XDECREF(observed);
    return result;
}

PyDoc_STRVAR(checkin_doc, "checkin(core, lease) -> None\n\nCore.checkin.");

static PyObject *
ledger_checkin(PyObject *module, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (!bound || kwnames != NULL || nargs != 2 || !Py_IS_TYPE(args[1], lease_type)) {
        return PyObject_Vectorcall(b_checkin_py, args, nargsf, kwnames);
    }
    PyObject *core = args[0], *lease = args[1];
    PyObject *ref = SLOT(lease, lease_off[L_REF]);
    if (ref != NULL && ref != Py_None) {
        PyObject *target = PyWeakref_Check(ref) ? ref_target(ref) : NULL;
        if (target == NULL) {
            /* The pool is returning a connection whose user-facing object was collected:
             * a leak the pool papered over, not a return (see Core.checkin). */
            return PyObject_CallMethodOneArg(core, s_on_collected, ref);
        }
        Py_DECREF(target);
    }
    int quiet = calm(core);
    PyObject *generation = quiet ? calm_generation
                                 : PyDict_GetItemWithError(b_core_globals, s_generation);
    PyObject *mine = SLOT(lease, lease_off[L_GENERATION]);
    if (generation == NULL || mine == NULL) {
        return PyErr_Occurred() ? NULL : PyObject_Vectorcall(b_checkin_py, args, nargsf, NULL);
    }
    if (mine != generation) {
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
            PyObject *filed = PyDict_GetItemWithError(by_conn, key);
            if (filed == lease && PyDict_DelItem(by_conn, key) < 0) {
                PyErr_Clear(); /* another thread took it first: the same end */
            }
            else if (filed == NULL && PyErr_Occurred()) {
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
    if (late) {
        PyObject *pending = held(core, a_pending, s_pending);
        if (pending == NULL) {
            Py_DECREF(now);
            return NULL;
        }
        PyObject *entry = PyTuple_Pack(3, b_returned, lease, now);
        PyObject *done = entry == NULL ? NULL : PyObject_CallMethodOneArg(pending, s_append, entry);
        Py_XDECREF(entry);
        Py_DECREF(pending);
        if (done == NULL) {
            Py_DECREF(now);
            return NULL;
        }
        Py_DECREF(done);
    }
    Py_DECREF(now);
    if (calm(core)) {
        Py_RETURN_NONE; /* no observer (checked again: Python code may have run since) */
    }
    PyObject *observer = live(core, s_observer);
    if (observer == NULL) {
        return NULL;
    }
    if (observer == Py_None) {
        Py_DECREF(observer);
        Py_RETURN_NONE;
    }
    /* _observe_checkin(), every traced checkin */
    if (observe_names() < 0) {
        Py_DECREF(observer);
        return NULL;
    }
    PyObject *oargs[4] = {observer, lease, late ? Py_True : Py_False, Py_False};
    int fast = ts_checked_in(observer, lease, late, 0); /* the method's common case, in C */
    int failed = fast == 0 ? observe(s_checked_in, s_site_in, oargs, 4)
                           : fast < 0 ? observe_fault(s_site_in) : 0;
    Py_DECREF(observer);
    if (failed < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}
