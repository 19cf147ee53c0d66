"""Errors
======

The exceptions lit_probe raises. Each configuration error is also a :class:`ValueError`, so code that
already catches ``ValueError`` around trainer set-up keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

__all__ = ["check_int", "check_choice", "as_list", "ProbeError", "ProbeConfigError", "ProbeSelectionError", "ProbeAlarm"]


class ProbeError(Exception):
    """Base class of every exception raised by lit_probe."""


class ProbeConfigError(ProbeError, ValueError):
    """A :class:`~lit_probe.FeatureProbe` argument, or a probe declaration, is invalid."""


class ProbeSelectionError(ProbeConfigError):
    """A probe path, glob, type or regex does not match any module of the model."""


class ProbeAlarm(ProbeError, RuntimeError):
    """Raised by ``FeatureProbe(on_finding="raise")`` when a finding fires.

    Attributes:
        findings: the findings that triggered the alarm (the first one is the earliest).
    """

    def __init__(self, message: str, findings: list | None = None) -> None:
        super().__init__(message)
        self.findings = list(findings or [])

    def __reduce__(self):  # keep the findings when the alarm crosses a process boundary (ddp_spawn)
        return (type(self), (self.args[0] if self.args else "", self.findings))


# ---------------------------------------------------------------------- argument checks (construction time)
def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        none = " or None" if allow_none else ""
        raise ProbeConfigError(f"`{name}` must be an integer >= {minimum}{none}, got {value!r}.")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ProbeConfigError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


def as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value or [])
