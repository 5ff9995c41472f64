"""A throwaway PgBouncer for the tests: transaction pooling in front of a given PostgreSQL.

PgBouncer refuses clients beyond ``max_client_conn`` with its own error (SQLSTATE 08P01,
``no more connections allowed (max_client_conn)``), which pgleak retries like a full server's
53300. This harness runs the system's ``pgbouncer`` (``apt-get install pgbouncer``) in the
foreground, on a free port of 127.0.0.1 (TCP only), with its ini, auth file, log and pid file
in a temp dir of its own, and stops it afterwards. As root it runs as the ``postgres`` or
``nobody`` user (PgBouncer refuses to run as root), the way ``pgleak.embedded`` runs postgres.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from pgleak.embedded import stop_process, unprivileged

__all__ = ["BouncerNotFound", "PgBouncer", "find_pgbouncer", "require_pgbouncer"]

_STARTUP_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 5
#: Where Debian's package puts it: /usr/sbin is not on a normal user's PATH.
_KNOWN_PATHS = ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer")
INSTALL_HINT = "pgbouncer not installed: apt-get install pgbouncer"


class BouncerNotFound(RuntimeError):
    """No ``pgbouncer`` binary on PATH or in the usual places."""


def find_pgbouncer() -> str:
    """The path of the ``pgbouncer`` binary.

    Raises:
        BouncerNotFound: with :data:`INSTALL_HINT` as the message.
    """
    found = shutil.which("pgbouncer")
    if found:
        return found
    for path in _KNOWN_PATHS:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise BouncerNotFound(INSTALL_HINT)


def require_pgbouncer() -> None:
    """Skip the calling test or fixture without ``pgbouncer``, or fail under
    ``PGLEAK_REQUIRE_PGBOUNCER`` (CI installs it: a skip there would hide that)."""
    import pytest

    try:
        find_pgbouncer()
    except BouncerNotFound as exc:
        if os.environ.get("PGLEAK_REQUIRE_PGBOUNCER"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quote_ini(value: str) -> str:
    """A value in a PgBouncer ``[databases]`` connect string (libpq-style quoting)."""
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _accepts(host: str, port: int, user: str, dbname: str) -> bool:
    """Whether a client completes the startup handshake through the bouncer.

    PgBouncer answers a startup packet only once it has a server connection's parameters, so
    this also proves it reaches PostgreSQL. The probe takes a client slot; it sends Terminate
    and reads to EOF, after which PgBouncer has closed the client and freed the slot.
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
        with socket.create_connection((host, port), timeout=2.0) as sock:
            sock.sendall(struct.pack("!i", len(body) + 4) + body)
            seen = b""
            while b"Z\0\0\0\5" not in seen:  # ReadyForQuery: logged in
                chunk = sock.recv(65536)
                if not chunk or (not seen and chunk[:1] != b"R"):
                    return False  # closed, or 'E' (an error) instead of authentication
                seen += chunk
            sock.sendall(b"X\0\0\0\4")  # Terminate
            return any(not sock.recv(65536) for _ in range(1000))
    except OSError:
        return False


class PgBouncer:
    """PgBouncer in front of ``host:port``, on a free port of 127.0.0.1.

    Args:
        server_host: Where PostgreSQL listens.
        server_port: Its port.
        user: The user clients log in as (listed in the auth file; ``auth_type = trust``) and
            PgBouncer logs in to PostgreSQL as.
        dbname: The default database of :meth:`dsn` and :meth:`url`; any other database name
            is passed through to the same server.
        max_client_conn: Client connections PgBouncer accepts; the next one is refused with
            08P01 ``no more connections allowed (max_client_conn)``.
        default_pool_size: Server connections per database and user.
        settings: More ``[pgbouncer]`` settings, added to or overriding the defaults.
    """

    def __init__(
        self,
        server_host: str,
        server_port: int,
        *,
        user: str = "postgres",
        dbname: str = "postgres",
        max_client_conn: int = 3,
        default_pool_size: int = 2,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.server_host = server_host
        self.server_port = server_port
        self.host = "127.0.0.1"
        self.port = 0
        self.user = user
        self.dbname = dbname
        self.max_client_conn = max_client_conn
        self.default_pool_size = default_pool_size
        self._settings = dict(settings or {})
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as: dict[str, Any] = {}
        self._owner_pid = os.getpid()

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ------------------------------------------------------------------------------

    def dsn(self, dbname: str | None = None) -> str:
        """A libpq key=value conninfo for a client of the bouncer."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname or self.dbname}"

    def url(self, driver: str, dbname: str | None = None) -> str:
        """A SQLAlchemy URL such as ``postgresql+psycopg://postgres@127.0.0.1:6432/postgres``."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{dbname or self.dbname}"

    @property
    def log(self) -> str:
        """What PgBouncer has logged so far."""
        if self._tmp is None:
            return ""
        try:
            return (self._tmp / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> PgBouncer:
        """Start PgBouncer and wait until a client can log in through it.

        Raises:
            BouncerNotFound: no ``pgbouncer`` binary.
            RuntimeError: it exited or did not accept a client in time (with its log).
        """
        if self._proc is not None:
            raise RuntimeError("pgbouncer already started")
        binary = find_pgbouncer()
        self._owner_pid = os.getpid()
        try:
            self._tmp = Path(tempfile.mkdtemp(prefix="pgleak-bouncer-"))
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                self._drop_privileges()
            (self._tmp / "userlist.txt").write_text(f'"{self.user}" ""\n')
            self._launch(binary)
        except BaseException:
            self.stop()
            raise
        return self

    def _drop_privileges(self) -> None:
        """PgBouncer refuses to run as root: run it as ``postgres`` or ``nobody``, in a dir
        of its own (the ini and auth file, written as root with mode 0644, stay readable)."""
        assert self._tmp is not None
        self._run_as = unprivileged(self._tmp)

    def _ini(self) -> str:
        assert self._tmp is not None
        target = " ".join(
            f"{key}={_quote_ini(value)}"
            for key, value in (
                ("host", self.server_host),
                ("port", str(self.server_port)),
                ("user", self.user),
            )
        )
        conf = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self._tmp / "userlist.txt"),
            "pidfile": str(self._tmp / "pgbouncer.pid"),
            "pool_mode": "transaction",
            "max_client_conn": str(self.max_client_conn),
            "default_pool_size": str(self.default_pool_size),
            # Idle server connections are closed soon: they hold slots of a shared server.
            "server_idle_timeout": "5",
            "ignore_startup_parameters": "extra_float_digits",
            **self._settings,
        }
        lines = ["[databases]", f"* = {target}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in conf.items()]
        return "\n".join(lines) + "\n"

    def _launch(self, binary: str) -> None:
        assert self._tmp is not None
        ini = self._tmp / "pgbouncer.ini"
        log = self._tmp / "pgbouncer.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        for _ in range(_PORT_ATTEMPTS):
            self.port = _free_port()
            ini.write_text(self._ini())
            with log.open("wb") as out:
                # Foreground (no -d), its own session: a Ctrl-C meant for pytest must not stop
                # it before the tests' own clean-up does.
                self._proc = subprocess.Popen(
                    [binary, str(ini)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self._tmp,
                    env=env,
                    start_new_session=True,
                    **self._run_as,
                )
            deadline = time.monotonic() + _STARTUP_TIMEOUT
            while self._proc.poll() is None and time.monotonic() < deadline:
                if (
                    _accepts(self.host, self.port, self.user, self.dbname)
                    and self._proc.poll() is None
                ):
                    return
                time.sleep(0.05)
            code = self._proc.poll()
            self._kill()
            text = self.log
            if "Address already in use" not in text:
                tail = "\n".join(text.splitlines()[-30:])
                why = (
                    f"exited with code {code}"
                    if code is not None
                    else f"accepted no client within {_STARTUP_TIMEOUT:.0f} s"
                )
                raise RuntimeError(
                    f"pgbouncer ({binary}) {why} on {self.host}:{self.port}, in front of "
                    f"{self.server_host}:{self.server_port}; its log:\n{tail}"
                )
        raise RuntimeError(f"pgbouncer could not bind a free port in {_PORT_ATTEMPTS} attempts")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        # SIGTERM: an immediate shutdown up to PgBouncer 1.22, from 1.23 one that waits for the
        # clients to leave; either way the wait is bounded, then the group is killed.
        stop_process(proc, signal.SIGTERM, _STOP_TIMEOUT)

    def stop(self) -> None:
        """Stop PgBouncer and delete its dir; safe to call at any stage, twice, and in a
        forked child (where it does nothing: the process belongs to the parent)."""
        if os.getpid() != self._owner_pid:
            return
        with contextlib.suppress(Exception):
            self._kill()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
