"""Django settings for its own test suite (tests/runtests.py) on PostgreSQL, for
scripts/upstream-suites, plus a test runner that records every test's outcome.

The server comes from PGLEAK_UPSTREAM_HOST / PGLEAK_UPSTREAM_PORT; outcomes are written as
JSON ({test id: outcome}) to PGLEAK_UPSTREAM_RESULTS when the run ends.
"""

from __future__ import annotations

import json
import os
import unittest
from typing import Any

from django.test.runner import DiscoverRunner

_server = {
    "ENGINE": "django.db.backends.postgresql",
    "HOST": os.environ.get("PGLEAK_UPSTREAM_HOST", "127.0.0.1"),
    "PORT": os.environ.get("PGLEAK_UPSTREAM_PORT", "5432"),
    "USER": os.environ.get("PGLEAK_UPSTREAM_USER", "postgres"),
}
DATABASES = {
    "default": {**_server, "NAME": "django_default"},
    "other": {**_server, "NAME": "django_other"},
}
SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
TEST_RUNNER = "pgleak_upstream_django.RecordingRunner"


class _RecordingResult(unittest.TextTestResult):
    """TextTestResult that also keeps {test id: outcome}; the worst outcome wins."""

    outcomes: dict[str, str] = {}
    _rank = {"passed": 0, "skipped": 1, "xfail": 1, "failed": 2, "error": 3}

    def _put(self, test: Any, outcome: str) -> None:
        key = test.id()
        old = self.outcomes.get(key)
        if old is None or self._rank[outcome] > self._rank[old]:
            self.outcomes[key] = outcome

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._put(test, "passed")

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._put(test, "failed")

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._put(test, "error")

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._put(test, "skipped")

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._put(test, "xfail")

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._put(test, "failed")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failure = issubclass(err[0], test.failureException)
            self._put(test, "failed" if failure else "error")

    def stopTestRun(self) -> None:
        super().stopTestRun()
        path = os.environ.get("PGLEAK_UPSTREAM_RESULTS")
        if path:
            with open(path, "w") as out:
                json.dump(self.outcomes, out, indent=0, sort_keys=True)


class RecordingRunner(DiscoverRunner):
    """Django's runner, recording outcomes (run it with --parallel=1: one process)."""

    def get_resultclass(self) -> Any:
        return _RecordingResult
