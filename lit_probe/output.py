"""Output
======

:class:`ProbeOutput` owns everything that leaves the process: scalars to the loggers, findings as they arrive
(``findings.jsonl``, a ``ProbeWarning``, the W&B findings table, the flight recorder CSV), figure files and images
(disk, W&B, TensorBoard) through the renderer, and the run record (:class:`~lit_probe.record.RunRecord`,
``run.json``) with its views ``summary.md`` and ``report.html``, and the per-step statistics beside it
(``stats.bin``, a chunk per log step: :mod:`lit_probe.statlog`, read by ``lit-probe diff``). The run (:class:`~lit_probe.run.ProbeRun`) calls
its verbs; nothing else writes.

Only rank zero writes (``is_zero``); other ranks get an output that does nothing. Imports neither Lightning
nor wandb (the sinks import wandb lazily).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from .findings import Finding
from .record import FINDINGS_NAME, SUMMARY_NAME, RunRecord
from .statlog import STATS_NAME, StatWriter

if TYPE_CHECKING:
    from .config import ProbeConfig

__all__ = ["ProbeOutput", "ProbeWarning"]

log = logging.getLogger("lit_probe")

_MAX_WARNINGS_PER_FLUSH = 8


class ProbeWarning(UserWarning):
    """The category of the warnings ``on_finding="warn"`` emits for findings."""


class ProbeOutput:
    """Every way out of the process for one run.

    Args:
        out_dir: the run's save directory.
        loggers: anything with ``log_metrics(metrics, step=)`` (Lightning and Fabric loggers).
        config: the run's options (figures, their files, W&B, how long the end waits for figures).
        is_zero: whether this process writes (rank zero).
        record: the run record this output keeps and writes (``run.json``).
    """

    def __init__(self, out_dir: Path, loggers: Sequence[Any], config: "ProbeConfig", *, is_zero: bool,
                 record: Optional[RunRecord] = None) -> None:
        self.out_dir = Path(out_dir)
        self.loggers = list(loggers or [])
        self.is_zero = is_zero
        self.config = config
        self.figure_kinds = tuple(config.figures) if config.figure_every_n_steps is not None else ()
        self.max_figure_layers = config.max_figure_layers
        self.warn = config.on_finding != "raise"  # under "raise" the ProbeAlarm says it
        self.record = record if record is not None else RunRecord()
        self.said: set[str] = set()
        self.renderer: Any = None
        self.disk: Any = None
        self._wandb: list[Any] = []
        self._disk_ok = True
        self._findings_pushed = 0
        self.stats: Optional[StatWriter] = None
        if not is_zero:
            return
        self._open_sinks()

    def start(self, restored: Sequence[Finding] = (), resumed: bool = False) -> None:
        """A run begins: ``findings.jsonl`` restarts with the findings restored from a checkpoint (if any), the
        statistics log (``stats.bin``) starts (``resumed``: goes on), and the record is written
        (``status: running``), so that even a killed run leaves one."""
        if not self.is_zero or not self._writable():
            return
        mb = self.config.stats_file_mb
        if mb != 0:
            try:
                self.stats = StatWriter(self.out_dir / STATS_NAME, fresh=not resumed,
                                        max_bytes=None if mb is None else int(mb * 1e6))
                self.record.stats = {"file": STATS_NAME}
            except OSError as err:
                self._disk_failed(err)
        self.record.set_findings(restored)
        self._append_findings(restored, fresh=True)
        self._save_record()

    def _open_sinks(self) -> None:
        cfg = self.config
        try:
            from .sinks import DiskSink, WandbSink, image_sinks_for
        except Exception as err:  # pragma: no cover - matplotlib/pillow missing
            self.say(f"lit_probe: figures and W&B output disabled ({type(err).__name__}: {err}).")
            return
        sinks, info = image_sinks_for(self.loggers, log_to_wandb=cfg.log_to_wandb, defer_wandb=True)
        self._wandb = [s for s in sinks if isinstance(s, WandbSink)]
        if not self.figure_kinds:
            return
        for msg in info:
            self.say(f"lit_probe: {msg}")
        try:
            from .render import FigureRenderer
        except Exception as err:  # pragma: no cover
            self.say(f"lit_probe: figures disabled ({type(err).__name__}: {err}).")
            return
        self.disk = DiskSink(self.out_dir, mode=cfg.figure_files, max_versions=cfg.max_versions)  # type: ignore[arg-type]
        n = self.max_figure_layers if self.max_figure_layers is not None else 256
        self.renderer = FigureRenderer([self.disk] + sinks, figures=self.figure_kinds, max_channels=cfg.max_channels,
                                       max_queue=2 * (n + 8) + 2, wait_when_full=cfg.figure_wait_s is None,
                                       share=cfg.figure_share)

    # ------------------------------------------------------------------ verbs
    def say(self, msg: str) -> None:
        """Log ``msg`` once (rank zero)."""
        if msg in self.said or not self.is_zero:
            return
        self.said.add(msg)
        log.warning(msg)
        self.record.note(msg.removeprefix("lit_probe: "))

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` to every logger at ``step``."""
        if not metrics or not self.is_zero:
            return
        for logger in self.loggers:
            try:
                logger.log_metrics(metrics, step=step)
            except Exception as err:
                self.say(f"lit_probe: logger {type(logger).__name__} rejected probe metrics ({err}).")

    def findings(self, new: list[Finding], everything: list[Finding], step: int,
                 history_csv: Callable[[int], str] | None = None, streams: Sequence[dict] = ()) -> None:
        """Report findings as they arrive: a line each in ``findings.jsonl``, a warning, the flight recorder,
        the W&B findings table at ``step``, and keep the last figures from before an instability."""
        if not new or not self.is_zero:
            return
        if self.warn:
            for f in new[:_MAX_WARNINGS_PER_FLUSH]:
                warnings.warn(f"lit_probe: {f.message}", ProbeWarning, stacklevel=3)
            if len(new) > _MAX_WARNINGS_PER_FLUSH:
                warnings.warn(f"lit_probe: {len(new) - _MAX_WARNINGS_PER_FLUSH} more finding(s) at step {step}; "
                              f"see findings.jsonl in {self.out_dir}.", ProbeWarning, stacklevel=3)
        self._append_findings(new)
        if self._writable():
            try:
                if history_csv is not None:
                    from .sinks import atomic_write_text

                    atomic_write_text(self.out_dir / f"flight_recorder_step{step:06d}.csv",
                                      history_csv(self.config.history_csv_steps))
            except OSError as err:
                self._disk_failed(err)
        if self.disk is not None:
            for f in new:
                if f.kind in ("nonfinite", "exploding"):
                    self.disk.keep_before(f.layer, f.step)
        self._push_findings(everything, step)
        self.record.set_findings(everything)
        if streams:
            self.record.streams = list(streams)
        self.record.last_step = max(self.record.last_step, int(step))
        self._save_record()

    def _push_findings(self, everything: list[Finding], step: int) -> None:
        if not self._wandb or len(everything) == self._findings_pushed:
            return
        rows = [f.to_dict() for f in sorted(everything, key=lambda f: (f.incident, not f.cause, f.step))]
        for sink in self._wandb:
            try:
                sink.write_findings(rows, step)
            except Exception as err:
                self.say(f"lit_probe: could not push findings to W&B ({err}).")
        self._findings_pushed = len(everything)

    def figures(self, step: int, snapshots: Sequence[Any], with_findings: set[str], *,
                explain: Sequence[str] = (), only_explain: bool = False) -> None:
        """Queue the figures of one figure step: first the streams in ``explain`` (they explain a finding: each
        incident's cause first, then its other streams; never dropped for a full queue, see
        :meth:`~lit_probe.render.FigureRenderer.submit_layer`), then the other streams with findings, then up to
        ``max_figure_layers`` others spread over the model (none with ``only_explain``); what is not drawn is said
        once."""
        if self.renderer is None or not snapshots:
            return
        rank = {name: k for k, name in enumerate(explain)}
        first = sorted((s for s in snapshots if s.name in rank), key=lambda s: rank[s.name])
        rest = [] if only_explain else self._pick([s for s in snapshots if s.name not in rank], lambda s: s.name,
                                                  with_findings)
        for snap in first + rest:
            self.renderer.submit_layer(step, snap.name, snap.activation, snap.gradient, snap.dead,
                                       layout=snap.layout, shape=snap.shape, priority=snap.name in rank,
                                       source=snap.source)

    def parameters(self, step: int, hists: Mapping[str, tuple[Any, Any]], numel: Mapping[str, int],
                   with_findings: set[str]) -> None:
        """Queue the weight / parameter-gradient histograms of one figure step (same layer choice as
        :meth:`figures`)."""
        if self.renderer is None or not hists or "parameters" not in self.figure_kinds:
            return
        for name in self._pick(list(hists), lambda n: n, with_findings):
            w, g = hists[name]
            self.renderer.submit_parameters(step, name, w, g, int(numel.get(name, len(w))))

    def _pick(self, items: Sequence[Any], name: Callable[[Any], str], with_findings: set[str]) -> list[Any]:
        first = [x for x in items if name(x) in with_findings]
        rest = [x for x in items if name(x) not in with_findings]
        n = self.max_figure_layers
        if n is not None and len(rest) > n:
            pick = sorted({round(k * (len(rest) - 1) / max(n - 1, 1)) for k in range(n)}) if n > 0 else []
            self.say(f"lit_probe: figures of {len(pick)} of {len(rest)} layers without findings are drawn per "
                     f"figure step (max_figure_layers={n}); layers with findings are always drawn.")
            rest = [rest[k] for k in pick]
        return first + rest

    def timeline(self, step: int, tl: Any) -> None:
        """Queue the health timeline."""
        if self.renderer is None or tl is None or "timeline" not in self.figure_kinds:
            return
        self.renderer.submit_timeline(step, tl.names, tl.steps, tl.act_rms, tl.grad_rms, tl.dead, tl.marks)

    def gradcam(self, step: int, maps: Sequence[tuple[str, Any, list[str]]]) -> None:
        """Queue Grad-CAM figures: ``(layer, overlays [n, H, W, 3], labels)`` each."""
        if self.renderer is None:
            return
        for name, overlays, labels in maps:
            self.renderer.submit_gradcam(step, name, overlays, labels)

    def statistics(self, steps: Any, values: Any, stats: Sequence[str], *, names: Sequence[str],
                   signals: Sequence[str], order: Sequence[int], params: Any = None, param_stats: Sequence[str] = (),
                   param_names: Sequence[str] = (), partial: Sequence[int] = ()) -> None:
        """One block of per-step statistics (``values[n, slots, len(stats)]``, ``params[n, modules,
        len(param_stats)]``) appended to ``stats.bin`` (:mod:`lit_probe.statlog`); rank zero."""
        w = self.stats
        if w is None or not self.is_zero or not self._disk_ok:
            return
        try:
            w.append(steps, values, stats, names=names, signals=signals, order=order, params=params,
                     param_stats=param_stats, param_names=param_names, partial=partial)
        except OSError as err:
            self._disk_failed(err)
            return
        if w.stopped_at is not None:
            self.say(f"lit_probe: {STATS_NAME} reached stats_file_mb={self.config.stats_file_mb:g}: per-step "
                     f"statistics are kept up to step {w.stopped_at - 1} (lit-probe diff compares up to there).")
            self.record.stats["stopped_at"] = w.stopped_at

    def flush(self) -> None:
        """At a log step, on the training thread: push queued W&B images."""
        if self.renderer is not None:
            try:
                self.renderer.flush_sinks()
            except Exception as err:
                self.say(f"lit_probe: could not push figures ({err}).")

    def figures_written(self) -> None:
        """After a figure step: the record's figure index as the disk sink has it now."""
        if self.disk is not None:
            self.record.figures = self.disk.index()
            self._save_record()

    def close(self, findings: list[Finding], *, status: str, never_ran: Sequence[str] = (),
              skipped_steps: Sequence[int] = (), streams: Sequence[dict] = (), timeline: Any = None,
              step: int = 0) -> None:
        """End of the run (``status`` ``"finished"`` or ``"failed"``): bounded wait for figures, then the record,
        ``findings.jsonl`` in incident order, ``summary.md`` and ``report.html``."""
        if not self.is_zero:
            return
        if findings and len(findings) != self._findings_pushed:
            self._push_findings(findings, step)  # the table of every finding, once more at the end
        skipped: list[str] = []
        if self.renderer is not None:
            r, self.renderer = self.renderer, None
            try:
                if timeline is not None and "timeline" in self.figure_kinds:
                    r.submit_timeline(step, timeline.names, timeline.steps, timeline.act_rms, timeline.grad_rms,
                                      timeline.dead, timeline.marks, urgent=True)  # the end's time bound never drops it
                r.close(self.config.figure_wait_s)
                r.flush_sinks()  # every sink once, W&B included
                skipped = list(r.skipped_summary())
                for line in skipped:  # in the record as `figures_skipped`, not as a note
                    log.warning(f"lit_probe: {line}")
            except Exception as err:
                self.say(f"lit_probe: figure output failed at the end ({err}).")
        else:
            for sink in self._wandb:
                try:
                    sink.flush()
                except Exception as err:
                    self.say(f"lit_probe: could not push to W&B at the end ({err}).")
        rec = self.record
        rec.status, rec.never_ran, rec.skipped_steps = status, list(never_ran), [int(x) for x in skipped_steps]
        rec.figures_skipped = skipped
        rec.last_step = max(rec.last_step, int(step))
        if streams:
            rec.streams = list(streams)
        if self.disk is not None:
            rec.figures = self.disk.index()
        rec.set_findings(findings)
        rec.ended = time.time()
        if self.stats is not None:
            rec.stats["bytes"] = self.stats.size
        self._write_final()

    # ------------------------------------------------------------------ files
    def _writable(self) -> bool:
        if not self._disk_ok:
            return False
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            return True
        except OSError as err:
            self._disk_failed(err)
            return False

    def _disk_failed(self, err: OSError) -> None:
        self._disk_ok = False
        self.say(f"lit_probe: cannot write to {self.out_dir} ({err}); findings stay in `probe.findings`.")

    def _append_findings(self, findings: Sequence[Finding], fresh: bool = False) -> None:
        """``findings.jsonl``, the one writer: a line per finding as it arrives (``fresh``: a new file, with the
        findings restored from a checkpoint), so a killed run's file has every finding up to its last read."""
        if not (findings or fresh) or not self._writable():
            return
        try:
            with open(self.out_dir / FINDINGS_NAME, "w" if fresh else "a", encoding="utf-8") as fh:
                fh.writelines(f.to_json() + "\n" for f in findings)
        except OSError as err:
            self._disk_failed(err)

    def _save_record(self) -> None:
        if self._writable():
            try:
                self.record.save(self.out_dir)
            except OSError as err:
                self._disk_failed(err)

    def _write_final(self) -> None:
        """``run.json``, then its views ``summary.md`` and ``report.html``."""
        from .sinks import atomic_write_text

        if not self._writable():
            return
        try:
            self.record.save(self.out_dir)
            atomic_write_text(self.out_dir / SUMMARY_NAME, self.record.summary_markdown())
        except OSError as err:
            self._disk_failed(err)
            return
        try:
            from .report import write_report

            write_report(self.out_dir, record=self.record)
        except ImportError:
            pass
        except Exception as err:  # the report is a view of the record: never fail the run for it
            self.say(f"lit_probe: could not write report.html ({type(err).__name__}: {err}).")
