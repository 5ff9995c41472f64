"""``pgleak run -- CMD``: pgleak in every Python the command starts, with no code change.

Each test writes a small leaky program that never imports pgleak, runs it through
``python -m pgleak run --`` against the suite's server, and reads pgleak's reports from its
output: the command's own exit code, stdin and signals must come through untouched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server

BIN = Path(sys.executable).parent
#: A leaky program: a psycopg_pool connection taken at the marked line and never put back.
LEAKY = """\
    import sys
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool({dsn!r}, min_size=0, max_size=2)
    conn = pool.getconn()  # LEAK
    print("echo:", sys.stdin.readline().strip(), flush=True)
    sys.exit({code})
"""


def _env(**extra: str) -> dict[str, str]:
    """The test's environment as an activated virtualenv has it: its ``python`` first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGLEAK_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(
    argv: list[str], cwd: Path, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgleak", "run", "--", *argv],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        env=_env(**env),
        check=False,
    )


def _line_of(path: Path, marker: str) -> str:
    lines = path.read_text().splitlines()
    [number] = [n for n, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
    return f"{path}:{number}"


def _write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def test_python_script_exit_code_stdin_and_the_leaking_line(pg: Server, tmp_path: Path) -> None:
    app = _write(tmp_path / "app.py", LEAKY.format(dsn=pg.dsn, code=3))
    done = _run(["python", str(app)], tmp_path, stdin="hello\n")
    assert done.returncode == 3, done.stderr
    assert "echo: hello" in done.stdout
    assert "leak.at_exit" in done.stderr
    assert f"{_line_of(app, 'LEAK')} in <module>" in done.stderr


def test_python_dash_m_and_settings_from_the_environment(pg: Server, tmp_path: Path) -> None:
    package = tmp_path / "worker"
    package.mkdir()
    (package / "__init__.py").write_text("")
    main = _write(
        package / "__main__.py",
        f"""\
        import time
        from psycopg_pool import ConnectionPool

        pool = ConnectionPool({pg.dsn!r}, min_size=0, max_size=2)
        conn = pool.getconn()  # LEAK
        time.sleep(1.0)  # past PGLEAK_LEAK_THRESHOLD: leak.suspected while running
        pool.putconn(conn)
        """,
    )
    done = _run(["python", "-m", "worker"], tmp_path, PGLEAK_LEAK_THRESHOLD="0.2")
    assert done.returncode == 0, done.stderr
    assert "leak.suspected" in done.stderr
    assert f"{_line_of(main, 'LEAK')} in <module>" in done.stderr


def test_children_spawned_and_forked_are_covered(pg: Server, tmp_path: Path) -> None:
    child = _write(tmp_path / "child.py", LEAKY.format(dsn=pg.dsn, code=0))
    parent = _write(
        tmp_path / "parent.py",
        f"""\
        import multiprocessing, subprocess, sys
        from psycopg_pool import ConnectionPool

        def forked():
            pool = ConnectionPool({pg.dsn!r}, min_size=0, max_size=2)
            conn = pool.getconn()  # FORKED-LEAK

        if __name__ == "__main__":
            subprocess.run([sys.executable, {str(child)!r}], input="x\\n", text=True, check=True)
            process = multiprocessing.get_context("fork").Process(target=forked)
            process.start()
            process.join(30)
            sys.exit(process.exitcode)
        """,
    )
    done = _run(["python", str(parent)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{_line_of(child, 'LEAK')} in <module>" in done.stderr
    assert f"{_line_of(parent, 'FORKED-LEAK')} in forked" in done.stderr


def test_a_bad_setting_fails_before_the_command_starts(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    done = _run(
        ["python", "-c", f"open({str(marker)!r}, 'w')"], tmp_path, PGLEAK_LEAK_THRESHOLD="-1"
    )
    assert done.returncode == 2
    assert "leak_threshold" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()


def test_an_unknown_command_is_one_line_and_exit_127(tmp_path: Path) -> None:
    done = _run(["no-such-command-here"], tmp_path)
    assert done.returncode == 127
    assert done.stderr.strip().splitlines() == [
        "pgleak run: command not found: no-such-command-here"
    ]


def test_an_existing_sitecustomize_still_runs(pg: Server, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import builtins\nbuiltins.SITE_RAN = True\n")
    app = _write(tmp_path / "app.py", "import builtins, pgleak\nprint(builtins.SITE_RAN)\n")
    done = _run(["python", str(app)], tmp_path, PYTHONPATH=str(site))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


# -- servers ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def web_app(pg: Server, tmp_path: Path) -> Path:
    return _write(
        tmp_path / "web.py",
        f"""\
        from psycopg_pool import ConnectionPool

        pool = ConnectionPool({pg.dsn!r}, min_size=0, max_size=4)
        kept = []

        def wsgi(environ, start_response):
            kept.append(pool.getconn())  # WEB-LEAK
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]

        async def asgi(scope, receive, send):
            if scope["type"] != "http":
                return
            kept.append(pool.getconn())  # WEB-LEAK-ASGI
            await send({{"type": "http.response.start", "status": 200, "headers": []}})
            await send({{"type": "http.response.body", "body": b"ok"}})
        """,
    )


def _serve(argv: list[str], cwd: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    log = cwd / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pgleak", "run", "--", *argv],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(PGLEAK_LEAK_THRESHOLD="0.2"),
        )
        try:
            yield process, log
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(30)


def _get(port: int) -> bytes:
    deadline = time.monotonic() + 30
    while True:  # bounded: until the server listens, 30 s at most
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                body: bytes = response.read()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait_for(log: Path, needle: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # bounded: 30 s of polling the server's log
        text = log.read_text()
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in the server log:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_web_servers_report_the_leaking_line_and_take_signals(
    server: str, web_app: Path, tmp_path: Path
) -> None:
    port = _free_port()
    if server == "gunicorn":
        argv = ["gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}", "web:wsgi"]
        marker = "WEB-LEAK"
    else:
        argv = ["uvicorn", "--port", str(port), "web:asgi"]
        marker = "WEB-LEAK-ASGI"
    for process, log in _serve(argv, tmp_path):
        assert _get(port) == b"ok"
        text = _wait_for(log, "leak.suspected")
        assert _line_of(web_app, marker) in text
        # The command is the process `pgleak run` was: the signal reaches the server itself.
        process.send_signal(signal.SIGTERM)
        # Each server's own answer to SIGTERM: gunicorn exits 0, uvicorn (0.29+) shuts down
        # and re-raises the signal. Either way the server got it and shut down cleanly.
        assert process.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in log.read_text()


def test_celery_worker_processes_report_the_leaking_line(pg: Server, tmp_path: Path) -> None:
    pytest.importorskip("celery")
    tasks = _write(
        tmp_path / "tasks.py",
        f"""\
        from celery import Celery
        from celery.signals import worker_process_init
        from psycopg_pool import ConnectionPool

        app = Celery("tasks", broker="memory://")
        kept = []

        @worker_process_init.connect
        def leak(**_kwargs):
            # In each forked pool process, as a task's module-level pool would be used.
            pool = ConnectionPool({pg.dsn!r}, min_size=0, max_size=2)
            kept.append(pool.getconn())  # CELERY-LEAK
        """,
    )
    argv = [
        "celery", "-A", "tasks", "worker", "--pool=prefork", "-c", "1", "--loglevel=INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    for process, log in _serve(argv, tmp_path):
        text = _wait_for(log, "leak.suspected")
        assert _line_of(tasks, "CELERY-LEAK") in text
        assert "ForkPoolWorker" in text.split("leak.suspected", 1)[0].rsplit("\n", 1)[-1]
        process.send_signal(signal.SIGTERM)  # celery's warm shutdown
        assert process.wait(30) == 0
