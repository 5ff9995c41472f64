"""Run the installed libraries' own test suites plain and with pgleak installed; fail on any
test that passes plain but not with pgleak (issue 14: a wrapper must never change behaviour).

    scripts/upstream-suites                      # every suite, against .venv's versions
    scripts/upstream-suites --quick              # a few minutes: one file or module each
    scripts/upstream-suites --only sqlalchemy,django --venv /path/to/venv

Sources come from PyPI sdists of the exact installed versions (``pip download --no-binary``),
cached under .cache/upstream/. psycopg's pool tests are in no sdist: that suite runs only when
``--psycopg-source DIR`` names a psycopg source checkout (its ``tests/`` and ``tools/``, at
the tag matching the installed psycopg-pool), and is reported as not run otherwise.

Both runs of a suite use one server, started here by ``pgleak.embedded``. "With pgleak" means a
sitecustomize on PYTHONPATH (scripts/upstream/with-pgleak) that calls ``pgleak.install()`` at
interpreter start. Outcomes are read per test (pytest's --junitxml; for Django a recording test
runner) and compared. Exit status: 0 when nothing regressed, 1 when something did, 2 when the
harness itself could not run a suite, or ran none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "scripts" / "upstream"
CACHE = ROOT / ".cache" / "upstream"
FAILING = ("failed", "error", "missing")
TEST_DEPS = ("anyio", "sniffio", "pproxy")
SUITE_TIMEOUT = 3600.0

_APPNAME = (
    "pgleak adds fallback_application_name (user@host:pid, its application_name tag) to the "
    "DBAPI connect() keywords, and this test asserts the exact keywords a mock DBAPI got; "
    "intended (PGLEAK_TAG_CONNECTIONS=false turns the tag off)"
)

# Known, intended differences: test id -> why pgleak changes its outcome on purpose.
KNOWN: dict[str, str] = {
    "test.engine.test_reconnect.MockReconnectTest::test_conn_reusable": _APPNAME,
}

# Upstream tests that fail now and then without pgleak too: test id -> the evidence. Failing
# with pgleak in both runs is then reported, not counted (a flake hit twice running is a few
# percent on these machines).
FLAKY_UPSTREAM: dict[str, str] = {
    "tests.test_pool.TestPool::test_pool_config_persistence": (
        "asyncpg 0.32.0's own flake: 'Future exception was never retrieved: unexpected "
        "connection_lost() call' at tearDown; failed 4 of 20 runs of the test alone without "
        "pgleak (and 4 of 20 with it, with or without connect retry), 2026-12-03"
    ),
}


@dataclasses.dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str


@dataclasses.dataclass
class Suite:
    """One upstream suite: how to lay out its sources and the command that runs it."""

    name: str
    packages: tuple[str, ...]  # distributions it tests (they must be installed)
    adapter: str  # the pgleak adapter that must be in effect in its pgleak run
    build: Callable[[Suite, Context, Path, list[str] | None], Run]
    description: str


@dataclasses.dataclass
class Run:
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    results: Path
    kind: str  # "junit" or "json"


@dataclasses.dataclass
class Context:
    venv_python: Path
    server: Server
    versions: dict[str, str]
    psycopg_source: Path | None
    quick: bool
    deps: Path


def PIP(python: Path, command: str) -> list[str]:
    return [str(python), "-m", "pip", command, "-q", "--no-deps"]


def log(msg: str) -> None:
    print(f"[upstream] {msg}", flush=True)


def installed_versions(python: Path, names: list[str]) -> dict[str, str]:
    """The venv's own versions, read by its interpreter, not this one's."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run(
        [str(python), "-c", code, *names], capture_output=True, text=True, check=True, timeout=60
    )
    result: dict[str, str] = json.loads(out.stdout)
    return result


def sdist(python: Path, name: str, version: str) -> Path:
    """The unpacked sdist of name==version, downloaded once into the cache."""
    dest = CACHE / "src" / f"{name.lower()}-{version}"
    if (dest / ".complete").exists():
        return dest
    archive_dir = CACHE / "sdist"
    archive_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name.lower().replace('-', '_')}-{version}"
    archives = [p for p in archive_dir.glob("*.tar.gz") if p.name.lower() == f"{stem}.tar.gz"]
    if not archives:
        spec = f"{name}=={version}"
        log(f"downloading the sdist of {spec} (once)")
        # --no-binary for this package only: with ":all:" pip would also build its build
        # dependencies (setuptools, Cython) from source to prepare its metadata, for minutes.
        subprocess.run(
            [*PIP(python, "download"), "--no-binary", name, spec, "-d", str(archive_dir)],
            check=True,
            timeout=1800,
        )
        archives = [p for p in archive_dir.glob("*.tar.gz") if p.name.lower() == f"{stem}.tar.gz"]
    if not archives:
        raise RuntimeError(f"pip downloaded no {stem}.tar.gz into {archive_dir}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archives[0]) as tar:
        # The "data" filter (no absolute paths, links out, devices) where this Python has it.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # pragma: no cover - Pythons before 3.10.12
            tar.extractall(tmp)
    (top,) = tmp.iterdir()
    top.rename(dest)
    tmp.rmdir()
    (dest / ".complete").touch()
    return dest


def test_deps(python: Path) -> Path:
    """Test-only requirements the suites need and pgleak's venv lacks (anyio's pytest plugin
    for psycopg's async pool tests, pproxy for its reconnection tests), in a directory of their
    own: the venv stays untouched."""
    deps = CACHE / "deps"
    marker, want = deps / ".complete", " ".join(TEST_DEPS)
    if not marker.exists() or marker.read_text() != want:
        log("installing test-only requirements into .cache/upstream/deps (once)")
        shutil.rmtree(deps, ignore_errors=True)
        subprocess.run(
            [*PIP(python, "install"), "--target", str(deps), *TEST_DEPS],
            check=True,
            timeout=600,
        )
        marker.write_text(want)
    return deps


def base_env(ctx: Context, results: Path) -> dict[str, str]:
    # The caller's PG* variables must not point a suite elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PYTHON"))}
    env.update(PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", PGLEAK_UPSTREAM_RESULTS="")
    env["PYTHONPATH"] = str(ctx.deps)
    return env


def pytest_argv(ctx: Context, results: Path, *args: str) -> list[str]:
    # The venv's pytest script, not `-m pytest`: the working directory (an sdist root, which
    # holds an unbuilt copy of the package) must not shadow the installed package.
    pytest = ctx.venv_python.parent / "pytest"
    return [
        str(ctx.venv_python),
        str(pytest),
        "-p",
        "no:randomly",
        # A cache of its own per run, emptied first (psycopg's conftest needs one).
        "-o",
        f"cache_dir={results.with_suffix('.pytest-cache')}",
        "-q",
        "--timeout=300",
        f"--junitxml={results}",
        "-o",
        "junit_family=xunit1",
        *args,
    ]


def node_ids(cwd: Path, tests: list[str]) -> list[str]:
    """pytest node ids for junit ids (``pkg.mod.Class::name``): the longest dotted prefix that
    is a file under ``cwd`` is the module, the rest its classes."""
    out = []
    for test in tests:
        dotted, name = test.split("::", 1)
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            path = Path(*parts[:cut]).with_suffix(".py")
            if (cwd / path).is_file():
                out.append("::".join([path.as_posix(), *parts[cut:], name]))
                break
    return out


def targets(
    cwd: Path, ctx: Context, full: list[str], quick: list[str], select: list[str] | None
) -> list[str]:
    return node_ids(cwd, select) if select is not None else quick if ctx.quick else full


def sqlalchemy_run(driver: str, paths: list[str], quick: list[str]) -> Callable[..., Run]:
    def build(suite: Suite, ctx: Context, results: Path, select: list[str] | None) -> Run:
        src = sdist(ctx.venv_python, "SQLAlchemy", ctx.versions["SQLAlchemy"])
        s = ctx.server
        url = f"postgresql+{driver}://{s.user}@{s.host}:{s.port}/test"
        # --maxfail: SQLAlchemy's addopts stop at 250 failures, which would hide the rest.
        argv = pytest_argv(ctx, results, *targets(src, ctx, paths, quick, select))
        argv += ["--dburi", url, "--maxfail=100000"]
        return Run(argv, src, base_env(ctx, results), results, "junit")

    return build


def psycopg_pool_run(suite: Suite, ctx: Context, results: Path, select: list[str] | None) -> Run:
    assert ctx.psycopg_source is not None
    # The tests import themselves as the package `tests` (and start tools/pproxy_fix.py), with
    # psycopg's pytest settings; a copy, so that the checkout gets no caches or bytecode.
    root = CACHE / "psycopg-run"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for part in ("tests", "tools"):
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ctx.psycopg_source / part, root / part, ignore=skip)
    (root / "pytest.ini").write_text(
        "[pytest]\naddopts = -ra\nfilterwarnings =\n    error\n"
        # pytest-timeout's own thread is no reason to fail psycopg's warning-strict run
        "    ignore::pytest.PytestUnraisableExceptionWarning\n"
    )
    s = ctx.server
    dsn = f"host={s.host} port={s.port} user={s.user} dbname=psycopg_test"
    paths = targets(root, ctx, ["tests/pool"], ["tests/pool/test_pool.py"], select)
    argv = pytest_argv(ctx, results, *paths, "--test-dsn", dsn, "--rootdir", str(root))
    return Run(argv, root, base_env(ctx, results), results, "junit")


def asyncpg_run(suite: Suite, ctx: Context, results: Path, select: list[str] | None) -> Run:
    src = sdist(ctx.venv_python, "asyncpg", ctx.versions["asyncpg"])
    env = base_env(ctx, results)
    # PGHOST makes asyncpg's test base use the running server (RunningCluster) instead of
    # initdb-ing a cluster of its own; the few tests that need their own cluster skip.
    s = ctx.server
    env.update(PGHOST=s.host, PGPORT=str(s.port), PGUSER=s.user, PGDATABASE="postgres")
    paths = targets(src, ctx, ["tests/test_pool.py"], ["tests/test_pool.py"], select)
    argv = pytest_argv(ctx, results, *paths)
    return Run(argv, src, env, results, "junit")


def django_run(suite: Suite, ctx: Context, results: Path, select: list[str] | None) -> Run:
    src = sdist(ctx.venv_python, "Django", ctx.versions["Django"])
    env = base_env(ctx, results)
    s = ctx.server
    env.update(
        PGLEAK_UPSTREAM_HOST=s.host,
        PGLEAK_UPSTREAM_PORT=str(s.port),
        PGLEAK_UPSTREAM_USER=s.user,
        PGLEAK_UPSTREAM_RESULTS=str(results),
    )
    env["PYTHONPATH"] += os.pathsep + str(DATA / "django")
    labels = select or ["backends.postgresql" if ctx.quick else "backends"]
    argv = [str(ctx.venv_python), "runtests.py", *labels, "--settings=pgleak_upstream_django"]
    argv += ["--parallel=1", "--noinput", "-v", "1"]
    return Run(argv, src / "tests", env, results, "json")


SUITES = [
    Suite(
        "sqlalchemy",
        ("SQLAlchemy",),
        "sqlalchemy",
        sqlalchemy_run(
            "psycopg",
            ["test/engine"],
            ["test/engine/test_execute.py", "test/engine/test_reconnect.py"],
        ),
        "SQLAlchemy test/engine/ on postgresql+psycopg",
    ),
    Suite(
        "sqlalchemy-asyncio",
        ("SQLAlchemy",),
        "sqlalchemy",
        sqlalchemy_run("asyncpg", ["test/ext/asyncio"], ["test/ext/asyncio/test_engine.py"]),
        "SQLAlchemy test/ext/asyncio/ on postgresql+asyncpg",
    ),
    Suite(
        "psycopg-pool",
        ("psycopg-pool",),
        "psycopg_pool",
        psycopg_pool_run,
        "psycopg's tests/pool/ (from --psycopg-source)",
    ),
    Suite("asyncpg", ("asyncpg",), "asyncpg", asyncpg_run, "asyncpg tests/test_pool.py"),
    Suite("django", ("Django",), "django", django_run, "Django's backends tests on PostgreSQL"),
]


def read_junit(path: Path) -> dict[str, str]:
    """{classname::name: outcome}; a test reported twice (a teardown error) keeps the worst."""
    rank = {"passed": 0, "skipped": 1, "xfail": 1, "failed": 2, "error": 3}
    out: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        key = f"{case.get('classname', '')}::{case.get('name', '')}"
        tags = {child.tag for child in case}
        if "error" in tags:
            outcome = "error"
        elif "failure" in tags:
            outcome = "failed"
        elif "skipped" in tags:
            skipped = case.find("skipped")
            kind = skipped.get("type", "") if skipped is not None else ""
            outcome = "xfail" if kind == "pytest.xfail" else "skipped"
        else:
            outcome = "passed"
        if key not in out or rank[outcome] > rank[out[key]]:
            out[key] = outcome
    return out


def run_once(
    suite: Suite, ctx: Context, with_pgleak: bool, logs: Path, select: list[str] | None = None
) -> dict[str, str]:
    """One run of a suite (of only ``select``, test ids, when given): {test id: outcome}."""
    mode = ("pgleak" if with_pgleak else "plain") + ("-again" if select is not None else "")
    results = logs / f"{suite.name}-{mode}.{'xml' if suite.name != 'django' else 'json'}"
    results.unlink(missing_ok=True)
    shutil.rmtree(results.with_suffix(".pytest-cache"), ignore_errors=True)
    run = suite.build(suite, ctx, results, select)
    proof = results.with_suffix(".proof")
    proof.unlink(missing_ok=True)
    if with_pgleak:
        run.env["PYTHONPATH"] = str(DATA / "with-pgleak") + os.pathsep + run.env["PYTHONPATH"]
        run.env["PGLEAK_UPSTREAM_PROOF"] = str(proof)
    logfile = logs / f"{suite.name}-{mode}.log"
    start = time.monotonic()
    with logfile.open("w") as out:
        proc = subprocess.run(
            run.argv,
            cwd=run.cwd,
            env=run.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=SUITE_TIMEOUT,
            check=False,
        )
    took = time.monotonic() - start
    if not results.exists():
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(
            f"{suite.name} ({mode}) wrote no results (exit {proc.returncode}):\n{tail}"
        )
    if with_pgleak and suite.adapter not in proven_adapters(proof):
        raise RuntimeError(
            f"{suite.name} ({mode}): pgleak's {suite.adapter} adapter was not in effect "
            f"(see {proof}): the comparison would prove nothing"
        )
    outcomes = read_junit(results) if run.kind == "junit" else json.loads(results.read_text())
    counts = Counter(outcomes.values())
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    log(f"{suite.name} {mode}: {summary} in {took:.0f} s (log: {logfile.relative_to(ROOT)})")
    return dict(outcomes)


def proven_adapters(proof: Path) -> set[str]:
    """Every adapter some process of the run had installed at its exit."""
    if not proof.exists():
        return set()
    lines = proof.read_text().splitlines()
    return {name for line in lines if line.strip() for name in json.loads(line)["installed"]}


def compare(plain: dict[str, str], pgleak: dict[str, str]) -> list[tuple[str, str]]:
    """Tests that passed plain and failed, errored or vanished with pgleak."""
    return [
        (test, pgleak.get(test, "missing"))
        for test, outcome in sorted(plain.items())
        if outcome == "passed" and pgleak.get(test, "missing") in FAILING
    ]


def start_server(max_connections: int) -> tuple[object, Server]:
    sys.path.insert(0, str(ROOT / "src"))
    from pgleak.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(
        max_connections=max_connections,
        superuser_reserved_connections=3,
        # SQLAlchemy's two-phase tests, and room for psycopg's and Django's test databases.
        settings={"max_prepared_transactions": "20"},
    ).start()
    server = Server(pg.host, pg.port, pg.user)
    for name in ("test", "psycopg_test"):
        pg.create_database(name)
    psql_cmd = [
        str(pg.bindir / "psql"),
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        pg.dsn(dbname="test"),
    ]
    for schema in ("test_schema", "test_schema_2"):  # SQLAlchemy's README.unittests
        subprocess.run(
            [*psql_cmd, "-c", f"CREATE SCHEMA {schema}"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return pg, server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="venv whose versions to test")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated suite names: " + ", ".join(s.name for s in SUITES),
    )
    parser.add_argument("--quick", action="store_true", help="one file or module per suite")
    parser.add_argument(
        "--psycopg-source",
        default=os.environ.get("PGLEAK_PSYCOPG_SOURCE"),
        help="a psycopg source checkout, for its tests/pool (they are in no sdist)",
    )
    parser.add_argument("--max-connections", type=int, default=200)
    args = parser.parse_args(argv)

    python = Path(args.venv) / "bin" / "python"
    if not python.exists():
        parser.error(f"no Python at {python}")
    wanted = [s for s in SUITES if not args.only or s.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {s.name for s in SUITES}
    if unknown:
        parser.error(f"unknown suites: {', '.join(sorted(unknown))}")
    versions = installed_versions(python, sorted({p for s in SUITES for p in s.packages}))
    versions.update(installed_versions(python, ["psycopg", "pgleak"]))
    log("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))

    psycopg_source = Path(args.psycopg_source).resolve() if args.psycopg_source else None
    if psycopg_source is not None and not (psycopg_source / "tests" / "pool").is_dir():
        parser.error(f"--psycopg-source: no tests/pool in {psycopg_source}")
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pg, server = start_server(args.max_connections)
    ctx = Context(python, server, versions, psycopg_source, args.quick, test_deps(python))
    regressions: list[tuple[str, str, str]] = []
    broken: list[str] = []
    not_run: list[str] = []
    flaky: list[str] = []
    table: list[str] = []
    try:
        for suite in wanted:
            missing = [p for p in suite.packages if p not in versions]
            if missing:
                not_run.append(f"{suite.name}: {', '.join(missing)} not installed")
                continue
            if suite.name == "psycopg-pool" and psycopg_source is None:
                not_run.append(f"{suite.name}: no --psycopg-source (its tests are in no sdist)")
                continue
            try:
                plain = run_once(suite, ctx, False, logs)
                with_pgleak = run_once(suite, ctx, True, logs)
            except (RuntimeError, subprocess.SubprocessError, OSError, ET.ParseError) as exc:
                broken.append(f"{suite.name}: {exc}")
                continue
            found = compare(plain, with_pgleak)
            if found:
                # Timing-based tests on a shared machine fail now and then: a regression
                # counts only when its test, run again alone both ways, does the same.
                again = [test for test, _ in found]
                try:
                    plain2 = run_once(suite, ctx, False, logs, again)
                    pgleak2 = run_once(suite, ctx, True, logs, again)
                except (RuntimeError, subprocess.SubprocessError, OSError, ET.ParseError) as exc:
                    broken.append(f"{suite.name} (run again): {exc}")
                    plain2, pgleak2 = {}, {}
                confirmed = dict(compare(plain2, pgleak2))
                flaky += [
                    f"{suite.name}: {t} ({o} with pgleak once)"
                    for t, o in found
                    if t not in confirmed
                ]
                found = [(t, o) for t, o in found if t in confirmed]
            regressions += [(suite.name, test, outcome) for test, outcome in found]
            passed = sum(o == "passed" for o in plain.values())
            known = sum(test in KNOWN for test, _ in found)
            table.append(
                f"{suite.name}: {len(plain)} tests, {passed} passed plain, "
                f"{sum(o == 'passed' for o in with_pgleak.values())} with pgleak, "
                f"{len(found) - known} regressed, {known} known differences"
            )
    finally:
        pg.stop()  # type: ignore[attr-defined]
    log(f"done in {time.monotonic() - started:.0f} s")
    for line in table:
        log(line)
    for line in not_run:
        log(f"not run: {line}")
    for line in flaky:
        log(f"not confirmed on a second run (flaky, not counted): {line}")
    for line in broken:
        log(f"could not run: {line}")
    failing = 0
    for name, test, outcome in regressions:
        reason = KNOWN.get(test)
        if reason:
            log(f"known difference: {test} ({outcome} with pgleak): {reason}")
        elif test in FLAKY_UPSTREAM:
            log(
                f"flaky upstream, not counted: {test} ({outcome} twice with pgleak): "
                f"{FLAKY_UPSTREAM[test]}"
            )
        else:
            failing += 1
            log(f"REGRESSION {name}: {test} passed plain, {outcome} with pgleak")
    if failing:
        return 1
    if not table:
        log("no suite ran: nothing was checked")
    return 2 if broken or not table else 0


if __name__ == "__main__":
    sys.exit(main())
