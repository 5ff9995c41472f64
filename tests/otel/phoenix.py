"""Arize Phoenix as a local OTLP backend for the end-to-end tests.

Phoenix lives in a virtualenv of its own (``pip install arize-phoenix`` pulls ~160 packages,
~850 MB, and pins OpenTelemetry versions of its own), so it is started as a subprocess of
*that* venv's interpreter, named by ``$PGLEAK_PHOENIX_PYTHON`` or passed in::

    with run_phoenix("/tmp/phoenix-venv/bin/python") as phoenix:
        exporter = OTLPSpanExporter(
            endpoint=phoenix.traces_endpoint, headers={PROJECT_HEADER: "pgleak-e2e"}
        )
        ...
        spans = phoenix.wait_for_spans("pgleak-e2e", count=2)

It serves on ``127.0.0.1`` on free ports, keeps its SQLite database, pid files and log in a
temporary directory removed afterwards, and is told to make no request of its own to the
internet (telemetry, web fonts, the WASM sandbox download, the agent assistant and its docs).
Its OTLP/gRPC listener cannot be told a host and binds ``[::]``; nothing here sends to it.

What Phoenix keeps of a span, read back over its REST API (``GET /v1/projects/{project}/spans``):
name, trace and span ids, parent id, start and end times (microseconds), status code and
message, attributes with their types (int, float, bool, str), events. It does **not** keep the
OpenTelemetry span kind (every span reads back as OpenInference kind ``"UNKNOWN"``) nor the
resource: assert those on the in-memory exporter or the loopback receiver instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The environment variable naming the Python of a virtualenv where arize-phoenix is installed.
PHOENIX_PYTHON_ENV = "PGLEAK_PHOENIX_PYTHON"
#: The OTLP/HTTP request header that picks the Phoenix project the spans go to...
PROJECT_HEADER = "x-project-name"
#: ...or, failing it, this resource attribute (else the project is "default").
PROJECT_RESOURCE_ATTRIBUTE = "openinference.project.name"

_SPAN = dict[str, Any]
# No proxy, whatever the environment says: every request here goes to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def phoenix_python() -> str | None:
    """``$PGLEAK_PHOENIX_PYTHON`` when it names an executable file, else None."""
    python = os.environ.get(PHOENIX_PYTHON_ENV, "")
    return python if python and os.access(python, os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(working_dir: Path, port: int, grpc_port: int) -> dict[str, str]:
    # Nothing of the test process's own OTel or Phoenix settings: Phoenix would otherwise trace
    # itself to wherever OTEL_EXPORTER_OTLP_ENDPOINT points, or use someone else's database.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PHOENIX_", "OTEL_")) and key != "PYTHONPATH"
    }
    tmp = working_dir / "tmp"  # Phoenix keeps pid files under $TMPDIR/.arize-phoenix
    tmp.mkdir(exist_ok=True)
    env.update(
        {
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(port),
            "PHOENIX_GRPC_PORT": str(grpc_port),
            "PHOENIX_WORKING_DIR": str(working_dir),  # SQLite database: phoenix.db in it
            "PHOENIX_TELEMETRY_ENABLED": "false",
            "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
            "PHOENIX_DISABLE_AGENT_ASSISTANT": "true",
            "PHOENIX_ENABLE_MCP_SERVER": "false",
            "PHOENIX_ENABLE_PROMETHEUS": "false",
            "PHOENIX_LOG_MIGRATIONS": "false",
            "TMPDIR": str(tmp),
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    return env


@dataclass(frozen=True)
class PhoenixServer:
    """A running Phoenix: where to send OTLP, and its REST API to read spans back."""

    port: int
    grpc_port: int
    working_dir: Path
    log_path: Path
    pid: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_endpoint(self) -> str:
        """For ``OTLPSpanExporter(endpoint=...)``: OTLP/HTTP protobuf, no auth."""
        return f"{self.base_url}/v1/traces"

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        with _OPENER.open(self.base_url + path, timeout=timeout) as resp:
            return json.load(resp)

    def projects(self) -> list[str]:
        return [p["name"] for p in self.get_json("/v1/projects?limit=1000")["data"]]

    def spans(self, project: str) -> list[_SPAN]:
        """Every span Phoenix has stored for ``project``, oldest first; [] while it has none.

        Each is a dict: ``name``, ``context`` (``trace_id``, ``span_id``, hex), ``parent_id``,
        ``start_time``, ``end_time`` (ISO 8601), ``status_code`` ("UNSET", "OK", "ERROR"),
        ``status_message``, ``attributes`` (a flat dict, dotted keys), ``events``.
        """
        out: list[_SPAN] = []
        cursor: str | None = None
        quoted = urllib.parse.quote(project, safe="")
        while True:
            query = {"limit": "1000", "sort": "id", "order": "asc"}
            if cursor:
                query["cursor"] = cursor
            try:
                page = self.get_json(f"/v1/projects/{quoted}/spans?{urllib.parse.urlencode(query)}")
            except urllib.error.HTTPError as err:
                if err.code == 404 and not out:  # the project appears with its first span
                    return []
                raise
            out.extend(page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def wait_for_spans(
        self,
        project: str,
        count: int = 1,
        predicate: Callable[[_SPAN], bool] = lambda _s: True,
        timeout: float = 30.0,
    ) -> list[_SPAN]:
        """The project's spans that match, once at least ``count`` have been stored.

        Phoenix acknowledges an export before it writes the spans (a background queue flushes
        to SQLite): poll, with a bound.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = [s for s in self.spans(project) if predicate(s)]
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"Phoenix stored {len(found)} of {count} expected spans in project "
                    f"{project!r} within {timeout}s; projects: {self.projects()}"
                )
            time.sleep(0.2)


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _healthy(port: int) -> bool:
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def _stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # uvicorn shuts down cleanly on SIGTERM (about 2 s)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


@contextlib.contextmanager
def run_phoenix(
    python: str | os.PathLike[str] | None = None,
    *,
    startup_timeout: float = 120.0,
    working_dir: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    attempts: int = 3,
) -> Iterator[PhoenixServer]:
    """Start ``python -m phoenix.server.main serve``, wait until ``/healthz`` answers, yield.

    Args:
        python: the interpreter of a venv with arize-phoenix (default: ``phoenix_python()``).
        startup_timeout: seconds to wait for ``/healthz`` (a cold start, migrations on a new
            SQLite database included, took about 10 s on 2 cores).
        working_dir: kept afterwards if given; by default a temporary one, removed.
        extra_env: added to Phoenix's environment last.
        attempts: fresh ports are tried again when the server dies before it is ready (a
            port taken between choosing it and binding it).

    Raises:
        RuntimeError: no interpreter, or the server died or did not answer in time; the
            message ends with its log.
    """
    python = python or phoenix_python()
    if not python:
        raise RuntimeError(f"no Phoenix interpreter: set {PHOENIX_PYTHON_ENV}")
    own_dir = working_dir is None
    root = Path(tempfile.mkdtemp(prefix="pgleak-phoenix-")) if working_dir is None else working_dir
    root.mkdir(parents=True, exist_ok=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(1, attempts + 1):
            port, grpc_port = _free_port(), _free_port()
            while grpc_port == port:
                grpc_port = _free_port()
            env = _environment(root, port, grpc_port)
            env.update(extra_env or {})
            log_path = root / f"phoenix-{attempt}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [os.fspath(python), "-m", "phoenix.server.main", "serve"],
                    cwd=root,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a ^C in pytest does not reach it twice
                )
            deadline = time.monotonic() + startup_timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if _healthy(port):
                    break
                time.sleep(0.2)
            else:
                died = proc.poll() is not None
                _stop(proc)
                tail = _log_tail(log_path)
                if died and attempt < attempts and "address already in use" in tail.lower():
                    continue
                state = "exited" if died else f"did not answer within {startup_timeout}s"
                raise RuntimeError(f"Phoenix ({python}) {state}; its log ends:\n{tail}")
            yield PhoenixServer(port, grpc_port, root, log_path, proc.pid)
            return
    finally:
        if proc is not None:
            _stop(proc)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
