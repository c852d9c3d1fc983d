"""Argument checks with messages that name the argument, the value and what is accepted."""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection, Sequence
from typing import Any


def check_int(name: str, value: Any, minimum: int = 1, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        accepted = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}")


def check_float(
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}" if math.isfinite(high) else "inf)"
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a finite number in {lo}, {hi}{extra}, got {value!r}")


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    """``value`` is one of ``choices``, compared by type as well (``1`` is not ``True``)."""
    if isinstance(value, (list, dict, set)) or not any(type(value) is type(c) and value == c for c in choices):
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {accepted}; got {value!r}")


def check_damping(name: str, value: Any) -> None:
    """A damping is a finite number > 0, or a callable taking ``(step, lr, batch_size)`` or ``(step, lr)``."""
    if callable(value):
        for args in ((0, None, None), (0, None)):
            try:
                inspect.signature(value).bind(*args)
                return
            except TypeError:
                continue
            except ValueError:  # no signature (some builtins): the value is checked at each refresh
                return
        raise ValueError(
            f"`{name}` must be called as fn(step, lr, batch_size) or fn(step, lr); {value!r} takes neither"
        )
    try:
        check_float(name, value, 0.0, low_open=True)
    except ValueError:
        raise ValueError(
            f"`{name}` must be a finite number > 0, a Damping rule or a callable fn(step, lr, batch_size), "
            f"got {value!r}"
        ) from None


def check_patterns(name: str, value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"`{name}` must be a list of module-name patterns (strings), got {value!r}")
