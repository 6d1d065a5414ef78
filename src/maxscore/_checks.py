"""Argument checks shared by the configs and modules: errors that name the argument."""

from __future__ import annotations


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """Raises ``ValueError`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
