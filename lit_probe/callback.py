"""Feature Probe
=============

:class:`FeatureProbe`: the Lightning callback. It maps Lightning's lifecycle onto a Lightning-free
:class:`~lit_probe.session.ProbeSession` (hooks, device statistics, history, detectors) and hands what comes
out to a :class:`~lit_probe.output.ProbeOutput` (loggers, files, figures, W&B). Nothing else happens here:
no tensor math, no drawing, no files.

Both Lightning packages are first class. ``lit_probe.FeatureProbe`` subclasses the ``Callback`` of every
Lightning package installed (``lightning.pytorch`` and/or ``pytorch_lightning``), so one class works with
either Trainer and either LightningCLI; ``lit_probe.lightning.FeatureProbe`` and
``lit_probe.pytorch_lightning.FeatureProbe`` subclass one package's only. Nothing imports Lightning before
one of these classes is first used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

from .diagnose import Thresholds
from .errors import ProbeAlarm, ProbeConfigError, as_list, check_choice, check_int
from .findings import Finding, group_incidents, listed
from .mixin import declared_probe_points
from .output import ProbeOutput, ProbeWarning
from .selection import no_probes_message, resolve, validate_patterns
from .trainer import (NoTrainer, check_strategy, finding_state, first_images, is_last_batch, scaler_scale,
                      strategy_gather)
from .vocab import ACTIVATION, FIGURE_KINDS, GRADIENT, PARAMETER

__all__ = ["ProbeCallback", "FeatureProbe", "ProbeWarning"]

class ProbeCallback:
    r"""Hook named modules, measure activations and gradients on the device, diagnose, and draw.

    Use it as :class:`lit_probe.FeatureProbe` (this class plus the installed Lightning ``Callback``).

    Args:
        probes: module paths to probe, relative to the LightningModule: exact dotted paths (``"layer2.0.conv1"``),
            globs matched per segment (``"layer3.*"``, ``"**.conv1"``), types (``"type:ReLU"``) and regular
            expressions (``"re:^enc\.\d+$"``). Unioned with the points the module declares through
            :class:`~lit_probe.ProbeMixin`. ``None``: only the module's declared points.
        signals: ``"activation"`` (module outputs), ``"gradient"`` (d loss / d output) and/or ``"parameter"``
            (per probed module that owns parameters: the norm of its weights and of their gradients on every
            optimizer step, taken in ``on_before_optimizer_step`` — unscaled under AMP, before clipping — and the
            update ratio ``||W_after - W_before|| / ||W_before||`` on full-statistics steps, from fused
            multi-tensor norms; parameters with ``requires_grad=False`` are frozen: said once, not measured).
        param_scope: ``"own"``: a module's own parameters (``recurse=False``: ``layer1.0.conv1``'s weight, not
            those of ``layer1``'s children); ``"recursive"``: every parameter in its subtree.
        every_n_steps: full statistics (mean, rms, zero fraction, non-finite count, unit activity) every this
            many training steps, and on each of the first 10 steps. Min/max (hence non-finite values and
            explosions, at their exact step and first layer) are checked on every step whatever this is.
        log_every_n_steps: how often the host reads the statistics (one copy), runs the detectors and logs
            scalars; ``None``: the trainer's ``log_every_n_steps``. With ``on_finding`` ``"raise"`` or
            ``"stop"``, every step's min/max are also checked without a blocking read (a non-blocking copy,
            checked one step later on a GPU): a NaN/Inf, a value beyond ``exploding_absmax`` or beyond the
            growth rule's bound of its stream (once its running median is known) is acted on at once, with its
            exact step; the other rules run at log steps.
        thresholds: overrides of the detector thresholds (:class:`~lit_probe.Thresholds`), e.g.
            ``{"dead_fraction": 0.9}``.
        on_finding: ``"warn"`` (a :class:`ProbeWarning` per finding, rate-limited), ``"raise"``
            (:class:`~lit_probe.ProbeAlarm` on the first finding) or ``"stop"`` (``trainer.should_stop``).
        save_dir: where ``findings.jsonl``, ``summary.md``, ``report.html`` and figures go; ``None``:
            ``<trainer.default_root_dir>/probe``.
        probe_validation: also take activation statistics during validation (logged as ``val_act_*``).
        history_size: training steps of statistics kept on the host (memory is bounded by it).
        figure_every_n_steps: draw figures every this many steps (and at step 0); ``None`` turns figures off.
        figures: which figures: ``"activations"``, ``"gradients"``, ``"histograms"``, ``"timeline"``,
            ``"parameters"`` (histograms of each module's weights and parameter gradients).
        max_figure_layers: per figure step, draw the streams with findings and at most this many others,
            spread over the model (``None``: every probed stream; slow with hundreds of layers).
        max_channels: channels (or features) drawn per feature-map grid.
        num_samples: samples copied for figures.
        mode: ``"overwrite"`` (a stable file per layer and figure) or ``"versioned"``
            (``<figure>_step000123.png``).
        max_versions: with ``mode="versioned"``, keep the newest N files per figure (``None``: all).
        log_to_wandb: push figures and findings to the trainer's ``WandbLogger`` (or an active ``wandb.run``).
        flight_recorder_steps: when a finding fires, the per-stream statistics of this many last steps are
            written to ``flight_recorder_step<step>.csv``. With figures on, a NaN/Inf or explosion is drawn from
            the step that fired (``<figure>_at.png``, beside ``<figure>_before.png``): each step keeps a small
            device copy of what the figures show, for the last two steps.
        gradcam_layers: at figure steps, Grad-CAM maps (predicted class) of the first ``num_samples`` input
            images for these layers (conv-like outputs), overlaid on the images (``<layer>/gradcam.png``),
            computed in an extra eval-mode pass whose module modes and RNG are restored exactly.
        figure_wait_s: seconds fit end (or a failure) waits for figures still being drawn; what is left is not
            drawn and is listed in the log and ``summary.md``. ``None``: wait for all of them.

    Raises:
        ProbeConfigError: for an invalid argument (at construction), or, when fit starts, for a probe path that
            matches no module (the message names the closest real paths), when nothing is to be probed, or
            under a strategy the probe does not support (FSDP, DeepSpeed).

    **Streams.** A module called several times per step gives one stream per call: ``layer1.0.relu`` (the first
    call) and ``layer1.0.relu#1`` (the second), up to 4 calls (later ones merge into the last stream).

    **Logged metrics** (every logger, at log steps; ``<stream>`` as above): ``probe/<stream>/act_rms``,
    ``act_mean``, ``act_absmax``, ``act_zero_fraction``, ``act_nonfinite``, ``dead_fraction`` (ReLU-like streams,
    once the dead window has been seen), ``grad_rms``, ``grad_mean``, ``grad_absmax``, ``grad_nonfinite``;
    per probed module with parameters ``probe/<layer>/weight_norm``, ``param_grad_norm``, ``update_ratio``; with
    ``probe_validation``, ``probe/<stream>/val_act_rms`` and friends.

    Attributes:
        points: resolved module paths, in registration order (after fit starts).
        findings: every :class:`~lit_probe.Finding` so far, grouped into incidents (``incident``, ``cause``).
        skipped_steps: steps the GradScaler skipped (inf gradients by design, not reported).
    """

    def __init__(
        self,
        probes: Optional[list[str]] = None,
        signals: Sequence[str] = (ACTIVATION, GRADIENT, PARAMETER),
        every_n_steps: int = 10,
        log_every_n_steps: Optional[int] = None,
        thresholds: Optional[dict[str, float]] = None,
        on_finding: Literal["warn", "raise", "stop"] = "warn",
        save_dir: Optional[str] = None,
        probe_validation: bool = False,
        history_size: int = 1000,
        figure_every_n_steps: Optional[int] = 500,
        figures: Sequence[str] = FIGURE_KINDS,
        max_figure_layers: Optional[int] = 16,
        max_channels: int = 64,
        num_samples: int = 1,
        mode: Literal["overwrite", "versioned"] = "overwrite",
        max_versions: Optional[int] = None,
        log_to_wandb: bool = True,
        flight_recorder_steps: int = 200,
        gradcam_layers: Optional[list[str]] = None,
        figure_wait_s: Optional[float] = 10.0,
        param_scope: Literal["own", "recursive"] = "own",
    ) -> None:
        super().__init__()
        self.probes = validate_patterns(as_list(probes))
        self.signals = tuple(dict.fromkeys(as_list(signals)))
        if not self.signals:
            raise ProbeConfigError("`signals` is empty; give 'activation', 'gradient' and/or 'parameter'.")
        for s in self.signals:
            check_choice("signals", s, (ACTIVATION, GRADIENT, PARAMETER))
        self.param_scope = check_choice("param_scope", param_scope, ("own", "recursive"))
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        if thresholds is not None and not isinstance(thresholds, Mapping):
            raise ProbeConfigError(f"`thresholds` must be a dict of threshold overrides, got {thresholds!r}.")
        self.thresholds = Thresholds.from_dict(thresholds)
        self.on_finding = check_choice("on_finding", on_finding, ("warn", "raise", "stop"))
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise ProbeConfigError(f"`save_dir` must be a path or None, got {save_dir!r}.")
        self.save_dir = None if save_dir is None else os.fspath(save_dir)
        self.probe_validation = bool(probe_validation)
        self.history_size = check_int("history_size", history_size, 1)
        self.figure_every_n_steps = check_int("figure_every_n_steps", figure_every_n_steps, 1, allow_none=True)
        self.figures = tuple(check_choice("figures", f, FIGURE_KINDS) for f in as_list(figures))
        self.max_figure_layers = check_int("max_figure_layers", max_figure_layers, 0, allow_none=True)
        self.max_channels = check_int("max_channels", max_channels, 1)
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.mode = check_choice("mode", mode, ("overwrite", "versioned"))
        self.max_versions = check_int("max_versions", max_versions, 1, allow_none=True)
        self.log_to_wandb = bool(log_to_wandb)
        self.flight_recorder_steps = check_int("flight_recorder_steps", flight_recorder_steps, 1)
        self.gradcam_layers = validate_patterns(as_list(gradcam_layers), what="gradcam_layers")
        wait = figure_wait_s
        if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0):
            raise ProbeConfigError(f"`figure_wait_s` must be a number of seconds >= 0 or None, got {wait!r}.")
        self.figure_wait_s = None if figure_wait_s is None else float(figure_wait_s)

        self.points: list[str] = []
        self.findings: list[Finding] = []
        self.skipped_steps: list[int] = []
        self._session: Any = None
        self._val_session: Any = None
        self._output: Optional[ProbeOutput] = None
        self._pending_state: Optional[dict] = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._out_dir: Optional[Path] = None
        self._step_at_start = -1
        self._prev_step: Optional[int] = None  # step of the previous completed batch
        self._log_every = 50
        self._figure_step: Optional[int] = None
        self._capture_next = False
        self._recording = False
        self._gradcam_names: list[str] = []
        self._gc_images: Any = None

    def __getstate__(self) -> dict:  # ddp_spawn pickles the callback: never the per-process runtime
        state = self.__dict__.copy()
        state.update(_session=None, _val_session=None, _output=None, _gc_images=None)
        return state

    # ------------------------------------------------------------------ public read-outs
    @property
    def state_key(self) -> str:
        return self._generate_state_key(probes=tuple(self.probes), signals=self.signals,  # type: ignore[attr-defined]
                                        every_n_steps=self.every_n_steps)

    @property
    def session(self) -> Any:
        """The running (or last) :class:`~lit_probe.ProbeSession`: history, dead fractions, scalars."""
        return self._session

    @property
    def out_dir(self) -> Optional[Path]:
        """Where files of the current/last run go (resolved when fit starts)."""
        return self._out_dir

    @property
    def incidents(self) -> list:
        """The findings grouped by root cause (:class:`~lit_probe.Incident`), earliest first."""
        from .findings import incidents_of

        return incidents_of(self.findings)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":  # syntax of the module's declarations, before anything runs
            validate_patterns(declared_probe_points(pl_module), what="probe_points")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from .session import ProbeSession

        self._close()  # a previous fit on the same callback
        self._reset_run_state()
        self.findings, self.skipped_steps = [], []
        check_strategy(trainer)
        patterns = list(dict.fromkeys(self.probes + declared_probe_points(pl_module)))
        if not patterns:
            raise ProbeConfigError(no_probes_message(pl_module))
        modules = resolve(pl_module, patterns)
        self.points = [n for n, _ in modules]
        self._gradcam_names = [n for n, _ in resolve(pl_module, self.gradcam_layers)] if self.gradcam_layers else []
        self._log_every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        gather = strategy_gather(trainer) if trainer.world_size > 1 else None
        ring = min(self._log_every, 256) + 2
        self._session = ProbeSession(modules, signals=self.signals, every_n_steps=self.every_n_steps,
                                     thresholds=self.thresholds, history_size=self.history_size, ring_rows=ring,
                                     gather=gather, root=pl_module, param_scope=self.param_scope)
        if self._pending_state is not None:
            self._session.load_state_dict(self._pending_state.get("session", {}))
            self.findings = [Finding(**f) for f in self._pending_state.get("findings", [])]
            self._pending_state = None
        if self.probe_validation:
            self._val_session = ProbeSession(modules, signals=(ACTIVATION,), every_n_steps=1, history_size=100,
                                             thresholds=self.thresholds, ring_rows=4, gather=gather, root=pl_module)
        self._out_dir = Path(self.save_dir) if self.save_dir else Path(trainer.default_root_dir) / "probe"
        self._output = ProbeOutput(
            self._out_dir, trainer.loggers, is_zero=trainer.is_global_zero, figures=self.figures,
            figure_every_n_steps=self.figure_every_n_steps, max_figure_layers=self.max_figure_layers,
            max_channels=self.max_channels, mode=self.mode, max_versions=self.max_versions,
            log_to_wandb=self.log_to_wandb, flight_recorder_steps=self.flight_recorder_steps,
            close_timeout=self.figure_wait_s)
        self._output.start(self.findings)
        compiled = [n for n, m in pl_module.named_modules() if type(m).__name__ == "OptimizedModule"]
        if compiled:
            self._output.say(f"lit_probe: {', '.join(compiled[:3])} is compiled with torch.compile; hooks are on "
                             "the original modules. A probed layer that reports no data was compiled away "
                             "(see README, compatibility).")
        layer_figures = {"activations", "gradients", "histograms"} & set(self.figures)
        self._recording = self._output.renderer is not None and bool(layer_figures)
        if self._recording:  # the flight recorder's figures show the step that fired
            self._session.record_recent(True, self.num_samples, self.max_channels)
        self._session.open()
        self._bind_parameters(trainer)
        if self._val_session is not None:
            self._val_session.open()

    def _bind_parameters(self, trainer: Any) -> None:
        pw, out = self._session.params, self._output
        if pw is None or out is None:
            return
        self._session.bind_optimizers(list(getattr(trainer, "optimizers", []) or []))
        if pw.frozen:
            out.say(f"lit_probe: {len(pw.frozen)} probed layer(s) have only frozen parameters (requires_grad=False): "
                    f"not measured: {listed(pw.frozen, 10)}.")
        if pw.orphans:
            out.say(f"lit_probe: the parameters of {len(pw.orphans)} probed layer(s) are in no optimizer (they never "
                    f"change): {listed(pw.orphans, 10)}.")

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._session is not None:  # gradients are final here: unscaled under AMP, not yet clipped
            self._session.before_optimizer_step(optimizer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        s = self._session
        if s is None:
            return
        step = trainer.global_step
        self._step_at_start = step
        s.begin_step(step)
        s.record_scale(scaler_scale(trainer), end=False)
        fig = self.figure_every_n_steps
        drawing = self._output is not None and self._output.renderer is not None
        if drawing and ((fig is not None and step % fig == 0) or self._capture_next) and self._figure_step != step:
            s.request_snapshots(self.num_samples, self.max_channels)
            self._figure_step = step
            self._capture_next = False
            if self._gradcam_names:
                self._gc_images = first_images(batch, self.num_samples)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        # the GradScaler creates its scale at its first `scale()`, just before this hook: record the scale
        # this backward uses (at batch start of the first step there is none yet)
        s = self._session
        if s is not None and s.collecting:
            s.record_scale(scaler_scale(trainer), end=False)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        s, out = self._session, self._output
        if s is None or out is None:
            return
        s.end_step()
        s.record_scale(scaler_scale(trainer), end=True)
        step = self._step_at_start
        if trainer.global_step == step and not is_last_batch(trainer, batch_idx):
            return  # gradient accumulation: the step goes on with the next batch
        if self._figure_step == step:
            out.figures(step, s.take_snapshots(), {f.layer for f in self.findings})
            if s.params is not None:
                out.parameters(step, s.take_param_histograms(), dict(zip(s.params.names, s.params.numel)),
                               {f.layer for f in self.findings})
            out.timeline(step, s.timeline(self.findings))
            if self._gc_images is not None:
                images, self._gc_images = self._gc_images, None
                self._draw_gradcam(pl_module, images, step)
        # a log boundary crossed since the previous batch: manual optimisation with two optimisers advances
        # global_step by 2 per batch, and `(step + 1) % n == 0` alone would never hold for an even n
        prev = step - 1 if self._prev_step is None else self._prev_step
        self._prev_step = step
        L = self._log_every
        due = (step + 1) // L > (prev + 1) // L
        watch = self.on_finding in ("raise", "stop")
        # NaN/Inf and the absolute explosion bound at their exact step, without a blocking read per step; the
        # flight recorder pins that step's figure inputs (drawn when the findings of that step are known)
        alarm = s.sentinel_alarm(self.thresholds.exploding_absmax) if watch or self._recording else None
        if not due and watch:
            due = alarm is not None
            if trainer.world_size > 1:  # every rank enters the flush's collective, or none
                due = bool(trainer.strategy.reduce_boolean_decision(due, all=False))
        if due:
            self._flush(trainer, step)

    def _draw_gradcam(self, pl_module: Any, images: Any, step: int) -> None:
        from .gradcam import gradcam_overlays

        try:
            self._output.gradcam(step, gradcam_overlays(pl_module, self._gradcam_names, images))  # type: ignore[union-attr]
        except Exception as err:
            self._output.say(f"lit_probe: Grad-CAM disabled ({type(err).__name__}: {err}); it needs a "  # type: ignore[union-attr]
                             "classifier whose forward takes the image batch, and conv-like layers.")
            self._gradcam_names = []

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._val_session is not None and not trainer.sanity_checking:
            self._val_session.begin_step(trainer.global_step, full=True)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self._val_session is not None and self._val_session.collecting:
            self._val_session.new_batch()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        vs = self._val_session
        if vs is None or trainer.sanity_checking or not vs.collecting:
            return
        vs.end_step()
        vs.flush()
        metrics = {f"probe/{k.replace('/act_', '/val_act_')}": v for k, v in vs.latest_scalars().items()
                   if "/act_" in k}
        if self._output is not None:
            self._output.scalars(metrics, trainer.global_step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(failed=False)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning calls neither on_fit_end nor teardown on this path: everything is released here
        try:
            self._finish(failed=True)
        except Exception as err:  # never mask the user's exception
            import warnings

            warnings.warn(f"lit_probe: could not write its files after the failure ({err}).", RuntimeWarning,
                          stacklevel=2)
            self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        if self._session is None:
            return {}
        return {"session": self._session.state_dict(), "findings": [finding_state(f) for f in self.findings],
                "version": 2}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------ log steps and the end
    def _flush(self, trainer: Any, step: int) -> None:
        s, out = self._session, self._output
        if s is None or out is None:
            return
        s.flush()
        new, s.findings = s.findings, []  # with those of flushes the session did itself (its ring was full)
        self.skipped_steps = list(s.diagnosis.skipped_steps)
        out.scalars({f"probe/{k}": v for k, v in s.latest_scalars().items()}, step)
        out.flush()
        if new:
            new, _ = group_incidents(self.findings, new)
        if new:
            self.findings.extend(new)
            out.findings(new, self.findings, step, s.history.to_csv)
        if not self._draw_pinned(s, out) and new:
            self._capture_next = True  # no copy of the step that fired: draw the layers as they are next step
        if not new:
            return
        if self.on_finding == "stop":
            trainer.should_stop = True
        elif self.on_finding == "raise":
            raise ProbeAlarm(f"lit_probe: {new[0].message} (on_finding='raise'; {len(new)} finding(s) at this "
                             f"check)", new)

    def _draw_pinned(self, s: Any, out: ProbeOutput) -> bool:
        """After a flush: draw the pinned figure inputs of the step that fired if a non-finite or exploding
        finding is at that step; drop them either way (a GradScaler skip alarms without a finding)."""
        if not s.pinned:
            return False
        at = next(iter(s.pinned))
        snaps = s.claim_pinned(at)
        if not any(f.step == at and f.kind in ("nonfinite", "exploding") for f in self.findings):
            return False
        out.figures(at, snaps, {f.layer for f in self.findings})
        return True

    def _finish(self, failed: bool) -> None:
        s, out = self._session, self._output
        if s is None or out is None:
            return
        if failed:
            s.gather = None  # another rank may not be here: no collective on the failure path
        try:
            if s.buffer.pending:
                s.end_step()
                if failed and self._recording:  # the failed step's figures, if it showed the failure
                    s.sentinel_alarm(self.thresholds.exploding_absmax)
                try:
                    self._flush(NoTrainer(), s.step)
                except ProbeAlarm:
                    pass  # already failing or finishing: the finding is recorded and written below
            never = s.never_fired()
            lines = [f"- probed layers ({len(self.points)}): " + ", ".join(f"`{p}`" for p in self.points[:50])]
            if failed:
                lines.append("- the run ended with an exception; statistics up to the last completed step are "
                             "included")
            if self.skipped_steps:
                lines.append(f"- steps skipped by the GradScaler (inf/NaN gradients by design): "
                             f"{self.skipped_steps[:20]}")
            if never and s.step >= 0:
                lines.append("- layers that never ran: " + ", ".join(f"`{n}`" for n in never))
                if not failed:
                    out.say(f"lit_probe: {len(never)} probed layer(s) never ran during training (bypassed by a "
                            f"direct `.forward()` call, unused, or compiled away): {', '.join(never[:10])}.")
            out.close(self.findings, lines, s.timeline(self.findings), max(s.step, 0))
        finally:
            self._close()

    def _close(self) -> None:
        """Detach every hook and drop the per-run output; idempotent, called on every way out."""
        # Lightning binds `pl_module.log`/`log_dict` onto every callback at each run start; dropping them lets
        # the model (and trainer) be freed while the probe and its statistics live on
        for attr in ("log", "log_dict"):
            self.__dict__.pop(attr, None)
        for sess in (self._session, self._val_session):
            if sess is not None:
                sess.release()
        self._output = None


def __getattr__(name: str) -> Any:
    if name == "FeatureProbe":  # built on first use, cached: a subclass of every installed Lightning's Callback
        from .packages import lightning_packages, make_feature_probe

        cls = make_feature_probe(lightning_packages(), __name__)
        globals()["FeatureProbe"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
