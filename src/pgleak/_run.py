"""``pgleak run -- CMD ...``: run a command with pgleak installed in every Python it starts.

Like ``opentelemetry-instrument`` and ``ddtrace-run``: no code change. The command is exec'd
(this process *becomes* it), so its exit code, stdin, stdout, stderr and signals are the
command's own, with nothing in between; pgleak reaches it through PYTHONPATH, where its
``sitecustomize`` (``_bootstrap/``) installs pgleak at interpreter start-up and chains to the
one it shadows. Settings come from ``PGLEAK_*`` variables, as for ``install()``; they are
checked here first, so a typo fails the command before it starts, naming the knob.

Not reached: interpreters started with ``-S`` (no ``site``) or ``-I``/``-E`` (which ignore
PYTHONPATH).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence

from pgleak._settings import build_settings

__all__ = ["BOOTSTRAP_DIR", "command_env", "exec_command"]

BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")


def command_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: the bootstrap first on PYTHONPATH, the rest as it was.

    Raises:
        ConfigError: a ``PGLEAK_*`` setting is invalid (named in the message).
    """
    build_settings({}, environ)  # fail now, before the command starts, not in each child
    env = dict(environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != BOOTSTRAP_DIR]
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, *paths])
    env["PGLEAK_RUN_ACTIVE"] = "1"
    return env


def exec_command(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> None:
    """Replace this process with ``argv``, pgleak's bootstrap in its environment.

    Returns only when the command cannot be run (then raises ``FileNotFoundError`` or
    ``PermissionError`` with the command named).
    """
    env = command_env(os.environ if environ is None else environ)
    program = argv[0]
    if os.sep not in program and shutil.which(program, path=env.get("PATH")) is None:
        raise FileNotFoundError(program)
    os.execvpe(program, list(argv), env)
