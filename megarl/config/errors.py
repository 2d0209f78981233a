"""The error every configuration mistake becomes, and the small checks sections use."""

from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
    """A user's configuration is wrong. `key` is the dotted name of the offending field."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def check_choice(section: str, name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(
            f"{section}.{name}", f"{value!r} is not one of {', '.join(repr(c) for c in choices)}"
        )


def check_range(
    section: str, name: str, value: float | None, *, low: float | None = None,
    high: float | None = None, low_open: bool = False, high_open: bool = False,
) -> None:
    """Check `low <(=) value <(=) high`; a None value (switched off) always passes."""
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{section}.{name}", f"{value!r} is out of range: must be in {interval}")


def check_positive(section: str, name: str, value: float | None) -> None:
    check_range(section, name, value, low=0, low_open=True)


def check_non_negative(section: str, name: str, value: float | None) -> None:
    check_range(section, name, value, low=0)
