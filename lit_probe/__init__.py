"""lit-probe: see inside PyTorch Lightning training while it runs.

``Trainer(callbacks=[FeatureProbe(probes=["layer1", "layer3.*"])])`` hooks the named modules, measures
activations and gradients on the device, diagnoses dead, exploding, vanishing and non-finite layers, draws
figures, and leaves the model exactly as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .diagnose import Thresholds as Thresholds
from .errors import ProbeAlarm as ProbeAlarm
from .errors import ProbeConfigError as ProbeConfigError
from .errors import ProbeError as ProbeError
from .errors import ProbeSelectionError as ProbeSelectionError
from .extract import capture as capture
from .extract import extract_features as extract_features
from .findings import Finding as Finding
from .findings import Severity as Severity
from .mixin import ProbeMixin as ProbeMixin
from .gradcam import gradcam as gradcam
from .selection import list_probe_points as list_probe_points
from .session import ProbeSession as ProbeSession

if TYPE_CHECKING:  # imported lazily below: only FeatureProbe needs Lightning
    from .callback import FeatureProbe as FeatureProbe
    from .callback import ProbeWarning as ProbeWarning

__version__ = "0.1.0"

__all__ = ["FeatureProbe", "ProbeWarning", "ProbeMixin", "ProbeSession", "Finding", "Severity", "Thresholds",
           "ProbeError", "ProbeConfigError", "ProbeSelectionError", "ProbeAlarm", "list_probe_points",
           "capture", "extract_features", "gradcam",
           "__version__"]


def __getattr__(name: str):
    # FeatureProbe needs Lightning; import it on first use so the core stays importable without it
    if name in ("FeatureProbe", "ProbeWarning"):
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'lit_probe' has no attribute {name!r}")
