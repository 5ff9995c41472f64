/* pgleak._speedups, part: asyncio's running loop without a system call.
 * Included by ../_speedups.c, in order, after the parts before it (one translation unit). */

/* ---- asyncio's running loop, without a system call (3.10 and 3.11) ------------------------
 *
 * Every checkout asks asyncio for the running loop (to name the task that holds the
 * connection). Up to 3.11 asyncio's C ``_get_running_loop`` checks the loop holder's pid
 * against ``getpid()``, a system call on every checkout of an asyncio path (~0.2 us here,
 * counted by strace: one more ``getpid`` per cycle with pgleak installed). The same check is
 * made here against the pid pgleak last read: at the first checkout, and again in a forked
 * child (forget_thread(), from pgleak's at-fork handler), so a child forked while a loop ran
 * sees no running loop, as asyncio's check makes it. The holder is asyncio's private
 * ``_RunningLoopHolder`` (Modules/_asynciomodule.c, 3.7 to 3.11: the loop, then the pid),
 * kept in the thread state's dict: it is read only once its type has been seen to be that
 * one, of that size, and the reading agreed with asyncio's own answer; anything else (the
 * pure-Python asyncio, another version, a holder not yet checked) asks asyncio. From 3.12
 * asyncio keeps the loop in the thread state and makes no system call: asyncio is asked. */
#if PY_VERSION_HEX < 0x030C0000 && !defined(MS_WINDOWS)
#  include <unistd.h>
#  define PGLEAK_LOOP_HOLDER 1
typedef struct {
    PyObject_HEAD
    PyObject *rl_loop;
    pid_t rl_pid;
} loop_holder;

static PyTypeObject *holder_type = NULL; /* checked: a strong reference */
static int holder_refused = 0;           /* the holder is not what this code reads */
static pid_t own_pid = 0;                /* getpid() as last read; 0: not yet */
static PyObject *s_holder_key = NULL;    /* "__asyncio_running_event_loop__" */
static PyObject *c_get_running_loop = NULL; /* _asyncio._get_running_loop, when asyncio's is it */

static PyObject *
running_loop(void)
{
    if (holder_refused) {
        return PyObject_CallNoArgs(b_get_running_loop);
    }
    if (s_holder_key == NULL) {
        s_holder_key = PyUnicode_InternFromString("__asyncio_running_event_loop__");
        PyObject *module = s_holder_key == NULL ? NULL : PyImport_ImportModule("_asyncio");
        if (module == NULL) {
            PyErr_Clear();
            holder_refused = 1;
            return PyObject_CallNoArgs(b_get_running_loop);
        }
        c_get_running_loop = PyObject_GetAttrString(module, "_get_running_loop");
        Py_DECREF(module);
        if (c_get_running_loop == NULL || c_get_running_loop != b_get_running_loop) {
            PyErr_Clear();
            holder_refused = 1; /* the pure-Python asyncio keeps its loop elsewhere */
            return PyObject_CallNoArgs(b_get_running_loop);
        }
    }
    /* The holder last read, while its dict is the same one with the same version tag (tags
     * are unique and change with every change to the dict): not looked up again. */
    static PyObject *seen_dict = NULL, *seen_holder = NULL; /* borrowed */
    static uint64_t seen_tag = 0;
    PyObject *dict = PyThreadState_GetDict(); /* borrowed */
    PyObject *holder;
    if (dict != NULL && dict == seen_dict && ((PyDictObject *)dict)->ma_version_tag == seen_tag) {
        holder = seen_holder;
    }
    else {
        holder = dict == NULL ? NULL : PyDict_GetItemWithError(dict, s_holder_key);
        if (holder != NULL) {
            seen_dict = dict;
            seen_tag = ((PyDictObject *)dict)->ma_version_tag;
            seen_holder = holder;
        }
    }
    if (holder == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        return PyObject_CallNoArgs(b_get_running_loop); /* no loop ever ran in this thread */
    }
    if (Py_TYPE(holder) != holder_type) {
        /* the first holder seen: read it only if it is the type this code knows and the
         * reading agrees with asyncio's own answer */
        PyObject *loop = PyObject_CallNoArgs(b_get_running_loop);
        if (loop == NULL) {
            return NULL;
        }
        PyTypeObject *type = Py_TYPE(holder);
        const char *dot = strrchr(type->tp_name, '.');
        const char *name = dot == NULL ? type->tp_name : dot + 1;
        if (holder_type == NULL && strcmp(name, "_RunningLoopHolder") == 0
            && type->tp_basicsize == (Py_ssize_t)sizeof(loop_holder) && loop != Py_None
            && ((loop_holder *)holder)->rl_loop == loop
            && ((loop_holder *)holder)->rl_pid == getpid()) {
            holder_type = (PyTypeObject *)Py_NewRef((PyObject *)type);
            own_pid = getpid();
        }
        else if (holder_type != NULL || loop != Py_None) {
            holder_refused = 1; /* a second type, or a holder that reads otherwise */
        }
        return loop;
    }
    PyObject *loop = ((loop_holder *)holder)->rl_loop;
    if (loop == Py_None || ((loop_holder *)holder)->rl_pid != own_pid) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(loop);
}

/* A forked child: its pid is read again at its next checkout's check. */
static void
forget_pid(void)
{
    if (own_pid != 0) {
        own_pid = getpid();
    }
}
#else
static PyObject *
running_loop(void)
{
    return PyObject_CallNoArgs(b_get_running_loop);
}

static void
forget_pid(void)
{
}
#endif
