"""Config
======

:class:`ProbeConfig`: every option of a probed run, checked once, at construction (a bad argument fails before
step 1, never at step 5000). :class:`~lit_probe.FeatureProbe` and :class:`~lit_probe.ProbeRun` take the same
options; both build one of these. Names that changed keep working with a :class:`DeprecationWarning`
(:data:`RENAMED`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .diagnose import Thresholds
from .errors import ProbeConfigError, as_list, check_choice, check_int
from .selection import validate_patterns
from .vocab import ACTIVATION, FIGURE_KINDS, GRADIENT, PARAMETER

__all__ = ["ProbeConfig", "RENAMED"]

#: Old argument names and the new ones (old names still work, with a DeprecationWarning).
RENAMED = {
    "every_n_steps": "full_stats_every_n_steps",  # beside two other cadences, it did not say what it paced
    "mode": "figure_files",  # Lightning's `mode` means "min"/"max"
    "flight_recorder_steps": "history_csv_steps",  # it only sets the rows of the CSV written at a finding
}


@dataclass(frozen=True)
class ProbeConfig:
    r"""The options of a probed run (the arguments of :class:`~lit_probe.FeatureProbe`; see its docstring).

    Construct with keywords; :meth:`from_kwargs` also takes the deprecated names of :data:`RENAMED`.
    """

    probes: list[str] = field(default_factory=list)
    signals: tuple[str, ...] = (ACTIVATION, GRADIENT, PARAMETER)
    full_stats_every_n_steps: int = 10
    log_every_n_steps: Optional[int] = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    on_finding: str = "warn"
    save_dir: Optional[str] = None
    probe_validation: bool = False
    history_size: int = 1000
    figure_every_n_steps: Optional[int] = 500
    figures: tuple[str, ...] = FIGURE_KINDS
    max_figure_layers: Optional[int] = 16
    max_channels: int = 64
    num_samples: int = 1
    figure_files: str = "overwrite"
    max_versions: Optional[int] = None
    log_to_wandb: bool = True
    history_csv_steps: int = 200
    gradcam_layers: list[str] = field(default_factory=list)
    figure_wait_s: Optional[float] = 10.0
    figure_share: Optional[float] = 0.1
    param_scope: str = "own"
    stats_file_mb: Optional[float] = 256.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "probes", validate_patterns(as_list(self.probes)))
        signals = tuple(dict.fromkeys(as_list(self.signals)))
        if not signals:
            raise ProbeConfigError("`signals` is empty; give 'activation', 'gradient' and/or 'parameter'.")
        for s in signals:
            check_choice("signals", s, (ACTIVATION, GRADIENT, PARAMETER))
        set_(self, "signals", signals)
        check_choice("param_scope", self.param_scope, ("own", "recursive"))
        check_int("full_stats_every_n_steps", self.full_stats_every_n_steps, 1)
        check_int("log_every_n_steps", self.log_every_n_steps, 1, allow_none=True)
        th = self.thresholds
        if not isinstance(th, Thresholds):
            if th is not None and not isinstance(th, Mapping):
                raise ProbeConfigError(f"`thresholds` must be a dict of threshold overrides, got {th!r}.")
            set_(self, "thresholds", Thresholds.from_dict(th))
        check_choice("on_finding", self.on_finding, ("warn", "raise", "stop"))
        if self.save_dir is not None:
            if not isinstance(self.save_dir, (str, os.PathLike)):
                raise ProbeConfigError(f"`save_dir` must be a path or None, got {self.save_dir!r}.")
            set_(self, "save_dir", os.fspath(self.save_dir))
        set_(self, "probe_validation", bool(self.probe_validation))
        check_int("history_size", self.history_size, 1)
        check_int("figure_every_n_steps", self.figure_every_n_steps, 1, allow_none=True)
        set_(self, "figures", tuple(check_choice("figures", f, FIGURE_KINDS) for f in as_list(self.figures)))
        check_int("max_figure_layers", self.max_figure_layers, 0, allow_none=True)
        check_int("max_channels", self.max_channels, 1)
        check_int("num_samples", self.num_samples, 1)
        check_choice("figure_files", self.figure_files, ("overwrite", "versioned"))
        check_int("max_versions", self.max_versions, 1, allow_none=True)
        set_(self, "log_to_wandb", bool(self.log_to_wandb))
        check_int("history_csv_steps", self.history_csv_steps, 1)
        set_(self, "gradcam_layers", validate_patterns(as_list(self.gradcam_layers), what="gradcam_layers"))
        wait = self.figure_wait_s
        if wait is not None:
            if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
                raise ProbeConfigError(f"`figure_wait_s` must be a number of seconds >= 0 or None, got {wait!r}.")
            set_(self, "figure_wait_s", float(wait))
        share = self.figure_share
        if share is not None:
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise ProbeConfigError(f"`figure_share` must be a fraction of the time in (0, 1] or None, got {share!r}.")
            set_(self, "figure_share", float(share))
        mb = self.stats_file_mb
        if mb is not None:
            if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb >= 0:
                raise ProbeConfigError(f"`stats_file_mb` must be a number of megabytes >= 0 or None, got {mb!r}.")
            set_(self, "stats_file_mb", float(mb))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ProbeConfig":
        """A config from keyword arguments: the deprecated names of :data:`RENAMED` are mapped (with a
        :class:`DeprecationWarning`; giving both an old and its new name is an error), ``None`` for a deprecated
        name means "not given", and an unknown name fails with the known ones."""
        known = {f.name for f in fields(cls)}
        out: dict[str, Any] = {}
        old_names: dict[str, str] = {}
        for key, value in kwargs.items():
            if key in RENAMED:
                if value is None:
                    continue
                new = RENAMED[key]
                if new in kwargs and kwargs[new] != getattr(cls, new, None) and kwargs[new] is not None:
                    raise ProbeConfigError(f"give `{new}` or its old name `{key}`, not both.")
                warnings.warn(f"lit_probe: `{key}` is now called `{new}`; the old name will be removed.",
                              DeprecationWarning, stacklevel=3)
                out[new] = value
                old_names[new] = key
            elif key in known:
                out.setdefault(key, value)
            else:
                raise ProbeConfigError(f"unknown option `{key}`; options: {', '.join(sorted(known))}.")
        try:
            return cls(**out)
        except ProbeConfigError as err:  # name the argument the user gave
            msg = str(err)
            for new, old in old_names.items():
                msg = msg.replace(f"`{new}`", f"`{old}` (now `{new}`)")
            raise ProbeConfigError(msg) from None

    # old names, read-only
    @property
    def every_n_steps(self) -> int:
        return self.full_stats_every_n_steps

    @property
    def mode(self) -> str:
        return self.figure_files

    @property
    def flight_recorder_steps(self) -> int:
        return self.history_csv_steps

    @property
    def layer_figures(self) -> bool:
        """Whether any per-layer figure (activations, gradients, histograms) is drawn."""
        return self.figure_every_n_steps is not None and bool(
            {"activations", "gradients", "histograms"} & set(self.figures))

