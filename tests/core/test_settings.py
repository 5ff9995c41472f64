"""Settings: defaults, env vars, kwargs over env, and errors that name knob and value."""

from __future__ import annotations

import pytest

from pgleak._settings import ConfigError, Settings, build_settings


def test_defaults() -> None:
    settings = build_settings({}, environ={})
    assert settings == Settings()
    assert settings.leak_threshold == 30.0
    assert settings.capture_stack is True


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"PGLEAK_LEAK_THRESHOLD": "2.5"}, "leak_threshold", 2.5),
        ({"PGLEAK_CAPTURE_STACK": "no"}, "capture_stack", False),
        ({"PGLEAK_STACK_DEPTH": "8"}, "stack_depth", 8),
        ({"PGLEAK_ENABLED": "off"}, "enabled", False),
        ({"PGLEAK_INTEGRATIONS": "sqlalchemy, asyncpg"}, "integrations", ("sqlalchemy", "asyncpg")),
        ({"PGLEAK_INTEGRATIONS": "all"}, "integrations", None),
    ],
)
def test_env_vars(env: dict[str, str], field: str, value: object) -> None:
    assert getattr(build_settings({}, environ=env), field) == value


def test_kwargs_win_over_env() -> None:
    settings = build_settings({"leak_threshold": 3}, environ={"PGLEAK_LEAK_THRESHOLD": "9"})
    assert settings.leak_threshold == 3.0


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        ({"leak_threshold": 0}, {}, r"leak_threshold \(install\(leak_threshold=\.\.\.\)\): 0"),
        ({}, {"PGLEAK_LEAK_THRESHOLD": "nan"}, r"PGLEAK_LEAK_THRESHOLD.*'nan'.*finite"),
        ({"stack_depth": 2.5}, {}, "stack_depth.*2.5"),
        ({"capture_stack": 2}, {}, "capture_stack.*2"),
        ({"max_tracked": True}, {}, "max_tracked"),
        ({"nope": 1}, {}, "unknown pgleak setting.*nope"),
    ],
)
def test_invalid_values_name_the_knob_and_value(
    overrides: dict[str, object], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_settings(overrides, environ=env)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.leak_threshold = 1  # type: ignore[misc]
