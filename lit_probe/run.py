"""Run
===

:class:`ProbeRun` is one probed training run, whatever drives it: a plain PyTorch loop, a Lightning Fabric loop
(:func:`lit_probe.fabric.probe_fabric`), or a Lightning ``Trainer`` (:class:`~lit_probe.FeatureProbe` maps the
Trainer's hooks onto these verbs and does nothing else). It owns the session (hooks, device statistics, history,
detectors), the output (loggers, files, figures, W&B, the run record) and the policy between them: when to read
the device, when to draw, the per-step alarm and the flight recorder, what to do with a finding, and closing on
every way out. It imports no Lightning.

A plain loop::

    with ProbeRun(model, ["layer1", "layer3.*"], optimizers=[opt], save_dir="probe") as run:
        for x, y in loader:
            with run.step(batch=x):
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
    print(run.findings)  # and probe/report.html, summary.md, run.json, stats.bin, figures

The verbs, in the order a loop calls them: :meth:`open` (or ``with``), per step :meth:`begin_step`,
:meth:`before_backward` (with a GradScaler), :meth:`before_optimizer_step` (called for you by a hook on each
optimizer given to :meth:`bind_optimizers`, unless ``hook_steps=False``), :meth:`end_step` (or the
:meth:`step` context manager for the three), the validation verbs, and :meth:`close`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import nn

from .config import ProbeConfig
from .errors import ProbeAlarm, ProbeConfigError, ProbeError
from .findings import Finding, Incident, group_incidents, incidents_of, listed
from .history import PARAM_STATS, STATS
from .mixin import declared_probe_points
from .output import ProbeOutput
from .record import RunRecord
from .selection import no_probes_message, resolve
from .session import ProbeSession
from .vocab import ACTIVATION

__all__ = ["ProbeRun", "first_images"]

#: Log-step cadence of a loop that says none (Lightning's default ``log_every_n_steps``).
DEFAULT_LOG_EVERY = 50
#: Steps whose batch index and epoch are kept for the findings (the latest).
BATCHES_KEPT = 4096


class ProbeRun:
    """One probed run over ``model``, driven by any training loop.

    Args:
        model: the model whose modules are probed (names are relative to it: ``layer1.0.conv1``).
        probes: module paths, globs, ``type:`` and ``re:`` patterns (see :class:`~lit_probe.FeatureProbe`),
            unioned with the points ``model`` declares through :class:`~lit_probe.ProbeMixin`.
        optimizers: the optimizers, for the parameter signal (also later, :meth:`bind_optimizers`).
        config: the options, as a :class:`~lit_probe.config.ProbeConfig`; or give them as keywords
            (``save_dir="probe"``, ``figure_every_n_steps=100``, ... the arguments of
            :class:`~lit_probe.FeatureProbe`).
        loggers: objects with ``log_metrics(metrics, step=)`` (Lightning/Fabric loggers) for the scalars.
        loss_scale: a ``torch.amp.GradScaler`` (or a callable returning the scale tensor) when the loss is scaled,
            so gradients are judged unscaled and skipped steps are not findings.
        gather: for several processes: this rank's packed statistics (a 1-D float64 array) -> every rank's, in
            rank order; entered by every rank at the same steps (see :func:`lit_probe.trainer.strategy_gather`).
        reduce_any: for several processes: ``True`` on every rank if it is ``True`` on any (an early read after a
            per-step alarm must be entered by all ranks or none).
        tensor_parallel: with ``gather``, the size of a tensor-parallel group (consecutive ranks that see the same
            samples and hold parts of some layers' units; :func:`lit_probe.trainer.tensor_parallel_size`).
        is_zero: whether this process writes (rank zero).
        default_log_every: how often the host reads statistics when ``log_every_n_steps`` is not set.
        default_save_dir: where files go when ``save_dir`` is not set (``./probe``).
        loop: a word for the record (``"plain"``, ``"fabric"``, ``"lightning"``).
        **options: options of :class:`~lit_probe.config.ProbeConfig` (when ``config`` is not given).

    Attributes:
        config: the options.
        points: the probed module paths, in registration order (after :meth:`open`).
        findings: every finding so far, grouped into incidents.
        skipped_steps: steps a GradScaler skipped (inf gradients by design, not reported).
        should_stop: ``True`` once a finding fired under ``on_finding="stop"``.
    """

    def __init__(self, model: nn.Module, probes: Optional[Sequence[str]] = None, *,
                 optimizers: Sequence[Any] = (), config: Optional[ProbeConfig] = None, loggers: Sequence[Any] = (),
                 loss_scale: Any = None, gather: Optional[Callable[[np.ndarray], list[np.ndarray]]] = None,
                 reduce_any: Optional[Callable[[bool], bool]] = None, is_zero: bool = True,
                 default_log_every: int = DEFAULT_LOG_EVERY, default_save_dir: str = "probe", loop: str = "plain",
                 tensor_parallel: int = 1, **options: Any) -> None:
        if config is not None and options:
            raise ProbeConfigError(f"give `config` or options ({', '.join(options)}), not both.")
        self.config = config if config is not None else ProbeConfig.from_kwargs(**options)
        if probes is not None:
            self.config = replace(self.config, probes=list(dict.fromkeys(list(self.config.probes) + list(probes))))
        self.model = model
        self.loggers = list(loggers or [])
        self._scale = _scale_reader(loss_scale)
        self.gather, self.reduce_any, self.is_zero, self.loop = gather, reduce_any, bool(is_zero), loop
        self.tensor_parallel = max(1, int(tensor_parallel))
        self.log_every = self.config.log_every_n_steps or max(1, int(default_log_every or DEFAULT_LOG_EVERY))
        self.out_dir = Path(self.config.save_dir or default_save_dir)
        self.points: list[str] = []
        self.findings: list[Finding] = []
        self.skipped_steps: list[int] = []
        self.should_stop = False
        self.session: Optional[ProbeSession] = None
        self.output: Optional[ProbeOutput] = None
        self._val: Optional[ProbeSession] = None
        self._optimizers = list(optimizers)
        self._step_hooks: list[Any] = []
        self._pending_state: Optional[Mapping[str, Any]] = None
        self._step = -1  # the step begun last
        self._prev: Optional[int] = None  # the last completed step
        self._figure_step: Optional[int] = None
        self._capture_next = False
        self._explain: list[str] = []  # streams of findings whose figures are not drawn yet (drawn with priority)
        self._recording = False
        self._gradcam: list[str] = []
        self._gc_images: Any = None
        self._closed = False
        self._record: Optional[RunRecord] = None
        self._batch_at: dict[int, tuple[Optional[int], Optional[int]]] = {}  # step -> (batch index, epoch)

    # ------------------------------------------------------------------ read-outs
    @property
    def incidents(self) -> list[Incident]:
        """The findings grouped by root cause, earliest first."""
        return incidents_of(self.findings)

    @property
    def record(self) -> Optional[RunRecord]:
        """The run record (what ``run.json`` holds), on rank zero after :meth:`open`."""
        return self._record

    @property
    def validation_session(self) -> Optional[ProbeSession]:
        """The session of validation's activation statistics (with ``probe_validation``), else ``None``."""
        return self._val

    @property
    def is_open(self) -> bool:
        return self.session is not None and not self._closed

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> "ProbeRun":
        """Resolve the probes (an unknown path fails here, naming the closest real paths), attach the hooks and
        open the output. Idempotent while open."""
        if self.is_open:
            return self
        if self.model is None:
            raise ProbeError("this ProbeRun was closed: build a new one for another run.")
        try:
            return self._open()
        except BaseException:
            self.release()  # `with` calls no __exit__ when __enter__ fails: nothing may stay attached
            raise

    def _open(self) -> "ProbeRun":
        cfg, model = self.config, self.model
        patterns = list(dict.fromkeys(list(cfg.probes) + declared_probe_points(model)))
        if not patterns:
            raise ProbeConfigError(no_probes_message(model))
        modules = resolve(model, patterns)
        self.points = [n for n, _ in modules]
        self._gradcam = [n for n, _ in resolve(model, list(cfg.gradcam_layers))] if cfg.gradcam_layers else []
        self.findings, self.skipped_steps, self.should_stop, self._closed = [], [], False, False
        s = self.session = ProbeSession(
            modules, signals=cfg.signals, every_n_steps=cfg.full_stats_every_n_steps, thresholds=cfg.thresholds,
            history_size=cfg.history_size, ring_rows=min(self.log_every, 256) + 2, gather=self.gather, root=model,
            param_scope=cfg.param_scope, tensor_parallel=self.tensor_parallel)
        resumed = self._pending_state is not None
        if self._pending_state is not None:
            s.load_state_dict(self._pending_state.get("session", {}))
            self.findings = [Finding.from_dict(f) for f in self._pending_state.get("findings", [])]
            self._pending_state = None
        if cfg.probe_validation:
            self._val = ProbeSession(modules, signals=(ACTIVATION,), every_n_steps=1, history_size=100,
                                     thresholds=cfg.thresholds, ring_rows=4, gather=self.gather, root=model,
                                     tensor_parallel=self.tensor_parallel)
        self._record = RunRecord(layers=list(self.points), loop=self.loop)
        out = self.output = ProbeOutput(self.out_dir, self.loggers, cfg, is_zero=self.is_zero, record=self._record)
        out.start(self.findings, resumed=resumed)
        s.keep_derived(out.stats is not None)  # the per-step statistics go to the run's stats.bin (rank zero)
        compiled = [n for n, m in model.named_modules() if type(m).__name__ == "OptimizedModule"]
        if compiled:
            out.say(f"lit_probe: {', '.join(compiled[:3])} is compiled with torch.compile; hooks are on the original "
                    "modules. A probed layer that reports no data was compiled away (see README, compatibility).")
        self._recording = out.renderer is not None and cfg.layer_figures
        if self._recording:  # the flight recorder's figures show the step that fired
            s.record_recent(True, cfg.num_samples, cfg.max_channels)
        s.open()
        if self._val is not None:
            self._val.open()
        if self._optimizers:
            self.bind_optimizers(self._optimizers)
        return self

    def bind_optimizers(self, optimizers: Sequence[Any], hook_steps: bool = True) -> None:
        """The parameter signal: map the probed parameters onto ``optimizers`` (torch optimizers, or wrappers
        with an ``.optimizer`` such as Fabric's). With ``hook_steps``, a step pre-hook on each calls
        :meth:`before_optimizer_step` (gradients final: unscaled by a GradScaler's ``step``)."""
        s, out = self.session, self.output
        self._optimizers = [_unwrap_optimizer(o) for o in optimizers]
        if s is None or out is None or s.params is None:
            return
        self._remove_step_hooks()
        s.bind_optimizers(self._optimizers)
        if hook_steps:
            for opt in self._optimizers:
                self._step_hooks.append(opt.register_step_pre_hook(
                    lambda o, args, kwargs: self.before_optimizer_step(o)))
        pw = s.params
        if pw.frozen:
            out.say(f"lit_probe: {len(pw.frozen)} probed layer(s) have only frozen parameters (requires_grad=False): "
                    f"not measured: {listed(pw.frozen, 10)}.")
        if pw.orphans:
            out.say(f"lit_probe: the parameters of {len(pw.orphans)} probed layer(s) are in no optimizer (they never "
                    f"change): {listed(pw.orphans, 10)}.")

    def __enter__(self) -> "ProbeRun":
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)

    def __getstate__(self) -> dict:
        raise TypeError("ProbeRun is per process and not picklable; build one in each process.")

    # ------------------------------------------------------------------ one training step
    def begin_step(self, step: Optional[int] = None, batch: Any = None, *, batch_index: Optional[int] = None,
                   epoch: Optional[int] = None) -> None:
        """A batch of training step ``step`` begins (default: the step after the last one). With gradient
        accumulation call it for each batch with the same ``step``. ``batch``: its images feed Grad-CAM.
        ``batch_index`` / ``epoch``: where the batch is in the data (``batch_idx``, the epoch); findings at
        this step carry them (:attr:`Finding.batch`, :attr:`Finding.epoch`)."""
        s, out = self.session, self.output
        if s is None or out is None or self._closed:
            return
        step = self._step + 1 if step is None else int(step)
        self._step = step
        if batch_index is not None or epoch is not None:
            if step not in self._batch_at and len(self._batch_at) >= BATCHES_KEPT:
                self._batch_at.pop(next(iter(self._batch_at)))  # the oldest step (insertion order)
            if step not in self._batch_at:  # accumulation: the step's first batch
                self._batch_at[step] = (None if batch_index is None else int(batch_index),
                                        None if epoch is None else int(epoch))
        s.begin_step(step)
        s.record_scale(self._read_scale(), end=False)
        fig = self.config.figure_every_n_steps
        if out.renderer is not None and self._figure_step != step and (
                (fig is not None and step % fig == 0) or self._capture_next):
            s.request_snapshots(self.config.num_samples, self.config.max_channels)
            self._figure_step, self._capture_next = step, False
            if self._gradcam:
                self._gc_images = first_images(batch, self.config.num_samples)

    def before_backward(self) -> None:
        """Just before ``loss.backward()`` under a GradScaler (it creates its scale at its first ``scale()``):
        records the scale this backward uses. Not needed without loss scaling."""
        if self.session is not None and self.session.collecting:
            self.session.record_scale(self._read_scale(), end=False)

    def before_optimizer_step(self, optimizer: Any) -> None:
        """Just before ``optimizer`` updates, gradients final: weight and gradient norms of its probed
        parameters (and on full steps a copy for the update ratio)."""
        if self.session is not None:
            self.session.before_optimizer_step(_unwrap_optimizer(optimizer))

    def end_step(self, complete: bool = True) -> list[Finding]:
        """The batch has run (forward, backward and, if ``complete``, the optimizer step). ``complete=False``:
        gradient accumulation goes on with the next batch of the same step.

        Returns the findings new at this step's read (log steps, or at once after an alarm).

        Raises:
            ProbeAlarm: under ``on_finding="raise"``, on the first finding.
        """
        s, out = self.session, self.output
        if s is None or out is None or self._closed:
            return []
        s.end_step()
        s.record_scale(self._read_scale(), end=True)
        step = self._step
        if not complete:
            return []
        if self._figure_step == step:
            self._draw_figure_step(step)
        # a log boundary crossed since the previous step (manual optimisation with two optimisers advances the
        # step by 2 per batch: `(step + 1) % n == 0` alone would never hold for an even n)
        prev = step - 1 if self._prev is None else self._prev
        self._prev = step
        due = (step + 1) // self.log_every > (prev + 1) // self.log_every
        watch = self.config.on_finding in ("raise", "stop")
        # NaN/Inf and explosions at their exact step without a blocking read per step; the flight recorder pins
        # that step's figure inputs (drawn once the findings of that step are known)
        alarm = s.sentinel_alarm(self.config.thresholds.exploding_absmax) if watch or self._recording else None
        if not due and watch:
            due = alarm is not None
            if self.reduce_any is not None:  # every rank enters the read's collective, or none
                due = bool(self.reduce_any(due))
        return self._read(step) if due else []

    @contextlib.contextmanager
    def step(self, step: Optional[int] = None, batch: Any = None, *, batch_index: Optional[int] = None,
             epoch: Optional[int] = None) -> Iterator["ProbeRun"]:
        """``with run.step(batch=x): ...`` = :meth:`begin_step`, the body, :meth:`end_step` (not on an error)."""
        self.begin_step(step, batch, batch_index=batch_index, epoch=epoch)
        yield self
        self.end_step()

    # ------------------------------------------------------------------ validation
    def begin_validation(self, step: Optional[int] = None) -> None:
        """Validation begins (with ``probe_validation``): activations of every batch until :meth:`end_validation`."""
        if self._val is not None:
            self._val.begin_step(self._step if step is None else int(step), full=True)

    def validation_batch(self) -> None:
        if self._val is not None and self._val.collecting:
            self._val.new_batch()

    def end_validation(self) -> None:
        """Validation ended: its activation statistics go to the loggers as ``probe/<stream>/val_act_*``."""
        vs = self._val
        if vs is None or not vs.collecting:
            return
        vs.end_step()
        vs.flush()
        metrics = {f"probe/{k.replace('/act_', '/val_act_')}": v for k, v in vs.latest_scalars().items()
                   if "/act_" in k}
        if self.output is not None:
            self.output.scalars(metrics, vs.step)

    # ------------------------------------------------------------------ the end
    def close(self, failed: bool = False) -> None:
        """End the run: a last read, the figures still queued (bounded by ``figure_wait_s``), the record,
        ``summary.md``, ``report.html``; every hook removed. Idempotent; on ``failed`` no collective is entered
        (another rank may be gone) and nothing is raised."""
        s, out = self.session, self.output
        if s is None or out is None or self._closed:
            self.release()
            return
        self._closed = True
        if failed:
            s.gather = None
        try:
            if s.buffer.pending:
                s.end_step()
                if failed and self._recording:  # the failed step's figures, if it showed the failure
                    s.sentinel_alarm(self.config.thresholds.exploding_absmax)
                self._read(s.step, final=True, partial=s.step != self._prev)
            # a container without a forward of its own (ModuleList, ModuleDict) is never called, by design
            callable_ = {n for n, m in zip(s.names, s.modules) if type(m).forward is not nn.Module.forward}
            never = [n for n in s.never_fired() if n in callable_] if s.step >= 0 else []
            functional = set(s.used_functionally(never))
            plain = [n for n in never if n not in functional]
            if plain and not failed:
                out.say(f"lit_probe: {len(plain)} probed layer(s) never ran during training (bypassed by a direct "
                        f"`.forward()` call, unused, or compiled away): {', '.join(plain[:10])}.")
            if functional and not failed:
                used = [n for n in never if n in functional]
                out.say(f"lit_probe: {len(used)} probed layer(s) were never called but their weights got gradients: "
                        f"used functionally (`F.conv1d(x, m.weight)`, `m.weight @ x`, as Mamba's slow path does), "
                        f"so no hook sees their inputs or outputs; probe the module that uses them: "
                        f"{', '.join(used[:10])}.")
            out.close(self.findings, status="failed" if failed else "finished", never_ran=never,
                      skipped_steps=self.skipped_steps, streams=self._streams(), timeline=s.timeline(self.findings),
                      step=max(s.step, 0))
        finally:
            self.release()

    def release(self) -> None:
        """Remove every hook and drop the references to the model's tensors, writing nothing (idempotent). The
        findings and the history stay."""
        self._closed = True
        self._remove_step_hooks()
        for sess in (self.session, self._val):
            if sess is not None:
                sess.release()
        # nothing of the model, the trainer or the loop is kept: they can be freed while the findings live on
        self.model, self.output, self._gc_images = None, None, None  # type: ignore[assignment]
        self.loggers, self._optimizers, self._scale, self.gather, self.reduce_any = [], [], None, None, None

    def _remove_step_hooks(self) -> None:
        for h in self._step_hooks:
            h.remove()
        self._step_hooks = []

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        """Checkpoint-safe primitives (loads with ``weights_only=True``): windows and findings."""
        if self.session is None:
            return {}
        return {"session": self.session.state_dict(), "findings": [json.loads(f.to_json()) for f in self.findings],
                "version": 2}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` when the run opens (call before :meth:`open`)."""
        self._pending_state = dict(state) if state else None

    # ------------------------------------------------------------------ policy
    def _read(self, step: int, final: bool = False, partial: bool = False) -> list[Finding]:
        """A log step: one read of the device, the detectors, scalars, findings out; then the finding policy.
        ``partial``: the last step read was begun and never finished (the run failed in it)."""
        s, out = self.session, self.output
        assert s is not None and out is not None
        s.flush()
        self._keep_statistics(s.step if partial else None)
        new, s.findings = s.findings, []  # with those of reads the session did itself (its ring was full)
        new = [replace(f, batch=self._batch_at[f.step][0], epoch=self._batch_at[f.step][1])
               if f.step in self._batch_at and f.batch is None else f for f in new]
        self.skipped_steps = list(s.diagnosis.skipped_steps)
        out.scalars({f"probe/{k}": v for k, v in s.latest_scalars().items()}, step)
        out.flush()
        if new:
            new, _ = group_incidents(self.findings, new)
        if new:
            self.findings.extend(new)
            out.findings(new, self.findings, step, s.history.to_csv)
            self._explain = list(dict.fromkeys(self._explain + self._explaining(new)))
        if not self._draw_pinned() and new and not self._draw_recent(new):
            self._capture_next = True  # no copy of the step that fired: draw the layers as they are next step
        if new and not final:
            if self.config.on_finding == "stop":
                self.should_stop = True
            elif self.config.on_finding == "raise":
                raise ProbeAlarm(f"lit_probe: {new[0].message} (on_finding='raise'; {len(new)} finding(s) at this "
                                 f"check)", new)
        return new

    def _keep_statistics(self, partial: Optional[int]) -> None:
        """The blocks of per-step statistics read since the last log step, to the output (``stats.bin``)."""
        s, out = self.session, self.output
        assert s is not None and out is not None
        blocks = s.take_derived()
        if not blocks:
            return
        order = s.execution_order()
        pnames = list(s.params.names) if s.params is not None else []
        for d in blocks:
            out.statistics(d.steps, d.values, STATS, names=s.slot_names, signals=s.slot_signals, order=order,
                           params=d.params, param_stats=PARAM_STATS, param_names=pnames,
                           partial=[partial] if partial is not None and partial in d.steps else ())

    def _draw_figure_step(self, step: int) -> None:
        s, out = self.session, self.output
        assert s is not None and out is not None
        with_findings = {f.layer for f in self.findings}
        out.figures(step, s.take_snapshots(), with_findings, explain=self._explain)  # findings not drawn yet first
        self._explain = []
        if s.params is not None:
            out.parameters(step, s.take_param_histograms(), dict(zip(s.params.names, s.params.numel)), with_findings)
        out.timeline(step, s.timeline(self.findings))
        if self._gc_images is not None:
            images, self._gc_images = self._gc_images, None
            from .gradcam import gradcam_overlays

            try:
                out.gradcam(step, gradcam_overlays(self.model, self._gradcam, images))
            except Exception as err:
                out.say(f"lit_probe: Grad-CAM disabled ({type(err).__name__}: {err}); it needs a classifier whose "
                        "forward takes the image batch, and conv-like layers.")
                self._gradcam = []
        out.figures_written()

    def _draw_pinned(self) -> bool:
        """After a read: draw the pinned figure inputs of the step that fired if a non-finite or exploding finding
        is at that step, with priority (each incident's cause first), and the finding layers' figures of the step
        before it (their ``_before``); drop the pins either way (a GradScaler skip alarms without a finding)."""
        s, out = self.session, self.output
        assert s is not None and out is not None
        if not s.pinned:
            return False
        at = next(iter(s.pinned))
        snaps, before = s.claim_pinned(at), s.claim_pinned_before()
        fired = [f for f in self.findings if f.step == at and f.kind in ("nonfinite", "exploding")]
        if not fired:
            return False
        explain = self._explaining(fired)
        with_findings = {f.layer for f in self.findings}
        if before is not None:
            out.figures(before[0], before[1], with_findings, explain=explain, only_explain=True)
        out.figures(at, snaps, with_findings, explain=explain)
        self._explain = [n for n in self._explain if n not in explain]
        return True

    def _draw_recent(self, new: Sequence[Finding]) -> bool:
        """After a read whose new stream findings are all of a window (dead units, vanishing gradients): draw them
        from the flight recorder, at the step the first one's window completed when the recorder still holds it,
        else at the step the rule fired (this read's step; the figures say which step they show)."""
        s, out = self.session, self.output
        assert s is not None and out is not None
        streams = [f for f in new if f.signal != "parameter"]
        if not streams or any(f.kind not in ("dead", "vanishing") for f in streams):
            return False
        got = s.claim_recent(min(f.step for f in streams))
        if got is None:
            return False
        explain = self._explaining(streams)
        out.figures(got[0], got[1], {f.layer for f in self.findings}, explain=explain)
        self._explain = [n for n in self._explain if n not in explain]
        return True

    def _explaining(self, findings: Sequence[Finding]) -> list[str]:
        """The streams that explain ``findings``, each incident's cause first, in incident order."""
        ordered = sorted(findings, key=lambda f: (f.incident, not f.cause, f.step))
        return list(dict.fromkeys(f.layer for f in ordered if f.signal != "parameter"))

    def _streams(self) -> list[dict[str, Any]]:
        s = self.session
        if s is None:
            return []
        return [{"name": s.slot_names[k], "module": s.names[s.slot_module[k]], "call": s.slot_call[k],
                 "signal": s.slot_signals[k], "layout": s.layouts[s.slot_module[k]]} for k in s.execution_order()]

    def _read_scale(self) -> Any:
        return self._scale() if self._scale is not None else None


def _unwrap_optimizer(opt: Any) -> Any:
    """A torch optimizer from a wrapper (Fabric's ``_FabricOptimizer``, Lightning's ``LightningOptimizer``)."""
    import torch

    # Fabric's wrapper is an instance of the optimizer's class too: unwrap whenever a torch optimizer is inside
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _scale_reader(loss_scale: Any) -> Optional[Callable[[], Any]]:
    """A callable returning the loss-scale tensor (no host sync) from a GradScaler, a callable, or ``None``."""
    if loss_scale is None:
        return None
    if hasattr(loss_scale, "is_enabled") and hasattr(loss_scale, "get_scale"):
        scaler = loss_scale

        def read() -> Any:
            import torch

            scale = getattr(scaler, "_scale", None) if scaler.is_enabled() else None
            return scale if isinstance(scale, torch.Tensor) else None

        return read
    if callable(loss_scale):
        return loss_scale
    raise ProbeConfigError(f"`loss_scale` must be a GradScaler, a callable or None, got {type(loss_scale).__name__}.")


def first_images(batch: Any, n: int) -> Any:
    """The first ``[N, C, H, W]`` floating tensor of a batch (images), its first ``n`` samples."""
    from .hooks import iter_tensors

    for t in iter_tensors(batch):
        if t.dim() == 4 and t.shape[1] in (1, 3, 4):
            return t[:n].detach()
    return None
