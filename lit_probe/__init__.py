"""lit-probe: see inside PyTorch Lightning training while it runs.

``Trainer(callbacks=[FeatureProbe(probes=["layer1", "layer3.*"])])`` hooks the named modules, measures
activations and gradients on the device, diagnoses dead, exploding, vanishing and non-finite layers, draws
figures, and leaves the model exactly as it was.

Every name here is imported on first use: ``import lit_probe`` imports neither torch nor Lightning, and
``lit_probe.FeatureProbe`` imports only the Lightning package(s) installed (see :mod:`lit_probe.packages`).
Any other loop (plain PyTorch, Lightning Fabric) drives a :class:`~lit_probe.ProbeRun`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ProbeConfig as ProbeConfig
    from .output import ProbeWarning as ProbeWarning
    from .packages import FeatureProbe as FeatureProbe
    from .diagnose import Thresholds as Thresholds
    from .errors import ProbeAlarm as ProbeAlarm
    from .errors import ProbeConfigError as ProbeConfigError
    from .errors import ProbeError as ProbeError
    from .errors import ProbeSelectionError as ProbeSelectionError
    from .extract import capture as capture
    from .extract import extract_features as extract_features
    from .findings import Finding as Finding
    from .findings import Incident as Incident
    from .findings import Severity as Severity
    from .gradcam import gradcam as gradcam
    from .mixin import ProbeMixin as ProbeMixin
    from .selection import list_probe_points as list_probe_points
    from .record import RunRecord as RunRecord
    from .record import read_record as read_record
    from .run import ProbeRun as ProbeRun
    from .session import ProbeSession as ProbeSession

__version__ = "0.2.0"

_WHERE = {
    "FeatureProbe": "packages", "ProbeWarning": "output", "ProbeConfig": "config", "ProbeRun": "run",
    "RunRecord": "record", "read_record": "record", "Thresholds": "diagnose", "ProbeAlarm": "errors",
    "ProbeConfigError": "errors", "ProbeError": "errors", "ProbeSelectionError": "errors", "capture": "extract",
    "extract_features": "extract", "Finding": "findings", "Incident": "findings", "Severity": "findings",
    "gradcam": "gradcam", "ProbeMixin": "mixin", "list_probe_points": "selection", "ProbeSession": "session",
}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lit_probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
