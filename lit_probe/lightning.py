"""``FeatureProbe`` for ``lightning.pytorch`` only.

``lit_probe.FeatureProbe`` subclasses the ``Callback`` of every Lightning package installed. Use this one to
import ``lightning.pytorch`` alone when both are installed, or to name the package in a LightningCLI YAML::

    trainer:
      callbacks:
        - class_path: lit_probe.lightning.FeatureProbe
          init_args: {probes: ["layer1", "layer3.*"]}

Install: ``pip install "lit-probe[lightning]"``.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from .callback import ProbeCallback
from .output import ProbeWarning

__all__ = ["FeatureProbe", "ProbeWarning"]


class FeatureProbe(ProbeCallback, Callback):
    __doc__ = ProbeCallback.__doc__
