"""Packages
========

Both Lightning packages, first class. :class:`FeatureProbe` here is a real class (a ``class`` statement, seen by
``help()``, ``inspect.signature``, jsonargparse and IDEs) whose bases are :class:`~lit_probe.callback.ProbeCallback`
and the ``Callback`` of every Lightning package installed (``lightning.pytorch`` first, then
``pytorch_lightning``), so one class works with either ``Trainer`` and either ``LightningCLI``. It is
``lit_probe.FeatureProbe``; ``lit_probe.lightning.FeatureProbe`` and ``lit_probe.pytorch_lightning.FeatureProbe``
subclass one package's ``Callback`` only (and import only that package).
"""

from __future__ import annotations

import importlib
from importlib.util import find_spec
from typing import TYPE_CHECKING

from .callback import ProbeCallback

__all__ = ["FeatureProbe", "lightning_packages"]


def lightning_packages() -> list[str]:
    """The Lightning packages installed, ``lightning`` (``lightning.pytorch``) first."""
    return [p for p in ("lightning", "pytorch_lightning") if find_spec(p) is not None]


def _callbacks() -> tuple[type, ...]:
    packages = lightning_packages()
    if not packages:
        raise ImportError("lit_probe.FeatureProbe needs PyTorch Lightning: `pip install lit-probe[lightning]` "
                          "(the `lightning` package) or `pip install lit-probe[pytorch-lightning]`. Without "
                          "Lightning, use lit_probe.ProbeRun in your own loop.")
    return tuple(importlib.import_module("lightning.pytorch" if p == "lightning" else "pytorch_lightning").Callback
                 for p in packages)


if TYPE_CHECKING:
    from lightning.pytorch import Callback as _Callback

    class FeatureProbe(ProbeCallback, _Callback):
        ...
else:
    class FeatureProbe(ProbeCallback, *_callbacks()):
        __doc__ = ProbeCallback.__doc__
