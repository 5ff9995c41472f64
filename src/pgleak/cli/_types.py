"""argparse value types shared by the subcommands: a bad value is a one-line error, exit 2."""

from __future__ import annotations

import argparse
import re

__all__ = ["count", "duration", "fraction", "non_negative_int", "percent", "positive_float"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|min|m|h|d)?$")


def duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``1.5h``, ``500ms``, ``2d``; never negative."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (a number >= 0 with an optional unit: 30s, 10m, 1h)"
        )
    return float(match.group("n")) * _UNITS[match.group("unit") or "s"]


def _number(text: str, kind: type[float] | type[int]) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def count(text: str) -> int:
    """A whole number >= 1."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def percent(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage in (0, 100]")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1]")
    return value
