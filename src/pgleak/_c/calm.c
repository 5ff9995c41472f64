/* pgleak._speedups, part: "anything rare?" in one check; the clock.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

/* ---- "Anything rare?": one check instead of a dozen reads -------------------------------
 *
 * A checkout reads the settings, the fork generation, the watchdog's thread, the observer, the
 * waker and its gate's two globals, and a checkin the generation and the observer: ~10 dict
 * lookups a cycle, whose answers almost never change. For the adopted core they are read once
 * (``calm_now()``, all in one stretch that runs no Python code) and kept for as long as none
 * of the dicts they were read from changes: the core's and the watchdog's instance dicts,
 * _core's module dict, the gate's two module dicts. From 3.12 CPython tells of every change to
 * a dict one watches (``PyDict_AddWatcher``: the callback drops what was kept); before it,
 * every change gives the dict a new version tag, compared at each use. So whoever changed what
 * and however (an attribute set, monkeypatch, a fork's new generation), the next checkout goes
 * back to the reads, which keep the answers again. Only the quiet case is kept (the settings
 * seen, no observer, no waker due, the watchdog running): anything else is read every time,
 * as before. Python keeps nothing up to date for this. 3.13 stores an instance's attributes in
 * the object itself (``Py_TPFLAGS_INLINE_VALUES``) even once its __dict__ exists, and no watcher
 * hears of those stores; a class with a slot of its own keeps them in the dict, which is why
 * Core and Watchdog have one (``_in_dict``). adopt() checks both classes: with inline values
 * (a subclass that lost the slot, say), nothing is kept (``calm_possible``). */
#define CALM_KEPT 1
#if PY_VERSION_HEX >= 0x030C0000
#define CALM_WATCHED 1
static int calm_watcher = -1;

static int
calm_changed(PyDict_WatchEvent event, PyObject *dict, PyObject *key, PyObject *new_value)
{
    (void)event, (void)dict, (void)key, (void)new_value;
    calm_kept = 0;
    return 0;
}

/* Watch ``dict`` (0), or -1 (error cleared: nothing is kept). */
static int
calm_watch(PyObject *dict)
{
    if (calm_watcher < 0) {
        calm_watcher = PyDict_AddWatcher(calm_changed);
    }
    if (calm_watcher < 0 || PyDict_Watch(calm_watcher, dict) < 0) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}
#else
#define CALM_WATCHED 0
static uint64_t calm_core_tag, calm_watchdog_tag, calm_globals_tag, calm_gate_tags[2];

static inline uint64_t
dict_tag(PyObject *dict)
{
    return ((PyDictObject *)dict)->ma_version_tag;
}
#endif
static PyObject *calm_gate[2];     /* the gate's module dicts (strong), or NULL: no waker */
static PyObject *calm_generation;  /* _core._generation when kept (strong) */
/* ``core.checkout`` and ``core.checkin`` when kept (strong, or NULL): while they are the C
 * wrappers' own ledger, the wrappers call it without reading the core's dict (ledger_now). */
static PyObject *calm_ledger[2];
static PyObject *s_checkout, *s_checkin; /* defined with the awaitables' names, below */

/* Whether the kept answers still hold for ``core``: nothing rare to do, ``seen_settings`` are
 * its settings, ``calm_generation`` the generation. */
static inline int
calm(PyObject *core)
{
#if !CALM_KEPT
    (void)core;
    return 0;
#elif CALM_WATCHED
    return calm_kept && core == a_core;
#else
    return calm_kept && core == a_core && dict_tag(a_dict) == calm_core_tag
           && dict_tag(a_watchdog_dict) == calm_watchdog_tag
           && dict_tag(b_core_globals) == calm_globals_tag
           && (calm_gate[0] == NULL
               || (dict_tag(calm_gate[0]) == calm_gate_tags[0]
                   && dict_tag(calm_gate[1]) == calm_gate_tags[1]));
#endif
}

/* A borrowed dict lookup that runs no Python code: ``dict`` holds only str keys here (instance
 * and module dicts), ``name`` is an exact str. NULL if missing (or, never, on error: cleared). */
static inline PyObject *
quiet_get(PyObject *dict, PyObject *name)
{
    PyObject *value = PyDict_GetItemWithError(dict, name);
    if (value == NULL) {
        PyErr_Clear();
    }
    return value;
}

/* Read the answers afresh for the adopted core and keep them if all is quiet (see above).
 * Called where a checkout has just found nothing rare to do; the reads repeat that finding in
 * one stretch with the watches (or tags), so no change can fall between a read and its watch. */
static void
calm_now(PyObject *core)
{
    calm_kept = 0;
    if (!CALM_KEPT || !calm_possible || core != a_core || a_dict == NULL || !PyDict_CheckExact(a_dict)
        || !PyDict_CheckExact(a_watchdog_dict) || !PyDict_CheckExact(b_core_globals)) {
        return;
    }
#if CALM_WATCHED
    if (calm_watch(a_dict) < 0 || calm_watch(a_watchdog_dict) < 0
        || calm_watch(b_core_globals) < 0) {
        return;
    }
#endif
    PyObject *settings = quiet_get(a_dict, s_settings);
    PyObject *generation = quiet_get(b_core_globals, s_generation);
    PyObject *thread = quiet_get(a_watchdog_dict, s_thread);
    PyObject *observer = quiet_get(a_dict, s_observer);
    PyObject *waker = quiet_get(a_dict, s_waker);
    if (settings == NULL || settings != seen_settings || generation == NULL || thread == NULL
        || thread == Py_None || observer != Py_None || waker == NULL) {
        return;
    }
    PyObject *gate[2] = {NULL, NULL};
    if (waker != Py_None) {
        /* a waiting observer: quiet while its gate's two module globals are None */
        PyObject *pair = quiet_get(a_dict, s_wake_gate);
        if (pair == NULL || !PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 4) {
            return;
        }
        for (int i = 0; i < 2; i++) {
            PyObject *owner = PyTuple_GET_ITEM(pair, 2 * i);
            PyObject *name = PyTuple_GET_ITEM(pair, 2 * i + 1);
            if (!PyModule_CheckExact(owner) || !PyUnicode_CheckExact(name)) {
                return;
            }
            gate[i] = PyModule_GetDict(owner);
            if (gate[i] == NULL || !PyDict_CheckExact(gate[i])) {
                return;
            }
#if CALM_WATCHED
            if (calm_watch(gate[i]) < 0) {
                return;
            }
#endif
            if (quiet_get(gate[i], name) != Py_None) {
                return;
            }
        }
    }
#if !CALM_WATCHED
    calm_core_tag = dict_tag(a_dict);
    calm_watchdog_tag = dict_tag(a_watchdog_dict);
    calm_globals_tag = dict_tag(b_core_globals);
    for (int i = 0; i < 2; i++) {
        calm_gate_tags[i] = gate[i] == NULL ? 0 : dict_tag(gate[i]);
    }
#endif
    /* nothing below runs Python code (a module dict and an int outlive these references) */
    for (int i = 0; i < 2; i++) {
        Py_XINCREF(gate[i]);
        Py_XSETREF(calm_gate[i], gate[i]);
    }
    Py_INCREF(generation);
    Py_XSETREF(calm_generation, generation);
    PyObject *ledger[2] = {quiet_get(a_dict, s_checkout), quiet_get(a_dict, s_checkin)};
    PyObject *dropped[2] = {calm_ledger[0], calm_ledger[1]};
    for (int i = 0; i < 2; i++) {
        calm_ledger[i] = Py_XNewRef(ledger[i]);
    }
    calm_kept = 1;
    /* last: freeing a replaced ledger may run Python code, whose changes are then seen */
    Py_XDECREF(dropped[0]);
    Py_XDECREF(dropped[1]);
}

PyDoc_STRVAR(kept_doc,
"kept() -> bool\n\nWhether the ledger keeps its answers to \"anything rare?\" right now (tests).");

static PyObject *
kept(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(a_core != NULL && calm(a_core));
}

/* ``time.monotonic()``. Read here rather than called: the call alone cost more than the clock
 * (~190 instructions, twice a cycle). The value is the one ``time.monotonic()`` gives, computed
 * the same way (CPython's _PyTime_FromTimespec and _PyTime_AsSecondsDouble: nanoseconds, then
 * seconds as a double), so t0 and t_in compare exactly with readings taken in Python. 3.13 has
 * the public PyTime_Monotonic; before it, Linux's clock_gettime(CLOCK_MONOTONIC) is what
 * time.monotonic() reads; anywhere else, or if ``_core._monotonic`` is not time.monotonic, the
 * call. */
static PGLEAK_COLD PyObject *
clock_called(void)
{
    return PyObject_CallNoArgs(b_monotonic);
}

/* ``time.monotonic()``'s value read here (0: ``*seconds`` set), or -1 with an error set (3.13's
 * clock failed, as the call would), or 1: not read here (the call's case). */
static inline int
clock_seconds(double *seconds)
{
#if PY_VERSION_HEX >= 0x030D0000
    if (PGLEAK_LIKELY(own_clock)) {
        PyTime_t t;
        if (PyTime_Monotonic(&t) < 0) {
            return -1;
        }
        *seconds = PyTime_AsSecondsDouble(t);
        return 0;
    }
#elif defined(__linux__) && defined(CLOCK_MONOTONIC)
    if (PGLEAK_LIKELY(own_clock)) {
        struct timespec ts;
        if (PGLEAK_LIKELY(clock_gettime(CLOCK_MONOTONIC, &ts) == 0)) {
            long long ns = (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
            volatile double d; /* as CPython: no rounding changed by optimisation */
            if (PGLEAK_UNLIKELY(ns % 1000000000LL == 0)) {
                d = (double)(ns / 1000000000LL);
            }
            else {
                d = (double)ns;
                d /= 1e9;
            }
            *seconds = d;
            return 0;
        }
    }
#endif
    (void)seconds;
    return 1;
}

static PyObject *
clock_now(void)
{
    double seconds;
    int read = clock_seconds(&seconds);
    if (PGLEAK_LIKELY(read == 0)) {
        return PyFloat_FromDouble(seconds);
    }
    return read < 0 ? NULL : clock_called();
}
