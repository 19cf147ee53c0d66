"""Packages
========

Both Lightning packages, first class: which are installed, and ``FeatureProbe`` classes that are real subclasses
of their ``Callback``. Nothing here imports Lightning before a class is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from importlib.util import find_spec

__all__ = ["lightning_packages", "make_feature_probe"]


def lightning_packages() -> list[str]:
    """The Lightning packages installed, ``lightning`` (``lightning.pytorch``) first."""
    return [p for p in ("lightning", "pytorch_lightning") if find_spec(p) is not None]


def _callback_base(package: str) -> type:
    module = importlib.import_module("lightning.pytorch" if package == "lightning" else "pytorch_lightning")
    return module.Callback


def make_feature_probe(packages: Sequence[str], module: str) -> type:
    """``ProbeCallback`` joined with the ``Callback`` of each of ``packages``, as ``<module>.FeatureProbe``."""
    from .callback import ProbeCallback

    if not packages:
        raise ImportError("lit_probe.FeatureProbe needs PyTorch Lightning: `pip install lit-probe[lightning]` "
                          "(the `lightning` package) or `pip install lit-probe[pytorch-lightning]`.")
    bases = (ProbeCallback,) + tuple(_callback_base(p) for p in packages)
    cls = type("FeatureProbe", bases, {"__module__": module, "__doc__": ProbeCallback.__doc__})
    cls.__qualname__ = "FeatureProbe"
    return cls
