/* pgleak._speedups, part: an asyncio checkout's task and its stack.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

/* ---- An asyncio checkout's task, cheaper (SQLAlchemy's asyncio engine, asyncpg, psycopg_pool)
 *
 * Per asyncio checkout the ledger asks for the running task (``_current_task(loop)``), its
 * identity for the report (``(weakref.ref(task), task.get_name())``) and the stack from the
 * caller's frame. Counted on SQLAlchemy's asyncio cycle: the call to ``dict.get`` ~200
 * instructions, ``get_name()`` by name ~210, a new weak reference and pair each time, freed at
 * checkin, ~800, and the frame object PyEval_GetFrame() makes for the caller's frame (which the
 * walk below reads as an interpreter frame anyway) ~400 with its deallocation. The same values,
 * without those: */

/* ``_current_task(loop)``: where that is ``_current_tasks.get`` (before 3.12), the dict is
 * read directly, with the same lookup ``get`` makes. A new reference (None: no task). */
static PyObject *
current_task_of(PyObject *loop)
{
    static PyCFunction dict_get = NULL;
    if (dict_get == NULL) {
        PyObject *probe = PyDict_New();
        PyObject *get = probe == NULL ? NULL : PyObject_GetAttrString(probe, "get");
        if (get != NULL && PyCFunction_Check(get)) {
            dict_get = PyCFunction_GET_FUNCTION(get);
        }
        Py_XDECREF(get);
        Py_XDECREF(probe);
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *f = b_current_task;
    if (dict_get != NULL && PyCFunction_Check(f) && PyCFunction_GET_FUNCTION(f) == dict_get) {
        PyObject *tasks = PyCFunction_GET_SELF(f);
        if (tasks != NULL && PyDict_CheckExact(tasks)) {
            PyObject *task = PyDict_GetItemWithError(tasks, loop); /* borrowed */
            if (task != NULL) {
                return Py_NewRef(task);
            }
            return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        }
    }
    return PyObject_CallOneArg(f, loop);
}

/* ``(weakref.ref(task), task.get_name())`` for the lease. The pair is immutable and a task's
 * weak reference without a callback is one object while it lives (CPython hands out the same
 * one), so the last pair made is given again while it is still of this task and this name
 * object (``set_name()`` makes another): a loop of checkouts in one task makes none. Holds no
 * strong reference to the task. ``get_name`` of a type that cannot change (asyncio's C Task)
 * is called through its method descriptor, without a bound method. A new reference. */
static PyObject *last_task_pair = NULL;

static PyObject *
task_identity(PyObject *task)
{
    static PyTypeObject *named_type = NULL; /* a strong reference, with named_by */
    static PyObject *named_by = NULL;       /* its get_name's method descriptor, or NULL */
    PyTypeObject *type = Py_TYPE(task);
    if (type != named_type && PyType_HasFeature(type, Py_TPFLAGS_IMMUTABLETYPE)) {
        PyObject *descr = _PyType_Lookup(type, s_get_name); /* borrowed */
        Py_XSETREF(named_by,
                   descr != NULL && Py_IS_TYPE(descr, &PyMethodDescr_Type) ? Py_NewRef(descr)
                                                                           : NULL);
        Py_INCREF(type);
        Py_XSETREF(named_type, type);
    }
    PyObject *name = type == named_type && named_by != NULL
                         ? PyObject_Vectorcall(named_by, &task, 1, NULL)
                         : PyObject_CallMethodNoArgs(task, s_get_name);
    if (name == NULL) {
        return NULL;
    }
    PyObject *pair = last_task_pair;
    if (pair != NULL && PyTuple_GET_ITEM(pair, 1) == name) {
        PyObject *target = ref_target(PyTuple_GET_ITEM(pair, 0));
        Py_XDECREF(target); /* only compared */
        if (target == task) {
            Py_DECREF(name);
            return Py_NewRef(pair);
        }
    }
    PyObject *ref = PyWeakref_NewRef(task, NULL);
    if (ref == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    pair = PyTuple_Pack(2, ref, name);
    Py_DECREF(ref);
    Py_DECREF(name);
    if (pair != NULL) {
        Py_XSETREF(last_task_pair, Py_NewRef(pair));
    }
    return pair;
}

#ifdef PGLEAK_IFRAMES
/* PyEval_GetFrame()'s frame, as the interpreter frame (the first complete one), without
 * making its frame object; NULL when there is none. */
static iframe *
current_iframe(void)
{
    PyThreadState *tstate = PyThreadState_GET();
#  if PY_VERSION_HEX >= 0x030D0000
    iframe *f = tstate->current_frame;
#  else
    iframe *f = tstate->cframe->current_frame;
#  endif
    while (f != NULL && _PyFrame_IsIncomplete(f)) {
        f = f->previous;
    }
    return f;
}
#endif

/* pgleak._stack._parent_greenlet_frame(), with ``*current`` for its list: the suspended
 * frame of the greenlet that switched into ``*current`` (the running greenlet when NULL),
 * which becomes ``*current``; None when there is none. A new reference, NULL on error. */
static PyObject *
parent_greenlet_frame(PyObject **current)
{
    if (*current == NULL) {
        /* greenlet.getcurrent, kept once greenlet is imported (a module is not unloaded;
         * finding it in sys.modules costs more than the call) */
        static PyObject *getcurrent = NULL;
        if (getcurrent == NULL) {
            PyObject *module = PyImport_GetModule(s_greenlet);
            if (module == NULL || module == Py_None) { /* not imported, or blocked */
                Py_XDECREF(module);
                return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
            }
            getcurrent = PyObject_GetAttr(module, s_getcurrent);
            Py_DECREF(module);
            if (getcurrent == NULL) {
                return NULL;
            }
        }
        *current = PyObject_CallNoArgs(getcurrent);
        if (*current == NULL) {
            return NULL;
        }
    }
    PyObject *parent = NULL;
    if (PyObject_GetOptionalAttr(*current, s_parent, &parent) < 0) {
        return NULL;
    }
    if (parent == NULL || parent == Py_None) {
        Py_XDECREF(parent);
        return Py_NewRef(Py_None);
    }
    Py_SETREF(*current, parent);
    PyObject *frame = NULL;
    if (PyObject_GetOptionalAttr(parent, s_gr_frame, &frame) < 0) {
        return NULL;
    }
    return frame == NULL ? Py_NewRef(Py_None) : frame;
}

/* walk()'s walk, into ``items`` (room for 2 * ``limit``; ``*n`` in use, new references),
 * for task_capture() (``start`` NULL: from current_iframe(), 3.11 to 3.13 only): 0 full,
 * 1 the chain ended, 2 the event loop's frame, 3 a frame with no cached verdict
 * (task_capture() then hands the whole capture to Python), -1 an error. */
static int
walk_into(PyObject *start, Py_ssize_t limit, PyObject *cache, PyObject *pseudo,
          PyObject **items, Py_ssize_t *n)
{
    PyObject *last_file = NULL;
    long last_verdict = UNKNOWN;
#ifdef PGLEAK_IFRAMES
    if (start == NULL || ((PyFrameObject *)start)->f_back == NULL) {
        iframe *f = start == NULL ? current_iframe() : ((PyFrameObject *)start)->f_frame;
        for (; f != NULL; f = iframe_back(f)) {
            if (*n >= 2 * limit) {
                return 0;
            }
            PyCodeObject *code = iframe_code(f);
            long verdict = verdict_near(cache, pseudo, code, &last_file, &last_verdict);
            if (verdict == KEEP) {
                PyObject *lasti = lasti_int(iframe_lasti(f));
                if (lasti == NULL) {
                    return -1;
                }
                items[(*n)++] = Py_NewRef(code);
                items[(*n)++] = lasti;
            }
            else if (verdict == SKIP_LOOP) {
                return 2;
            }
            else if (verdict != SKIP) {
                return PyErr_Occurred() ? -1 : 3;
            }
        }
        return 1;
    }
#endif
    PyFrameObject *frame = (PyFrameObject *)Py_NewRef(start);
    for (; frame != NULL; frame = back(frame)) {
        if (*n >= 2 * limit) {
            Py_DECREF(frame);
            return 0;
        }
        PyCodeObject *code = PyFrame_GetCode(frame);
        long verdict = verdict_near(cache, pseudo, code, &last_file, &last_verdict);
        if (verdict == KEEP) {
            PyObject *lasti = lasti_int(frame_lasti(frame));
            if (lasti == NULL) {
                Py_DECREF(code);
                Py_DECREF(frame);
                return -1;
            }
            items[(*n)++] = (PyObject *)code;
            items[(*n)++] = lasti;
            continue;
        }
        Py_DECREF(code);
        if (verdict == SKIP_LOOP || verdict != SKIP) {
            Py_DECREF(frame);
            return verdict == SKIP_LOOP ? 2 : (PyErr_Occurred() ? -1 : 3);
        }
    }
    return 1;
}

/* pgleak._stack._capture_in_task(frame, limit, task, False), step for step, for the common
 * case: the walk's caches know every frame (a frame to judge hands the whole capture back to
 * Python: None), greenlet boundaries are crossed here, and the task's coroutine chain is merged
 * by Python only when chain_in() says the walk missed one of its frames. Every asyncio
 * checkout runs this; the pairs are gathered in a buffer and made a tuple once. */
static PyObject *
task_capture(PyObject *start, PyObject *depth, PyObject *task)
{
    Py_ssize_t limit = PyLong_AsSsize_t(depth);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit < 0) {
        limit = 0;
    }
    PyObject *small[64];
    PyObject **items = small;
    if (2 * limit > 64) {
        items = PyMem_Malloc(2 * (size_t)limit * sizeof(PyObject *));
        if (items == NULL) {
            return PyErr_NoMemory();
        }
    }
    Py_ssize_t n = 0;
    PyObject *greenlets = NULL, *result = NULL;
    PyObject *frame = Py_XNewRef(start);
    Py_ssize_t loop_at = -1;
    int hops = 0, status = 1;
    int here = start == NULL; /* from the current frame, with no frame object (walk_into) */
    while (here || (frame != NULL && frame != Py_None)) {
        if (!here && !PyFrame_Check(frame)) { /* a greenlet's gr_frame that is not one */
            goto python;
        }
        status = walk_into(frame, limit, b_skip_cache, b_pseudo, items, &n);
        here = 0;
        Py_CLEAR(frame);
        if (status < 0) {
            goto done;
        }
        if (status == 0) {
            goto full;
        }
        if (status == 2) {
            loop_at = n;
            break;
        }
        if (status == 3) {
            goto python;
        }
        /* the chain ended: the suspended parent greenlet's frames come next, if any */
        if (n >= 2 * limit) {
            goto full;
        }
        if (hops < 8) {
            hops++;
            frame = parent_greenlet_frame(&greenlets);
            if (frame == NULL) {
                goto done;
            }
        }
    }
    Py_CLEAR(frame);
    /* _add_task_chain(): nothing to add when the walk saw every frame of the chain */
    PyObject *coro = PyObject_CallMethodNoArgs(task, s_get_coro);
    if (coro == NULL) {
        PyErr_Clear(); /* as _add_task_chain: a best-effort completion */
        goto full;
    }
    int whole = chain_in(items, n, coro, b_skip_cache, b_pseudo);
    Py_DECREF(coro);
    if (whole < 0) {
        goto done;
    }
    if (!whole) {
        /* the merge is Python's, on a list; then cut to the limit */
        PyObject *out = PyList_New(n);
        if (out == NULL) {
            goto done;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyList_SET_ITEM(out, i, items[i]); /* the list owns them now */
        }
        n = 0;
        PyObject *added = NULL, *at = PyLong_FromSsize_t(loop_at);
        if (at != NULL) {
            added = PyObject_CallFunctionObjArgs(b_add_task_chain, out, task, at, NULL);
            Py_DECREF(at);
        }
        if (added != NULL) {
            Py_DECREF(added);
            Py_ssize_t size = PyList_GET_SIZE(out);
            if (size <= 2 * limit || PyList_SetSlice(out, 2 * limit, size, NULL) == 0) {
                result = PyList_AsTuple(out);
            }
        }
        Py_DECREF(out);
        goto done;
    }
full:
    result = PyTuple_New(n);
    if (result != NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyTuple_SET_ITEM(result, i, items[i]); /* steals */
        }
        n = 0;
    }
    goto done;
python:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(frame);
    Py_XDECREF(greenlets);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_DECREF(items[i]);
    }
    if (items != small) {
        PyMem_Free(items);
    }
    return result;
}

PyDoc_STRVAR(capture_task_doc,
"capture_task(frame, limit, task) -> tuple | None\n\n"
"pgleak._stack._capture_in_task(frame, limit, task, False) where the caches know every frame;\n"
"None when Python must judge a frame (or before bind()): the caller runs the Python walk.");

static PyObject *
capture_task(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyFrame_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "capture_task(frame, limit: int, task)");
        return NULL;
    }
    if (!bound) {
        Py_RETURN_NONE;
    }
    return task_capture(args[0], args[1], args[2]);
}

#ifdef PGLEAK_IFRAMES
/* capture()'s walk for a thread's checkout, over the interpreter frames from
 * current_iframe(): the same verdicts, the same pairs, but no frame object for any frame
 * (PyFrame_GetBack() made one for each frame stepped to: ~1,100 instructions of a 20-frame
 * checkout). None when a frame to judge has no cached verdict: the caller then hands the
 * frame objects to capture() and Python, as before. */
static PyObject *
capture_iframes(iframe *f, PyObject *depth, PyObject *cache, PyObject *pseudo)
{
    Py_ssize_t limit = PyLong_AsSsize_t(depth);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit < 0) {
        limit = 0;
    }
    PyObject *last_file = NULL; /* see verdict_near() */
    long last_verdict = UNKNOWN;
    while (f != NULL) {
        long verdict = verdict_near(cache, pseudo, iframe_code(f), &last_file, &last_verdict);
        if (verdict == UNKNOWN) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        if (verdict == KEEP) {
            break;
        }
        f = iframe_back(f);
    }
    PyObject *small[64];
    PyObject **items = small;
    if (2 * limit > 64) {
        items = PyMem_Malloc(2 * (size_t)limit * sizeof(PyObject *));
        if (items == NULL) {
            return PyErr_NoMemory();
        }
    }
    Py_ssize_t n = 0;
    int failed = 0;
    while (f != NULL && n < 2 * limit) {
        PyObject *lasti = lasti_int(iframe_lasti(f));
        if (lasti == NULL) {
            failed = 1;
            break;
        }
        items[n++] = Py_NewRef((PyObject *)iframe_code(f));
        items[n++] = lasti;
        f = iframe_back(f);
    }
    return pairs_tuple(items, n, failed, small);
}
#endif

/* The raw stack for a checkout made by the caller's caller (the adapter's wrapper). Not inlined
 * into the checkout: without the stack (``capture_stack=False``) its code stays off the lines
 * the checkout's common path touches. */
static PGLEAK_NOINLINE PyObject *
checkout_stack(PyObject *task)
{
    PyObject *depth = set_stack_depth;
    PyObject *raw;
#ifdef PGLEAK_IFRAMES
    /* the task's walk from the interpreter frame: no frame object unless Python is asked */
    if (task != Py_None) {
        if (current_iframe() == NULL) {
            return PyTuple_New(0);
        }
        raw = task_capture(NULL, depth, task);
        if (raw != Py_None) {
            return raw; /* or NULL */
        }
        Py_DECREF(raw);
        PyFrameObject *at = PyEval_GetFrame(); /* borrowed */
        if (at == NULL) {
            return PyTuple_New(0);
        }
        return PyObject_CallFunctionObjArgs(b_capture_in_task, (PyObject *)at, depth, task,
                                            Py_False, NULL);
    }
    iframe *current = current_iframe();
    if (current == NULL) {
        return PyTuple_New(0);
    }
    raw = capture_iframes(current, depth, b_skip_cache, b_pseudo);
    if (raw != Py_None) {
        return raw; /* or NULL */
    }
    Py_DECREF(raw);
#endif
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed: the wrapper's frame */
    if (frame == NULL) {
        return PyTuple_New(0);
    }
    if (task != Py_None) {
        raw = task_capture((PyObject *)frame, depth, task);
        if (raw == Py_None) {
            Py_DECREF(raw);
            raw = PyObject_CallFunctionObjArgs(b_capture_in_task, (PyObject *)frame, depth,
                                               task, Py_False, NULL);
        }
    }
    else {
        PyObject *args[4] = {(PyObject *)frame, depth, b_skip_cache, b_pseudo};
        raw = capture(NULL, args, 4);
        if (raw == Py_None) {
            Py_DECREF(raw);
            raw = PyObject_CallFunctionObjArgs(b_capture_from, (PyObject *)frame, depth, NULL);
        }
    }
    return raw;
}

/* Whether a waiting observer must be asked (Core.wake_gate): 1 yes, 0 no, -1 error. While
 * both gate attributes are None (OpenTelemetry's global providers, no SDK) it has nothing to
 * say, and asking it would be a Python call on every checkout. */
static int
wake_due(PyObject *core)
{
    PyObject *gate = live(core, s_wake_gate);
    if (gate == NULL) {
        return -1;
    }
    if (!PyTuple_CheckExact(gate) || PyTuple_GET_SIZE(gate) != 4) {
        Py_DECREF(gate);
        return 1;
    }
    int due = 0;
    for (int i = 0; i < 4 && !due; i += 2) {
        PyObject *owner = PyTuple_GET_ITEM(gate, i), *name = PyTuple_GET_ITEM(gate, i + 1);
        PyObject *value = NULL;
        if (PyModule_CheckExact(owner) && PyUnicode_CheckExact(name)) {
            /* a module global: its dict, without the generic lookup */
            value = PyDict_GetItemWithError(PyModule_GetDict(owner), name);
            Py_XINCREF(value);
        }
        if (value == NULL && !PyErr_Occurred()) {
            value = PyObject_GetAttr(owner, name);
        }
        if (value == NULL) {
            Py_DECREF(gate);
            return -1;
        }
        due = value != Py_None;
        Py_DECREF(value);
    }
    Py_DECREF(gate);
    return due;
}
