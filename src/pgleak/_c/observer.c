/* pgleak._speedups, part: the observer told by the ledger itself.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

/* ---- the observer told by the ledger itself (issue 12) ---------------------------------
 *
 * Core._after_checkout / _observe_checkin were a Python frame each between the C ledger and
 * the observer's ``checked_out`` / ``checked_in`` on every traced cycle (~1,000 instructions
 * each). Their common case (an observer running; at a checkout, the watchdog started too) is
 * here: the observer's method called with the same arguments, a fault (an ``Exception``)
 * handed to _core's ``internal_error`` (looked up then, as the Python method's global) at the
 * same site, anything else propagated. The rare cases still go to the Python methods. */

static PyObject *s_checked_out, *s_checked_in, *s_internal_error, *s_site_out, *s_site_in;

static int swallow(PyObject *report, PyObject *site);
static int observe_fault(PyObject *site);

/* The names above, made on first use (0), or -1 with an error set. */
static int
observe_names(void)
{
    if (s_site_in != NULL) {
        return 0;
    }
    s_checked_out = PyUnicode_InternFromString("checked_out");
    s_checked_in = PyUnicode_InternFromString("checked_in");
    s_internal_error = PyUnicode_InternFromString("internal_error");
    s_site_out = PyUnicode_InternFromString("observer.checkout");
    if (!s_checked_out || !s_checked_in || !s_internal_error || !s_site_out) {
        return -1;
    }
    s_site_in = PyUnicode_InternFromString("observer.checkin");
    return s_site_in == NULL ? -1 : 0;
}

/* ``observer.<name>(*args)`` (``args[0]`` is the observer; observe_names() done), as
 * ``try: ... except Exception as exc: internal_error(site, exc)``: 0, or -1 with an error set
 * (not an Exception). */
static int
observe(PyObject *name, PyObject *site, PyObject *const *args, size_t nargs)
{
    PyObject *done = PyObject_VectorcallMethod(name, args, nargs, NULL);
    if (done != NULL) {
        Py_DECREF(done);
        return 0;
    }
    return observe_fault(site);
}

/* The current exception, raised where the observer was told at ``site``: an Exception handed
 * to _core's ``internal_error(site, exc)`` (0), anything else left set (-1). */
static int
observe_fault(PyObject *site)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    PyObject *report = PyDict_GetItemWithError(b_core_globals, s_internal_error);
    if (report == NULL) {
        return -1; /* _core without its internal_error: the fault stands */
    }
    Py_INCREF(report);
    int failed = swallow(report, site);
    Py_DECREF(report);
    return failed;
}
