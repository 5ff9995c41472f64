/* pgleak._speedups: the checkout hot path, in C - the stack walk, the ledger, the checkout
 * and checkin wrappers that call the ledger (``Tracked``: sync, and asyncio ones that return
 * an awaitable), and the awaitables that let an asyncio pool's wrappers do without a
 * coroutine of their own.
 *
 * Every checkout records up to ``stack_depth`` (code, f_lasti) pairs. In Python each frame costs
 * three attribute reads, two appends and the loop's own bytecode, about 100 ns: 1.6 us of a
 * 16-frame stack, more than everything else a checkout did. Here it is a pointer walk.
 *
 * The verdicts (keep / skip / stop at the event loop / ask the frame's module) stay in Python
 * (pgleak/_stack.py): this module only reads their cache, a dict from ``co_filename`` to an
 * int, and hands the frame back to Python whenever the cache has no answer, so there is one
 * definition of which frames count. The ledger's ``checkout``/``checkin`` (_c/ledger.c)
 * follow the same rule: the common path here, every rare one handed to Core's Python
 * methods; so do the traced checkout's span (_c/otel_*.c), the wrappers, the awaitables and
 * the blocks (_c/tracked*.c, _c/awaiting.c, _c/blocks.c, _c/scope.c), which hand theirs to
 * the compiled Python templates they stand in for (an observer's, a call-site tag's, ...). pgleak
 * runs all of it in Python when this module is absent (no compiler at install time) or
 * disabled (``PGLEAK_NO_SPEEDUPS=1``).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <structmember.h>
#include <time.h>

/* The parts, in the order each builds on the ones before, kept in files by responsibility
 * (issue 12: one file had grown to ~6,800 lines). One translation unit: each part uses the
 * statics of the ones before it as it did in one file, every helper stays static (no exported
 * symbols, nothing for the linker to resolve) and the compiler sees the same text. A new part
 * goes where what it uses is already defined, and into pyproject.toml's ``depends``. */
#include "_c/frames.c" /* interpreter frames, version shims, a code object's cached verdict */
#include "_c/stack.c" /* the files' verdicts and the stack walks (capture, walk, chain_complete) */
#include "_c/ledger_state.c" /* the ledger's binding to pgleak._core, its settings, the thread's identity */
#include "_c/running_loop.c" /* asyncio's running loop without a system call */
#include "_c/task.c" /* an asyncio checkout's task and its stack */
#include "_c/calm.c" /* "anything rare?" in one check; the clock */
#include "_c/observer.c" /* the observer told by the ledger itself */
#include "_c/otel_checkout.c" /* a traced checkout's state (_Trace), made in C */
#include "_c/otel_span.c" /* a traced checkout's span, started, made current and ended in C */
#include "_c/ledger.c" /* Core.checkout and Core.checkin */
#include "_c/awaiting.c" /* the awaitables that stand in for pgleak's coroutines */
#include "_c/tracked.c" /* the checkout and checkin wrappers (Tracked): shared parts */
#include "_c/observed.c" /* an observer's checkout, without the template's frame */
#include "_c/tracked_sync.c" /* the sync wrappers' calls, the Tracked type and its constructors */
#include "_c/tracked_async.c" /* the asyncio wrappers: AACQUIRE, ARELEASE, HOLDER_RELEASE */
#include "_c/blocks.c" /* asyncpg's and SQLAlchemy's blocks while an observer runs */
#include "_c/scope.c" /* a checkout's with block (Scope) */

static PyMethodDef methods[] = {
    {"capture", (PyCFunction)(void (*)(void))capture, METH_FASTCALL, capture_doc},
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL, walk_doc},
    {"chain_complete", (PyCFunction)(void (*)(void))chain_complete, METH_FASTCALL,
     chain_complete_doc},
    {"capture_task", (PyCFunction)(void (*)(void))capture_task, METH_FASTCALL,
     capture_task_doc},
    {"acquiring", (PyCFunction)(void (*)(void))acquiring, METH_FASTCALL, acquiring_doc},
    {"releasing", (PyCFunction)(void (*)(void))releasing, METH_FASTCALL, releasing_doc},
    {"bind", bind, METH_O, bind_doc},
    {"adopt", adopt, METH_O, adopt_doc},
    {"forget_thread", forget_thread, METH_NOARGS, forget_thread_doc},
    {"vars_set", vars_set, METH_NOARGS, vars_set_doc},
    {"vars_read", vars_read, METH_NOARGS, vars_read_doc},
    {"kept", kept, METH_NOARGS, kept_doc},
    {"leases_kept", leases_kept, METH_NOARGS, leases_kept_doc},
    {"connrefs_kept", connrefs_kept, METH_NOARGS, connrefs_kept_doc},
    {"checkout", (PyCFunction)(void (*)(void))ledger_checkout, METH_FASTCALL | METH_KEYWORDS,
     checkout_doc},
    {"checkin", (PyCFunction)(void (*)(void))ledger_checkin, METH_FASTCALL | METH_KEYWORDS,
     checkin_doc},
    {"trace_bind", (PyCFunction)(void (*)(void))trace_bind, METH_FASTCALL, trace_bind_doc},
    {"trace_span_bind", (PyCFunction)(void (*)(void))trace_span_bind, METH_FASTCALL,
     trace_span_bind_doc},
    {"trace_block", (PyCFunction)(void (*)(void))trace_block, METH_FASTCALL, trace_block_doc},
    {"acquire_wrapper", (PyCFunction)(void (*)(void))acquire_wrapper, METH_FASTCALL,
     acquire_wrapper_doc},
    {"release_wrapper", (PyCFunction)(void (*)(void))release_wrapper, METH_FASTCALL,
     release_wrapper_doc},
    {"sqlalchemy_wrapper", (PyCFunction)(void (*)(void))sqlalchemy_wrapper, METH_FASTCALL,
     sqlalchemy_wrapper_doc},
    {"retry_wrapper", (PyCFunction)(void (*)(void))retry_wrapper, METH_FASTCALL,
     retry_wrapper_doc},
    {"aacquire_wrapper", (PyCFunction)(void (*)(void))aacquire_wrapper, METH_FASTCALL,
     aacquire_wrapper_doc},
    {"arelease_wrapper", (PyCFunction)(void (*)(void))arelease_wrapper, METH_FASTCALL,
     arelease_wrapper_doc},
    {"holder_release_wrapper", (PyCFunction)(void (*)(void))holder_release_wrapper,
     METH_FASTCALL, holder_release_wrapper_doc},
    {"ablock_wrapper", (PyCFunction)(void (*)(void))ablock_wrapper, METH_FASTCALL,
     ablock_wrapper_doc},
    {"scope_bind", (PyCFunction)(void (*)(void))scope_bind, METH_FASTCALL, scope_bind_doc},
    {"scope_wrapper", (PyCFunction)(void (*)(void))scope_wrapper, METH_FASTCALL,
     scope_wrapper_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pgleak._speedups",
    .m_doc = "The checkout stack walk, the ledger, the checkout and checkin wrappers and\n"
             "the asyncio awaitables, in C (see pgleak/_stack.py, pgleak/_core.py,\n"
             "pgleak/_adapter.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    s_cr_frame = PyUnicode_InternFromString("cr_frame");
    s_gi_frame = PyUnicode_InternFromString("gi_frame");
    s_cr_await = PyUnicode_InternFromString("cr_await");
    s_gi_yieldfrom = PyUnicode_InternFromString("gi_yieldfrom");
    s_cr_running = PyUnicode_InternFromString("cr_running");
    s_gi_running = PyUnicode_InternFromString("gi_running");
    if (!s_cr_frame || !s_gi_frame || !s_cr_await || !s_gi_yieldfrom || !s_cr_running
        || !s_gi_running) {
        return NULL;
    }
    find_getter(&PyCoro_Type, "cr_running", &coro_running);
    find_getter(&PyGen_Type, "gi_running", &gen_running);
    find_getter(&PyCoro_Type, "cr_frame", &coro_frame);
    find_getter(&PyCoro_Type, "cr_await", &coro_await);
    find_getter(&PyGen_Type, "gi_frame", &gen_frame);
    find_getter(&PyGen_Type, "gi_yieldfrom", &gen_yieldfrom);
    struct {
        PyObject **slot;
        const char *text;
    } interned[] = {
        {&s_settings, "settings"}, {&s_enabled, "enabled"}, {&s_max_tracked, "max_tracked"},
        {&s_leak_threshold, "leak_threshold"}, {&s_capture_stack, "capture_stack"},
        {&s_stack_depth, "stack_depth"}, {&s_leases, "leases"}, {&s_by_conn, "by_conn"},
        {&s_ids, "_ids"}, {&s_watchdog, "watchdog"}, {&s_thread, "thread"},
        {&s_observer, "observer"}, {&s_waker, "waker"}, {&s_collected, "_collected"},
        {&s_get_name, "get_name"}, {&s_generation, "_generation"},
        {&s_pending, "_pending"}, {&s_after_checkout, "_after_checkout"},
        {&s_forget, "_forget"}, {&s_on_collected, "_on_collected"},
        {&s_wake_gate, "wake_gate"}, {&s_thread_key, "pgleak.thread"},
        {&s_append, "append"},
        {&s_get_coro, "get_coro"}, {&s_pool, "pool"}, {&s_con, "_con"}, {&s_ref, "ref"},
        {&s_throw, "throw"}, {&s_close, "close"}, {&s_checkout, "checkout"},
        {&s_checkin, "checkin"}, {&s_greenlet, "greenlet"}, {&s_getcurrent, "getcurrent"},
        {&s_parent, "parent"}, {&s_gr_frame, "gr_frame"},
        {&s_call_site, "call_site"}, {&s_connection_record, "_connection_record"},
        {&s_tokens, "_tokens"},
        {&s_observe_checkin, "_observe_checkin"},
        {&s_pending_deque, "pending"}, {&s_pop, "pop"},
    };
    for (size_t i = 0; i < sizeof(interned) / sizeof(interned[0]); i++) {
        *interned[i].slot = PyUnicode_InternFromString(interned[i].text);
        if (*interned[i].slot == NULL) {
            return NULL;
        }
    }
    if (PyType_Ready(&Awaiting_Type) < 0 || PyType_Ready(&TrackedType) < 0
        || PyType_Ready(&ScopeType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups);
    if (module != NULL && PyModule_AddObjectRef(module, "Tracked", (PyObject *)&TrackedType) < 0) {
        Py_CLEAR(module);
    }
    if (module != NULL && PyModule_AddObjectRef(module, "Scope", (PyObject *)&ScopeType) < 0) {
        Py_CLEAR(module);
    }
    return module;
}
