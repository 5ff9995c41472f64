"""pgleak's own failures: logged once per site, swallowed, never raised into the app."""

from __future__ import annotations

import logging

import pytest

from pgleak import _guard


@pytest.mark.internal_errors
def test_first_failure_is_logged_with_traceback_then_only_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pgleak.internal")
    for n in range(5):
        _guard.internal_error("site-a", ValueError(f"boom {n}"))
    _guard.internal_error("site-b", KeyError("other"))
    messages = [r.getMessage() for r in caplog.records if r.name == "pgleak.internal"]
    assert len(messages) == 2
    assert "site-a" in messages[0]
    assert "boom 0" in messages[0]
    assert caplog.records[0].exc_info is not None
    assert len(_guard.swallowed) == 6


class _Raising(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise OSError("disk full")


@pytest.mark.internal_errors
def test_when_logging_itself_fails_stderr_gets_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("pgleak.internal")
    handler = _Raising()
    logger.addHandler(handler)
    try:
        _guard.internal_error("site-c", RuntimeError("x"))
        _guard.internal_error("site-d", RuntimeError("y"))
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("pgleak: internal error") == 1
    assert "site-c" in err


@pytest.mark.internal_errors
def test_a_raising_handler_on_the_pgleak_logger_never_reaches_install_or_uninstall() -> None:
    """pgleak's own lines (install's debug line, uninstall's warnings) go through the guard."""
    import pgleak

    logger = logging.getLogger("pgleak")
    handler = _Raising(level=logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        settings = pgleak.install()
        assert settings.enabled
        pgleak.uninstall()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert any(site == "logging" for site, _ in _guard.swallowed)
