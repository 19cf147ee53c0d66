"""``FeatureProbe`` for ``pytorch_lightning`` only.

``lit_probe.FeatureProbe`` subclasses the ``Callback`` of every Lightning package installed. Use this one to
import ``pytorch_lightning`` alone when both are installed, or to name the package in a LightningCLI YAML::

    trainer:
      callbacks:
        - class_path: lit_probe.pytorch_lightning.FeatureProbe
          init_args: {probes: ["layer1", "layer3.*"]}

Install: ``pip install "lit-probe[pytorch-lightning]"``.
"""

from __future__ import annotations

from pytorch_lightning import Callback

from .callback import ProbeCallback
from .output import ProbeWarning

__all__ = ["FeatureProbe", "ProbeWarning"]


class FeatureProbe(ProbeCallback, Callback):
    __doc__ = ProbeCallback.__doc__
