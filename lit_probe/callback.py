"""Feature Probe
=============

:class:`FeatureProbe`: the Lightning callback. It owns the Lightning lifecycle only — when to resolve, attach,
collect, flush, act, draw and detach — and delegates the work to a :class:`~lit_probe.session.ProbeSession`
(hooks, device statistics, history, detectors), :mod:`lit_probe.render` (figures off the training thread)
and :mod:`lit_probe.sinks` (disk, W&B, TensorBoard).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

from .diagnose import Thresholds
from .errors import ProbeAlarm, ProbeConfigError
from .findings import Finding, findings_to_markdown
from .mixin import declared_probe_points
from .selection import no_probes_message, resolve, validate_patterns
from .session import SIGNAL_ACT, SIGNAL_GRAD, ProbeSession

__all__ = ["FeatureProbe", "ProbeWarning"]

log = logging.getLogger("lit_probe")

_FIGURE_KINDS = ("activations", "gradients", "histograms", "timeline")
_MAX_WARNINGS_PER_FLUSH = 8


class ProbeWarning(UserWarning):
    """The category of the warnings ``FeatureProbe(on_finding="warn")`` emits for findings."""


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        none = " or None" if allow_none else ""
        raise ProbeConfigError(f"`{name}` must be an integer >= {minimum}{none}, got {value!r}.")
    return int(value)


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ProbeConfigError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


class FeatureProbe(Callback):
    r"""Hook named modules, measure activations and gradients on the device, diagnose, and draw.

    Args:
        probes: module paths to probe, relative to the LightningModule: exact dotted paths (``"layer2.0.conv1"``),
            globs matched per segment (``"layer3.*"``, ``"**.conv1"``), types (``"type:ReLU"``) and regular
            expressions (``"re:^enc\.\d+$"``). Unioned with the points the module declares through
            :class:`~lit_probe.ProbeMixin`. ``None``: only the module's declared points.
        signals: ``"activation"`` (module outputs) and/or ``"gradient"`` (d loss / d output).
        every_n_steps: full statistics (mean, rms, zero fraction, non-finite count, unit activity) every this
            many training steps, and on each of the first 10 steps of a run (bugs of initialisation show at
            once). Min/max — hence non-finite values and explosions, at their exact step and
            first layer — are checked on every step whatever this is.
        log_every_n_steps: how often the host reads the statistics, runs the detectors and logs scalars;
            ``None``: the trainer's ``log_every_n_steps``. With ``on_finding`` ``"raise"`` or ``"stop"``
            the detectors run on every step.
        thresholds: overrides of the detector thresholds (:class:`~lit_probe.diagnose.Thresholds`), e.g.
            ``{"dead_fraction": 0.9}``.
        on_finding: ``"warn"`` (a :class:`ProbeWarning` per finding, rate-limited), ``"raise"``
            (:class:`~lit_probe.ProbeAlarm` on the first finding) or ``"stop"`` (``trainer.should_stop``).
        save_dir: where ``findings.jsonl``, ``summary.md`` and figures go; ``None``:
            ``<trainer.default_root_dir>/probe``.
        probe_validation: also take activation statistics during validation (logged as ``val_act_*``).
        history_size: training steps of statistics kept on the host (memory is bounded by it).
        figure_every_n_steps: draw figures every this many steps; ``None`` turns figures off.
        figures: which figures: ``"activations"``, ``"gradients"``, ``"histograms"``, ``"timeline"``.
        max_channels: channels (or features) drawn per feature-map grid.
        num_samples: samples copied for figures.
        mode: ``"overwrite"`` (a stable file per layer and figure) or ``"versioned"``
            (``<figure>_step000123.png``).
        max_versions: with ``mode="versioned"``, keep the newest N files per figure (``None``: all).
        log_to_wandb: push figures and findings to the trainer's ``WandbLogger`` (or an active ``wandb.run``).
        gradcam_layers: at figure steps, Grad-CAM maps (predicted class) of the first ``num_samples`` input
            images for these layers (paths as in ``probes``, each resolving to conv-like modules), overlaid on the
            images and saved like every figure (``<layer>/gradcam.png``). The model's modules are put in eval mode
            for that extra forward/backward and restored exactly; nothing accumulates into ``.grad``.
        flight_recorder_steps: when a finding fires, the per-layer scalars of this many last steps are written
            next to the figures (``flight_recorder_step<step>.csv``).

    Raises:
        ProbeConfigError: for an invalid argument (at construction), or, when fit starts, for a probe path that
            matches no module (the message names the closest real paths) or when nothing is to be probed.

    Example::

        trainer = pl.Trainer(callbacks=[FeatureProbe(probes=["layer1", "layer3.*"])])
        trainer.fit(model, datamodule)
        probe.findings   # [Finding(step=..., layer='layer3.1', signal='activation', kind='dead', ...)]

    **Logged metrics** (to every logger of the trainer, at log steps; ``<layer>`` is the probe path):
    ``probe/<layer>/act_rms``, ``act_mean``, ``act_absmax``, ``act_zero_fraction``, ``act_nonfinite``,
    ``dead_fraction``, ``grad_rms``, ``grad_mean``, ``grad_absmax``, ``grad_nonfinite``; with
    ``probe_validation``, ``probe/<layer>/val_act_rms`` and friends.

    Attributes:
        points: resolved module names, in registration order (after fit starts).
        findings: every :class:`~lit_probe.Finding` so far.
    """

    def __init__(
        self,
        probes: Optional[list[str]] = None,
        signals: Sequence[str] = ("activation", "gradient"),
        every_n_steps: int = 10,
        log_every_n_steps: Optional[int] = None,
        thresholds: Optional[dict[str, float]] = None,
        on_finding: Literal["warn", "raise", "stop"] = "warn",
        save_dir: Optional[str] = None,
        probe_validation: bool = False,
        history_size: int = 1000,
        figure_every_n_steps: Optional[int] = 500,
        figures: Sequence[str] = _FIGURE_KINDS,
        max_channels: int = 64,
        num_samples: int = 1,
        mode: Literal["overwrite", "versioned"] = "overwrite",
        max_versions: Optional[int] = None,
        log_to_wandb: bool = True,
        flight_recorder_steps: int = 200,
        gradcam_layers: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        if probes is not None and isinstance(probes, str):
            probes = [probes]
        self.probes = validate_patterns(probes or [])
        if isinstance(signals, str):
            signals = [signals]
        signals = tuple(signals)
        if not signals:
            raise ProbeConfigError("`signals` is empty; give 'activation' and/or 'gradient'.")
        for s in signals:
            _check_choice("signals", s, (SIGNAL_ACT, SIGNAL_GRAD))
        self.signals = tuple(dict.fromkeys(signals))
        self.every_n_steps = _check_int("every_n_steps", every_n_steps, 1)
        self.log_every_n_steps = _check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        if thresholds is not None and not isinstance(thresholds, Mapping):
            raise ProbeConfigError(f"`thresholds` must be a dict of threshold overrides, got {thresholds!r}.")
        self.thresholds = Thresholds.from_dict(thresholds)
        self.on_finding = _check_choice("on_finding", on_finding, ("warn", "raise", "stop"))
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise ProbeConfigError(f"`save_dir` must be a path or None, got {save_dir!r}.")
        self.save_dir = None if save_dir is None else os.fspath(save_dir)
        self.probe_validation = bool(probe_validation)
        self.history_size = _check_int("history_size", history_size, 1)
        self.figure_every_n_steps = _check_int("figure_every_n_steps", figure_every_n_steps, 1, allow_none=True)
        if isinstance(figures, str):
            figures = [figures]
        for f in figures:
            _check_choice("figures", f, _FIGURE_KINDS)
        self.figures = tuple(figures)
        self.max_channels = _check_int("max_channels", max_channels, 1)
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.mode = _check_choice("mode", mode, ("overwrite", "versioned"))
        self.max_versions = _check_int("max_versions", max_versions, 1, allow_none=True)
        self.log_to_wandb = bool(log_to_wandb)
        self.flight_recorder_steps = _check_int("flight_recorder_steps", flight_recorder_steps, 1)
        if isinstance(gradcam_layers, str):
            gradcam_layers = [gradcam_layers]
        self.gradcam_layers = validate_patterns(gradcam_layers or [], what="gradcam_layers")

        self.points: list[str] = []
        self.findings: list[Finding] = []
        self.skipped_steps: list[int] = []
        self._session: Optional[ProbeSession] = None
        self._val_session: Optional[ProbeSession] = None
        self._renderer: Any = None
        self._pending_state: Optional[dict] = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._step_at_start = -1
        self._last_flushed = -1
        self._log_every = 50
        self._out_dir: Optional[Path] = None
        self._figure_step: Optional[int] = None
        self._capture_next = False
        self._is_zero = True
        self._info_said: set[str] = set()
        self._dead_log: dict[int, list[tuple[int, float]]] = {}
        self._gradcam_names: list[str] = []
        self._gc_images: Optional[torch.Tensor] = None
        self._prev_step: Optional[int] = None  # step of the previous completed batch
        self._seen_findings = 0  # session findings taken (the session flushes itself when its ring is full)

    # ------------------------------------------------------------------ pickling (ddp_spawn)
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None
        state["_val_session"] = None
        state["_renderer"] = None
        return state

    # ------------------------------------------------------------------ public read-outs
    @property
    def state_key(self) -> str:
        return self._generate_state_key(probes=tuple(self.probes), signals=self.signals,
                                        every_n_steps=self.every_n_steps)

    @property
    def session(self) -> Optional[ProbeSession]:
        """The running (or last) :class:`ProbeSession`: history, dead fractions, scalars."""
        return self._session

    @property
    def out_dir(self) -> Optional[Path]:
        """Where files of the current/last run go (resolved when fit starts)."""
        return self._out_dir

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        # syntax of the module's declarations, before anything runs (paths are resolved at fit start,
        # when layers built in `configure_model` exist)
        validate_patterns(declared_probe_points(pl_module), what="probe_points")

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._close()  # a previous fit on the same callback
        self._reset_run_state()
        self.findings = []
        self.skipped_steps = []
        self._is_zero = trainer.is_global_zero
        declared = declared_probe_points(pl_module)
        patterns = list(dict.fromkeys(self.probes + declared))
        if not patterns:
            raise ProbeConfigError(no_probes_message(pl_module))
        modules = resolve(pl_module, patterns)
        self._check_compiled(pl_module)
        self.points = [n for n, _ in modules]
        self._gradcam_names = [n for n, _ in resolve(pl_module, self.gradcam_layers)] if self.gradcam_layers else []
        self._log_every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        check_every = 1 if self.on_finding in ("raise", "stop") else self._log_every
        reduce = _ddp_reduce if trainer.world_size > 1 and torch.distributed.is_available() \
            and torch.distributed.is_initialized() else None
        self._session = ProbeSession(modules, signals=self.signals, every_n_steps=self.every_n_steps,
                                     thresholds=self.thresholds, history_size=self.history_size,
                                     ring_rows=min(check_every, 256) + 2, reduce=reduce)
        if self._pending_state is not None:
            self._session.load_state_dict(self._pending_state.get("session", {}))
            self.findings = [Finding(**f) for f in self._pending_state.get("findings", [])]
            self._pending_state = None
        if self.probe_validation:
            self._val_session = ProbeSession(modules, signals=(SIGNAL_ACT,), every_n_steps=1,
                                             thresholds=self.thresholds, history_size=100, ring_rows=4,
                                             reduce=reduce)
        self._out_dir = Path(self.save_dir) if self.save_dir else Path(trainer.default_root_dir) / "probe"
        if self._is_zero:
            self._setup_figures(trainer)
        self._session.open()
        if self._val_session is not None:
            self._val_session.open()
        log.info("lit_probe: probing %d module(s): %s", len(self.points), ", ".join(self.points[:20]))

    def _check_compiled(self, pl_module: "pl.LightningModule") -> None:
        compiled = [n for n, m in pl_module.named_modules() if type(m).__name__ == "OptimizedModule"]
        if compiled:
            self._say(f"lit_probe: {', '.join(compiled[:3])} is compiled with torch.compile; hooks are registered "
                      "on the original modules before the first compiled call. If a probed layer reports no data, "
                      "compile after fit starts or probe without compile (see README, compatibility).")

    def _setup_figures(self, trainer: "pl.Trainer") -> None:
        if self.figure_every_n_steps is None or not self.figures:
            return
        try:
            from .render import FigureRenderer
            from .sinks import DiskSink, image_sinks_for
        except Exception as err:  # pragma: no cover - figures are optional
            self._say(f"lit_probe: figures disabled ({type(err).__name__}: {err}).")
            return
        sinks, info = image_sinks_for(trainer.loggers, log_to_wandb=self.log_to_wandb, defer_wandb=True)
        for msg in info:
            self._say(f"lit_probe: {msg}")
        assert self._out_dir is not None
        sinks.insert(0, DiskSink(self._out_dir, mode=self.mode, max_versions=self.max_versions))
        # one figure step (every layer + the timeline) fits in the queue; a slow renderer drops the next ones
        self._renderer = FigureRenderer(sinks, figures=self.figures, max_channels=self.max_channels,
                                        max_queue=2 * (len(self.points) + 1))

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        s = self._session
        if s is None:
            return
        step = trainer.global_step
        self._step_at_start = step
        s.begin_step(step)
        s.record_scale(_scaler_scale(trainer), end=False)
        fig = self.figure_every_n_steps
        if self._renderer is not None and ((fig is not None and step % fig == 0) or self._capture_next):
            if s.capture is None or self._figure_step != step:
                s.capture = {}
                s.capture_fn = self._snapshot
                self._figure_step = step
                if self._gradcam_names:
                    self._gc_images = _first_images(batch, self.num_samples)
            self._capture_next = False

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           loss: torch.Tensor) -> None:
        # the GradScaler creates its scale at its first `scale()`, just before this hook: record the scale
        # this backward uses (at batch start of the first step there is none yet: gradients would stay scaled)
        s = self._session
        if s is not None and s.collecting:
            s.record_scale(_scaler_scale(trainer), end=False)

    def _snapshot(self, i: int, t: torch.Tensor) -> Any:
        from .snapshots import layout_for_module, snapshot_tensor

        s = self._session
        assert s is not None
        return (snapshot_tensor(t, self.num_samples, self.max_channels, layout=layout_for_module(s.modules[i])),
                tuple(t.shape), layout_for_module(s.modules[i]))

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        s = self._session
        if s is None:
            return
        s.end_step()
        s.record_scale(_scaler_scale(trainer), end=True)
        step = self._step_at_start
        completed = trainer.global_step != step or _is_last_batch(trainer, batch_idx)
        if not completed:
            return  # gradient accumulation: the step goes on with the next batch
        if s.capture is not None and self._figure_step == step:
            self._submit_figures(step)
            self._submit_gradcam(pl_module, step)
        # a log boundary crossed since the previous batch: manual optimisation with two optimisers advances
        # global_step by 2 per batch, and `(step + 1) % n == 0` alone would never hold for an even n
        prev = step - 1 if self._prev_step is None else self._prev_step
        self._prev_step = step
        L = self._log_every
        due = (step + 1) // L > (prev + 1) // L or self.on_finding in ("raise", "stop")
        if due:
            self._flush(trainer, step)

    @override
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._val_session is not None and not trainer.sanity_checking:
            self._val_session.begin_step(trainer.global_step, full=True)

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        vs = self._val_session
        if vs is None or trainer.sanity_checking or not vs.collecting:
            return
        vs.end_step()
        vs.flush()
        metrics = {f"probe/{k.replace('/act_', '/val_act_')}": v for k, v in vs.latest_scalars().items()
                   if "/act_" in k}
        self._log_metrics(trainer, metrics, trainer.global_step)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._finish(trainer, failed=False)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # Lightning calls neither on_fit_end nor teardown on this path: everything is released here
        try:
            self._finish(trainer, failed=True)
        except Exception as err:  # never mask the user's exception
            warnings.warn(f"lit_probe: could not write its files after the failure ({err}).", RuntimeWarning,
                          stacklevel=2)
            self._close()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._close()

    # ------------------------------------------------------------------ state (resume)
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._session is None:
            return {}
        return {"session": self._session.state_dict(), "findings": [_finding_state(f) for f in self.findings],
                "version": 1}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------ cold path
    def _flush(self, trainer: "pl.Trainer", step: int) -> None:
        s = self._session
        if s is None:
            return
        s.flush()
        new = s.findings[self._seen_findings:]  # with those of flushes the session did itself (ring full)
        self._seen_findings = len(s.findings)
        self._last_flushed = step
        self.skipped_steps = list(s.diagnoser.skipped_steps)
        for slot, frac in s.diagnoser.dead_fraction_latest.items():
            self._dead_log.setdefault(slot, []).append((step, frac))
        scalars = s.latest_scalars()
        self._log_metrics(trainer, {f"probe/{k}": v for k, v in scalars.items()}, step)
        if self._renderer is not None:
            try:
                self._renderer.flush_sinks()
            except Exception as err:
                self._say(f"lit_probe: could not push figures ({err}).")
        if new:
            self.findings.extend(new)
            self._act(trainer, new, step)

    def _act(self, trainer: "pl.Trainer", new: list[Finding], step: int) -> None:
        if self._is_zero:
            for f in new[:_MAX_WARNINGS_PER_FLUSH]:
                warnings.warn(f"lit_probe: {f.message}", ProbeWarning, stacklevel=2)
            if len(new) > _MAX_WARNINGS_PER_FLUSH:
                warnings.warn(f"lit_probe: {len(new) - _MAX_WARNINGS_PER_FLUSH} more finding(s) at step {step}; "
                              f"see findings.jsonl in {self._out_dir}.", ProbeWarning, stacklevel=2)
            self._flight_record(step)
        if self._renderer is not None:
            self._capture_next = True  # draw the layers as they are right after the finding
        if self.on_finding == "stop":
            trainer.should_stop = True
        elif self.on_finding == "raise":
            first = new[0]
            raise ProbeAlarm(f"lit_probe: {first.message} (on_finding='raise'; {len(new)} finding(s) at this "
                             f"check)", new)

    def _flight_record(self, step: int) -> None:
        s = self._session
        if s is None or self._out_dir is None:
            return
        try:
            from .sinks import atomic_write_text

            self._out_dir.mkdir(parents=True, exist_ok=True)
            path = self._out_dir / f"flight_recorder_step{step:06d}.csv"
            atomic_write_text(path, s.history.to_csv(last=self.flight_recorder_steps))
        except OSError as err:
            self._say(f"lit_probe: cannot write to {self._out_dir} ({err}); findings stay in `probe.findings`.")

    def _submit_figures(self, step: int) -> None:
        s = self._session
        r = self._renderer
        if s is None or r is None or s.capture is None:
            return
        capture, s.capture = s.capture, None
        dead_masks = self._dead_masks(step)
        for i, name in enumerate(s.names):
            act = capture.get((i, SIGNAL_ACT))
            grad = capture.get((i, SIGNAL_GRAD))
            if act is None and grad is None:
                continue
            a_arr, shape, layout = act if act is not None else (None, None, "auto")
            g_arr = grad[0] if grad is not None else None
            if shape is None and grad is not None:
                shape, layout = grad[1], grad[2]
            r.submit_layer(step, name, a_arr, g_arr, dead_masks.get(i), layout=layout, shape=shape)
        if "timeline" in self.figures:
            self._submit_timeline(step)

    def _submit_gradcam(self, pl_module: "pl.LightningModule", step: int) -> None:
        images, self._gc_images = self._gc_images, None
        if images is None or self._renderer is None or not self._gradcam_names:
            return
        from .gradcam import gradcam, overlay

        modes = [(m, m.training) for m in pl_module.modules()]
        devices = [images.device] if images.device.type == "cuda" else []
        try:
            pl_module.eval()  # no BatchNorm update, no dropout: the extra pass changes nothing
            with torch.random.fork_rng(devices=devices):
                shown = images.detach().float()
                lo = shown.amin(dim=(1, 2, 3), keepdim=True)
                hi = shown.amax(dim=(1, 2, 3), keepdim=True)
                shown = ((shown - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1).cpu().numpy()
                if shown.shape[-1] == 1:
                    shown = np.repeat(shown, 3, axis=-1)
                for name in self._gradcam_names:
                    cams = gradcam(pl_module, name, images).detach().cpu().numpy()
                    ov = np.stack([overlay(shown[i, :, :, :3], cams[i]) for i in range(len(cams))])
                    self._renderer.submit_gradcam(step, name, ov, [f"sample {i}" for i in range(len(cams))])
        except Exception as err:
            self._say(f"lit_probe: Grad-CAM disabled ({type(err).__name__}: {err}); it needs a classifier whose "
                      "forward takes the image batch and conv-like outputs at the chosen layers.")
            self._gradcam_names = []
        finally:
            for m, training in modes:
                m.training = training

    def _dead_masks(self, step: int) -> dict[int, np.ndarray]:
        s = self._session
        units = getattr(s, "_last_units", None) or {}
        out = {}
        W = self.thresholds.dead_window
        for slot, last in units.items():
            fs = s.buffer.first_seen.get(slot, step)  # type: ignore[union-attr]
            out[slot // 2] = (np.maximum(last, fs) + W) <= step
        return out

    def _submit_timeline(self, step: int) -> None:
        s = self._session
        if s is None or self._renderer is None or len(s.history) == 0:
            return
        steps, values = s.history.window()
        from .history import STATS

        full = values[:, :, STATS.index("full")]
        keep = np.nanmax(full, axis=1) == 1 if full.size else np.zeros(0, bool)
        if not keep.any():
            return
        steps, values = steps[keep], values[keep]
        n = len(s.names)
        rms = values[:, :, STATS.index("rms")]
        act = rms[:, 0::2].T if rms.size else np.zeros((n, 0))
        grad = rms[:, 1::2].T if rms.size else np.zeros((n, 0))
        dead = np.full((n, len(steps)), np.nan)
        for slot, series in self._dead_log.items():
            for st, frac in series:
                dead[slot // 2, steps >= st] = frac
        marks = [(f.layer, f.step, f.kind) for f in self.findings]
        self._renderer.submit_timeline(step, list(s.names), steps, act, grad, dead, marks)

    def _finish(self, trainer: "pl.Trainer", failed: bool) -> None:
        s = self._session
        if s is None:
            return
        if failed:
            s.reduce = None  # another rank may not be here: no collective on the failure path
        try:
            if s.buffer.pending:
                s.end_step()
                self._flush_safely(trainer)
            never = s.never_fired()
            if never and s.step >= 0 and not failed:
                self._say(f"lit_probe: {len(never)} probed layer(s) never ran during training (bypassed by a "
                          f"direct `.forward()` call, unused, or compiled away): {', '.join(never[:10])}.")
            if self._renderer is not None and "timeline" in self.figures:
                self._renderer.drain()  # the final timeline is never dropped
                self._submit_timeline(max(s.step, 0))
            self._write_files(failed)
        finally:
            self._close()

    def _flush_safely(self, trainer: "pl.Trainer") -> None:
        try:
            self._flush(trainer, self._session.step if self._session else 0)
        except ProbeAlarm:
            pass  # already failing or finishing: the finding is recorded and written below

    def _write_files(self, failed: bool) -> None:
        if not self._is_zero or self._out_dir is None:
            return
        from .sinks import atomic_write_text

        lines = [f"- probed layers ({len(self.points)}): " + ", ".join(f"`{p}`" for p in self.points[:50])]
        if failed:
            lines.append("- the run ended with an exception; statistics up to the last completed step are included")
        if self.skipped_steps:
            lines.append(f"- steps skipped by the GradScaler (inf/NaN gradients by design): {self.skipped_steps[:20]}")
        never = self._session.never_fired() if self._session else []
        if never:
            lines.append("- layers that never ran: " + ", ".join(f"`{n}`" for n in never))
        try:
            self._out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._out_dir / "findings.jsonl", "".join(f.to_json() + "\n" for f in self.findings))
            atomic_write_text(self._out_dir / "summary.md", findings_to_markdown(self.findings, extra_lines=lines))
        except OSError as err:
            self._say(f"lit_probe: cannot write findings to {self._out_dir} ({err}); they stay in `probe.findings`.")
        if self._renderer is not None and self.findings:
            for sink in getattr(self._renderer, "sinks", []):
                if hasattr(sink, "write_findings"):
                    try:
                        sink.write_findings([f.to_dict() for f in self.findings], max(self._last_flushed, 0))
                    except Exception as err:
                        self._say(f"lit_probe: could not push findings to W&B ({err}).")

    def _close(self) -> None:
        """Detach every hook and stop the renderer; idempotent, called on every way out."""
        # Lightning binds `pl_module.log`/`log_dict` onto every callback at each run start; dropping them lets
        # the model (and trainer) be freed while the probe and its statistics live on
        for attr in ("log", "log_dict"):
            self.__dict__.pop(attr, None)
        for sess in (self._session, self._val_session):
            if sess is not None:
                sess.release()
        if self._renderer is not None:
            r = self._renderer
            try:
                r.close()
                r.flush_sinks()
                for sink in getattr(r, "sinks", []):
                    if hasattr(sink, "flush"):
                        sink.flush()
            except Exception as err:
                self._say(f"lit_probe: figure output failed at the end ({err}).")
            finally:
                self._renderer = None

    def _log_metrics(self, trainer: "pl.Trainer", metrics: dict[str, float], step: int) -> None:
        if not metrics or not self._is_zero:
            return
        for logger in trainer.loggers:
            try:
                logger.log_metrics(metrics, step=step)
            except Exception as err:
                self._say(f"lit_probe: logger {type(logger).__name__} rejected probe metrics ({err}).")

    def _say(self, msg: str) -> None:
        if msg in self._info_said or not self._is_zero:
            return
        self._info_said.add(msg)
        log.warning(msg)


# ---------------------------------------------------------------------- helpers (no state)
def _finding_state(f: Finding) -> dict:
    """A Finding as checkpoint-safe primitives (loads with ``weights_only=True``)."""
    return {"step": int(f.step), "layer": f.layer, "signal": f.signal, "kind": f.kind, "value": float(f.value),
            "threshold": float(f.threshold), "message": f.message, "stat": f.stat}


def _first_images(batch: Any, n: int) -> Optional[torch.Tensor]:
    """The first ``[N, C, H, W]`` floating tensor of a batch (images), its first ``n`` samples."""
    from .hooks import iter_tensors

    for t in iter_tensors(batch):
        if t.dim() == 4 and t.shape[1] in (1, 3, 4):
            return t[:n].detach()
    return None


def _is_last_batch(trainer: "pl.Trainer", batch_idx: int) -> bool:
    n = trainer.num_training_batches
    return isinstance(n, int) and batch_idx + 1 >= n


def _scaler_scale(trainer: "pl.Trainer") -> Optional[torch.Tensor]:
    """The GradScaler's scale tensor (a device tensor: reading it costs no host sync), if any."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None


def _ddp_reduce(host: Any, units: dict) -> tuple[Any, dict]:
    """Combine every rank's statistics in one collective (all ranks enter it at the same steps)."""
    import torch.distributed as dist

    from .stats import COLUMNS

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (host, units))
    hosts = [g[0] for g in gathered]
    n = min(len(h.steps) for h in hosts)
    base = hosts[0]
    if n == 0:
        return base, units
    dev = np.stack([h.dev[:n] for h in hosts]).astype(np.float64)
    out = dev[0].copy()
    add = [COLUMNS.index(c) for c in ("nonfinite", "nonzero", "sum")]
    out[..., add] = dev[..., add].sum(0)
    out[..., COLUMNS.index("l2")] = np.sqrt((dev[..., COLUMNS.index("l2")] ** 2).sum(0))
    with np.errstate(invalid="ignore"):
        out[..., COLUMNS.index("min")] = np.min(dev[..., COLUMNS.index("min")], axis=0)
        out[..., COLUMNS.index("max")] = np.max(dev[..., COLUMNS.index("max")], axis=0)
    base.dev = out.astype(np.float32)
    base.steps = base.steps[:n]
    base.calls = sum(h.calls[:n] for h in hosts)
    base.numel = sum(h.numel[:n] for h in hosts)
    base.full = sum(h.full[:n] for h in hosts)
    base.counted = sum(h.counted[:n] for h in hosts)
    base.scale = base.scale[:n]
    base.order = base.order[:n]
    merged: dict = {}
    for _, u in gathered:
        for slot, arr in u.items():
            merged[slot] = arr if slot not in merged or merged[slot].shape != arr.shape \
                else np.maximum(merged[slot], arr)
    return base, merged

