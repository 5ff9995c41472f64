"""Settings: defaults, env vars, kwargs over env, and errors that name knob and value."""

from __future__ import annotations

import pytest

from pgleak._settings import ConfigError, Settings, build_settings, env_typos


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
        ({"PGLEAK_KEEP_FRAMEWORK_FRAMES": "1"}, "keep_framework_frames", True),
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


def test_an_unknown_keyword_names_the_closest_setting() -> None:
    with pytest.raises(ConfigError, match=r"leak_treshold \(did you mean leak_threshold\?\)"):
        build_settings({"leak_treshold": 5}, environ={})
    with pytest.raises(ConfigError, match=r"unknown pgleak setting\(s\): frobnicate; known:"):
        build_settings({"frobnicate": 1}, environ={})


def test_misspelt_env_variables_are_found_and_others_left_alone() -> None:
    env = {
        "PGLEAK_LEAK_TRESHOLD": "5",  # a typo: said
        "PGLEAK_STAK_DEPTH": "8",  # a typo: said
        "PGLEAK_LEAK_THRESHOLD": "5",  # a setting
        "PGLEAK_TEST_DSN": "host=x",  # a tool's own variable, like no setting: left alone
    }
    assert env_typos(env) == [
        ("PGLEAK_LEAK_TRESHOLD", "PGLEAK_LEAK_THRESHOLD"),
        ("PGLEAK_STAK_DEPTH", "PGLEAK_STACK_DEPTH"),
    ]


def test_install_warns_once_about_a_misspelt_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import pgleak

    monkeypatch.setenv("PGLEAK_REPORT_INTERVALL", "10")
    caplog.set_level(logging.WARNING, logger="pgleak")
    try:
        pgleak.install()
        pgleak.install()
    finally:
        pgleak.uninstall()
    said = [r.getMessage() for r in caplog.records if "PGLEAK_REPORT_INTERVALL" in r.getMessage()]
    assert said == [
        "pgleak: PGLEAK_REPORT_INTERVALL is not a pgleak setting and is ignored: "
        "did you mean PGLEAK_REPORT_INTERVAL?"
    ]


@pytest.mark.parametrize("value", ["SIGNOPE", "SIGKILL", "9x"])
def test_a_bad_dump_signal_names_the_knob(value: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid value for dump_signal"):
        build_settings({"dump_signal": value}, environ={})


def test_dump_signal_names_are_normalised() -> None:
    assert build_settings({"dump_signal": "usr2"}, environ={}).dump_signal == "SIGUSR2"
    assert build_settings({}, environ={"PGLEAK_DUMP_SIGNAL": "off"}).dump_signal is None
