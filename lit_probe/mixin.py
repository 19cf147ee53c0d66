"""Mixin
=====

:class:`ProbeMixin` lets a LightningModule declare where it wants to be probed, next to the layers it
defines. :class:`~lit_probe.FeatureProbe` reads the declaration when fit starts (it is never injected
through ``configure_callbacks``, which would silently replace a probe given to the Trainer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = ["ProbeMixin", "declared_probe_points"]


class ProbeMixin:
    """Declare probe points on a LightningModule.

    Either a class attribute::

        class Net(ProbeMixin, pl.LightningModule):
            probe_points = ["backbone.layer1", "backbone.layer3.*", "head"]

    or a method, for points that depend on constructor arguments::

        class Net(ProbeMixin, pl.LightningModule):
            def configure_probes(self):
                return [f"blocks.{i}" for i in range(self.depth)]

    ``Trainer(callbacks=[FeatureProbe()])`` then probes these points; a ``FeatureProbe(probes=[...])``
    probes the union of both.
    """

    probe_points: ClassVar[Sequence[str]] = ()

    def configure_probes(self) -> Sequence[str]:
        """The probe points of this module (default: :attr:`probe_points`)."""
        return list(self.probe_points)


def declared_probe_points(module: Any) -> list[str]:
    """Probe points a module declares through :class:`ProbeMixin` (or duck-typed the same way)."""
    fn = getattr(module, "configure_probes", None)
    if callable(fn):
        points = fn()
    else:
        points = getattr(module, "probe_points", ())
    if points is None:
        return []
    if isinstance(points, str):
        return [points]
    return list(points)
