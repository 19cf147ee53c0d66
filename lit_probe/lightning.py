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

from .output import ProbeWarning
from .packages import make_feature_probe

__all__ = ["FeatureProbe", "ProbeWarning"]

FeatureProbe = make_feature_probe(["lightning"], __name__)
