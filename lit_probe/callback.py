"""Callback
========

:class:`ProbeCallback`: Lightning's hooks mapped onto a :class:`~lit_probe.run.ProbeRun`, and nothing else. The
run owns the policy (when to read, draw, alarm, write); the output owns the files. Use it as
:class:`lit_probe.FeatureProbe` (this class and the ``Callback`` of every Lightning package installed),
``lit_probe.lightning.FeatureProbe`` or ``lit_probe.pytorch_lightning.FeatureProbe``. Nothing here imports
Lightning: the trainer is duck-typed (:mod:`lit_probe.trainer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

from .config import ProbeConfig
from .findings import Finding, Incident, incidents_of
from .mixin import declared_probe_points
from .output import ProbeWarning
from .run import ProbeRun
from .selection import validate_patterns
from .trainer import check_strategy, is_last_batch, scaler_scale, strategy_gather, tensor_parallel_size
from .vocab import ACTIVATION, FIGURE_KINDS, GRADIENT, PARAMETER

__all__ = ["ProbeCallback", "ProbeWarning"]


class ProbeCallback:
    r"""Hook named modules, measure activations, gradients and parameters on the device, diagnose, and draw.

    Args:
        probes: module paths relative to the LightningModule: dotted paths (``"layer2.0.conv1"``), globs per
            segment (``"layer3.*"``, ``"**.conv1"``), types (``"type:ReLU"``), regular expressions
            (``"re:^enc\.\d+$"``); unioned with the points the module declares (:class:`~lit_probe.ProbeMixin`).
        signals: ``"activation"`` (module outputs), ``"gradient"`` (d loss / d output), ``"parameter"`` (per probed
            module with parameters: weight and gradient norms every optimizer step, unscaled and before clipping;
            the update ratio ``||W_after - W_before|| / ||W_before||`` on full-statistics steps).
        full_stats_every_n_steps: full statistics (mean, rms, zero fraction, unit activity) every this many steps
            and on each of the first 10; min/max (NaN/Inf, explosions) are checked every step. Was
            ``every_n_steps``.
        log_every_n_steps: how often the host reads the statistics, runs the detectors and logs scalars
            (``None``: the trainer's). Under ``on_finding`` ``"raise"``/``"stop"`` every step's min/max are also
            checked without a blocking read, so a NaN/Inf or an explosion is acted on at its exact step.
        thresholds: detector threshold overrides (:class:`~lit_probe.Thresholds`), e.g. ``{"dead_fraction": 0.9}``.
        on_finding: ``"warn"`` (a :class:`ProbeWarning` per finding, rate-limited), ``"raise"``
            (:class:`~lit_probe.ProbeAlarm`) or ``"stop"`` (``trainer.should_stop``; warns too).
        save_dir: where ``run.json``, ``findings.jsonl``, ``summary.md``, ``report.html`` and the figures go
            (``None``: ``<trainer.default_root_dir>/probe``).
        probe_validation: activation statistics during validation too (``probe/<stream>/val_act_*``).
        history_size: training steps of statistics kept on the host.
        figure_every_n_steps: figures every this many steps and at step 0; ``None``: no figures.
        figures: ``"activations"``, ``"gradients"``, ``"histograms"``, ``"timeline"``, ``"parameters"``.
        max_figure_layers: per figure step, the streams with findings and at most this many others (``None``: all).
        max_channels: channels (features) per feature-map grid.
        num_samples: samples copied for figures.
        figure_files: ``"overwrite"`` (``<layer>/<figure>.png``) or ``"versioned"`` (``<figure>_step000123.png``).
            Was ``mode``.
        max_versions: with versioned files, the newest N kept per figure (``None``: all).
        log_to_wandb: push figures and findings to the trainer's ``WandbLogger`` (or an active ``wandb.run``).
        history_csv_steps: rows (steps) of per-stream statistics written to ``flight_recorder_step<step>.csv`` when
            a finding fires. Was ``flight_recorder_steps``. (With figures on, a NaN/Inf or explosion is always
            drawn from the step that fired, ``<figure>_at.png``, beside ``<figure>_before.png``.)
        gradcam_layers: Grad-CAM maps of the first ``num_samples`` images for these layers at figure steps.
        figure_wait_s: seconds the end of fit waits for figures still being drawn (``None``: all of them).
        figure_share: while training runs, the drawing process is busy at most this fraction of the wall time on
            average (bursts of up to 2 s at once), so that it never competes with the training for long; what it
            has not drawn waits in the queue and is drawn at fit end, at full speed, within ``figure_wait_s``.
            Figures that explain a finding are never held back. ``None``: draw whenever there are figures.
        param_scope: ``"own"`` (a module's own parameters) or ``"recursive"`` (its whole subtree's).
        stats_file_mb: the per-step statistics (every stream's, every step) kept in ``<save_dir>/stats.bin`` for
            ``lit-probe diff``, up to this many megabytes (then the file stops growing and the record says at which
            step); ``0``: none kept; ``None``: no limit.
        every_n_steps, mode, flight_recorder_steps: deprecated names (see above).

    Raises:
        ProbeConfigError: an invalid argument (at construction); when fit starts, a probe path that matches no
            module (naming the closest real paths), nothing to probe, or an unsupported strategy.

    **Streams**: a module called several times per step gives one stream per call (``layer1.0.relu``,
    ``layer1.0.relu#1``, up to 4). **Logged** at log steps: ``probe/<stream>/act_rms``, ``act_mean``, ``act_absmax``,
    ``act_zero_fraction``, ``act_nonfinite``, ``dead_fraction``, ``grad_*``, ``probe/<layer>/weight_norm``,
    ``param_grad_norm``, ``update_ratio``, ``val_act_*``.

    Attributes:
        config: the options (:class:`~lit_probe.config.ProbeConfig`; its fields read as attributes here too).
        run: the :class:`~lit_probe.run.ProbeRun` of the current or last fit.
    """

    def __init__(
        self,
        probes: Optional[list[str]] = None,
        signals: Sequence[str] = (ACTIVATION, GRADIENT, PARAMETER),
        full_stats_every_n_steps: int = 10,
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
        figure_files: Literal["overwrite", "versioned"] = "overwrite",
        max_versions: Optional[int] = None,
        log_to_wandb: bool = True,
        history_csv_steps: int = 200,
        gradcam_layers: Optional[list[str]] = None,
        figure_wait_s: Optional[float] = 10.0,
        figure_share: Optional[float] = 0.1,
        param_scope: Literal["own", "recursive"] = "own",
        stats_file_mb: Optional[float] = 256.0,
        every_n_steps: Optional[int] = None,
        mode: Optional[Literal["overwrite", "versioned"]] = None,
        flight_recorder_steps: Optional[int] = None,
    ) -> None:
        super().__init__()
        options = dict(locals())
        for key in ("self", "__class__"):
            options.pop(key, None)
        self.config = ProbeConfig.from_kwargs(**options)
        self.run: Optional[ProbeRun] = None
        self._pending_state: Optional[dict] = None
        self._step = -1

    def __getattr__(self, name: str) -> Any:  # the options read as attributes: probe.thresholds, probe.probes
        config = self.__dict__.get("config")
        if config is not None and not name.startswith("_") and hasattr(config, name):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self) -> dict:  # ddp_spawn pickles the callback: never the per-process run, only its results
        kept = {k: getattr(self, k) for k in ("points", "findings", "skipped_steps")}
        return {**self.__dict__, "run": None, "_kept": kept}

    def _result(self, name: str) -> Any:
        return getattr(self.run, name) if self.run is not None else list(self.__dict__.get("_kept", {}).get(name, []))

    # ------------------------------------------------------------------ read-outs (of the current or last run)
    @property
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(probes=c.probes, signals=c.signals,  # type: ignore[attr-defined]
                                        every_n_steps=c.full_stats_every_n_steps)

    @property
    def session(self) -> Any:
        """The run's :class:`~lit_probe.ProbeSession`: history, dead fractions, scalars."""
        return self.run.session if self.run is not None else None

    @property
    def out_dir(self) -> Optional[Path]:
        return self.run.out_dir if self.run is not None else None

    @property
    def points(self) -> list[str]:
        return self._result("points")

    @property
    def findings(self) -> list[Finding]:
        """Every finding so far, grouped into incidents (``incident``, ``cause``)."""
        return self._result("findings")

    @property
    def incidents(self) -> list[Incident]:
        return incidents_of(self.findings)

    @property
    def skipped_steps(self) -> list[int]:
        return self._result("skipped_steps")

    # ------------------------------------------------------------------ fit
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":  # syntax of the module's declarations, before anything runs
            validate_patterns(declared_probe_points(pl_module), what="probe_points")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._release()  # a previous fit on the same callback
        check_strategy(trainer)
        many = trainer.world_size > 1
        self.run = ProbeRun(
            pl_module, config=self.config, loggers=trainer.loggers, loss_scale=lambda: scaler_scale(trainer),
            gather=strategy_gather(trainer.strategy) if many else None, tensor_parallel=tensor_parallel_size(trainer),
            reduce_any=(lambda d: trainer.strategy.reduce_boolean_decision(d, all=False)) if many else None,
            is_zero=trainer.is_global_zero, default_log_every=getattr(trainer, "log_every_n_steps", 50),
            default_save_dir=str(Path(trainer.default_root_dir) / "probe"), loop="lightning")
        # a strategy that restores the checkpoint after its setup (ModelParallelStrategy) does so after this hook:
        # the run opens at train start, with the probe state of the checkpoint
        self._open_later = bool(getattr(trainer.strategy, "restore_checkpoint_after_setup", False))
        if not self._open_later:
            self._open(trainer)

    def _open(self, trainer: Any) -> None:
        assert self.run is not None
        if self._pending_state is not None:
            self.run.load_state_dict(self._pending_state)
            self._pending_state = None
        self.run.open()
        # Lightning calls on_before_optimizer_step before it clips: no step pre-hooks (they would see clipped grads)
        self.run.bind_optimizers(list(getattr(trainer, "optimizers", []) or []), hook_steps=False)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.run is not None and self.__dict__.get("_open_later"):
            self._open_later = False
            self._open(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.run is not None:
            self._step = trainer.global_step
            self.run.begin_step(self._step, batch, batch_index=batch_idx, epoch=trainer.current_epoch)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.run is not None:
            self.run.before_backward()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.run is not None:  # gradients final here: unscaled under AMP, not yet clipped
            self.run.before_optimizer_step(optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.run is None:
            return
        # gradient accumulation: the step goes on with the next batch unless the step advanced or the epoch ends
        self.run.end_step(complete=trainer.global_step != self._step or is_last_batch(trainer, batch_idx))
        if self.run.should_stop:
            trainer.should_stop = True

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.run is not None and not trainer.sanity_checking:
            self.run.begin_validation(trainer.global_step)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self.run is not None:
            self.run.validation_batch()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run is not None and not trainer.sanity_checking:
            self.run.end_validation()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run is not None:
            self.run.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning calls neither on_fit_end nor teardown on this path: everything is released here
        if self.run is None:
            return
        try:
            self.run.close(failed=True)
        except Exception as err:  # never mask the user's exception
            import warnings

            warnings.warn(f"lit_probe: could not write its files after the failure ({err}).", RuntimeWarning,
                          stacklevel=2)
        finally:
            self._release()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release()

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict() if self.run is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict) if state_dict else None

    def _release(self) -> None:
        """Detach every hook (idempotent, every way out). Lightning binds ``pl_module.log``/``log_dict`` onto each
        callback at run start: dropping them lets the model and trainer be freed while the findings live on."""
        for attr in ("log", "log_dict"):
            self.__dict__.pop(attr, None)
        if self.run is not None:
            self.run.release()
